//! SIGTERM while the queue is busy: the daemon stops cleanly (`wait` returns `Ok`), in time,
//! with nothing left open.
//!
//! The signal is real (`kill(getpid(), SIGTERM)`) and is handled the way the example devices
//! handle it (`vu_blk`): the handler only writes an eventfd, which is async-signal-safe, and a
//! thread waiting on that eventfd calls [`ShutdownHandle::shutdown`]. What is tested is the
//! library's shutdown path under a signal in the middle of traffic; spawning the example
//! binary instead would need its path, which cargo does not give to another package's tests.
//! This binary holds this one test, because a signal handler is process-wide.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vu_tests::daemon_support::within;
use vu_tests::fdleak::{assert_no_new_fds, open_fds};
use vu_tests::hostile::{descriptor, HostileDaemon, DESC_NEXT, DESC_WRITE, HOSTILE_TIMEOUT};
use vu_tests::virtqueue::wait_readable;

/// Written by the signal handler.
static STOP_EVENT: OnceLock<EventFd> = OnceLock::new();

extern "C" fn on_sigterm(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    if let Some(event) = STOP_EVENT.get() {
        let _ = event.write(1);
    }
}

#[test]
fn sigterm_during_traffic_stops_the_daemon_cleanly() {
    let before = open_fds();
    let stop_event = EventFd::new(0).unwrap();
    let waiter = stop_event.try_clone().unwrap();
    assert!(STOP_EVENT.set(stop_event).is_ok());
    vmm_sys_util::signal::register_signal_handler(libc::SIGTERM, on_sigterm).unwrap();

    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    let shutdown = daemon.daemon.shutdown_handle();
    let signals = thread::spawn(move || {
        if waiter.read().is_ok() {
            shutdown.shutdown();
        }
    });

    // Traffic: the guest posts requests as fast as the device completes them, until the
    // connection dies.
    let fe = daemon.negotiated();
    let (memory, mut ring) = fe.start_ring(64);
    let data = ring.data.0;
    ring.write_desc(memory.mem(), 0, descriptor(data, 4096, DESC_NEXT, 1));
    ring.write_desc(
        memory.mem(),
        1,
        descriptor(data + 0x8000, 4096, DESC_WRITE, 0),
    );
    let served = Arc::new(AtomicBool::new(false));
    let traffic = {
        let served = served.clone();
        thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let deadline = Instant::now() + HOSTILE_TIMEOUT;
            let mut completed = 0u32;
            while Instant::now() < deadline {
                let used = ring.used_idx(memory.mem());
                ring.offer(memory.mem(), 0);
                // Each completion is signalled on the call eventfd; a stopped device signals
                // nothing more and the loop ends at the deadline or when the socket dies.
                let mut done = false;
                while !done && Instant::now() < deadline {
                    wait_readable(ring.call.as_raw_fd(), Duration::from_millis(50));
                    let _ = ring.call.read();
                    done = ring.used_idx(memory.mem()) != used;
                    if !done && fe.is_closed_by_peer_now() {
                        return completed;
                    }
                }
                completed += 1;
                if completed == 100 {
                    served.store(true, Ordering::SeqCst);
                }
            }
            completed
        })
    };
    // Signal once traffic is flowing.
    within(HOSTILE_TIMEOUT, "traffic starting", {
        let served = served.clone();
        move || {
            while !served.load(Ordering::SeqCst) {
                thread::yield_now();
            }
        }
    });
    sigterm_self();

    let HostileDaemon { mut daemon, .. } = daemon;
    let result = within(HOSTILE_TIMEOUT, "wait after SIGTERM", move || daemon.wait());
    assert!(result.is_ok(), "{result:?}");
    let completed = within(HOSTILE_TIMEOUT, "the traffic thread", move || {
        traffic.join().unwrap()
    });
    assert!(completed >= 100, "{completed}");
    signals.join().unwrap();
    assert_no_new_fds(&before_plus_stop_event(&before));
}

/// `before`, plus the stop eventfd this test keeps in its static for the process's life.
fn before_plus_stop_event(
    before: &std::collections::BTreeSet<i32>,
) -> std::collections::BTreeSet<i32> {
    use std::os::fd::AsRawFd;
    let mut fds = before.clone();
    if let Some(event) = STOP_EVENT.get() {
        fds.insert(event.as_raw_fd());
    }
    fds
}

/// Sends SIGTERM to this process, as a service manager would.
#[allow(unsafe_code)] // kill(2), which std does not wrap.
fn sigterm_self() {
    // SAFETY: kill with our own pid and a valid signal number.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
}
