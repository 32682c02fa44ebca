//! A client for QMP, QEMU's machine monitor protocol, on a unix socket.
//!
//! Every boot starts QEMU with `-qmp unix:<sockets>/qmp.sock,server=on,wait=off`; on a
//! passing boot only a net boot connects (to have QEMU announce the guest).
//! [`Qmp::connect`] waits for the socket, reads the greeting and leaves negotiation mode; [`Qmp::execute`] runs one command and returns its `return` value;
//! [`Qmp::hmp`] runs a human-monitor (HMP) command line through QMP's `human-monitor-command`
//! and returns its text. Asynchronous events that arrive meanwhile are kept ([`Qmp::events`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::json::{quote, Json};

/// How long one reply may take: QMP is served by QEMU's main loop, which a loaded host (the
/// very case a dump is taken in) may starve for seconds.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// A negotiated QMP connection.
#[derive(Debug)]
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Json>,
    /// Why the connection is unusable: after a reply did not come in time, a late reply
    /// would be taken for the next command's, and QEMU's main loop is likely stuck anyway.
    broken: Option<String>,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until it exists or `timeout` passes,
    /// then reads the greeting and sends `qmp_capabilities`.
    pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<Self, String> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(err) if start.elapsed() >= timeout => {
                    return Err(format!("cannot connect to {}: {err}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|err| format!("cannot set a read timeout: {err}"))?;
        let writer = stream
            .try_clone()
            .map_err(|err| format!("cannot clone the QMP socket: {err}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
            broken: None,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting:?}"));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (a JSON object's text, or none) and returns the
    /// `return` member of its reply; an `error` reply becomes `Err` with QEMU's description.
    pub(crate) fn execute(
        &mut self,
        command: &str,
        arguments: Option<&str>,
    ) -> Result<Json, String> {
        if let Some(reason) = &self.broken {
            return Err(format!("`{command}` not sent: {reason}"));
        }
        let request = match arguments {
            Some(arguments) => {
                format!(
                    "{{\"execute\": {}, \"arguments\": {arguments}}}\n",
                    quote(command)
                )
            }
            None => format!("{{\"execute\": {}}}\n", quote(command)),
        };
        self.writer
            .write_all(request.as_bytes())
            .map_err(|err| format!("cannot send `{command}`: {err}"))?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push(message);
                continue;
            }
            return reply_value(message).map_err(|err| format!("`{command}`: {err}"));
        }
    }

    /// Runs an HMP command line (e.g. `info lapic`) and returns its output; `cpu` selects the
    /// vCPU that per-CPU commands such as `info lapic` and `info registers` look at.
    pub(crate) fn hmp(&mut self, line: &str, cpu: Option<u32>) -> Result<String, String> {
        let mut arguments = format!("{{\"command-line\": {}", quote(line));
        if let Some(cpu) = cpu {
            arguments.push_str(&format!(", \"cpu-index\": {cpu}"));
        }
        arguments.push('}');
        let value = self.execute("human-monitor-command", Some(&arguments))?;
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("`{line}`: the reply is not text: {value:?}"))
    }

    /// The asynchronous events received so far (`STOP`, `RESUME`, ...).
    pub(crate) fn events(&self) -> &[Json] {
        &self.events
    }

    fn read_message(&mut self) -> Result<Json, String> {
        let mut line = String::new();
        let reason = match self.reader.read_line(&mut line) {
            Ok(0) => "QEMU closed the QMP connection".to_owned(),
            Ok(_) => {
                return Json::parse(line.trim()).map_err(|err| format!("bad QMP message: {err}"));
            }
            Err(err) => format!(
                "no QMP message within {} s ({err})",
                REPLY_TIMEOUT.as_secs()
            ),
        };
        self.broken = Some(reason.clone());
        Err(reason)
    }
}

/// The `return` of a reply, or its error's class and description.
pub(crate) fn reply_value(message: Json) -> Result<Json, String> {
    if let Some(error) = message.get("error") {
        let class = error.get("class").and_then(Json::as_str).unwrap_or("?");
        let desc = error.get("desc").and_then(Json::as_str).unwrap_or("?");
        return Err(format!("{class}: {desc}"));
    }
    match message {
        Json::Object(members) => members
            .into_iter()
            .find(|(name, _)| name == "return")
            .map(|(_, value)| value)
            .ok_or_else(|| "a reply with neither `return` nor `error`".to_owned()),
        other => Err(format!("a reply that is not an object: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_value_is_taken_from_the_reply() {
        let reply = Json::parse(r#"{"return": {"status": "paused"}}"#).unwrap();
        let value = reply_value(reply).unwrap();
        assert_eq!(value.get("status").and_then(Json::as_str), Some("paused"));
    }

    #[test]
    fn error_reply_names_class_and_description() {
        let reply = Json::parse(
            r#"{"error": {"class": "CommandNotFound", "desc": "The command x-nope has not been found"}}"#,
        )
        .unwrap();
        let err = reply_value(reply).unwrap_err();
        assert_eq!(
            err,
            "CommandNotFound: The command x-nope has not been found"
        );
        assert!(reply_value(Json::parse("{}").unwrap()).is_err());
    }

    #[test]
    fn a_scripted_server_is_negotiated_with_and_events_are_kept() {
        use std::io::Read;
        use std::os::unix::net::UnixListener;
        let dir =
            std::env::temp_dir().join(format!("vu-qmp-test-{:x}", super::super::boot::fresh_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut requests = Vec::new();
            for reply in [
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": \"lapic text\\r\\n\"}\n",
            ] {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                requests.push(line);
                stream.write_all(reply.as_bytes()).unwrap();
            }
            let mut rest = String::new();
            let _ = reader.read_to_string(&mut rest);
            requests
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.hmp("info lapic", Some(1)).unwrap(), "lapic text\r\n");
        assert_eq!(qmp.events().len(), 1);
        drop(qmp);
        let requests = server.join().unwrap();
        assert_eq!(requests[0].trim(), r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(
            requests[1].trim(),
            r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info lapic", "cpu-index": 1}}"#
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
