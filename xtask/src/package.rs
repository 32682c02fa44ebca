//! `cargo xtask package`: each publishable crate stands on its own as a published tarball.
//!
//! One `cargo package` invocation packages all five crates. Cargo orders them by their
//! dependencies and resolves the path dependencies between them through a temporary local
//! registry holding the tarballs it has just built, so nothing has to be on crates.io yet.
//! Verification is kept: cargo unpacks each tarball and compiles it, which proves that the
//! files listed in the tarball are enough and that the manifest's `version` requirements on the
//! sibling crates resolve. It reuses the workspace's target directory for the external
//! dependencies, so it costs one extra compile of our own crates.
//!
//! Cargo unpacks the tarballs of that temporary registry under `$CARGO_HOME/registry/src/`, in
//! a directory named after the registry's path, and reuses an unpacked crate of the same name
//! and version without looking at it again. A second run from the same checkout path (a CI
//! machine that is reused, a developer's tree) would therefore verify against the sources of
//! the first run. Before packaging, the step removes our crates' unpacked copies from every
//! registry that is not crates.io; nothing else is touched.

use std::path::{Path, PathBuf};

use crate::cmd::Cmd;
use crate::{Options, StepResult};

/// The publishable crates, dependencies first.
pub(crate) const PUBLISHABLE: &[&str] =
    &["vu-proto", "vu-mem", "vu-vring", "vu-daemon", "vu-backend"];

/// The `cargo package` command. `--allow-dirty` is only passed when asked for: CI packages a
/// clean clone, and a tarball of uncommitted files is not what would be published.
pub(crate) fn command(options: &Options) -> Cmd {
    let mut cmd = Cmd::cargo(&["package"]);
    for krate in PUBLISHABLE {
        cmd = cmd.args(&["-p", krate]);
    }
    if options.allow_dirty {
        cmd = cmd.args(&["--allow-dirty"]);
    }
    cmd
}

/// Packages and verifies every publishable crate.
pub(crate) fn run(options: &Options) -> StepResult {
    if let Some(home) = cargo_home() {
        for stale in stale_unpacked(&home.join("registry").join("src")) {
            println!("    removing a stale unpacked copy: {}", stale.display());
            if let Err(err) = std::fs::remove_dir_all(&stale) {
                return Err(format!("cannot remove {}: {err}", stale.display()));
            }
        }
    }
    command(options).run()
}

/// `$CARGO_HOME`, or `~/.cargo`.
fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
}

/// Our crates unpacked from earlier temporary registries: `<src>/<registry>/<crate>-<version>`
/// where the registry is not crates.io (its directory is named `index.crates.io-…`).
fn stale_unpacked(src: &Path) -> Vec<PathBuf> {
    let Ok(registries) = std::fs::read_dir(src) else {
        return Vec::new();
    };
    let mut stale = Vec::new();
    for registry in registries.flatten() {
        if registry
            .file_name()
            .to_string_lossy()
            .starts_with("index.crates.io")
        {
            continue;
        }
        let Ok(crates) = std::fs::read_dir(registry.path()) else {
            continue;
        };
        for unpacked in crates.flatten() {
            let name = unpacked.file_name().to_string_lossy().into_owned();
            let ours = PUBLISHABLE.iter().any(|krate| {
                name.strip_prefix(krate)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|version| version.starts_with(|c: char| c.is_ascii_digit()))
            });
            if ours {
                stale.push(unpacked.path());
            }
        }
    }
    stale.sort();
    stale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::FEATURE_MATRIX;

    #[test]
    fn every_crate_of_the_feature_matrix_is_packaged() {
        let matrix: Vec<&str> = FEATURE_MATRIX.iter().map(|entry| entry.krate).collect();
        assert_eq!(matrix, PUBLISHABLE);
    }

    #[test]
    fn package_does_not_allow_a_dirty_tree_by_default() {
        assert_eq!(
            command(&Options::default()).display(),
            "cargo package -p vu-proto -p vu-mem -p vu-vring -p vu-daemon -p vu-backend"
        );
    }

    #[test]
    fn stale_copies_of_our_crates_in_local_registries_are_found() {
        let root = std::env::temp_dir().join(format!("xtask-stale-{}", std::process::id()));
        let make = |dir: &str| std::fs::create_dir_all(root.join(dir)).unwrap();
        make("-3c952b8216f1a219/vu-proto-0.1.0");
        make("-3c952b8216f1a219/vu-daemon-0.1.0");
        make("-3c952b8216f1a219/vu-protocol-0.1.0");
        make("-3c952b8216f1a219/libc-0.2.1");
        make("index.crates.io-1949cf8c6b5b557f/vu-proto-0.1.0");
        let found = stale_unpacked(&root);
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            found,
            vec![
                root.join("-3c952b8216f1a219/vu-daemon-0.1.0"),
                root.join("-3c952b8216f1a219/vu-proto-0.1.0"),
            ]
        );
    }

    #[test]
    fn package_passes_allow_dirty_when_asked() {
        let options = Options { allow_dirty: true };
        assert!(command(&options).display().ends_with(" --allow-dirty"));
    }
}
