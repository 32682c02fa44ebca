//! `cargo xtask e2e`: boot a Linux guest in QEMU whose own virtio drivers use our devices.
//!
//! The guest is Debian's cloud kernel with an initramfs built here (newc cpio written in Rust:
//! a static busybox, the virtio modules in load order, and tests/e2e/init.sh as /init). Each
//! boot gets a fresh disk image or entropy source and a fresh nonce on the kernel command
//! line; it passes only when the guest prints its success marker with that nonce on the serial
//! console *and* the host's own check after power-off agrees. QEMU's exit status proves
//! nothing (a panicking guest exits 0 too). docs/e2e.md has the details.
//!
//! The first boot to pass is the calibration boot: its times scale the deadlines of the
//! boots after it (`progress`). A boot that passes a deadline is classified (slow host or hang), its state
//! is dumped through QEMU's monitor (`dump`), and every failed boot's directory is kept under
//! target/e2e/failed/. In the gate a slow-host boot is retried; `--stress` loads the CPUs and
//! counts every boot (`stress`).

mod boot;
mod cpio;
mod demo;
mod disk;
mod dump;
mod elf;
mod host;
mod json;
mod judge;
mod kmod;
mod migrate;
mod monitor;
mod net;
mod progress;
mod provision;
mod restart;
mod stress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cmd::Cmd;
use boot::{Backend, Device, Machine, Outcome, Spec};
pub(crate) use demo::main as demo;
use progress::{Calibration, Class, Deadlines, Stage};

/// How many failed boots per run get their logs printed.
const FAILURES_SHOWN: usize = 2;
/// Lines of each log shown for a failed boot.
const TAIL_LINES: usize = 25;
/// In the gate, at most this many slow-host boots per run are retried; one more fails the run.
const SLOW_HOST_RETRIES: u32 = 3;
/// Where failed boots' directories are kept.
const FAILED_DIR: &str = "target/e2e/failed";

/// Which backends to run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendChoice {
    Vu,
    Qsd,
    Qemu,
    All,
}

/// The command line of `cargo xtask e2e`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    devices: Vec<Device>,
    backend: BackendChoice,
    boots: u32,
    kvm: bool,
    /// Build our backends with `--release`.
    release: bool,
    /// Only this queue count for blk.
    queues: Option<u16>,
    /// `--stress`: the load the harness puts on the CPUs while it boots.
    stress: Option<stress::Load>,
    /// `--iommu`: only the runs behind QEMU's intel-iommu.
    iommu_only: bool,
}

const USAGE: &str = "\
usage: cargo xtask e2e [--device blk|rng|net|LIST|all] [--backend vu|qsd|qemu|all] [--boots N] [--kvm]
                       [--release] [--queues 1|2] [--iommu]
       cargo xtask e2e --stress [--load THREADS] [--duty PERCENT] [the options above]

  --device   which devices to boot: blk, rng, net, a list such as blk,rng, or all (default)
  --backend  vu: the examples of crates/vu-backend (default); qsd: qemu-storage-daemon's
             vhost-user-blk export (blk only); qemu: QEMU's built-in virtio devices, no
             vhost-user (checks the guest test itself); all: each of them
  --boots    boots per run (default 10; 200 with --stress)
  --kvm      use KVM instead of TCG (where /dev/kvm can run a guest)
  --release  build our backends with --release
  --queues   blk (queues) and net (queue pairs) with this count only (default: 1 and 2)
  --iommu    only the run behind QEMU's intel-iommu (vu_blk --iommu, iommu_platform=on,
             guest intel_iommu=on; part of the default runs)
  --stress   boot while the harness keeps the CPUs busy, count passes, slow-host timeouts and
             hangs separately; fails only on hangs and other failures (not part of the gate)
  --load     spinning threads for --stress (default: one per CPU)
  --duty     percent of the time each spinning thread is busy, in bursts of 20-500 ms
             (default 80)
  --migrate  live migration of a running guest instead (`--migrate --help`)
  --restart  the backend killed and restarted under a running guest instead (`--restart --help`)

