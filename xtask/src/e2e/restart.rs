//! `cargo xtask e2e --restart`: a vhost-user-blk backend killed (or stopped) and restarted on
//! the same socket, several times per boot, under a guest that keeps requests in flight.
//!
//! QEMU 7.2 connects with `-chardev socket,...,reconnect=1` to a 2-queue vhost-user-blk
//! device; the guest (tests/e2e/restart.sh) runs several workers, each writing known lines
//! into its own 512 KiB region with O_DIRECT and reading them back, checking every byte.
//! The harness reads the rings' indices from the guest's RAM (a file in /dev/shm, see
//! `rings`); once a request is outstanding it freezes the backend (SIGSTOP) until the guest
//! has piled up more, sends the signal (SIGKILL, or SIGTERM and SIGCONT), then starts a new
//! backend on the same socket path and times the guest's next completed request. After the restarts it writes a stop word into the image; the guest finishes,
//! checks every region once more and its kernel log for I/O errors, and powers off; the
//! host then checks the image. docs/inflight.md says what makes this work and what it
//! measured.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

mod boot;
mod image;
mod rings;

use super::boot::{Backend, Device};
use super::{build_vu_backend, prepare, Run};
use boot::{Report, Setup, Signal};

/// Restarts per boot.
const RESTARTS: u32 = 3;
/// Workers in the guest: with our backend, enough that both queues carry several requests
/// at once; with qemu-storage-daemon, the reference, one.
const VU_WORKERS: u32 = 8;
const QSD_WORKERS: u32 = 1;
/// Keep the backend frozen until this many requests are outstanding on both rings together
/// (each worker's 512 KiB write or read is 2 requests).
const VU_MIN_OUTSTANDING: u32 = 8;
const QSD_MIN_OUTSTANDING: u32 = 2;

/// The command line of `cargo xtask e2e --restart`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    qsd: bool,
    signal: Signal,
    boots: u32,
    restarts: u32,
    workers: u32,
    min_outstanding: u32,
}

const USAGE: &str = "\
usage: cargo xtask e2e --restart [--backend vu|qsd] [--signal kill|term] [--boots N]
                       [--restarts N] [--workers N] [--min-outstanding N]
       cargo xtask e2e --restart --gate

  Boots a guest whose 2-queue vhost-user-blk disk is served by a backend that the harness
  kills (or stops) and starts again on the same socket, several times per boot, while the
  guest's workers write and read back known data with O_DIRECT. See docs/inflight.md.
  --backend          vu: vu_blk (default); qsd: qemu-storage-daemon, the reference
  --signal           kill: SIGKILL, a crash (default); term: SIGTERM, a graceful stop
  --boots            boots (default 10)
  --restarts         restarts per boot (default 3)
  --workers          guest workers (default 8 for vu, 1 for qsd; at most 30)
  --min-outstanding  once a request is outstanding the harness freezes the backend
                     (SIGSTOP) until this many are, then signals it (default 8 for vu, 2
                     for qsd; it signals anyway after 2 s frozen)
  --gate             the runs of `cargo xtask ci`
