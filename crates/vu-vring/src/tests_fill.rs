//! Filling device-writable chains ([`VringData::fill_available`]): every buffer shape, gathering
//! across chains, give-back, packed rings, inflight tracking, malformed chains.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};

use crate::inflight::{area_size, InflightArea};
use crate::testutil::memfd;
use crate::{VringMutex, VringT};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const INDIRECT_TABLE: u64 = 0x4000;
const BUFFERS: u64 = 0x8000;
const MEM_LEN: usize = 0x10000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
/// Packed descriptor flags.
const AVAIL_F: u16 = 1 << 7;
const USED_F: u16 = 1 << 15;

/// Guest memory, one ring (split or packed) and the driver's side of it.
struct Guest {
    mem: Mem,
    vring: VringMutex<Mem>,
    packed: bool,
    /// Split: the available index; packed: the next position to make available.
    avail: u16,
    /// Split: the next free descriptor of the table.
    next_desc: u16,
}

impl Guest {
    fn new(packed: bool) -> Self {
        Self::with_regions(packed, &[(GuestAddress(0), MEM_LEN)])
    }

    /// The same over guest memory made of `regions` (each mapped on its own).
    fn with_regions(packed: bool, regions: &[(GuestAddress, usize)]) -> Self {
        let mmap = GuestMemoryMmap::from_ranges(regions).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let vring = VringMutex::<Mem>::new(mem.clone(), 256).unwrap();
        vring.set_queue_packed(packed);
        vring.set_queue_size(SIZE).unwrap();
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Guest {
            mem,
            vring,
            packed,
            avail: 0,
            next_desc: 0,
        }
    }

    /// Makes a chain of `(addr, len, flags)` descriptors available (`NEXT` added where it
    /// continues); returns its head (split) or buffer id (packed).
    fn offer(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let m = self.mem.memory();
        let last = descs.len() - 1;
        if self.packed {
            let id = self.avail;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let next = if i < last { NEXT } else { 0 };
                let at = DESC + 16 * u64::from(self.avail);
                m.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
                m.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
                m.write_obj(id.to_le(), GuestAddress(at + 12)).unwrap();
                let flags = flags | next | AVAIL_F;
                m.store(flags.to_le(), GuestAddress(at + 14), Ordering::Release)
                    .unwrap();
                self.avail += 1;
            }
            return id;
        }
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = self.next_desc;
            let (flags, next) = if i < last {
                (flags | NEXT, index + 1)
            } else {
                (flags, 0)
            };
            let desc = Descriptor::new(addr, len, flags, next);
            m.write_obj(desc, GuestAddress(DESC + 16 * u64::from(index)))
                .unwrap();
            self.next_desc += 1;
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % SIZE);
        m.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        m.store(
            self.avail.to_le(),
            GuestAddress(AVAIL + 2),
            Ordering::Release,
        )
        .unwrap();
        head
    }

    /// A one-descriptor writable chain of `len` bytes at buffer slot `slot`.
    fn offer_buffer(&mut self, slot: u64, len: u32) -> u16 {
        self.offer(&[(BUFFERS + 0x100 * slot, len, WRITE)])
    }

    /// The used entries as `(id, len)`: split, the used ring up to its index; packed, the
    /// used descriptors from position 0 on.
    fn used(&self) -> Vec<(u16, u32)> {
        let m = self.mem.memory();
        if self.packed {
            let mut out = Vec::new();
            let mut pos = 0u64;
            while pos < u64::from(SIZE) {
                let at = DESC + 16 * pos;
                let flags: u16 = m.read_obj(GuestAddress(at + 14)).unwrap();
                if flags & USED_F == 0 {
                    break;
                }
                let len: u32 = m.read_obj(GuestAddress(at + 8)).unwrap();
                let id: u16 = m.read_obj(GuestAddress(at + 12)).unwrap();
                out.push((id, len));
                // Every chain of these tests is one descriptor long, but for gathered ones.
                pos += 1;
            }
            return out;
        }
        let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = USED + 4 + 8 * u64::from(i % SIZE);
                let id: u32 = m.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem
            .memory()
            .read_slice(&mut buf, GuestAddress(addr))
            .unwrap();
        buf
    }

    /// Runs one fill pass with `fill`.
    fn fill<R>(
        &self,
        fill: impl FnOnce(&mut crate::Filler<'_, '_, Mem>) -> R,
    ) -> Result<R, crate::Error> {
        let mut data = self.vring.get_mut();
        let mem = data.mem().memory();
        data.fill_available(&mem, fill)
    }
}

