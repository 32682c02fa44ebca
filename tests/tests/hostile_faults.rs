//! Frontends that fail at the worst moment: disconnecting mid-header or mid-body, stalling
//! mid-message, closing while the daemon writes replies, vanishing while the queue is busy
//! (then reconnecting), and a device whose `handle_event` panics. The daemon must not hang,
//! must serve the next frontend, and must not leak what the dead connection held.
//!
//! The tests of this binary take a lock so that they run one at a time (fd counting).

use std::net::Shutdown;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vu_backend::DaemonError;
use vu_proto::header::{Header, HeaderFlags};
use vu_proto::message::FrontendRequest;
use vu_proto::payload::Inflight;
use vu_proto::request::FrontendReq;
use vu_tests::daemon_support::within;
use vu_tests::fdleak::{assert_no_new_fds, open_fds};
use vu_tests::hostile::{
    descriptor, HostileDaemon, RawRing, DESC_NEXT, DESC_WRITE, HOSTILE_TIMEOUT,
};
use vu_tests::virtqueue::DriverMemory;

type R<'a> = FrontendRequest<BorrowedFd<'a>>;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The message timeout of the stall tests: short, so that the test is quick; the wait for
/// the close is bounded by the read timeout of [`Hostile`].
const SHORT_TIMEOUT: Duration = Duration::from_millis(200);

/// The next frontend is served from scratch.
fn next_is_served(daemon: &HostileDaemon) {
    let fe = daemon.negotiated();
    assert_ne!(fe.get_features(), 0);
}

fn header_bytes(req: FrontendReq, size: u32) -> [u8; Header::SIZE] {
    Header::new(req, HeaderFlags::NEED_REPLY, size).to_bytes()
}

#[test]
fn frontend_that_disconnects_mid_header_is_forgotten() {
    let _serial = serial();
    let before = open_fds();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    let fe = daemon.negotiated();
    fe.write_bytes(&header_bytes(FrontendReq::SetVringNum, 8)[..5]);
    drop(fe);
    next_is_served(&daemon);
    daemon.stop();
    assert_no_new_fds(&before);
}

#[test]
fn frontend_that_disconnects_mid_body_is_forgotten() {
    let _serial = serial();
    let before = open_fds();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    let fe = daemon.negotiated();
    fe.write_bytes(&header_bytes(FrontendReq::SetVringAddr, 40));
    fe.write_bytes(&[0; 12]);
    drop(fe);
    next_is_served(&daemon);
    daemon.stop();
    assert_no_new_fds(&before);
}

#[test]
fn frontend_that_stalls_mid_header_is_dropped_after_the_message_timeout() {
    let _serial = serial();
    let daemon = HostileDaemon::serving(Some(SHORT_TIMEOUT));
    let fe = daemon.negotiated();
    fe.write_bytes(&header_bytes(FrontendReq::SetVringNum, 8)[..6]);
    assert!(fe.is_closed_by_peer(), "the stalled connection was kept");
    next_is_served(&daemon);
    daemon.stop();
}

#[test]
fn frontend_that_stalls_mid_body_is_dropped_after_the_message_timeout() {
    let _serial = serial();
    let daemon = HostileDaemon::serving(Some(SHORT_TIMEOUT));
    let fe = daemon.negotiated();
    fe.write_bytes(&header_bytes(FrontendReq::SetVringNum, 8));
    fe.write_bytes(&[0; 3]);
    assert!(fe.is_closed_by_peer(), "the stalled connection was kept");
    next_is_served(&daemon);
    daemon.stop();
}

#[test]
fn frontend_that_closes_while_replies_are_written_is_forgotten() {
    let _serial = serial();
    let before = open_fds();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    let fe = daemon.negotiated();
    // Requests whose replies carry fds and bytes, and never read.
    for _ in 0..64 {
        fe.ask(&R::GetInflightFd(Inflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 256,
        }))
        .unwrap();
        fe.ask(&R::GetFeatures).unwrap();
    }
    fe.endpoint.stream().shutdown(Shutdown::Read).unwrap();
    drop(fe);
    next_is_served(&daemon);
    daemon.stop();
    assert_no_new_fds(&before);
}

/// Writes an echo request of `len` bytes into descriptors 0 and 1.
fn echo_request(memory: &DriverMemory, ring: &RawRing, len: u32) {
    let data = ring.data.0;
    ring.write_desc(memory.mem(), 0, descriptor(data, len, DESC_NEXT, 1));
    ring.write_desc(
        memory.mem(),
        1,
        descriptor(data + 0x8000, len, DESC_WRITE, 0),
    );
}

#[test]
fn frontend_that_vanishes_mid_io_can_reconnect_and_do_io() {
    let _serial = serial();
    let before = open_fds();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    {
        let fe = daemon.negotiated();
        let (memory, mut ring) = fe.start_ring(64);
        echo_request(&memory, &ring, 0x4000);
        // Keep the device busy, then cut the connection with chains still available.
        for _ in 0..1000 {
            ring.offer(memory.mem(), 0);
        }
        fe.endpoint.stream().shutdown(Shutdown::Both).unwrap();
    }
    // A new frontend, new memory, new rings: served as if nothing happened.
    let fe = daemon.negotiated();
    let (memory, mut ring) = fe.start_ring(64);
    echo_request(&memory, &ring, 64);
    let used = ring.used_idx(memory.mem());
    ring.offer(memory.mem(), 0);
    ring.wait_used(memory.mem(), used.wrapping_add(1));
    assert_eq!(ring.used_elem(memory.mem(), used), (0, 64));
    drop((fe, memory, ring));
    daemon.stop();
    assert_no_new_fds(&before);
}

#[test]
fn panic_in_handle_event_is_reported_and_the_daemon_does_not_hang() {
    let _serial = serial();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    let fe = daemon.negotiated();
    let (memory, mut ring) = fe.start_ring(64);
    echo_request(&memory, &ring, 64);
    daemon.backend.panic.store(true, Ordering::SeqCst);
    ring.offer(memory.mem(), 0);
    let HostileDaemon {
        mut daemon, path, ..
    } = daemon;
    let result = within(HOSTILE_TIMEOUT, "wait after a panic", move || daemon.wait());
    match result {
        Err(DaemonError::BackendPanicked { message, .. }) => {
            assert!(message.contains("told to panic"), "{message}");
        }
        other => panic!("expected the panic to be reported, got {other:?}"),
    }
    // The frontend sees the connection close; nobody answers on the socket any more.
    assert!(fe.is_closed_by_peer());
    assert!(vu_proto::socket::Endpoint::connect(&path).is_err());
}