See docs/e2e.md.
";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        devices: Device::ALL.to_vec(),
        backend: BackendChoice::Vu,
        boots: 10,
        kvm: false,
        release: false,
        queues: None,
        stress: None,
        iommu_only: false,
    };
    let mut boots = None;
    let mut load = stress::Load::default();
    let mut load_given = false;
    let mut stress = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .map(String::as_str)
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--device" => options.devices = parse_devices(value("--device")?)?,
            "--backend" => {
                options.backend = match value("--backend")? {
                    "vu" => BackendChoice::Vu,
                    "qsd" => BackendChoice::Qsd,
                    "qemu" => BackendChoice::Qemu,
                    "all" => BackendChoice::All,
                    other => return Err(format!("unknown backend `{other}`")),
                }
            }
            "--boots" => boots = Some(positive("--boots", value("--boots")?)?),
            "--queues" => {
                options.queues = match value("--queues")? {
                    "1" => Some(1),
                    "2" => Some(2),
                    other => return Err(format!("--queues wants 1 or 2, not `{other}`")),
                }
            }
            "--load" => {
                load.threads = positive("--load", value("--load")?)? as usize;
                load_given = true;
            }
            "--duty" => {
                let text = value("--duty")?;
                load.duty = text
                    .parse()
                    .ok()
                    .filter(|duty| (1..=100).contains(duty))
                    .ok_or_else(|| format!("--duty wants 1 to 100, not `{text}`"))?;
                load_given = true;
            }
            "--stress" => stress = true,
            "--kvm" => options.kvm = true,
            "--release" => options.release = true,
            "--iommu" => options.iommu_only = true,
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    if stress {
        options.stress = Some(load);
    } else if load_given {
        return Err("--load and --duty go with --stress".to_owned());
    }
    options.boots = boots.unwrap_or(if options.stress.is_some() { 200 } else { 10 });
    Ok(options)
}

/// `blk`, `rng`, `net`, a comma-separated list of them (`blk,rng`), or `all`.
fn parse_devices(text: &str) -> Result<Vec<Device>, String> {
    if text == "all" {
        return Ok(Device::ALL.to_vec());
    }
    let mut devices = Vec::new();
    for name in text.split(',') {
        let device = Device::ALL
            .into_iter()
            .find(|device| device.name() == name)
            .ok_or_else(|| format!("unknown device `{name}`"))?;
        if !devices.contains(&device) {
            devices.push(device);
        }
    }
    Ok(devices)
}

fn positive(name: &str, text: &str) -> Result<u32, String> {
    text.parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{name} wants a positive number, not `{text}`"))
}

impl Options {
    /// The `cargo xtask e2e` arguments that make this run.
    fn args(&self) -> String {
        let device = if self.devices == Device::ALL {
            "all".to_owned()
        } else {
            let names: Vec<&str> = self.devices.iter().map(|device| device.name()).collect();
            names.join(",")
        };
        let backend = match self.backend {
            BackendChoice::Vu => "vu",
            BackendChoice::Qsd => "qsd",
            BackendChoice::Qemu => "qemu",
            BackendChoice::All => "all",
        };
        let mut line = format!(
            "--device {device} --backend {backend} --boots {}",
            self.boots
        );
        if self.kvm {
            line.push_str(" --kvm");
        }
        if self.release {
            line.push_str(" --release");
        }
        if let Some(queues) = self.queues {
            line.push_str(&format!(" --queues {queues}"));
        }
        if self.iommu_only {
            line.push_str(" --iommu");
        }
        line
    }
}

/// One row of the table: a device on a backend with a queue count, booted `boots` times.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    device: Device,
    backend: &'static str,
    queues: u16,
    cpus: u16,
    /// The device with `packed=on`, the guest checking it negotiated packed virtqueues.
    packed: bool,
    /// Behind QEMU's intel-iommu (`iommu_platform=on`), the guest checking the device is.
    iommu: bool,
}

impl Run {
    /// `blk-vu-q2`, `blk-vu-q2-packed`, `blk-vu-q1-iommu`: the run's directory and its name
    /// in reports.
    fn name(&self) -> String {
        let packed = if self.packed { "-packed" } else { "" };
        let iommu = if self.iommu { "-iommu" } else { "" };
        format!(
            "{}-{}-q{}{packed}{iommu}",
            self.device.name(),
            self.backend,
            self.queues
        )
    }
}

/// The runs the options ask for: blk with 1 queue on 1 vCPU and 2 queues on 2 vCPUs, rng with
/// one queue; qemu-storage-daemon serves blk only. Outside stress mode our backends run once
/// more with packed virtqueues (`packed=on`): blk with 2 queues, and rng; and `vu_blk` with 1
/// queue once more behind QEMU's intel-iommu (the only run with `--iommu`).
fn plan(options: &Options) -> Vec<Run> {
    let runs = plan_all(options);
    if options.iommu_only {
        runs.into_iter().filter(|run| run.iommu).collect()
    } else {
        runs
    }
}

