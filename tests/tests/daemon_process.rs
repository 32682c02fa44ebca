//! `vu_daemon::process::process_queue`, the framework's queue loop, in a device served by a
//! `VhostUserDaemon` over a real socket: every chain completed with the length the device
//! returns, one interrupt for a batch, EVENT_IDX on and off, across the ring wrap.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::tempdir::TempDir;
use vu_backend::prelude::*;
use vu_backend::vu_daemon::process::process_queue;
use vu_proto::frontend::Frontend;
use vu_proto::listener::Listener;
use vu_tests::device::{socket_path, DeviceSetup, TestDevice, DEVICE_TIMEOUT};
use vu_tests::virtqueue::{wait_readable, Buf};

/// A null device: each chain is used with its writable length.
struct Null;

impl VhostUserBackend for Null {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1
            | VirtioFeatures::RING_EVENT_IDX
            | VirtioFeatures::PROTOCOL_FEATURES)
            .bits()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        let vring = &vrings[usize::from(device_event)];
        process_queue(vring, |chain| {
            chain
                .filter(|d| d.is_write_only())
                .map(|d| d.len())
                .sum::<u32>()
        });
        Ok(())
    }
}

struct Served {
    _daemon: VhostUserDaemon<Arc<Null>>,
    device: TestDevice,
    _dir: TempDir,
}

fn serve(event_idx: bool) -> Served {
    let (dir, path) = socket_path();
    let mut daemon = VhostUserDaemon::new(
        "process-test".to_owned(),
        Arc::new(Null),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    daemon
        .start_serving(Listener::bind(&path).unwrap())
        .unwrap();
    let setup = DeviceSetup {
        event_idx,
        queue_size: 16,
        ..DeviceSetup::default()
    };
    let device = TestDevice::setup(Frontend::connect(&path).unwrap(), &setup);
    Served {
        _daemon: daemon,
        device,
        _dir: dir,
    }
}

fn chains_complete_with_their_writable_length(event_idx: bool) {
    let mut served = serve(event_idx);
    let queue = served.device.queue(0);
    // 40 rounds of 3 chains: the indexes wrap the 16-entry ring several times.
    for round in 0..40u8 {
        queue.post_and_kick(&[Buf::Writable(7)]);
        queue.post_and_kick(&[
            Buf::Readable(vec![round; 16]),
            Buf::Writable(64),
            Buf::Writable(1),
        ]);
        queue.post_and_kick(&[Buf::Readable(vec![round; 3])]);
        let mut lens: Vec<u32> = queue
            .wait_used(3, DEVICE_TIMEOUT)
            .iter()
            .map(|u| u.len)
            .collect();
        lens.sort_unstable();
        assert_eq!(lens, vec![0, 7, 65]);
    }
    assert_eq!(queue.in_flight(), 0);
}

#[test]
fn process_queue_completes_chains_with_their_writable_length() {
    chains_complete_with_their_writable_length(false);
}

#[test]
fn process_queue_completes_chains_with_their_writable_length_with_event_idx() {
    chains_complete_with_their_writable_length(true);
}

fn batch_gets_one_interrupt(event_idx: bool) {
    let mut served = serve(event_idx);
    let device = &mut served.device;
    // Stop the ring (GET_VRING_BASE waits until no pass runs), post while it is stopped, then
    // start it again: the first pass finds all eight chains.
    assert_eq!(device.stop_queue(0), 0);
    for _ in 0..8 {
        device.queue(0).post(&[Buf::Writable(4)]);
    }
    device.start_queue(0, 0);
    device.enable_queue(0, true);
    let queue = device.queue(0);
    // The pass completes all eight, then signals once.
    assert!(wait_readable(queue.call.as_raw_fd(), DEVICE_TIMEOUT));
    assert_eq!(queue.take_calls(), 1);
    assert_eq!(queue.poll_used().len(), 8);
}

#[test]
fn process_queue_signals_once_for_a_batch() {
    batch_gets_one_interrupt(false);
}

#[test]
fn process_queue_signals_once_for_a_batch_with_event_idx() {
    batch_gets_one_interrupt(true);
}
