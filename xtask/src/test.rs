//! `cargo xtask test`: every test of the workspace with default features.

use crate::cmd::Cmd;
use crate::{Options, StepResult};

/// Runs unit, integration and doc tests of every workspace member, xtask included.
pub(crate) fn run(_options: &Options) -> StepResult {
    Cmd::cargo(&["test", "--workspace"]).run()
}
