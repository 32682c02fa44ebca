//! The lean driver of [`lean_driver`](crate::lean_driver) for a packed virtqueue
//! (`VIRTIO_F_RING_PACKED`): the same driver model, so that a benchmark compares the two ring
//! layouts and nothing else.
//!
//! Per request it does what Linux's packed-ring driver (`virtqueue_add_packed`) does: the
//! chain's descriptors are written in ring order from the avail position (address, length,
//! buffer id, flags with the avail wrap counter of each one's own position), the head's flags
//! last with Release; no allocation per request (buffer ids are fixed slots with their
//! buffers, allocated once). One kick decision per batch (`virtqueue_kick_prepare_packed`:
//! the device area's flags, or with EVENT_IDX its `off_wrap` against the batch), kicks
//! through the kick eventfd; used descriptors are read in order at the used position and the
//! position advances by the chain's descriptor count; with EVENT_IDX the driver area asks for
//! an interrupt at the next used position after each drain and the ring is looked at again
//! (`virtqueue_enable_cb_prepare_packed` + `virtqueue_poll_packed`). Without EVENT_IDX the
//! driver area stays ENABLE (zeroed), as the split driver never sets
//! `VIRTQ_AVAIL_F_NO_INTERRUPT`.
//!
//! The behaviour tests keep the checking driver
//! ([`PackedQueue`](crate::packed_driver::PackedQueue)); this one only counts.

use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vu_proto::features::VirtioFeatures;
use vu_proto::payload::{VringAddr, VringAddrFlags};

use crate::lean_driver::{wait_call, LeanDriver, Segment};
use crate::packed_driver::{avail_bits, Pos, EVENT_DESC, PACKED_AVAIL, PACKED_USED};
use crate::virtqueue::DriverMemory;

/// `VIRTQ_DESC_F_NEXT`.
const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;
/// Event suppression `flags`: notifications disabled.
const EVENT_DISABLE: u16 = 1;
/// Bit 15 of `off_wrap`: the wrap counter.
const WRAP_BIT: u16 = 1 << 15;
/// Bytes of a packed descriptor.
const DESC_SIZE: u64 = 16;
/// Bytes of an event suppression structure (`off_wrap: u16`, `flags: u16`).
const EVENT_SIZE: u64 = 4;

/// One descriptor, `struct pvirtq_desc`.
#[repr(C)]
struct Desc {
    addr: AtomicU64,
    len: AtomicU32,
    id: AtomicU16,
    flags: AtomicU16,
}

/// An event suppression structure, `struct pvirtq_event_suppress`.
#[repr(C)]
struct EventSuppress {
    off_wrap: AtomicU16,
    flags: AtomicU16,
}

/// A packed virtqueue in [`DriverMemory`] whose requests are all the same chain.
///
/// `size / chain length` chains fit; buffer id `k` always uses the `k`-th set of buffers, so
/// posting a request writes its descriptors and nothing else.
#[derive(Debug)]
pub struct LeanPacked {
    index: u16,
    size: u16,
    /// Keeps the mapping the pointers below point into alive.
    _mem: GuestMemoryMmap,
    ring: *const Desc,
    driver: *const EventSuppress,
    device: *const EventSuppress,
    addrs: VringAddr,
    /// Guest addresses of the descriptor ring, the driver area and the device area.
    gpas: (u64, u64, u64),
    chain: Vec<Segment>,
    buffers: Vec<u64>,
    /// Free buffer ids (slots); allocated once, never grows.
    free: Vec<u16>,
    /// Whether each buffer id is in flight.
    in_flight_id: Vec<bool>,
    in_flight: usize,
    next_avail: Pos,
    /// The avail position at the last kick decision.
    kicked_at: Pos,
    next_used: Pos,
    event_idx: bool,
    /// Sum of the lengths the device reported.
    used_bytes: u64,
    /// The kick eventfd (driver to device), passed with `SET_VRING_KICK`.
    pub kick: EventFd,
    /// The call eventfd (device to driver), passed with `SET_VRING_CALL`.
    pub call: EventFd,
}

