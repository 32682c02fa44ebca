//! `cargo xtask deps`: the system packages the gate needs.
//!
//! The list is data ([`SYSTEM_DEPS`]): a later test that boots QEMU adds a row with its probe
//! and its Debian package. A missing package is installed when that can be done without asking
//! anyone (Debian, running as root, as in a fresh CI container); otherwise the step fails and
//! prints the exact command to run.

use std::path::Path;

use crate::cmd::Cmd;
use crate::{Options, StepResult};

/// How to tell whether a dependency is present.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Probe {
    /// A program on `PATH`.
    Program(&'static str),
    /// libclang, which `bindgen` loads at build time (it is not libclang-cpp).
    Libclang,
}

/// One thing the gate needs from the system.
#[derive(Debug)]
pub(crate) struct SystemDep {
    /// What needs it, for the message when it is missing.
    pub(crate) why: &'static str,
    pub(crate) probe: Probe,
    /// The Debian package that provides it.
    pub(crate) debian: &'static str,
}

/// Everything the gate needs from the system.
pub(crate) const SYSTEM_DEPS: &[SystemDep] = &[
    SystemDep {
        why: "the C compiler and linker rustc uses, and cc in build scripts",
        probe: Probe::Program("gcc"),
        debian: "gcc",
    },
    SystemDep {
        why: "the `userfaultfd-sys` build script runs bindgen, which loads libclang (feature `postcopy`)",
        probe: Probe::Libclang,
        debian: "libclang-dev",
    },
];

/// Is `program` an executable file in one of the `PATH` directories?
pub(crate) fn program_on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Is `file_name` a libclang shared library, the one clang-sys looks for: `libclang.so*` or
/// `libclang-<version>.so*`, but not `libclang-cpp.so*`?
pub(crate) fn is_libclang(file_name: &str) -> bool {
    if file_name.starts_with("libclang.so") {
        return true;
    }
    match file_name.strip_prefix("libclang-") {
        Some(rest) => rest.starts_with(|c: char| c.is_ascii_digit()) && rest.contains(".so"),
        None => false,
    }
}

/// Does a directory hold a libclang shared library?
fn dir_has_libclang(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|entry| is_libclang(&entry.file_name().to_string_lossy()))
        })
        .unwrap_or(false)
}

/// Does the output of `ldconfig -p` list a libclang?
pub(crate) fn ldconfig_lists_libclang(listing: &str) -> bool {
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(is_libclang)
}

/// Looks where clang-sys looks: `$LIBCLANG_PATH`, the linker cache, and /usr/lib/llvm-*/lib.
fn libclang_present() -> bool {
    if let Some(dir) = std::env::var_os("LIBCLANG_PATH") {
        if dir_has_libclang(Path::new(&dir)) {
            return true;
        }
    }
    let ldconfig = ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"]
        .iter()
        .find_map(|program| Cmd::new(program).args(&["-p"]).capture_quietly().ok());
    if ldconfig.is_some_and(|listing| ldconfig_lists_libclang(&listing.stdout)) {
        return true;
    }
    std::fs::read_dir("/usr/lib")
        .map(|entries| {
            entries.flatten().any(|entry| {
                entry.file_name().to_string_lossy().starts_with("llvm-")
                    && dir_has_libclang(&entry.path().join("lib"))
            })
        })
        .unwrap_or(false)
}

fn present(probe: Probe) -> bool {
    match probe {
        Probe::Program(program) => program_on_path(program),
        Probe::Libclang => libclang_present(),
    }
}

/// The effective user id is 0 (read from /proc so that no libc binding is needed).
pub(crate) fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The two apt-get commands that install `packages`.
fn apt_commands(packages: &[&str]) -> [Cmd; 2] {
    [
        Cmd::new("apt-get").args(&["update"]),
        Cmd::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(&["install", "-y", "--no-install-recommends"])
            .args(packages),
    ]
}

