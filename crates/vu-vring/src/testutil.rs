//! Helpers shared by this crate's tests.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

/// A memfd of `len` zero bytes.
pub(crate) fn memfd(len: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string that memfd_create does not keep.
    let fd = unsafe { libc::memfd_create(c"vu-vring-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len).unwrap();
    file
}
