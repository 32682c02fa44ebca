//! `cargo xtask ci`: every step in order, a summary table, non-zero exit on any failure.

use std::process::ExitCode;
use std::time::Instant;

use crate::{Options, STEPS};

/// How one step of a `ci` run ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) step: &'static str,
    pub(crate) error: Option<String>,
    pub(crate) seconds: f64,
}

/// Runs every step, even after a failure, so the summary says how each one fared.
pub(crate) fn run(options: &Options) -> ExitCode {
    let start = Instant::now();
    let mut outcomes = Vec::new();
    for step in STEPS {
        eprintln!("\n==> xtask {}: {}", step.name, step.about);
        let step_start = Instant::now();
        let result = (step.run)(options);
        let seconds = step_start.elapsed().as_secs_f64();
        if let Err(reason) = &result {
            eprintln!("==> xtask {}: FAILED: {reason}", step.name);
        }
        outcomes.push(Outcome {
            step: step.name,
            error: result.err(),
            seconds,
        });
    }
    print!("\n{}", summary(&outcomes, start.elapsed().as_secs_f64()));
    if outcomes.iter().all(|outcome| outcome.error.is_none()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The summary table: one row per step with its status and duration, then the total, then the
/// reason of each failure.
pub(crate) fn summary(outcomes: &[Outcome], total_seconds: f64) -> String {
    let width = outcomes
        .iter()
        .map(|outcome| outcome.step.len())
        .chain(["step".len(), "total".len()])
        .max()
        .unwrap_or(0);
    let mut table = format!("{:<width$}  {:<6}  {:>8}\n", "step", "status", "seconds");
    table.push_str(&format!(
        "{}  {}  {}\n",
        "-".repeat(width),
        "-".repeat(6),
        "-".repeat(8)
    ));
    for outcome in outcomes {
        let status = if outcome.error.is_none() {
            "ok"
        } else {
            "FAILED"
        };
        table.push_str(&format!(
            "{:<width$}  {:<6}  {:>8.1}\n",
            outcome.step, status, outcome.seconds
        ));
    }
    let failed = outcomes
        .iter()
        .filter(|outcome| outcome.error.is_some())
        .count();
    let status = if failed == 0 { "ok" } else { "FAILED" };
    table.push_str(&format!(
        "{}  {}  {}\n",
        "-".repeat(width),
        "-".repeat(6),
        "-".repeat(8)
    ));
    table.push_str(&format!(
        "{:<width$}  {:<6}  {:>8.1}\n",
        "total", status, total_seconds
    ));
    for outcome in outcomes {
        if let Some(reason) = &outcome.error {
            table.push_str(&format!("\n{}: {reason}\n", outcome.step));
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(step: &'static str, error: Option<&str>, seconds: f64) -> Outcome {
        Outcome {
            step,
            error: error.map(str::to_owned),
            seconds,
        }
    }

    #[test]
    fn summary_of_passing_steps_lists_each_with_its_time() {
        let text = summary(
            &[outcome("fmt", None, 1.25), outcome("package", None, 30.0)],
            31.3,
        );
        assert_eq!(
            text,
            "step     status   seconds\n\
             -------  ------  --------\n\
             fmt      ok           1.2\n\
             package  ok          30.0\n\
             -------  ------  --------\n\
             total    ok          31.3\n"
        );
    }

    #[test]
    fn summary_marks_failures_and_gives_their_reasons() {
        let text = summary(
            &[
                outcome("fmt", Some("`cargo fmt` exited with 1"), 2.0),
                outcome("tidy", None, 0.1),
            ],
            2.1,
        );
        assert!(text.contains("fmt    FAILED       2.0\n"), "{text}");
        assert!(text.contains("tidy   ok           0.1\n"), "{text}");
        assert!(text.contains("total  FAILED       2.1\n"), "{text}");
        assert!(
            text.ends_with("\nfmt: `cargo fmt` exited with 1\n"),
            "{text}"
        );
    }
}
