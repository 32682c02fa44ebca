//! `cargo xtask e2e`: boot a Linux guest in QEMU whose own virtio drivers use our devices.
//!
//! The guest is Debian's cloud kernel with an initramfs built here (newc cpio written in Rust:
//! a static busybox, the virtio modules in load order, and tests/e2e/init.sh as /init). Each
//! boot gets a fresh disk image or entropy source and a fresh nonce on the kernel command
//! line; it passes only when the guest prints its success marker with that nonce on the serial
//! console *and* the host's own check after power-off agrees. QEMU's exit status proves
//! nothing (a panicking guest exits 0 too). docs/e2e.md has the details.

mod boot;
mod cpio;
mod elf;
mod kmod;
mod provision;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use crate::cmd::Cmd;
use boot::{Backend, Device, Machine, Spec};

/// How many failed boots per run get their logs printed.
const FAILURES_SHOWN: usize = 2;
/// Lines of each log shown for a failed boot.
const TAIL_LINES: usize = 25;

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
}

const USAGE: &str = "\
usage: cargo xtask e2e [--device blk|rng|all] [--backend vu|qsd|qemu|all] [--boots N] [--kvm]
                       [--release]

  --device   which devices to boot (default all)
  --backend  vu: the examples of crates/vu-backend (default); qsd: qemu-storage-daemon's
             vhost-user-blk export (blk only); qemu: QEMU's built-in virtio devices, no
             vhost-user (checks the guest test itself); all: each of them
  --boots    boots per run (default 10)
  --kvm      use KVM instead of TCG (where /dev/kvm can run a guest)
  --release  build our backends with --release

See docs/e2e.md.
";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        devices: vec![Device::Blk, Device::Rng],
        backend: BackendChoice::Vu,
        boots: 10,
        kvm: false,
        release: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .map(String::as_str)
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--device" => {
                options.devices = match value("--device")? {
                    "blk" => vec![Device::Blk],
                    "rng" => vec![Device::Rng],
                    "all" => vec![Device::Blk, Device::Rng],
                    other => return Err(format!("unknown device `{other}`")),
                }
            }
            "--backend" => {
                options.backend = match value("--backend")? {
                    "vu" => BackendChoice::Vu,
                    "qsd" => BackendChoice::Qsd,
                    "qemu" => BackendChoice::Qemu,
                    "all" => BackendChoice::All,
                    other => return Err(format!("unknown backend `{other}`")),
                }
            }
            "--boots" => {
                let text = value("--boots")?;
                options.boots = text
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--boots wants a positive number, not `{text}`"))?;
            }
            "--kvm" => options.kvm = true,
            "--release" => options.release = true,
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    Ok(options)
}

