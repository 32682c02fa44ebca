//! One boot: prepare the disk image or entropy source, start the backend, boot QEMU against
//! it within its [`Deadlines`], stop both by PID, and judge the result from the serial
//! console and the files the guest touched (`judge`). A boot stopped at a deadline is classified and
//! dumped ([`at_deadline`]) before QEMU is killed; a failed boot's directory is kept under
//! target/e2e/failed/ ([`keep_failed`]).
//!
//! The pieces are separate so that other scenarios can use them: [`spawn_backend`],
//! [`spawn_qemu`], [`wait_for_qemu`], [`at_deadline`], [`keep_failed`]; `demo` does.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::dump::{self, Dump};
use super::host;
use super::judge::{check_net_requests, check_pairs, judge};
use super::net;
use super::progress::{
    classify_timeout, Class, ConsoleWatch, Deadlines, Expiry, Failure, Progress, Stage,
};
use crate::cmd::Cmd;

/// How long a backend may take to create its socket.
const SOCKET_DEADLINE: Duration = Duration::from_secs(10);
/// How long a backend may take to exit after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Guest RAM, shared with the backend through a memfd.
const MEMORY: &str = "256M";
/// `sun_path` holds 108 bytes including the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// The blk image: 16 MiB.
const IMAGE_SIZE: usize = 16 << 20;
/// Where the host's pattern starts and how long it is (the guest reads it back and hashes it).
const PATTERN_AT: usize = 1 << 20;
const PATTERN_LEN: usize = 2 << 20;
/// The guest writes its marker for vCPU `n` in 4 KiB block `1 + n`.
pub(crate) const GUEST_BLOCK: usize = 4096;
/// The rng backend's entropy source; far more than a boot consumes, so it never wraps.
pub(crate) const RNG_SOURCE_LEN: usize = 1 << 20;

/// The device under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Device {
    Blk,
    Rng,
    /// `vu_net --tap` in a network namespace; the guest pings the host and moves data over
    /// TCP both ways (`net`).
    Net,
}

impl Device {
    /// Every device, in the order runs are planned.
    pub(crate) const ALL: [Device; 3] = [Device::Blk, Device::Rng, Device::Net];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Device::Blk => "blk",
            Device::Rng => "rng",
            Device::Net => "net",
        }
    }
}

/// Who serves the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A backend built on this workspace: the program to run.
    Vu(PathBuf),
    /// qemu-storage-daemon's vhost-user-blk export (QEMU's libvhost-user).
    Qsd,
    /// No vhost-user at all: QEMU's own virtio-blk-pci (on the image file) or virtio-rng-pci
    /// (rng-random reading the source file). It shows the guest test is sound for a device
    /// no other vhost-user backend serves here.
    Builtin,
}

/// What stays the same across the boots of a run.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub(crate) qemu: String,
    pub(crate) kernel: PathBuf,
    pub(crate) initrd: PathBuf,
    pub(crate) kvm: bool,
    /// Where failed boots' directories are kept, each under a name of its own.
    pub(crate) failed: PathBuf,
}

/// One boot to make.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) device: Device,
    pub(crate) backend: Backend,
    pub(crate) queues: u16,
    pub(crate) cpus: u16,
    /// `packed=on` on the device: the guest must negotiate packed virtqueues
    /// (`VIRTIO_F_RING_PACKED`), which it checks in the device's feature bits.
    pub(crate) packed: bool,
    /// Behind QEMU's intel-iommu: `vu_blk --iommu`, the device with `iommu_platform=on,ats=on`
    /// after `-device intel-iommu`, the guest booted with `intel_iommu=on` checking that the
    /// device is in an IOMMU group (blk on our backend only).
    pub(crate) iommu: bool,
    /// Where this boot's files go (recreated).
    pub(crate) dir: PathBuf,
    /// How long the guest may take.
    pub(crate) deadlines: Deadlines,
}

/// How a boot went.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// `None` on success, else why it failed, classified.
    pub(crate) failure: Option<Failure>,
    /// From QEMU's start to its exit.
    pub(crate) seconds: f64,
    pub(crate) console: PathBuf,
    pub(crate) backend_log: PathBuf,
    pub(crate) qemu_log: PathBuf,
    /// This boot's nonce (on the kernel command line and in every marker).
    pub(crate) nonce: String,
    /// The guest's progress markers.
    pub(crate) progress: Progress,
    /// The state taken at a deadline.
    pub(crate) dump: Option<Dump>,
    /// Where a failed boot's directory was kept.
    pub(crate) kept: Option<PathBuf>,
    /// How QEMU exited, when it did.
    qemu_status: Option<ExitStatus>,
    /// The backend (if any) exited on SIGTERM rather than SIGKILL.
    backend_exited_on_term: bool,
}