fn plan_all(options: &Options) -> Vec<Run> {
    let backends: &[&'static str] = match options.backend {
        BackendChoice::Vu => &["vu"],
        BackendChoice::Qsd => &["qsd"],
        BackendChoice::Qemu => &["qemu"],
        BackendChoice::All => &["vu", "qsd", "qemu"],
    };
    let mut runs = Vec::new();
    for &backend in backends {
        let packed_runs = backend == "vu" && options.stress.is_none();
        for &device in &options.devices {
            match device {
                Device::Blk => {
                    for queues in [1, 2]
                        .into_iter()
                        .filter(|&q| options.queues.is_none_or(|only| only == q))
                    {
                        let run = Run {
                            device,
                            backend,
                            queues,
                            cpus: queues,
                            packed: false,
                            iommu: false,
                        };
                        if queues == 2 && packed_runs {
                            runs.push(run.clone());
                            runs.push(Run {
                                packed: true,
                                ..run
                            });
                        } else if queues == 1 && packed_runs {
                            runs.push(run.clone());
                            runs.push(Run { iommu: true, ..run });
                        } else {
                            runs.push(run);
                        }
                    }
                }
                Device::Rng if backend != "qsd" => {
                    for packed in [false, true] {
                        if !packed || packed_runs {
                            runs.push(Run {
                                device,
                                backend,
                                queues: 1,
                                cpus: 1,
                                packed,
                                iommu: false,
                            });
                        }
                    }
                }
                Device::Rng => {}
                // vu_net on a tap with 1 and 2 queue pairs (as many vCPUs, so that the guest
                // uses them all); no reference backend here.
                Device::Net if backend == "vu" => {
                    for queues in [1, 2]
                        .into_iter()
                        .filter(|&q| options.queues.is_none_or(|only| only == q))
                    {
                        runs.push(Run {
                            device,
                            backend,
                            queues,
                            cpus: queues,
                            packed: false,
                            iommu: false,
                        });
                    }
                }
                Device::Net => {}
            }
        }
    }
    runs
}

/// What a run produced, for the table.
#[derive(Debug, Clone)]
struct Row {
    run: Run,
    /// Boots made, retried slow-host boots included (fewer than asked when the run could
    /// not be set up).
    boots: u32,
    passes: u32,
    /// Boots stopped because the host was too slow, retried or not.
    slow_host: u32,
    /// Slow-host boots the gate booted again.
    retried: u32,
    hangs: u32,
    /// Wrong answers, crashes and backend failures.
    other: u32,
    seconds: Vec<f64>,
    /// Why the run could not boot at all (no backend program, say).
    setup_error: Option<String>,
    /// The directories of the failed boots.
    kept: Vec<PathBuf>,
}

impl Row {
    fn new(run: Run) -> Self {
        Row {
            run,
            boots: 0,
            passes: 0,
            slow_host: 0,
            retried: 0,
            hangs: 0,
            other: 0,
            seconds: Vec::new(),
            setup_error: None,
            kept: Vec::new(),
        }
    }

    fn name(&self) -> String {
        self.run.name()
    }

    /// A hang, a wrong answer, a crash or a backend failure fails the run; so does a slow
    /// host the gate could not retry (in stress mode nothing is retried and a slow host is
    /// only counted).
    fn failed(&self, stress: bool) -> bool {
        self.setup_error.is_some()
            || self.hangs > 0
            || self.other > 0
            || (!stress && self.slow_host > self.retried)
    }

    /// `1 hang, 2 slow host (2 retried)`; empty when every boot passed.
    fn failure_counts(&self) -> String {
        let mut parts = Vec::new();
        if self.hangs > 0 {
            parts.push(format!("{} hang", self.hangs));
        }
        if self.other > 0 {
            parts.push(format!(
                "{} other (wrong answer, crash or backend)",
                self.other
            ));
        }
        if self.slow_host > 0 {
            parts.push(format!(
                "{} slow host ({} retried)",
                self.slow_host, self.retried
            ));
        }
        parts.join(", ")
    }
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

fn table(rows: &[Row], stress: bool) -> String {
    let mut text = format!(
        "{:<6} {:<7} {:>6} {:<6} {:>5} {:>6} {:>4} {:>5} {:>5} {:>9}  {}\n",
        "device",
        "backend",
        "queues",
        "ring",
        "boots",
        "passes",
        "slow",
        "hangs",
        "other",
        "median s",
        "status"
    );
    text.push_str(&format!("{}\n", "-".repeat(77)));
    for row in rows {
        let median = median(&row.seconds).map_or_else(|| "-".to_owned(), |m| format!("{m:.2}"));
        let status = match &row.setup_error {
            Some(err) => format!("ERROR: {err}"),
            None if row.failed(stress) => "FAILED".to_owned(),
            None if row.slow_host > 0 => format!("ok ({})", row.failure_counts()),
            None => "ok".to_owned(),
        };
        text.push_str(&format!(
            "{:<6} {:<7} {:>6} {:<6} {:>5} {:>6} {:>4} {:>5} {:>5} {:>9}  {}\n",
            row.run.device.name(),
            row.run.backend,
            row.run.queues,
            match (row.run.packed, row.run.iommu) {
                (true, _) => "packed",
                (false, true) => "iommu",
                (false, false) => "split",
            },
            row.boots,
            row.passes,
            row.slow_host,
            row.hangs,
            row.other,
            median,
            status
        ));
    }
    text
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|raw| String::from_utf8_lossy(&raw).into_owned())
        .unwrap_or_else(|err| format!("(cannot read {}: {err})\n", path.display()));
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..]
        .iter()
        .map(|line| format!("    | {line}\n"))
        .collect()
}

