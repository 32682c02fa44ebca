//! `cargo xtask tidy`: review rules turned into checks over the source tree.
//!
//! Each rule is a pure function over a file's text, so the rules have unit tests on sample
//! text; [`run`] only walks the tree and collects what they report.
//!
//! This file spells the patterns it looks for, in code and in its test samples, so it is not
//! scanned for them itself ([`SELF`]).

use std::path::{Path, PathBuf};

use crate::{conformance, handlers, size, Options, StepResult};

/// The directories whose `.rs` files are checked.
const SOURCE_DIRS: &[&str] = &["crates", "tests", "xtask"];

/// This file, which names the forbidden patterns in order to find them.
const SELF: &str = "xtask/src/tidy.rs";

/// How many code lines may separate a `// SAFETY:` comment from the `unsafe` it justifies (a
/// `let x =` or a call wrapped over lines); comment lines do not count.
const SAFETY_REACH: usize = 3;

/// Files under tests/ allowed to sleep, each with the reason. Empty: tests synchronise on
/// events, never on time. Adding a file here needs a reviewer's agreement on the reason.
const SLEEP_ALLOWLIST: &[(&str, &str)] = &[];

/// The crates that `crates/*/Cargo.toml` may depend on (normal and build dependencies).
const ALLOWED_DEPENDENCIES: &[&str] = &[
    "vu-proto",
    "vu-mem",
    "vu-vring",
    "vu-daemon",
    "vu-backend",
    "vm-memory",
    "virtio-queue",
    "vmm-sys-util",
    "libc",
    "bitflags",
    "log",
    "thiserror",
    "userfaultfd",
];

/// The reference implementation: for interop tests and comparison benches only.
const DEV_ONLY_DEPENDENCIES: &[&str] = &["vhost", "vhost-user-backend"];

/// One broken rule: where and what.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finding {
    pub(crate) line: usize,
    pub(crate) message: String,
}

fn finding(line: usize, message: impl Into<String>) -> Finding {
    Finding {
        line,
        message: message.into(),
    }
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with("//")
}

/// Is this line an attribute that ignores a test: `#[ignore]`, `#[ignore = "why"]`, or
/// `#[cfg_attr(cond, ignore)]`? Only attribute lines count, not strings that mention one.
fn ignores_a_test(line: &str) -> bool {
    let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    compact.starts_with("#[")
        && (compact.contains("#[ignore]")
            || compact.contains("#[ignore=")
            || (compact.contains("#[cfg_attr(")
                && (compact.contains(",ignore)") || compact.contains(",ignore="))))
}

/// No test is switched off with `#[ignore]`: a test that cannot run is deleted or fixed.
pub(crate) fn check_no_ignore(text: &str) -> Vec<Finding> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| ignores_a_test(line))
        .map(|(i, _)| finding(i + 1, "#[ignore] test: fix it or delete it"))
        .collect()
}

/// Does this line open an `unsafe` block or an `unsafe impl`?
fn opens_unsafe(line: &str) -> bool {
    if is_comment(line) {
        return false;
    }
    let code = line.split("//").next().unwrap_or(line);
    let mut rest = code;
    while let Some(at) = rest.find("unsafe") {
        let before = rest[..at].chars().next_back();
        let after = rest[at + "unsafe".len()..].trim_start();
        let word_start = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if word_start && (after.starts_with('{') || after.starts_with("impl")) {
            return true;
        }
        rest = &rest[at + "unsafe".len()..];
    }
    false
}

/// Every `unsafe {` block and `unsafe impl` has a `// SAFETY:` comment on the line itself or
/// just above it (within [`SAFETY_REACH`] code lines, comment blocks read whole).
pub(crate) fn check_safety_comments(text: &str) -> Vec<Finding> {
    let lines: Vec<&str> = text.lines().collect();
    let mut findings = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !opens_unsafe(line) {
            continue;
        }
        let mut justified = line.contains("SAFETY:");
        let mut code_lines = 0;
        for above in lines[..i].iter().rev() {
            if above.contains("// SAFETY:") {
                justified = true;
                break;
            }
            if !is_comment(above) && !above.trim().is_empty() {
                code_lines += 1;
                if code_lines > SAFETY_REACH {
                    break;
                }
            }
        }
        if !justified {
            findings.push(finding(
                i + 1,
                "unsafe without a `// SAFETY:` comment saying which invariant holds",
            ));
        }
    }
    findings
}

