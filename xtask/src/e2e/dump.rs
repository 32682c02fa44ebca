//! The state of a boot stopped at its deadline, taken before QEMU is killed, into dump.txt.
//!
//! Through QMP (QEMU 7.2): each virtio device's status and, per queue, the ring addresses
//! and the split ring's indices and event indices read from guest memory with HMP `xp`; the
//! MSI-X table and pending bits (found in `info mtree -f`, read with `xp`, which goes through
//! the device's MMIO); each vCPU's local APIC and registers; `info irq` and `info pic`. Then
//! the threads of QEMU and of the backend from /proc, and the backend's stacks from gdb when
//! it is installed (its kernel stacks from /proc otherwise). docs/e2e.md explains how to read
//! it.
//!
//! Nothing here may talk to the backend, which may be the stuck party, or change what is being
//! looked at. So the VM is *not* stopped (stopping it stops vhost, which sends GET_VRING_BASE),
//! and a started vhost device's rings are located with `x-query-virtio-vhost-queue-status`,
//! never `x-query-virtio-queue-status`: in QEMU 7.2 the latter asks a started vhost backend
//! for its ring base (GET_VRING_BASE, which also stops the ring) and blocks QEMU's main loop
//! until it answers.
//!
//! [`write`] is what a scenario calls; it never fails the caller: what cannot be read is
//! written down as such.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::host;
use super::json::{quote, Json};
use super::monitor::Qmp;

/// How long to wait for QEMU to answer on its monitor socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long gdb may take to attach and walk the backend's threads.
const GDB_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many queues per device are read (virtio-blk has one per vCPU here).
const MAX_QUEUES: u64 = 16;

/// What to look at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    /// QEMU's QMP socket.
    pub(crate) qmp_socket: &'a Path,
    pub(crate) qemu_pid: u32,
    /// The backend process, if the device has one.
    pub(crate) backend_pid: Option<u32>,
    /// Where dump.txt goes (the boot's directory).
    pub(crate) dir: &'a Path,
}

/// A written dump: its file and the findings worth a line in the report.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dump {
    pub(crate) path: PathBuf,
    pub(crate) findings: Vec<String>,
}

/// Takes the dump: `header` first (what the harness knows: class, progress, deadlines), then
/// the monitor's, /proc's and gdb's view. Returns where it went and what stood out.
pub(crate) fn write(target: &Target<'_>, header: &str) -> Dump {
    let start = Instant::now();
    let mut findings = Vec::new();
    let mut text = format!(
        "# vu e2e dump, {}\n{header}\nload average: {}\n",
        host::utc_stamp(),
        host::load_average()
    );
    text.push_str(&monitor_section(target.qmp_socket, &mut findings));
    text.push_str(&format!(
        "\n== qemu threads (pid {})\n{}",
        target.qemu_pid,
        host::threads(target.qemu_pid)
    ));
    if let Some(pid) = target.backend_pid {
        text.push_str(&format!(
            "\n== backend threads (pid {pid})\n{}",
            host::threads(pid)
        ));
        text.push_str(&backend_stacks(pid, target.dir));
    }
    text.push_str(&format!(
        "\n(dump taken in {:.1} s)\n",
        start.elapsed().as_secs_f64()
    ));
    let path = target.dir.join("dump.txt");
    if let Err(err) = std::fs::write(&path, &text) {
        findings.push(format!("cannot write {}: {err}", path.display()));
    }
    Dump { path, findings }
}

