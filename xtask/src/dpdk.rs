//! `cargo xtask dpdk`: DPDK's own virtio-net driver drives `vu_net --loopback`, and every
//! packet must come back with its bytes intact.
//!
//! `dpdk-testpmd` runs two ports in `io` forwarding mode: a `net_pcap` port that reads a
//! capture file we wrote (one per queue) and writes what it receives to another, and a
//! `net_virtio_user` port, DPDK's virtio-net driver speaking vhost-user to `vu_net`. io mode
//! forwards without touching a byte: each packet read from the input capture of queue `k`
//! goes out on the virtio port's TX queue `k`, `vu_net` sends it back on RX queue `k`, and
//! testpmd writes it to the output capture of queue `k`. The check is ours, not testpmd's
//! counters: the output capture of each queue must hold exactly the packets of its input, in
//! order, and `vu_net`'s own count must say that pair `k` carried them. It runs with one and
//! with two queue pairs (`cq=1` lets virtio-user enable the second pair; the control queue is
//! the frontend's).
//!
//! DPDK needs hugepages: as root on Debian this step installs `dpdk-dev` (testpmd) and the
//! PMDs, reserves 2 MiB pages and mounts hugetlbfs, like the e2e step installs QEMU;
//! otherwise it fails with the exact commands to run.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use crate::cmd::Cmd;
use crate::deps::{install_missing, program_on_path, running_as_root};
use crate::{Options, StepResult};

mod bench;

pub(crate) use bench::main as bench_main;

/// Packets written to each queue's input capture.
const PACKETS_PER_QUEUE: usize = 256;
/// 2 MiB hugepages testpmd needs free (its mbuf pool and rings, with room to spare).
pub(crate) const HUGEPAGES: u64 = 64;
/// The virtio-user port's MAC address: `vu_net`'s, so that the frames are addressed to it.
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// How long one run may take from testpmd's start to the last packet back.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// How long testpmd and `vu_net` may take to exit once asked.
const EXIT_DEADLINE: Duration = Duration::from_secs(15);
/// How long `vu_net` may take to create its socket.
const SOCKET_DEADLINE: Duration = Duration::from_secs(30);
/// Where Debian's DPDK 22.11 keeps its drivers.
const PMD_DIR: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";
/// The drivers testpmd loads here, with their Debian packages.
const PMDS: &[(&str, &str)] = &[
    ("librte_net_virtio.so.23", "librte-net-virtio23"),
    ("librte_net_pcap.so.23", "librte-net-pcap23"),
    ("librte_mempool_ring.so.23", "librte-mempool-ring23"),
];

