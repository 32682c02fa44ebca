//! `cargo xtask package`: each publishable crate stands on its own as a published tarball.
//!
//! One `cargo package` invocation packages all five crates. Cargo orders them by their
//! dependencies and resolves the path dependencies between them through a temporary local
//! registry holding the tarballs it has just built, so nothing has to be on crates.io yet.
//! Verification is kept: cargo unpacks each tarball and compiles it, which proves that the
//! files listed in the tarball are enough and that the manifest's `version` requirements on the
//! sibling crates resolve. It reuses the workspace's target directory for the external
//! dependencies, so it costs one extra compile of our own crates.

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
    command(options).run()
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
    fn package_passes_allow_dirty_when_asked() {
        let options = Options { allow_dirty: true };
        assert!(command(&options).display().ends_with(" --allow-dirty"));
    }
}
