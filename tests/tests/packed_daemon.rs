//! Packed virtqueues through the whole stack in-process: a device served by `process_queue`
//! on a `VhostUserDaemon`, set up over a socket pair by vu-proto's `Frontend` with
//! `VIRTIO_F_RING_PACKED` acknowledged, and driven by the test kit's `PackedQueue` through
//! real kick and call eventfds, with and without EVENT_IDX; then stopped with
//! `GET_VRING_BASE` and started again from the word it returned.

use std::io;

use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vu_backend::testing::{socket_pair, Buf, DriverMemory, PackedQueue, Pos, DEVICE_TIMEOUT};
use vu_backend::{process_queue, BorrowFd, VhostUserBackend, VhostUserDaemon, VringMutex};
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::frontend::Frontend;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const SIZE: u16 = 16;

/// Echoes each chain's readable bytes into its writable buffers, through `process_queue`.
#[derive(Debug)]
struct PackedEcho;

impl VhostUserBackend for PackedEcho {
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
            | VirtioFeatures::RING_INDIRECT_DESC
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
        process_queue(vring, |chain| {
            let mem = chain.memory();
            let mut data = Vec::new();
            for desc in chain.clone().readable() {
                let mut bytes = vec![0u8; desc.len() as usize];
                if mem.read_slice(&mut bytes, desc.addr()).is_err() {
                    return 0;
                }
                data.extend_from_slice(&bytes);
            }
            let mut written = 0;
            for desc in chain.writable() {
                let n = (desc.len() as usize).min(data.len() - written);
                if mem
                    .write_slice(&data[written..written + n], desc.addr())
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            written as u32
        });
        Ok(())
    }
}

/// Negotiates with packed rings (and EVENT_IDX if asked), sends the memory table, and
/// starts queue 0 from `base`.
fn start(
    fe: &mut Frontend,
    memory: &DriverMemory,
    queue: &PackedQueue,
    event_idx: bool,
    base: u32,
) {
    fe.set_owner().unwrap();
    let mut features =
        VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES | VirtioFeatures::RING_PACKED;
    if event_idx {
        features |= VirtioFeatures::RING_EVENT_IDX;
    }
    let offered = fe.get_features().unwrap();
    assert!(offered.contains(features), "offered {offered:?}");
    let protocol = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(protocol & (ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK))
        .unwrap();
    fe.set_features(features).unwrap();
    fe.set_mem_table(&[memory.region()], &[memory.fd()])
        .unwrap();
    restart(fe, queue, base);
}

/// Starts queue 0 again: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (QEMU's order), the
/// call and kick fds, enabled.
fn restart(fe: &mut Frontend, queue: &PackedQueue, base: u32) {
    fe.set_vring_num(0, u32::from(queue.size())).unwrap();
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_addr(&queue.vring_addr()).unwrap();
    fe.set_vring_call(0, Some(queue.call.borrow_fd())).unwrap();
    fe.set_vring_kick(0, Some(queue.kick.borrow_fd())).unwrap();
    fe.set_vring_enable(0, true).unwrap();
}

fn echo_through_the_daemon(event_idx: bool) {
    let mut daemon = VhostUserDaemon::new(
        "packed".to_owned(),
        PackedEcho,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let (device_end, mut fe) = socket_pair();
    daemon.start_connection(device_end).unwrap();
    let mut memory = DriverMemory::new(4 << 20);
    let mut queue = PackedQueue::new(&mut memory, 0, SIZE);
    queue.set_event_idx(event_idx);
    // A fresh ring: avail and used positions 0 with wrap counters 1.
    start(&mut fe, &memory, &queue, event_idx, 0x8000_8000);

    // Rounds of chains of 1 to 3 descriptors, enough to wrap the ring several times.
    let mut expected = Vec::new();
    for round in 0..40u8 {
        let data = vec![round; 3 + usize::from(round % 5)];
        let bufs = match round % 3 {
            0 => vec![Buf::Readable(data.clone()), Buf::Writable(16)],
            1 => vec![
                Buf::Readable(data.clone()),
                Buf::Writable(2),
                Buf::Writable(14),
            ],
            _ => vec![Buf::Readable(data.clone())],
        };
        let written = if round % 3 == 2 { Vec::new() } else { data };
        queue.post_and_kick(&bufs);
        let used = queue.wait_used(1, DEVICE_TIMEOUT);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].len as usize, written.len(), "round {round}");
        let got: Vec<u8> = used[0].written.concat();
        assert_eq!(&got[..written.len()], &written[..], "round {round}");
        expected.push(used[0].len);
    }
    assert!(queue.next_avail().wrap == queue.next_used().wrap);

    // Stop: the word carries both positions with their wrap counters.
    let base = fe.get_vring_base(0).unwrap();
    let pos = queue.next_avail();
    assert_eq!(
        base,
        u32::from(pos.word()) | u32::from(queue.next_used().word()) << 16
    );
    // Start again from it: the ring goes on where it stopped.
    restart(&mut fe, &queue, base);
    queue.post_and_kick(&[Buf::Readable(vec![7; 5]), Buf::Writable(8)]);
    let used = queue.wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(
        (used[0].len, used[0].written[0][..5].to_vec()),
        (5, vec![7; 5])
    );
    assert_ne!(queue.next_avail(), Pos::START);
    drop(fe);
    daemon.wait().unwrap();
}

#[test]
fn a_packed_ring_is_served_through_the_daemon_with_event_idx() {
    echo_through_the_daemon(true);
}

#[test]
fn a_packed_ring_is_served_through_the_daemon_without_event_idx() {
    echo_through_the_daemon(false);
}
