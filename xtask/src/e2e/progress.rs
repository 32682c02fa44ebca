//! How far a guest got, how long it may take, and what a failure means.
//!
//! The guest's /init prints a progress marker at each stage ([`Stage`]); the harness follows
//! the console file while QEMU runs ([`ConsoleWatch`]) and notes when each marker arrived.
//! [`Deadlines`] bound each boot from a calibration boot's times: the guest gets a while to
//! reach init, then a while between one marker and the next, and never more than
//! [`HARD_BOUND`] in all. When one runs out, [`classify_timeout`] tells a host too slow to
//! boot the guest ([`Class::SlowHost`]) from a guest that got going and then stopped
//! ([`Class::Hang`]). Every failure the harness reports is a [`Failure`] with its [`Class`].

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The bound on one boot whatever its progress, from QEMU's start to its exit.
pub(crate) const HARD_BOUND: Duration = Duration::from_secs(120);
/// The time to reach init is this many times the calibration boot's, and at least
/// [`MIN_TO_INIT`].
const INIT_FACTOR: u32 = 8;
const MIN_TO_INIT: Duration = Duration::from_secs(30);
/// The time between two markers is this many times the calibration boot's whole run, and at
/// least [`MIN_STALL`]. A stage takes one or two seconds of a boot of three to eight.
const STALL_FACTOR: u32 = 5;
const MIN_STALL: Duration = Duration::from_secs(20);

/// The stages the guest's /init marks, in order, with `VU-E2E-STAGE <nonce> <stage> <uptime>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    /// /init runs: the kernel booted.
    Init,
    /// The virtio modules are loaded (their probes have run: the first device I/O is done).
    Modules,
    /// The device node is there (/dev/vda, or virtio_rng is the current hwrng).
    Device,
    /// The test's I/O is done; the verdict and power-off follow.
    Workload,
}

impl Stage {
    const ALL: [Stage; 4] = [Stage::Init, Stage::Modules, Stage::Device, Stage::Workload];

    /// The word in the marker.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stage::Init => "init",
            Stage::Modules => "modules",
            Stage::Device => "device",
            Stage::Workload => "workload",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Stage::Init => "init started",
            Stage::Modules => "modules loaded",
            Stage::Device => "device found",
            Stage::Workload => "workload done",
        }
    }

    /// What the guest does after this stage, i.e. where it stopped if it stopped here.
    fn next_step(self) -> &'static str {
        match self {
            Stage::Init => "loading the virtio modules (the drivers' probes do the first I/O)",
            Stage::Modules => "waiting for the device node",
            Stage::Device => "the test's I/O",
            Stage::Workload => "the verdict, sync and power-off",
        }
    }
}

/// A marker for this boot's nonce on one console line: the stage and the guest's uptime.
pub(crate) fn parse_marker(line: &str, nonce: &str) -> Option<(Stage, f64)> {
    let (_, rest) = line.split_once("VU-E2E-STAGE ")?;
    let mut words = rest.split_whitespace();
    if words.next()? != nonce {
        return None;
    }
    let word = words.next()?;
    let stage = Stage::ALL.into_iter().find(|stage| stage.name() == word)?;
    let uptime = words.next()?.parse().ok()?;
    Some((stage, uptime))
}

/// A stage reached: when on the host's clock (from QEMU's start) and on the guest's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Reached {
    pub(crate) stage: Stage,
    pub(crate) host: Duration,
    pub(crate) guest_uptime: f64,
}

/// The stages one boot reached, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Progress {
    pub(crate) reached: Vec<Reached>,
}

impl Progress {
    /// The latest stage reached.
    pub(crate) fn last(&self) -> Option<&Reached> {
        self.reached.last()
    }

    /// When `stage` was reached, if it was.
    pub(crate) fn at(&self, stage: Stage) -> Option<&Reached> {
        self.reached.iter().find(|reached| reached.stage == stage)
    }

    fn note(&mut self, stage: Stage, host: Duration, guest_uptime: f64) {
        if self.at(stage).is_none() {
            self.reached.push(Reached {
                stage,
                host,
                guest_uptime,
            });
        }
    }

