//! `cargo xtask fuzz [--seconds N] [target...]`: runs each cargo-fuzz target of `tests/fuzz`
//! for a bounded time with the nightly toolchain, then prints runs, coverage and crashes per
//! target.
//!
//! Not a `ci` step: it needs nightly and cargo-fuzz, and its result depends on time. The
//! committed corpus (`tests/fuzz/corpus/<target>/`) is replayed on stable by every
//! `cargo test` (tests/tests/fuzz_corpus.rs). New inputs the fuzzer finds go to a working
//! corpus under the target directory, so the committed one changes only by hand; a crash
//! leaves its input in `tests/fuzz/artifacts/<target>/`, to be fixed and then committed to
//! the corpus.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cmd::Cmd;

/// The targets of `tests/fuzz/Cargo.toml`, in the order they run.
pub(crate) const TARGETS: &[&str] = &[
    "decode",
    "session",
    "memory_table",
    "blk_queue",
    "inflight",
    "iotlb",
    "packed_queue",
    "fill_queue",
];

/// Seconds per target unless `--seconds` says otherwise.
const DEFAULT_SECONDS: u64 = 60;

/// The command that installs cargo-fuzz.
const INSTALL: &str = "cargo +nightly install cargo-fuzz";

/// What one run reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Figures {
    runs: Option<u64>,
    cov: Option<u64>,
    features: Option<u64>,
    corpus: Option<u64>,
}

/// Reads libFuzzer's last status line (`#N DONE cov: C ft: F corp: K/...`) and its
/// `Done N runs in S second(s)` line.
fn figures(output: &str) -> Figures {
    let mut out = Figures::default();
    let number = |word: Option<&str>| -> Option<u64> {
        word?
            .split('/')
            .next()?
            .trim_start_matches('#')
            .parse()
            .ok()
    };
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with('#') && words.len() > 1 {
            out.runs = number(words.first().copied()).or(out.runs);
            for pair in words.windows(2) {
                match pair[0] {
                    "cov:" => out.cov = number(Some(pair[1])),
                    "ft:" => out.features = number(Some(pair[1])),
                    "corp:" => out.corpus = number(Some(pair[1])),
                    _ => {}
                }
            }
        }
        if let ["Done", runs, "runs", ..] = words.as_slice() {
            out.runs = runs.parse().ok().or(out.runs);
        }
    }
    out
}

fn usage() -> String {
    format!(
        "usage: cargo xtask fuzz [--seconds N] [target...]\n\n\
         Runs each target ({}) for N seconds (default {DEFAULT_SECONDS}) with nightly and\n\
         cargo-fuzz. Needs `rustup toolchain install nightly` and `{INSTALL}`.\n",
        TARGETS.join(", ")
    )
}

/// Parses the command line: `--seconds N` and target names.
fn parse(args: &[String]) -> Result<(u64, Vec<String>), String> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = iter.next().ok_or("--seconds needs a value")?;
                seconds = value
                    .parse()
                    .map_err(|_| format!("--seconds: `{value}` is not a number"))?;
            }
            name if TARGETS.contains(&name) => targets.push(name.to_owned()),
            other => return Err(format!("unknown argument or target `{other}`")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    Ok((seconds, targets))
}

/// `rustup run nightly cargo ...`: the nightly cargo, whatever rust-toolchain.toml pins.
fn nightly_cargo(args: &[&str]) -> Cmd {
    Cmd::new("rustup")
        .args(&["run", "nightly", "cargo"])
        .args(args)
}

