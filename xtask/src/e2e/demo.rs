//! `cargo xtask demo`: one boot whose guest makes a filesystem on a disk served by one of the
//! backends, with its lines and the backend's log shown; `--shell` boots the same guest with a
//! shell on the terminal instead. Built from the same pieces as the e2e boots (`boot`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use super::boot::{
    backend_command, files_in, fresh_u64, keep_failed, kernel_command_line, launch, log_file,
    pattern, prepare_image, qemu_command, shell_line, socket_dir, stop, wait_for_socket,
    write_file, Backend, Device, Files, Machine, Outcome, Spec, RNG_SOURCE_LEN,
};
use super::judge::no_verdict;
use super::net;
use super::progress::{Class, Deadlines, Failure};
use super::{backend_for, parse, plan, prepare, report_boot};

/// The demo's blank disk (sparse), on which the guest makes a filesystem.
const DEMO_IMAGE_SIZE: u64 = 32 << 20;

const DEMO_USAGE: &str = "\
usage: cargo xtask demo [--backend vu|qsd|qemu] [--kvm] [--release]
       cargo xtask demo --shell [--device blk|rng|net] [--backend vu|qsd|qemu] [--kvm] [--release]

  (default)  build vu_blk and boot a Linux guest against it (the first run installs QEMU and
             fetches a kernel, see docs/e2e.md); the guest makes an ext2 filesystem on the
             disk, writes a file, unmounts, mounts again and reads it back. Shows the guest's
             lines and the backend's log; exits 0 only if the guest succeeded and the host
             finds the file in the disk image. Bounded: the guest gets 60 s to reach init,
             60 s from one progress marker to the next, 120 s in all.
  --shell    the same guest with a shell on this terminal instead of the script (`exit`
             powers off, Ctrl-A X quits QEMU)
  --backend  vu (default), qsd (qemu-storage-daemon) or qemu (QEMU's own virtio-blk)
  --kvm      use KVM instead of TCG
  --release  build the backend with --release

Its files are in target/e2e/demo/.
";

/// `cargo xtask demo`: see [`DEMO_USAGE`]; `args` are the words after `demo`.
pub(crate) fn main(args: &[String]) -> ExitCode {
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
        packed: run.packed,
        iommu: run.iommu,
        dir: PathBuf::from("target/e2e/demo"),
        deadlines: Deadlines::UNCALIBRATED,
    };
    let machine = match prepare(std::slice::from_ref(&run), options.kvm) {
        Ok(machine) => machine,
        Err(err) => {
            eprintln!("xtask demo: FAILED: setup: {err}");
            return ExitCode::FAILURE;
        }
    };
    let backend = match backend_for(&run, options.release) {
        Ok(backend) => backend,
        Err(err) => {
            eprintln!("xtask demo: FAILED: setup: {err}");
            return ExitCode::FAILURE;
        }
    };
    if shell {
        return match interactive(&machine, &spec(backend)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("xtask demo: FAILED: setup: {err}");
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
    let demo = match run_demo(&machine, &spec(backend)) {
        Ok(demo) => demo,
        Err(err) => {
            eprintln!("xtask demo: FAILED: setup: {err}");
            return ExitCode::FAILURE;
        }
    };
    report_demo(&demo)
}

/// Shows the guest's lines and the backend's log, then the verdict.
fn report_demo(demo: &Demo) -> ExitCode {
    println!();
    for line in &demo.guest {
        println!("guest    | {line}");
    }
    for line in &demo.backend {
        println!("backend  | {line}");
    }
    if demo.outcome.failure.is_none() {
        println!(
            "\ndemo: ok, the guest powered off after {:.1} s (files in target/e2e/demo/)",
            demo.outcome.seconds
        );
        return ExitCode::SUCCESS;
    }
    eprintln!();
    report_boot(0, &demo.outcome, true);
    eprintln!("xtask demo: FAILED");
    ExitCode::FAILURE
}

/// What `cargo xtask demo` shows: the guest's lines and the backend's log.
#[derive(Debug)]
pub(crate) struct Demo {
    pub(crate) outcome: Outcome,
    /// The guest's `VU-DEMO` lines, without the tag, in order, each once.
    pub(crate) guest: Vec<String>,
    /// The backend's log (stderr).
    pub(crate) backend: Vec<String>,
}

/// The text the demo guest writes into /mnt/hello.txt, which the host then looks for in the
/// image.
pub(crate) fn demo_file_text(nonce: &str) -> String {
    format!("hello from the guest, boot {nonce}")
}

/// `cargo xtask demo`: one bounded boot whose guest makes an ext2 filesystem on the blank
/// disk, writes a file, unmounts, reads it back, and powers off. Passes when the guest's
/// success line with this boot's nonce is on the console and the host finds the file's text
/// in the image.
pub(crate) fn run_demo(machine: &Machine, spec: &Spec) -> Result<Demo, String> {
    let _ = std::fs::remove_dir_all(&spec.dir);
    std::fs::create_dir_all(&spec.dir)
        .map_err(|err| format!("cannot create {}: {err}", spec.dir.display()))?;
    let sockets = socket_dir()?;
    let result = demo_in(machine, spec, &sockets);
    let _ = std::fs::remove_dir_all(&sockets);
    let mut demo = result?;
    if demo.outcome.failure.is_some() {
        keep_failed(machine, spec, &mut demo.outcome);
    }
    Ok(demo)
}

fn demo_in(machine: &Machine, spec: &Spec, sockets: &Path) -> Result<Demo, String> {
    let nonce = format!("{:016x}", fresh_u64());
    let files = files_in(&spec.dir, sockets);
    File::create(&files.image)
        .and_then(|file| file.set_len(DEMO_IMAGE_SIZE))
        .map_err(|err| format!("cannot create {}: {err}", files.image.display()))?;
    let append = kernel_command_line("demo", &nonce, "");
    let (mut outcome, console) = launch(machine, spec, &files, &append, &nonce, &mut |_| {})?;
    let guest = demo_lines(&console);
    if outcome.failure.is_none() {
        outcome.failure = judge_demo(&console, &nonce, &files.image).err();
    }
    outcome.add_late_failures(spec);
    let backend = std::fs::read(&outcome.backend_log)
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(Demo {
        outcome,
        guest,
        backend,
    })
}

/// The guest's `VU-DEMO <text>` lines, in order, each once (init.sh prints each line both on
/// the console and through printk).
pub(crate) fn demo_lines(console: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for line in console.lines() {
        if let Some((_, text)) = line.split_once("VU-DEMO ") {
            let text = text.trim().to_owned();
            if !lines.contains(&text) {
                lines.push(text);
            }
        }
    }
    lines
}

/// The demo's verdict: the guest's success line with this nonce, no failure line, and the
/// file's text in the image after power-off.
pub(crate) fn judge_demo(console: &str, nonce: &str, image: &Path) -> Result<(), Failure> {
    if let Some(line) = console.lines().find(|line| line.contains("VU-E2E-FAIL")) {
        return Err(Failure::new(
            Class::WrongAnswer,
            format!("guest: {}", line.trim()),
        ));
    }
    let pass = format!("VU-DEMO-PASS {nonce}");
    if !console.lines().any(|line| line.contains(&pass)) {
        return Err(no_verdict(console));
    }
    let bytes = std::fs::read(image).map_err(|err| {
        Failure::new(
            Class::WrongAnswer,
            format!("cannot read {}: {err}", image.display()),
        )
    })?;
    let text = demo_file_text(nonce);
    if bytes
        .windows(text.len())
        .any(|window| window == text.as_bytes())
    {
        Ok(())
    } else {
        Err(Failure::new(
            Class::WrongAnswer,
            format!("after power-off the image does not hold the file's text `{text}`"),
        ))
    }
}

/// `cargo xtask demo --shell`: boots the guest against the backend with the serial console on
/// this terminal and a shell in the guest, without a deadline; stops the backend afterwards.
pub(crate) fn interactive(machine: &Machine, spec: &Spec) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(&spec.dir);
    std::fs::create_dir_all(&spec.dir)
        .map_err(|err| format!("cannot create {}: {err}", spec.dir.display()))?;
    let sockets = socket_dir()?;
    let result = interactive_in(machine, spec, &sockets);
    let _ = std::fs::remove_dir_all(&sockets);
    result
}

fn interactive_in(machine: &Machine, spec: &Spec, sockets: &Path) -> Result<(), String> {
    let nonce = format!("{:016x}", fresh_u64());
    let files = Files {
        console: PathBuf::new(),
        ..files_in(&spec.dir, sockets)
    };
    let backend_log = spec.dir.join("backend.log");
    match spec.device {
        Device::Blk => {
            prepare_image(&spec.dir, &files.image, &nonce, fresh_u64())?;
        }
        Device::Rng => write_file(&files.rng_source, &pattern(fresh_u64(), RNG_SOURCE_LEN))?,
        Device::Net => write_file(&files.download, &pattern(fresh_u64(), net::BYTES))?,
    }
    // net: the tap's namespace (deleted when this returns) with the peer the boots use.
    let _host_net = match (spec.device, &spec.backend) {
        (Device::Net, Backend::Vu(_)) => Some(net::HostSide::start(&files, spec.queues)?),
        _ => None,
    };
    let mut backend = match backend_command(spec, &files) {
        Some(mut command) => {
            let (out, err) = log_file(&backend_log)?;
            command.stdin(Stdio::null()).stdout(out).stderr(err);
            eprintln!("$ {}  2>{}", shell_line(&command), backend_log.display());
            let mut child = command
                .spawn()
                .map_err(|err| format!("cannot start `{}`: {err}", shell_line(&command)))?;
            wait_for_socket(&mut child, &files.socket)?;
            Some(child)
        }
        None => None,
    };
    let append = kernel_command_line("shell", &nonce, "");
    let mut qemu = qemu_command(machine, spec, &files, &append);
    eprintln!("$ {}", shell_line(&qemu));
    eprintln!(
        "(the guest's shell: /dev/vda, /dev/hwrng or eth0 (the host is {} in the tap's namespace, \
         after `ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up`); `exit` powers off; \
         Ctrl-A X quits QEMU)",
        net::HOST_ADDR
    );
    let status = qemu.status();
    if let Some(child) = &mut backend {
        stop(child);
    }
    match status {
        Ok(_) => Ok(()),
        Err(err) => Err(format!("cannot run `{}`: {err}", shell_line(&qemu))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_lines_are_untagged_in_order_and_each_once() {
        let console = "VU-DEMO first\n[    1.5] VU-DEMO first\nnoise\nVU-DEMO second line\n\
                       [    1.6] VU-DEMO second line\nVU-DEMO-PASS n\n";
        assert_eq!(demo_lines(console), ["first", "second line"]);
    }

    #[test]
    fn demo_passes_only_with_its_nonce_and_the_file_in_the_image() {
        let dir = std::env::temp_dir().join(format!("vu-e2e-test-{:x}", fresh_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        let mut bytes = vec![0u8; 8192];
        let text = demo_file_text("n1");
        bytes[4096..4096 + text.len()].copy_from_slice(text.as_bytes());
        std::fs::write(&image, &bytes).unwrap();
        assert!(judge_demo("VU-DEMO-PASS n1\n", "n1", &image).is_ok());
        let stale = judge_demo("VU-DEMO-PASS n0\n", "n0", &image).unwrap_err();
        assert_eq!(stale.class, Class::WrongAnswer);
        assert!(stale.reason.contains("does not hold"), "{stale}");
        let no_pass = judge_demo("VU-DEMO-PASS n0\n", "n1", &image).unwrap_err();
        assert!(no_pass.reason.contains("nonce"), "{no_pass}");
        let failed =
            judge_demo("VU-E2E-FAIL demo mount\nVU-DEMO-PASS n1\n", "n1", &image).unwrap_err();
        assert!(failed.reason.contains("mount"), "{failed}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