";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut qsd = false;
    let mut signal = Signal::Kill;
    let mut boots = 10;
    let mut restarts = RESTARTS;
    let mut workers = None;
    let mut min_outstanding = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .map(String::as_str)
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let positive = |name: &str, text: &str| {
            text.parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{name} wants a positive number, not `{text}`"))
        };
        match arg.as_str() {
            "--restart" => {}
            "--backend" => {
                qsd = match value("--backend")? {
                    "vu" => false,
                    "qsd" => true,
                    other => return Err(format!("--restart runs vu or qsd, not `{other}`")),
                }
            }
            "--signal" => {
                signal = match value("--signal")? {
                    "kill" => Signal::Kill,
                    "term" => Signal::Term,
                    other => return Err(format!("--signal is kill or term, not `{other}`")),
                }
            }
            "--boots" => boots = positive("--boots", value("--boots")?)?,
            "--restarts" => restarts = positive("--restarts", value("--restarts")?)?,
            "--workers" => workers = Some(positive("--workers", value("--workers")?)?),
            "--min-outstanding" => {
                let text = value("--min-outstanding")?;
                min_outstanding = Some(
                    text.parse()
                        .map_err(|_| format!("--min-outstanding wants a number, not `{text}`"))?,
                );
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    let workers = workers.unwrap_or(if qsd { QSD_WORKERS } else { VU_WORKERS });
    if workers > image::MAX_WORKERS {
        return Err(format!("--workers: at most {}", image::MAX_WORKERS));
    }
    Ok(Options {
        qsd,
        signal,
        boots,
        restarts,
        workers,
        min_outstanding: min_outstanding.unwrap_or(if qsd {
            QSD_MIN_OUTSTANDING
        } else {
            VU_MIN_OUTSTANDING
        }),
    })
}

impl Options {
    fn describe(&self) -> String {
        format!(
            "cargo xtask e2e --restart --backend {} --signal {} --boots {} --restarts {} \
             --workers {} --min-outstanding {}",
            if self.qsd { "qsd" } else { "vu" },
            self.signal.name().to_lowercase(),
            self.boots,
            self.restarts,
            self.workers,
            self.min_outstanding
        )
    }

    fn name(&self) -> String {
        format!(
            "restart-{}-{}",
            if self.qsd { "qsd" } else { "vu" },
            self.signal.name().to_lowercase()
        )
    }
}

/// What a run of boots produced.
#[derive(Debug, Default)]
struct Summary {
    boots: u32,
    passes: u32,
    /// Failed boots whose guest saw a request completed twice (`is not a head`).
    double_completions: u32,
    reports: Vec<Report>,
}

/// How many times the gate runs a qemu-storage-daemon reference run whose every failure was
/// the guest seeing a request completed twice: qemu-storage-daemon 7.2 does that after a
/// restart now and then (the issue measured 1 in 21 deep runs; a gate run hit it once),
/// which says nothing about the test.
const REFERENCE_ATTEMPTS: u32 = 3;

/// Whether the guest's console shows a request completed twice (Linux virtio_ring's
/// "id N is not a head!").
fn saw_double_completion(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("console.log"))
        .map(|console| console.contains("is not a head!"))
        .unwrap_or(false)
}

/// The value at `pct` percent of `values` sorted (0 when empty).
fn percentile(values: &[u64], pct: usize) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted
        .get((sorted.len().saturating_sub(1)) * pct / 100)
        .copied()
        .unwrap_or(0)
}

impl Summary {
    fn line(&self, name: &str) -> String {
        let restarts: Vec<&boot::Restart> = self.reports.iter().flat_map(|r| &r.restarts).collect();
        let survived = self
            .reports
            .iter()
            .filter(|r| r.failure.is_none())
            .map(|r| r.restarts.len())
            .sum::<usize>();
        let outstanding: Vec<u64> = restarts
            .iter()
            .map(|r| u64::from(r.total_outstanding()))
            .collect();
        let none = outstanding.iter().filter(|&&n| n == 0).count();
        let recovery: Vec<u64> = restarts.iter().map(|r| r.recovery_ms).collect();
        let exit: Vec<u64> = restarts.iter().map(|r| r.exit_ms).collect();
        let search: Vec<u64> = restarts.iter().map(|r| r.search_ms).collect();
        let seen: Vec<u64> = restarts.iter().map(|r| u64::from(r.seen)).collect();
        let frozen: Vec<u64> = restarts.iter().map(|r| r.freeze_ms).collect();
        let seconds: Vec<u64> = self
            .reports
            .iter()
            .map(|r| (r.seconds * 1000.0) as u64)
            .collect();
        format!(
            "{name}: {}/{} boots passed, {survived} restarts in passing boots ({} in all); \
             requests outstanding when the backend was frozen: median {} max {}, at the signal \
             (frozen median {} ms, max {} ms): min {} median {} max {} ({none} signals with \
             none); first completion after the new backend's start: median {} ms, max {} ms; \
             backend gone after the signal: median {} ms, max {} ms; looked for an outstanding \
             request: median {} ms, max {} ms; boot median {:.1} s",
            self.passes,
            self.boots,
            restarts.len(),
            percentile(&seen, 50),
            percentile(&seen, 100),
            percentile(&frozen, 50),
            percentile(&frozen, 100),
            percentile(&outstanding, 0),
            percentile(&outstanding, 50),
            percentile(&outstanding, 100),
            percentile(&recovery, 50),
            percentile(&recovery, 100),
            percentile(&exit, 50),
            percentile(&exit, 100),
            percentile(&search, 50),
            percentile(&search, 100),
            percentile(&seconds, 50) as f64 / 1000.0,
        )
    }
}