/// A fresh random 64-bit value (std's hasher keys are random per process; the counter makes
/// each call differ).
pub(crate) fn fresh_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

/// Deterministic filler bytes (xorshift64*), seeded.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The host's marker in sector 0 and the guest's marker for vCPU `cpu`.
pub(crate) fn host_marker(nonce: &str) -> String {
    format!("VU-E2E-HOST {nonce}")
}

pub(crate) fn guest_marker(nonce: &str, cpu: u16) -> String {
    format!("VU-E2E-GUEST {nonce} cpu{cpu}")
}

/// The line the guest prints when every in-guest check passed.
pub(crate) fn pass_marker(device: Device, nonce: &str) -> String {
    format!("VU-E2E-PASS {} {nonce}", device.name())
}

/// A short private directory for the socket (`sun_path` is 108 bytes, target/ paths are long).
pub(crate) fn socket_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "vu-e2e-{}-{:08x}",
        std::process::id(),
        fresh_u64() as u32
    ));
    std::fs::create_dir(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    Ok(dir)
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|err| format!("cannot write {}: {err}", path.display()))
}

/// sha256 of a file by `sha256sum` (coreutils; xtask is std only).
pub(crate) fn sha256(path: &Path) -> Result<String, String> {
    let out = Cmd::new("sha256sum")
        .args(&[&path.to_string_lossy()])
        .capture_quietly()?;
    out.stdout
        .split_whitespace()
        .next()
        .filter(|_| out.success)
        .map(str::to_owned)
        .ok_or_else(|| format!("sha256sum {} failed: {}", path.display(), out.stderr))
}

/// Writes the blk image: host marker in sector 0, the pattern at 1 MiB. Returns the pattern's
/// sha256 for the guest to compare against.
pub(crate) fn prepare_image(
    dir: &Path,
    image: &Path,
    nonce: &str,
    seed: u64,
) -> Result<String, String> {
    let pattern_bytes = pattern(seed, PATTERN_LEN);
    let pattern_file = dir.join("pattern.bin");
    write_file(&pattern_file, &pattern_bytes)?;
    let sum = sha256(&pattern_file)?;
    let mut bytes = vec![0u8; IMAGE_SIZE];
    let marker = host_marker(nonce);
    bytes[..marker.len()].copy_from_slice(marker.as_bytes());
    bytes[PATTERN_AT..PATTERN_AT + PATTERN_LEN].copy_from_slice(&pattern_bytes);
    write_file(image, &bytes)?;
    Ok(sum)
}

pub(crate) fn log_file(path: &Path) -> Result<(Stdio, Stdio), String> {
    let file =
        File::create(path).map_err(|err| format!("cannot create {}: {err}", path.display()))?;
    let copy = file
        .try_clone()
        .map_err(|err| format!("cannot dup {}: {err}", path.display()))?;
    Ok((Stdio::from(file), Stdio::from(copy)))
}

/// The paths one boot uses.
#[derive(Debug, Clone)]
pub(crate) struct Files {
    /// The vhost-user socket, in a short temporary directory.
    pub(crate) socket: PathBuf,
    /// QEMU's QMP socket, beside it.
    pub(crate) qmp: PathBuf,
    /// The blk disk image.
    pub(crate) image: PathBuf,
    /// The rng entropy source.
    pub(crate) rng_source: PathBuf,
    /// net: what the host's peer sends the guest, and what it received from the guest.
    pub(crate) download: PathBuf,
    pub(crate) upload: PathBuf,
    /// net: the network namespace of the tap, and the log of its setup and of the peer.
    pub(crate) netns: String,
    pub(crate) net_log: PathBuf,
    /// The guest's serial console; empty for the terminal (`cargo xtask demo`).
    pub(crate) console: PathBuf,
}