/// Everything read through QMP.
fn monitor_section(socket: &Path, findings: &mut Vec<String>) -> String {
    let mut qmp = match Qmp::connect(socket, CONNECT_TIMEOUT) {
        Ok(qmp) => qmp,
        Err(err) => {
            findings.push(format!("no monitor: {err}"));
            return format!("\n== monitor\n(cannot connect: {err})\n");
        }
    };
    let mut text = String::from("\n== monitor\n");
    match qmp.execute("query-status", None) {
        Ok(status) => {
            let _ = writeln!(text, "query-status: {status}");
        }
        Err(err) => {
            let _ = writeln!(text, "query-status: {err}");
        }
    }
    let vectors = msix_section(&mut qmp, &mut text, findings);
    virtio_section(&mut qmp, &mut text, findings);
    cpu_section(&mut qmp, &mut text, &vectors, findings);
    for line in ["info irq", "info pic"] {
        let _ = write!(text, "\n== {line}\n{}", hmp_text(&mut qmp, line, None));
    }
    if !qmp.events().is_empty() {
        let _ = writeln!(text, "\n== QMP events seen meanwhile");
        for event in qmp.events() {
            let _ = writeln!(text, "{event}");
        }
    }
    text
}

/// An HMP command's output, or the reason there is none.
fn hmp_text(qmp: &mut Qmp, line: &str, cpu: Option<u32>) -> String {
    qmp.hmp(line, cpu)
        .map(|out| out.replace("\r\n", "\n"))
        .unwrap_or_else(|err| format!("({err})\n"))
}

/// The values of an HMP `xp` dump, in address order.
pub(crate) fn parse_xp(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|line| line.split_once(": "))
        .flat_map(|(_, values)| values.split_whitespace())
        .filter_map(|word| u64::from_str_radix(word.strip_prefix("0x")?, 16).ok())
        .collect()
}

/// Reads `count` little-endian values of `unit` (`h` 16-bit, `w` 32-bit) at guest-physical
/// `addr`.
fn read_phys(qmp: &mut Qmp, unit: char, count: u64, addr: u64) -> Result<Vec<u64>, String> {
    let line = format!("xp /{count}{unit}x {addr:#x}");
    let values = parse_xp(&qmp.hmp(&line, None)?);
    if values.len() as u64 == count {
        Ok(values)
    } else {
        Err(format!("`{line}` gave {} values", values.len()))
    }
}

/// A split virtqueue's indices as the guest's memory holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SplitRing {
    pub(crate) num: u16,
    pub(crate) avail_flags: u16,
    pub(crate) avail_idx: u16,
    /// `used_event`, after the available ring: the guest wants an interrupt once the used
    /// index passes it (EVENT_IDX).
    pub(crate) used_event: u16,
    pub(crate) used_flags: u16,
    pub(crate) used_idx: u16,
    /// `avail_event`, after the used ring: the device wants a kick once the available index
    /// passes it (EVENT_IDX).
    pub(crate) avail_event: u16,
}

impl SplitRing {
    /// Reads the ring whose available ring is at `avail` and used ring at `used`.
    fn read(qmp: &mut Qmp, num: u16, avail: u64, used: u64) -> Result<Self, String> {
        let head = |qmp: &mut Qmp, addr| read_phys(qmp, 'h', 2, addr);
        let event = |qmp: &mut Qmp, addr| read_phys(qmp, 'h', 1, addr);
        let a = head(qmp, avail)?;
        let used_event = event(qmp, avail + 4 + 2 * u64::from(num))?;
        let u = head(qmp, used)?;
        let avail_event = event(qmp, used + 4 + 8 * u64::from(num))?;
        // `xp /h` prints 16-bit units, so each value fits.
        let h = |v: u64| v as u16;
        Ok(SplitRing {
            num,
            avail_flags: h(a[0]),
            avail_idx: h(a[1]),
            used_event: h(used_event[0]),
            used_flags: h(u[0]),
            used_idx: h(u[1]),
            avail_event: h(avail_event[0]),
        })
    }

