//! The daemon's lifecycle log: connection, negotiated features, memory table, rings started
//! and stopped, and the disconnect with its reason, as an operator reads them through `log`.
//!
//! This binary installs a logger that records every message (a process has one logger), so it
//! holds the logging tests only.

use std::sync::{Mutex, PoisonError};

use vu_backend::testing::{DeviceSetup, InProcess};
use vu_backend::VringMutex;
use vu_tests::backends::EchoBackend;

/// Records every message at debug level and above.
struct Recorder {
    lines: Mutex<Vec<String>>,
}

impl log::Log for Recorder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Debug
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = format!("{}: {}", record.level(), record.args());
            self.lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(line);
        }
    }

    fn flush(&self) {}
}

static RECORDER: Recorder = Recorder {
    lines: Mutex::new(Vec::new()),
};

fn logged() -> Vec<String> {
    RECORDER
        .lines
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

fn assert_logged(lines: &[String], wanted: &str) {
    assert!(
        lines.iter().any(|line| line.contains(wanted)),
        "no log line contains `{wanted}`; the log:\n{}",
        lines.join("\n")
    );
}

#[test]
fn a_connection_s_life_is_logged_at_info_and_debug() {
    log::set_logger(&RECORDER).expect("the only logger of this binary");
    log::set_max_level(log::LevelFilter::Debug);

    let setup = DeviceSetup {
        queue_size: 32,
        ..DeviceSetup::default()
    };
    let mut running = InProcess::start(EchoBackend::<VringMutex>::new(1, 256), &setup);
    assert_eq!(running.device.stop_queue(0), 0);
    let InProcess { mut daemon, device } = running;
    drop(device);
    daemon.wait().expect("a clean disconnect");

    let lines = logged();
    assert_logged(&lines, "INFO: frontend connected");
    assert_logged(&lines, "INFO: virtio features negotiated: 0x140000000");
    assert_logged(&lines, "INFO: protocol features negotiated:");
    assert_logged(&lines, "INFO: memory table: 1 region(s), 4194304 bytes");
    assert_logged(&lines, "DEBUG: queue 0 started: size 32");
    assert_logged(
        &lines,
        "DEBUG: queue 0 stopped (size 32) at available index 0",
    );
    assert_logged(&lines, "INFO: frontend disconnected");
    // In that order.
    let position = |wanted: &str| lines.iter().position(|l| l.contains(wanted));
    assert!(position("frontend connected") < position("memory table"));
    assert!(position("memory table") < position("queue 0 started"));
    assert!(position("queue 0 stopped") < position("frontend disconnected"));
}
