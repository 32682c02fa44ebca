//! `cargo xtask e2e --stress`: boots while the harness itself keeps the CPUs busy, to find
//! rare hangs before users do. Not part of the gate.
//!
//! [`Load`] threads spin in bursts of 20 to 500 ms, busy `duty` percent of the time, at the
//! harness's own priority, so QEMU's vCPU and main-loop threads and the backend's workers
//! have to compete for the CPUs in an irregular pattern (the pattern that made the guest's
//! `check_timer()` give up, before `no_timer_check`). The calibration boot (the first to
//! pass) is made under the load, so the deadlines are those of the loaded host. Nothing is retried: every boot counts,
//! and the report keeps passes, slow-host timeouts, hangs and other failures apart. The run
//! fails on a hang or another failure, not on a slow host.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::boot::fresh_u64;
use super::{backend_for, failures, plan, prepare, run_boots, table, Boots, Options, Row};

/// Shortest and longest period of a spinning thread's busy-then-idle cycle.
const MIN_PERIOD_MS: u64 = 20;
const MAX_PERIOD_MS: u64 = 500;

/// The load the harness puts on the host while it boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Load {
    /// Spinning threads.
    pub(crate) threads: usize,
    /// Percent of each period a thread spins.
    pub(crate) duty: u8,
}

impl Default for Load {
    /// One thread per CPU, busy 80 % of the time.
    fn default() -> Self {
        Load {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            duty: 80,
        }
    }
}

/// Running spinning threads; [`Spinners::stop`] joins them.
struct Spinners {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Duration>>,
    start: Instant,
}

impl Spinners {
    fn start(load: Load) -> Spinners {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..load.threads)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || spin(&stop, load.duty))
            })
            .collect();
        Spinners {
            stop,
            handles,
            start: Instant::now(),
        }
    }

    /// Stops the threads; returns the CPU share they spun for, in percent of one CPU each
    /// (what they asked for, not what the scheduler gave them).
    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.handles.len();
        let busy: f64 = self
            .handles
            .into_iter()
            .filter_map(|handle| handle.join().ok())
            .map(|busy| busy.as_secs_f64())
            .sum();
        let wall = self.start.elapsed().as_secs_f64();
        if wall > 0.0 && threads > 0 {
            100.0 * busy / wall / threads as f64
        } else {
            0.0
        }
    }
}

/// Spins `duty` percent of each random period until `stop`; returns the time spent spinning.
fn spin(stop: &AtomicBool, duty: u8) -> Duration {
    let mut busy = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let period =
            Duration::from_millis(MIN_PERIOD_MS + fresh_u64() % (MAX_PERIOD_MS - MIN_PERIOD_MS));
        let (on, off) = split_period(period, duty);
        let start = Instant::now();
        while start.elapsed() < on && !stop.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
        busy += start.elapsed();
        std::thread::sleep(off);
    }
    busy
}

/// The busy and idle parts of a period at `duty` percent.
fn split_period(period: Duration, duty: u8) -> (Duration, Duration) {
    let on = period * u32::from(duty.min(100)) / 100;
    (on, period - on)
}

/// Runs the stress mode for `options` under `load`.
pub(crate) fn main(options: &Options, load: Load) -> ExitCode {
    let runs = plan(options);
    if runs.is_empty() {
        eprintln!("xtask e2e --stress: nothing to run: qemu-storage-daemon serves blk only");
        return ExitCode::from(2);
    }
    let machine = match prepare(&runs, options.kvm) {
        Ok(machine) => machine,
        Err(err) => {
            eprintln!("xtask e2e --stress: FAILED: setup: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Build before loading the host: the build is not what is being stressed.
    let backends: Vec<_> = runs
        .iter()
        .map(|run| backend_for(run, options.release))
        .collect();
    eprintln!(
        "==> e2e --stress: {} spinning threads, busy {} % in bursts of {MIN_PERIOD_MS}-{MAX_PERIOD_MS} ms",
        load.threads, load.duty
    );
    let start = Instant::now();
    let spinners = Spinners::start(load);
    let mut deadlines = None;
    let mut rows = Vec::new();
    for (run, backend) in runs.into_iter().zip(backends) {
        let name = run.name();
        eprintln!("==> e2e --stress: {name}: {} boots", options.boots);
        let backend = match backend {
            Ok(backend) => backend,
            Err(err) => {
                let mut row = Row::new(run);
                row.setup_error = Some(err);
                rows.push(row);
                continue;
            }
        };
        // A passing boot's directory is removed (200 disk images would fill the disk), a
        // failing boot's is moved to target/e2e/failed/.
        let dir = |index: u32| {
            PathBuf::from("target/e2e/stress")
                .join(&name)
                .join(format!("boot-{index:03}"))
        };
        let boots = Boots {
            machine: &machine,
            backend,
            count: options.boots,
            dir: &dir,
            slow_host_retries: 0,
            keep_passes: false,
        };
        rows.push(run_boots(&run, &boots, &mut deadlines));
    }
    let spun = spinners.stop();
    report(&rows, load, spun, start.elapsed())
}

/// The table, one line per run with the counts apart, and the exit code.
fn report(rows: &[Row], load: Load, spun: f64, took: Duration) -> ExitCode {
    print!("\n{}", table(rows, true));
    for row in rows {
        println!(
            "stress {}: {} boots: {} passed, {} slow-host timeouts, {} hangs, {} other failures",
            row.name(),
            row.boots,
            row.passes,
            row.slow_host,
            row.hangs,
            row.other
        );
        for kept in &row.kept {
            println!("    kept: {}", kept.display());
        }
    }
    println!(
        "load: {} threads asked for {} %, spun {spun:.0} % of the time; total {:.1} s",
        load.threads,
        load.duty,
        took.as_secs_f64()
    );
    let failed = failures(rows, true);
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("xtask e2e --stress: FAILED: {}", failed.join("; "));
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_split_by_duty() {
        let period = Duration::from_millis(200);
        assert_eq!(
            split_period(period, 80),
            (Duration::from_millis(160), Duration::from_millis(40))
        );
        assert_eq!(split_period(period, 100), (period, Duration::ZERO));
        assert_eq!(split_period(period, 250), (period, Duration::ZERO));
    }

    #[test]
    fn spinners_stop_when_asked_and_report_their_share() {
        let spinners = Spinners::start(Load {
            threads: 1,
            duty: 10,
        });
        let share = spinners.stop();
        assert!((0.0..=100.0).contains(&share), "{share}");
    }
}
