//! The message -> handler map of docs/ARCHITECTURE.md checked against the code, as part of
//! `tidy`.
//!
//! - every request of `vu_proto::request` (both tables) has exactly one row, and every row
//!   names a request that exists;
//! - the function a row names is defined in the file the row names, and the doc comment of
//!   every definition there names the row's request, in backticks: grepping the spec name
//!   lands on its handler.
//!
//! A row is a markdown table line of three cells, each in backticks:
//! ``| `VHOST_USER_GET_FEATURES` | `crates/vu-daemon/src/session.rs` | `handle_get_features` |``;
//! the handler may be written `Type::method` (only the last segment is looked up).

use std::collections::BTreeMap;

use crate::tidy::Finding;

/// The document that holds the map, relative to the workspace root.
pub(crate) const MAP: &str = "docs/ARCHITECTURE.md";

/// One row of the map.
#[derive(Debug)]
struct Row {
    line: usize,
    request: String,
    file: String,
    handler: String,
}

/// The backticked words of a table line.
fn backticked(line: &str) -> Vec<&str> {
    line.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, word)| word)
        .collect()
}

/// The rows of the map: table lines whose first cell is a request and that name a file and
/// a function.
fn rows(map_md: &str) -> Vec<Row> {
    map_md
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim();
            if !line.starts_with("| `VHOST_USER_") {
                return None;
            }
            let words = backticked(line);
            let [request, file, handler] = words.as_slice() else {
                return None;
            };
            let handler = handler.rsplit("::").next().unwrap_or(handler);
            Some(Row {
                line: i + 1,
                request: (*request).to_owned(),
                file: (*file).to_owned(),
                handler: handler.to_owned(),
            })
        })
        .collect()
}

/// The table lines that look like rows but do not have three backticked cells.
fn malformed(map_md: &str) -> Vec<Finding> {
    map_md
        .lines()
        .enumerate()
        .filter(|(_, line)| line.trim().starts_with("| `VHOST_USER_"))
        .filter(|(_, line)| backticked(line).len() != 3)
        .map(|(i, _)| Finding {
            line: i + 1,
            message: "a map row needs three backticked cells: request, file, handler".into(),
        })
        .collect()
}

/// Whether `line` defines function `name`.
fn defines(line: &str, name: &str) -> bool {
    line.split_once("fn ")
        .map(|(before, rest)| {
            let before = before.trim();
            let is_item = before.is_empty()
                || before
                    .split_whitespace()
                    .all(|w| matches!(w, "pub" | "pub(crate)" | "pub(super)" | "const"));
            is_item
                && rest
                    .strip_prefix(name)
                    .is_some_and(|after| after.starts_with('(') || after.starts_with('<'))
        })
        .unwrap_or(false)
}

/// The doc comment above line `at` of `lines`, attributes skipped.
fn doc_above<'a>(lines: &[&'a str], at: usize) -> Vec<&'a str> {
    let mut doc = Vec::new();
    for line in lines[..at].iter().rev() {
        let line = line.trim();
        if line.starts_with("#[") {
            continue;
        }
        match line.strip_prefix("///") {
            Some(text) => doc.push(text),
            None => break,
        }
    }
    doc
}

/// Checks one row against the text of the file it names.
fn check_row(row: &Row, source: &str) -> Vec<Finding> {
    let lines: Vec<&str> = source.lines().collect();
    let definitions: Vec<usize> = (0..lines.len())
        .filter(|&i| defines(lines[i], &row.handler))
        .collect();
    if definitions.is_empty() {
        return vec![Finding {
            line: row.line,
            message: format!("{}: no fn {} in {}", row.request, row.handler, row.file),
        }];
    }
    let named = format!("`{}`", row.request);
    definitions
        .into_iter()
        .filter(|&at| !doc_above(&lines, at).iter().any(|l| l.contains(&named)))
        .map(|at| Finding {
            line: row.line,
            message: format!(
                "{}: the doc of fn {} ({}:{}) does not name {named}",
                row.request,
                row.handler,
                row.file,
                at + 1
            ),
        })
        .collect()
}

