//! The packed-ring `SET_VRING_BASE` / `GET_VRING_BASE` word as rust-vmm's
//! `vhost::vhost_user::Frontend` (vhost 0.18) sends and reads it, against our daemon.
//!
//! The spec's "vring descriptor indices for packed virtqueues" carry the avail position and
//! its wrap counter in bits 0-15 and the used position and its wrap counter in bits 16-31;
//! QEMU sends both. rust-vmm's `set_vring_base(queue, base: u16)` can only send the low half:
//! the used half arrives as 0, which the spec reads as position 0 with used wrap counter 0.
//! A fresh packed ring starts with both wrap counters at 1, so a rust-vmm frontend cannot
//! start one correctly (the device would mark its used descriptors with the wrong wrap
//! counter and the driver would never see them); its `get_vring_base` returns the whole
//! 32-bit word, both halves, unchanged. docs/conformance.md says the same.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vu_backend::testing::{DriverMemory, PackedQueue, Pos};
use vu_backend::{process_queue, VhostUserBackend, VhostUserDaemon, VringMutex};
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::socket::Endpoint;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const SIZE: u16 = 64;

/// A null device that offers packed rings.
#[derive(Debug)]
struct PackedNull;

impl VhostUserBackend for PackedNull {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(SIZE)
    }

    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1
            | VirtioFeatures::RING_PACKED
            | VirtioFeatures::PROTOCOL_FEATURES)
            .bits()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other("no such queue"))?;
        process_queue(vring, |_chain| 0);
        Ok(())
    }
}

/// A rust-vmm frontend with packed rings negotiated and queue 0's memory and addresses set,
/// on a daemon serving [`PackedNull`].
fn packed_frontend() -> (
    VhostUserDaemon<PackedNull>,
    Frontend,
    DriverMemory,
    PackedQueue,
) {
    let mut daemon = VhostUserDaemon::new(
        "rustvmm-packed".to_owned(),
        PackedNull,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let (device_end, frontend_end) = UnixStream::pair().unwrap();
    daemon.start_connection(Endpoint::new(device_end)).unwrap();
    let mut fe = Frontend::from_stream(frontend_end, 1);
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let wanted = VirtioFeatures::VERSION_1.bits()
        | VirtioFeatures::RING_PACKED.bits()
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(offered & wanted, wanted, "offered {offered:#x}");
    fe.set_features(wanted).unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        protocol & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
    )
    .unwrap();
    let mut memory = DriverMemory::new(1 << 20);
    let region = memory.region();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.memory_size,
        userspace_addr: region.user_addr,
        mmap_offset: 0,
        mmap_handle: memory.fd().as_raw_fd(),
    }])
    .unwrap();
    let queue = PackedQueue::new(&mut memory, 0, SIZE);
    let addr = queue.vring_addr();
    fe.set_vring_num(0, SIZE).unwrap();
    // Packed: the descriptor ring, the driver area as "available", the device area as "used".
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: SIZE,
            queue_size: SIZE,
            flags: 0,
            desc_table_addr: addr.descriptor,
            used_ring_addr: addr.used,
            avail_ring_addr: addr.available,
            log_addr: None,
        },
    )
    .unwrap();
    (daemon, fe, memory, queue)
}

#[test]
fn rust_vmm_frontend_sets_only_the_avail_half_of_a_packed_ring_base() {
    let (_daemon, mut fe, _memory, queue) = packed_frontend();
    // The fresh ring's avail position, wrap counter 1: all a u16 can say.
    fe.set_vring_base(0, Pos::START.word()).unwrap();
    fe.set_vring_call(0, &queue.call).unwrap();
    fe.set_vring_kick(0, &queue.kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    // The device holds what arrived: avail 0 with wrap 1 in the low half, and in the high
    // half the used position 0 with wrap counter 0, not the fresh ring's 1 (QEMU would have
    // sent 0x8000_8000).
    assert_eq!(fe.get_vring_base(0).unwrap(), 0x0000_8000);
}

#[test]
fn rust_vmm_frontend_reads_both_halves_of_a_packed_ring_base() {
    let (_daemon, mut fe, _memory, queue) = packed_frontend();
    let avail = Pos {
        idx: 5,
        wrap: false,
    };
    fe.set_vring_base(0, avail.word()).unwrap();
    fe.set_vring_call(0, &queue.call).unwrap();
    fe.set_vring_kick(0, &queue.kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), u32::from(avail.word()));
    // Restarted from a base whose wrap bit is set: the reply's bit 15 is the avail wrap
    // counter, bits 16-31 the used position the u16 could not set.
    fe.set_vring_base(0, 0x8000 | 7).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 0x0000_8007);
}
