//! Adaptive polling (`VhostUserDaemon::set_polling`) over a real socket: a polled queue serves
//! chains the driver publishes without kicking and asks the driver not to kick while it
//! polls, kicks are never lost (EVENT_IDX on and off,
//! across the ring wrap, after the window closed), and a polling worker still stops, quiesces
//! for `GET_VRING_BASE` and serves its other queues. No timing is asserted: the windows are
//! either far longer than any test (so that polling is certainly on) or as short as possible
//! (so that only kicks can serve the chain).

use std::time::Duration;

use vu_tests::backends::EchoBackend;
use vu_tests::daemon_support::{echo_bursts, within, Running};
use vu_tests::device::{DeviceSetup, TestDevice, DEVICE_TIMEOUT};
use vu_tests::virtqueue::Buf;

/// A window no test outlives: while it is open the worker certainly polls.
const FOREVER: Duration = Duration::from_secs(3600);

fn echo(queues: usize) -> EchoBackend<vu_backend::VringMutex> {
    EchoBackend::new(queues, 256)
}

fn setup(event_idx: bool) -> DeviceSetup {
    DeviceSetup {
        event_idx,
        queue_size: 16,
        ..DeviceSetup::default()
    }
}

/// Posts one chain with a kick (if the device wants one) and checks the echo.
fn round_trip(dev: &mut TestDevice, q: u16, tag: u8) {
    let queue = dev.queue(q);
    queue.post_and_kick(&[Buf::Readable(vec![tag; 4]), Buf::Writable(4)]);
    let used = queue.wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].written, vec![vec![tag; 4]]);
}

fn unkicked_chain_is_served(event_idx: bool) {
    let running = Running::serving(echo(1));
    running.daemon.set_polling(0, FOREVER).unwrap();
    let mut dev = running.device(&setup(event_idx));
    // The first chain is kicked: serving it opens the polling window.
    round_trip(&mut dev, 0, 1);
    // The next ones are only published: the polling worker finds them.
    for tag in 2..40u8 {
        let queue = dev.queue(0);
        queue.post(&[Buf::Readable(vec![tag; 4]), Buf::Writable(4)]);
        let used = queue.wait_used(1, DEVICE_TIMEOUT);
        assert_eq!(used[0].written, vec![vec![tag; 4]]);
    }
}

#[test]
fn polled_queue_serves_chains_published_without_a_kick() {
    unkicked_chain_is_served(false);
}

#[test]
fn polled_queue_serves_chains_published_without_a_kick_with_event_idx() {
    unkicked_chain_is_served(true);
}

/// While its window is open, the polled queue asks the driver not to kick: at most the first
/// chain after the window opened (EVENT_IDX's `avail_event` is left where the kicked pass put
/// it) comes with a kick.
fn polled_queue_holds_kicks_off(event_idx: bool) {
    let running = Running::serving(echo(1));
    running.daemon.set_polling(0, FOREVER).unwrap();
    let mut dev = running.device(&setup(event_idx));
    round_trip(&mut dev, 0, 1);
    let mut kicks = 0;
    for tag in 2..40u8 {
        let queue = dev.queue(0);
        let old = queue.avail_idx();
        queue.post(&[Buf::Readable(vec![tag; 4]), Buf::Writable(4)]);
        if queue.needs_kick(old) {
            kicks += 1;
            queue.kick();
        }
        let used = queue.wait_used(1, DEVICE_TIMEOUT);
        assert_eq!(used[0].written, vec![vec![tag; 4]]);
    }
    assert!(kicks <= 1, "{kicks} kicks asked for 38 polled chains");
}

#[test]
fn polled_queue_holds_kicks_off_without_event_idx() {
    polled_queue_holds_kicks_off(false);
}

#[test]
fn polled_queue_holds_kicks_off_with_event_idx() {
    polled_queue_holds_kicks_off(true);
}

fn kicked_chains_all_complete(event_idx: bool, budget: Duration) {
    let running = Running::serving(echo(1));
    running.daemon.set_polling(0, budget).unwrap();
    let mut dev = running.device(&setup(event_idx));
    let queue = dev.queue(0);
    // More chains than the ring has entries, in bursts: the indexes wrap, windows open and
    // close, and every chain must come back.
    echo_bursts(queue, 30);
}

#[test]
fn no_kick_is_lost_while_polling_without_event_idx() {
    kicked_chains_all_complete(false, FOREVER);
}

#[test]
fn no_kick_is_lost_while_polling_with_event_idx() {
    kicked_chains_all_complete(true, FOREVER);
}

#[test]
fn no_kick_is_lost_when_windows_close_at_once_with_event_idx() {
    // A one-nanosecond window closes before the worker can look at the ring: every chain is
    // served because of its kick, so the re-armed notifications must be right.
    kicked_chains_all_complete(true, Duration::from_nanos(1));
}

#[test]
fn no_kick_is_lost_when_windows_close_at_once_without_event_idx() {
    kicked_chains_all_complete(false, Duration::from_nanos(1));
}

#[test]
fn polling_turned_off_again_still_serves_kicks() {
    let running = Running::serving(echo(1));
    running.daemon.set_polling(0, FOREVER).unwrap();
    let mut dev = running.device(&setup(true));
    round_trip(&mut dev, 0, 1);
    running.daemon.set_polling(0, Duration::ZERO).unwrap();
    for tag in 2..10 {
        round_trip(&mut dev, 0, tag);
    }
}

#[test]
fn ring_stopped_while_polled_returns_its_base_and_restarts() {
    let running = Running::serving(echo(1));
    running.daemon.set_polling(0, FOREVER).unwrap();
    let mut dev = running.device(&setup(true));
    round_trip(&mut dev, 0, 1);
    round_trip(&mut dev, 0, 2);
    // GET_VRING_BASE waits until no dispatch runs on the worker; a spinning worker holds
    // nothing, so it answers, with the index after the two chains.
    assert_eq!(dev.stop_queue(0), 2);
    dev.start_queue(0, 2);
    dev.enable_queue(0, true);
    round_trip(&mut dev, 0, 3);
}

#[test]
fn other_queue_of_a_polling_worker_is_served() {
    let running = Running::serving(echo(2));
    running.daemon.set_polling(0, FOREVER).unwrap();
    let setup = DeviceSetup {
        queues: 2,
        ..setup(true)
    };
    let mut dev = running.device(&setup);
    // Queue 0 opens a window that never closes; queue 1's kicks still get through.
    round_trip(&mut dev, 0, 1);
    for tag in 2..10 {
        round_trip(&mut dev, 1, tag);
    }
    assert_eq!(running.backend.threads_of(1), vec![0]);
}

#[test]
fn daemon_stops_while_a_worker_polls() {
    let running = Running::serving(echo(1));
    running.daemon.set_polling(0, FOREVER).unwrap();
    let mut dev = running.device(&setup(true));
    round_trip(&mut dev, 0, 1);
    let mut daemon = running.daemon;
    let result = within(DEVICE_TIMEOUT, "stop while polling", move || daemon.stop());
    assert!(result.is_ok(), "{result:?}");
    drop(dev);
}

#[test]
fn polling_a_queue_that_does_not_exist_is_refused() {
    let running = Running::serving(echo(1));
    let err = running
        .daemon
        .set_polling(3, Duration::from_micros(50))
        .unwrap_err();
    assert!(
        matches!(err, vu_backend::DaemonError::Io { .. }),
        "unexpected {err}"
    );
}