/// Builds `vu_net` (the release build when `release`) and returns its path as cargo reports
/// it, for the DPDK steps.
pub(crate) fn build_vu_net(release: bool) -> Result<PathBuf, String> {
    build_vu_backend(Device::Net, release)
}

/// Builds the vu example serving `device` and returns its path, as cargo reports it (so
/// that `CARGO_TARGET_DIR` and `build.target-dir` are followed wherever they point).
fn build_vu_backend(device: Device, release: bool) -> Result<PathBuf, String> {
    let example = format!("vu_{}", device.name());
    let examples = Path::new("crates/vu-backend/examples");
    let source = examples.join(format!("{example}.rs"));
    let dir_source = examples.join(&example).join("main.rs");
    if !source.is_file() && !dir_source.is_file() {
        return Err(format!(
            "neither {} nor {} exists",
            source.display(),
            dir_source.display()
        ));
    }
    let mut args = vec!["build", "-p", "vu-backend", "--example", &example];
    if release {
        args.push("--release");
    }
    args.push("--message-format=json-render-diagnostics");
    let line = Cmd::cargo(&args).display();
    eprintln!("$ {line}");
    // Diagnostics go to stderr as usual; stdout carries the JSON artifact messages. The cargo
    // that runs xtask (`$CARGO`) keeps the pinned toolchain, as `Cmd::cargo` does.
    let output = std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|err| format!("cannot run `{line}`: {err}"))?;
    if !output.status.success() {
        return Err(format!("`{line}` exited with {}", output.status));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|json| executable_of(json, &example))
        .ok_or_else(|| format!("`{line}` named no executable for {example}"))
}

/// The `"executable"` of a cargo `compiler-artifact` message for example `name`.
fn executable_of(json_line: &str, name: &str) -> Option<PathBuf> {
    if !json_line.contains("\"reason\":\"compiler-artifact\"") {
        return None;
    }
    let (_, rest) = json_line.split_once("\"executable\":\"")?;
    let (path, _) = rest.split_once('"')?;
    // A path with escapes would need a JSON parser; examples live under plain paths.
    let path = PathBuf::from(path);
    (!path.as_os_str().to_string_lossy().contains('\\')
        && path.file_name().is_some_and(|file| file == name))
    .then_some(path)
}

/// Builds target/e2e/initramfs.cpio: busybox, the modules in load order, /init.
fn build_initramfs(kernel: &provision::Kernel, out: &Path) -> Result<(), String> {
    let busybox = std::fs::read(provision::BUSYBOX)
        .map_err(|err| format!("cannot read {}: {err}", provision::BUSYBOX))?;
    let init = std::fs::read("tests/e2e/init.sh")
        .map_err(|err| format!("cannot read tests/e2e/init.sh: {err}"))?;
    let tree = kmod::ModuleTree::open(&kernel.modules)?;
    let modules = tree.resolve(kmod::WANTED)?;
    let names: Vec<&str> = modules.iter().map(|(name, _)| name.as_str()).collect();
    eprintln!("    modules in load order: {}", names.join(" "));
    let mut archive = cpio::Archive::new();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        archive.dir(dir);
    }
    // The kernel opens /dev/console for init before anything mounts devtmpfs.
    archive.char_dev("dev/console", 0o600, 5, 1);
    archive.file("bin/busybox", 0o755, &busybox);
    // The interpreter of /init's `#!/bin/sh`; init.sh installs the other applets itself.
    archive.symlink("bin/sh", "busybox");
    archive.file("init", 0o755, &init);
    let migrate = std::fs::read("tests/e2e/migrate.sh")
        .map_err(|err| format!("cannot read tests/e2e/migrate.sh: {err}"))?;
    archive.file("migrate.sh", 0o644, &migrate);
    let restart = std::fs::read("tests/e2e/restart.sh")
        .map_err(|err| format!("cannot read tests/e2e/restart.sh: {err}"))?;
    archive.file("restart.sh", 0o644, &restart);
    for (index, (name, bytes)) in modules.iter().enumerate() {
        archive.file(&format!("lib/modules/{index:02}-{name}.ko"), 0o644, bytes);
    }
    std::fs::write(out, archive.finish())
        .map_err(|err| format!("cannot write {}: {err}", out.display()))
}

