//! `cargo xtask features`: each crate builds and passes its tests on its own with each of its
//! feature sets, and the features that exclude each other really do.
//!
//! Every command selects one crate with `-p`, so cargo resolves features for that crate alone:
//! a crate that only compiles because a sibling in the workspace happens to enable a feature of
//! a shared dependency fails here, as it would for a user who depends on it alone.

use crate::cmd::{Captured, Cmd};
use crate::{Options, StepResult};

/// The feature sets of one crate; `""` is `--no-default-features` with nothing added.
#[derive(Debug)]
pub(crate) struct CrateFeatures {
    pub(crate) krate: &'static str,
    pub(crate) sets: &'static [&'static str],
}

/// Every publishable crate and the feature sets it must build and pass its tests with.
pub(crate) const FEATURE_MATRIX: &[CrateFeatures] = &[
    CrateFeatures {
        krate: "vu-proto",
        sets: &["", "xen"],
    },
    CrateFeatures {
        krate: "vu-mem",
        sets: &["", "xen"],
    },
    CrateFeatures {
        krate: "vu-vring",
        sets: &["", "xen"],
    },
    CrateFeatures {
        krate: "vu-daemon",
        sets: &["", "xen", "postcopy"],
    },
    CrateFeatures {
        krate: "vu-backend",
        sets: &["", "xen", "postcopy", "testing"],
    },
];

/// Crates and feature combinations that must fail to compile with the `compile_error!` below.
pub(crate) const EXCLUSIVE: &[(&str, &str)] = &[
    ("vu-daemon", "xen,postcopy"),
    ("vu-backend", "xen,postcopy"),
];

/// The text of the `compile_error!` that rejects `xen` together with `postcopy`.
pub(crate) const EXCLUSIVE_MESSAGE: &str =
    "the `xen` and `postcopy` features are mutually exclusive";

/// The arguments selecting one crate alone with one feature set.
fn selection<'a>(krate: &'a str, set: &'a str) -> Vec<&'a str> {
    let mut args = vec!["-p", krate, "--no-default-features"];
    if !set.is_empty() {
        args.extend(["--features", set]);
    }
    args
}

/// The `cargo test` command for one crate and feature set.
pub(crate) fn test_command(krate: &str, set: &str) -> Cmd {
    Cmd::cargo(&["test"]).args(&selection(krate, set))
}

/// The `cargo check` command that must fail for an exclusive combination.
pub(crate) fn exclusive_command(krate: &str, set: &str) -> Cmd {
    Cmd::cargo(&["check"]).args(&selection(krate, set))
}

/// Judges the captured result of an [`exclusive_command`]: it must fail, and fail because of
/// the `compile_error!`; failing for any other reason (a missing system library, a type error)
/// proves nothing about the exclusion and is a failure of its own.
pub(crate) fn judge_exclusive(krate: &str, set: &str, captured: &Captured) -> StepResult {
    if captured.success {
        Err(format!(
            "{krate} compiled with `{set}` although those features are mutually exclusive"
        ))
    } else if captured.stderr.contains(EXCLUSIVE_MESSAGE) {
        Ok(())
    } else {
        Err(format!(
            "{krate} with `{set}` failed to compile, but not with the compile_error! `{EXCLUSIVE_MESSAGE}`"
        ))
    }
}

/// Runs the whole matrix, then the exclusivity checks; every command runs even after a failure.
pub(crate) fn run(_options: &Options) -> StepResult {
    let mut failures = Vec::new();
    for entry in FEATURE_MATRIX {
        for set in entry.sets {
            if let Err(reason) = test_command(entry.krate, set).run() {
                failures.push(reason);
            }
        }
    }
    for (krate, set) in EXCLUSIVE {
        let verdict = exclusive_command(krate, set)
            .capture()
            .and_then(|captured| {
                let verdict = judge_exclusive(krate, set, &captured);
                if verdict.is_err() {
                    eprint!("{}", captured.stderr);
                }
                verdict
            });
        match verdict {
            Ok(()) => eprintln!(
                "    {krate} with `{set}` is rejected by its compile_error!, as it must be"
            ),
            Err(reason) => {
                eprintln!("    {reason}");
                failures.push(reason);
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(success: bool, stderr: &str) -> Captured {
        Captured {
            success,
            stdout: String::new(),
            stderr: stderr.to_owned(),
        }
    }

    #[test]
    fn matrix_covers_every_publishable_crate_once() {
        let crates: Vec<&str> = FEATURE_MATRIX.iter().map(|entry| entry.krate).collect();
        assert_eq!(
            crates,
            ["vu-proto", "vu-mem", "vu-vring", "vu-daemon", "vu-backend"]
        );
    }

    #[test]
    fn every_crate_is_tested_without_features_first() {
        for entry in FEATURE_MATRIX {
            assert_eq!(entry.sets.first(), Some(&""), "{}", entry.krate);
        }
    }

    #[test]
    fn daemon_and_backend_are_tested_with_postcopy_and_xen() {
        for krate in ["vu-daemon", "vu-backend"] {
            let entry = FEATURE_MATRIX
                .iter()
                .find(|entry| entry.krate == krate)
                .unwrap();
            assert_eq!(&entry.sets[..3], ["", "xen", "postcopy"]);
        }
    }

    #[test]
    fn exclusive_combinations_are_never_in_the_matrix() {
        for (krate, set) in EXCLUSIVE {
            let entry = FEATURE_MATRIX
                .iter()
                .find(|entry| entry.krate == *krate)
                .unwrap();
            assert!(!entry.sets.contains(set));
        }
    }

    #[test]
    fn test_command_selects_one_crate_without_default_features() {
        assert_eq!(
            test_command("vu-mem", "xen").display(),
            "cargo test -p vu-mem --no-default-features --features xen"
        );
        assert_eq!(
            test_command("vu-mem", "").display(),
            "cargo test -p vu-mem --no-default-features"
        );
    }

    #[test]
    fn exclusive_check_passes_on_the_compile_error() {
        let stderr =
            "error: the `xen` and `postcopy` features are mutually exclusive: Xen mappings \
                      cannot be registered with userfaultfd\n";
        assert_eq!(
            judge_exclusive("vu-daemon", "xen,postcopy", &captured(false, stderr)),
            Ok(())
        );
    }

    #[test]
    fn exclusive_check_fails_when_the_build_succeeds() {
        assert!(judge_exclusive("vu-daemon", "xen,postcopy", &captured(true, "")).is_err());
    }

    #[test]
    fn exclusive_check_fails_when_the_build_fails_for_another_reason() {
        let stderr = "error: failed to run custom build command for `userfaultfd-sys v0.5.0`\n\
                      Unable to find libclang\n";
        assert!(judge_exclusive("vu-daemon", "xen,postcopy", &captured(false, stderr)).is_err());
    }
}
