//! The host side of the net boots: a network namespace per boot holding the host end of the
//! tap `vu_net` serves, with an address, and a TCP peer in it that the guest talks to.
//!
//! The namespace keeps the test off the host's own network: its name is the boot's socket
//! directory's (unique per boot), the tap [`TAP`] is created in it (persistent, with a
//! virtio-net header) with [`HOST_ADDR`], and `vu_net` runs in it (`ip netns exec`) and
//! attaches to the tap. Deleting the namespace deletes the tap.
//!
//! The peer is this xtask itself (`/proc/<pid>/exe e2e --net-peer DOWN UP`, started in the
//! namespace): it listens on [`UP_PORT`] and [`DOWN_PORT`], sends the download file to the
//! guest that connects to the second, receives the guest's upload on the first into the
//! upload file and answers `got N`. The guest compares the download's sha256 with the one on
//! its command line; the host compares the upload's sha256 with the one the guest prints
//! (`judge`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use super::boot::{shell_line, stop, Files};
use super::host;
use super::monitor::Qmp;
use crate::cmd::Cmd;

/// The host end of the tap, in the boot's namespace.
pub(crate) const TAP: &str = "vu0";
/// The host's address on the tap, and the guest's.
pub(crate) const HOST_ADDR: &str = "10.0.2.1";
const GUEST_ADDR: &str = "10.0.2.15";
const PREFIX_LEN: u8 = 24;
/// The peer's ports: the guest uploads to the first and downloads from the second.
const UP_PORT: u16 = 5001;
const DOWN_PORT: u16 = 5002;
/// Bytes moved each way (a multiple of the guest's 64 KiB `dd` blocks).
pub(crate) const BYTES: usize = 4 << 20;
/// How long the peer may take to listen.
const PEER_READY_DEADLINE: Duration = Duration::from_secs(10);
/// How long the peer waits on one connection before it gives up.
const PEER_IO_TIMEOUT: Duration = Duration::from_secs(120);
/// The line the peer prints once it listens.
const PEER_READY: &str = "peer: listening";

/// The guest's `e2e.net=` argument: its address, the host's, the ports, the upload size.
pub(crate) fn guest_argument() -> String {
    format!("e2e.net={GUEST_ADDR}/{PREFIX_LEN},{HOST_ADDR},{UP_PORT},{DOWN_PORT},{BYTES}")
}

/// The process that made namespace `name` (`vu-e2e-<pid>-<hex>`, the boot's socket
/// directory's name), if the name is one of ours.
fn owner_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("vu-e2e-")?;
    let (pid, hex) = rest.split_once('-')?;
    (hex.len() == 8 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Deletes the namespaces (and so the taps) that earlier runs left behind when they were
/// killed before they could clean up: ours whose process is gone.
pub(crate) fn remove_stale_namespaces() {
    let Ok(out) = Cmd::new("ip").args(&["netns", "list"]).capture_quietly() else {
        return;
    };
    for name in out
        .stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let stale = owner_of(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if stale {
            let cmd = Cmd::new("ip").args(&["netns", "delete", name]);
            eprintln!(
                "    a killed run left namespace {name}: $ {}",
                cmd.display()
            );
            if let Err(err) = cmd.capture_quietly() {
                eprintln!("    {err}");
            }
        }
    }
}

/// Asks QEMU, over its monitor at `qmp`, to announce its NICs once (`announce-self`): for a
/// guest without `VIRTIO_NET_F_GUEST_ANNOUNCE` QEMU hands its fake RARP to the vhost-user
/// netdev, which sends the backend `SEND_RARP` with the guest's MAC address (what QEMU does
/// at the end of a migration).
pub(crate) fn announce_self(qmp: &Path) -> Result<(), String> {
    let mut monitor = Qmp::connect(qmp, Duration::from_secs(5))?;
    monitor
        .execute(
            "announce-self",
            Some(r#"{"initial": 1, "max": 1, "rounds": 1, "step": 1}"#),
        )
        .map(drop)
}

/// `program` run inside namespace `namespace`.
pub(crate) fn in_namespace(namespace: &str, program: &Path) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace]).arg(program);
    command
}

/// Runs `ip ARGS`, noting it in `log`.
fn ip(args: &[&str], log: &mut File) -> Result<(), String> {
    let cmd = Cmd::new("ip").args(args);
    let _ = writeln!(log, "$ {}", cmd.display());
    let out = cmd.capture_quietly()?;
    if out.success {
        Ok(())
    } else {
        Err(format!("`{}` failed: {}", cmd.display(), out.stderr.trim()))
    }
}