/// The `dpdk` step: testpmd against `vu_net --loopback` with one and two queue pairs.
pub(crate) fn run(_options: &Options) -> StepResult {
    ensure_packages()?;
    ensure_hugepages(HUGEPAGES)?;
    // Where cargo put it: `CARGO_TARGET_DIR` or `build.target-dir` may point anywhere.
    let vu_net = crate::e2e::build_vu_net(false)?;
    for pairs in [1, 2] {
        let start = Instant::now();
        let summary = run_case(&vu_net, pairs)?;
        eprintln!(
            "    {pairs} queue pair(s), {:.1} s: {summary}",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Installs testpmd and the drivers it needs when it may (see [`install_missing`]).
pub(crate) fn ensure_packages() -> StepResult {
    let missing = || {
        let mut missing = Vec::new();
        if !program_on_path("dpdk-testpmd") {
            missing.push("dpdk-dev");
        }
        for (file, package) in PMDS {
            if !Path::new(PMD_DIR).join(file).exists() {
                missing.push(*package);
            }
        }
        missing
    };
    let now = missing();
    if now.is_empty() {
        return Ok(());
    }
    install_missing(&now, "DPDK 22.11 with testpmd is needed", missing)
}

/// Free 2 MiB hugepages and the mounted hugetlbfs, from `/proc/meminfo` and `/proc/mounts`.
fn hugepages_state() -> (u64, bool) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    (free_hugepages(&meminfo), hugetlbfs_mounted(&mounts))
}

/// `HugePages_Free` of `/proc/meminfo`.
fn free_hugepages(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("HugePages_Free:"))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether `/proc/mounts` lists a hugetlbfs.
fn hugetlbfs_mounted(mounts: &str) -> bool {
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(2) == Some("hugetlbfs"))
}

/// Reserves `pages` free 2 MiB pages and mounts hugetlbfs at /dev/hugepages, as root;
/// otherwise fails with the commands that would.
pub(crate) fn ensure_hugepages(pages: u64) -> StepResult {
    let (free, mounted) = hugepages_state();
    if free >= pages && mounted {
        return Ok(());
    }
    let total: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0);
    let wanted = total + pages.saturating_sub(free);
    let commands = [
        format!("echo {wanted} > /proc/sys/vm/nr_hugepages"),
        "mkdir -p /dev/hugepages".to_owned(),
        "mount -t hugetlbfs nodev /dev/hugepages".to_owned(),
    ];
    if !running_as_root() {
        return Err(format!(
            "DPDK needs {pages} free 2 MiB hugepages and a hugetlbfs mount \
             ({free} free, {}); run as root: {}",
            if mounted { "mounted" } else { "not mounted" },
            commands.join(" && ")
        ));
    }
    if free < pages {
        eprintln!("$ {}", commands[0]);
        std::fs::write("/proc/sys/vm/nr_hugepages", format!("{wanted}\n"))
            .map_err(|err| format!("cannot reserve hugepages: {err}"))?;
    }
    if !mounted {
        std::fs::create_dir_all("/dev/hugepages")
            .map_err(|err| format!("cannot create /dev/hugepages: {err}"))?;
        Cmd::new("mount")
            .args(&["-t", "hugetlbfs", "nodev", "/dev/hugepages"])
            .run()?;
    }
    let (free, mounted) = hugepages_state();
    if free < pages || !mounted {
        return Err(format!(
            "after setting up: {free} free hugepages (need {pages}), hugetlbfs {}",
            if mounted { "mounted" } else { "not mounted" }
        ));
    }
    Ok(())
}

/// The frames of queue `queue`: addressed to [`MAC`], an experimental EtherType, the queue
/// and sequence number, then filler; sizes cycle from the smallest frame to a full 1514.
pub(crate) fn frames(queue: u8, count: usize) -> Vec<Vec<u8>> {
    const SIZES: &[usize] = &[60, 64, 128, 333, 512, 1000, 1024, 1500, 1514];
    (0..count)
        .map(|seq| {
            let len = SIZES[seq % SIZES.len()];
            let mut frame = Vec::with_capacity(len);
            frame.extend_from_slice(&MAC);
            frame.extend_from_slice(&[0x02, 0, 0, 0, queue, 1]);
            frame.extend_from_slice(&[0x88, 0xb5]);
            frame.push(queue);
            frame.extend_from_slice(&(seq as u32).to_be_bytes());
            let mut state = (seq as u32).wrapping_mul(2_654_435_761) ^ u32::from(queue);
            while frame.len() < len {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                frame.push(state as u8);
            }
            frame
        })
        .collect()
}

/// The classic pcap file header: magic, version 2.4, no zone, no sigfigs, snap length,
/// Ethernet.
const PCAP_MAGIC: u32 = 0xa1b2_c3d4;
/// The same format with nanosecond timestamps.
const PCAP_MAGIC_NS: u32 = 0xa1b2_3c4d;
const PCAP_HEADER: usize = 24;
const PCAP_RECORD: usize = 16;

/// A pcap file holding `frames`, little-endian, zero timestamps.
pub(crate) fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&PCAP_MAGIC.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for frame in frames {
        let len = frame.len() as u32;
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(frame);
    }
    out
}

