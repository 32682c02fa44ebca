//! The size rules of the house style, as a tidy check: no file of library or tool code over
//! [`MAX_FILE_LINES`] code lines and no function over [`MAX_FN_LINES`] lines, unless an entry
//! of [`ALLOWED`] gives the written reason.
//!
//! Only non-test code counts: a file's lines from its first top-level `#[cfg(test)]` on are
//! its tests, and files that are tests as a whole (`tests.rs`, `tests/` directories,
//! benches, fuzz targets) are not looked at. Code lines are the lines that are neither
//! blank nor comments. A function is found by rustfmt's layout: a line that opens with `fn`
//! (after visibility and qualifiers) and the first later line that is its indentation
//! followed by `}`.

/// The most code lines a file may hold outside its tests.
pub(crate) const MAX_FILE_LINES: usize = 800;

/// The most lines a function may span, signature and closing brace included.
pub(crate) const MAX_FN_LINES: usize = 100;

/// Files and functions allowed over the limits, each with its reason: `(path, function or
/// "" for the whole file, reason)`. Adding an entry needs a reviewer's agreement on the
/// reason.
pub(crate) const ALLOWED: &[(&str, &str, &str)] = &[];

/// One rule broken: the line where the file or function starts and what is too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Oversize {
    pub(crate) line: usize,
    /// The function's name, or `None` for the file.
    pub(crate) function: Option<String>,
    pub(crate) lines: usize,
}

/// Whether the file at `path` (relative to the root, `/`-separated) is test code as a whole.
pub(crate) fn is_test_file(path: &str) -> bool {
    path.ends_with("/tests.rs")
        || path.contains("/tests/")
        || path.starts_with("tests/")
        || path.contains("/benches/")
        || path.contains("/fuzz_targets/")
}

/// The lines of `text` before its tests.
fn non_test_lines(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|line| !line.starts_with("#[cfg(test)]"))
        .collect()
}

/// The name of the function a line opens, if it opens one with a body.
fn opens_function(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    if rest.starts_with("pub(") {
        rest = rest.split_once(") ")?.1;
    }
    for qualifier in ["pub ", "const ", "async ", "unsafe ", "extern \"C\" "] {
        rest = rest.strip_prefix(qualifier).unwrap_or(rest);
    }
    let name = rest.strip_prefix("fn ")?;
    let end = name
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(name.len());
    // A declaration without a body (a trait method) ends with `;`.
    (end > 0 && !line.trim_end().ends_with(';')).then_some(&name[..end])
}

/// Everything in `text` over the limits.
pub(crate) fn check(text: &str) -> Vec<Oversize> {
    let lines = non_test_lines(text);
    let mut found = Vec::new();
    let code = lines
        .iter()
        .filter(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with("//")
        })
        .count();
    if code > MAX_FILE_LINES {
        found.push(Oversize {
            line: 1,
            function: None,
            lines: code,
        });
    }
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = opens_function(line) else {
            continue;
        };
        let indent = &line[..line.len() - line.trim_start().len()];
        let closing = format!("{indent}}}");
        let Some(len) = lines[i..].iter().position(|l| *l == closing) else {
            continue;
        };
        if len + 1 > MAX_FN_LINES {
            found.push(Oversize {
                line: i + 1,
                function: Some(name.to_owned()),
                lines: len + 1,
            });
        }
    }
    found
}

/// Whether [`ALLOWED`] excuses `o` in `path`.
pub(crate) fn allowed(path: &str, o: &Oversize) -> bool {
    let name = o.function.as_deref().unwrap_or("");
    ALLOWED
        .iter()
        .any(|(p, f, reason)| *p == path && *f == name && !reason.is_empty())
}

/// The message of a finding.
pub(crate) fn message(o: &Oversize) -> String {
    match &o.function {
        Some(name) => format!(
            "fn {name} spans {} lines (at most {MAX_FN_LINES} without a reason in xtask/src/size.rs)",
            o.lines
        ),
        None => format!(
            "{} code lines outside tests (at most {MAX_FILE_LINES} without a reason in xtask/src/size.rs)",
            o.lines
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, body_lines: usize, indent: &str) -> String {
        let mut out = format!("{indent}pub(crate) fn {name}(x: u8) -> u8 {{\n");
        for _ in 0..body_lines {
            out.push_str(&format!("{indent}    let _ = x;\n"));
        }
        out.push_str(&format!("{indent}}}\n"));
        out
    }

    #[test]
    fn a_function_at_the_limit_passes_and_one_line_more_fails() {
        assert!(check(&function("f", MAX_FN_LINES - 2, "")).is_empty());
        let found = check(&function("g", MAX_FN_LINES - 1, "    "));
        assert_eq!(
            found,
            [Oversize {
                line: 1,
                function: Some("g".into()),
                lines: MAX_FN_LINES + 1
            }]
        );
    }

    #[test]
    fn tests_and_comments_do_not_count() {
        let mut text = "// a comment\n\n".repeat(MAX_FILE_LINES);
        text.push_str("#[cfg(test)]\nmod tests {\n");
        text.push_str(&function("long_test", 2 * MAX_FN_LINES, "    "));
        text.push_str("}\n");
        assert!(check(&text).is_empty());
    }

    #[test]
    fn a_file_over_the_limit_is_found() {
        let text = "const X: u8 = 0;\n".repeat(MAX_FILE_LINES + 1);
        let found = check(&text);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].function, None);
        assert_eq!(found[0].lines, MAX_FILE_LINES + 1);
    }

    #[test]
    fn trait_declarations_are_not_functions() {
        assert_eq!(opens_function("    fn handle(&self) -> u8;"), None);
        assert_eq!(opens_function("    pub unsafe fn raw() {"), Some("raw"));
        assert_eq!(
            opens_function("pub(super) const fn size() -> usize {"),
            Some("size")
        );
        assert_eq!(opens_function("let f = fn_name;"), None);
    }

    #[test]
    fn whole_test_files_are_recognised() {
        assert!(is_test_file("crates/vu-daemon/src/session/tests.rs"));
        assert!(is_test_file("tests/src/hostile.rs"));
        assert!(is_test_file("crates/vu-vring/benches/vring.rs"));
        assert!(!is_test_file("crates/vu-daemon/src/session.rs"));
    }

    #[test]
    fn an_allowance_needs_a_reason() {
        let o = Oversize {
            line: 1,
            function: Some("f".into()),
            lines: 200,
        };
        assert!(!allowed("nowhere.rs", &o));
    }
}