/// Tests do not sleep: a sleep is either a race or a wasted second. Catches `thread::sleep`
/// under any path and bare `sleep(`, `usleep(`, `nanosleep(` calls.
pub(crate) fn check_no_sleep(text: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if is_comment(line) {
            continue;
        }
        let code = line.split("//").next().unwrap_or(line);
        let sleeps = code.contains("thread::sleep")
            || ["sleep(", "usleep(", "nanosleep("].iter().any(|call| {
                code.match_indices(call).any(|(at, _)| {
                    code[..at]
                        .chars()
                        .next_back()
                        .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
                })
            });
        if sleeps {
            findings.push(finding(
                i + 1,
                "sleep in test code: wait for the event itself (a channel, an eventfd, a join)",
            ));
        }
    }
    findings
}

/// The kind of a dependency table in a manifest.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Table {
    Normal,
    Dev,
    Build,
    Other,
}

/// Classifies a `[...]` header: `dependencies`, `dev-dependencies`, `build-dependencies`, their
/// `target.'cfg(..)'.` forms and their `[dependencies.name]` forms (which also name the crate).
fn classify(header: &str) -> (Table, Option<String>) {
    let header = header
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim();
    let header = match header.strip_prefix("target.") {
        // The target is a quoted `cfg(..)` (which may hold dots) or a bare triple (which may not).
        Some(rest) => match rest.chars().next() {
            Some(quote @ ('\'' | '"')) => rest[1..]
                .split_once(quote)
                .map_or(rest, |(_, t)| t.trim_start_matches('.')),
            _ => rest.split_once('.').map_or(rest, |(_, t)| t),
        },
        None => header,
    };
    let (table, name) = match header.split_once('.') {
        Some((table, name)) => (table, Some(name.trim().trim_matches('"').to_owned())),
        None => (header, None),
    };
    let table = match table {
        "dependencies" => Table::Normal,
        "dev-dependencies" => Table::Dev,
        "build-dependencies" => Table::Build,
        _ => Table::Other,
    };
    (table, name)
}

/// The crate a dependency line names: its key, or the `package = "..."` it renames.
fn dependency_name(line: &str) -> Option<String> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim().split('.').next()?.trim().trim_matches('"');
    if key.is_empty() {
        return None;
    }
    let renamed = value.split("package").nth(1).and_then(|rest| {
        let rest = rest
            .trim_start()
            .strip_prefix('=')?
            .trim_start()
            .strip_prefix('"')?;
        rest.split('"').next().map(str::to_owned)
    });
    Some(renamed.unwrap_or_else(|| key.to_owned()))
}

/// Every normal and build dependency of a publishable crate is on [`ALLOWED_DEPENDENCIES`]; the
/// reference implementation ([`DEV_ONLY_DEPENDENCIES`]) only appears in dev-dependencies.
pub(crate) fn check_dependencies(manifest: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut table = Table::Other;
    // In a `[dependencies.name]` table the header names the crate and the keys are settings.
    let mut one_crate_table = false;
    for (i, raw) in manifest.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or(raw).trim();
        if line.is_empty() {
            continue;
        }
        let name = if line.starts_with('[') {
            let (kind, name) = classify(line);
            table = kind;
            one_crate_table = name.is_some();
            match name {
                Some(name) => name,
                None => continue,
            }
        } else if table == Table::Other || one_crate_table {
            continue;
        } else {
            match dependency_name(line) {
                Some(name) => name,
                None => continue,
            }
        };
        match table {
            Table::Normal | Table::Build if DEV_ONLY_DEPENDENCIES.contains(&name.as_str()) => {
                findings.push(finding(
                    i + 1,
                    format!("`{name}` belongs in [dev-dependencies] only"),
                ));
            }
            Table::Normal | Table::Build if !ALLOWED_DEPENDENCIES.contains(&name.as_str()) => {
                findings.push(finding(
                    i + 1,
                    format!(
                        "`{name}` is not on the dependency allowlist (ask before adding a crate)"
                    ),
                ));
            }
            _ => {}
        }
    }
    findings
}