/// A boot's namespace with the tap, and the peer in it; [`HostSide::finish`] stops the peer
/// and deletes the namespace (so does dropping it).
pub(crate) struct HostSide {
    namespace: String,
    peer: Option<Child>,
    log: PathBuf,
}

impl HostSide {
    /// Creates the namespace of `files` with the tap (multi-queue for more than one queue
    /// pair) and its address, and starts the peer
    /// serving `files.download`; the commands and the peer's output go to `files.net_log`.
    /// `Err` says which step failed and how (for example, not being root).
    pub(crate) fn start(files: &Files, queues: u16) -> Result<HostSide, String> {
        let mut log = File::create(&files.net_log)
            .map_err(|err| format!("cannot create {}: {err}", files.net_log.display()))?;
        let namespace = files.netns.clone();
        ip(&["netns", "add", &namespace], &mut log)?;
        let mut side = HostSide {
            namespace,
            peer: None,
            log: files.net_log.clone(),
        };
        let ns = side.namespace.clone();
        let address = format!("{HOST_ADDR}/{PREFIX_LEN}");
        let mut tuntap = vec![
            "-n", &ns, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr",
        ];
        if queues > 1 {
            tuntap.push("multi_queue");
        }
        for args in [
            &["-n", &ns, "link", "set", "lo", "up"][..],
            &tuntap,
            &["-n", &ns, "address", "add", &address, "dev", TAP],
            &["-n", &ns, "link", "set", TAP, "up"],
        ] {
            ip(args, &mut log)?;
        }
        side.peer = Some(side.start_peer(files, &mut log)?);
        Ok(side)
    }

    fn start_peer(&self, files: &Files, log: &mut File) -> Result<Child, String> {
        // This very program, through /proc: it stays executable even when a build replaced
        // (and so deleted) target/debug/xtask while the run goes on.
        let xtask = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
        let mut command = in_namespace(&self.namespace, &xtask);
        command
            .args(["e2e", "--net-peer"])
            .arg(&files.download)
            .arg(&files.upload);
        let _ = writeln!(log, "$ {}", shell_line(&command));
        let output = OpenOptions::new()
            .append(true)
            .open(&self.log)
            .and_then(|out| Ok((out.try_clone()?, out)))
            .map_err(|err| format!("cannot open {}: {err}", self.log.display()))?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(output.0)
            .stderr(output.1)
            .spawn()
            .map_err(|err| format!("cannot start `{}`: {err}", shell_line(&command)))?;
        let start = Instant::now();
        while !self.log_text().contains(PEER_READY) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the net peer exited before listening ({status}): {}",
                    self.last_line()
                ));
            }
            if start.elapsed() > PEER_READY_DEADLINE {
                stop(&mut child);
                return Err(format!(
                    "the net peer did not listen within {} s",
                    PEER_READY_DEADLINE.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(child)
    }

    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default()
    }

    fn last_line(&self) -> String {
        self.log_text()
            .lines()
            .last()
            .unwrap_or("(no output)")
            .to_owned()
    }

    /// Stops the peer (it has exited by itself when both transfers happened) and deletes
    /// the namespace; returns the peer's last line, for a failure's reason.
    pub(crate) fn finish(mut self) -> String {
        if let Some(mut peer) = self.peer.take() {
            if host::wait_bounded(&mut peer, Duration::from_secs(1)).is_none() {
                let _ = writeln!(self.append(), "peer: still running after the boot; killed");
            }
        }
        self.last_line()
    }

    fn append(&self) -> Box<dyn Write> {
        match OpenOptions::new().append(true).open(&self.log) {
            Ok(file) => Box::new(file),
            Err(_) => Box::new(std::io::sink()),
        }
    }
}

impl Drop for HostSide {
    fn drop(&mut self) {
        if let Some(mut peer) = self.peer.take() {
            let _ = peer.kill();
            let _ = peer.wait();
        }
        // Deleting the namespace deletes the tap in it.
        let mut log = self.append();
        let cmd = Cmd::new("ip").args(&["netns", "delete", &self.namespace]);
        let _ = writeln!(log, "$ {}", cmd.display());
        match cmd.capture_quietly() {
            Ok(out) if out.success => {}
            Ok(out) => eprintln!("    `{}` failed: {}", cmd.display(), out.stderr.trim()),
            Err(err) => eprintln!("    {err}"),
        }
    }
}

