//! Dirty logging through a real daemon and socket: a device with a logging bitmap, served by
//! `VhostUserDaemon`, completes chains while the frontend logs, and the used ring is marked
//! at the `log_guest_addr` the frontend gave, by the dispatch itself (no `GET_VRING_BASE`
//! needed), and the `SET_LOG_FD` eventfd is written.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use vu_backend::prelude::*;
use vu_backend::LogBitmap;
use vu_proto::frontend::Frontend;
use vu_proto::listener::Listener;
use vu_proto::payload::{Log, VringAddrFlags};
use vu_tests::device::{socket_path, DeviceSetup, TestDevice, DEVICE_TIMEOUT};
use vu_tests::proto_support::{eventfd, eventfd_fd, memfd};
use vu_tests::virtqueue::{wait_readable, Buf};

type Mem = GuestMemoryAtomic<GuestMemoryMmap<LogBitmap>>;
type Ring = VringMutex<Mem>;

/// The log: 4096 bytes cover guest pages 0..32768 (128 MiB).
const LOG_SIZE: u64 = 4096;
/// Where the frontend asks the used ring to be logged: 64 MiB, past the 4 MiB of guest RAM
/// (the spec allows it) but inside the log.
const LOG_GUEST_ADDR: u64 = 64 << 20;

/// Completes every chain, writing nothing.
struct Logging;

impl VhostUserBackend for Logging {
    type Bitmap = LogBitmap;
    type Vring = Ring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES | VirtioFeatures::LOG_ALL)
            .bits()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK | ProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        Ok(())
    }

    fn handle_event(&self, queue: u16, _: EventSet, vrings: &[Ring], _: usize) -> io::Result<()> {
        process_queue(&vrings[usize::from(queue)], |_chain| 0);
        Ok(())
    }
}

fn log_bit(log: &std::fs::File, page: u64) -> bool {
    let mut byte = [0u8];
    log.read_exact_at(&mut byte, page / 8).unwrap();
    byte[0] & (1 << (page % 8)) != 0
}

#[test]
fn a_dispatch_while_logging_marks_the_used_ring_at_log_guest_addr_and_signals_the_log_fd() {
    let (_dir, path) = socket_path();
    let mut daemon = VhostUserDaemon::new(
        "migration-test".to_owned(),
        Logging,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    daemon
        .start_serving(Listener::bind(&path).unwrap())
        .unwrap();
    let setup = DeviceSetup {
        protocol: ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK | ProtocolFeatures::LOG_SHMFD,
        queue_size: 16,
        ..DeviceSetup::default()
    };
    let mut device = TestDevice::setup(Frontend::connect(&path).unwrap(), &setup);

    // What QEMU does to start logging (hw/virtio/vhost.c `vhost_dev_set_log`): the log, then
    // LOG_ALL, then the ring addresses again with VHOST_VRING_F_LOG.
    let log = memfd(LOG_SIZE);
    let log_fd = eventfd();
    let fe = &mut device.frontend;
    fe.set_log_base(
        Log {
            mmap_size: LOG_SIZE,
            mmap_offset: 0,
        },
        log.as_fd(),
    )
    .unwrap();
    fe.set_log_fd(eventfd_fd(&log_fd)).unwrap();
    fe.set_features(device.features | VirtioFeatures::LOG_ALL)
        .unwrap();
    let mut addr = device.queues[0].vring_addr();
    addr.flags = VringAddrFlags::LOG;
    addr.log = LOG_GUEST_ADDR;
    device.frontend.set_vring_addr(&addr).unwrap();

    let page = LOG_GUEST_ADDR / 4096;
    assert!(!log_bit(&log, page));
    let queue = device.queue(0);
    queue.post_and_kick(&[Buf::Writable(8)]);
    assert_eq!(queue.wait_used(1, DEVICE_TIMEOUT).len(), 1);
    // The worker marks after its dispatch returns, which may be just after the used entry
    // became visible: the log eventfd says when.
    assert!(
        wait_readable(std::os::fd::AsRawFd::as_raw_fd(&log_fd), DEVICE_TIMEOUT),
        "the log eventfd was not written"
    );
    assert!(
        log_bit(&log, page),
        "the used ring was not logged at log_guest_addr"
    );
}