/// The bytes 0, 1, 2, ... of a packet of `len` bytes.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| i as u8).collect()
}

#[test]
fn each_packet_goes_in_place_into_its_chain_and_the_pass_publishes_them() {
    let mut guest = Guest::new(false);
    for slot in 0..3 {
        guest.offer_buffer(slot, 0x40);
    }
    let placed = guest
        .fill(|rx| {
            let mut placed = 0;
            while let Some(buffers) = rx.take(10, 1) {
                assert_eq!(buffers.chains(), 1);
                assert_eq!(buffers.capacity(), 0x40);
                assert_eq!(buffers.write_at(0, &pattern(10 + placed)), 10 + placed);
                assert_eq!(buffers.commit(10 + placed), 1);
                placed += 1;
            }
            placed
        })
        .unwrap();
    assert_eq!(placed, 3);
    assert_eq!(guest.used(), vec![(0, 10), (1, 11), (2, 12)]);
    assert_eq!(guest.read(BUFFERS + 0x200, 12), pattern(12));
}

#[test]
fn buffers_in_several_regions_and_across_two_are_filled_where_they_are() {
    // Two regions, mapped apart in the host: buffers in the first, across the boundary (two
    // slices), in the second, and in the first again (the pass's region window moves).
    let boundary = 0xC000;
    let regions = [
        (GuestAddress(0), boundary as usize),
        (GuestAddress(boundary), MEM_LEN - boundary as usize),
    ];
    for packed in [false, true] {
        let mut guest = Guest::with_regions(packed, &regions);
        let places = [BUFFERS, boundary - 0x40, boundary + 0x1000, BUFFERS + 0x200];
        let data = |i: usize| {
            (0..0x80)
                .map(|j| (j * 3 + i * 41) as u8)
                .collect::<Vec<_>>()
        };
        for &at in &places {
            guest.offer(&[(at, 0x80, WRITE)]);
        }
        let slices = guest
            .fill(|rx| {
                let mut slices = Vec::new();
                for i in 0..places.len() {
                    let buffers = rx.take(0x80, 1).unwrap();
                    slices.push(buffers.slices().len());
                    assert_eq!(buffers.write_at(0, &data(i)), 0x80);
                    buffers.commit(0x80);
                }
                slices
            })
            .unwrap();
        assert_eq!(slices, vec![1, 2, 1, 1], "packed {packed}");
        for (i, &at) in places.iter().enumerate() {
            assert_eq!(guest.read(at, 0x80), data(i), "packed {packed}");
        }
    }
}

#[test]
fn a_chain_split_anywhere_with_empty_descriptors_is_filled_in_order() {
    let mut guest = Guest::new(false);
    // 3 bytes, an empty descriptor, 5 bytes, then 100 bytes in two more pieces.
    guest.offer(&[
        (BUFFERS, 3, WRITE),
        (BUFFERS + 0x100, 0, WRITE),
        (BUFFERS + 0x200, 5, WRITE),
        (BUFFERS + 0x300, 60, WRITE),
        (BUFFERS + 0x400, 40, WRITE),
    ]);
    let packet = pattern(50);
    guest
        .fill(|rx| {
            let buffers = rx.take(50, 1).unwrap();
            assert_eq!(buffers.capacity(), 108);
            assert_eq!(buffers.slices().len(), 4);
            assert_eq!(buffers.write_at(0, &packet), 50);
            buffers.commit(50)
        })
        .unwrap();
    assert_eq!(guest.used(), vec![(0, 50)]);
    let mut seen = guest.read(BUFFERS, 3);
    seen.extend(guest.read(BUFFERS + 0x200, 5));
    seen.extend(guest.read(BUFFERS + 0x300, 42));
    assert_eq!(seen, packet);
}

#[test]
fn a_packet_gathers_chains_until_covered_and_reports_each_chains_bytes() {
    let mut guest = Guest::new(false);
    for slot in 0..4 {
        guest.offer_buffer(slot, 32);
    }
    guest
        .fill(|rx| {
            let buffers = rx.take(80, 64).unwrap();
            assert_eq!((buffers.chains(), buffers.capacity()), (3, 96));
            assert_eq!(buffers.chains_for(80), 3);
            assert_eq!(buffers.chains_for(64), 2);
            assert_eq!(buffers.chain_capacity(2), 32);
            // num_buffers first, as a net device would write it into its header.
            buffers.write_at(0, &pattern(80));
            assert_eq!(buffers.commit(80), 3);
            let next = rx.take(1, 64).unwrap();
            assert_eq!(next.chains(), 1);
            next.commit(1);
        })
        .unwrap();
    assert_eq!(guest.used(), vec![(0, 32), (1, 32), (2, 16), (3, 1)]);
    assert_eq!(guest.read(BUFFERS + 0x100, 32), pattern(64)[32..]);
}

