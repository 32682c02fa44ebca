//! What the e2e run needs from the system, and the guest kernel cache.
//!
//! Packages come from apt (Debian stable's QEMU 7.2, busybox-static); they are installed when
//! the xtask runs as root on Debian, otherwise the step stops with the exact command. The
//! kernel is not installed: its package is downloaded and unpacked into target/e2e/kernel, so
//! that no initramfs tooling or systemd upgrade comes along.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::elf;
use crate::cmd::Cmd;
use crate::deps::{self, program_on_path, running_as_root};

/// The static busybox that busybox-static installs.
pub(crate) const BUSYBOX: &str = "/bin/busybox";
/// The metapackage whose dependency names the current versioned cloud kernel package.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// One package the e2e run needs, and how to see that it is there.
#[derive(Debug)]
struct Need {
    /// Debian package.
    package: &'static str,
    /// Present when this holds.
    present: fn() -> bool,
    why: &'static str,
}

fn busybox_is_static() -> bool {
    std::fs::read(BUSYBOX)
        .ok()
        .and_then(|bytes| elf::has_interpreter(&bytes).ok())
        .is_some_and(|dynamic| !dynamic)
}

/// Everything the run needs; `qsd` adds qemu-storage-daemon, which bookworm ships in
/// qemu-system-common (a dependency of qemu-system-x86; from QEMU 8 on it is in qemu-utils);
/// `net` adds `ip` (network namespaces and the tap).
fn needs(qsd: bool, net: bool) -> Vec<Need> {
    let mut list = vec![
        Need {
            package: "qemu-system-x86",
            present: || program_on_path("qemu-system-x86_64"),
            why: "qemu-system-x86_64 boots the guest",
        },
        Need {
            package: "busybox-static",
            present: busybox_is_static,
            why: "a static /bin/busybox is the guest's whole userland",
        },
    ];
    if qsd {
        list.push(Need {
            package: "qemu-system-common",
            present: || program_on_path("qemu-storage-daemon"),
            why: "qemu-storage-daemon serves the reference vhost-user-blk export",
        });
    }
    if net {
        list.push(Need {
            package: "iproute2",
            present: || program_on_path("ip"),
            why: "`ip` makes the network namespace and the tap of the net boots",
        });
    }
    list
}

/// Checks the packages and installs the missing ones when it may.
pub(crate) fn ensure_packages(qsd: bool, net: bool) -> Result<(), String> {
    let needs = needs(qsd, net);
    let missing: Vec<&Need> = needs.iter().filter(|need| !(need.present)()).collect();
    for need in &needs {
        let state = if (need.present)() { "found" } else { "missing" };
        eprintln!("    {:<18} {state:<8} ({})", need.package, need.why);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|need| need.package).collect();
    deps::install_missing(
        &packages,
        "this is not Debian: install QEMU (with vhost-user), a static busybox and a kernel by \
         hand",
        || {
            needs
                .iter()
                .filter(|need| !(need.present)())
                .map(|need| need.package)
                .collect()
        },
    )
}

/// The first line of `program --version`, for the report.
pub(crate) fn version_line(program: &str) -> String {
    Cmd::new(program)
        .args(&["--version"])
        .capture_quietly()
        .ok()
        .and_then(|out| out.stdout.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{program}: version unknown"))
}

/// An unpacked guest kernel.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// The Debian package it came from.
    pub(crate) package: String,
    pub(crate) vmlinuz: PathBuf,
    /// lib/modules/<release>.
    pub(crate) modules: PathBuf,
}

/// The versioned package `apt-cache depends linux-image-cloud-amd64` names.
pub(crate) fn versioned_kernel_package(depends_output: &str) -> Option<String> {
    depends_output
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|package| package.starts_with("linux-image-") && package != &KERNEL_META)
        .map(str::to_owned)
}

/// The kernel and module tree unpacked in `dir`, if complete.
fn unpacked(package: &str, dir: &Path) -> Option<Kernel> {
    let first_entry = |sub: &Path, prefix: &str| -> Option<PathBuf> {
        std::fs::read_dir(sub)
            .ok()?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
    };
    let vmlinuz = first_entry(&dir.join("boot"), "vmlinuz-")?;
    let modules = first_entry(&dir.join("lib/modules"), "")?;
    Some(Kernel {
        package: package.to_owned(),
        vmlinuz,
        modules,
    })
}