/// The frames of a pcap file (either byte order, micro- or nanosecond timestamps).
pub(crate) fn read_pcap(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let header = bytes.get(..PCAP_HEADER).ok_or("pcap: no file header")?;
    let magic = [header[0], header[1], header[2], header[3]];
    let known = |m: u32| m == PCAP_MAGIC || m == PCAP_MAGIC_NS;
    let little = known(u32::from_le_bytes(magic));
    let big = known(u32::from_be_bytes(magic));
    if !little && !big {
        return Err(format!("pcap: unknown magic {magic:02x?}"));
    }
    let word = |at: usize| -> Option<u32> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let mut frames = Vec::new();
    let mut at = PCAP_HEADER;
    while at < bytes.len() {
        let caught = word(at + 8).ok_or("pcap: truncated record header")? as usize;
        let original = word(at + 12).ok_or("pcap: truncated record header")? as usize;
        if caught != original {
            return Err(format!(
                "pcap: record of {original} bytes captured as {caught}"
            ));
        }
        let start = at + PCAP_RECORD;
        let frame = bytes
            .get(start..start + caught)
            .ok_or("pcap: truncated record")?;
        frames.push(frame.to_vec());
        at = start + caught;
    }
    Ok(frames)
}

/// Sums the values after `TX-packets:` in the accumulated block of testpmd's
/// `show fwd stats all`, or `None` when the text has no such block.
pub(crate) fn forwarded(text: &str) -> Option<u64> {
    let block = text.rsplit("Accumulated forward statistics").next()?;
    if !text.contains("Accumulated forward statistics") {
        return None;
    }
    let rest = block.split("TX-packets:").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Whether `vu_net`'s stop summary says pair `pair` sent and received `count` packets.
pub(crate) fn pair_carried(log: &str, pair: usize, count: usize) -> bool {
    let prefix = format!("pair {pair}: tx {count} packets");
    let rx = format!("rx {count} packets");
    log.lines()
        .any(|line| line.contains(&prefix) && line.contains(&rx))
}

/// Reads testpmd's stdout on a thread, line by line.
fn lines_of(child: &mut Child) -> Result<Receiver<String>, String> {
    let stdout = child.stdout.take().ok_or("testpmd has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

fn send(stdin: &mut ChildStdin, command: &str) -> StepResult {
    stdin
        .write_all(format!("{command}\n").as_bytes())
        .and_then(|()| stdin.flush())
        .map_err(|err| format!("testpmd: cannot send `{command}`: {err}"))
}

/// Waits for `child` to exit by `deadline`; kills it after that.
fn wait_or_kill(child: &mut Child, deadline: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Everything a run leaves behind, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    /// A fresh, empty `/tmp/<name>-<pid>` (whatever an earlier run left there is removed).
    fn create(name: &str) -> Result<Scratch, String> {
        let dir = Scratch(PathBuf::from(format!("/tmp/{name}-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0)
            .map_err(|err| format!("cannot create {}: {err}", dir.0.display()))?;
        Ok(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One run with `pairs` queue pairs; returns a one-line summary.
fn run_case(vu_net: &Path, pairs: u8) -> Result<String, String> {
    let dir = Scratch::create(&format!("vu-dpdk-{pairs}"))?;
    let socket = dir.0.join("net.sock");
    let mut inputs = Vec::new();
    let mut pcap_args = Vec::new();
    for queue in 0..pairs {
        let sent = frames(queue, PACKETS_PER_QUEUE);
        let input = dir.0.join(format!("in{queue}.pcap"));
        std::fs::write(&input, pcap(&sent))
            .map_err(|err| format!("cannot write {}: {err}", input.display()))?;
        pcap_args.push(format!("rx_pcap={}", input.display()));
        inputs.push((sent, dir.0.join(format!("out{queue}.pcap"))));
    }
    for (_, output) in &inputs {
        pcap_args.push(format!("tx_pcap={}", output.display()));
    }
    let log_path = dir.0.join("vu_net.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|err| format!("cannot create {}: {err}", log_path.display()))?;
    let mut backend = Command::new(vu_net);
    backend.args([
        "--socket-path",
        &socket.display().to_string(),
        "--loopback",
        "--queue-pairs",
        &pairs.to_string(),
    ]);
    eprintln!("$ {} 2> {}", shell_line(&backend), log_path.display());
    let mut backend = backend
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|err| format!("cannot start vu_net: {err}"))?;
    let result = drive(&socket, pairs, &pcap_args, &mut backend);
    // SIGTERM: vu_net logs its counters and exits 0.
    let _ = Command::new("kill")
        .args(["-TERM", &backend.id().to_string()])
        .status();
    let exited = wait_or_kill(&mut backend, EXIT_DEADLINE);
    let forwarded = result?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !exited {
        return Err(format!("vu_net did not exit on SIGTERM; its log:\n{log}"));
    }
    for (queue, (sent, output)) in inputs.iter().enumerate() {
        let bytes = std::fs::read(output)
            .map_err(|err| format!("cannot read {}: {err}", output.display()))?;
        let got = read_pcap(&bytes)?;
        if got != *sent {
            let first_bad = got
                .iter()
                .zip(sent)
                .position(|(g, s)| g != s)
                .unwrap_or(got.len().min(sent.len()));
            return Err(format!(
                "queue {queue}: {} packets came back for {} sent, the first difference at \
                 packet {first_bad}",
                got.len(),
                sent.len()
            ));
        }
        if !pair_carried(&log, queue, PACKETS_PER_QUEUE) {
            return Err(format!(
                "vu_net's pair {queue} did not carry {PACKETS_PER_QUEUE} packets each way; \
                 its log:\n{log}"
            ));
        }
    }
    Ok(format!(
        "{} packets of 60 to 1514 bytes came back intact on their own queue ({forwarded} \
         forwarded by testpmd)",
        PACKETS_PER_QUEUE * usize::from(pairs)
    ))
}

/// Starts testpmd against `socket`, forwards until every packet went both ways, stops it.
/// Returns testpmd's count of forwarded packets.
fn drive(
    socket: &Path,
    pairs: u8,
    pcap_args: &[String],
    backend: &mut Child,
) -> Result<u64, String> {
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = backend.try_wait() {
            return Err(format!("vu_net exited before listening: {status}"));
        }
        if start.elapsed() > SOCKET_DEADLINE {
            return Err("vu_net did not create its socket".to_owned());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let prefix = format!("vu-dpdk-{}", std::process::id());
    let virtio = format!(
        "net_virtio_user0,path={},queues={pairs},cq={},packed_vq=0,mac=52:54:00:12:34:56",
        socket.display(),
        u8::from(pairs > 1)
    );
    let pcap = format!("net_pcap0,{}", pcap_args.join(","));
    let queues = pairs.to_string();
    let mut testpmd = testpmd_command();
    testpmd.args([
        "-l",
        "0,1",
        "--no-pci",
        "--in-memory",
        "--single-file-segments",
        "--file-prefix",
        &prefix,
        "--vdev",
        &virtio,
        "--vdev",
        &pcap,
        "--",
        "-i",
        "--forward-mode=io",
        "--no-flush-rx",
        "--rxq",
        &queues,
        "--txq",
        &queues,
        "--total-num-mbufs=8192",
    ]);
    eprintln!("$ {}", shell_line(&testpmd));
    let mut child = testpmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| format!("cannot start dpdk-testpmd: {err}"))?;
    let result = forward(&mut child, pairs);
    if let Some(stdin) = child.stdin.as_mut() {
        let _ = send(stdin, "stop");
        let _ = send(stdin, "quit");
    }
    // Closing stdin ends the interactive prompt too.
    drop(child.stdin.take());
    if !wait_or_kill(&mut child, EXIT_DEADLINE) {
        return Err("dpdk-testpmd did not quit".to_owned());
    }
    result
}

/// Starts forwarding and asks for the statistics until all packets went both ways.
fn forward(child: &mut Child, pairs: u8) -> Result<u64, String> {
    let lines = lines_of(child)?;
    let stdin = child.stdin.as_mut().ok_or("testpmd has no stdin")?;
    let want = 2 * (PACKETS_PER_QUEUE * usize::from(pairs)) as u64;
    send(stdin, "start")?;
    let start = Instant::now();
    let mut transcript = String::new();
    loop {
        send(stdin, "show fwd stats all")?;
        // One answer: lines until the accumulated block's last line.
        let mut answer = String::new();
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_secs(5) {
            match lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let done = line.contains("++++++++++") && answer.contains("Accumulated");
                    answer.push_str(&line);
                    answer.push('\n');
                    if done {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("dpdk-testpmd exited:\n{transcript}{answer}"));
                }
            }
        }
        transcript.push_str(&answer);
        if let Some(n) = forwarded(&answer) {
            if n >= want {
                return Ok(n);
            }
        }
        if start.elapsed() > RUN_DEADLINE {
            return Err(format!(
                "not every packet went both ways within {} s; testpmd said:\n{transcript}",
                RUN_DEADLINE.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `dpdk-testpmd` with its stdout line-buffered (`stdbuf -oL`): into a pipe, stdio would
/// hold the answer to a command until its buffer fills.
fn testpmd_command() -> Command {
    let mut command = Command::new("stdbuf");
    command.args(["-oL", "dpdk-testpmd"]);
    command
}

/// A command as a shell line, for the echo.
fn shell_line(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned()),
    );
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcap_round_trips_frames() {
        let sent = frames(1, 20);
        assert_eq!(read_pcap(&pcap(&sent)).unwrap(), sent);
    }

    #[test]
    fn truncated_pcap_is_an_error() {
        let bytes = pcap(&frames(0, 3));
        assert!(read_pcap(&bytes[..bytes.len() - 1]).is_err());
        assert!(read_pcap(&bytes[..10]).is_err());
    }

    #[test]
    fn frames_differ_by_queue_and_sequence() {
        let a = frames(0, 10);
        let b = frames(1, 10);
        assert_ne!(a, b);
        assert_ne!(a[0], a[9]);
        assert!(a.iter().all(|f| f.len() >= 60 && f.len() <= 1514));
    }

    #[test]
    fn accumulated_tx_packets_are_read() {
        let text = "\
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 3              RX-dropped: 0             RX-total: 3
  TX-packets: 5              TX-dropped: 0             TX-total: 5
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 512            RX-dropped: 0             RX-total: 512
  TX-packets: 510            TX-dropped: 0             TX-total: 510
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
";
        assert_eq!(forwarded(text), Some(510));
        assert_eq!(forwarded("TX-packets: 5"), None);
    }

    #[test]
    fn pair_counts_are_read_from_the_stop_summary() {
        let log = "vu_net: info: pair 1: tx 256 packets (1 bytes, 0 bad chains, 0 dropped), \
                   rx 256 packets (1 bytes, 0 bad chains, 0 too big, 0 dropped)";
        assert!(pair_carried(log, 1, 256));
        assert!(!pair_carried(log, 0, 256));
        assert!(!pair_carried(log, 1, 255));
    }

    #[test]
    fn hugepage_state_is_read_from_proc() {
        assert_eq!(
            free_hugepages("HugePages_Total: 64\nHugePages_Free:  60\n"),
            60
        );
        assert!(hugetlbfs_mounted(
            "nodev /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n"
        ));
        assert!(!hugetlbfs_mounted("proc /proc proc rw 0 0\n"));
    }
}