/// One boot's line.
fn boot_line(index: u32, report: &Report, dir: &std::path::Path) -> String {
    let restarts: Vec<String> = report
        .restarts
        .iter()
        .map(|r| {
            let queues: Vec<String> = r.outstanding.iter().map(u16::to_string).collect();
            format!(
                "{} out ({} when frozen), back in {} ms",
                queues.join("+"),
                r.seen,
                r.recovery_ms
            )
        })
        .collect();
    match &report.failure {
        None => format!(
            "boot {index}: pass in {:.1} s: {} restarts ({}); {} guest rounds",
            report.seconds,
            restarts.len(),
            restarts.join("; "),
            report.rounds
        ),
        Some(reason) => format!(
            "boot {index}: FAIL after {} restarts ({}): {reason} (logs in {})",
            restarts.len(),
            restarts.join("; "),
            dir.display()
        ),
    }
}

/// Runs `options.boots` boots, printing one line each.
fn run(options: &Options) -> Result<Summary, String> {
    let backend_name = if options.qsd { "qsd" } else { "vu" };
    let machine = prepare(
        &[Run {
            device: Device::Blk,
            backend: backend_name,
            queues: 2,
            cpus: 2,
            packed: false,
            iommu: false,
        }],
        false,
    )?;
    let backend = if options.qsd {
        Backend::Qsd
    } else {
        Backend::Vu(build_vu_backend(Device::Blk, false)?)
    };
    let setup = Setup {
        machine: &machine,
        backend: &backend,
        signal: options.signal,
        restarts: options.restarts,
        workers: options.workers,
        min_outstanding: options.min_outstanding,
    };
    let name = options.name();
    let mut summary = Summary::default();
    for index in 0..options.boots {
        let dir = PathBuf::from("target/e2e/runs")
            .join(&name)
            .join(format!("boot-{index:02}"));
        let report = boot::run_boot(&setup, &dir)?;
        summary.boots += 1;
        if report.failure.is_none() {
            summary.passes += 1;
        } else if saw_double_completion(&dir) {
            summary.double_completions += 1;
        }
        eprintln!("    {}", boot_line(index, &report, &dir));
        summary.reports.push(report);
    }
    eprintln!("    {}", summary.line(&name));
    Ok(summary)
}