/// Checks the map against the request names; `read` gives the text of a workspace file.
pub(crate) fn check(
    map_md: &str,
    requests: &[String],
    read: &dyn Fn(&str) -> Option<String>,
) -> Vec<Finding> {
    let mut findings = malformed(map_md);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let rows = rows(map_md);
    for row in &rows {
        if !requests.contains(&row.request) {
            findings.push(Finding {
                line: row.line,
                message: format!("{} is not a request of vu-proto", row.request),
            });
        }
        if let Some(first) = seen.insert(&row.request, row.line) {
            findings.push(Finding {
                line: row.line,
                message: format!("{} has a second row (first at line {first})", row.request),
            });
        }
        match read(&row.file) {
            Some(source) => findings.extend(check_row(row, &source)),
            None => findings.push(Finding {
                line: row.line,
                message: format!("{}: cannot read {}", row.request, row.file),
            }),
        }
    }
    for request in requests {
        if !seen.contains_key(request.as_str()) {
            findings.push(Finding {
                line: 1,
                message: format!("{request} has no row in the message -> handler map"),
            });
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "\
impl X {
    /// `VHOST_USER_GET_FEATURES`: the features.
    #[cfg(a)]
    fn handle_get_features(&self) {}

    /// Something else.
    #[cfg(not(a))]
    fn handle_get_features(&self) {}

    /// Not a handler of anything.
    pub(super) fn handle_set_owner<T>(&self) {}
}
/// `VHOST_USER_BACKEND_IOTLB_MSG` as a miss.
pub fn iotlb_msg() {}
";

    fn requests() -> Vec<String> {
        ["VHOST_USER_GET_FEATURES", "VHOST_USER_BACKEND_IOTLB_MSG"]
            .map(String::from)
            .to_vec()
    }

    fn read(path: &str) -> Option<String> {
        (path == "a.rs").then(|| SOURCE.to_owned())
    }

    fn messages(map: &str) -> Vec<String> {
        check(map, &requests(), &read)
            .into_iter()
            .map(|f| f.message)
            .collect()
    }

    #[test]
    fn a_true_map_passes() {
        let source = SOURCE.replace("Something else.", "Also `VHOST_USER_GET_FEATURES`.");
        let read = |path: &str| (path == "a.rs").then(|| source.clone());
        let map = "| Request | File | Handler |\n|---|---|---|\n\
            | `VHOST_USER_GET_FEATURES` | `a.rs` | `handle_get_features` |\n\
            | `VHOST_USER_BACKEND_IOTLB_MSG` | `a.rs` | `Channel::iotlb_msg` |\n";
        assert_eq!(check(map, &requests(), &read), Vec::new());
    }

    #[test]
    fn every_definition_must_name_the_request() {
        let map = "| `VHOST_USER_GET_FEATURES` | `a.rs` | `handle_get_features` |\n\
            | `VHOST_USER_BACKEND_IOTLB_MSG` | `a.rs` | `iotlb_msg` |\n";
        let found = messages(map);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("a.rs:8"), "{found:?}");
    }

    #[test]
    fn a_handler_whose_doc_names_another_request_is_found() {
        let map = "| `VHOST_USER_GET_FEATURES` | `a.rs` | `handle_set_owner` |\n\
            | `VHOST_USER_BACKEND_IOTLB_MSG` | `a.rs` | `iotlb_msg` |\n";
        let found = messages(map);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("does not name `VHOST_USER_GET_FEATURES`"));
    }

    #[test]
    fn missing_unknown_duplicate_and_absent_are_found() {
        let map = "| `VHOST_USER_NOPE` | `a.rs` | `iotlb_msg` |\n\
            | `VHOST_USER_BACKEND_IOTLB_MSG` | `a.rs` | `no_such_fn` |\n\
            | `VHOST_USER_BACKEND_IOTLB_MSG` | `b.rs` | `iotlb_msg` |\n\
            | `VHOST_USER_GET_FEATURES` | `a.rs` |\n";
        let found = messages(map);
        assert_eq!(found.len(), 7, "{found:?}");
        assert!(found[0].contains("three backticked cells"));
        assert!(found[1].contains("VHOST_USER_NOPE is not a request"));
        assert!(found[2].contains("does not name `VHOST_USER_NOPE`"));
        assert!(found[3].contains("no fn no_such_fn in a.rs"));
        assert!(found[4].contains("second row"));
        assert!(found[5].contains("cannot read b.rs"));
        assert!(found[6].contains("VHOST_USER_GET_FEATURES has no row"));
    }
}
