//! The crate's raw system calls, behind safe functions: the only module allowed to use
//! `unsafe` (the workspace denies `unsafe_code`; lib.rs allows it here alone). Each function
//! takes fds as `BorrowedFd`/`impl AsFd` and returns owned fds as `File`, so no raw fd leaves
//! this module.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::AtomicU8;

/// A new anonymous memory file named `name`, empty and close-on-exec.
pub(crate) fn memfd(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call, which reads nothing
    // else and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create: it is open and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A new non-blocking, close-on-exec eventfd (for the unit tests' log fds).
#[cfg(test)]
pub(crate) fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd takes no pointers; the flags are valid constants.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd: it is open and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The file system type (`f_type` of `fstatfs`) of the file behind `fd`.
pub(crate) fn fs_type(fd: impl AsFd) -> io::Result<u64> {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is borrowed from a live owner and `stat` is a valid out-pointer.
    let rc = unsafe { libc::fstatfs(fd.as_fd().as_raw_fd(), &mut stat) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs.
    Ok(stat.f_type as u64)
}

/// The size of the file behind `fd` if it is a regular file (memfds included); `None` for
/// any other kind of file, or when `fstat` fails.
pub(crate) fn regular_file_size(fd: impl AsFd) -> Option<u64> {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is borrowed from a live owner and `stat` is a valid out-pointer.
    let rc = unsafe { libc::fstat(fd.as_fd().as_raw_fd(), &mut stat) };
    if rc != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    Some(u64::try_from(stat.st_size).unwrap_or(0))
}

/// The system's page size, if it says.
pub(crate) fn page_size() -> Option<u64> {
    // SAFETY: sysconf reads a constant of the running system and touches no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok()
}

/// A `MAP_SHARED` read-write mapping of part of a file, whose bytes this process reads and
/// writes only as atomics ([`byte`](Self::byte)): another process (the frontend) shares them.
/// Unmapped on drop.
pub(crate) struct SharedBytes {
    /// Start of the mapping, as mmap returned it.
    map: *mut libc::c_void,
    /// Length of the mapping.
    len: usize,
}

// SAFETY: the mapping is plain shared memory; it is only read and written through atomics
// (`byte`), and it is unmapped only on drop, which needs exclusive ownership.
unsafe impl Send for SharedBytes {}
// SAFETY: as above, every shared access goes through `AtomicU8`.
unsafe impl Sync for SharedBytes {}

impl SharedBytes {
    /// Maps `len` bytes of `fd` from `offset`, which must be a multiple of the page size.
    pub(crate) fn map(fd: impl AsFd, offset: libc::off_t, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping (no MAP_FIXED) of a borrowed fd; it replaces no memory of
        // ours, and the result is checked for MAP_FAILED below.
        let map = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                offset,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedBytes { map, len })
    }

    /// The byte at `index` of the mapping, or `None` past its end.
    pub(crate) fn byte(&self, index: usize) -> Option<&AtomicU8> {
        if index >= self.len {
            return None;
        }
        // `index < len` bytes are mapped from `map`, so this stays in the mapping.
        let byte = self.map.cast::<u8>().wrapping_add(index);
        // SAFETY: `byte` points into this live mapping (checked just above); u8 has no
        // alignment needs; this process touches the mapping only through atomics, and the
        // mapping outlives the returned reference, which borrows `self`.
        Some(unsafe { AtomicU8::from_ptr(byte) })
    }
}

impl Drop for SharedBytes {
    fn drop(&mut self) {
        // SAFETY: `map`/`len` are exactly what mmap returned in `SharedBytes::map`, and no
        // reference from `byte` outlives `&self`, so nothing uses the mapping any more.
        unsafe {
            libc::munmap(self.map, self.len);
        }
    }
}