/// Checks every dependency and installs the missing ones when it may.
pub(crate) fn run(_options: &Options) -> StepResult {
    let missing: Vec<&SystemDep> = SYSTEM_DEPS
        .iter()
        .filter(|dep| !present(dep.probe))
        .collect();
    for dep in SYSTEM_DEPS {
        let state = if missing.iter().any(|m| std::ptr::eq(*m, dep)) {
            "missing"
        } else {
            "found"
        };
        eprintln!("    {:<14} {state:<8} ({})", dep.debian, dep.why);
    }
    if missing.is_empty() {
        return dpdk_ready();
    }
    let packages: Vec<&str> = missing.iter().map(|dep| dep.debian).collect();
    install_missing(
        &packages,
        "this is not a Debian system: install the equivalent packages",
        || {
            missing
                .iter()
                .filter(|dep| !present(dep.probe))
                .map(|dep| dep.debian)
                .collect()
        },
    )?;
    dpdk_ready()
}

/// DPDK's testpmd and hugepages for the `dpdk` step (installed and reserved when we may).
fn dpdk_ready() -> StepResult {
    crate::dpdk::ensure_packages()?;
    crate::dpdk::ensure_hugepages(crate::dpdk::HUGEPAGES)
}

/// Installs the `missing` Debian packages when that needs nobody's say: apt-get is there and
/// we are root (as in a fresh CI container). Otherwise fails naming them, followed by
/// `not_debian` when there is no apt-get, or by the exact `sudo` commands to run. After
/// installing, `still_missing` lists what is still absent; anything there is an error.
pub(crate) fn install_missing(
    missing: &[&str],
    not_debian: &str,
    still_missing: impl FnOnce() -> Vec<&'static str>,
) -> StepResult {
    let commands = apt_commands(missing);
    if !program_on_path("apt-get") {
        return Err(format!("missing {}; {not_debian}", missing.join(", ")));
    }
    if !running_as_root() {
        let sudo: Vec<String> = commands
            .iter()
            .map(|cmd| format!("sudo {}", cmd.display()))
            .collect();
        return Err(format!(
            "missing {}; run: {}",
            missing.join(", "),
            sudo.join(" && ")
        ));
    }
    for cmd in &commands {
        cmd.run()?;
    }
    let still = still_missing();
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "still missing after installing: {}",
            still.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libclang_names_are_recognised() {
        assert!(is_libclang("libclang.so"));
        assert!(is_libclang("libclang.so.1"));
        assert!(is_libclang("libclang-14.so.1"));
        assert!(is_libclang("libclang-14.0.6.so"));
    }

    #[test]
    fn libclang_cpp_is_not_libclang() {
        assert!(!is_libclang("libclang-cpp.so.14"));
        assert!(!is_libclang("libclang-cpp.so"));
        assert!(!is_libclang("libclangBasic.a"));
    }

    #[test]
    fn ldconfig_listing_with_only_libclang_cpp_has_no_libclang() {
        let listing = "1 libs found in cache `/etc/ld.so.cache'\n\
                       \tlibclang-cpp.so.14 (libc6,x86-64) => /lib/x86_64-linux-gnu/libclang-cpp.so.14\n";
        assert!(!ldconfig_lists_libclang(listing));
    }

    #[test]
    fn ldconfig_listing_with_libclang_has_libclang() {
        let listing =
            "\tlibclang-14.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libclang-14.so.1\n";
        assert!(ldconfig_lists_libclang(listing));
    }

    #[test]
    fn apt_install_is_noninteractive_and_minimal() {
        let [update, install] = apt_commands(&["libclang-dev"]);
        assert_eq!(update.display(), "apt-get update");
        assert_eq!(
            install.display(),
            "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libclang-dev"
        );
    }

    #[test]
    fn every_dependency_names_a_debian_package() {
        for dep in SYSTEM_DEPS {
            assert!(!dep.debian.is_empty() && !dep.why.is_empty());
        }
        assert!(SYSTEM_DEPS.iter().any(|dep| dep.debian == "libclang-dev"));
    }
}