    /// Requests the guest made available that the device has not returned.
    pub(crate) fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx)
    }

    /// The ring in one line, with what the numbers say (docs/e2e.md, "Reading a dump").
    pub(crate) fn reading(&self) -> String {
        let mut line = format!(
            "avail.idx {} used.idx {} ({} in flight); used_event {} avail_event {}; \
             avail.flags {:#x} used.flags {:#x}",
            self.avail_idx,
            self.used_idx,
            self.in_flight(),
            self.used_event,
            self.avail_event,
            self.avail_flags,
            self.used_flags
        );
        let unseen_by_device = self.avail_idx.wrapping_sub(self.avail_event);
        if unseen_by_device != 0 {
            let _ = write!(
                line,
                "; {unseen_by_device} posted past avail_event: the device has not caught up \
                 (lost kick, or a backend that stopped serving)"
            );
        }
        let unseen_by_guest = self.used_idx.wrapping_sub(self.used_event);
        if self.used_event != 0 && unseen_by_guest != 0 && unseen_by_guest < 0x8000 {
            let _ = write!(
                line,
                "; {unseen_by_guest} completed past used_event: the guest has not consumed \
                 them (interrupt not sent, not delivered, or not handled)"
            );
        }
        line
    }
}

/// Each virtio device's status and each queue's ring.
fn virtio_section(qmp: &mut Qmp, text: &mut String, findings: &mut Vec<String>) {
    let devices = match qmp.execute("x-query-virtio", None) {
        Ok(list) => list,
        Err(err) => {
            let _ = writeln!(text, "\n== virtio\nx-query-virtio: {err}");
            return;
        }
    };
    for device in devices.as_array().unwrap_or_default() {
        let Some(path) = device.get("path").and_then(Json::as_str) else {
            continue;
        };
        let _ = writeln!(text, "\n== virtio device {path}");
        let arguments = format!("{{\"path\": {}}}", quote(path));
        let status = match qmp.execute("x-query-virtio-status", Some(&arguments)) {
            Ok(status) => status,
            Err(err) => {
                let _ = writeln!(text, "x-query-virtio-status: {err}");
                continue;
            }
        };
        let _ = writeln!(text, "x-query-virtio-status: {status}");
        let vhost = status.get("vhost-started") == Some(&Json::Bool(true));
        let num_vqs = status.get("num-vqs").and_then(Json::as_u64).unwrap_or(0);
        for queue in 0..num_vqs.min(MAX_QUEUES) {
            queue_section(qmp, path, queue, vhost, text, findings);
        }
    }
}

/// One queue: where QEMU says its rings are, and the ring read from guest memory. `vhost`:
/// the device's vhost backend is started (see the module's doc for why that matters).
fn queue_section(
    qmp: &mut Qmp,
    path: &str,
    queue: u64,
    vhost: bool,
    text: &mut String,
    findings: &mut Vec<String>,
) {
    let arguments = format!("{{\"path\": {}, \"queue\": {queue}}}", quote(path));
    let _ = writeln!(text, "-- queue {queue}");
    let (command, names) = if vhost {
        (
            "x-query-virtio-vhost-queue-status",
            ["num", "avail-phys", "used-phys"],
        )
    } else {
        (
            "x-query-virtio-queue-status",
            ["vring-num", "vring-avail", "vring-used"],
        )
    };
    let status = match qmp.execute(command, Some(&arguments)) {
        Ok(status) => status,
        Err(err) => {
            let _ = writeln!(text, "{command}: {err}");
            return;
        }
    };
    let _ = writeln!(text, "{command}: {status}");
    let field = |name| status.get(name).and_then(Json::as_u64);
    let (Some(num), Some(avail), Some(used)) = (field(names[0]), field(names[1]), field(names[2]))
    else {
        let _ = writeln!(text, "(no ring addresses)");
        return;
    };
    if avail == 0 || used == 0 {
        let _ = writeln!(text, "ring: not set up by the driver");
        return;
    }
    match SplitRing::read(qmp, num as u16, avail, used) {
        Ok(ring) => {
            let reading = ring.reading();
            let _ = writeln!(text, "ring (guest memory): {reading}");
            findings.push(format!("queue {queue}: {reading}"));
        }
        Err(err) => {
            let _ = writeln!(text, "ring: {err}");
        }
    }
}

