//! `cargo xtask bench --net`: the same DPDK virtio-user frontend against DPDK's own vhost PMD
//! and against `vu_net --loopback` with the framework's polling, side by side.
//!
//! The frontend is `dpdk-testpmd` with one `net_virtio_user` port in `io` forwarding mode,
//! started with `start tx_first`: one burst of `--txpkts` sized packets per queue is sent,
//! and from then on every packet the backend sends back is forwarded to it again, so the
//! packets circulate between the two sides as fast as both can move them (DPDK's own
//! "loopback" performance setup). The backend is either a second testpmd with a `net_vhost`
//! port in `io` mode (a reflector: what arrives on a queue goes back out on it) or `vu_net
//! --loopback --poll-us --threads 1`. The frontend's forwarding core is CPU 1, the backend's
//! CPU 0 (testpmd with `--main-lcore 1` and one forwarding core for every queue; `vu_net` under
//! `taskset -c 0` with one worker thread serving every pair); every side busy-polls. The figure is
//! the frontend's received packets per second over the measured interval, after a warm-up.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use super::{ensure_hugepages, ensure_packages, send, shell_line, wait_or_kill, Scratch, MAC};

const USAGE: &str = "\
usage: cargo xtask bench --net [--seconds N]

  DPDK's virtio-user (testpmd, io forwarding after `start tx_first`) against DPDK's vhost PMD
  and against vu_net --loopback with polling: 64 and 1500-byte packets, 1 and 2 queue pairs,
  bursts of 32. Prints packets per second received by the frontend and the ratio.

  --seconds N   measured seconds per cell, after one second of warm-up (default 5)
";

/// Hugepages both testpmd instances need together.
const BENCH_HUGEPAGES: u64 = 128;
/// `vu_net`'s polling budget: far above the gap between two bursts, so it never sleeps
/// while traffic flows.
const POLL_US: &str = "1000";

/// Who reflects the packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reflector {
    DpdkVhost,
    VuNet,
}

