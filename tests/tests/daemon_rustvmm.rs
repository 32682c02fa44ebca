//! rust-vmm's `vhost::vhost_user::Frontend` (the frontend half of the reference
//! implementation) sets up a device on our daemon, and the virtqueue driver moves data.

use std::os::fd::AsRawFd;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vu_backend::VringMutex;
use vu_tests::backends::EchoBackend;
use vu_tests::daemon_support::Running;
use vu_tests::device::DEVICE_TIMEOUT;
use vu_tests::virtqueue::{Buf, DriverMemory, SplitQueue};

const VERSION_1: u64 = 1 << 32;
const RING_EVENT_IDX: u64 = 1 << 29;

fn drive(event_idx: bool) {
    let running = Running::serving(EchoBackend::<VringMutex>::new(2, 256));
    let mut fe = Frontend::connect(&running.path, 2).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let mut wanted = VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if event_idx {
        wanted |= RING_EVENT_IDX;
    }
    fe.set_features(offered & wanted).unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        protocol & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
    )
    .unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);

    let mut memory = DriverMemory::new(4 << 20);
    let region = memory.region();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.memory_size,
        userspace_addr: region.user_addr,
        mmap_offset: 0,
        mmap_handle: memory.fd().as_raw_fd(),
    }])
    .unwrap();

    let mut queue = SplitQueue::new(&mut memory, 1, 64);
    queue.set_event_idx(event_idx);
    let addr = queue.vring_addr();
    fe.set_vring_num(1, 64).unwrap();
    fe.set_vring_addr(
        1,
        &VringConfigData {
            queue_max_size: 256,
            queue_size: 64,
            flags: 0,
            desc_table_addr: addr.descriptor,
            used_ring_addr: addr.used,
            avail_ring_addr: addr.available,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(1, 0).unwrap();
    fe.set_vring_call(1, &queue.call).unwrap();
    fe.set_vring_kick(1, &queue.kick).unwrap();
    fe.set_vring_enable(1, true).unwrap();

    for round in 0..10u8 {
        queue.post_and_kick(&[
            Buf::Readable(vec![round; 3]),
            Buf::Readable(vec![round; 2]),
            Buf::Writable(8),
        ]);
        let used = queue.wait_used(1, DEVICE_TIMEOUT);
        assert_eq!(used[0].len, 5);
        assert_eq!(&used[0].written[0][..5], &[round; 5]);
    }
    assert_eq!(fe.get_vring_base(1).unwrap(), 10);
    assert_eq!(running.backend.event_idx(), event_idx);
}

#[test]
fn rust_vmm_frontend_drives_our_daemon_without_event_idx() {
    drive(false);
}

#[test]
fn rust_vmm_frontend_drives_our_daemon_with_event_idx() {
    drive(true);
}
