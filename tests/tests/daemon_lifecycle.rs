//! The life of a `VhostUserDaemon`: reconnection, the ways it stops, errors surfacing in
//! `wait`, client mode, and construction errors.

use std::time::Duration;

use vu_backend::{DaemonError, VhostUserDaemon, VringMutex};
use vu_proto::frontend::Frontend;
use vu_proto::listener::Listener;
use vu_proto::socket::Endpoint;
use vu_tests::backends::EchoBackend;
use vu_tests::daemon_support::{within, Running};
use vu_tests::device::{socket_path, DeviceSetup, TestDevice, DEVICE_TIMEOUT};
use vu_tests::virtqueue::Buf;

const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn echo() -> EchoBackend<VringMutex> {
    EchoBackend::new(1, 256)
}

fn round_trip(dev: &mut TestDevice) {
    let queue = dev.queue(0);
    queue.post_and_kick(&[Buf::Readable(b"ping".to_vec()), Buf::Writable(4)]);
    let used = queue.wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].written, vec![b"ping".to_vec()]);
}

#[test]
fn reconnecting_frontend_is_served_by_the_same_daemon() {
    let running = Running::serving(echo());
    let mut first = running.device(&DeviceSetup::default());
    round_trip(&mut first);
    drop(first);
    let mut second = running.device(&DeviceSetup::default());
    round_trip(&mut second);
    // The first connection's end reset the device.
    assert!(
        running
            .backend
            .resets
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
}

#[test]
fn single_connection_start_returns_from_wait_when_the_frontend_leaves() {
    let mut running = Running::built(echo());
    let listener = running.listener();
    running.daemon.start(listener).unwrap();
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
    drop(dev);
    let mut daemon = running.daemon;
    let (daemon, result) = within(STOP_TIMEOUT, "wait", move || {
        let r = daemon.wait();
        (daemon, r)
    });
    result.unwrap();
    drop(daemon);
}

#[test]
fn daemon_can_be_started_again_after_a_single_connection() {
    let mut running = Running::built(echo());
    running.daemon.start(running.listener()).unwrap();
    drop(running.device(&DeviceSetup::default()));
    running.daemon.wait().unwrap();
    std::fs::remove_file(&running.path).ok();
    running.daemon.start(running.listener()).unwrap();
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
}

#[test]
fn exit_event_stops_the_daemon() {
    let running = Running::serving(echo().with_exit_events(1));
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
    running.backend.write_exit_event(0);
    let mut daemon = running.daemon;
    within(STOP_TIMEOUT, "wait after the exit event", move || {
        daemon.wait()
    })
    .unwrap();
}

#[test]
fn send_exit_event_through_the_epoll_handler_stops_the_daemon() {
    let running = Running::serving(echo().with_exit_events(1));
    running.daemon.get_epoll_handlers()[0]
        .send_exit_event()
        .unwrap();
    let mut daemon = running.daemon;
    within(STOP_TIMEOUT, "wait after the exit event", move || {
        daemon.wait()
    })
    .unwrap();
}

#[test]
fn shutdown_handle_stops_an_idle_daemon() {
    let running = Running::serving(echo());
    let handle = running.daemon.shutdown_handle();
    std::thread::spawn(move || handle.shutdown());
    let mut daemon = running.daemon;
    within(STOP_TIMEOUT, "wait after shutdown", move || daemon.wait()).unwrap();
}

#[test]
fn shutdown_handle_stops_a_connected_daemon() {
    let running = Running::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
    running.daemon.shutdown_handle().shutdown();
    let mut daemon = running.daemon;
    within(STOP_TIMEOUT, "wait after shutdown", move || daemon.wait()).unwrap();
    // The frontend sees the connection closed.
    assert!(dev.frontend.get_features().is_err());
}

#[test]
fn shutdown_is_not_held_by_a_frontend_stalled_mid_message() {
    let mut running = Running::built(echo());
    // No message timeout: only the shutdown can free the connection thread.
    running.daemon.set_message_timeout(None);
    running.daemon.start_serving(running.listener()).unwrap();
    let mut stalled = running.frontend();
    // A full exchange first: the daemon is now serving this connection.
    stalled.get_features().unwrap();
    // Then half a header: the daemon blocks reading the rest (or sees the stop first).
    stalled
        .endpoint()
        .send(&[&[1, 0, 0, 0, 1, 0]], &[])
        .unwrap();
    let handle = running.daemon.shutdown_handle();
    handle.shutdown();
    let mut daemon = running.daemon;
    within(STOP_TIMEOUT, "wait with a stalled frontend", move || {
        daemon.wait()
    })
    .unwrap();
    drop(stalled);
}

#[test]
fn frontend_stalled_mid_message_is_dropped_after_the_message_timeout() {
    let mut running = Running::built(echo());
    running
        .daemon
        .set_message_timeout(Some(Duration::from_millis(200)));
    running.daemon.start_serving(running.listener()).unwrap();
    let stalled = Endpoint::connect(&running.path).unwrap();
    stalled.send(&[&[1, 0, 0, 0]], &[]).unwrap();
    // The daemon gives up on the stalled frontend and accepts the next one.
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
    drop(stalled);
}

#[test]
fn dropping_a_connected_daemon_without_exit_event_does_not_hang() {
    let running = Running::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
    let daemon = running.daemon;
    within(STOP_TIMEOUT, "drop", move || drop(daemon));
}

#[test]
fn dropping_a_daemon_never_started_does_not_hang() {
    let running = Running::built(echo());
    let daemon = running.daemon;
    within(STOP_TIMEOUT, "drop", move || drop(daemon));
}

#[test]
fn handle_event_error_surfaces_in_wait() {
    let running = Running::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    running.backend.fail_on(0);
    dev.queue(0).post_and_kick(&[Buf::Writable(1)]);
    let mut daemon = running.daemon;
    let err = within(STOP_TIMEOUT, "wait after a backend error", move || {
        daemon.wait()
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            DaemonError::HandleEvent {
                thread: 0,
                device_event: 0,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn handle_event_panic_is_caught_and_surfaces_in_wait() {
    let running = Running::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    running.backend.panic_on(0);
    dev.queue(0).post_and_kick(&[Buf::Writable(1)]);
    let mut daemon = running.daemon;
    let err = within(STOP_TIMEOUT, "wait after a backend panic", move || {
        daemon.wait()
    })
    .unwrap_err();
    match err {
        DaemonError::BackendPanicked {
            device_event: 0,
            message,
            ..
        } => assert!(message.contains("told to panic"), "{message}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn stopped_daemon_refuses_to_start_again() {
    let mut running = Running::built(echo());
    running.daemon.stop().unwrap();
    let err = running.daemon.start(running.listener()).unwrap_err();
    assert!(matches!(err, DaemonError::Stopped), "{err}");
}

#[test]
fn client_mode_connects_to_a_listening_frontend() {
    let (_dir, path) = socket_path();
    let listener = Listener::bind(&path).unwrap();
    let mut daemon = VhostUserDaemon::new(
        "vu-client".to_owned(),
        echo(),
        vu_backend::GuestMemoryAtomic::new(vu_backend::GuestMemoryMmap::new()),
    )
    .unwrap();
    daemon.start_client(&path).unwrap();
    let endpoint = listener.accept().unwrap();
    let mut dev = TestDevice::setup(Frontend::new(endpoint), &DeviceSetup::default());
    round_trip(&mut dev);
    drop(dev);
    within(STOP_TIMEOUT, "wait after the frontend left", move || {
        daemon.wait()
    })
    .unwrap();
}

#[test]
fn queue_in_no_thread_is_refused_at_construction() {
    let backend = EchoBackend::<VringMutex>::new(3, 256).with_threads(vec![0b011]);
    let err = VhostUserDaemon::new(
        "vu-bad".to_owned(),
        backend,
        vu_backend::GuestMemoryAtomic::new(vu_backend::GuestMemoryMmap::new()),
    )
    .unwrap_err();
    assert!(
        matches!(err, DaemonError::QueueWithoutThread { queue: 2 }),
        "{err}"
    );
}

#[test]
fn max_queue_size_that_is_no_ring_size_is_refused_at_construction() {
    let backend = EchoBackend::<VringMutex>::new(1, 100);
    let err = VhostUserDaemon::new(
        "vu-bad".to_owned(),
        backend,
        vu_backend::GuestMemoryAtomic::new(vu_backend::GuestMemoryMmap::new()),
    )
    .unwrap_err();
    assert!(matches!(err, DaemonError::Vring { queue: 0, .. }), "{err}");
}

/// A daemon whose connection thread polls for the next message for `budget`.
fn polling_for(budget: Duration) -> Running {
    let mut running = Running::built(echo());
    running.daemon.set_message_polling(budget);
    running.daemon.start_serving(running.listener()).unwrap();
    running
}

#[test]
fn messages_are_served_while_the_connection_thread_polls() {
    // A budget far longer than the test: every message after the first arrives while the
    // thread is polling.
    let running = polling_for(Duration::from_secs(3600));
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
    round_trip(&mut dev);
    dev.frontend.get_features().unwrap();
}

#[test]
fn shutdown_stops_a_daemon_polling_for_the_next_message() {
    let running = polling_for(Duration::from_secs(3600));
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
    dev.frontend.get_features().unwrap();
    running.daemon.shutdown_handle().shutdown();
    let mut daemon = running.daemon;
    within(STOP_TIMEOUT, "wait after shutdown", move || daemon.wait()).unwrap();
    assert!(dev.frontend.get_features().is_err());
}

#[test]
fn frontend_leaving_while_the_daemon_polls_frees_it_for_the_next() {
    let running = polling_for(Duration::from_secs(3600));
    let mut first = running.device(&DeviceSetup::default());
    round_trip(&mut first);
    drop(first);
    let mut second = running.device(&DeviceSetup::default());
    round_trip(&mut second);
}

#[test]
fn zero_polling_budget_blocks_at_once_and_serves_as_before() {
    let running = polling_for(Duration::ZERO);
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev);
    dev.frontend.get_features().unwrap();
}