#[test]
fn chains_the_bytes_did_not_reach_are_given_back() {
    let mut guest = Guest::new(false);
    for slot in 0..3 {
        guest.offer_buffer(slot, 32);
    }
    guest
        .fill(|rx| {
            let buffers = rx.take(80, 64).unwrap();
            assert_eq!(buffers.chains(), 3);
            assert_eq!(buffers.commit(40), 2);
        })
        .unwrap();
    assert_eq!(guest.used(), vec![(0, 32), (1, 8)]);
    assert_eq!(guest.vring.queue_next_avail(), 2);
    // The third chain is taken again by the next pass.
    guest.fill(|rx| rx.take(1, 1).unwrap().commit(1)).unwrap();
    assert_eq!(guest.used().last(), Some(&(2, 1)));
}

#[test]
fn room_dropped_unused_goes_back_to_the_ring_untouched() {
    let mut guest = Guest::new(false);
    guest.offer_buffer(0, 32);
    guest.offer_buffer(1, 32);
    let took = guest
        .fill(|rx| {
            let buffers = rx.take(100, 64).unwrap();
            // Not enough room: the packet waits, the chains go back.
            assert_eq!(buffers.capacity(), 64);
            drop(buffers);
            let again = rx.take(100, 64).map(|b| b.chains());
            (again, rx.completed())
        })
        .unwrap();
    assert_eq!(took, (Some(2), 0));
    assert_eq!(guest.used(), vec![]);
    assert_eq!(guest.vring.queue_next_avail(), 0);
}

