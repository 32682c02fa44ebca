//! `cargo xtask doc`: the documentation builds without a single rustdoc warning.

use crate::cmd::Cmd;
use crate::{Options, StepResult};

/// Documents every library of the workspace with warnings denied. xtask is a binary with no
/// API, so it is left out.
pub(crate) fn run(_options: &Options) -> StepResult {
    Cmd::cargo(&["doc", "--workspace", "--no-deps", "--exclude", "xtask"])
        .env("RUSTDOCFLAGS", "-D warnings")
        .run()
}