    /// `init 1.20 s (guest 0.85 s), modules 1.41 s (guest 1.02 s)`, or `none`.
    pub(crate) fn summary(&self) -> String {
        if self.reached.is_empty() {
            return "none".to_owned();
        }
        self.reached
            .iter()
            .map(|r| {
                format!(
                    "{} {:.2} s (guest {:.2} s)",
                    r.stage.name(),
                    r.host.as_secs_f64(),
                    r.guest_uptime
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Follows the guest's console file as QEMU appends to it and notes the markers.
#[derive(Debug)]
pub(crate) struct ConsoleWatch {
    path: PathBuf,
    nonce: String,
    file: Option<File>,
    partial: Vec<u8>,
    pub(crate) progress: Progress,
}

impl ConsoleWatch {
    pub(crate) fn new(path: &Path, nonce: &str) -> Self {
        Self {
            path: path.to_owned(),
            nonce: nonce.to_owned(),
            file: None,
            partial: Vec::new(),
            progress: Progress::default(),
        }
    }

    /// Reads what was appended since the last call; a marker found now counts as reached at
    /// `elapsed`.
    pub(crate) fn poll(&mut self, elapsed: Duration) {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(file) = &mut self.file else {
            return;
        };
        if file.read_to_end(&mut self.partial).is_err() {
            return;
        }
        self.take_lines(elapsed);
    }

    /// Consumes the complete lines of `partial`.
    fn take_lines(&mut self, elapsed: Duration) {
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            if let Some((stage, uptime)) =
                parse_marker(&String::from_utf8_lossy(&line), &self.nonce)
            {
                self.progress.note(stage, elapsed, uptime);
            }
        }
    }
}

/// A calibration boot's times: to init and to power-off. The first boot that passes in a
/// run of the harness is its calibration boot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Calibration {
    pub(crate) to_init: Duration,
    pub(crate) total: Duration,
}

/// The bounds of one boot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Deadlines {
    /// From QEMU's start to the `init` marker.
    pub(crate) to_init: Duration,
    /// From one marker to the next (and from the last to QEMU's exit).
    pub(crate) stall: Duration,
    /// From QEMU's start to its exit, whatever the progress.
    pub(crate) hard: Duration,
    /// What they were derived from, for the reports.
    pub(crate) calibration: Option<Calibration>,
}

/// Which bound ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// The guest did not reach init in time.
    NoInit,
    /// The guest reached a stage and then no next one in time.
    Stalled,
    /// The hard bound, while the guest was still progressing.
    Hard,
}

impl Deadlines {
    /// Before the calibration boot (which gets these), and for `cargo xtask demo`.
    pub(crate) const UNCALIBRATED: Deadlines = Deadlines {
        to_init: Duration::from_secs(60),
        stall: Duration::from_secs(60),
        hard: HARD_BOUND,
        calibration: None,
    };

    /// Scaled from a calibration boot made on this host just before.
    pub(crate) fn calibrated(calibration: Calibration) -> Deadlines {
        let scale =
            |time: Duration, factor: u32, min: Duration| (time * factor).clamp(min, HARD_BOUND);
        Deadlines {
            to_init: scale(calibration.to_init, INIT_FACTOR, MIN_TO_INIT),
            stall: scale(calibration.total, STALL_FACTOR, MIN_STALL),
            hard: HARD_BOUND,
            calibration: Some(calibration),
        }
    }

    /// The bound that ran out at `elapsed` after QEMU's start, if one did.
    pub(crate) fn expired(&self, elapsed: Duration, progress: &Progress) -> Option<Expiry> {
        match progress.last() {
            None if elapsed >= self.to_init => return Some(Expiry::NoInit),
            Some(last) if elapsed >= last.host + self.stall => return Some(Expiry::Stalled),
            _ => {}
        }
        (elapsed >= self.hard).then_some(Expiry::Hard)
    }

