//! Packed virtqueues served by vu-vring and vu-daemon's `process_queue`, driven by the packed
//! test driver ([`PackedQueue`]): the differential test against split rings, wrap-around,
//! indirect tables, event suppression in both directions, the vhost-user ring base, and
//! hostile rings (an error on that ring, never a panic, a hang or an access outside guest
//! memory).

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vu_daemon::process::process_queue;
use vu_tests::packed_driver::{
    avail_bits, PackedQueue, Pos, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, PACKED_AVAIL,
    PACKED_INDIRECT, PACKED_NEXT, PACKED_USED, PACKED_WRITE,
};
use vu_tests::virtqueue::{Buf, DriverMemory, SplitQueue, Used, GPA_BASE};
use vu_vring::{Chain, Error, VringMutex, VringT};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Driver memory of each test: rings, one 4 KiB buffer per ring position, room for tables.
const MEM_SIZE: u64 = 1 << 20;

/// What the device saw of one chain: each descriptor's length, writability, and (readable
/// ones) contents.
type Seen = Vec<(u32, bool, Vec<u8>)>;

/// What the driver learns of a used chain: its position in the stream, the used length and
/// the bytes of its writable buffers.
type Outcome = (u16, u32, Vec<Vec<u8>>);

/// xorshift64*: deterministic, so a failing stream can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A started, enabled vring over `memory`'s mapping, packed or split.
fn vring(
    memory: &DriverMemory,
    size: u16,
    packed: bool,
    addrs: (u64, u64, u64),
) -> VringMutex<Mem> {
    let vring = VringMutex::<Mem>::new(GuestMemoryAtomic::new(memory.mem().clone()), 256).unwrap();
    vring.set_queue_packed(packed);
    vring.set_queue_size(size).unwrap();
    vring.set_queue_info(addrs.0, addrs.1, addrs.2).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

/// A packed queue of `size` and its vring.
fn packed(size: u16) -> (DriverMemory, PackedQueue, VringMutex<Mem>) {
    let mut memory = DriverMemory::new(MEM_SIZE);
    let queue = PackedQueue::new(&mut memory, 0, size);
    let vring = vring(&memory, size, true, queue.guest_addrs());
    (memory, queue, vring)
}

/// The guest address of a frontend (VMM) address in `memory`.
fn guest(memory: &DriverMemory, user: u64) -> u64 {
    user - memory.user_addr(GuestAddress(GPA_BASE)) + GPA_BASE
}

/// The device of the differential test: records what it sees, fills each writable buffer
/// with a pattern made from the chain's readable bytes, and returns the bytes written.
fn device(seen: &mut Vec<Seen>) -> impl FnMut(Chain<'_, GuestMemoryMmap>) -> u32 + '_ {
    move |chain| {
        let mem = chain.memory();
        let mut record = Vec::new();
        let mut sum = 0u8;
        let mut written = 0;
        for desc in chain {
            let mut bytes = vec![0u8; desc.len() as usize];
            if desc.is_write_only() {
                bytes
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = sum ^ i as u8);
                mem.write_slice(&bytes, desc.addr()).unwrap();
                written += desc.len();
                record.push((desc.len(), true, Vec::new()));
            } else {
                mem.read_slice(&mut bytes, desc.addr()).unwrap();
                sum = bytes.iter().fold(sum, |a, b| a.wrapping_add(*b));
                record.push((desc.len(), false, bytes));
            }
        }
        seen.push(record);
        written
    }
}

/// A random request stream: chains of 1 to `max_bufs` buffers, readable with random bytes or
/// writable, each at most 64 bytes.
fn stream(rng: &mut Rng, chains: usize, max_bufs: u16) -> Vec<Vec<Buf>> {
    (0..chains)
        .map(|_| {
            (0..1 + rng.below(u64::from(max_bufs)))
                .map(|_| {
                    let len = rng.below(65) as u32;
                    if rng.below(2) == 0 {
                        Buf::Readable((0..len).map(|_| rng.next() as u8).collect())
                    } else {
                        Buf::Writable(len)
                    }
                })
                .collect()
        })
        .collect()
}

/// What the driver learns of a used chain, without the head (a descriptor index on a split
/// ring, a buffer id on a packed one): its position in the stream, the length, the bytes.
fn outcome(used: Vec<Used>) -> Vec<Outcome> {
    used.into_iter()
        .map(|u| (u.avail_pos, u.len, u.written))
        .collect()
}

/// Runs `requests` through a ring of `size` in rounds of up to `size` descriptors: post a
/// round, serve it with `process_queue`, read the used chains back.
fn run(
    packed_layout: bool,
    size: u16,
    event_idx: bool,
    requests: &[Vec<Buf>],
) -> (Vec<Seen>, Vec<Outcome>) {
    let mut memory = DriverMemory::new(MEM_SIZE);
    let mut seen = Vec::new();
    let mut used = Vec::new();
    let mut pending = requests.iter().peekable();
    if packed_layout {
        let mut queue = PackedQueue::new(&mut memory, 0, size);
        queue.set_event_idx(event_idx);
        let vring = vring(&memory, size, true, queue.guest_addrs());
        vring.set_queue_event_idx(event_idx);
        while pending.peek().is_some() {
            while let Some(bufs) = pending.next_if(|b| b.len() <= queue.free_descriptors()) {
                queue.post(bufs);
            }
            process_queue(&vring, device(&mut seen));
            used.extend(outcome(queue.poll_used()));
        }
    } else {
        let mut queue = SplitQueue::new(&mut memory, 0, size);
        queue.set_event_idx(event_idx);
        let addr = queue.vring_addr();
        let addrs = (
            guest(&memory, addr.descriptor),
            guest(&memory, addr.available),
            guest(&memory, addr.used),
        );
        let vring = vring(&memory, size, false, addrs);
        vring.set_queue_event_idx(event_idx);
        while pending.peek().is_some() {
            while let Some(bufs) = pending.next_if(|b| b.len() <= queue.free_descriptors()) {
                queue.post(bufs);
            }
            process_queue(&vring, device(&mut seen));
            used.extend(outcome(queue.poll_used()));
        }
    }
    (seen, used)
}

#[test]
fn the_same_request_stream_gives_the_same_chains_on_split_and_packed_rings() {
    let mut rng = Rng(0x5eed_0017);
    for (size, event_idx) in [(8, false), (8, true), (16, true), (4, false)] {
        // Up to 7 buffers where the ring has room: longer than the descriptors the device
        // reads ahead when it takes a packed chain (4), so the walk reads the rest itself.
        let requests = stream(&mut rng, 400, size.min(7));
        let (split_seen, split_used) = run(false, size, event_idx, &requests);
        let (packed_seen, packed_used) = run(true, size, event_idx, &requests);
        assert_eq!(split_seen.len(), requests.len());
        assert_eq!(
            packed_seen, split_seen,
            "size {size}, event_idx {event_idx}"
        );
        assert_eq!(
            packed_used, split_used,
            "size {size}, event_idx {event_idx}"
        );
        // In order, every chain once.
        let order: Vec<u16> = packed_used.iter().map(|u| u.0).collect();
        assert_eq!(order, (0..requests.len() as u16).collect::<Vec<_>>());
    }
}

#[test]
fn packed_rings_whose_size_is_not_a_power_of_two_give_the_same_chains_as_split() {
    // virtio 1.2, 2.8: a packed ring's size need not be a power of two. The chains a device
    // sees and the results a driver reads do not depend on the ring's size, so a packed ring
    // of any size must agree with a split ring of a power-of-two size on the same stream.
    let mut rng = Rng(0x5eed_1710);
    for (size, event_idx) in [(3, false), (10, true), (100, true), (255, false)] {
        let requests = stream(&mut rng, 300, size.min(7));
        let (split_seen, split_used) = run(false, 16, event_idx, &requests);
        let (packed_seen, packed_used) = run(true, size, event_idx, &requests);
        assert_eq!(split_seen.len(), requests.len());
        assert_eq!(packed_seen, split_seen, "size {size}");
        assert_eq!(packed_used, split_used, "size {size}");
    }
    // A split ring still refuses such a size, and a packed ring refuses 0 and sizes above
    // the vring's maximum.
    let memory = DriverMemory::new(MEM_SIZE);
    let split = VringMutex::<Mem>::new(GuestMemoryAtomic::new(memory.mem().clone()), 256).unwrap();
    assert!(split.set_queue_size(10).is_err());
    split.set_queue_packed(true);
    assert!(split.set_queue_size(0).is_err() && split.set_queue_size(257).is_err());
    split.set_queue_size(257 - 2).unwrap();
    assert_eq!(split.queue_size(), 255);
}

#[test]
fn used_descriptors_go_to_the_chain_head_with_the_last_buffer_id_and_the_used_wrap_counter() {
    let (_memory, mut queue, vring) = packed(4);
    // Three descriptors from position 0, then two crossing the ring's end (positions 3, 0).
    let first = queue.post(&[Buf::Readable(vec![1]), Buf::Writable(4), Buf::Writable(4)]);
    assert_eq!(process_queue(&vring, |_| 7), 1);
    let (_, len, id, flags) = queue.read_desc(0);
    assert_eq!(
        (len, id, flags & (PACKED_AVAIL | PACKED_USED)),
        (7, first, PACKED_AVAIL | PACKED_USED)
    );
    assert_eq!(queue.poll_used().len(), 1);
    let second = queue.post(&[Buf::Readable(vec![2]), Buf::Writable(4)]);
    assert_eq!(
        queue.next_avail(),
        Pos {
            idx: 1,
            wrap: false
        }
    );
    assert_eq!(process_queue(&vring, |_| 9), 1);
    let (_, len, id, flags) = queue.read_desc(3);
    assert_eq!(
        (len, id, flags & (PACKED_AVAIL | PACKED_USED)),
        (9, second, PACKED_AVAIL | PACKED_USED)
    );
    // The device's positions moved by the descriptor counts, across the end.
    assert_eq!(vring.queue_next_avail(), 1);
    assert_eq!(vring.queue_next_used(), 1);
    // The next used descriptor (position 1, wrap counter 0) carries flags 0.
    let third = queue.post(&[Buf::Writable(4)]);
    assert_eq!(process_queue(&vring, |_| 3), 1);
    let (_, len, id, flags) = queue.read_desc(1);
    assert_eq!(
        (len, id, flags & (PACKED_AVAIL | PACKED_USED)),
        (3, third, 0)
    );
    let used = queue.poll_used();
    assert_eq!(
        used.iter().map(|u| (u.head, u.len)).collect::<Vec<_>>(),
        [(second, 9), (third, 3)]
    );
}

#[test]
fn indirect_table_is_walked_in_order_with_only_the_write_flag() {
    let (memory, queue, vring) = packed(8);
    let table = GPA_BASE + MEM_SIZE - 0x1000;
    let m = memory.mem();
    let entry = |i: u64, addr: u64, len: u32, flags: u16| {
        let at = GuestAddress(table + 16 * i);
        m.write_obj(addr, at).unwrap();
        m.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        m.write_obj(0xffffu16, GuestAddress(at.0 + 12)).unwrap();
        m.write_obj(flags, GuestAddress(at.0 + 14)).unwrap();
    };
    // NEXT and INDIRECT inside the table mean nothing; the walk takes all three entries.
    entry(0, 0x1000, 10, PACKED_NEXT);
    entry(1, 0x2000, 20, PACKED_WRITE | PACKED_INDIRECT);
    entry(2, 0x3000, 30, PACKED_WRITE);
    queue.write_desc(0, table, 48, 6, PACKED_INDIRECT | avail_bits(true));
    let mut seen = Vec::new();
    let completed = process_queue(&vring, |chain| {
        assert!(chain.is_packed() && chain.descriptor_chain().is_none());
        assert_eq!(chain.head_index(), 6);
        seen = chain.map(|d| (d.addr().0, d.len(), d.flags())).collect();
        5
    });
    assert_eq!(completed, 1);
    assert_eq!(
        seen,
        [
            (0x1000, 10, PACKED_NEXT),
            (0x2000, 20, PACKED_WRITE | PACKED_NEXT),
            (0x3000, 30, PACKED_WRITE)
        ]
    );
    let (_, len, id, _) = queue.read_desc(0);
    assert_eq!((len, id), (5, 6));
    assert_eq!(vring.queue_next_avail(), 1 | 1 << 15);
}

#[test]
fn bad_indirect_tables_end_the_walk_and_the_chain_is_still_completed() {
    let (_memory, queue, vring) = packed(8);
    let avail = avail_bits(true);
    // Not a multiple of 16; in a hole past guest memory; crossing its end; with NEXT too.
    let end = GPA_BASE + MEM_SIZE;
    queue.write_desc(0, GPA_BASE + 0x8000, 47, 0, PACKED_INDIRECT | avail);
    queue.write_desc(1, 0x10_0000_0000, 48, 1, PACKED_INDIRECT | avail);
    queue.write_desc(2, end - 16, 48, 2, PACKED_INDIRECT | avail);
    queue.write_desc(3, GPA_BASE, 48, 3, PACKED_INDIRECT | PACKED_NEXT | avail);
    queue.write_desc(4, GPA_BASE, 8, 4, avail);
    let mut walked = Vec::new();
    let completed = process_queue(&vring, |chain| {
        walked.push((chain.head_index(), chain.count()));
        0
    });
    // The indirect descriptor with NEXT is the first of a two-descriptor chain (ids 3 -> 4).
    assert_eq!(completed, 4);
    // The table crossing the end of memory is not mapped in one piece: its first entry (in
    // memory, zeroed) is read, the second is not.
    assert_eq!(walked, [(0, 0), (1, 0), (2, 1), (4, 0)]);
}

#[test]
fn a_descriptor_of_the_chain_with_a_flipped_wrap_counter_is_an_error_on_the_ring() {
    let (_memory, queue, vring) = packed(8);
    let avail = avail_bits(true);
    queue.write_desc(1, GPA_BASE, 8, 0, avail_bits(false));
    queue.write_desc(0, GPA_BASE, 8, 0, PACKED_NEXT | avail);
    let mem = vring.get_ref().mem().memory();
    let err = vring.get_mut().serve_available(&mem, |_| 0).unwrap_err();
    assert!(matches!(err, Error::PackedChain { head: 0, .. }), "{err}");
    // The ring stays at the chain; process_queue reports it (no chain served) and returns.
    assert_eq!(vring.queue_next_avail(), 1 << 15);
    assert_eq!(process_queue(&vring, |_| 0), 0);
    assert_eq!(vring.queue_next_used(), 1 << 15);
}

#[test]
fn a_bad_chain_after_good_ones_ends_the_call_with_their_count_and_errs_on_the_next() {
    let (_memory, mut queue, vring) = packed(8);
    queue.post(&[Buf::Writable(4)]);
    // Position 1: a chain whose second descriptor has the other wrap counter.
    queue.write_desc(2, GPA_BASE, 8, 0, avail_bits(false));
    queue.write_desc(1, GPA_BASE, 8, 0, PACKED_NEXT | avail_bits(true));
    let mem = vring.get_ref().mem().memory();
    assert_eq!(vring.get_mut().serve_available(&mem, |_| 2).unwrap(), 1);
    let err = vring.get_mut().serve_available(&mem, |_| 2).unwrap_err();
    assert!(matches!(err, Error::PackedChain { head: 1, .. }), "{err}");
    assert_eq!(queue.poll_used().len(), 1);
    assert_eq!(vring.queue_next_avail(), 1 | 1 << 15);
}

#[test]
fn a_head_with_the_other_wrap_counter_or_both_flags_is_not_available() {
    let (_memory, queue, vring) = packed(8);
    queue.write_desc(0, GPA_BASE, 8, 0, avail_bits(false));
    assert!(!vring.has_available().unwrap());
    assert_eq!(process_queue(&vring, |_| 0), 0);
    queue.write_desc(0, GPA_BASE, 8, 0, PACKED_AVAIL | PACKED_USED);
    assert!(!vring.has_available().unwrap());
    assert_eq!(process_queue(&vring, |_| 0), 0);
    queue.write_desc(0, GPA_BASE, 8, 0, 0);
    assert_eq!(process_queue(&vring, |_| 0), 0);
    assert_eq!(vring.vring_base(), 0x8000_8000);
}

#[test]
fn a_chain_that_never_ends_is_an_error_not_a_hang() {
    let (_memory, queue, vring) = packed(8);
    for pos in (0..8).rev() {
        queue.write_desc(pos, GPA_BASE, 8, 0, PACKED_NEXT | avail_bits(true));
    }
    let mem = vring.get_ref().mem().memory();
    let err = vring.get_mut().serve_available(&mem, |_| 0).unwrap_err();
    assert!(matches!(err, Error::PackedChain { head: 0, .. }), "{err}");
    assert_eq!(process_queue(&vring, |_| 0), 0);
}

#[test]
fn reused_buffer_ids_are_completed_as_the_driver_gave_them() {
    let (_memory, queue, vring) = packed(8);
    queue.write_desc(1, GPA_BASE, 8, 3, avail_bits(true));
    queue.write_desc(0, GPA_BASE, 8, 3, avail_bits(true));
    let mut ids = Vec::new();
    assert_eq!(
        process_queue(&vring, |chain| {
            ids.push(chain.head_index());
            1
        }),
        2
    );
    assert_eq!(ids, [3, 3]);
    assert_eq!((queue.read_desc(0).2, queue.read_desc(1).2), (3, 3));
}

#[test]
fn a_ring_outside_guest_memory_is_an_error() {
    let (memory, _queue, vring) = packed(8);
    let end = GPA_BASE + MEM_SIZE;
    let mem = memory.mem().clone();
    vring.set_queue_info(end, end - 8, end - 4).unwrap();
    let err = vring.get_mut().serve_available(&mem, |_| 0).unwrap_err();
    assert!(matches!(err, Error::PackedRingAccess { index: 0 }), "{err}");
    assert!(vring.has_available().is_err());
    assert_eq!(process_queue(&vring, |_| 0), 0);
    // A ring whose second half lies past the end, and a chain running into it.
    vring.set_queue_info(end - 64, end - 8, end - 4).unwrap();
    for pos in 0..4u64 {
        let at = GuestAddress(end - 64 + 16 * pos + 14);
        mem.write_obj(PACKED_NEXT | avail_bits(true), at).unwrap();
    }
    let err = vring.get_mut().serve_available(&mem, |_| 0).unwrap_err();
    assert!(matches!(err, Error::PackedRingAccess { index: 4 }), "{err}");
    assert_eq!(vring.queue_next_avail(), 1 << 15);
}

#[test]
fn a_ring_base_past_the_ring_is_an_error() {
    let (_memory, _queue, vring) = packed(8);
    vring.set_vring_base(0x8000_8000 | 40).unwrap();
    let err = vring.has_available().unwrap_err();
    assert!(
        matches!(
            err,
            Error::PackedPosition {
                avail: 0x8028,
                used: 0x8000,
                size: 8
            }
        ),
        "{err}"
    );
    assert_eq!(process_queue(&vring, |_| 0), 0);
}

#[test]
fn the_ring_base_carries_both_positions_and_a_new_vring_resumes_from_it() {
    let (memory, mut queue, vring) = packed(8);
    for _ in 0..5 {
        queue.post(&[Buf::Writable(4), Buf::Writable(4)]);
        assert_eq!(process_queue(&vring, |_| 1), 1);
        queue.poll_used();
    }
    // Ten descriptors into a ring of eight: position 2, wrap counters 0.
    assert_eq!(
        queue.next_avail(),
        Pos {
            idx: 2,
            wrap: false
        }
    );
    let base = vring.vring_base();
    assert_eq!(base, 2 | 2 << 16);
    // GET_VRING_BASE, then a new back-end (or a restarted one) gets SET_VRING_BASE.
    let resumed =
        VringMutex::<Mem>::new(GuestMemoryAtomic::new(memory.mem().clone()), 256).unwrap();
    resumed.set_queue_packed(true);
    resumed.set_queue_size(8).unwrap();
    let (d, drv, dev) = queue.guest_addrs();
    resumed.set_queue_info(d, drv, dev).unwrap();
    resumed.set_vring_base(base).unwrap();
    resumed.set_queue_ready(true);
    resumed.set_enabled(true);
    let id = queue.post(&[Buf::Readable(vec![1, 2, 3])]);
    assert_eq!(
        process_queue(&resumed, |chain| chain.map(|d| d.len()).sum()),
        1
    );
    let used = queue.poll_used();
    assert_eq!(
        used.iter().map(|u| (u.head, u.len)).collect::<Vec<_>>(),
        [(id, 3)]
    );
    // A split ring's base is the 16-bit index and refuses more.
    let split = VringMutex::<Mem>::new(GuestMemoryAtomic::new(memory.mem().clone()), 256).unwrap();
    assert!(matches!(
        split.set_vring_base(0x1_0000),
        Err(Error::InvalidVringBase { num: 0x1_0000 })
    ));
    split.set_vring_base(7).unwrap();
    assert_eq!(split.vring_base(), 7);
}

#[test]
fn the_device_area_follows_enable_and_disable() {
    let (_memory, mut queue, vring) = packed(8);
    vring.disable_notification().unwrap();
    assert_eq!(queue.device_area().1, EVENT_DISABLE);
    assert!(!vring.enable_notification().unwrap());
    assert_eq!(queue.device_area().1, EVENT_ENABLE);
    // A chain posted while enabled asks for a kick; enable reports it.
    let before = queue.next_avail();
    queue.post(&[Buf::Writable(1)]);
    assert!(queue.needs_kick(before));
    assert!(vring.enable_notification().unwrap());
    vring.disable_notification().unwrap();
    assert!(!queue.needs_kick(before));
    // With EVENT_IDX: DESC at the device's next available position.
    vring.set_queue_event_idx(true);
    assert_eq!(process_queue(&vring, |_| 0), 1);
    assert_eq!(queue.device_area(), (1 | 1 << 15, EVENT_DESC));
    let before = queue.next_avail();
    queue.post(&[Buf::Writable(1)]);
    assert!(queue.needs_kick(before));
}

#[test]
fn held_kicks_keep_the_device_area_disabled_until_released() {
    let (_memory, mut queue, vring) = packed(8);
    vring.get_mut().hold_kicks().unwrap();
    assert_eq!(queue.device_area().1, EVENT_DISABLE);
    // process_queue's own re-enable leaves kicks off while they are held.
    let before = queue.next_avail();
    queue.post(&[Buf::Writable(1)]);
    assert!(!queue.needs_kick(before));
    assert_eq!(process_queue(&vring, |_| 0), 1);
    assert_eq!(queue.device_area().1, EVENT_DISABLE);
    let before = queue.next_avail();
    queue.post(&[Buf::Writable(1)]);
    assert!(!queue.needs_kick(before));
    // The release enables them and reports the chain posted without a kick.
    assert!(vring.get_mut().release_kicks().unwrap());
    assert_eq!(queue.device_area().1, EVENT_ENABLE);
    assert_eq!(process_queue(&vring, |_| 0), 1);
}

#[test]
fn the_driver_area_decides_the_interrupt() {
    let (_memory, mut queue, vring) = packed(8);
    // serve_available, not process_queue: the latter takes the decision itself.
    let serve = |vring: &VringMutex<Mem>| {
        let mem = vring.get_ref().mem().memory();
        vring.get_mut().serve_available(&mem, |_| 0).unwrap()
    };
    let serve_one = |queue: &mut PackedQueue| {
        queue.post(&[Buf::Writable(1)]);
        assert_eq!(serve(&vring), 1);
        queue.poll_used();
    };
    // Nothing used since the last decision: no.
    assert!(!vring.needs_notification().unwrap());
    queue.set_driver_area(0, EVENT_DISABLE);
    serve_one(&mut queue);
    assert!(!vring.needs_notification().unwrap());
    queue.set_driver_area(0, EVENT_ENABLE);
    serve_one(&mut queue);
    assert!(vring.needs_notification().unwrap());
    assert!(!vring.needs_notification().unwrap());
    // DESC without EVENT_IDX is read as ENABLE.
    queue.set_driver_area(0x7fff, EVENT_DESC);
    serve_one(&mut queue);
    assert!(vring.needs_notification().unwrap());
    // With EVENT_IDX: only when the position asked for was just used.
    vring.set_queue_event_idx(true);
    let next = vring.queue_next_used();
    queue.set_driver_area(next.wrapping_add(1), EVENT_DESC);
    serve_one(&mut queue);
    assert!(
        !vring.needs_notification().unwrap(),
        "position not reached yet"
    );
    serve_one(&mut queue);
    assert!(vring.needs_notification().unwrap(), "position just used");
    // The same index with the other wrap counter is a lap away.
    let next = vring.queue_next_used();
    queue.set_driver_area(next ^ 1 << 15, EVENT_DESC);
    serve_one(&mut queue);
    assert!(!vring.needs_notification().unwrap());
    // A batch that crosses the ring's end and covers the position.
    for _ in 0..6 {
        queue.post(&[Buf::Writable(1)]);
    }
    let target = Pos {
        idx: 1,
        wrap: false,
    };
    queue.set_driver_area(target.word(), EVENT_DESC);
    assert_eq!(serve(&vring), 6);
    assert!(vring.needs_notification().unwrap());
}

#[test]
fn split_only_calls_refuse_a_packed_ring_and_reset_makes_it_split() {
    let (_memory, mut queue, vring) = packed(8);
    queue.post(&[Buf::Writable(1)]);
    assert!(vring.pop_descriptor_chain().is_none());
    assert!(matches!(
        vring.add_used(0, 0),
        Err(Error::SplitOnly {
            operation: "add_used"
        })
    ));
    assert!(matches!(
        vring.add_used_batch([(0, 0)]),
        Err(Error::SplitOnly {
            operation: "add_used_batch"
        })
    ));
    assert_eq!(vring.queue_used_idx().unwrap(), 1 << 15);
    assert!(vring.queue_packed());
    vring.reset();
    assert!(!vring.queue_packed());
}