/// The guest kernel: the current versioned cloud kernel package, downloaded and unpacked into
/// `cache` once. Without apt (offline), the newest kernel already in the cache.
///
/// A fresh container has no package lists, and old lists name a kernel the mirror no longer
/// holds: either way the first attempt fails, and as root the lists are refreshed
/// (`apt-get update`) and the kernel looked up again; otherwise the error says to do that.
pub(crate) fn kernel(cache: &Path) -> Result<Kernel, String> {
    match kernel_from_lists(cache) {
        Ok(kernel) => Ok(kernel),
        Err(err) if program_on_path("apt-get") && running_as_root() => {
            eprintln!("    {err}; refreshing the package lists");
            Cmd::new("apt-get").args(&["update"]).run()?;
            kernel_from_lists(cache)
        }
        Err(err) if program_on_path("apt-get") => Err(format!(
            "{err}; refresh the package lists with `sudo apt-get update` and run again"
        )),
        Err(err) => Err(err),
    }
}

/// One attempt of [`kernel`] with the package lists as they are.
fn kernel_from_lists(cache: &Path) -> Result<Kernel, String> {
    let depends = Cmd::new("apt-cache")
        .args(&["depends", KERNEL_META])
        .capture_quietly()
        .ok()
        .filter(|out| out.success)
        .and_then(|out| versioned_kernel_package(&out.stdout));
    let Some(package) = depends else {
        let mut cached: Vec<PathBuf> = std::fs::read_dir(cache)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        cached.sort();
        return cached
            .iter()
            .rev()
            .find_map(|dir| {
                let name = dir.file_name()?.to_string_lossy().into_owned();
                unpacked(&name, dir)
            })
            .ok_or_else(|| {
                format!(
                    "`apt-cache depends {KERNEL_META}` names no kernel package and {} holds none",
                    cache.display()
                )
            });
    };
    let dir = cache.join(&package);
    if let Some(kernel) = unpacked(&package, &dir) {
        return Ok(kernel);
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)
        .map_err(|err| format!("cannot create {}: {err}", debs.display()))?;
    eprintln!("$ (cd {} && apt-get download {package})", debs.display());
    let status = Command::new("apt-get")
        .args(["download", &package])
        .current_dir(&debs)
        .status()
        .map_err(|err| format!("cannot run apt-get download: {err}"))?;
    if !status.success() {
        return Err(format!("`apt-get download {package}` failed"));
    }
    let deb = std::fs::read_dir(&debs)
        .map_err(|err| format!("cannot list {}: {err}", debs.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
            })
        })
        .ok_or_else(|| format!("apt-get download left no {package}_*.deb"))?;
    let partial = cache.join(format!("{package}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    Cmd::new("dpkg-deb")
        .args(&["-x", &deb.to_string_lossy(), &partial.to_string_lossy()])
        .run()?;
    std::fs::rename(&partial, &dir)
        .map_err(|err| format!("cannot rename into {}: {err}", dir.display()))?;
    let _ = std::fs::remove_file(&deb);
    unpacked(&package, &dir)
        .ok_or_else(|| format!("{package} holds no boot/vmlinuz-* and lib/modules/*"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_package_is_read_from_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            versioned_kernel_package(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
    }

    #[test]
    fn no_depends_line_means_no_package() {
        assert_eq!(versioned_kernel_package("linux-image-cloud-amd64\n"), None);
    }

    #[test]
    fn qsd_adds_the_package_that_ships_qemu_storage_daemon() {
        assert!(!needs(false, false)
            .iter()
            .any(|n| n.package == "qemu-system-common"));
        assert!(needs(true, false)
            .iter()
            .any(|n| n.package == "qemu-system-common"));
    }

    #[test]
    fn net_adds_iproute2() {
        assert!(!needs(false, false).iter().any(|n| n.package == "iproute2"));
        assert!(needs(false, true).iter().any(|n| n.package == "iproute2"));
    }
}
