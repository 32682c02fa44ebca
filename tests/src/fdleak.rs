//! Fd-leak helpers: the fds open in this process, from `/proc/self/fd`.
//!
//! Other tests of the same binary open and close fds concurrently, so a leak check belongs
//! in a test binary of its own (or compares only fds it can attribute).

use std::collections::BTreeSet;
use std::fs;

/// The fd numbers open in this process (the directory listing's own fd excluded).
pub fn open_fds() -> BTreeSet<i32> {
    let entries = fs::read_dir("/proc/self/fd").expect("read /proc/self/fd");
    let listed: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory stream's fd was open while listing and is closed now.
    listed
        .into_iter()
        .filter(|fd| fs::read_link(format!("/proc/self/fd/{fd}")).is_ok())
        .collect()
}

/// How many fds are open in this process.
pub fn fd_count() -> usize {
    open_fds().len()
}

/// What each fd in `fds` points to (`/proc/self/fd/N` link targets), for failure messages.
pub fn describe(fds: &BTreeSet<i32>) -> Vec<String> {
    fds.iter()
        .map(|fd| {
            let target = fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "?".to_owned());
            format!("{fd} -> {target}")
        })
        .collect()
}

/// Panics listing the fds open now that were not in `before`.
pub fn assert_no_new_fds(before: &BTreeSet<i32>) {
    let now = open_fds();
    let new: BTreeSet<i32> = now.difference(before).copied().collect();
    assert!(new.is_empty(), "leaked fds: {:?}", describe(&new));
}
