//! A lean virtqueue driver for benchmarks: the guest's side of one split virtqueue, doing per
//! request only what a Linux virtio driver does, so that a benchmark measures the device.
//!
//! It is a faithful driver, not a shortcut: the rings live in [`DriverMemory`] (a memfd shared
//! with the backend), every request is a real descriptor chain whose descriptors are written
//! when it is posted, kicks go through the kick eventfd and honour the device's suppression
//! (`VIRTQ_USED_F_NO_NOTIFY`, or `avail_event` with `VIRTIO_RING_F_EVENT_IDX`), and the driver
//! waits for interrupts on the call eventfd, asking for them with `used_event` as Linux's
//! `virtqueue_enable_cb_prepare` does. What it leaves out is bookkeeping a test driver needs
//! and a guest does not: no allocation per request (chains have fixed slots, allocated once,
//! like the descriptor free list of Linux's `vring_virtqueue`), no zeroing or reading back of
//! buffers, and one available-index store and one kick decision per batch of posted chains
//! (Linux's `virtqueue_kick_prepare` once per batch, as blk-mq does with `bd->last`).
//!
//! The ring fields are accessed as atomics on the shared mapping (relaxed except where the
//! virtio memory model needs ordering: the available index is a release store, the used index
//! an acquire load, and the event-index checks are preceded by full fences).
//!
//! [`SplitQueue`](crate::virtqueue::SplitQueue) stays the driver of the behaviour tests: it
//! keeps every chain's contents and checks them; this one only counts.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vu_proto::features::VirtioFeatures;
use vu_proto::payload::{VringAddr, VringAddrFlags};
use vu_vring::layout;

use crate::virtqueue::{wait_readable, DriverMemory};