/// Runs the net benchmark with its own arguments (those after `--net`).
pub(crate) fn main(args: &[String]) -> ExitCode {
    let mut seconds = 5u64;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--seconds" => match words.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => seconds = n,
                _ => {
                    eprintln!("xtask bench --net: --seconds needs a positive number\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("xtask bench --net: unexpected argument `{other}`\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match run(seconds) {
        Ok(table) => {
            println!("{table}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("xtask bench --net: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(seconds: u64) -> Result<String, String> {
    ensure_packages()?;
    ensure_hugepages(BENCH_HUGEPAGES)?;
    let vu_net = crate::e2e::build_vu_net(true)?;
    let before = load_average();
    let mut table = String::from(
        "| packet | queue pairs | DPDK vhost (Mpps) | vu_net (Mpps) | vu_net / DPDK |\n\
         |-------:|------------:|------------------:|--------------:|--------------:|\n",
    );
    for size in [64usize, 1500] {
        for pairs in [1u8, 2] {
            let dpdk = measure(Reflector::DpdkVhost, &vu_net, size, pairs, seconds)?;
            let ours = measure(Reflector::VuNet, &vu_net, size, pairs, seconds)?;
            eprintln!(
                "    {size} B, {pairs} pair(s): DPDK vhost {dpdk:.3} Mpps, vu_net {ours:.3} Mpps"
            );
            let ratio = if dpdk > 0.0 { ours / dpdk } else { 0.0 };
            table.push_str(&format!(
                "| {size} B | {pairs} | {dpdk:.2} | {ours:.2} | {ratio:.2} |\n"
            ));
        }
    }
    Ok(report(&table, seconds, &before, &load_average()))
}

/// The table with what it measured and on what machine, in what state: a busy machine (load
/// above one runnable thread per CPU) measures the scheduler, not the data paths, and the
/// report says so.
fn report(table: &str, seconds: u64, before: &str, after: &str) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let mut text = format!(
        "Mpps received by the frontend (testpmd net_virtio_user, io forwarding after `start \
         tx_first`, bursts of 32, on CPU 1) from each backend on CPU 0 (DPDK's vhost PMD in \
         testpmd, one forwarding core; vu_net --loopback --poll-us {POLL_US} --threads 1, one \
         worker thread); {seconds} s per cell after 1 s of warm-up.\nmachine: {cpus} CPUs, {model}; load average (1, 5, 15 min) before: \
         {before}, after: {after}\n\n{table}"
    );
    let busiest = [before, after]
        .iter()
        .filter_map(|load| load.split_whitespace().next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    if cpus > 0 && busiest > cpus as f64 {
        text.push_str(&format!(
            "\nThe machine was busy (load average {busiest:.1} on {cpus} CPUs): both sides \
             busy-poll, so these figures measure the contention more than the data paths. \
             Rerun on an idle machine.\n"
        ));
    }
    text
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// A testpmd whose stdout is read line by line on a thread.
struct Testpmd {
    child: Child,
    lines: Receiver<String>,
}

impl Testpmd {
    fn start(args: &[&str]) -> Result<Testpmd, String> {
        let mut command = super::testpmd_command();
        command.args(args);
        eprintln!("$ {}", shell_line(&command));
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("cannot start dpdk-testpmd: {err}"))?;
        let stdout = child.stdout.take().ok_or("testpmd has no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Testpmd { child, lines })
    }

    fn command(&mut self, text: &str) -> Result<(), String> {
        let stdin = self.child.stdin.as_mut().ok_or("testpmd has no stdin")?;
        send(stdin, text)
    }

    /// Sends `show port stats 0` and returns the `RX-packets` it prints.
    fn rx_packets(&mut self) -> Result<u64, String> {
        // Whatever was printed before belongs to earlier commands.
        while self.lines.try_recv().is_ok() {}
        self.command("show port stats 0")?;
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_secs(5) {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some(rest) = line.trim_start().strip_prefix("RX-packets:") {
                        if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok())
                        {
                            return Ok(n);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("dpdk-testpmd exited".to_owned());
                }
            }
        }
        Err("dpdk-testpmd did not print its port statistics".to_owned())
    }

    fn quit(mut self) {
        let _ = self.command("stop");
        let _ = self.command("quit");
        drop(self.child.stdin.take());
        wait_or_kill(&mut self.child, super::EXIT_DEADLINE);
    }
}

/// Waits for `path` to appear, at most [`super::SOCKET_DEADLINE`].
fn wait_for(path: &Path) -> Result<(), String> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > super::SOCKET_DEADLINE {
            return Err(format!("{} did not appear", path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Millions of packets per second the frontend received with `reflector`.
fn measure(
    reflector: Reflector,
    vu_net: &Path,
    size: usize,
    pairs: u8,
    seconds: u64,
) -> Result<f64, String> {
    let dir = Scratch::create("vu-bench-net")?;
    let socket = dir.0.join("net.sock");
    let queues = pairs.to_string();
    let mut backend_testpmd = None;
    let mut backend_child = None;
    match reflector {
        Reflector::DpdkVhost => {
            let vdev = format!("net_vhost0,iface={},queues={pairs}", socket.display());
            let prefix = format!("vu-bench-vhost-{}", std::process::id());
            let mut vhost = Testpmd::start(&[
                "-l",
                "0,1",
                "--main-lcore",
                "1",
                "--no-pci",
                "--in-memory",
                "--single-file-segments",
                "--file-prefix",
                &prefix,
                "--vdev",
                &vdev,
                "--",
                "-i",
                "--forward-mode=io",
                "--nb-cores=1",
                "--rxq",
                &queues,
                "--txq",
                &queues,
                "--total-num-mbufs=8192",
            ])?;
            vhost.command("start")?;
            backend_testpmd = Some(vhost);
        }
        Reflector::VuNet => {
            let mut command = Command::new("taskset");
            command.args(["-c", "0"]).arg(vu_net).args([
                "--socket-path",
                &socket.display().to_string(),
                "--loopback",
                "--queue-pairs",
                &queues,
                "--poll-us",
                POLL_US,
                // One worker thread for every pair, as DPDK's vhost has one forwarding core
                // (`--nb-cores=1`): two spinning threads on one CPU would share it in
                // scheduler slices.
                "--threads",
                "1",
                "--log-level",
                "warn",
            ]);
            eprintln!("$ {}", shell_line(&command));
            backend_child = Some(
                command
                    .stdin(Stdio::null())
                    .spawn()
                    .map_err(|err| format!("cannot start vu_net: {err}"))?,
            );
        }
    }
    let result = wait_for(&socket).and_then(|()| frontend(&socket, size, pairs, seconds));
    if let Some(vhost) = backend_testpmd {
        vhost.quit();
    }
    if let Some(mut child) = backend_child {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        wait_or_kill(&mut child, super::EXIT_DEADLINE);
    }
    result
}

/// The virtio-user side: starts circulating packets and measures what comes back.
fn frontend(socket: &Path, size: usize, pairs: u8, seconds: u64) -> Result<f64, String> {
    let mac: Vec<String> = MAC.iter().map(|b| format!("{b:02x}")).collect();
    let vdev = format!(
        "net_virtio_user0,path={},queues={pairs},cq={},packed_vq=0,mac={}",
        socket.display(),
        u8::from(pairs > 1),
        mac.join(":")
    );
    let prefix = format!("vu-bench-virtio-{}", std::process::id());
    let queues = pairs.to_string();
    let txpkts = format!("--txpkts={size}");
    let mut testpmd = Testpmd::start(&[
        "-l",
        "0,1",
        "--main-lcore",
        "0",
        "--no-pci",
        "--in-memory",
        "--single-file-segments",
        "--file-prefix",
        &prefix,
        "--vdev",
        &vdev,
        "--",
        "-i",
        "--forward-mode=io",
        "--nb-cores=1",
        "--burst=32",
        &txpkts,
        "--rxq",
        &queues,
        "--txq",
        &queues,
        "--total-num-mbufs=8192",
    ])?;
    let result = (|| {
        testpmd.command("start tx_first")?;
        std::thread::sleep(Duration::from_secs(1));
        let before = testpmd.rx_packets()?;
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(seconds));
        let after = testpmd.rx_packets()?;
        let elapsed = start.elapsed().as_secs_f64();
        if after <= before {
            return Err(format!(
                "no packet came back ({} received before the interval, {} after)",
                before, after
            ));
        }
        Ok((after - before) as f64 / elapsed / 1e6)
    })();
    testpmd.quit();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_machine_state_and_flags_a_busy_machine() {
        let quiet = report("| t |\n", 3, "0.10 0.20 0.30", "0.50 0.20 0.30");
        assert!(quiet.contains("load average (1, 5, 15 min) before: 0.10 0.20 0.30"));
        assert!(quiet.contains("3 s per cell"), "{quiet}");
        assert!(quiet.contains("| t |"), "{quiet}");
        assert!(!quiet.contains("busy"), "{quiet}");
        let busy = report("| t |\n", 3, "0.10 0.20 0.30", "999.00 9.0 9.0");
        assert!(
            busy.contains("The machine was busy (load average 999.0"),
            "{busy}"
        );
    }
}