impl Options {
    /// The `cargo xtask e2e` arguments that make this run.
    fn args(&self) -> String {
        let device = match self.devices.as_slice() {
            [Device::Blk] => "blk",
            [Device::Rng] => "rng",
            _ => "all",
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
}

/// The runs the options ask for: blk with 1 queue on 1 vCPU and 2 queues on 2 vCPUs, rng with
/// one queue; qemu-storage-daemon serves blk only.
fn plan(options: &Options) -> Vec<Run> {
    let backends: &[&'static str] = match options.backend {
        BackendChoice::Vu => &["vu"],
        BackendChoice::Qsd => &["qsd"],
        BackendChoice::Qemu => &["qemu"],
        BackendChoice::All => &["vu", "qsd", "qemu"],
    };
    let mut runs = Vec::new();
    for &backend in backends {
        for &device in &options.devices {
            match device {
                Device::Blk => {
                    for queues in [1, 2] {
                        runs.push(Run {
                            device,
                            backend,
                            queues,
                            cpus: queues,
                        });
                    }
                }
                Device::Rng if backend != "qsd" => runs.push(Run {
                    device,
                    backend,
                    queues: 1,
                    cpus: 1,
                }),
                Device::Rng => {}
            }
        }
    }
    runs
}

/// What a run produced, for the table.
#[derive(Debug, Clone)]
struct Row {
    run: Run,
    /// Boots made (fewer than asked when the run could not be set up).
    boots: u32,
    passes: u32,
    seconds: Vec<f64>,
    /// Why the run could not boot at all (no backend program, say).
    setup_error: Option<String>,
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

fn table(rows: &[Row]) -> String {
    let mut text = format!(
        "{:<6} {:<7} {:>6} {:>5} {:>6} {:>9}  {}\n",
        "device", "backend", "queues", "boots", "passes", "median s", "status"
    );
    text.push_str(&format!("{}\n", "-".repeat(52)));
    for row in rows {
        let median = median(&row.seconds).map_or_else(|| "-".to_owned(), |m| format!("{m:.2}"));
        let status = match &row.setup_error {
            Some(err) => format!("ERROR: {err}"),
            None if row.passes == row.boots => "ok".to_owned(),
            None => "FAILED".to_owned(),
        };
        text.push_str(&format!(
            "{:<6} {:<7} {:>6} {:>5} {:>6} {:>9}  {}\n",
            row.run.device.name(),
            row.run.backend,
            row.run.queues,
            row.boots,
            row.passes,
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

/// Builds the vu example serving `device` and returns its path, as cargo reports it (so
/// that `CARGO_TARGET_DIR` and `build.target-dir` are followed wherever they point).
fn build_vu_backend(device: Device, release: bool) -> Result<PathBuf, String> {
    let example = format!("vu_{}", device.name());
    let source = Path::new("crates/vu-backend/examples").join(format!("{example}.rs"));
    if !source.is_file() {
        return Err(format!("{} does not exist", source.display()));
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
    provision::ensure_packages(runs.iter().any(|run| run.backend == "qsd"))?;
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

fn run_all(options: &Options) -> Result<Vec<Row>, String> {
    let runs = plan(options);
    if runs.is_empty() {
        return Err("nothing to run: qemu-storage-daemon serves blk only".to_owned());
    }
    let machine = prepare(&runs, options.kvm)?;
    let work = PathBuf::from("target/e2e");

    let mut rows = Vec::new();
    for run in runs {
        let name = format!("{}-{}-q{}", run.device.name(), run.backend, run.queues);
        eprintln!("==> e2e: {name}: {} boots", options.boots);
        let mut row = Row {
            run: run.clone(),
            boots: 0,
            passes: 0,
            seconds: Vec::new(),
            setup_error: None,
        };
        let backend = match backend_for(&run, options.release) {
            Ok(backend) => backend,
            Err(err) => {
                eprintln!("    cannot run: {err}");
                row.setup_error = Some(err);
                rows.push(row);
                continue;
            }
        };
        let mut shown = 0;
        for index in 0..options.boots {
            let spec = Spec {
                device: run.device,
                backend: backend.clone(),
                queues: run.queues,
                cpus: run.cpus,
                dir: work
                    .join("runs")
                    .join(&name)
                    .join(format!("boot-{index:02}")),
            };
            let outcome = match boot::run(&machine, &spec) {
                Ok(outcome) => outcome,
                Err(err) => {
                    eprintln!("    boot {index}: cannot set up: {err}");
                    row.setup_error = Some(err);
                    break;
                }
            };
            row.boots += 1;
            row.seconds.push(outcome.seconds);
            match &outcome.failure {
                None => {
                    row.passes += 1;
                    eprintln!("    boot {index}: pass in {:.2} s", outcome.seconds);
                }
                Some(reason) => {
                    eprintln!(
                        "    boot {index}: FAIL in {:.2} s: {reason}",
                        outcome.seconds
                    );
                    if shown < FAILURES_SHOWN {
                        shown += 1;
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
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

const DEMO_USAGE: &str = "\
usage: cargo xtask demo [--backend vu|qsd|qemu] [--kvm] [--release]
       cargo xtask demo --shell [--device blk|rng] [--backend vu|qsd|qemu] [--kvm] [--release]

  (default)  build vu_blk and boot a Linux guest against it (the first run installs QEMU and
             fetches a kernel, see docs/e2e.md); the guest makes an ext2 filesystem on the
             disk, writes a file, unmounts, mounts again and reads it back. Shows the guest's
             lines and the backend's log; exits 0 only if the guest succeeded and the host
             finds the file in the disk image. Bounded: the guest gets 60 s.
  --shell    the same guest with a shell on this terminal instead of the script (`exit`
             powers off, Ctrl-A X quits QEMU)
  --backend  vu (default), qsd (qemu-storage-daemon) or qemu (QEMU's own virtio-blk)
  --kvm      use KVM instead of TCG
  --release  build the backend with --release

Its files are in target/e2e/demo/.
";

/// `cargo xtask demo`: see [`DEMO_USAGE`].
pub(crate) fn demo(args: &[String]) -> ExitCode {
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        print!("{DEMO_USAGE}");
        return ExitCode::SUCCESS;
    }
    let shell = args.iter().any(|arg| arg == "--shell");
    let rest: Vec<String> = args
        .iter()
        .filter(|arg| *arg != "--shell")
        .cloned()
        .collect();
    let options = match parse(&rest) {
        Ok(options) if !shell && !options.devices.contains(&Device::Blk) => {
            eprintln!("xtask demo: the demo uses a disk; `--shell` boots the other devices\n\n{DEMO_USAGE}");
            return ExitCode::from(2);
        }
        Ok(options) => options,
        Err(err) => {
            eprintln!("xtask demo: {err}\n\n{DEMO_USAGE}");
            return ExitCode::from(2);
        }
    };
    let Some(run) = plan(&options).into_iter().next() else {
        eprintln!("xtask demo: qemu-storage-daemon serves blk only");
        return ExitCode::from(2);
    };
    let spec = |backend| Spec {
        device: run.device,
        backend,
        queues: run.queues,
        cpus: run.cpus,
        dir: PathBuf::from("target/e2e/demo"),
    };
    let machine = match prepare(std::slice::from_ref(&run), options.kvm) {
        Ok(machine) => machine,
        Err(err) => {
            eprintln!("xtask demo: FAILED: {err}");
            return ExitCode::FAILURE;
        }
    };
    let backend = match backend_for(&run, options.release) {
        Ok(backend) => backend,
        Err(err) => {
            eprintln!("xtask demo: FAILED: {err}");
            return ExitCode::FAILURE;
        }
    };
    if shell {
        return match boot::interactive(&machine, &spec(backend)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("xtask demo: FAILED: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let served_by = match &backend {
        Backend::Vu(program) => format!(
            "{} over vhost-user",
            program.file_name().map_or_else(
                || program.display().to_string(),
                |name| name.to_string_lossy().into_owned()
            )
        ),
        Backend::Qsd => "qemu-storage-daemon over vhost-user".to_owned(),
        Backend::Builtin => "QEMU's own virtio-blk (no vhost-user)".to_owned(),
    };
    eprintln!("==> demo: booting a Linux guest whose /dev/vda is served by {served_by}");
    let demo = match boot::demo(&machine, &spec(backend)) {
        Ok(demo) => demo,
        Err(err) => {
            eprintln!("xtask demo: FAILED: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!();
    for line in &demo.guest {
        println!("guest    | {line}");
    }
    for line in &demo.backend {
        println!("backend  | {line}");
    }
    match &demo.outcome.failure {
        None => {
            println!(
                "\ndemo: ok, the guest powered off after {:.1} s (files in target/e2e/demo/)",
                demo.outcome.seconds
            );
            ExitCode::SUCCESS
        }
        Some(reason) => {
            eprintln!("\nxtask demo: FAILED: {reason}");
            for (what, path) in [
                ("guest console", &demo.outcome.console),
                ("qemu log", &demo.outcome.qemu_log),
            ] {
                eprintln!("    --- {what} ({}), last lines:", path.display());
                eprint!("{}", tail(path, TAIL_LINES));
            }
            ExitCode::FAILURE
        }
    }
}

/// One line per run that did not pass all its boots.
fn failures(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter_map(|row| {
            let name = format!(
                "{}-{}-q{}",
                row.run.device.name(),
                row.run.backend,
                row.run.queues
            );
            match &row.setup_error {
                Some(err) => Some(format!("{name}: {err}")),
                None if row.passes < row.boots => {
                    Some(format!("{name}: {}/{} boots passed", row.passes, row.boots))
                }
                None => None,
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

/// The runs `cargo xtask ci` makes: our devices, then qemu-storage-daemon's blk export.
fn ci_runs() -> [Options; 2] {
    let ours = Options {
        devices: vec![Device::Blk, Device::Rng],
        backend: BackendChoice::Vu,
        boots: CI_BOOTS,
        kvm: false,
        // The examples are built in the `test` step's dev profile already: a debug build
        // costs seconds here, a release build a full optimised compile of the dependencies
        // for a boot time TCG dominates anyway.
        release: false,
    };
    let qsd = Options {
        devices: vec![Device::Blk],
        backend: BackendChoice::Qsd,
        boots: CI_QSD_BOOTS,
        ..ours.clone()
    };
    [ours, qsd]
}

/// The `e2e` step of `cargo xtask ci`: [`ci_runs`], each with its table. Never skips: a
/// missing package or kernel fails the step with the command to run.
pub(crate) fn ci_step(_options: &crate::Options) -> crate::StepResult {
    let mut problems = Vec::new();
    for options in ci_runs() {
        eprintln!("==> e2e: as `cargo xtask e2e {}`", options.args());
        match run_all(&options) {
            Ok(rows) => {
                eprint!("\n{}", table(&rows));
                problems.extend(failures(&rows));
            }
            Err(err) => problems.push(err),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} (logs under target/e2e/runs/)",
            problems.join("; ")
        ))
    }
}

/// Entry point: `args` are the words after `e2e`.
pub(crate) fn main(args: &[String]) -> ExitCode {
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
    let start = Instant::now();
    match run_all(&options) {
        Ok(rows) => {
            print!("\n{}", table(&rows));
            println!("total {:.1} s", start.elapsed().as_secs_f64());
            let failed = failures(&rows);
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "xtask e2e: FAILED: {} (logs under target/e2e/runs/)",
                    failed.join("; ")
                );
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("xtask e2e: FAILED: {err}");
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
        assert_eq!(options.devices, [Device::Blk, Device::Rng]);
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
        assert!(parse(&words("--device net")).is_err());
        assert!(parse(&words("--boots 0")).is_err());
        assert!(parse(&words("--boots")).is_err());
        assert!(parse(&words("--fast")).is_err());
    }

    #[test]
    fn blk_runs_with_one_and_two_queues_and_qsd_skips_rng() {
        let options = parse(&words("--backend all")).unwrap();
        let runs: Vec<(&str, &str, u16)> = plan(&options)
            .iter()
            .map(|run| (run.device.name(), run.backend, run.queues))
            .collect();
        assert_eq!(
            runs,
            [
                ("blk", "vu", 1),
                ("blk", "vu", 2),
                ("rng", "vu", 1),
                ("blk", "qsd", 1),
                ("blk", "qsd", 2),
                ("blk", "qemu", 1),
                ("blk", "qemu", 2),
                ("rng", "qemu", 1)
            ]
        );
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn table_marks_partial_passes_as_failed() {
        let row = Row {
            run: Run {
                device: Device::Blk,
                backend: "qsd",
                queues: 2,
                cpus: 2,
            },
            boots: 10,
            passes: 9,
            seconds: vec![2.5; 10],
            setup_error: None,
        };
        let text = table(&[row]);
        assert!(text.contains("blk    qsd"), "{text}");
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("2.50"), "{text}");
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
    fn ci_boots_our_devices_ten_times_and_qsd_blk_three_times() {
        let [ours, qsd] = ci_runs();
        let runs: Vec<(&str, &str, u16)> = plan(&ours)
            .iter()
            .chain(plan(&qsd).iter())
            .map(|run| (run.device.name(), run.backend, run.queues))
            .collect();
        assert_eq!(
            runs,
            [
                ("blk", "vu", 1),
                ("blk", "vu", 2),
                ("rng", "vu", 1),
                ("blk", "qsd", 1),
                ("blk", "qsd", 2)
            ]
        );
        assert_eq!((ours.boots, qsd.boots), (10, 3));
        assert_eq!(ours.args(), "--device all --backend vu --boots 10");
        assert_eq!(qsd.args(), "--device blk --backend qsd --boots 3");
    }

    #[test]
    fn failures_name_each_run_short_of_its_boots_or_not_set_up() {
        let row = |backend: &'static str, passes: u32, setup_error: Option<&str>| Row {
            run: Run {
                device: Device::Blk,
                backend,
                queues: 1,
                cpus: 1,
            },
            boots: 10,
            passes,
            seconds: Vec::new(),
            setup_error: setup_error.map(str::to_owned),
        };
        let failed = failures(&[
            row("vu", 10, None),
            row("qsd", 9, None),
            row("qemu", 0, Some("no qemu")),
        ]);
        assert_eq!(
            failed,
            ["blk-qsd-q1: 9/10 boots passed", "blk-qemu-q1: no qemu"]
        );
    }
}
