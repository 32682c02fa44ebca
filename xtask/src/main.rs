//! `cargo xtask`: the vu workspace's automation, std only.
//!
//! `cargo xtask ci` is the one CI gate and the command the README gives for running the tests.
//! It runs every step below in order, keeps going after a failure so that the summary table is
//! complete, and exits non-zero if any step failed. Each step can also be run on its own
//! (`cargo xtask lint`, ...). Every step echoes the exact command it runs, so a failure can be
//! reproduced by copying that line. docs/TESTING.md describes what each step checks.

mod bench;
mod ci;
mod cmd;
mod conformance;
mod deps;
mod doc;
mod dpdk;
mod e2e;
mod features;
mod fmt;
mod fuzz;
mod handlers;
mod lint;
mod package;
mod size;
mod test;
mod tidy;

use std::path::PathBuf;
use std::process::ExitCode;

/// What a step returns: `Err` carries a one-line reason for the summary.
pub(crate) type StepResult = Result<(), String>;

/// Options shared by all steps.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    /// Pass `--allow-dirty` to `cargo package` (local runs with uncommitted edits; never in CI).
    pub(crate) allow_dirty: bool,
}

/// One step of the gate: its name on the command line, what it checks, and its body.
pub(crate) struct Step {
    pub(crate) name: &'static str,
    pub(crate) about: &'static str,
    pub(crate) run: fn(&Options) -> StepResult,
}

/// The steps of `cargo xtask ci`, in the order it runs them.
pub(crate) const STEPS: &[Step] = &[
    Step {
        name: "deps",
        about: "check (and on Debian as root, install) the system packages the gate needs",
        run: deps::run,
    },
    Step {
        name: "fmt",
        about: "cargo fmt --all -- --check",
        run: fmt::run,
    },
    Step {
        name: "lint",
        about: "clippy -D warnings on the workspace and on each crate per feature set",
        run: lint::run,
    },
    Step {
        name: "features",
        about: "build and test each crate alone per feature set; xen+postcopy must not compile",
        run: features::run,
    },
    Step {
        name: "test",
        about: "cargo test --workspace",
        run: test::run,
    },
    Step {
        name: "doc",
        about: "rustdoc with -D warnings",
        run: doc::run,
    },
    Step {
        name: "package",
        about: "cargo package (with verification) of every publishable crate",
        run: package::run,
    },
    Step {
        name: "tidy",
        about:
            "review rules as checks: SAFETY comments, no #[ignore], no sleeps, dependency allowlist",
        run: tidy::run,
    },
    Step {
        name: "dpdk",
        about: "DPDK's testpmd (virtio-user) drives vu_net --loopback, 1 and 2 queue pairs; \
                every packet must come back intact",
        run: dpdk::run,
    },
    Step {
        name: "e2e",
        about: "Linux guests in QEMU use vu_blk (1, 2 queues) and vu_rng 10 times each, \
                qemu-storage-daemon's blk 3 times",
        run: e2e::ci_step,
    },
];

/// The workspace root: the parent of this package's directory.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

fn help() -> String {
    let mut text = String::from(
        "usage: cargo xtask <task> [--allow-dirty]\n\n\
         tasks:\n  ci        run every step below, print a summary, fail if any step failed\n",
    );
    for step in STEPS {
        text.push_str(&format!("  {:<9} {}\n", step.name, step.about));
    }
    text.push_str(
        "  demo      a guest makes a filesystem on a vu_blk disk; --shell for a shell (--help)\n  \
         bench     data-path benchmark against rust-vmm (cargo xtask bench --help)\n  \
         fuzz      run the cargo-fuzz targets for a bounded time (cargo xtask fuzz --help)\n  \
         help      this text\n\n\
         options:\n  --allow-dirty   let `package` run with uncommitted changes (local use only)\n\n\
         See docs/TESTING.md.\n",
    );
    text
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `e2e` and `demo` have options of their own (docs/e2e.md); `ci`'s e2e step and
    // `cargo xtask e2e` without options differ only in the qemu-storage-daemon run.
    if let Some(task @ ("e2e" | "demo")) = args.first().map(String::as_str) {
        if let Err(err) = std::env::set_current_dir(workspace_root()) {
            eprintln!("xtask: cannot enter the workspace root: {err}");
            return ExitCode::FAILURE;
        }
        return match task {
            "e2e" => e2e::main(&args[1..]),
            _ => e2e::demo(&args[1..]),
        };
    }
    // `bench` measures; timings never gate `ci`.
    if args.first().map(String::as_str) == Some("bench") {
        if let Err(err) = std::env::set_current_dir(workspace_root()) {
            eprintln!("xtask: cannot enter the workspace root: {err}");
            return ExitCode::FAILURE;
        }
        return bench::main(&args[1..]);
    }
    // `fuzz` needs nightly and runs for a bounded time; it is not a `ci` step.
    if args.first().map(String::as_str) == Some("fuzz") {
        if let Err(err) = std::env::set_current_dir(workspace_root()) {
            eprintln!("xtask: cannot enter the workspace root: {err}");
            return ExitCode::FAILURE;
        }
        return fuzz::main(&args[1..]);
    }
    let mut options = Options::default();
    let mut task = None;
    for arg in &args {
        match arg.as_str() {
            "--allow-dirty" => options.allow_dirty = true,
            "-h" | "--help" => task = Some("help"),
            other if task.is_none() && !other.starts_with('-') => task = Some(other),
            other => {
                eprintln!("xtask: unexpected argument `{other}`\n\n{}", help());
                return ExitCode::from(2);
            }
        }
    }
    let task = task.unwrap_or("help");
    if let Err(err) = std::env::set_current_dir(workspace_root()) {
        eprintln!("xtask: cannot enter the workspace root: {err}");
        return ExitCode::FAILURE;
    }
    match task {
        "help" => {
            print!("{}", help());
            ExitCode::SUCCESS
        }
        "ci" => ci::run(&options),
        name => match STEPS.iter().find(|step| step.name == name) {
            Some(step) => match (step.run)(&options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(reason) => {
                    eprintln!("xtask {name}: FAILED: {reason}");
                    ExitCode::FAILURE
                }
            },
            None => {
                eprintln!("xtask: unknown task `{name}`\n\n{}", help());
                ExitCode::from(2)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_are_unique() {
        for (i, a) in STEPS.iter().enumerate() {
            for b in &STEPS[i + 1..] {
                assert_ne!(a.name, b.name);
            }
        }
    }

    #[test]
    fn ci_runs_steps_in_the_documented_order() {
        let names: Vec<&str> = STEPS.iter().map(|step| step.name).collect();
        assert_eq!(
            names,
            ["deps", "fmt", "lint", "features", "test", "doc", "package", "tidy", "dpdk", "e2e"]
        );
    }

    #[test]
    fn help_lists_every_step() {
        let text = help();
        for step in STEPS {
            assert!(text.contains(step.name), "{}", step.name);
        }
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }
}