/// The backend's command line; `None` for QEMU's built-in devices.
pub(crate) fn backend_command(spec: &Spec, files: &Files) -> Option<Command> {
    let socket = files.socket.to_string_lossy();
    let (image, rng_source) = (&files.image, &files.rng_source);
    Some(match (&spec.backend, spec.device) {
        (Backend::Builtin, _) => return None,
        (Backend::Qsd, _) => {
            let mut command = Command::new("qemu-storage-daemon");
            command.args([
                "--blockdev".to_owned(),
                format!("driver=file,node-name=file0,filename={}", image.display()),
                "--export".to_owned(),
                format!(
                    "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,\
                     addr.path={socket},writable=on,num-queues={}",
                    spec.queues
                ),
            ]);
            command
        }
        (Backend::Vu(program), Device::Blk) => {
            let mut command = Command::new(program);
            command.args([
                "--socket-path".to_owned(),
                socket.into_owned(),
                "--blk-file".to_owned(),
                image.display().to_string(),
                "--num-queues".to_owned(),
                spec.queues.to_string(),
            ]);
            if spec.packed {
                command.arg("--packed");
            }
            if spec.iommu {
                command.arg("--iommu");
            }
            command
        }
        (Backend::Vu(program), Device::Rng) => {
            let mut command = Command::new(program);
            command.args([
                "--socket-path".to_owned(),
                socket.into_owned(),
                "--rng-source".to_owned(),
                rng_source.display().to_string(),
            ]);
            command
        }
        (Backend::Vu(program), Device::Net) => {
            let mut command = net::in_namespace(&files.netns, program);
            command.args(["--socket-path", &socket, "--tap", net::TAP, "--queue-pairs"]);
            command.arg(spec.queues.to_string());
            command
        }
    })
}

/// The MTU QEMU gives a net boot's device (`host_mtu`), which reaches the backend as
/// `NET_SET_MTU`: the tap's own, so the guest's traffic does not change.
pub(crate) const NET_MTU: u16 = 1500;

/// The `-device` of the vhost-user device (its options) and, for a boot behind an IOMMU, the
/// arguments that must come before it.
fn device_and_iommu(spec: &Spec) -> (String, Vec<String>) {
    let mut device = match spec.device {
        Device::Blk => format!(
            "vhost-user-blk-pci,chardev=char0,num-queues={}",
            spec.queues
        ),
        Device::Rng => "vhost-user-rng-pci,chardev=char0".to_owned(),
        // `vectors=0` (INTx): Debian's QEMU 7.2 under TCG dies with SIGSEGV in
        // `vhost_net_start` -> `msix_set_vector_notifiers` when the driver starts a
        // vhost-user net device with MSI-X, whichever backend serves it (DPDK's vhost PMD
        // too). The backend's side is the same either way: QEMU hands it call eventfds.
        // `host_mtu`: QEMU offers VIRTIO_NET_F_MTU and, once the driver takes it, sends
        // NET_SET_MTU, which the backend must accept for the device to start.
        Device::Net if spec.queues > 1 => {
            format!("virtio-net-pci,netdev=net0,vectors=0,host_mtu={NET_MTU},mq=on")
        }
        Device::Net => format!("virtio-net-pci,netdev=net0,vectors=0,host_mtu={NET_MTU}"),
    };
    if spec.packed {
        device.push_str(",packed=on");
    }
    // The IOMMU must exist before the device that sits behind it. The device goes on a PCIe
    // root port: a modern-only PCI Express function, as ACCESS_PLATFORM (QEMU refuses it on a
    // transitional device) and ATS (a PCIe capability, for the device IOTLB) need.
    let mut iommu_args = Vec::new();
    if spec.iommu {
        device.push_str(",bus=rp0,disable-legacy=on,iommu_platform=on,ats=on");
        iommu_args = vec![
            "-device".to_owned(),
            "intel-iommu,intremap=on,device-iotlb=on".to_owned(),
            "-device".to_owned(),
            "pcie-root-port,id=rp0,bus=pcie.0,chassis=1".to_owned(),
        ];
    }
    (device, iommu_args)
}