/// The entry point of `cargo xtask fuzz`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let (seconds, targets) = match parse(args) {
        Ok(parsed) => parsed,
        Err(err) => {
            eprintln!("xtask fuzz: {err}\n\n{}", usage());
            return ExitCode::from(2);
        }
    };
    match nightly_cargo(&["--version"]).capture_quietly() {
        Ok(out) if out.success => {}
        _ => {
            eprintln!(
                "xtask fuzz: no nightly toolchain; install it with\n  rustup toolchain install nightly"
            );
            return ExitCode::FAILURE;
        }
    }
    match nightly_cargo(&["fuzz", "--version"]).capture_quietly() {
        Ok(out) if out.success => {}
        _ => {
            eprintln!("xtask fuzz: cargo-fuzz is not installed; install it with\n  {INSTALL}");
            return ExitCode::FAILURE;
        }
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let mut rows = Vec::new();
    let mut failed = false;
    for target in &targets {
        let work = target_dir.join("fuzz-corpus").join(target);
        if let Err(err) = std::fs::create_dir_all(&work) {
            eprintln!("xtask fuzz: cannot create {}: {err}", work.display());
            return ExitCode::FAILURE;
        }
        let work = work.display().to_string();
        let seeds = format!("tests/fuzz/corpus/{target}");
        let max_time = format!("-max_total_time={seconds}");
        let cmd = nightly_cargo(&[
            "fuzz",
            "run",
            "--fuzz-dir",
            "tests/fuzz",
            target,
            &work,
            &seeds,
            "--",
            &max_time,
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-max_len=4096",
        ]);
        let (ok, output) = match cmd.capture() {
            Ok(out) => (out.success, format!("{}{}", out.stdout, out.stderr)),
            Err(err) => (false, err),
        };
        // The status lines and anything about a crash; the full output only on failure.
        for line in output.lines() {
            let wanted = !ok
                || ["INITED", "DONE", "Done ", "ERROR", "panicked", "artifact"]
                    .iter()
                    .any(|key| line.contains(key));
            if wanted {
                eprintln!("  {line}");
            }
        }
        failed |= !ok;
        rows.push((target.clone(), ok, figures(&output)));
    }
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
    println!(
        "\n{:<14} {:>7} {:>12} {:>8} {:>8} {:>7}  result",
        "target", "seconds", "runs", "cov", "ft", "corpus"
    );
    for (target, ok, f) in &rows {
        println!(
            "{target:<14} {seconds:>7} {:>12} {:>8} {:>8} {:>7}  {}",
            show(f.runs),
            show(f.cov),
            show(f.features),
            show(f.corpus),
            if *ok {
                "no crash"
            } else {
                "CRASH (see tests/fuzz/artifacts)"
            }
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_reads_libfuzzer_status_lines() {
        let out = "#2\tINITED cov: 10 ft: 11 corp: 3/40b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 120 ft: 300 corp: 20/1Kb lim: 40 exec/s: 2048 rss: 40Mb\n\
                   #50000\tDONE   cov: 150 ft: 400 corp: 25/2Kb lim: 60 exec/s: 833 rss: 50Mb\n\
                   Done 50000 runs in 61 second(s)\n";
        assert_eq!(
            figures(out),
            Figures {
                runs: Some(50000),
                cov: Some(150),
                features: Some(400),
                corpus: Some(25),
            }
        );
    }

    #[test]
    fn parse_defaults_to_every_target() {
        let (seconds, targets) = parse(&[]).unwrap();
        assert_eq!(seconds, DEFAULT_SECONDS);
        assert_eq!(targets, TARGETS);
    }

    #[test]
    fn parse_takes_seconds_and_targets() {
        let args = ["--seconds", "5", "session"].map(String::from);
        assert_eq!(parse(&args).unwrap(), (5, vec!["session".to_owned()]));
    }

    #[test]
    fn parse_refuses_unknown_targets() {
        assert!(parse(&["nope".to_owned()]).is_err());
    }

    #[test]
    fn every_target_has_a_harness_and_a_corpus() {
        let root = crate::workspace_root().join("tests/fuzz");
        for target in TARGETS {
            assert!(
                root.join(format!("fuzz_targets/{target}.rs")).is_file(),
                "{target}"
            );
            assert!(root.join(format!("corpus/{target}")).is_dir(), "{target}");
        }
    }
}