/// One MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsixEntry {
    pub(crate) address: u64,
    pub(crate) data: u32,
    pub(crate) masked: bool,
    pub(crate) pending: bool,
}

impl MsixEntry {
    /// The interrupt vector the message raises.
    pub(crate) fn vector(&self) -> u8 {
        (self.data & 0xff) as u8
    }

    /// `vector 0x23 -> APIC 0x1 (logical), unmasked, not pending`.
    pub(crate) fn describe(&self) -> String {
        format!(
            "vector {:#04x} -> APIC {:#x} ({}), {}, {}",
            self.vector(),
            (self.address >> 12) & 0xff,
            if self.address & 0x4 != 0 {
                "logical"
            } else {
                "physical"
            },
            if self.masked { "MASKED" } else { "unmasked" },
            if self.pending {
                "PENDING"
            } else {
                "not pending"
            }
        )
    }
}

/// The table's 32-bit words (4 per entry) and the pending-bit words, decoded.
pub(crate) fn decode_msix(table: &[u64], pba: &[u64]) -> Vec<MsixEntry> {
    table
        .chunks_exact(4)
        .enumerate()
        .map(|(index, words)| MsixEntry {
            address: words[0] | (words[1] << 32),
            data: words[2] as u32,
            masked: words[3] & 1 != 0,
            pending: pba
                .get(index / 32)
                .is_some_and(|word| word >> (index % 32) & 1 != 0),
        })
        .collect()
}

/// The distinct `start-end` ranges of regions called `name` in `info mtree -f`.
pub(crate) fn mtree_ranges(text: &str, name: &str) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for line in text.lines() {
        let Some((range, region)) = line.trim().split_once(' ') else {
            continue;
        };
        if !region.ends_with(&format!("): {name}")) {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            if !ranges.contains(&(start, end)) {
                ranges.push((start, end));
            }
        }
    }
    ranges
}

/// The MSI-X tables of the machine's devices; returns the vectors they raise.
fn msix_section(qmp: &mut Qmp, text: &mut String, findings: &mut Vec<String>) -> Vec<u8> {
    let _ = writeln!(text, "\n== MSI-X (info mtree -f: msix-table, msix-pba)");
    let mtree = match qmp.hmp("info mtree -f", None) {
        Ok(mtree) => mtree,
        Err(err) => {
            let _ = writeln!(text, "({err})");
            return Vec::new();
        }
    };
    let tables = mtree_ranges(&mtree, "msix-table");
    let pbas = mtree_ranges(&mtree, "msix-pba");
    let mut vectors = Vec::new();
    for (index, &(start, end)) in tables.iter().enumerate() {
        let words = (end - start + 1) / 4;
        let pba = pbas.get(index).map_or(Ok(Vec::new()), |&(pstart, pend)| {
            read_phys(qmp, 'w', (pend - pstart + 1) / 4, pstart)
        });
        match (read_phys(qmp, 'w', words, start), pba) {
            (Ok(table), Ok(pba)) => {
                let _ = writeln!(text, "table at {start:#x}:");
                for (entry, msix) in decode_msix(&table, &pba).iter().enumerate() {
                    let _ = writeln!(text, "  entry {entry}: {}", msix.describe());
                    vectors.push(msix.vector());
                    if msix.pending || msix.masked {
                        findings.push(format!("MSI-X entry {entry}: {}", msix.describe()));
                    }
                }
            }
            (Err(err), _) | (_, Err(err)) => {
                let _ = writeln!(text, "table at {start:#x}: {err}");
            }
        }
    }
    vectors
}

