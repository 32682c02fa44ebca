//! The virtqueue driver of the tests: the facade's test kit ([`vu_backend::testing`]), so that
//! the project's tests and device authors' tests run the same guest-faithful driver; plus a
//! raw-fd wait for tests that watch fds they do not own.

use std::time::Duration;

pub use vu_backend::testing::{Buf, DriverMemory, SplitQueue, Used, BUF_SIZE, GPA_BASE};

/// Waits until raw fd `fd` is readable or `timeout` passes; returns whether it is readable.
// A raw fd number (of a process under test, say) cannot be borrowed safely: `poll` on it is
// this helper's `unsafe`.
#[allow(unsafe_code)]
pub fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    // SAFETY: `pfd` is a valid pollfd that lives across the call, and the count is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// The calling thread's voluntary context switches so far (`getrusage(RUSAGE_THREAD)`'s
/// `ru_nvcsw`): its blocking waits.
#[allow(unsafe_code)]
pub fn voluntary_switches() -> u64 {
    // SAFETY: all zeroes is a valid rusage (integers and timevals) for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `usage`, which outlives the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    u64::try_from(usage.ru_nvcsw).unwrap_or(0)
}
