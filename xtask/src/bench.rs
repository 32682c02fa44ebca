//! `cargo xtask bench`: the data-path benchmark. Builds the `vu_null` example, then runs the
//! `datapath` bench of `vu-tests` (tests/benches/datapath.rs), which drives `vu_null` and a null
//! device on rust-vmm's vhost-user-backend with one virtqueue driver (the lean driver of
//! `vu-tests`) and prints the tables of docs/performance.md, the in-memory floor among them,
//! then the same backends under five guest driver models (`vu_tests::driver_models`), then
//! `vu_blk --null` against qemu-storage-daemon's vhost-user-blk export of a `null-co` disk
//! (tests/benches/datapath/blk.rs).
//! Timings never gate anything: this is not a `ci` step.

use std::process::ExitCode;

use crate::cmd::Cmd;

const USAGE: &str = "\
usage: cargo xtask bench [--quick | --smoke] [--runs N] [--no-callgrind]
                         [--handshake-only | --polling-only | --callgrind-only | --layouts-only]
                         [--models [--model NAME]...]
                         [--blk [--request KIND]... [--queues 1|2] [--depth N]]
       cargo xtask bench --net [--seconds N]

  (default)       5 interleaved runs of 250 ms per cell, callgrind counts, then the
                  driver-model and block tables (about 30 minutes; --quick about 18)
  --quick         3 runs of 100 ms per cell
  --smoke         one tiny run of everything: checks that the harness works end to end
  --runs N        this many interleaved runs per cell
  --no-callgrind  skip the instruction counts (valgrind)
  --handshake-only
                  only the handshake table, from 5 x runs interleaved connections per backend
  --polling-only  only the depth-1 adaptive polling table
  --callgrind-only
                  only the instructions-per-request table (callgrind; the before/after
                  check of a change); with --layouts-only, the layouts' one
  --layouts-only  only vu_null with split against packed rings (same driver model)
  --models        only the driver-model tables: every model (idle-arm, eager-arm,
                  linux-blk, napi, polling) x 1 and 2 CPUs x depth 1/32/128 x 1 and 3
                  descriptors, vu_null against both rust-vmm idioms (with --quick
                  about 8 minutes)
  --model NAME    with --models: only this model (repeatable)
  --blk           only the block tables: vu_blk --null against qemu-storage-daemon
                  (null-co, read-zeroes=on), virtio-blk requests under the linux-blk
                  driver model, 4 and 64 KiB reads and writes x depth 1/32/128 x 1 and
                  2 queues, with and without polling, then callgrind counts (with
                  --quick about 8 minutes; the default full run ends with them)
  --request KIND  with --blk: only 4k-read, 4k-write, 64k-read or 64k-write (repeatable)
  --queues N      with --blk: only 1 or 2 queues
  --depth N       only the cells of that depth
  Every run that draws the driver-model or block tables (but --smoke) redraws
  docs/charts/model-*.svg and docs/charts/blk-vs-qsd.svg.
  --net           vu_net against DPDK's vhost PMD, both driven by DPDK's virtio-user
                  (cargo xtask bench --net --help)
";

/// Runs the task with its own arguments (those after `bench`).
pub(crate) fn main(args: &[String]) -> ExitCode {
    // The network benchmark is DPDK against DPDK and vu_net (xtask/src/dpdk/bench.rs).
    if args.first().map(String::as_str) == Some("--net") {
        return crate::dpdk::bench_main(&args[1..]);
    }
    let mut pass: Vec<&str> = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--quick" | "--smoke" | "--no-callgrind" | "--handshake-only" | "--polling-only"
            | "--callgrind-only" | "--layouts-only" | "--models" | "--blk" => pass.push(word),
            "--model" | "--request" | "--queues" | "--depth" => match words.next() {
                Some(value) => pass.extend([word.as_str(), value.as_str()]),
                None => {
                    eprintln!("xtask bench: {word} needs a value\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--runs" => match words.next() {
                Some(n) if n.parse::<usize>().is_ok_and(|n| n > 0) => {
                    pass.extend(["--runs", n.as_str()]);
                }
                _ => {
                    eprintln!("xtask bench: --runs needs a positive number\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("xtask bench: unexpected argument `{other}`\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    // The driver-model charts of docs/performance.md, redrawn with every run's numbers.
    let charts = crate::workspace_root()
        .join("docs/charts")
        .display()
        .to_string();
    // A smoke run's numbers are not worth a chart: it keeps the committed ones.
    let svg: Vec<&str> = if pass.contains(&"--smoke") {
        Vec::new()
    } else {
        vec!["--svg", charts.as_str()]
    };
    let steps = [
        Cmd::cargo(&[
            "build",
            "--release",
            "-p",
            "vu-backend",
            "--example",
            "vu_null",
            "--example",
            "vu_blk",
        ]),
        Cmd::cargo(&["bench", "-p", "vu-tests", "--bench", "datapath", "--"])
            .args(&pass)
            .args(&svg),
    ];
    for step in &steps {
        if let Err(err) = step.run() {
            eprintln!("xtask bench: FAILED: {err}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