/// QEMU's command line.
pub(crate) fn qemu_command(machine: &Machine, spec: &Spec, files: &Files, append: &str) -> Command {
    let Files {
        socket,
        image,
        rng_source,
        console,
        ..
    } = files;
    let accel = if machine.kvm { "kvm" } else { "tcg" };
    let (device, iommu_args) = device_and_iommu(spec);
    let backend_args = match (&spec.backend, spec.device) {
        (Backend::Builtin, Device::Blk) => vec![
            "-drive".to_owned(),
            format!("if=none,id=disk0,format=raw,file={}", image.display()),
            "-device".to_owned(),
            format!("virtio-blk-pci,drive=disk0,num-queues={}", spec.queues),
        ],
        (Backend::Builtin, Device::Rng) => vec![
            "-object".to_owned(),
            format!("rng-random,id=rng0,filename={}", rng_source.display()),
            "-device".to_owned(),
            "virtio-rng-pci,rng=rng0".to_owned(),
        ],
        (_, Device::Net) => vec![
            "-chardev".to_owned(),
            format!("socket,id=char0,path={}", socket.display()),
            "-netdev".to_owned(),
            format!("vhost-user,id=net0,chardev=char0,queues={}", spec.queues),
            "-device".to_owned(),
            device,
        ],
        _ => vec![
            "-chardev".to_owned(),
            format!("socket,id=char0,path={}", socket.display()),
            "-device".to_owned(),
            device,
        ],
    };
    let mut command = Command::new(&machine.qemu);
    command.args([
        "-nodefaults".to_owned(),
        "-no-user-config".to_owned(),
        "-machine".to_owned(),
        // Interrupt remapping (intremap=on) needs the split irqchip.
        if spec.iommu {
            format!("q35,accel={accel},kernel-irqchip=split")
        } else {
            format!("q35,accel={accel}")
        },
        "-cpu".to_owned(),
        if machine.kvm { "host" } else { "max" }.to_owned(),
        "-smp".to_owned(),
        spec.cpus.to_string(),
        "-m".to_owned(),
        MEMORY.to_owned(),
        "-object".to_owned(),
        format!("memory-backend-memfd,id=mem,size={MEMORY},share=on"),
        "-numa".to_owned(),
        "node,memdev=mem".to_owned(),
    ]);
    command.args(iommu_args);
    command.args(backend_args);
    command.args([
        "-kernel".to_owned(),
        machine.kernel.display().to_string(),
        "-initrd".to_owned(),
        machine.initrd.display().to_string(),
        "-append".to_owned(),
        append.to_owned(),
        "-display".to_owned(),
        "none".to_owned(),
        "-serial".to_owned(),
        if console.as_os_str().is_empty() {
            "mon:stdio".to_owned()
        } else {
            format!("file:{}", console.display())
        },
        "-no-reboot".to_owned(),
        // The monitor is only used when a deadline passes (the dump); it costs nothing else.
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", files.qmp.display()),
    ]);
    command
}

/// The kernel command line for `e2e.test=<test>`; `extra` is appended.
///
/// `no_timer_check`: on a loaded host, TCG's PIT may not tick in time for the kernel's
/// `timer_irq_works()`, so `check_timer()` gives up on the IO-APIC timer routes and falls
/// back to ones that leave the PIT's vector (0x30) in service in the local APIC, where it then
/// blocks lower-priority interrupts such as the virtio completions: the guest hangs on its
/// first disk request (or panics with "IO-APIC + timer doesn't work!"). Starving QEMU's main
/// loop during boot made that happen in 11 of 12 boots; with `no_timer_check` the same
/// starvation passed 12 of 12. The check only guards against broken chipsets QEMU does not
/// emulate.
pub(crate) fn kernel_command_line(test: &str, nonce: &str, extra: &str) -> String {
    let mut line =
        format!("console=ttyS0 panic=-1 quiet no_timer_check e2e.test={test} e2e.nonce={nonce}");
    if !extra.is_empty() {
        line.push(' ');
        line.push_str(extra);
    }
    line
}

/// A command as a shell line for the logs.
pub(crate) fn shell_line(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|arg| {
        let arg = arg.to_string_lossy();
        if arg.contains(' ') {
            format!("\"{arg}\"")
        } else {
            arg.into_owned()
        }
    }));
    words.join(" ")
}