/// `cargo xtask e2e --restart ...`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|arg| arg == "--gate") {
        return match ci_step() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("xtask e2e --restart --gate: FAILED: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match parse(args) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("xtask e2e --restart: {err}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(summary) if summary.passes == summary.boots => ExitCode::SUCCESS,
        Ok(summary) => {
            eprintln!(
                "xtask e2e --restart: FAILED: {}/{} boots passed",
                summary.passes, summary.boots
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("xtask e2e --restart: FAILED: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The gate's runs: `vu_blk` killed and `vu_blk` stopped, 10 boots each, every boot must
/// pass; then qemu-storage-daemon with one worker, the check of the test itself.
fn ci_runs() -> Vec<Options> {
    let vu = |signal| Options {
        qsd: false,
        signal,
        boots: 10,
        restarts: RESTARTS,
        workers: VU_WORKERS,
        min_outstanding: VU_MIN_OUTSTANDING,
    };
    let qsd = |signal, boots| Options {
        qsd: true,
        signal,
        boots,
        restarts: RESTARTS,
        workers: QSD_WORKERS,
        min_outstanding: QSD_MIN_OUTSTANDING,
    };
    vec![
        vu(Signal::Kill),
        vu(Signal::Term),
        qsd(Signal::Kill, 1),
        qsd(Signal::Term, 1),
    ]
}

/// The restart runs of `cargo xtask ci` ([`ci_runs`]); every boot of every run must pass.
pub(crate) fn ci_step() -> Result<(), String> {
    let start = Instant::now();
    let mut problems = Vec::new();
    for options in ci_runs() {
        eprintln!("==> e2e: restarts, {}", options.describe());
        let mut result = run(&options);
        let mut attempt = 1;
        // The reference's own known bug is not a fault of the test: repeat its run.
        while let Ok(summary) = &result {
            let failed = summary.boots - summary.passes;
            if !options.qsd
                || failed == 0
                || summary.double_completions != failed
                || attempt == REFERENCE_ATTEMPTS
            {
                break;
            }
            eprintln!(
                "    qemu-storage-daemon completed a request twice after a restart (the \
                 guest's virtio_blk: `is not a head`), its known bug, not the test's: run \
                 {} of at most {REFERENCE_ATTEMPTS}",
                attempt + 1
            );
            attempt += 1;
            result = run(&options);
        }
        match result {
            Ok(summary) if summary.passes == summary.boots => {}
            Ok(summary) => problems.push(format!(
                "{}: {}/{} boots passed",
                options.describe(),
                summary.passes,
                summary.boots
            )),
            Err(err) => problems.push(format!("{}: {err}", options.describe())),
        }
    }
    eprintln!(
        "    the gate's restart runs took {:.0} s",
        start.elapsed().as_secs_f64()
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn options_are_parsed_with_per_backend_defaults() {
        let vu = parse(&words("--restart")).unwrap();
        assert_eq!((vu.qsd, vu.signal, vu.workers), (false, Signal::Kill, 8));
        let qsd = parse(&words("--restart --backend qsd --signal term --boots 2")).unwrap();
        assert_eq!(
            (qsd.qsd, qsd.signal, qsd.boots, qsd.workers),
            (true, Signal::Term, 2, 1)
        );
        assert_eq!(parse(&words("--workers 3")).unwrap().workers, 3);
        assert!(parse(&words("--workers 31")).is_err());
        assert!(parse(&words("--signal stop")).is_err());
        assert!(parse(&words("--backend qemu")).is_err());
        assert!(parse(&words("--boots 0")).is_err());
    }

    #[test]
    fn a_console_with_a_request_completed_twice_is_recognised() {
        let dir = std::env::temp_dir().join(format!("vu-rs-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!saw_double_completion(&dir));
        let console = dir.join("console.log");
        std::fs::write(&console, "[ 5.9] I/O error, dev vda, sector 2048\n").unwrap();
        assert!(!saw_double_completion(&dir));
        std::fs::write(
            &console,
            "[ 5.9] virtio_blk virtio0: req.0:id 2 is not a head!\n",
        )
        .unwrap();
        assert!(saw_double_completion(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_gate_runs_both_signals_on_ours_and_the_reference() {
        let runs = ci_runs();
        for signal in [Signal::Kill, Signal::Term] {
            assert!(runs
                .iter()
                .any(|r| !r.qsd && r.signal == signal && r.boots == 10));
        }
        assert!(runs.iter().any(|r| r.qsd && r.workers == 1));
    }
}