impl LeanPacked {
    /// Lays out queue `index` of `size` entries in `memory`, with one buffer per descriptor
    /// of each chain slot, fresh eventfds and a zeroed ring.
    pub fn new(memory: &mut DriverMemory, index: u16, size: u16, chain: &[Segment]) -> Self {
        assert!(size > 0 && size <= 1 << 15, "packed ring size out of range");
        assert!(!chain.is_empty(), "a chain needs a buffer");
        let chain_len = u16::try_from(chain.len()).expect("chain length");
        assert!(chain_len <= size, "the chain is longer than the queue");
        let ring = memory.alloc(DESC_SIZE * u64::from(size), 16);
        let driver = memory.alloc(EVENT_SIZE, 4);
        let device = memory.alloc(EVENT_SIZE, 4);
        let slots = size / chain_len;
        let mut buffers = Vec::with_capacity(usize::from(size));
        for _ in 0..slots {
            for seg in chain {
                buffers.push(memory.alloc(u64::from(seg.len).max(1), 64).0);
            }
        }
        let host = |gpa| memory.user_addr(gpa) as *const u8;
        LeanPacked {
            index,
            size,
            _mem: memory.mem().clone(),
            ring: host(ring).cast(),
            driver: host(driver).cast(),
            device: host(device).cast(),
            addrs: VringAddr {
                index: u32::from(index),
                flags: VringAddrFlags::empty(),
                descriptor: memory.user_addr(ring),
                used: memory.user_addr(device),
                available: memory.user_addr(driver),
                log: 0,
            },
            gpas: (ring.0, driver.0, device.0),
            chain: chain.to_vec(),
            buffers,
            free: (0..slots).rev().collect(),
            in_flight_id: vec![false; usize::from(slots)],
            in_flight: 0,
            next_avail: Pos::START,
            kicked_at: Pos::START,
            next_used: Pos::START,
            event_idx: false,
            used_bytes: 0,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    /// Guest addresses of the descriptor ring, the driver area and the device area.
    pub fn guest_addrs(&self) -> (u64, u64, u64) {
        self.gpas
    }

    fn desc(&self, i: u16) -> &Desc {
        debug_assert!(i < self.size);
        // SAFETY: `ring` points at the `size` descriptors of the ring, 16-byte aligned, inside
        // the mapping `_mem` keeps alive; every caller passes a ring position (below `size`).
        // Desc is four atomics, valid for any bytes, and shared access through atomics is
        // sound while the device writes the same memory.
        unsafe { &*self.ring.add(usize::from(i)) }
    }

    fn area(&self, ptr: *const EventSuppress) -> &EventSuppress {
        // SAFETY: `ptr` is `driver` or `device`, each a 4-byte aligned event suppression
        // structure inside the mapping `_mem` keeps alive; two atomics, valid for any bytes.
        unsafe { &*ptr }
    }

    /// Whether the descriptor at the used position has been used in the current lap.
    fn used_at_next(&self) -> bool {
        let flags = u16::from_le(self.desc(self.next_used.idx).flags.load(Ordering::Acquire));
        let wrap = self.next_used.wrap;
        (flags & PACKED_AVAIL != 0) == wrap && (flags & PACKED_USED != 0) == wrap
    }
}

/// The distance from `from` to `to` on the circle of `2 * size` positions both wrap values
/// make.
fn distance(from: Pos, to: Pos, size: u16) -> u32 {
    let linear = |p: Pos| u32::from(p.idx) + if p.wrap { 0 } else { u32::from(size) };
    let span = 2 * u32::from(size);
    (linear(to) + span - linear(from)) % span
}

impl LeanDriver for LeanPacked {
    const LAYOUT: &'static str = "packed";

    fn create(memory: &mut DriverMemory, index: u16, size: u16, chain: &[Segment]) -> Self {
        LeanPacked::new(memory, index, size, chain)
    }

    fn layout_features() -> VirtioFeatures {
        VirtioFeatures::RING_PACKED
    }

    fn initial_base() -> u32 {
        // Both positions 0 with wrap counter 1 (the vhost-user ring state of a packed ring).
        let word = u32::from(Pos::START.word());
        word | word << 16
    }

    fn vring_addr(&self) -> VringAddr {
        self.addrs
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
        if enabled {
            let driver = self.area(self.driver);
            driver
                .off_wrap
                .store(self.next_used.word().to_le(), Ordering::Relaxed);
            driver.flags.store(EVENT_DESC.to_le(), Ordering::Release);
        }
    }

    fn capacity(&self) -> usize {
        self.in_flight + self.free.len()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    fn post(&mut self, n: usize) -> usize {
        let n = n.min(self.free.len());
        let chain_len = self.chain.len();
        for _ in 0..n {
            let Some(id) = self.free.pop() else { break };
            let slot = usize::from(id) * chain_len;
            let head = self.next_avail;
            let mut head_flags = 0;
            for (k, seg) in self.chain.iter().enumerate() {
                let pos = self.next_avail;
                let d = self.desc(pos.idx);
                let mut flags = avail_bits(pos.wrap);
                if seg.writable {
                    flags |= DESC_F_WRITE;
                }
                if k + 1 < chain_len {
                    flags |= DESC_F_NEXT;
                }
                d.addr
                    .store(self.buffers[slot + k].to_le(), Ordering::Relaxed);
                d.len.store(seg.len.to_le(), Ordering::Relaxed);
                d.id.store(id.to_le(), Ordering::Relaxed);
                if k == 0 {
                    head_flags = flags;
                } else {
                    d.flags.store(flags.to_le(), Ordering::Relaxed);
                }
                self.next_avail = pos.advance(1, self.size);
            }
            // The rest of the chain must be visible before the head's flags publish it.
            self.desc(head.idx)
                .flags
                .store(head_flags.to_le(), Ordering::Release);
            self.in_flight_id[usize::from(id)] = true;
            self.in_flight += 1;
        }
        n
    }

    fn kick_prepare(&mut self) -> bool {
        let old = self.kicked_at;
        let new = self.next_avail;
        self.kicked_at = new;
        // The published flags must be visible before the device's suppression is read.
        fence(Ordering::SeqCst);
        let device = self.area(self.device);
        let flags = u16::from_le(device.flags.load(Ordering::Relaxed)) & 3;
        if flags == EVENT_DESC && self.event_idx {
            let word = u16::from_le(device.off_wrap.load(Ordering::Relaxed));
            let event = Pos {
                idx: word & !WRAP_BIT,
                wrap: word & WRAP_BIT != 0,
            };
            // The device's event position lies in [old, new).
            distance(old, event, self.size) < distance(old, new, self.size)
        } else {
            flags != EVENT_DISABLE
        }
    }

    fn notify(&self) {
        self.kick.write(1).expect("write kick");
    }

    fn take_used(&mut self) -> usize {
        let chain_len = u16::try_from(self.chain.len()).expect("chain length");
        let mut n = 0;
        loop {
            while self.used_at_next() {
                let d = self.desc(self.next_used.idx);
                let id = u16::from_le(d.id.load(Ordering::Relaxed));
                let len = u32::from_le(d.len.load(Ordering::Relaxed));
                let slot = self
                    .in_flight_id
                    .get_mut(usize::from(id))
                    .filter(|f| **f)
                    .unwrap_or_else(|| {
                        panic!("queue {}: used id {id} was not in flight", self.index)
                    });
                *slot = false;
                self.free.push(id);
                self.in_flight -= 1;
                self.used_bytes += u64::from(len);
                self.next_used = self.next_used.advance(chain_len, self.size);
                n += 1;
            }
            if !self.event_idx {
                return n;
            }
            self.area(self.driver)
                .off_wrap
                .store(self.next_used.word().to_le(), Ordering::Relaxed);
            // off_wrap must be visible before the ring is looked at again.
            fence(Ordering::SeqCst);
            if !self.used_at_next() {
                return n;
            }
        }
    }

    fn wait_interrupt(&self, timeout: Duration) {
        wait_call(&self.call, self.index, self.in_flight, timeout);
    }

    fn call(&self) -> &EventFd {
        &self.call
    }

    fn kick(&self) -> &EventFd {
        &self.kick
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
    use vu_vring::{VringMutex, VringT};

    use super::*;

    type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

    fn chain() -> [Segment; 3] {
        let seg = |len, writable| Segment { len, writable };
        [seg(16, false), seg(64, true), seg(1, true)]
    }

    /// A vu-vring packed ring over the driver's memory, as the daemon sets it up.
    fn device(mem: &Mem, q: &LeanPacked, event_idx: bool) -> VringMutex<Mem> {
        let vring = VringMutex::<Mem>::new(mem.clone(), q.size).expect("vring");
        vring.set_queue_packed(true);
        vring.set_queue_size(q.size).expect("size");
        let (desc, driver, device) = q.guest_addrs();
        vring
            .set_queue_info(desc, driver, device)
            .expect("addresses");
        vring.set_queue_event_idx(event_idx);
        vring
            .set_vring_base(LeanPacked::initial_base())
            .expect("base");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    #[test]
    fn chains_round_trip_through_a_vu_vring_packed_ring_over_several_laps() {
        for event_idx in [false, true] {
            let mut memory = DriverMemory::new(1 << 20);
            // 16 entries, 5 chains of 3 at most: chains do not line up with the laps.
            let mut q = LeanPacked::new(&mut memory, 0, 16, &chain());
            q.set_event_idx(event_idx);
            let mem: Mem = GuestMemoryAtomic::new(memory.mem().clone());
            let vring = device(&mem, &q, event_idx);
            for _ in 0..20 {
                assert_eq!(q.post(5), 5);
                // The device area is never written here: ENABLE, every batch kicks.
                assert!(q.kick_prepare());
                let m = mem.memory();
                let served = vring
                    .get_mut()
                    .serve_available(&*m, |c| {
                        c.filter(|d| d.is_write_only()).map(|d| d.len()).sum()
                    })
                    .expect("serve");
                assert_eq!(served, 5);
                assert_eq!(q.take_used(), 5);
            }
            assert_eq!((q.used_bytes(), q.in_flight()), (100 * 65, 0));
        }
    }
}
