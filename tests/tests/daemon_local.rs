//! The single-threaded `LocalDaemon` with lock-free `VringState` vrings, over a real socket.

use std::time::Duration;

use vu_backend::{DaemonError, EventSet, VringState};
use vu_tests::backends::EchoBackend;
use vu_tests::daemon_support::LocalRunning;
use vu_tests::device::{DeviceSetup, TestDevice, DEVICE_TIMEOUT};
use vu_tests::proto_support::{eventfd, eventfd_fd};
use vu_tests::virtqueue::Buf;

const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn echo() -> EchoBackend<VringState> {
    EchoBackend::new(2, 256)
}

fn round_trip(dev: &mut TestDevice, q: u16) {
    let queue = dev.queue(q);
    queue.post_and_kick(&[
        Buf::Readable(b"lo".to_vec()),
        Buf::Readable(b"cal".to_vec()),
        Buf::Writable(8),
    ]);
    let used = queue.wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].len, 5);
    assert_eq!(&used[0].written[0][..5], b"local");
}

#[test]
fn local_daemon_echoes_through_vring_state_without_event_idx() {
    let running = LocalRunning::serving(echo());
    let mut dev = running.device(&DeviceSetup {
        queues: 2,
        ..DeviceSetup::default()
    });
    round_trip(&mut dev, 0);
    round_trip(&mut dev, 1);
    assert_eq!(running.backend.threads_of(1), vec![0]);
}

#[test]
fn local_daemon_echoes_through_vring_state_with_event_idx() {
    let running = LocalRunning::serving(echo());
    let mut dev = running.device(&DeviceSetup {
        event_idx: true,
        ..DeviceSetup::default()
    });
    for _ in 0..50 {
        round_trip(&mut dev, 0);
    }
    assert!(running.backend.event_idx());
}

#[test]
fn local_daemon_serves_a_reconnecting_frontend() {
    let running = LocalRunning::serving(echo());
    let mut first = running.device(&DeviceSetup::default());
    round_trip(&mut first, 0);
    drop(first);
    let mut second = running.device(&DeviceSetup::default());
    round_trip(&mut second, 0);
}

#[test]
fn local_daemon_kick_while_disabled_is_served_after_enable() {
    let running = LocalRunning::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    dev.enable_queue(0, false);
    dev.queue(0)
        .post(&[Buf::Readable(b"x".to_vec()), Buf::Writable(1)]);
    dev.queue(0).kick();
    dev.enable_queue(0, true);
    let used = dev.queue(0).wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].written, vec![b"x".to_vec()]);
}

#[test]
fn shutdown_handle_ends_run() {
    let running = LocalRunning::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev, 0);
    running.handle.shutdown();
    running.result(STOP_TIMEOUT).unwrap();
}

#[test]
fn exit_event_ends_run() {
    let running = LocalRunning::serving(echo().with_exit_events(1));
    running.backend.write_exit_event(0);
    running.result(STOP_TIMEOUT).unwrap();
}

#[test]
fn handle_event_error_is_returned_by_run() {
    let running = LocalRunning::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    running.backend.fail_on(0);
    dev.queue(0).post_and_kick(&[Buf::Writable(1)]);
    let err = running.result(STOP_TIMEOUT).unwrap_err();
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
fn handle_event_panic_is_caught_and_returned_by_run() {
    let running = LocalRunning::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    running.backend.panic_on(0);
    dev.queue(0).post_and_kick(&[Buf::Writable(1)]);
    let err = running.result(STOP_TIMEOUT).unwrap_err();
    assert!(matches!(err, DaemonError::BackendPanicked { .. }), "{err}");
}

#[test]
fn registered_fd_reaches_handle_event_on_the_one_thread() {
    let running = LocalRunning::serving(echo());
    let evt = eventfd();
    running
        .epoll
        .register_listener(eventfd_fd(&evt), EventSet::IN, 9)
        .unwrap();
    evt.write(1).unwrap();
    // The echo backend has no queue 9: handle_event fails and run returns the error.
    let err = running.result(STOP_TIMEOUT).unwrap_err();
    assert!(
        matches!(
            err,
            DaemonError::HandleEvent {
                device_event: 9,
                ..
            }
        ),
        "{err}"
    );
    assert!(running.backend.calls.lock().unwrap().contains(&(9, 0)));
}

#[test]
fn local_daemon_polling_for_messages_serves_queues_and_messages() {
    // A budget longer than the test: the loop polls after every message from here on.
    let running = LocalRunning::polling(echo(), Duration::from_secs(3600));
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev, 0);
    round_trip(&mut dev, 0);
    dev.frontend.get_features().unwrap();
    round_trip(&mut dev, 0);
}

#[test]
fn local_daemon_polling_for_messages_stops_on_shutdown() {
    let running = LocalRunning::polling(echo(), Duration::from_secs(3600));
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev, 0);
    dev.frontend.get_features().unwrap();
    running.handle.shutdown();
    running.result(STOP_TIMEOUT).unwrap();
}

#[test]
fn local_daemon_without_message_polling_serves_as_before() {
    let running = LocalRunning::polling(echo(), Duration::ZERO);
    let mut dev = running.device(&DeviceSetup::default());
    round_trip(&mut dev, 0);
    dev.frontend.get_features().unwrap();
    running.handle.shutdown();
    running.result(STOP_TIMEOUT).unwrap();
}