/// The vectors of an `info lapic` line such as `IRR\t 0x23 0x30` (`(none)` is empty).
pub(crate) fn lapic_vectors(lapic: &str, register: &str) -> Vec<u8> {
    lapic
        .lines()
        .find_map(|line| line.strip_prefix(register)?.strip_prefix('\t'))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|word| {
                    let hex = word.strip_prefix("0x")?;
                    let digits: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
                    u8::from_str_radix(&digits, 16).ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What a vCPU's local APIC says about the device's vectors: requested (IRR) but blocked
/// behind a vector in service (ISR) of the same or a higher priority class.
pub(crate) fn lapic_finding(cpu: u64, lapic: &str, device_vectors: &[u8]) -> Option<String> {
    let irr = lapic_vectors(lapic, "IRR");
    let isr = lapic_vectors(lapic, "ISR");
    let highest_in_service = isr.iter().max().copied();
    let waiting: Vec<u8> = irr
        .into_iter()
        .filter(|vector| device_vectors.contains(vector))
        .collect();
    if waiting.is_empty() {
        return None;
    }
    let list = |v: &[u8]| {
        v.iter()
            .map(|x| format!("{x:#04x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let blocked = highest_in_service.is_some_and(|top| waiting.iter().any(|v| v >> 4 <= top >> 4));
    Some(format!(
        "cpu {cpu}: the device's vector(s) {} requested (IRR){}",
        list(&waiting),
        if blocked {
            format!(", blocked behind {} in service (ISR)", list(&isr))
        } else {
            String::new()
        }
    ))
}

/// Each vCPU's local APIC and registers.
fn cpu_section(qmp: &mut Qmp, text: &mut String, vectors: &[u8], findings: &mut Vec<String>) {
    let cpus = match qmp.execute("query-cpus-fast", None) {
        Ok(cpus) => cpus,
        Err(err) => {
            let _ = writeln!(text, "\n== vCPUs\nquery-cpus-fast: {err}");
            return;
        }
    };
    for cpu in cpus.as_array().unwrap_or_default() {
        let Some(index) = cpu.get("cpu-index").and_then(Json::as_u64) else {
            continue;
        };
        let thread = cpu.get("thread-id").and_then(Json::as_u64).unwrap_or(0);
        let lapic = hmp_text(qmp, "info lapic", Some(index as u32));
        // The vector and FPU registers say nothing about a stuck device.
        let registers: String = hmp_text(qmp, "info registers", Some(index as u32))
            .lines()
            .filter(|line| !["YMM", "XMM", "FPR"].iter().any(|p| line.starts_with(p)))
            .map(|line| format!("{line}\n"))
            .collect();
        let _ = write!(
            text,
            "\n== vCPU {index} (host thread {thread})\n{lapic}{registers}"
        );
        findings.extend(lapic_finding(index, &lapic, vectors));
    }
}

/// The backend's thread stacks: gdb's backtraces when gdb is installed, else the kernel
/// stacks from /proc.
fn backend_stacks(pid: u32, dir: &Path) -> String {
    if !crate::deps::program_on_path("gdb") {
        return format!(
            "\n== backend kernel stacks (no gdb installed)\n{}",
            host::kernel_stacks(pid)
        );
    }
    let out_path = dir.join("gdb.txt");
    let result = File::create(&out_path)
        .and_then(|out| {
            let err = out.try_clone()?;
            Command::new("gdb")
                .args(["-batch", "-nx", "-p", &pid.to_string()])
                .args(["-ex", "set pagination off", "-ex", "thread apply all bt 12"])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
        })
        .map_err(|err| format!("cannot run gdb: {err}"))
        .and_then(|mut gdb| match host::wait_bounded(&mut gdb, GDB_TIMEOUT) {
            Some(_) => Ok(()),
            None => Err(format!("gdb took over {} s", GDB_TIMEOUT.as_secs())),
        });
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let mut text = format!(
        "\n== backend stacks, innermost 12 frames (gdb -batch -p {pid} -ex 'thread apply all bt 12')\n"
    );
    if let Err(err) = result {
        let _ = writeln!(text, "({err})");
    }
    // gdb's chatter about symbol files and threads is noise here; the stacks are the frames.
    for line in output.lines() {
        if line.starts_with("Thread ") || line.starts_with('#') || line.is_empty() {
            let _ = writeln!(text, "{line}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xp_output_is_parsed_in_order() {
        let text = "00000000febfe000: 0xfee01004 0x00000000 0x00000024 0x00000000\r\n\
                    00000000febfe010: 0xfee01004 0x00000000 0x00000023 0x00000001\r\n";
        assert_eq!(
            parse_xp(text),
            [0xfee01004, 0, 0x24, 0, 0xfee01004, 0, 0x23, 1]
        );
        assert_eq!(parse_xp("Cannot access memory\n"), Vec::<u64>::new());
    }

    #[test]
    fn msix_entries_are_decoded_with_their_pending_bits() {
        let table = [0xfee01004, 0, 0x24, 0, 0xfee02000, 0, 0x23, 1];
        let entries = decode_msix(&table, &[0b10]);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0].describe(),
            "vector 0x24 -> APIC 0x1 (logical), unmasked, not pending"
        );
        assert_eq!(
            entries[1].describe(),
            "vector 0x23 -> APIC 0x2 (physical), MASKED, PENDING"
        );
    }

    #[test]
    fn mtree_ranges_are_found_once_per_address() {
        let text = "FlatView #0\n  00000000febfe000-00000000febfe02f (prio 0, i/o): msix-table\n  \
                    00000000febfe800-00000000febfe807 (prio 0, i/o): msix-pba\n\
                    FlatView #2\n  00000000febfe000-00000000febfe02f (prio 0, i/o): msix-table\n  \
                    00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic\n";
        assert_eq!(mtree_ranges(text, "msix-table"), [(0xfebfe000, 0xfebfe02f)]);
        assert_eq!(mtree_ranges(text, "msix-pba"), [(0xfebfe800, 0xfebfe807)]);
        assert!(mtree_ranges(text, "msix").is_empty());
    }

    #[test]
    fn ring_reading_names_what_each_side_has_not_seen() {
        let idle = SplitRing {
            num: 128,
            avail_flags: 0,
            avail_idx: 40,
            used_event: 40,
            used_flags: 0,
            used_idx: 40,
            avail_event: 40,
        };
        assert_eq!(idle.in_flight(), 0);
        assert!(!idle.reading().contains("past"), "{}", idle.reading());
        let lost_interrupt = SplitRing {
            used_idx: 41,
            avail_idx: 41,
            avail_event: 41,
            ..idle
        };
        assert!(
            lost_interrupt
                .reading()
                .contains("1 completed past used_event"),
            "{}",
            lost_interrupt.reading()
        );
        let lost_kick = SplitRing {
            avail_idx: 42,
            ..idle
        };
        let reading = lost_kick.reading();
        assert!(reading.contains("(2 in flight)"), "{reading}");
        assert!(reading.contains("2 posted past avail_event"), "{reading}");
        let wrapped = SplitRing {
            avail_idx: 1,
            used_idx: 65535,
            ..idle
        };
        assert_eq!(wrapped.in_flight(), 2);
    }

    #[test]
    fn lapic_vectors_and_a_blocked_completion_are_found() {
        let lapic = "ESR\t 0x00000000\nISR\t 0x30\nIRR\t 0x23 0x30(level)\n\n\
                     APR 0x00 TPR 0x00 DFR 0x0f LDR 0x01 PPR 0x30\n";
        assert_eq!(lapic_vectors(lapic, "ISR"), [0x30]);
        assert_eq!(lapic_vectors(lapic, "IRR"), [0x23, 0x30]);
        assert_eq!(
            lapic_finding(0, lapic, &[0x23, 0x24]).as_deref(),
            Some("cpu 0: the device's vector(s) 0x23 requested (IRR), blocked behind 0x30 in service (ISR)")
        );
        let quiet = "ISR\t (none)\nIRR\t (none)\n";
        assert!(lapic_vectors(quiet, "IRR").is_empty());
        assert_eq!(lapic_finding(1, quiet, &[0x23]), None);
    }
}
