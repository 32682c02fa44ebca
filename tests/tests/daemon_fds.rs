//! Fds of the daemon: none leaks across a connection, a stop and a drop, and every fd the
//! daemon opens is close-on-exec. One test in this binary, so that no other test opens or
//! closes fds meanwhile.

use std::collections::BTreeSet;
use std::time::Duration;

use vu_backend::VringMutex;
use vu_tests::backends::EchoBackend;
use vu_tests::daemon_support::{within, Running};
use vu_tests::device::{DeviceSetup, DEVICE_TIMEOUT};
use vu_tests::fdleak::{assert_no_new_fds, describe, open_fds};
use vu_tests::virtqueue::Buf;

// The daemon's fds are known here by number only (from /proc/self/fd).
#[allow(unsafe_code)]
fn is_cloexec(fd: i32) -> bool {
    // SAFETY: F_GETFD reads the flags of an fd number and changes nothing; an fd closed
    // meanwhile yields -1, which reads as "not close-on-exec" and fails the test loudly.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC != 0
}

#[test]
fn daemon_opens_only_cloexec_fds_and_leaks_none() {
    let before = open_fds();

    let running = Running::serving(EchoBackend::<VringMutex>::new(2, 256).with_threads(vec![1, 2]));
    let daemon_fds: BTreeSet<i32> = open_fds().difference(&before).copied().collect();
    let not_cloexec: BTreeSet<i32> = daemon_fds
        .iter()
        .copied()
        .filter(|&fd| !is_cloexec(fd))
        .collect();
    assert!(
        not_cloexec.is_empty(),
        "not close-on-exec: {:?}",
        describe(&not_cloexec)
    );

    for _ in 0..2 {
        let mut dev = running.device(&DeviceSetup {
            queues: 2,
            ..DeviceSetup::default()
        });
        dev.queue(1)
            .post_and_kick(&[Buf::Readable(vec![1]), Buf::Writable(1)]);
        dev.queue(1).wait_used(1, DEVICE_TIMEOUT);
        // GET_VRING_BASE stops the ring: its kick stays with the daemon no longer.
        dev.stop_queue(1);
    }

    running.daemon.shutdown_handle().shutdown();
    let Running { mut daemon, .. } = running;
    let daemon = within(Duration::from_secs(10), "wait", move || {
        daemon.wait().unwrap();
        daemon
    });
    drop(daemon);
    assert_no_new_fds(&before);
}
