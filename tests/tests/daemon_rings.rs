//! Ring state across threads: GET_VRING_BASE in the middle of traffic, and kicks that
//! arrive while a ring is disabled.

use std::sync::mpsc;
use std::thread;

use vu_backend::{DisabledRing, VringMutex};
use vu_proto::features::ProtocolFeatures;
use vu_tests::backends::EchoBackend;
use vu_tests::daemon_support::{LocalRunning, Running};
use vu_tests::device::{DeviceSetup, DEVICE_TIMEOUT};
use vu_tests::virtqueue::{Buf, Used};

const CHAINS: u16 = 100;

fn echo() -> EchoBackend<VringMutex> {
    EchoBackend::new(1, 256)
}

fn get_vring_base_mid_traffic(event_idx: bool) {
    let running = Running::serving(echo());
    let mut dev = running.device(&DeviceSetup {
        queue_size: 256,
        event_idx,
        ..DeviceSetup::default()
    });
    let mut queue = dev.queues.pop().unwrap();
    let (started_tx, started_rx) = mpsc::channel();
    // The driver posts chains in batches and kicks, while the frontend stops the ring.
    let driver = thread::spawn(move || {
        let mut used: Vec<Used> = Vec::new();
        for batch in 0..CHAINS / 10 {
            for i in 0..10 {
                let pos = u8::try_from(batch * 10 + i).unwrap();
                queue.post(&[Buf::Readable(vec![pos]), Buf::Writable(1)]);
            }
            queue.kick();
            if batch == 1 {
                started_tx.send(()).unwrap();
            }
            used.extend(queue.poll_used());
        }
        (queue, used)
    });
    started_rx.recv_timeout(DEVICE_TIMEOUT).unwrap();
    let base = dev.stop_queue(0);
    let (mut queue, mut used) = driver.join().unwrap();
    // Once GET_VRING_BASE has replied the worker is quiet: what is used now is final.
    used.extend(queue.poll_used());
    assert!(base <= CHAINS);
    assert_eq!(
        queue.used_idx(),
        base,
        "every chain before the base is used"
    );
    assert_eq!(used.len(), usize::from(base));
    for u in &used {
        assert!(
            u.avail_pos < base,
            "chain {} after the base was used",
            u.avail_pos
        );
        assert_eq!(u.written, vec![vec![u8::try_from(u.avail_pos).unwrap()]]);
    }

    // Restart from the base: the rest is used, each chain exactly once.
    dev.queues.push(queue);
    dev.start_queue(0, base);
    dev.enable_queue(0, true);
    dev.queue(0).kick();
    used.extend(
        dev.queue(0)
            .wait_used(usize::from(CHAINS - base), DEVICE_TIMEOUT),
    );
    let mut positions: Vec<u16> = used.iter().map(|u| u.avail_pos).collect();
    positions.sort_unstable();
    assert_eq!(positions, (0..CHAINS).collect::<Vec<_>>());
}

#[test]
fn get_vring_base_mid_traffic_loses_and_repeats_nothing_without_event_idx() {
    get_vring_base_mid_traffic(false);
}

#[test]
fn get_vring_base_mid_traffic_loses_and_repeats_nothing_with_event_idx() {
    get_vring_base_mid_traffic(true);
}

#[test]
fn kick_while_disabled_is_served_once_enabled() {
    let running = Running::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    dev.enable_queue(0, false);
    dev.queue(0)
        .post(&[Buf::Readable(b"late".to_vec()), Buf::Writable(4)]);
    dev.queue(0).kick();
    // No new kick after enabling: the one sent while disabled must not have been lost.
    dev.enable_queue(0, true);
    let used = dev.queue(0).wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].written, vec![b"late".to_vec()]);
}

#[test]
fn kick_while_disabled_on_one_worker_does_not_stall_another() {
    let running = Running::serving(EchoBackend::new(2, 256).with_threads(vec![0b01, 0b10]));
    let mut dev = running.device(&DeviceSetup {
        queues: 2,
        ..DeviceSetup::default()
    });
    dev.enable_queue(0, false);
    dev.queue(0).post(&[Buf::Writable(1)]);
    dev.queue(0).kick();
    dev.queue(1)
        .post_and_kick(&[Buf::Readable(vec![5]), Buf::Writable(1)]);
    assert_eq!(
        dev.queue(1).wait_used(1, DEVICE_TIMEOUT)[0].written,
        vec![vec![5]]
    );
    dev.enable_queue(0, true);
    assert_eq!(dev.queue(0).wait_used(1, DEVICE_TIMEOUT).len(), 1);
}

