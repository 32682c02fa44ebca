//! Helpers shared by this crate's tests.

use std::fs::File;

/// A memfd of `len` zero bytes.
pub(crate) fn memfd(len: u64) -> File {
    crate::sys::memfd(len).expect("memfd_create")
}

/// A non-blocking eventfd, and a second handle on it (one to install, one to observe).
pub(crate) fn eventfd_pair() -> (File, File) {
    let file = crate::sys::eventfd().expect("eventfd");
    let other = file.try_clone().expect("dup");
    (file, other)
}