#[test]
fn an_empty_ring_or_an_index_far_ahead_yields_no_room() {
    let guest = Guest::new(false);
    assert!(guest.fill(|rx| rx.take(1, 1).is_none()).unwrap());
    // An available index more than the ring's size ahead: nothing can be taken.
    let m = guest.mem.memory();
    m.write_obj(100u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    assert!(guest.fill(|rx| rx.take(1, 1).is_none()).unwrap());
    assert_eq!(guest.used(), vec![]);
}

#[test]
fn malformed_chains_are_completed_empty_and_the_ring_goes_on() {
    let mut guest = Guest::new(false);
    let readable = guest.offer(&[(BUFFERS, 16, 0)]);
    let outside = guest.offer(&[(MEM_LEN as u64 - 8, 16, WRITE)]);
    let empty = guest.offer(&[(BUFFERS, 0, WRITE), (BUFFERS, 0, WRITE)]);
    // One descriptor, read straight from the table rather than walked: the same verdict.
    let zero = guest.offer(&[(BUFFERS, 0, WRITE)]);
    // An indirect table inside an indirect table.
    {
        let m = guest.mem.memory();
        let nested = Descriptor::new(INDIRECT_TABLE, 16, INDIRECT, 0);
        m.write_obj(nested, GuestAddress(INDIRECT_TABLE)).unwrap();
    }
    let nested = guest.offer(&[(INDIRECT_TABLE, 16, INDIRECT)]);
    let good = guest.offer_buffer(5, 32);
    let (malformed, room) = guest
        .fill(|rx| {
            let buffers = rx.take(8, 1).unwrap();
            let room = buffers.capacity();
            buffers.commit(8);
            (rx.malformed(), room)
        })
        .unwrap();
    assert_eq!((malformed, room), (5, 32));
    assert_eq!(
        guest.used(),
        vec![
            (readable, 0),
            (outside, 0),
            (empty, 0),
            (zero, 0),
            (nested, 0),
            (good, 8)
        ]
    );
}

#[test]
fn a_malformed_chain_among_a_packets_chains_is_completed_after_them() {
    let mut guest = Guest::new(false);
    guest.offer_buffer(0, 32);
    let readable = guest.offer(&[(BUFFERS + 0x100, 32, 0)]);
    guest.offer_buffer(2, 32);
    guest
        .fill(|rx| {
            let buffers = rx.take(60, 64).unwrap();
            assert_eq!(buffers.chains(), 2);
            buffers.commit(60);
        })
        .unwrap();
    assert_eq!(guest.used(), vec![(0, 32), (2, 28), (readable, 0)]);
}

#[test]
fn a_loop_in_the_links_ends_the_walk_and_the_chain_keeps_what_it_had() {
    let mut guest = Guest::new(false);
    let m = guest.mem.memory();
    // Descriptor 0 -> 1 -> 0 -> ...: the walk stops after the table's size.
    m.write_obj(
        Descriptor::new(BUFFERS, 8, WRITE | NEXT, 1),
        GuestAddress(DESC),
    )
    .unwrap();
    m.write_obj(
        Descriptor::new(BUFFERS + 8, 8, WRITE | NEXT, 0),
        GuestAddress(DESC + 16),
    )
    .unwrap();
    m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    m.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    guest.avail = 1;
    let room = guest
        .fill(|rx| {
            let buffers = rx.take(8, 1).unwrap();
            let room = buffers.capacity();
            buffers.commit(8);
            room
        })
        .unwrap();
    assert_eq!(room, 8 * usize::from(SIZE));
    assert_eq!(guest.used(), vec![(0, 8)]);
}

#[test]
fn a_packed_ring_is_filled_gathered_and_given_back_in_order() {
    let mut guest = Guest::new(true);
    for slot in 0..4 {
        guest.offer_buffer(slot, 32);
    }
    guest
        .fill(|rx| {
            let buffers = rx.take(40, 64).unwrap();
            assert_eq!(buffers.chains(), 2);
            buffers.write_at(0, &pattern(40));
            assert_eq!(buffers.commit(40), 2);
            // Two more taken, then given back.
            let back = rx.take(64, 64).unwrap();
            assert_eq!(back.chains(), 2);
        })
        .unwrap();
    assert_eq!(guest.used(), vec![(0, 32), (1, 8)]);
    assert_eq!(guest.read(BUFFERS + 0x100, 8), pattern(40)[32..]);
    // The chains given back are the next pass's.
    guest
        .fill(|rx| {
            let buffers = rx.take(64, 64).unwrap();
            assert_eq!(buffers.chains(), 2);
            buffers.commit(64);
        })
        .unwrap();
    assert_eq!(guest.used(), vec![(0, 32), (1, 8), (2, 32), (3, 32)]);
}

#[test]
fn a_malformed_packed_chain_is_completed_empty() {
    let mut guest = Guest::new(true);
    let readable = guest.offer(&[(BUFFERS, 16, 0)]);
    let good = guest.offer_buffer(1, 16);
    guest.fill(|rx| rx.take(4, 1).unwrap().commit(4)).unwrap();
    assert_eq!(guest.used(), vec![(readable, 0), (good, 4)]);
}

#[test]
fn tracked_chains_are_recorded_while_taken_and_cleared_when_given_back_or_completed() {
    let mut guest = Guest::new(false);
    let file = memfd(area_size(1, SIZE, false));
    let area = InflightArea::map(file, 0, area_size(1, SIZE, false), 1, SIZE).unwrap();
    let queue = area.queue(0).unwrap();
    guest
        .vring
        .get_mut()
        .restart(Some(queue.clone()), true)
        .unwrap();
    guest.offer_buffer(0, 32);
    guest.offer_buffer(1, 32);
    let inflight = |head| queue.region().unwrap().inflight(head).unwrap();
    guest
        .fill(|rx| {
            let buffers = rx.take(40, 64).unwrap();
            assert_eq!((inflight(0), inflight(1)), (1, 1));
            drop(buffers);
            assert_eq!((inflight(0), inflight(1)), (0, 0));
            let buffers = rx.take(10, 64).unwrap();
            assert_eq!((inflight(0), inflight(1)), (1, 0));
            buffers.commit(10);
        })
        .unwrap();
    assert_eq!((inflight(0), inflight(1)), (0, 0));
    assert_eq!(guest.used(), vec![(0, 10)]);
    assert_eq!(queue.region().unwrap().used_idx().unwrap(), 1);
    assert_eq!(guest.vring.queue_next_avail(), 1);
}

#[test]
fn chains_in_flight_at_a_restart_are_filled_first() {
    let mut guest = Guest::new(false);
    let file = memfd(area_size(1, SIZE, false));
    let area = InflightArea::map(file, 0, area_size(1, SIZE, false), 1, SIZE).unwrap();
    let queue = area.queue(0).unwrap();
    guest
        .vring
        .get_mut()
        .restart(Some(queue.clone()), true)
        .unwrap();
    guest.offer_buffer(0, 32);
    guest.offer_buffer(1, 32);
    // Chain 0 taken, then the process "dies" before completing it: its record stays.
    guest.vring.pop_descriptor_chain().unwrap();
    let restarted = guest.vring.get_mut().restart(Some(queue), true).unwrap();
    assert_eq!(restarted.resubmit, 1);
    guest
        .fill(|rx| {
            let back = rx.take(64, 64).unwrap();
            assert_eq!(back.chains(), 2);
            drop(back);
            rx.take(1, 1).unwrap().commit(1);
        })
        .unwrap();
    // The resubmitted chain, given back once, is still the first filled.
    assert_eq!(guest.used(), vec![(0, 1)]);
    assert_eq!(guest.vring.get_ref().resubmit_pending(), 0);
}

#[test]
fn guest_memory_is_copied_into_gathered_room_with_nothing_in_between() {
    let mut guest = Guest::new(false);
    guest.offer_buffer(0, 24);
    guest.offer_buffer(1, 24);
    let source = BUFFERS + 0x1000;
    guest
        .mem
        .memory()
        .write_slice(&pattern(40), GuestAddress(source))
        .unwrap();
    let copied = guest
        .fill(|rx| {
            let buffers = rx.take(40, 64).unwrap();
            let mem = guest.mem.memory();
            let src = mem.get_slice(GuestAddress(source), 40).unwrap();
            // From byte 4 of the room on: 20 bytes in the first chain, 20 in the second.
            let copied = buffers.write_volatile_at(4, &src);
            buffers.commit(44);
            copied
        })
        .unwrap();
    assert_eq!(copied, 40);
    assert_eq!(guest.used(), vec![(0, 24), (1, 20)]);
    let mut got = guest.read(BUFFERS + 4, 20);
    got.extend(guest.read(BUFFERS + 0x100, 20));
    assert_eq!(got, pattern(40));
}

#[test]
fn guest_memory_at_an_address_is_copied_in_from_the_window_across_regions_or_refused() {
    // Two regions mapped apart in the host: a source in the room's region (cut from the
    // pass's window), one across the boundary (two slices), one past guest memory.
    let boundary = 0xC000;
    let regions = [
        (GuestAddress(0), boundary as usize),
        (GuestAddress(boundary), MEM_LEN - boundary as usize),
    ];
    let mut guest = Guest::with_regions(false, &regions);
    guest.offer_buffer(0, 24);
    guest.offer_buffer(1, 24);
    let m = guest.mem.memory();
    let near = BUFFERS + 0x1000;
    let across = boundary - 8;
    m.write_slice(&pattern(20), GuestAddress(near)).unwrap();
    m.write_slice(&pattern(40)[20..], GuestAddress(across))
        .unwrap();
    let copied = guest
        .fill(|rx| {
            let buffers = rx.take(44, 64).unwrap();
            let m = &*m;
            let refused = buffers.write_guest_at(0, m, GuestAddress(MEM_LEN as u64 - 4), 8);
            assert!(
                matches!(refused, Err(crate::Error::GuestMemory { addr, .. }) if addr == MEM_LEN as u64 - 4)
            );
            let first = buffers.write_guest_at(4, m, GuestAddress(near), 20).unwrap();
            let second = buffers.write_guest_at(24, m, GuestAddress(across), 20).unwrap();
            buffers.commit(44);
            (first, second)
        })
        .unwrap();
    assert_eq!(copied, (20, 20));
    assert_eq!(guest.used(), vec![(0, 24), (1, 20)]);
    // Nothing of the refused copy was written.
    assert_eq!(guest.read(BUFFERS, 4), vec![0; 4]);
    let mut got = guest.read(BUFFERS + 4, 20);
    got.extend(guest.read(BUFFERS + 0x100, 20));
    assert_eq!(got, pattern(40));
}

#[test]
fn guest_memory_of_another_snapshot_is_copied_from_that_snapshot() {
    // The source chain's memory is not the pass's (here: other guest memory altogether, as
    // after a memory update between the two snapshots): its bytes come from it, not from
    // the pass's window at the same address.
    let mut guest = Guest::new(false);
    guest.offer_buffer(0, 24);
    let source = BUFFERS + 0x1000;
    guest
        .mem
        .memory()
        .write_slice(&[0xee; 16], GuestAddress(source))
        .unwrap();
    let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap();
    other
        .write_slice(&pattern(16), GuestAddress(source))
        .unwrap();
    let copied = guest
        .fill(|rx| {
            let buffers = rx.take(16, 1).unwrap();
            let copied = buffers.write_guest_at(0, &other, GuestAddress(source), 16);
            buffers.commit(16);
            copied.unwrap()
        })
        .unwrap();
    assert_eq!(copied, 16);
    assert_eq!(guest.read(BUFFERS, 16), pattern(16));
}

#[test]
fn a_split_pass_goes_on_past_a_ring_of_chains_while_the_driver_refills() {
    let mut guest = Guest::new(false);
    for slot in 0..u64::from(SIZE) {
        guest.offer_buffer(slot, 32);
    }
    let mem = guest.mem.clone();
    let filled = {
        let mut data = guest.vring.get_mut();
        let snapshot = data.mem().memory();
        data.fill_available(&snapshot, |rx| {
            let mut filled = 0u16;
            while let Some(buffers) = rx.take(8, 1) {
                buffers.commit(8);
                filled += 1;
                if filled == SIZE {
                    // The driver reposts the first chain (its descriptor 0) once more.
                    let m = mem.memory();
                    let slot = AVAIL + 4 + 2 * u64::from(SIZE % SIZE);
                    m.write_obj(0u16.to_le(), GuestAddress(slot)).unwrap();
                    m.store(
                        (SIZE + 1).to_le(),
                        GuestAddress(AVAIL + 2),
                        Ordering::Release,
                    )
                    .unwrap();
                }
            }
            filled
        })
    };
    assert_eq!(filled.unwrap(), SIZE + 1);
    assert_eq!(guest.used().len(), usize::from(SIZE + 1));
}

#[test]
fn fill_queue_decides_on_the_interrupt_once_per_pass() {
    let mut guest = Guest::new(false);
    let (call, observe) = crate::testutil::eventfd_pair();
    guest.vring.set_call(Some(call));
    for slot in 0..4 {
        guest.offer_buffer(slot, 32);
    }
    let placed = crate::fill_queue(&guest.vring, |rx| {
        let mut placed = 0;
        while let Some(buffers) = rx.take(8, 1) {
            buffers.commit(8);
            placed += 1;
        }
        placed
    })
    .unwrap();
    assert_eq!(placed, 4);
    assert_eq!(guest.used().len(), 4);
    // Four completions, one signal.
    assert_eq!(crate::eventfd::eventfd_take(&observe).unwrap(), 1);
    // A pass that completes nothing does not signal.
    let took = crate::fill_queue(&guest.vring, |rx| rx.take(8, 1).is_some()).unwrap();
    assert!(!took);
    assert_eq!(crate::eventfd::eventfd_take(&observe).unwrap(), 0);
}

#[test]
fn room_leaked_with_mem_forget_is_given_back_not_lost() {
    let mut guest = Guest::new(false);
    guest.offer_buffer(0, 32);
    guest
        .fill(|rx| {
            std::mem::forget(rx.take(8, 1).unwrap());
            // The next take starts by giving the leaked chain back, and takes it again.
            let buffers = rx.take(8, 1).unwrap();
            assert_eq!(buffers.chains(), 1);
            buffers.commit(8);
        })
        .unwrap();
    assert_eq!(guest.used(), vec![(0, 8)]);
    // Leaked as the pass ends: given back, taken by the next pass.
    guest.offer_buffer(1, 32);
    guest
        .fill(|rx| std::mem::forget(rx.take(8, 1).unwrap()))
        .unwrap();
    assert_eq!(guest.vring.queue_next_avail(), 1);
}

#[test]
fn the_used_index_is_published_once_when_the_pass_ends() {
    let mut guest = Guest::new(false);
    for slot in 0..3 {
        guest.offer_buffer(slot, 32);
    }
    let mem = guest.mem.clone();
    let used_idx = move || -> u16 { mem.memory().read_obj(GuestAddress(USED + 2)).unwrap() };
    let seen = guest
        .fill(|rx| {
            let mut seen = Vec::new();
            while let Some(buffers) = rx.take(8, 1) {
                buffers.commit(8);
                seen.push(used_idx());
            }
            seen
        })
        .unwrap();
    // Nothing was visible to the driver during the pass; all three at its end.
    assert_eq!(seen, vec![0, 0, 0]);
    assert_eq!(guest.used().len(), 3);
}