/// `VIRTQ_DESC_F_NEXT`.
const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_USED_F_NO_NOTIFY`.
const USED_F_NO_NOTIFY: u16 = 1;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One buffer of the chain every request posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Length of the buffer in bytes.
    pub len: u32,
    /// Whether the device writes it (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// One descriptor, as the four fields of the split ring's `struct virtq_desc`.
#[repr(C)]
struct Desc {
    addr: AtomicU64,
    len: AtomicU32,
    flags: AtomicU16,
    next: AtomicU16,
}

/// One used ring element, `struct virtq_used_elem`.
#[repr(C)]
struct UsedElem {
    id: AtomicU32,
    len: AtomicU32,
}

/// A split virtqueue in [`DriverMemory`] whose requests are all the same chain.
///
/// `size / chain length` chains fit; chain `k` always uses descriptors `k * len ..`, already
/// linked by `next`, and the buffers behind them, so posting a request writes its
/// descriptors' address, length and flags and one available ring entry, nothing else.
#[derive(Debug)]
pub struct LeanQueue {
    index: u16,
    size: u16,
    /// Keeps the mapping the pointers below point into alive.
    mem: GuestMemoryMmap,
    desc: *const Desc,
    avail_flags: *const AtomicU16,
    avail_idx_ptr: *const AtomicU16,
    avail_ring: *const AtomicU16,
    used_event: *const AtomicU16,
    used_flags: *const AtomicU16,
    used_idx_ptr: *const AtomicU16,
    used_ring: *const UsedElem,
    avail_event: *const AtomicU16,
    desc_user: u64,
    avail_user: u64,
    used_user: u64,
    /// Guest addresses of the descriptor table, available ring and used ring.
    gpas: (u64, u64, u64),
    /// The chain every request posts, and the guest address of each of its buffers per slot.
    chain: Vec<Segment>,
    buffers: Vec<u64>,
    /// Free chain slots (head descriptor indices); allocated once, never grows.
    free: Vec<u16>,
    /// Whether each descriptor index is the head of a chain in flight.
    in_flight_head: Vec<bool>,
    avail_idx: u16,
    /// The available index at the last kick decision.
    kicked_at: u16,
    last_used: u16,
    event_idx: bool,
    /// Sum of the lengths the device reported, so the work cannot be optimised away and a
    /// benchmark can check it.
    used_bytes: u64,
    /// Call eventfd signals consumed (the eventfd counter's values read).
    interrupts: Cell<u64>,
    /// The kick eventfd (driver to device), passed with `SET_VRING_KICK`.
    pub kick: EventFd,
    /// The call eventfd (device to driver), passed with `SET_VRING_CALL`.
    pub call: EventFd,
}

// SAFETY: the raw pointers point into the mapping that `mem` (a reference-counted
// `GuestMemoryMmap`, itself `Send`) keeps alive wherever the queue goes; the queue holds no
// thread-bound state, so one thread may build it and another drive it (one queue per driver
// thread, as a guest has one per vCPU).
unsafe impl Send for LeanQueue {}

impl LeanQueue {
    /// Lays out queue `index` of `size` entries (a power of two) in `memory`, with one buffer
    /// per descriptor for the chain `chain`, fresh eventfds and zeroed rings.
    pub fn new(memory: &mut DriverMemory, index: u16, size: u16, chain: &[Segment]) -> Self {
        assert!(size.is_power_of_two(), "queue size must be a power of two");
        assert!(!chain.is_empty(), "a chain needs a buffer");
        let n = u64::from(size);
        let chain_len = u16::try_from(chain.len()).expect("chain length");
        assert!(chain_len <= size, "the chain is longer than the queue");
        let desc = memory.alloc(layout::desc_table_size(n), 16);
        let avail = memory.alloc(layout::avail_ring_size(n), 2);
        let used = memory.alloc(layout::used_ring_size(n), 4);
        let slots = size / chain_len;
        let mut buffers = Vec::with_capacity(usize::from(size));
        for _ in 0..slots {
            for seg in chain {
                let len = u64::from(seg.len).max(1);
                buffers.push(memory.alloc(len, 64).0);
            }
        }
        let host = |gpa: GuestAddress| memory.user_addr(gpa) as *mut u8;
        let (d, a, u) = (host(desc), host(avail), host(used));
        // Offsets inside the rings; all of them lie inside the allocations above.
        let at = |base: *mut u8, off: u64| base.wrapping_add(off as usize);
        let mut q = LeanQueue {
            index,
            size,
            mem: memory.mem().clone(),
            desc: d.cast(),
            avail_flags: a.cast(),
            avail_idx_ptr: at(a, 2).cast(),
            avail_ring: at(a, layout::AVAIL_HEADER).cast(),
            used_event: at(a, layout::AVAIL_HEADER + layout::AVAIL_ELEM * n).cast(),
            used_flags: u.cast(),
            used_idx_ptr: at(u, 2).cast(),
            used_ring: at(u, layout::USED_HEADER).cast(),
            avail_event: at(u, layout::USED_HEADER + layout::USED_ELEM * n).cast(),
            desc_user: memory.user_addr(desc),
            avail_user: memory.user_addr(avail),
            used_user: memory.user_addr(used),
            gpas: (desc.0, avail.0, used.0),
            chain: chain.to_vec(),
            buffers,
            free: Vec::with_capacity(usize::from(slots)),
            in_flight_head: vec![false; usize::from(size)],
            avail_idx: 0,
            kicked_at: 0,
            last_used: 0,
            event_idx: false,
            used_bytes: 0,
            interrupts: Cell::new(0),
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        };
        // Link each slot's descriptors once, as Linux links its free list at creation.
        for slot in (0..slots).rev() {
            let head = slot * chain_len;
            for k in 0..chain_len {
                let next = if k + 1 < chain_len { head + k + 1 } else { 0 };
                q.desc(head + k).next.store(next.to_le(), Ordering::Relaxed);
            }
            q.free.push(head);
        }
        q
    }

    fn desc(&self, i: u16) -> &Desc {
        debug_assert!(i < self.size);
        // SAFETY: `desc` points at the descriptor table of `size` entries, 16-byte aligned,
        // inside the mapping that `mem` keeps alive; `i < size` (every caller passes a
        // descriptor index below `size`: slot heads and offsets inside a slot, or a used id
        // checked against `size`). Desc is four atomics, valid for any bytes, and shared
        // access through atomics is sound while the device writes the same memory.
        unsafe { &*self.desc.add(usize::from(i)) }
    }

    /// The `AtomicU16` ring field at `ptr` plus `i` entries.
    fn ring(&self, ptr: *const AtomicU16, i: u16) -> &AtomicU16 {
        // SAFETY: every caller passes one of the pointers `new` made into this queue's
        // available or used ring, 2-byte aligned, and an index inside that ring (slot indices
        // are taken modulo `size`; the single fields pass 0); the mapping lives as long as
        // `self` (`mem`), and so does the returned reference.
        unsafe { &*ptr.add(usize::from(i)) }
    }

    fn used_elem(&self, slot: u16) -> &UsedElem {
        debug_assert!(slot < self.size);
        // SAFETY: `used_ring` points at `size` used elements, 4-byte aligned, inside the
        // mapping `mem` keeps alive; `slot` is taken modulo `size` by the caller.
        unsafe { &*self.used_ring.add(usize::from(slot)) }
    }

    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// How many chains fit in the queue at once.
    pub fn capacity(&self) -> usize {
        self.in_flight() + self.free.len()
    }

    /// How many posted chains the driver has not yet seen used.
    pub fn in_flight(&self) -> usize {
        usize::from(self.avail_idx.wrapping_sub(self.last_used))
    }

    /// The sum of the lengths the device reported in used entries.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// How many chain slots the queue has (each with its own buffers).
    pub fn slots(&self) -> usize {
        self.buffers.len() / self.chain.len()
    }

    /// Writes `bytes` at the start of buffer `segment` of chain slot `slot`, which every
    /// request posted from that slot then carries (a block request's header, set once).
    pub fn write_buffer(&self, slot: usize, segment: usize, bytes: &[u8]) {
        let at = self.buffer_addr(slot, segment, bytes.len());
        self.mem
            .write_slice(bytes, GuestAddress(at))
            .expect("write a buffer");
    }

    /// Reads the start of buffer `segment` of chain slot `slot` into `out`.
    pub fn read_buffer(&self, slot: usize, segment: usize, out: &mut [u8]) {
        let at = self.buffer_addr(slot, segment, out.len());
        self.mem
            .read_slice(out, GuestAddress(at))
            .expect("read a buffer");
    }

    fn buffer_addr(&self, slot: usize, segment: usize, len: usize) -> u64 {
        assert!(
            slot < self.slots() && segment < self.chain.len(),
            "no such buffer"
        );
        assert!(len <= self.chain[segment].len as usize, "beyond the buffer");
        self.buffers[slot * self.chain.len() + segment]
    }

    /// The `SET_VRING_ADDR` payload for this queue (frontend addresses, no logging).
    pub fn vring_addr(&self) -> VringAddr {
        VringAddr {
            index: u32::from(self.index),
            flags: VringAddrFlags::empty(),
            descriptor: self.desc_user,
            used: self.used_user,
            available: self.avail_user,
            log: 0,
        }
    }

    /// Guest addresses of the descriptor table, available ring and used ring.
    pub fn guest_addrs(&self) -> (u64, u64, u64) {
        self.gpas
    }

    /// Follows `VIRTIO_RING_F_EVENT_IDX` (as negotiated) for kicks and interrupts.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// Posts `n` requests (at most the free slots) and publishes them with one store of the
    /// available index; does not kick. Returns how many were posted.
    pub fn post(&mut self, n: usize) -> usize {
        let n = n.min(self.free.len());
        let chain_len = self.chain.len();
        for _ in 0..n {
            let Some(head) = self.free.pop() else { break };
            let slot = usize::from(head) / chain_len;
            for (k, seg) in self.chain.iter().enumerate() {
                let i = head + k as u16;
                let d = self.desc(i);
                let mut flags = if seg.writable { DESC_F_WRITE } else { 0 };
                if k + 1 < chain_len {
                    flags |= DESC_F_NEXT;
                }
                d.addr.store(
                    self.buffers[slot * chain_len + k].to_le(),
                    Ordering::Relaxed,
                );
                d.len.store(seg.len.to_le(), Ordering::Relaxed);
                d.flags.store(flags.to_le(), Ordering::Relaxed);
            }
            self.in_flight_head[usize::from(head)] = true;
            let entry = self.avail_idx % self.size;
            self.ring(self.avail_ring, entry)
                .store(head.to_le(), Ordering::Relaxed);
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        // The descriptors and entries must be visible before the index that publishes them.
        self.ring(self.avail_idx_ptr, 0)
            .store(self.avail_idx.to_le(), Ordering::Release);
        n
    }

    /// Whether the device wants a kick for the chains published since the last decision
    /// (Linux's `virtqueue_kick_prepare`: one decision per batch).
    pub fn kick_prepare(&mut self) -> bool {
        let old = self.kicked_at;
        let new = self.avail_idx;
        self.kicked_at = new;
        // The published index must be visible before the device's suppression is read.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = u16::from_le(self.ring(self.avail_event, 0).load(Ordering::Relaxed));
            // virtio's vring_need_event(event, new, old).
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags = u16::from_le(self.ring(self.used_flags, 0).load(Ordering::Relaxed));
            flags & USED_F_NO_NOTIFY == 0
        }
    }

    /// Kicks the device (writes the kick eventfd).
    pub fn notify(&self) {
        self.kick.write(1).expect("write kick");
    }

    /// Takes every used entry, frees the chains and, with EVENT_IDX, asks for an interrupt at
    /// the next one and looks again (Linux's `virtqueue_get_buf` loop, then
    /// `virtqueue_enable_cb_prepare` and `virtqueue_poll`). Returns how many were used.
    pub fn take_used(&mut self) -> usize {
        let mut n = 0;
        loop {
            n += self.reap(usize::MAX);
            if !self.event_idx || !self.arm() {
                return n;
            }
        }
    }

    /// Takes up to `max` used entries and frees their chains, touching no notification
    /// field. Returns how many were taken.
    pub fn reap(&mut self, max: usize) -> usize {
        let used_idx = u16::from_le(self.ring(self.used_idx_ptr, 0).load(Ordering::Acquire));
        let mut n = 0;
        while self.last_used != used_idx && n < max {
            let elem = self.used_elem(self.last_used % self.size);
            let id = u32::from_le(elem.id.load(Ordering::Relaxed));
            let len = u32::from_le(elem.len.load(Ordering::Relaxed));
            let head = u16::try_from(id)
                .ok()
                .filter(|&h| h < self.size && self.in_flight_head[usize::from(h)])
                .unwrap_or_else(|| panic!("queue {}: used id {id} was not in flight", self.index));
            self.in_flight_head[usize::from(head)] = false;
            self.free.push(head);
            self.used_bytes += u64::from(len);
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Takes one used entry, as Linux's `virtqueue_get_buf` with callbacks enabled: with
    /// EVENT_IDX it then stores `used_event` (the last used index) with a full barrier, so
    /// the device interrupts for the next one. Returns whether an entry was taken.
    pub fn get_buf(&mut self) -> bool {
        if self.reap(1) == 0 {
            return false;
        }
        if self.event_idx {
            self.ring(self.used_event, 0)
                .store(self.last_used.to_le(), Ordering::Relaxed);
            fence(Ordering::SeqCst);
        }
        true
    }

    /// The number of used entries the driver has not taken yet.
    fn unseen(&self) -> u16 {
        let used_idx = u16::from_le(self.ring(self.used_idx_ptr, 0).load(Ordering::Acquire));
        used_idx.wrapping_sub(self.last_used)
    }

    /// Asks for an interrupt at the next used entry and returns whether entries were used
    /// meanwhile (Linux's `virtqueue_enable_cb_prepare` and `virtqueue_poll`): with EVENT_IDX
    /// `used_event` becomes the last used index seen, without it `VRING_AVAIL_F_NO_INTERRUPT`
    /// is cleared.
    pub fn arm(&mut self) -> bool {
        if self.event_idx {
            self.ring(self.used_event, 0)
                .store(self.last_used.to_le(), Ordering::Relaxed);
        } else {
            self.ring(self.avail_flags, 0).store(0, Ordering::Relaxed);
        }
        // The request must be visible before the used index is read again.
        fence(Ordering::SeqCst);
        self.unseen() != 0
    }

    /// Asks for an interrupt once three quarters of the chains in flight are used, and
    /// returns whether that many were used meanwhile (Linux's
    /// `virtqueue_enable_cb_delayed`). Without EVENT_IDX this is [`arm`](Self::arm).
    pub fn arm_delayed(&mut self) -> bool {
        if !self.event_idx {
            return self.arm();
        }
        let bufs = u16::try_from(self.in_flight() * 3 / 4).unwrap_or(u16::MAX);
        self.ring(self.used_event, 0)
            .store(self.last_used.wrapping_add(bufs).to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.unseen() > bufs
    }

    /// Asks for no interrupts (a polling driver): `VRING_AVAIL_F_NO_INTERRUPT`, and with
    /// EVENT_IDX a `used_event` half the index space away from the last used index, which
    /// no batch of in-flight chains can cross.
    pub fn suppress(&mut self) {
        if self.event_idx {
            self.ring(self.used_event, 0).store(
                self.last_used.wrapping_add(0x8000).to_le(),
                Ordering::Relaxed,
            );
        }
        self.ring(self.avail_flags, 0)
            .store(AVAIL_F_NO_INTERRUPT.to_le(), Ordering::Relaxed);
    }

    /// Waits for an interrupt on the call eventfd and consumes it; panics after `timeout`.
    /// The signals it carried (the eventfd's counter) are added to
    /// [`interrupts`](Self::interrupts).
    pub fn wait_interrupt(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "queue {}: no interrupt before the timeout ({})",
                self.index,
                self.ring_state()
            );
            if wait_readable(self.call.as_raw_fd(), left) {
                if let Ok(n) = self.call.read() {
                    self.interrupts.set(self.interrupts.get() + n);
                    return;
                }
            }
        }
    }

    /// The ring's indices and notification fields, for a failure message.
    pub fn ring_state(&self) -> String {
        let load = |p: *const AtomicU16| u16::from_le(self.ring(p, 0).load(Ordering::SeqCst));
        format!(
            "{} in flight; avail idx {}, kicked at {}, last used {}, used idx {}, \
             used_event {}, avail_event {}, used flags {}",
            self.in_flight(),
            self.avail_idx,
            self.kicked_at,
            self.last_used,
            load(self.used_idx_ptr),
            load(self.used_event),
            load(self.avail_event),
            load(self.used_flags),
        )
    }

    /// Adds the signals pending on the call eventfd to [`interrupts`](Self::interrupts)
    /// without waiting (a polling driver never waits on it).
    pub fn collect_interrupts(&mut self) {
        if let Ok(n) = self.call.read() {
            self.interrupts.set(self.interrupts.get() + n);
        }
    }

    /// The device's writes of the call eventfd the driver consumed so far.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.get()
    }
}

/// Waits for an interrupt on `call` and consumes it; panics after `timeout`.
pub(crate) fn wait_call(call: &EventFd, index: u16, in_flight: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "queue {index}: no interrupt before the timeout ({in_flight} in flight)"
        );
        if wait_readable(call.as_raw_fd(), left) && call.read().is_ok() {
            return;
        }
    }
}

/// What a benchmark needs of a lean driver, for either ring layout: [`LeanQueue`] (split) or
/// [`LeanPacked`](crate::lean_packed::LeanPacked) (packed), with the same driver model.
pub trait LeanDriver {
    /// The layout's name for tables: `split` or `packed`.
    const LAYOUT: &'static str;

    /// Lays out queue `index` of `size` entries in `memory` for requests that are all `chain`.
    fn create(memory: &mut DriverMemory, index: u16, size: u16, chain: &[Segment]) -> Self;

    /// The feature the layout needs acked besides the common ones (`RING_PACKED`, or none).
    fn layout_features() -> VirtioFeatures;

    /// The `SET_VRING_BASE` word of a fresh ring.
    fn initial_base() -> u32;

    /// The `SET_VRING_ADDR` payload (frontend addresses, no logging).
    fn vring_addr(&self) -> VringAddr;

    /// Follows `VIRTIO_RING_F_EVENT_IDX` (as negotiated) for kicks and interrupts.
    fn set_event_idx(&mut self, enabled: bool);

    /// How many chains fit in the queue at once.
    fn capacity(&self) -> usize;

    /// How many posted chains the driver has not yet seen used.
    fn in_flight(&self) -> usize;

    /// The sum of the lengths the device reported.
    fn used_bytes(&self) -> u64;

    /// Posts up to `n` requests and publishes them; does not kick. Returns how many.
    fn post(&mut self, n: usize) -> usize;

    /// Whether the device wants a kick for what was published since the last decision.
    fn kick_prepare(&mut self) -> bool;

    /// Kicks the device (writes the kick eventfd).
    fn notify(&self);

    /// Takes every used chain (with EVENT_IDX asking for the next interrupt and looking
    /// again); returns how many.
    fn take_used(&mut self) -> usize;

    /// Waits for an interrupt and consumes it; panics after `timeout`.
    fn wait_interrupt(&self, timeout: Duration);

    /// The call eventfd (device to driver), for `SET_VRING_CALL`.
    fn call(&self) -> &EventFd;

    /// The kick eventfd (driver to device), for `SET_VRING_KICK`.
    fn kick(&self) -> &EventFd;
}

impl LeanDriver for LeanQueue {
    const LAYOUT: &'static str = "split";

    fn create(memory: &mut DriverMemory, index: u16, size: u16, chain: &[Segment]) -> Self {
        LeanQueue::new(memory, index, size, chain)
    }

    fn layout_features() -> VirtioFeatures {
        VirtioFeatures::empty()
    }

    fn initial_base() -> u32 {
        0
    }

    fn vring_addr(&self) -> VringAddr {
        LeanQueue::vring_addr(self)
    }

    fn set_event_idx(&mut self, enabled: bool) {
        LeanQueue::set_event_idx(self, enabled);
    }

    fn capacity(&self) -> usize {
        LeanQueue::capacity(self)
    }

    fn in_flight(&self) -> usize {
        LeanQueue::in_flight(self)
    }

    fn used_bytes(&self) -> u64 {
        LeanQueue::used_bytes(self)
    }

    fn post(&mut self, n: usize) -> usize {
        LeanQueue::post(self, n)
    }

    fn kick_prepare(&mut self) -> bool {
        LeanQueue::kick_prepare(self)
    }

    fn notify(&self) {
        LeanQueue::notify(self);
    }

    fn take_used(&mut self) -> usize {
        LeanQueue::take_used(self)
    }

    fn wait_interrupt(&self, timeout: Duration) {
        LeanQueue::wait_interrupt(self, timeout);
    }

    fn call(&self) -> &EventFd {
        &self.call
    }

    fn kick(&self) -> &EventFd {
        &self.kick
    }
}

/// A device that completes every chain of a [`LeanQueue`] in the same thread with
/// virtio-queue, without eventfds: the in-memory floor of a device on that crate.
pub mod floor {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    use super::LeanQueue;
    use crate::virtqueue::DriverMemory;

    /// virtio-queue's `Queue` over the driver's own memory.
    #[derive(Debug)]
    pub struct FloorDevice {
        queue: Queue,
        mem: GuestMemoryMmap,
        /// Interrupts the device would have sent.
        pub interrupts: u64,
    }

    impl FloorDevice {
        /// A device on the rings of `lean`.
        pub fn new(memory: &DriverMemory, lean: &LeanQueue, event_idx: bool) -> Self {
            let mut queue = Queue::new(lean.size()).expect("queue");
            let (desc, avail, used) = lean.guest_addrs();
            queue.set_size(lean.size());
            queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
            queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
            queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            let mem = memory.mem().clone();
            assert!(queue.is_valid(&mem), "the floor device's queue is invalid");
            FloorDevice {
                queue,
                mem,
                interrupts: 0,
            }
        }

        /// Completes every available chain with its writable length, notifications
        /// suppressed while working, one interrupt decision per pass (the reference null
        /// device's loop, without the eventfd write). Returns the chains completed.
        pub fn process(&mut self) -> usize {
            let mut n = 0;
            loop {
                self.queue.disable_notification(&self.mem).expect("disable");
                while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
                    let head = chain.head_index();
                    let len = chain
                        .filter(|d| d.is_write_only())
                        .fold(0u32, |t, d| t.saturating_add(d.len()));
                    self.queue.add_used(&self.mem, head, len).expect("add_used");
                    n += 1;
                }
                if self.queue.needs_notification(&self.mem).expect("needs") {
                    self.interrupts += 1;
                }
                if !self.queue.enable_notification(&self.mem).expect("enable") {
                    return n;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::floor::FloorDevice;
    use super::*;

    fn chain() -> [Segment; 3] {
        [
            Segment {
                len: 16,
                writable: false,
            },
            Segment {
                len: 64,
                writable: true,
            },
            Segment {
                len: 1,
                writable: true,
            },
        ]
    }

    #[test]
    fn capacity_is_the_chains_that_fit() {
        let mut mem = DriverMemory::new(1 << 20);
        let q = LeanQueue::new(&mut mem, 0, 16, &chain());
        assert_eq!(q.capacity(), 5);
    }

    #[test]
    fn floor_device_completes_posted_chains_with_their_writable_length() {
        for event_idx in [false, true] {
            let mut mem = DriverMemory::new(1 << 20);
            let mut q = LeanQueue::new(&mut mem, 0, 16, &chain());
            q.set_event_idx(event_idx);
            let mut dev = FloorDevice::new(&mem, &q, event_idx);
            for _ in 0..10 {
                assert_eq!(q.post(5), 5);
                assert!(q.kick_prepare());
                assert_eq!(dev.process(), 5);
                assert_eq!(q.take_used(), 5);
            }
            assert_eq!(q.used_bytes(), 50 * 65);
            assert_eq!(q.in_flight(), 0);
            assert_eq!(dev.interrupts, 10);
        }
    }

    #[test]
    fn kick_is_suppressed_while_the_device_asks_for_none() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = LeanQueue::new(&mut mem, 0, 16, &chain());
        q.post(1);
        assert!(q.kick_prepare());
        q.ring(q.used_flags, 0)
            .store(USED_F_NO_NOTIFY, Ordering::Relaxed);
        q.post(1);
        assert!(!q.kick_prepare());
    }

    fn used_event(q: &LeanQueue) -> u16 {
        u16::from_le(q.ring(q.used_event, 0).load(Ordering::Relaxed))
    }

    #[test]
    fn arming_asks_for_the_next_interrupt_and_sees_entries_used_meanwhile() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = LeanQueue::new(&mut mem, 0, 16, &chain());
        q.set_event_idx(true);
        let mut dev = FloorDevice::new(&mem, &q, true);
        q.post(4);
        dev.process();
        assert_eq!(q.reap(3), 3);
        // One used entry is still unseen: arming reports it.
        assert!(q.arm());
        assert_eq!(used_event(&q), 3);
        assert_eq!(q.reap(usize::MAX), 1);
        assert!(!q.arm());
        assert_eq!(used_event(&q), 4);
    }

    #[test]
    fn delayed_arming_waits_for_three_quarters_of_the_chains_in_flight() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = LeanQueue::new(&mut mem, 0, 16, &chain());
        q.set_event_idx(true);
        q.post(4);
        assert!(!q.arm_delayed());
        assert_eq!(used_event(&q), 3);
    }

    #[test]
    fn get_buf_takes_one_entry_and_moves_used_event_with_it() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = LeanQueue::new(&mut mem, 0, 16, &chain());
        q.set_event_idx(true);
        let mut dev = FloorDevice::new(&mem, &q, true);
        q.post(2);
        dev.process();
        assert!(q.get_buf());
        assert_eq!(used_event(&q), 1);
        assert!(q.get_buf());
        assert!(!q.get_buf());
        assert_eq!(used_event(&q), 2);
    }

    #[test]
    fn a_suppressing_driver_gets_no_interrupt_decision_from_the_device() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = LeanQueue::new(&mut mem, 0, 16, &chain());
        q.set_event_idx(true);
        let mut dev = FloorDevice::new(&mem, &q, true);
        q.suppress();
        q.post(5);
        dev.process();
        assert_eq!(dev.interrupts, 0);
        assert_eq!(q.reap(usize::MAX), 5);
    }

    #[test]
    #[should_panic(expected = "not in flight")]
    fn used_id_not_in_flight_panics() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = LeanQueue::new(&mut mem, 0, 16, &chain());
        q.used_elem(0).id.store(3, Ordering::Relaxed);
        q.ring(q.used_idx_ptr, 0).store(1, Ordering::Release);
        q.take_used();
    }
}
