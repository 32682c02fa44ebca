//! The crate's raw system calls, behind safe functions: the only module allowed to use
//! `unsafe` (the workspace denies `unsafe_code`; lib.rs allows it here alone). Fds come in
//! as `BorrowedFd`/`impl AsFd` and go out as `File`/`OwnedFd`; a raw fd never leaves this
//! module.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::Epoll;

/// `fd` as an `OwnedFd` if the call that returned it succeeded, the OS error otherwise.
///
/// Only for fds a system call just created: they are open and owned by nobody else.
fn created(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: every caller passes the result of a call that creates an fd, checked above:
    // `fd` is open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new close-on-exec eventfd with a zero counter, non-blocking if `nonblocking`.
pub(crate) fn eventfd(nonblocking: bool) -> io::Result<File> {
    let flags = libc::EFD_CLOEXEC | if nonblocking { libc::EFD_NONBLOCK } else { 0 };
    // SAFETY: eventfd takes no pointers; the flags are valid constants.
    created(unsafe { libc::eventfd(0, flags) }).map(File::from)
}

/// A new close-on-exec memfd named `name` of `size` zero bytes; sealed against shrinking
/// and growing (and further seals) if `sealed`.
pub(crate) fn memfd(name: &CStr, size: u64, sealed: bool) -> io::Result<File> {
    let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: `name` is a NUL-terminated string that outlives the call; memfd_create keeps
    // no pointer to it.
    let file = File::from(created(unsafe {
        libc::memfd_create(name.as_ptr(), flags)
    })?);
    file.set_len(size)?;
    if sealed {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an int argument; the fd is the memfd owned by `file`.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// A close-on-exec, non-blocking timerfd on the monotonic clock that expires every `period`.
pub(crate) fn periodic_timer(period: Duration) -> io::Result<File> {
    let flags = libc::TFD_CLOEXEC | libc::TFD_NONBLOCK;
    // SAFETY: timerfd_create takes no pointers; the flags are valid constants.
    let file = File::from(created(unsafe {
        libc::timerfd_create(libc::CLOCK_MONOTONIC, flags)
    })?);
    let spec = libc::timespec {
        tv_sec: libc::time_t::try_from(period.as_secs()).unwrap_or(libc::time_t::MAX),
        // Under a second by construction: the nanoseconds of a `Duration` are below 10^9.
        tv_nsec: libc::c_long::from(period.subsec_nanos()),
    };
    let value = libc::itimerspec {
        it_interval: spec,
        it_value: spec,
    };
    // SAFETY: `value` is a valid itimerspec that lives across the call; the old value
    // pointer may be null; `file` keeps the fd open.
    let rc = unsafe { libc::timerfd_settime(file.as_raw_fd(), 0, &value, std::ptr::null_mut()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// The file status flags of `fd` (`F_GETFL`).
fn status_flags(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL on a borrowed, live fd; no pointers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Sets `O_NONBLOCK` on `fd` unless it is set already.
pub(crate) fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let fd = fd.as_fd();
    let flags = status_flags(fd)?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL with an integer argument on a borrowed, live fd; no pointers.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether `O_NONBLOCK` is set on `fd`.
#[cfg(test)]
pub(crate) fn is_nonblocking(fd: impl AsFd) -> io::Result<bool> {
    Ok(status_flags(fd.as_fd())? & libc::O_NONBLOCK != 0)
}

/// Whether `FD_CLOEXEC` is set on `fd`.
#[cfg(test)]
pub(crate) fn is_cloexec(fd: impl AsFd) -> io::Result<bool> {
    // SAFETY: F_GETFD on a borrowed, live fd reads its flags and changes nothing.
    let flags = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// A new close-on-exec pipe: (read end, write end).
#[cfg(test)]
pub(crate) fn pipe() -> io::Result<(File, File)> {
    let mut ends = [0; 2];
    // SAFETY: `ends` is a valid out-pointer with room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((File::from(created(ends[0])?), File::from(created(ends[1])?)))
}

/// Whether `fd` is readable within `timeout` (one `poll(2)`; a zero timeout does not block).
pub(crate) fn readable_within(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd that lives across the call, matching the count of
    // 1; the fd is borrowed, so open for the whole call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// The fd of vmm-sys-util's `Epoll`, which implements `AsRawFd` but not `AsFd`.
pub(crate) fn epoll_fd(epoll: &Epoll) -> BorrowedFd<'_> {
    // SAFETY: `Epoll` owns its fd and closes it only in its `Drop`; the borrow is tied to
    // `&epoll`, which keeps the `Epoll` alive.
    unsafe { BorrowedFd::borrow_raw(epoll.as_raw_fd()) }
}

/// Takes ownership of fd number `fd`, inherited from the process that started this one
/// (the `--fd` convention of `conventions`, this function's one caller), if it is open.
///
/// Sound only because of that convention: the starting process handed `fd` to this
/// process to own, and nothing else in the program holds it.
pub(crate) fn adopt_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // OwnedFd must hold an open fd: check that this one is open before adopting it.
    // SAFETY: F_GETFD on any fd number reads its flags (or fails with EBADF); no pointers.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked just above) and, by the --fd convention, was handed to
    // this process to own; nothing else in this program uses it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `madvise(MADV_NOHUGEPAGE)` on `len` bytes at `addr`.
#[cfg(feature = "postcopy")]
pub(crate) fn no_huge_pages(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: MADV_NOHUGEPAGE changes no memory contents and no mapping's protection; on
    // memory that is not mapped the kernel fails with ENOMEM.
    if unsafe { libc::madvise(addr.cast(), len, libc::MADV_NOHUGEPAGE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How many times the calling thread was switched out involuntarily (preempted by another
/// task on its CPU) since it started: `getrusage(RUSAGE_THREAD)`'s `ru_nivcsw`; 0 if the call
/// fails (it cannot for this thread).
pub(crate) fn involuntary_switches() -> u64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into the struct we own and keeps no pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0;
    }
    u64::try_from(usage.ru_nivcsw).unwrap_or(0)
}