    /// `30 s to init, 20 s between stages, 120 s in all (calibration: init 1.52 s, total 2.10 s)`.
    pub(crate) fn describe(&self) -> String {
        let base = format!(
            "{} s to init, {} s between stages, {} s in all",
            self.to_init.as_secs(),
            self.stall.as_secs(),
            self.hard.as_secs()
        );
        match self.calibration {
            Some(c) => format!(
                "{base} (calibration boot: init at {:.2} s, power-off at {:.2} s)",
                c.to_init.as_secs_f64(),
                c.total.as_secs_f64()
            ),
            None => format!("{base} (uncalibrated)"),
        }
    }
}

/// What kind of failure a boot had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The host did not give the guest the CPU to boot in time: it never reached init, or was
    /// still progressing at the hard bound. The gate retries such a boot.
    SlowHost,
    /// The guest reached init and then stopped progressing: a lost kick, a missed interrupt,
    /// a request never completed.
    Hang,
    /// The guest's test or the host's check after power-off found wrong data.
    WrongAnswer,
    /// QEMU ended without the guest's verdict: a kernel panic, init dying, QEMU failing.
    Crash,
    /// The backend process misbehaved outside the guest's view: it never listened, or did
    /// not exit on SIGTERM.
    Backend,
}

impl Class {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Class::SlowHost => "slow host",
            Class::Hang => "hang",
            Class::WrongAnswer => "wrong answer",
            Class::Crash => "crash",
            Class::Backend => "backend",
        }
    }
}

/// A failed boot: its class and the reason in words.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub(crate) class: Class,
    pub(crate) reason: String,
}

impl Failure {
    pub(crate) fn new(class: Class, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.name(), self.reason)
    }
}