/// The default policy holds: a disabled ring's chains are not touched (no side effect) and
/// the device is not called, until the ring is enabled again.
#[test]
fn disabled_ring_is_held_by_default() {
    let running = Running::serving(echo());
    let mut dev = running.device(&DeviceSetup::default());
    dev.enable_queue(0, false);
    dev.queue(0)
        .post_and_kick(&[Buf::Readable(b"held".to_vec()), Buf::Writable(4)]);
    // A second queue activity proves the worker ran meanwhile: an enable-disable round trip
    // is a frontend message, after which parked kicks are looked at.
    dev.enable_queue(0, false);
    assert!(dev.queue(0).poll_used().is_empty());
    assert!(running.backend.calls.lock().unwrap().is_empty());
    dev.enable_queue(0, true);
    let used = dev.queue(0).wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].written, vec![b"held".to_vec()]);
}

/// "started and disabled: The back-end must process the ring without causing any side
/// effects ... must process and discard any TX packets": with `Discard`, the framework
/// completes the chains with nothing written and does not call the device.
#[test]
fn disabled_ring_with_discard_is_processed_without_side_effects() {
    let running = Running::serving(echo().with_disabled_ring(DisabledRing::Discard));
    let mut dev = running.device(&DeviceSetup::default());
    dev.enable_queue(0, false);
    dev.queue(0)
        .post_and_kick(&[Buf::Readable(b"drop".to_vec()), Buf::Writable(4)]);
    let used = dev.queue(0).wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].len, 0, "nothing was written into the chain");
    assert!(running.backend.calls.lock().unwrap().is_empty());
    // Enabled again, the device serves as usual.
    dev.enable_queue(0, true);
    dev.queue(0)
        .post_and_kick(&[Buf::Readable(b"kept".to_vec()), Buf::Writable(4)]);
    let used = dev.queue(0).wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].written, vec![b"kept".to_vec()]);
}

/// With `Dispatch`, the device is called for a disabled ring and decides itself (the echo
/// device here serves anyway; a net device would drop TX and supply no RX).
#[test]
fn disabled_ring_with_dispatch_calls_the_device() {
    let running = Running::serving(echo().with_disabled_ring(DisabledRing::Dispatch));
    let mut dev = running.device(&DeviceSetup::default());
    dev.enable_queue(0, false);
    dev.queue(0)
        .post_and_kick(&[Buf::Readable(b"seen".to_vec()), Buf::Writable(4)]);
    let used = dev.queue(0).wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].written, vec![b"seen".to_vec()]);
    assert!(!running.backend.calls.lock().unwrap().is_empty());
}

/// In-band notifications with what they need (BACKEND_REQ, REPLY_ACK).
fn in_band() -> ProtocolFeatures {
    ProtocolFeatures::MQ
        | ProtocolFeatures::REPLY_ACK
        | ProtocolFeatures::BACKEND_REQ
        | ProtocolFeatures::INBAND_NOTIFICATIONS
}

/// "the latter needs to be used with the in-band notification messages to block until they
/// are processed": once `VRING_KICK`'s REPLY_ACK is in, the chain it announced is used, with
/// no waiting.
fn in_band_kick_is_served_before_its_acknowledgement(dev: &mut vu_tests::device::TestDevice) {
    for round in 0..20u8 {
        dev.queue(0)
            .post(&[Buf::Readable(vec![round]), Buf::Writable(1)]);
        dev.frontend.vring_kick(0).unwrap();
        let used = dev.queue(0).poll_used();
        assert_eq!(used.len(), 1, "round {round}: not served before the answer");
        assert_eq!(used[0].written, vec![vec![round]]);
    }
}

#[test]
fn in_band_kick_is_served_before_its_acknowledgement_by_the_threaded_daemon() {
    let running = Running::serving(echo().with_protocol_features(in_band()));
    let mut dev = running.device(&DeviceSetup {
        protocol: in_band(),
        ..DeviceSetup::default()
    });
    in_band_kick_is_served_before_its_acknowledgement(&mut dev);
}

#[test]
fn in_band_kick_is_served_before_its_acknowledgement_by_the_local_daemon() {
    let running = LocalRunning::serving(EchoBackend::new(1, 256).with_protocol_features(in_band()));
    let mut dev = running.device(&DeviceSetup {
        protocol: in_band(),
        ..DeviceSetup::default()
    });
    in_band_kick_is_served_before_its_acknowledgement(&mut dev);
}
