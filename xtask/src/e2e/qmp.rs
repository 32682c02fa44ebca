//! A minimal QMP client for the e2e migration runs: connect to QEMU's monitor socket, leave
//! capabilities negotiation, run a command and take its `return` line, and read numbers and
//! strings out of the JSON text (xtask is std only, so no JSON parser).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// How long QEMU may take to create its monitor socket.
const SOCKET_DEADLINE: Duration = Duration::from_secs(10);

/// A QMP connection.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects once QEMU created the socket, and leaves capabilities negotiation mode.
    pub(crate) fn connect(path: &Path, qemu: &mut Child) -> Result<Qmp, String> {
        let start = Instant::now();
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(path) {
                break stream;
            }
            if let Ok(Some(status)) = qemu.try_wait() {
                return Err(format!("QEMU exited before its monitor was up: {status}"));
            }
            if start.elapsed() > SOCKET_DEADLINE {
                return Err(format!("no QMP socket at {} in time", path.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|err| format!("QMP: {err}"))?;
        let writer = stream.try_clone().map_err(|err| format!("QMP: {err}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let mut greeting = String::new();
        qmp.reader
            .read_line(&mut greeting)
            .map_err(|err| format!("QMP greeting: {err}"))?;
        qmp.execute(r#"{"execute": "qmp_capabilities"}"#)?;
        Ok(qmp)
    }

    /// Sends one command and returns its `return` line (events in between are skipped).
    pub(crate) fn execute(&mut self, command: &str) -> Result<String, String> {
        writeln!(self.writer, "{command}").map_err(|err| format!("QMP {command}: {err}"))?;
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|err| format!("QMP {command}: {err}"))?;
            if n == 0 {
                return Err(format!("QMP {command}: QEMU closed the monitor"));
            }
            if line.starts_with("{\"return\"") {
                return Ok(line);
            }
            if line.starts_with("{\"error\"") {
                return Err(format!("QMP {command}: {}", line.trim()));
            }
        }
    }
}

/// The number after `"key":` in a JSON text (the first occurrence).
pub(crate) fn json_number(text: &str, key: &str) -> Option<u64> {
    let pattern = format!("\"{key}\":");
    let (_, rest) = text.split_once(&pattern)?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The string after `"key":` in a JSON text (the first occurrence).
pub(crate) fn json_string<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let (_, rest) = text.split_once(&pattern)?;
    let rest = rest.trim_start().strip_prefix('"')?;
    rest.split_once('"').map(|(value, _)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_figures_are_read() {
        let info = r#"{"return": {"status": "completed", "setup-time": 2, "downtime": 17, "total-time": 1834, "ram": {"transferred": 9876543, "dirty-sync-count": 4}}}"#;
        assert_eq!(json_string(info, "status"), Some("completed"));
        assert_eq!(json_number(info, "downtime"), Some(17));
        assert_eq!(json_number(info, "total-time"), Some(1834));
        assert_eq!(json_number(info, "transferred"), Some(9876543));
        assert_eq!(json_number(info, "dirty-sync-count"), Some(4));
        assert_eq!(json_number(info, "missing"), None);
    }
}