/// `cargo xtask e2e --net-peer DOWN UP`: the guest's TCP peer (run in the boot's namespace).
pub(crate) fn peer_main(args: &[String]) -> ExitCode {
    let [down, up] = args else {
        eprintln!("usage: cargo xtask e2e --net-peer DOWNLOAD_FILE UPLOAD_FILE");
        return ExitCode::from(2);
    };
    match serve(Path::new(down), Path::new(up)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("peer: FAILED: {err}");
            ExitCode::FAILURE
        }
    }
}

fn accept(listener: &TcpListener, what: &str) -> Result<TcpStream, String> {
    let (stream, from) = listener
        .accept()
        .map_err(|err| format!("{what}: accept: {err}"))?;
    println!("peer: {what}: connection from {from}");
    for result in [
        stream.set_read_timeout(Some(PEER_IO_TIMEOUT)),
        stream.set_write_timeout(Some(PEER_IO_TIMEOUT)),
    ] {
        result.map_err(|err| format!("{what}: timeout: {err}"))?;
    }
    Ok(stream)
}

/// Sends `bytes` on the download port's first connection, half-closes, and waits for the
/// guest to close its side.
fn send_download(listener: &TcpListener, bytes: &[u8]) -> Result<(), String> {
    let mut stream = accept(listener, "download")?;
    stream
        .write_all(bytes)
        .and_then(|()| stream.shutdown(Shutdown::Write))
        .map_err(|err| format!("download: send: {err}"))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .map_err(|err| format!("download: waiting for the guest's close: {err}"))?;
    println!("peer: download: sent {} bytes", bytes.len());
    Ok(())
}

/// Receives the upload port's first connection to its end, stores it in `up` and answers
/// `got N`.
fn receive_upload(listener: &TcpListener, up: &Path) -> Result<(), String> {
    let mut stream = accept(listener, "upload")?;
    let mut bytes = Vec::with_capacity(BYTES);
    stream
        .read_to_end(&mut bytes)
        .map_err(|err| format!("upload: receive after {} bytes: {err}", bytes.len()))?;
    std::fs::write(up, &bytes).map_err(|err| format!("cannot write {}: {err}", up.display()))?;
    stream
        .write_all(format!("got {}\n", bytes.len()).as_bytes())
        .map_err(|err| format!("upload: answer: {err}"))?;
    println!("peer: upload: received {} bytes", bytes.len());
    Ok(())
}

fn serve(down: &Path, up: &Path) -> Result<(), String> {
    let bytes =
        std::fs::read(down).map_err(|err| format!("cannot read {}: {err}", down.display()))?;
    let bind = |port: u16| {
        TcpListener::bind((HOST_ADDR, port))
            .map_err(|err| format!("cannot listen on {HOST_ADDR}:{port}: {err}"))
    };
    let (up_listener, down_listener) = (bind(UP_PORT)?, bind(DOWN_PORT)?);
    println!("{PEER_READY} on {HOST_ADDR}:{UP_PORT} (upload) and :{DOWN_PORT} (download)");
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| send_download(&down_listener, &bytes));
        let received = receive_upload(&up_listener, up);
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err("download: the sending thread panicked".to_owned()));
        received.and(sent)
    })?;
    println!("peer: done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_argument_names_both_addresses_ports_and_size() {
        assert_eq!(
            guest_argument(),
            "e2e.net=10.0.2.15/24,10.0.2.1,5001,5002,4194304"
        );
        assert_eq!(BYTES % 65536, 0, "the guest uploads in 64 KiB blocks");
    }

    #[test]
    fn only_our_namespaces_have_an_owner() {
        assert_eq!(owner_of("vu-e2e-4242-0badcafe"), Some(4242));
        assert_eq!(owner_of("vu-e2e-4242-xyz"), None);
        assert_eq!(owner_of("vu-e2e-x-0badcafe"), None);
        assert_eq!(owner_of("other-4242-0badcafe"), None);
    }

    #[test]
    fn commands_run_in_the_namespace() {
        let line = shell_line(&in_namespace("vu-e2e-1-2", Path::new("/t/vu_net")));
        assert_eq!(line, "ip netns exec vu-e2e-1-2 /t/vu_net");
    }
}