/// Packages, kernel and initramfs for `runs`.
fn prepare(runs: &[Run], kvm: bool) -> Result<Machine, String> {
    let work = PathBuf::from("target/e2e");
    std::fs::create_dir_all(&work)
        .map_err(|err| format!("cannot create {}: {err}", work.display()))?;
    eprintln!("==> e2e: system packages");
    let net = runs.iter().any(|run| run.device == Device::Net);
    provision::ensure_packages(runs.iter().any(|run| run.backend == "qsd"), net)?;
    if net {
        net::remove_stale_namespaces();
    }
    eprintln!("    {}", provision::version_line("qemu-system-x86_64"));
    eprintln!("==> e2e: guest kernel");
    let kernel = provision::kernel(&work.join("kernel"))?;
    eprintln!("    {} ({})", kernel.package, kernel.vmlinuz.display());
    eprintln!("==> e2e: initramfs");
    let initrd = work.join("initramfs.cpio");
    build_initramfs(&kernel, &initrd)?;
    Ok(Machine {
        qemu: "qemu-system-x86_64".to_owned(),
        kernel: kernel.vmlinuz.clone(),
        initrd,
        kvm,
        failed: PathBuf::from(FAILED_DIR),
    })
}

/// The backend of `run`, building our example when it is ours.
fn backend_for(run: &Run, release: bool) -> Result<Backend, String> {
    match run.backend {
        "qsd" => Ok(Backend::Qsd),
        "qemu" => Ok(Backend::Builtin),
        _ => build_vu_backend(run.device, release).map(Backend::Vu),
    }
}

/// After a pass: the deadlines from this boot, when it is the first to pass (the
/// calibration boot).
fn calibrate_from(outcome: &Outcome, deadlines: &mut Option<Deadlines>) {
    if deadlines.is_some() || outcome.failure.is_some() {
        return;
    }
    if let Some(init) = outcome.progress.at(Stage::Init) {
        let calibrated = Deadlines::calibrated(Calibration {
            to_init: init.host,
            total: Duration::from_secs_f64(outcome.seconds),
        });
        eprintln!("    deadlines from now on: {}", calibrated.describe());
        *deadlines = Some(calibrated);
    }
}

/// How the boots of a run are made.
struct Boots<'a> {
    machine: &'a Machine,
    backend: Backend,
    /// Boots that count, retried slow hosts aside.
    count: u32,
    /// Where boot `n` goes.
    dir: &'a dyn Fn(u32) -> PathBuf,
    /// Slow-host boots that may be made again (0 in stress mode).
    slow_host_retries: u32,
    /// Keep the directories of boots that passed (stress mode removes them).
    keep_passes: bool,
}

/// Makes the boots of `run`, printing one line per boot and the logs of the first failures.
/// Until a boot has passed, `deadlines` is empty and the boots get the uncalibrated ones.
fn run_boots(run: &Run, boots: &Boots<'_>, deadlines: &mut Option<Deadlines>) -> Row {
    let mut row = Row::new(run.clone());
    let mut shown = 0;
    let mut index = 0;
    while row.boots - row.retried < boots.count {
        let spec = Spec {
            device: run.device,
            backend: boots.backend.clone(),
            queues: run.queues,
            cpus: run.cpus,
            packed: run.packed,
            iommu: run.iommu,
            dir: (boots.dir)(index),
            deadlines: deadlines.unwrap_or(Deadlines::UNCALIBRATED),
        };
        let outcome = match boot::run(boots.machine, &spec) {
            Ok(outcome) => outcome,
            Err(err) => {
                eprintln!("    boot {index}: cannot set up: {err}");
                row.setup_error = Some(err);
                break;
            }
        };
        row.boots += 1;
        row.seconds.push(outcome.seconds);
        count_outcome(&mut row, &outcome, boots.slow_host_retries);
        report_boot(index, &outcome, shown < FAILURES_SHOWN);
        if outcome.failure.is_some() {
            shown += 1;
        }
        calibrate_from(&outcome, deadlines);
        if outcome.failure.is_none() && !boots.keep_passes {
            let _ = std::fs::remove_dir_all(&spec.dir);
        }
        index += 1;
    }
    row
}

/// Adds a boot to the row's counts; a slow host is retried while retries are left.
fn count_outcome(row: &mut Row, outcome: &Outcome, slow_host_retries: u32) {
    let Some(failure) = &outcome.failure else {
        row.passes += 1;
        return;
    };
    match failure.class {
        Class::SlowHost => {
            row.slow_host += 1;
            if row.retried < slow_host_retries {
                row.retried += 1;
            }
        }
        Class::Hang => row.hangs += 1,
        Class::WrongAnswer | Class::Crash | Class::Backend => row.other += 1,
    }
    if let Some(kept) = &outcome.kept {
        row.kept.push(kept.clone());
    }
}

/// One line for a boot; for a failure, what the dump found, where its files were kept, and
/// (when `logs`) the last lines of its logs.
fn report_boot(index: u32, outcome: &Outcome, logs: bool) {
    let Some(failure) = &outcome.failure else {
        eprintln!("    boot {index}: pass in {:.2} s", outcome.seconds);
        return;
    };
    eprintln!(
        "    boot {index}: FAIL in {:.2} s: {failure}",
        outcome.seconds
    );
    eprintln!("    progress: {}", outcome.progress.summary());
    if let Some(dump) = &outcome.dump {
        for finding in &dump.findings {
            eprintln!("    dump: {finding}");
        }
        eprintln!("    dump in {}", dump.path.display());
    }
    if let Some(kept) = &outcome.kept {
        eprintln!("    kept in {}", kept.display());
    }
    if logs {
        for (what, path) in [
            ("guest console", &outcome.console),
            ("backend log", &outcome.backend_log),
            ("qemu log", &outcome.qemu_log),
        ] {
            eprintln!("    --- {what} ({}), last lines:", path.display());
            eprint!("{}", tail(path, TAIL_LINES));
        }
    }
}

