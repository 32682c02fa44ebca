//! `cargo xtask fmt`: the whole workspace is rustfmt-clean.

use crate::cmd::Cmd;
use crate::{Options, StepResult};

/// Checks formatting without rewriting anything.
pub(crate) fn run(_options: &Options) -> StepResult {
    Cmd::cargo(&["fmt", "--all", "--", "--check"]).run()
}