/// Sends SIGTERM by PID, waits a little, then SIGKILL. Returns whether it went on SIGTERM.
pub(crate) fn stop(child: &mut Child) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    while start.elapsed() < TERM_GRACE {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Waits until the backend has created its socket; `Err` says why it did not.
pub(crate) fn wait_for_socket(backend: &mut Child, socket: &Path) -> Result<(), String> {
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = backend.try_wait() {
            return Err(format!("backend exited before listening: {status}"));
        }
        if start.elapsed() > SOCKET_DEADLINE {
            stop(backend);
            return Err(format!(
                "backend did not create its socket within {} s",
                SOCKET_DEADLINE.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Runs one boot; `Err` only when the boot could not even be set up. A failed boot's
/// directory is moved under [`Machine::failed`].
pub(crate) fn run(machine: &Machine, spec: &Spec) -> Result<Outcome, String> {
    let _ = std::fs::remove_dir_all(&spec.dir);
    std::fs::create_dir_all(&spec.dir)
        .map_err(|err| format!("cannot create {}: {err}", spec.dir.display()))?;
    let sockets = socket_dir()?;
    let result = run_in(machine, spec, &sockets);
    let _ = std::fs::remove_dir_all(&sockets);
    let mut outcome = result?;
    if outcome.failure.is_some() {
        keep_failed(machine, spec, &mut outcome);
    }
    Ok(outcome)
}

/// The files of a boot whose sockets go in `sockets`.
pub(crate) fn files_in(dir: &Path, sockets: &Path) -> Files {
    Files {
        socket: sockets.join("vu.sock"),
        qmp: sockets.join("qmp.sock"),
        image: dir.join("disk.img"),
        rng_source: dir.join("rng-source.bin"),
        download: dir.join("net-download.bin"),
        upload: dir.join("net-upload.bin"),
        netns: sockets.file_name().map_or_else(
            || "vu-e2e".to_owned(),
            |name| name.to_string_lossy().into_owned(),
        ),
        net_log: dir.join("net.log"),
        console: dir.join("console.log"),
    }
}

fn run_in(machine: &Machine, spec: &Spec, sockets: &Path) -> Result<Outcome, String> {
    let seed = fresh_u64();
    let nonce = format!("{:016x}", fresh_u64());
    let files = files_in(&spec.dir, sockets);
    let mut extra = "rng_core.default_quality=0".to_owned();
    if spec.packed {
        extra.push_str(" e2e.packed=1");
    }
    if spec.iommu {
        extra.push_str(" intel_iommu=on e2e.iommu=1");
    }
    match spec.device {
        Device::Blk => {
            let sum = prepare_image(&spec.dir, &files.image, &nonce, seed)?;
            extra.push_str(&format!(" e2e.sum={sum}"));
        }
        Device::Rng => write_file(&files.rng_source, &pattern(seed, RNG_SOURCE_LEN))?,
        Device::Net => {
            write_file(&files.download, &pattern(seed, net::BYTES))?;
            let sum = sha256(&files.download)?;
            extra.push_str(&format!(" e2e.sum={sum} {}", net::guest_argument()));
        }
    }
    let append = kernel_command_line(spec.device.name(), &nonce, &extra);
    let host_net = match (spec.device, &spec.backend) {
        (Device::Net, Backend::Vu(_)) => Some(net::HostSide::start(&files, spec.queues)?),
        _ => None,
    };
    // A net boot asks QEMU to announce the guest once its interface is there: QEMU sends the
    // fake RARP to the vhost-user netdev, which passes it on as SEND_RARP.
    let mut announced: Option<Result<(), String>> = None;
    let mut announce = |progress: &Progress| {
        if announced.is_none() && host_net.is_some() && progress.at(Stage::Device).is_some() {
            announced = Some(net::announce_self(&files.qmp));
        }
    };
    let launched = launch(machine, spec, &files, &append, &nonce, &mut announce);
    let peer = host_net.map(net::HostSide::finish);
    let (mut outcome, console_text) = launched?;
    if outcome.failure.is_none() {
        outcome.failure = judge(spec, &nonce, &console_text, &files).err();
        outcome.add_late_failures(spec);
    }
    if outcome.failure.is_none() && spec.device == Device::Net {
        let log = std::fs::read_to_string(&outcome.backend_log).unwrap_or_default();
        outcome.failure = check_pairs(&log, spec.queues)
            .and_then(|()| check_net_requests(&log, announced))
            .err()
            .map(|reason| Failure::new(Class::WrongAnswer, reason));
    }
    if let (Some(failure), Some(peer)) = (&mut outcome.failure, peer) {
        failure
            .reason
            .push_str(&format!("; the host's peer: {peer}"));
    }
    Ok(outcome)
}

/// Starts the backend's command (if the device has a backend process), logging to
/// `backend_log`, and writes its command line to `notes`.
pub(crate) fn spawn_backend(
    spec: &Spec,
    files: &Files,
    backend_log: &Path,
    notes: &mut File,
) -> Result<Option<Child>, String> {
    let Some(mut command) = backend_command(spec, files) else {
        write_file(
            backend_log,
            b"(no backend process: QEMU's built-in device)\n",
        )?;
        return Ok(None);
    };
    let (out, err) = log_file(backend_log)?;
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    let _ = writeln!(notes, "{}", shell_line(&command));
    command
        .spawn()
        .map(Some)
        .map_err(|err| format!("cannot start `{}`: {err}", shell_line(&command)))
}

/// Starts QEMU with kernel command line `append`, logging to `qemu_log`, and writes its
/// command line to `notes`.
pub(crate) fn spawn_qemu(
    machine: &Machine,
    spec: &Spec,
    files: &Files,
    append: &str,
    qemu_log: &Path,
    notes: &mut File,
) -> Result<Child, String> {
    let mut command = qemu_command(machine, spec, files, append);
    let (out, err) = log_file(qemu_log)?;
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    let _ = writeln!(notes, "{}", shell_line(&command));
    command
        .spawn()
        .map_err(|err| format!("cannot start `{}`: {err}", shell_line(&command)))
}

/// Waits for QEMU, started at `start`, to exit, following the console in `watch` (and
/// showing each look's progress to `on_progress`); returns its status, or which of
/// `deadlines` ran out first (QEMU is then still running).
pub(crate) fn wait_for_qemu(
    qemu: &mut Child,
    start: Instant,
    watch: &mut ConsoleWatch,
    deadlines: &Deadlines,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<Option<ExitStatus>, Expiry> {
    loop {
        let exited = qemu.try_wait();
        watch.poll(start.elapsed());
        on_progress(&watch.progress);
        match exited {
            Ok(Some(status)) => return Ok(Some(status)),
            Err(_) => return Ok(None),
            Ok(None) => {}
        }
        if let Some(expiry) = deadlines.expired(start.elapsed(), &watch.progress) {
            return Err(expiry);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A boot whose `expiry` ran out at `elapsed`: classifies it, dumps the state of QEMU and
/// the backend into the boot's directory, then kills QEMU (by PID).
pub(crate) fn at_deadline(
    spec: &Spec,
    files: &Files,
    qemu: &mut Child,
    backend: Option<&Child>,
    expiry: Expiry,
    progress: &Progress,
    elapsed: Duration,
) -> (Failure, Dump) {
    let mut failure = classify_timeout(expiry, progress, &spec.deadlines, elapsed);
    if failure.class == Class::SlowHost {
        let cpu =
            host::cpu_seconds(qemu.id()).map_or_else(|| "?".to_owned(), |cpu| format!("{cpu:.1}"));
        failure.reason.push_str(&format!(
            "; load average {}; QEMU had {cpu} s of CPU in {:.1} s",
            host::load_average(),
            elapsed.as_secs_f64()
        ));
    }
    let header = format!(
        "{failure}\nprogress: {}\ndeadlines: {}\n",
        progress.summary(),
        spec.deadlines.describe()
    );
    let target = dump::Target {
        qmp_socket: &files.qmp,
        qemu_pid: qemu.id(),
        backend_pid: backend.map(Child::id),
        dir: &spec.dir,
    };
    let dump = dump::write(&target, &header);
    let _ = qemu.kill();
    let _ = qemu.wait();
    (failure, dump)
}

/// Moves a failed boot's directory to `<machine.failed>/<run>-<boot>-<UTC time>-<nonce>`,
/// which no later run reuses, and points the outcome's paths there.
pub(crate) fn keep_failed(machine: &Machine, spec: &Spec, outcome: &mut Outcome) {
    let part = |path: Option<&Path>| {
        path.and_then(Path::file_name)
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned())
    };
    let name = format!(
        "{}-{}-{}-{}",
        part(spec.dir.parent()),
        part(Some(&spec.dir)),
        host::utc_stamp(),
        outcome.nonce
    );
    let kept = machine.failed.join(name);
    let moved =
        std::fs::create_dir_all(&machine.failed).and_then(|()| std::fs::rename(&spec.dir, &kept));
    if let Err(err) = moved {
        eprintln!(
            "    cannot keep {} as {}: {err}",
            spec.dir.display(),
            kept.display()
        );
        return;
    }
    let relocate = |path: &mut PathBuf| {
        if let Ok(rest) = path.strip_prefix(&spec.dir) {
            *path = kept.join(rest);
        }
    };
    relocate(&mut outcome.console);
    relocate(&mut outcome.backend_log);
    relocate(&mut outcome.qemu_log);
    if let Some(dump) = &mut outcome.dump {
        relocate(&mut dump.path);
    }
    outcome.kept = Some(kept);
}

/// Starts the backend (if any) and QEMU on `files`, waits for QEMU within the spec's
/// deadlines (classifying and dumping a boot that passes one; `on_progress` sees the guest's
/// progress meanwhile), stops the backend, and returns how it went with the console's text.
/// `Outcome::failure` is set only when the backend never listened or a deadline passed; the
/// caller judges the rest.
pub(crate) fn launch(
    machine: &Machine,
    spec: &Spec,
    files: &Files,
    append: &str,
    nonce: &str,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<(Outcome, String), String> {
    for socket in [&files.socket, &files.qmp] {
        if socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(format!(
                "socket path {} is too long for sun_path",
                socket.display()
            ));
        }
    }
    let mut outcome = Outcome::new(&spec.dir, files, nonce);
    let mut notes = File::create(spec.dir.join("commands.txt"))
        .map_err(|err| format!("cannot create commands.txt: {err}"))?;
    let mut backend = spawn_backend(spec, files, &outcome.backend_log, &mut notes)?;
    if let Some(child) = &mut backend {
        if let Err(reason) = wait_for_socket(child, &files.socket) {
            outcome.failure = Some(Failure::new(Class::Backend, reason));
            return Ok((outcome, String::new()));
        }
    }
    let qemu_log = outcome.qemu_log.clone();
    let start = Instant::now();
    let mut qemu = match spawn_qemu(machine, spec, files, append, &qemu_log, &mut notes) {
        Ok(qemu) => qemu,
        Err(err) => {
            if let Some(child) = &mut backend {
                stop(child);
            }
            return Err(err);
        }
    };
    let mut watch = ConsoleWatch::new(&files.console, nonce);
    match wait_for_qemu(&mut qemu, start, &mut watch, &spec.deadlines, on_progress) {
        Ok(status) => outcome.qemu_status = status,
        Err(expiry) => {
            let (failure, dump) = at_deadline(
                spec,
                files,
                &mut qemu,
                backend.as_ref(),
                expiry,
                &watch.progress,
                start.elapsed(),
            );
            outcome.failure = Some(failure);
            outcome.dump = Some(dump);
        }
    }
    outcome.seconds = start.elapsed().as_secs_f64();
    outcome.backend_exited_on_term = backend.as_mut().is_none_or(stop);
    outcome.progress = watch.progress;
    let console_text = std::fs::read(&files.console)
        .map(|raw| String::from_utf8_lossy(&raw).into_owned())
        .unwrap_or_default();
    Ok((outcome, console_text))
}

impl Outcome {
    fn new(dir: &Path, files: &Files, nonce: &str) -> Self {
        Outcome {
            failure: None,
            seconds: 0.0,
            console: files.console.clone(),
            backend_log: dir.join("backend.log"),
            qemu_log: dir.join("qemu.log"),
            nonce: nonce.to_owned(),
            progress: Progress::default(),
            dump: None,
            kept: None,
            qemu_status: None,
            backend_exited_on_term: true,
        }
    }

    /// After the guest's verdict: our backend must have exited on SIGTERM, and a failure
    /// says how QEMU ended.
    pub(crate) fn add_late_failures(&mut self, spec: &Spec) {
        if self.failure.is_none() {
            if let (Backend::Vu(_), false) = (&spec.backend, self.backend_exited_on_term) {
                self.failure = Some(Failure::new(
                    Class::Backend,
                    format!(
                        "backend did not exit within {} s of SIGTERM",
                        TERM_GRACE.as_secs()
                    ),
                ));
            }
        }
        if let (Some(failure), Some(status)) = (&mut self.failure, self.qemu_status) {
            failure.reason.push_str(&format!(" (qemu {status})"));
        }
    }
}

#[cfg(test)]
impl Outcome {
    /// An outcome of `class` (a pass for `None`); a failure is kept somewhere.
    pub(crate) fn for_test(class: Option<Class>) -> Self {
        let dir = Path::new("/d");
        let mut outcome = Outcome::new(dir, &files_in(dir, Path::new("/s")), "n");
        if let Some(class) = class {
            outcome.failure = Some(Failure::new(class, "test"));
            outcome.kept = Some(PathBuf::from("/kept"));
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(device: Device, queues: u16) -> Spec {
        Spec {
            device,
            backend: Backend::Qsd,
            queues,
            cpus: queues,
            packed: false,
            iommu: false,
            dir: PathBuf::from("/nonexistent"),
            deadlines: Deadlines::UNCALIBRATED,
        }
    }

    fn files() -> Files {
        Files {
            socket: PathBuf::from("/tmp/s"),
            qmp: PathBuf::from("/tmp/q"),
            image: PathBuf::from("/img"),
            rng_source: PathBuf::from("/src"),
            download: PathBuf::from("/down"),
            upload: PathBuf::from("/up"),
            netns: "ns".to_owned(),
            net_log: PathBuf::from("/net.log"),
            console: PathBuf::from("/c"),
        }
    }

    #[test]
    fn builtin_devices_need_no_backend_process_or_socket() {
        let mut builtin = spec(Device::Rng, 1);
        builtin.backend = Backend::Builtin;
        assert!(backend_command(&builtin, &files()).is_none());
        let machine = Machine {
            qemu: "qemu-system-x86_64".to_owned(),
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            kvm: false,
            failed: PathBuf::from("/f"),
        };
        let line = shell_line(&qemu_command(&machine, &builtin, &files(), ""));
        assert!(line.contains("rng-random,id=rng0,filename=/src"), "{line}");
        assert!(!line.contains("chardev"), "{line}");
    }

    #[test]
    fn pattern_is_deterministic_per_seed() {
        assert_eq!(pattern(7, 100), pattern(7, 100));
        assert_ne!(pattern(7, 100), pattern(8, 100));
        assert_eq!(pattern(7, 13).len(), 13);
    }

    #[test]
    fn fresh_values_differ() {
        assert_ne!(fresh_u64(), fresh_u64());
    }

    #[test]
    fn every_command_line_has_no_timer_check() {
        for test in ["blk", "demo", "shell"] {
            let line = kernel_command_line(test, "n", "");
            assert!(line.contains(" no_timer_check "), "{line}");
            assert!(
                line.ends_with(&format!("e2e.test={test} e2e.nonce=n")),
                "{line}"
            );
        }
        assert!(kernel_command_line("blk", "n", "e2e.sum=x").ends_with("e2e.nonce=n e2e.sum=x"));
    }

    #[test]
    fn qemu_line_shares_memory_and_names_the_queue_count() {
        let machine = Machine {
            qemu: "qemu-system-x86_64".to_owned(),
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            kvm: false,
            failed: PathBuf::from("/f"),
        };
        let line = shell_line(&qemu_command(
            &machine,
            &spec(Device::Blk, 2),
            &files(),
            "console=ttyS0",
        ));
        assert!(
            line.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
            "{line}"
        );
        assert!(
            line.contains("vhost-user-blk-pci,chardev=char0,num-queues=2"),
            "{line}"
        );
        assert!(line.contains("accel=tcg"), "{line}");
        assert!(line.contains("-smp 2"), "{line}");
        assert!(
            line.contains("-qmp unix:/tmp/q,server=on,wait=off"),
            "{line}"
        );
    }

    /// The IOMMU comes before the device, the device sits on a PCIe root port, modern only,
    /// and the backend is asked to offer ACCESS_PLATFORM.
    #[test]
    fn an_iommu_boot_puts_the_device_behind_intel_iommu() {
        let machine = Machine {
            qemu: "qemu-system-x86_64".to_owned(),
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            kvm: false,
            failed: PathBuf::from("/f"),
        };
        let mut iommu = spec(Device::Blk, 1);
        iommu.backend = Backend::Vu(PathBuf::from("/vu_blk"));
        iommu.iommu = true;
        let line = shell_line(&qemu_command(&machine, &iommu, &files(), ""));
        assert!(
            line.contains("q35,accel=tcg,kernel-irqchip=split"),
            "{line}"
        );
        let at = |needle: &str| {
            line.find(needle)
                .unwrap_or_else(|| panic!("{needle}: {line}"))
        };
        assert!(at("intel-iommu,intremap=on,device-iotlb=on") < at("vhost-user-blk-pci"));
        assert!(
            line.contains("bus=rp0,disable-legacy=on,iommu_platform=on,ats=on"),
            "{line}"
        );
        let backend = shell_line(&backend_command(&iommu, &files()).unwrap());
        assert!(backend.ends_with(" --iommu"), "{backend}");
        // Without it, none of that.
        let plain = shell_line(&qemu_command(&machine, &spec(Device::Blk, 1), &files(), ""));
        assert!(
            !plain.contains("iommu") && !plain.contains("kernel-irqchip"),
            "{plain}"
        );
    }

    #[test]
    fn qsd_export_is_writable_with_the_queue_count() {
        let command = backend_command(&spec(Device::Blk, 2), &files()).unwrap();
        let line = shell_line(&command);
        assert!(
            line.contains("addr.path=/tmp/s,writable=on,num-queues=2"),
            "{line}"
        );
        assert!(line.contains("filename=/img"), "{line}");
    }
}