/// The failure of a boot stopped at `elapsed` because `expiry` ran out.
pub(crate) fn classify_timeout(
    expiry: Expiry,
    progress: &Progress,
    deadlines: &Deadlines,
    elapsed: Duration,
) -> Failure {
    let secs = elapsed.as_secs_f64();
    match (expiry, progress.last()) {
        (Expiry::NoInit, _) | (_, None) => Failure::new(
            Class::SlowHost,
            format!(
                "the guest did not reach init within {} s (stopped at {secs:.1} s)",
                deadlines.to_init.as_secs()
            ),
        ),
        (Expiry::Stalled, Some(last)) => Failure::new(
            Class::Hang,
            format!(
                "the guest reached `{}` ({}) at {:.1} s, guest uptime {:.2} s, then made no \
                 progress for {} s; it was {} (stopped at {secs:.1} s)",
                last.stage.name(),
                last.stage.describe(),
                last.host.as_secs_f64(),
                last.guest_uptime,
                deadlines.stall.as_secs(),
                last.stage.next_step()
            ),
        ),
        (Expiry::Hard, Some(last)) => Failure::new(
            Class::SlowHost,
            format!(
                "the guest was still progressing at the hard bound of {} s (last: `{}` at {:.1} s)",
                deadlines.hard.as_secs(),
                last.stage.name(),
                last.host.as_secs_f64()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(value: f64) -> Duration {
        Duration::from_secs_f64(value)
    }

    fn progress(stages: &[(Stage, f64)]) -> Progress {
        let mut progress = Progress::default();
        for &(stage, at) in stages {
            progress.note(stage, secs(at), at / 2.0);
        }
        progress
    }

    #[test]
    fn markers_are_parsed_for_this_nonce_only() {
        assert_eq!(
            parse_marker("VU-E2E-STAGE abc device 1.93", "abc"),
            Some((Stage::Device, 1.93))
        );
        assert_eq!(
            parse_marker("[    2.1] random: VU-E2E-STAGE abc init 0.80", "abc"),
            Some((Stage::Init, 0.8))
        );
        assert_eq!(parse_marker("VU-E2E-STAGE old init 0.80", "abc"), None);
        assert_eq!(parse_marker("VU-E2E-STAGE abc reboot 0.80", "abc"), None);
        assert_eq!(parse_marker("VU-E2E-STAGE abc init", "abc"), None);
        assert_eq!(parse_marker("VU-E2E-PASS blk abc", "abc"), None);
    }

    #[test]
    fn console_watch_notes_markers_as_lines_complete() {
        let dir = std::env::temp_dir().join(format!(
            "vu-watch-test-{:x}",
            super::super::boot::fresh_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut watch = ConsoleWatch::new(&path, "n");
        watch.poll(secs(0.1));
        assert!(watch.progress.reached.is_empty());
        std::fs::write(&path, "VU-E2E-STAGE n init 0.5\nVU-E2E-STAGE n modu").unwrap();
        watch.poll(secs(1.0));
        std::fs::write(
            &path,
            "VU-E2E-STAGE n init 0.5\nVU-E2E-STAGE n modules 0.9\nVU-E2E-STAGE n init 3.0\n",
        )
        .unwrap();
        watch.poll(secs(2.0));
        assert_eq!(
            watch.progress.reached,
            [
                Reached {
                    stage: Stage::Init,
                    host: secs(1.0),
                    guest_uptime: 0.5
                },
                Reached {
                    stage: Stage::Modules,
                    host: secs(2.0),
                    guest_uptime: 0.9
                }
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn deadlines_scale_with_the_calibration_within_bounds() {
        let quick = Deadlines::calibrated(Calibration {
            to_init: secs(1.0),
            total: secs(1.5),
        });
        assert_eq!((quick.to_init, quick.stall), (MIN_TO_INIT, MIN_STALL));
        let loaded = Deadlines::calibrated(Calibration {
            to_init: secs(5.0),
            total: secs(8.0),
        });
        assert_eq!((loaded.to_init, loaded.stall), (secs(40.0), secs(40.0)));
        let hopeless = Deadlines::calibrated(Calibration {
            to_init: secs(60.0),
            total: secs(90.0),
        });
        assert_eq!(hopeless.hard, HARD_BOUND);
        assert_eq!((hopeless.to_init, hopeless.stall), (HARD_BOUND, HARD_BOUND));
        assert!(hopeless.describe().contains("init at 60.00 s"));
    }

    #[test]
    fn expiry_depends_on_the_stage_reached_and_its_time() {
        let deadlines = Deadlines {
            to_init: secs(30.0),
            stall: secs(20.0),
            hard: secs(120.0),
            calibration: None,
        };
        let none = Progress::default();
        assert_eq!(deadlines.expired(secs(29.9), &none), None);
        assert_eq!(deadlines.expired(secs(30.0), &none), Some(Expiry::NoInit));
        let late_init = progress(&[(Stage::Init, 29.0)]);
        assert_eq!(deadlines.expired(secs(40.0), &late_init), None);
        assert_eq!(
            deadlines.expired(secs(49.0), &late_init),
            Some(Expiry::Stalled)
        );
        let creeping = progress(&[
            (Stage::Init, 29.0),
            (Stage::Modules, 48.0),
            (Stage::Device, 67.0),
            (Stage::Workload, 86.0),
            (Stage::Workload, 86.0),
        ]);
        assert_eq!(creeping.reached.len(), 4);
        assert_eq!(deadlines.expired(secs(105.0), &creeping), None);
        let still_going = progress(&[(Stage::Init, 29.0), (Stage::Workload, 110.0)]);
        assert_eq!(
            deadlines.expired(secs(120.0), &still_going),
            Some(Expiry::Hard)
        );
    }

    #[test]
    fn timeouts_are_classified_by_how_far_the_guest_got() {
        let deadlines = Deadlines::UNCALIBRATED;
        let never = classify_timeout(Expiry::NoInit, &Progress::default(), &deadlines, secs(60.0));
        assert_eq!(never.class, Class::SlowHost);
        assert!(never.reason.contains("did not reach init"), "{never}");
        let stuck = classify_timeout(
            Expiry::Stalled,
            &progress(&[
                (Stage::Init, 1.0),
                (Stage::Modules, 1.5),
                (Stage::Device, 1.6),
            ]),
            &deadlines,
            secs(61.6),
        );
        assert_eq!(stuck.class, Class::Hang);
        assert!(
            stuck
                .to_string()
                .starts_with("hang: the guest reached `device`"),
            "{stuck}"
        );
        assert!(stuck.reason.contains("the test's I/O"), "{stuck}");
        let creeping = classify_timeout(
            Expiry::Hard,
            &progress(&[(Stage::Init, 50.0), (Stage::Modules, 100.0)]),
            &deadlines,
            secs(120.0),
        );
        assert_eq!(creeping.class, Class::SlowHost);
        assert!(creeping.reason.contains("still progressing"), "{creeping}");
    }
}