/// Runs what `options` asks for; `deadlines` are calibrated by the first boot that passes,
/// unless they already are.
fn run_all(options: &Options, deadlines: &mut Option<Deadlines>) -> Result<Vec<Row>, String> {
    let runs = plan(options);
    if runs.is_empty() {
        return Err("nothing to run: qemu-storage-daemon serves blk only".to_owned());
    }
    let machine = prepare(&runs, options.kvm)?;
    let mut rows = Vec::new();
    for run in runs {
        let name = run.name();
        eprintln!("==> e2e: {name}: {} boots", options.boots);
        let backend = match backend_for(&run, options.release) {
            Ok(backend) => backend,
            Err(err) => {
                eprintln!("    cannot run: {err}");
                let mut row = Row::new(run);
                row.setup_error = Some(err);
                rows.push(row);
                continue;
            }
        };
        let dir = |index: u32| {
            PathBuf::from("target/e2e/runs")
                .join(&name)
                .join(format!("boot-{index:02}"))
        };
        let boots = Boots {
            machine: &machine,
            backend,
            count: options.boots,
            dir: &dir,
            slow_host_retries: SLOW_HOST_RETRIES,
            keep_passes: true,
        };
        rows.push(run_boots(&run, &boots, deadlines));
    }
    Ok(rows)
}

/// One line per failed run, with the class of each failure and where the failed boots are
/// kept.
fn failures(rows: &[Row], stress: bool) -> Vec<String> {
    rows.iter()
        .filter(|row| row.failed(stress))
        .map(|row| match &row.setup_error {
            Some(err) => format!("{}: setup: {err}", row.name()),
            None => {
                let mut line = format!(
                    "{}: {}/{} boots passed: {}",
                    row.name(),
                    row.passes,
                    row.boots,
                    row.failure_counts()
                );
                if !row.kept.is_empty() {
                    let kept: Vec<String> =
                        row.kept.iter().map(|p| p.display().to_string()).collect();
                    line.push_str(&format!(" (kept in {})", kept.join(", ")));
                }
                line
            }
        })
        .collect()
}

/// Boots per run of our backends in `cargo xtask ci`: enough to catch a kick lost once in a
/// few dozen boots across the three runs.
const CI_BOOTS: u32 = 10;
/// Boots per run of qemu-storage-daemon in `cargo xtask ci`: it only shows that the guest
/// test itself is sound.
const CI_QSD_BOOTS: u32 = 3;
/// Boots per net run (1 and 2 queue pairs) in `cargo xtask ci`: 10 net boots in all, whose
/// TCP transfers make them the longest (about 6 s each on a quiet 2-core machine).
const CI_NET_BOOTS: u32 = 5;

/// The runs `cargo xtask ci` makes: our blk and rng devices, our net device, then
/// qemu-storage-daemon's blk export.
fn ci_runs() -> [Options; 3] {
    let ours = Options {
        devices: vec![Device::Blk, Device::Rng],
        backend: BackendChoice::Vu,
        boots: CI_BOOTS,
        kvm: false,
        // The examples are built in the `test` step's dev profile already: a debug build
        // costs seconds here, a release build a full optimised compile of the dependencies
        // for a boot time TCG dominates anyway.
        release: false,
        queues: None,
        stress: None,
        iommu_only: false,
    };
    let net = Options {
        devices: vec![Device::Net],
        boots: CI_NET_BOOTS,
        ..ours.clone()
    };
    let qsd = Options {
        devices: vec![Device::Blk],
        backend: BackendChoice::Qsd,
        boots: CI_QSD_BOOTS,
        ..ours.clone()
    };
    [ours, net, qsd]
}

