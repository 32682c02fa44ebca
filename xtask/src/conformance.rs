//! The conformance table (docs/conformance.md) checked against the code, as part of `tidy`.
//!
//! - every request code of `vu_proto::request` (both tables, `FrontendReq` and `BackendReq`)
//!   has exactly one row, and every row names a request that exists;
//! - every row names at least one test, and every test it names is a `#[test]` function
//!   somewhere under crates/ or tests/.
//!
//! A row is a markdown table line whose first cell is a request's spec name in backticks,
//! e.g. ``| `VHOST_USER_GET_FEATURES` | ... |``; its last cell lists tests in backticks, each
//! `name` or `path::name` (only the last segment is looked up).

use std::collections::{BTreeMap, BTreeSet};

use crate::tidy::Finding;

/// The request table, relative to the workspace root.
pub(crate) const REQUESTS: &str = "crates/vu-proto/src/codec/request.rs";
/// The conformance table, relative to the workspace root.
pub(crate) const TABLE: &str = "docs/conformance.md";

/// The spec names in the `requests!` tables of request.rs: each row reads
/// `Variant = 1, "VHOST_USER_...", fds ...`.
pub(crate) fn spec_names(requests_rs: &str) -> Vec<String> {
    requests_rs
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let (_, rest) = line.split_once(" = ")?;
            let (code, rest) = rest.split_once(", \"")?;
            code.parse::<u32>().ok()?;
            let (name, _) = rest.split_once('"')?;
            name.starts_with("VHOST_USER_").then(|| name.to_owned())
        })
        .collect()
}

/// The names of the `#[test]` functions in `text`: a `fn name(` within the five lines after
/// a `#[test]` attribute (other attributes may come between).
pub(crate) fn test_names(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut names = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "#[test]" {
            continue;
        }
        for next in lines.iter().skip(i + 1).take(5) {
            if let Some(name) = fn_name(next) {
                names.push(name);
                break;
            }
        }
    }
    names
}

/// The name of the function a line declares, if it does.
fn fn_name(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("fn ")?;
    let (name, _) = rest.split_once('(')?;
    let name = name.trim();
    (!name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_'))
        .then(|| name.to_owned())
}

/// The backticked words of a table cell.
fn backticked(cell: &str) -> Vec<&str> {
    cell.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, word)| word)
        .collect()
}

/// One row of the table: its line, request and the tests it names.
#[derive(Debug)]
struct Row {
    line: usize,
    request: String,
    tests: Vec<String>,
}

/// The rows of the table: lines starting with ``| `VHOST_USER_``.
fn rows(table_md: &str) -> Vec<Row> {
    table_md
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let cells: Vec<&str> = line.trim().strip_prefix('|')?.split('|').collect();
            let request = backticked(cells.first()?).first()?.to_string();
            if !request.starts_with("VHOST_USER_") {
                return None;
            }
            // The last cell: the trailing `|` leaves an empty one after it.
            let last = cells.iter().rev().find(|c| !c.trim().is_empty())?;
            let tests = backticked(last)
                .into_iter()
                .map(|t| t.rsplit("::").next().unwrap_or(t).to_owned())
                .collect();
            Some(Row {
                line: i + 1,
                request,
                tests,
            })
        })
        .collect()
}

/// Checks the table against the request names and the test functions that exist.
pub(crate) fn check(table_md: &str, requests: &[String], tests: &BTreeSet<String>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let rows = rows(table_md);
    for row in &rows {
        if !requests.contains(&row.request) {
            findings.push(Finding {
                line: row.line,
                message: format!("{} is not a request of {REQUESTS}", row.request),
            });
        }
        if let Some(first) = seen.insert(&row.request, row.line) {
            findings.push(Finding {
                line: row.line,
                message: format!("{} has a second row (first at line {first})", row.request),
            });
        }
        if row.tests.is_empty() {
            findings.push(Finding {
                line: row.line,
                message: format!("{} names no test", row.request),
            });
        }
        for test in &row.tests {
            if !tests.contains(test) {
                findings.push(Finding {
                    line: row.line,
                    message: format!("{}: no #[test] fn {test} in crates/ or tests/", row.request),
                });
            }
        }
    }
    for request in requests {
        if !seen.contains_key(request.as_str()) {
            findings.push(Finding {
                line: 1,
                message: format!("{request} has no row"),
            });
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUESTS_SAMPLE: &str = r#"
    GetFeatures = 1, "VHOST_USER_GET_FEATURES", fds NONE, reply_fds NONE, Always;
    /// Doc with "VHOST_USER_NOT_A_ROW" = 3
    IotlbMsg = 1, "VHOST_USER_BACKEND_IOTLB_MSG", fds NONE, reply_fds NONE, OnlyIfNeedReply;
"#;

    fn requests() -> Vec<String> {
        spec_names(REQUESTS_SAMPLE)
    }

    fn tests() -> BTreeSet<String> {
        ["a_test", "other_test"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn spec_names_are_read_from_the_request_rows() {
        assert_eq!(
            requests(),
            ["VHOST_USER_GET_FEATURES", "VHOST_USER_BACKEND_IOTLB_MSG"]
        );
    }

    #[test]
    fn test_names_follow_a_test_attribute() {
        let text =
            "#[test]\n#[cfg(x)]\nfn first() {}\nfn helper() {}\n    #[test]\n    fn second() {}\n";
        assert_eq!(test_names(text), ["first", "second"]);
    }

    #[test]
    fn a_complete_table_passes() {
        let table = "| Request | Test |\n|---|---|\n\
            | `VHOST_USER_GET_FEATURES` | `a_test` |\n\
            | `VHOST_USER_BACKEND_IOTLB_MSG` | `file::other_test`, `a_test` |\n";
        assert_eq!(check(table, &requests(), &tests()), Vec::new());
    }

    #[test]
    fn a_missing_row_an_unknown_request_and_an_unknown_test_are_found() {
        let table = "| `VHOST_USER_GET_FEATURES` | `no_such_test` |\n\
            | `VHOST_USER_NOPE` | `a_test` |\n";
        let messages: Vec<String> = check(table, &requests(), &tests())
            .into_iter()
            .map(|f| f.message)
            .collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].contains("no_such_test"));
        assert!(messages[1].contains("VHOST_USER_NOPE"));
        assert!(messages[2].contains("VHOST_USER_BACKEND_IOTLB_MSG has no row"));
    }

    #[test]
    fn a_duplicate_row_and_a_row_without_tests_are_found() {
        let table = "| `VHOST_USER_GET_FEATURES` | `a_test` |\n\
            | `VHOST_USER_GET_FEATURES` | none |\n\
            | `VHOST_USER_BACKEND_IOTLB_MSG` | `a_test` |\n";
        let messages: Vec<String> = check(table, &requests(), &tests())
            .into_iter()
            .map(|f| f.message)
            .collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].contains("second row"));
        assert!(messages[1].contains("names no test"));
    }
}