/// The README must give the one command that runs the tests.
pub(crate) fn check_readme(text: &str) -> Vec<Finding> {
    if text.contains("cargo xtask ci") {
        Vec::new()
    } else {
        vec![finding(1, "the README does not mention `cargo xtask ci`")]
    }
}

/// Every `.rs` file under `dir`, skipping build output.
fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "target" && !name.starts_with("target-") && !name.starts_with('.') {
                rust_files(&path, files);
            }
        } else if name.ends_with(".rs") {
            files.push(path);
        }
    }
}

/// Adds `findings` about `path` to the report as `path:line: message`.
fn note(report: &mut Vec<String>, path: &str, findings: Vec<Finding>) {
    for f in findings {
        report.push(format!("{path}:{}: {}", f.line, f.message));
    }
}

/// Checks the whole tree and fails listing every finding as `path:line: message`.
pub(crate) fn run(_options: &Options) -> StepResult {
    let root = Path::new(".");
    let mut report: Vec<String> = Vec::new();
    let test_fns = check_sources(root, &mut report);
    check_manifests(root, &mut report);
    if !root.join("LICENSE").is_file() {
        report.push("LICENSE: missing".to_owned());
    }
    match std::fs::read_to_string(root.join("README.md")) {
        Ok(text) => note(&mut report, "README.md", check_readme(&text)),
        Err(err) => report.push(format!("README.md: cannot read: {err}")),
    }
    check_conformance(root, &test_fns, &mut report);
    check_handler_map(root, &mut report);

    for line in &report {
        eprintln!("{line}");
    }
    match report.len() {
        0 => Ok(()),
        1 => Err(report.remove(0)),
        n => Err(format!("{n} findings, first: {}", report[0])),
    }
}

/// `path` relative to `root`, as the report shows it.
fn shown(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The per-file rules over every `.rs` file; returns the names of the test functions seen.
fn check_sources(root: &Path, report: &mut Vec<String>) -> std::collections::BTreeSet<String> {
    let mut files = Vec::new();
    let mut test_fns = std::collections::BTreeSet::new();
    for dir in SOURCE_DIRS {
        rust_files(&root.join(dir), &mut files);
    }
    eprintln!(
        "    scanning {} .rs files under {}",
        files.len(),
        SOURCE_DIRS.join(", ")
    );
    for path in &files {
        let shown = shown(root, path);
        if shown == SELF {
            continue;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) => {
                report.push(format!("{shown}: cannot read: {err}"));
                continue;
            }
        };
        test_fns.extend(conformance::test_names(&text));
        note(report, &shown, check_no_ignore(&text));
        note(report, &shown, check_safety_comments(&text));
        if shown.starts_with("tests/")
            && !SLEEP_ALLOWLIST.iter().any(|(allowed, _)| *allowed == shown)
        {
            note(report, &shown, check_no_sleep(&text));
        }
        if !size::is_test_file(&shown) {
            let findings = size::check(&text)
                .into_iter()
                .filter(|o| !size::allowed(&shown, o))
                .map(|o| finding(o.line, size::message(&o)))
                .collect();
            note(report, &shown, findings);
        }
    }
    test_fns
}

/// The dependency allowlist over `crates/*/Cargo.toml`.
fn check_manifests(root: &Path, report: &mut Vec<String>) {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path().join("Cargo.toml"))
                .collect()
        })
        .unwrap_or_default();
    manifests.retain(|path| path.is_file());
    manifests.sort();
    eprintln!(
        "    checking dependencies of {} crates/*/Cargo.toml",
        manifests.len()
    );
    for path in &manifests {
        let shown = shown(root, path);
        match std::fs::read_to_string(path) {
            Ok(text) => note(report, &shown, check_dependencies(&text)),
            Err(err) => report.push(format!("{shown}: cannot read: {err}")),
        }
    }
}