/// The `e2e` step of `cargo xtask ci`: [`ci_runs`], each with its table; the first boot to
/// pass calibrates the deadlines of both. Never skips: a missing package or kernel fails the step with the command
/// to run.
pub(crate) fn ci_step(_options: &crate::Options) -> crate::StepResult {
    let mut problems = Vec::new();
    let mut deadlines = None;
    for options in ci_runs() {
        eprintln!("==> e2e: as `cargo xtask e2e {}`", options.args());
        match run_all(&options, &mut deadlines) {
            Ok(rows) => {
                eprint!("\n{}", table(&rows, false));
                problems.extend(failures(&rows, false));
            }
            Err(err) => problems.push(format!("setup: {err}")),
        }
    }
    if let Err(err) = migrate::ci_step() {
        problems.push(err);
    }
    if let Err(err) = restart::ci_step() {
        problems.push(err);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Entry point: `args` are the words after `e2e`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    if args.first().is_some_and(|arg| arg == "--net-peer") {
        return net::peer_main(&args[1..]);
    }
    if args.iter().any(|arg| arg == "--migrate") {
        return migrate::main(args);
    }
    if args.iter().any(|arg| arg == "--restart") {
        return restart::main(args);
    }
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match parse(args) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("xtask e2e: {err}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(load) = options.stress {
        return stress::main(&options, load);
    }
    let start = Instant::now();
    match run_all(&options, &mut None) {
        Ok(rows) => {
            print!("\n{}", table(&rows, false));
            println!("total {:.1} s", start.elapsed().as_secs_f64());
            let failed = failures(&rows, false);
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("xtask e2e: FAILED: {}", failed.join("; "));
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("xtask e2e: FAILED: setup: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn defaults_are_all_devices_on_vu_ten_boots_tcg() {
        let options = parse(&[]).unwrap();
        assert_eq!(options.devices, [Device::Blk, Device::Rng, Device::Net]);
        assert_eq!(options.backend, BackendChoice::Vu);
        assert_eq!(options.boots, 10);
        assert!(!options.kvm);
    }

    #[test]
    fn options_are_parsed() {
        let options = parse(&words("--device blk --backend qsd --boots 3 --kvm")).unwrap();
        assert_eq!(options.devices, [Device::Blk]);
        assert_eq!(options.backend, BackendChoice::Qsd);
        assert_eq!(options.boots, 3);
        assert!(options.kvm);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(parse(&words("--device scsi")).is_err());
        assert!(parse(&words("--device blk,scsi")).is_err());
        assert!(parse(&words("--boots 0")).is_err());
        assert!(parse(&words("--boots")).is_err());
        assert!(parse(&words("--fast")).is_err());
    }

    #[test]
    fn blk_runs_with_one_and_two_queues_ours_also_packed_and_qsd_skips_rng_and_net() {
        let options = parse(&words("--backend all")).unwrap();
        let runs: Vec<String> = plan(&options).iter().map(Run::name).collect();
        assert_eq!(
            runs,
            [
                "blk-vu-q1",
                "blk-vu-q1-iommu",
                "blk-vu-q2",
                "blk-vu-q2-packed",
                "rng-vu-q1",
                "rng-vu-q1-packed",
                "net-vu-q1",
                "net-vu-q2",
                "blk-qsd-q1",
                "blk-qsd-q2",
                "blk-qemu-q1",
                "blk-qemu-q2",
                "rng-qemu-q1"
            ]
        );
    }

    #[test]
    fn iommu_runs_only_vu_blk_with_one_queue_behind_intel_iommu() {
        let options = parse(&words("--iommu")).unwrap();
        let runs = plan(&options);
        let names: Vec<String> = runs.iter().map(Run::name).collect();
        assert_eq!(names, ["blk-vu-q1-iommu"]);
        assert!(runs[0].iommu && !runs[0].packed);
        assert_eq!(
            options.args(),
            "--device all --backend vu --boots 10 --iommu"
        );
        // Not in stress mode, nor for the reference backends.
        assert!(plan(&parse(&words("--iommu --stress")).unwrap()).is_empty());
        assert!(plan(&parse(&words("--iommu --backend qsd")).unwrap()).is_empty());
    }

    #[test]
    fn devices_are_one_a_list_or_all() {
        let devices = |line: &str| parse(&words(line)).unwrap().devices;
        assert_eq!(devices("--device net"), [Device::Net]);
        assert_eq!(devices("--device blk,rng"), [Device::Blk, Device::Rng]);
        assert_eq!(devices("--device rng,blk,rng"), [Device::Rng, Device::Blk]);
        assert_eq!(devices("--device all"), Device::ALL);
        let all = parse(&words("--device blk,rng,net")).unwrap();
        assert_eq!(all.args(), "--device all --backend vu --boots 10");
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    fn row(backend: &'static str, passes: u32) -> Row {
        let mut row = Row::new(Run {
            device: Device::Blk,
            backend,
            queues: 1,
            cpus: 1,
            packed: false,
            iommu: false,
        });
        row.boots = 10;
        row.passes = passes;
        row
    }

    #[test]
    fn table_marks_a_hang_as_failed() {
        let mut hung = row("qsd", 9);
        hung.hangs = 1;
        hung.seconds = vec![2.5; 10];
        let text = table(&[hung], false);
        assert!(text.contains("blk    qsd"), "{text}");
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("2.50"), "{text}");
    }

    #[test]
    fn retried_slow_hosts_keep_the_gate_green_and_one_more_fails_it() {
        let mut retried = row("vu", 10);
        retried.boots = 12;
        retried.slow_host = 2;
        retried.retried = 2;
        assert!(!retried.failed(false));
        let text = table(std::slice::from_ref(&retried), false);
        assert!(text.contains("ok (2 slow host (2 retried))"), "{text}");
        let mut exhausted = row("vu", 9);
        exhausted.boots = 13;
        exhausted.slow_host = 4;
        exhausted.retried = 3;
        assert!(exhausted.failed(false));
        assert_eq!(
            failures(&[exhausted.clone()], false),
            ["blk-vu-q1: 9/13 boots passed: 4 slow host (3 retried)"]
        );
        // In stress mode a slow host is counted, never a failure.
        exhausted.retried = 0;
        assert!(!exhausted.failed(true));
    }

    #[test]
    fn outcomes_are_counted_by_class_and_slow_hosts_retried_while_allowed() {
        let outcome = |class: Option<Class>| Outcome::for_test(class);
        let mut counted = row("vu", 0);
        for class in [
            None,
            Some(Class::SlowHost),
            Some(Class::SlowHost),
            Some(Class::Hang),
            Some(Class::WrongAnswer),
            Some(Class::Crash),
            Some(Class::Backend),
        ] {
            count_outcome(&mut counted, &outcome(class), 1);
        }
        assert_eq!(
            (
                counted.passes,
                counted.slow_host,
                counted.retried,
                counted.hangs,
                counted.other
            ),
            (1, 2, 1, 1, 3)
        );
        assert_eq!(counted.kept.len(), 6);
    }

    #[test]
    fn stress_options_are_parsed_and_need_stress() {
        let options = parse(&words(
            "--stress --device blk --queues 2 --load 3 --duty 50",
        ))
        .unwrap();
        assert_eq!(
            options.stress,
            Some(stress::Load {
                threads: 3,
                duty: 50
            })
        );
        assert_eq!(options.boots, 200);
        let runs: Vec<u16> = plan(&options).iter().map(|run| run.queues).collect();
        assert_eq!(runs, [2]);
        assert_eq!(parse(&words("--stress --boots 7")).unwrap().boots, 7);
        assert!(parse(&words("--load 2")).is_err());
        assert!(parse(&words("--stress --duty 0")).is_err());
        assert!(parse(&words("--queues 3")).is_err());
        assert_eq!(parse(&[]).unwrap().stress, None);
    }

    #[test]
    fn release_is_an_option() {
        assert!(!parse(&[]).unwrap().release);
        assert!(parse(&words("--release")).unwrap().release);
    }

    #[test]
    fn executable_is_read_from_the_artifact_message_of_the_example() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"vu_rng"},"executable":"/t/debug/examples/vu_rng","fresh":true}"#;
        assert_eq!(
            executable_of(line, "vu_rng"),
            Some(PathBuf::from("/t/debug/examples/vu_rng"))
        );
        assert_eq!(executable_of(line, "vu_blk"), None);
        let library = r#"{"reason":"compiler-artifact","target":{"name":"log"},"executable":null}"#;
        assert_eq!(executable_of(library, "vu_rng"), None);
        let finished = r#"{"reason":"build-finished","success":true}"#;
        assert_eq!(executable_of(finished, "vu_rng"), None);
    }

    #[test]
    fn ci_boots_blk_and_rng_ten_times_net_five_times_and_qsd_blk_three_times() {
        let [ours, net, qsd] = ci_runs();
        let runs: Vec<String> = plan(&ours)
            .iter()
            .chain(plan(&net).iter())
            .chain(plan(&qsd).iter())
            .map(Run::name)
            .collect();
        assert_eq!(
            runs,
            [
                "blk-vu-q1",
                "blk-vu-q1-iommu",
                "blk-vu-q2",
                "blk-vu-q2-packed",
                "rng-vu-q1",
                "rng-vu-q1-packed",
                "net-vu-q1",
                "net-vu-q2",
                "blk-qsd-q1",
                "blk-qsd-q2"
            ]
        );
        assert_eq!((ours.boots, net.boots, qsd.boots), (10, 5, 3));
        assert_eq!(ours.args(), "--device blk,rng --backend vu --boots 10");
        assert_eq!(net.args(), "--device net --backend vu --boots 5");
        assert_eq!(qsd.args(), "--device blk --backend qsd --boots 3");
    }

    #[test]
    fn failures_name_each_failed_run_with_its_classes() {
        let mut hung = row("qsd", 9);
        hung.hangs = 1;
        hung.kept.push(PathBuf::from("target/e2e/failed/x"));
        let mut broken = row("qemu", 0);
        broken.setup_error = Some("no qemu".to_owned());
        let failed = failures(&[row("vu", 10), hung, broken], false);
        assert_eq!(
            failed,
            [
                "blk-qsd-q1: 9/10 boots passed: 1 hang (kept in target/e2e/failed/x)",
                "blk-qemu-q1: setup: no qemu"
            ]
        );
    }
}
