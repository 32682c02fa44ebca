//! `cargo xtask lint`: clippy with warnings denied, on the workspace and per feature set.

use crate::cmd::{run_all, Cmd};
use crate::features::FEATURE_MATRIX;
use crate::{Options, StepResult};

/// The clippy command lines: the whole workspace with default features, then each crate alone
/// with each of its non-empty feature sets (the default set is already covered by the first).
pub(crate) fn commands() -> Vec<Cmd> {
    let mut cmds = vec![Cmd::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])];
    for entry in FEATURE_MATRIX {
        for set in entry.sets.iter().filter(|set| !set.is_empty()) {
            cmds.push(Cmd::cargo(&[
                "clippy",
                "-p",
                entry.krate,
                "--all-targets",
                "--no-default-features",
                "--features",
                set,
                "--",
                "-D",
                "warnings",
            ]));
        }
    }
    cmds
}

/// Runs every clippy command, all of them even after a failure.
pub(crate) fn run(_options: &Options) -> StepResult {
    run_all(&commands())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_starts_with_the_workspace_and_covers_each_feature_set() {
        let lines: Vec<String> = commands().iter().map(Cmd::display).collect();
        assert_eq!(
            lines[0],
            "cargo clippy --workspace --all-targets -- -D warnings"
        );
        assert!(lines.contains(
            &"cargo clippy -p vu-daemon --all-targets --no-default-features --features postcopy -- -D warnings"
                .to_owned()
        ));
        let per_set: usize = FEATURE_MATRIX
            .iter()
            .map(|entry| entry.sets.iter().filter(|set| !set.is_empty()).count())
            .sum();
        assert_eq!(lines.len(), 1 + per_set);
    }
}