/// docs/conformance.md against the request tables and the tests it names.
fn check_conformance(
    root: &Path,
    test_fns: &std::collections::BTreeSet<String>,
    report: &mut Vec<String>,
) {
    eprintln!(
        "    checking {} against the requests of {}",
        conformance::TABLE,
        conformance::REQUESTS
    );
    match (
        std::fs::read_to_string(root.join(conformance::TABLE)),
        std::fs::read_to_string(root.join(conformance::REQUESTS)),
    ) {
        (Ok(table), Ok(requests)) => {
            let requests = conformance::spec_names(&requests);
            let findings = conformance::check(&table, &requests, test_fns);
            note(report, conformance::TABLE, findings);
        }
        (Err(err), _) => report.push(format!("{}: cannot read: {err}", conformance::TABLE)),
        (_, Err(err)) => report.push(format!("{}: cannot read: {err}", conformance::REQUESTS)),
    }
}

/// docs/ARCHITECTURE.md's message -> handler map against the request tables and the
/// handlers' docs.
fn check_handler_map(root: &Path, report: &mut Vec<String>) {
    eprintln!(
        "    checking the message -> handler map of {} against the requests and their handlers",
        handlers::MAP
    );
    match (
        std::fs::read_to_string(root.join(handlers::MAP)),
        std::fs::read_to_string(root.join(conformance::REQUESTS)),
    ) {
        (Ok(map), Ok(requests)) => {
            let requests = conformance::spec_names(&requests);
            let read = |path: &str| std::fs::read_to_string(root.join(path)).ok();
            let findings = handlers::check(&map, &requests, &read);
            note(report, handlers::MAP, findings);
        }
        (Err(err), _) => report.push(format!("{}: cannot read: {err}", handlers::MAP)),
        (_, Err(err)) => report.push(format!("{}: cannot read: {err}", conformance::REQUESTS)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(findings: &[Finding]) -> Vec<usize> {
        findings.iter().map(|f| f.line).collect()
    }

    #[test]
    fn ignored_test_is_found() {
        let text = "#[test]\n#[ignore]\nfn slow() {}\n#[ignore = \"flaky\"]\nfn flaky() {}\n";
        assert_eq!(lines(&check_no_ignore(text)), [2, 4]);
    }

    #[test]
    fn conditionally_ignored_test_is_found() {
        let text = "#[test]\n#[cfg_attr(miri, ignore)]\nfn f() {}\n";
        assert_eq!(lines(&check_no_ignore(text)), [2]);
    }

    #[test]
    fn ignore_in_a_string_is_not_an_attribute() {
        assert!(check_no_ignore("let about = \"no #[ignore] allowed\";\n").is_empty());
    }

    #[test]
    fn ignore_in_a_comment_is_not_a_test() {
        assert!(check_no_ignore("// never use #[ignore] here\n#[test]\nfn t() {}\n").is_empty());
    }

    #[test]
    fn unsafe_block_with_safety_comment_above_passes() {
        let text = "// SAFETY: `fd` is open and owned by `self`, checked in `new`.\n\
                    let n = unsafe { libc::close(fd) };\n";
        assert!(check_safety_comments(text).is_empty());
    }

    #[test]
    fn long_safety_comment_block_is_read_whole() {
        let text = "// SAFETY: the region is mapped\n// line two\n// line three\n// line four\n\
                    // line five\n// line six\nunsafe { f() };\n";
        assert!(check_safety_comments(text).is_empty());
    }

    #[test]
    fn safety_comment_may_sit_above_a_wrapped_expression() {
        let text =
            "// SAFETY: the buffer outlives the call.\nlet n =\n    unsafe { read(fd, p, len) };\n";
        assert!(check_safety_comments(text).is_empty());
    }

    #[test]
    fn unsafe_block_without_safety_comment_is_found() {
        let text = "fn f() {\n    let x = 1;\n    unsafe { g(x) };\n}\n";
        assert_eq!(lines(&check_safety_comments(text)), [3]);
    }

    #[test]
    fn unsafe_impl_without_safety_comment_is_found() {
        let text = "struct S;\nunsafe impl Send for S {}\n";
        assert_eq!(lines(&check_safety_comments(text)), [2]);
    }

    #[test]
    fn safety_comment_too_far_above_does_not_count() {
        let text = "// SAFETY: about something else\na();\nb();\nc();\nd();\nunsafe { e() };\n";
        assert_eq!(lines(&check_safety_comments(text)), [6]);
    }

    #[test]
    fn unsafe_fn_declaration_is_not_a_block() {
        let text = "/// # Safety\n/// `p` is valid.\npub unsafe fn f(p: *const u8) {}\n";
        assert!(check_safety_comments(text).is_empty());
    }

    #[test]
    fn unsafe_in_an_identifier_or_comment_is_not_a_block() {
        let text = "let not_unsafe {}\n// unsafe { x }\nlet y = 1; // unsafe { }\n";
        assert!(check_safety_comments(text).is_empty());
    }

    #[test]
    fn thread_sleep_is_found() {
        let text = "use std::time::Duration;\nstd::thread::sleep(Duration::from_millis(10));\n";
        assert_eq!(lines(&check_no_sleep(text)), [2]);
    }

    #[test]
    fn imported_sleep_call_is_found() {
        let text = "use std::thread::{sleep, spawn};\nfn t() {\n    sleep(d);\n}\n";
        assert_eq!(lines(&check_no_sleep(text)), [3]);
    }

    #[test]
    fn sleep_in_a_name_or_comment_is_not_a_sleep() {
        let text = "fn no_sleep_needed() {}\nlet asleep(x);\n// thread::sleep would race\n";
        assert!(check_no_sleep(text).is_empty());
    }

    #[test]
    fn allowed_dependencies_pass() {
        let manifest = "[package]\nname = \"vu-daemon\"\n\n[features]\npostcopy = [\"dep:userfaultfd\"]\n\n\
                        [dependencies]\nvu-proto.workspace = true\nvm-memory = { workspace = true, features = [\"backend-mmap\"] }\n\
                        userfaultfd = { workspace = true, optional = true }\n\n[dev-dependencies]\nvhost.workspace = true\n";
        assert_eq!(check_dependencies(manifest), []);
    }

    #[test]
    fn unlisted_dependency_is_found() {
        let manifest = "[dependencies]\nlibc.workspace = true\nserde = \"1\"\n";
        assert_eq!(lines(&check_dependencies(manifest)), [3]);
    }

    #[test]
    fn reference_implementation_outside_dev_dependencies_is_found() {
        let manifest = "[dependencies]\nvhost = { workspace = true }\n[build-dependencies]\nvhost-user-backend = \"0.24\"\n";
        let findings = check_dependencies(manifest);
        assert_eq!(lines(&findings), [2, 4]);
        assert!(findings[0].message.contains("dev-dependencies"));
    }

    #[test]
    fn target_specific_and_table_form_dependencies_are_checked() {
        let manifest = "[target.'cfg(unix)'.dependencies]\nnix = \"0.29\"\n\n[dependencies.tokio]\nversion = \"1\"\n";
        assert_eq!(lines(&check_dependencies(manifest)), [2, 4]);
    }

    #[test]
    fn target_triple_dependencies_are_checked() {
        let manifest = "[target.x86_64-unknown-linux-gnu.dependencies]\nnix = \"0.29\"\n\
                        [target.'cfg(target_os = \"linux\")'.build-dependencies]\ncc = \"1\"\n";
        assert_eq!(lines(&check_dependencies(manifest)), [2, 4]);
    }

    #[test]
    fn renamed_dependency_is_checked_under_its_real_name() {
        let manifest = "[dependencies]\nmem = { package = \"vm-memory\", version = \"0.18\" }\nfoo = { package = \"serde\" }\n";
        assert_eq!(lines(&check_dependencies(manifest)), [3]);
    }

    #[test]
    fn any_dev_dependency_is_allowed() {
        let manifest =
            "[dev-dependencies]\ncriterion.workspace = true\nvhost-user-backend.workspace = true\n";
        assert!(check_dependencies(manifest).is_empty());
    }

    #[test]
    fn readme_must_mention_the_gate() {
        assert!(check_readme("Run `cargo xtask ci` before sending a change.").is_empty());
        assert_eq!(check_readme("Run cargo test.").len(), 1);
    }
}
