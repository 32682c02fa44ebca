//! The guest's side of split virtqueues: guest memory to share and a driver that lays out
//! rings in it, posts chains, kicks and reads completions.
//!
//! [`DriverMemory`] is "guest memory": a memfd mapped in the test process
//! ([`SharedMemory`]), which the test hands to the backend with `SET_MEM_TABLE`.
//! [`SplitQueue`] lays out one split virtqueue in it (descriptor table, available ring, used
//! ring, and one data buffer per descriptor), posts descriptor chains of readable and
//! writable buffers, kicks the backend through the kick eventfd (honouring the device's
//! notification suppression, `VIRTQ_USED_F_NO_NOTIFY` or `avail_event` with
//! `VIRTIO_RING_F_EVENT_IDX`), waits on the call eventfd, and reads the used ring. Every wait
//! is bounded by a timeout and panics when it expires.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vu_mem::SharedMemory;
use vu_proto::fd::BorrowFd;
use vu_proto::payload::{MemoryRegion, VringAddr, VringAddrFlags};
use vu_vring::layout;

/// Guest physical address of the start of [`DriverMemory`]: not zero, so that a backend that
/// mixes up guest and frontend (VMM) addresses fails.
pub const GPA_BASE: u64 = 0x10_0000;

/// The size of the data buffer behind each descriptor.
pub const BUF_SIZE: u32 = 4096;

/// `VIRTQ_DESC_F_NEXT`.
const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_USED_F_NO_NOTIFY`.
const USED_F_NO_NOTIFY: u16 = 1;

/// Guest memory shared with the backend: a memfd mapped at [`GPA_BASE`], with a bump
/// allocator for rings and buffers.
#[derive(Debug)]
pub struct DriverMemory {
    shared: SharedMemory,
    next: u64,
}

impl DriverMemory {
    /// Maps a new memfd of `size` bytes.
    ///
    /// # Panics
    ///
    /// If the memfd cannot be created or mapped.
    pub fn new(size: u64) -> Self {
        let shared = SharedMemory::new(GuestAddress(GPA_BASE), size).expect("map driver memory");
        DriverMemory {
            shared,
            next: GPA_BASE,
        }
    }

    /// The mapping, as the driver sees it.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.shared.memory()
    }

    /// The memfd, to pass with `SET_MEM_TABLE`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.fd()
    }

    /// The region to describe in `SET_MEM_TABLE`: `user_addr` is where this process mapped it
    /// (the "VMM address" the ring addresses are given in).
    pub fn region(&self) -> MemoryRegion {
        MemoryRegion::new(GPA_BASE, self.shared.size(), self.shared.user_addr(), 0)
    }

    /// The frontend (VMM) address of guest address `gpa`.
    ///
    /// # Panics
    ///
    /// If `gpa` is outside this memory.
    pub fn user_addr(&self, gpa: GuestAddress) -> u64 {
        self.shared
            .user_addr_of(gpa)
            .expect("address in driver memory")
    }

    /// Reserves `len` bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    ///
    /// If the memory is exhausted.
    pub fn alloc(&mut self, len: u64, align: u64) -> GuestAddress {
        let start = self.next.next_multiple_of(align);
        let end = start + len;
        assert!(
            end <= GPA_BASE + self.shared.size(),
            "driver memory exhausted"
        );
        self.next = end;
        GuestAddress(start)
    }
}

/// One buffer of a descriptor chain to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Buf {
    /// A device-readable buffer with these contents.
    Readable(Vec<u8>),
    /// A device-writable buffer of this many bytes (zeroed before posting).
    Writable(u32),
}

/// A chain the device put in the used ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    /// The head descriptor index.
    pub head: u16,
    /// The length the device reported.
    pub len: u32,
    /// The position of the chain in the available ring (the `n`-th chain posted, mod 2^16).
    pub avail_pos: u16,
    /// The contents of the chain's writable buffers, in chain order, after the device used it.
    pub written: Vec<Vec<u8>>,
}

/// A chain posted and not yet used, for either ring layout.
#[derive(Debug)]
pub(super) struct Posted {
    /// The chain's position in the stream of posted chains.
    pub(super) avail_pos: u16,
    /// Per descriptor: its index (split) or ring position (packed), whether the device writes
    /// it, its length.
    pub(super) descs: Vec<(u16, bool, u32)>,
}

impl Posted {
    /// The contents of the chain's writable buffers, in chain order, read back from the
    /// buffer `buf_addr` gives for each descriptor.
    pub(super) fn written(
        &self,
        mem: &GuestMemoryMmap,
        buf_addr: impl Fn(u16) -> GuestAddress,
    ) -> Vec<Vec<u8>> {
        self.descs
            .iter()
            .filter(|&&(_, writable, _)| writable)
            .map(|&(d, _, len)| {
                let mut bytes = vec![0u8; len as usize];
                mem.read_slice(&mut bytes, buf_addr(d))
                    .expect("read buffer");
                bytes
            })
            .collect()
    }
}

/// Puts `buf` in the buffer at `addr` (a readable one's bytes, a writable one zeroed); returns
/// its length and whether the device writes it.
pub(super) fn fill_buffer(mem: &GuestMemoryMmap, buf: &Buf, addr: GuestAddress) -> (u32, bool) {
    match buf {
        Buf::Readable(bytes) => {
            let len = u32::try_from(bytes.len()).expect("buffer length");
            assert!(len <= BUF_SIZE, "buffer larger than BUF_SIZE");
            mem.write_slice(bytes, addr).expect("write buffer");
            (len, false)
        }
        Buf::Writable(len) => {
            assert!(*len <= BUF_SIZE, "buffer larger than BUF_SIZE");
            let zero = vec![0u8; *len as usize];
            mem.write_slice(&zero, addr).expect("zero buffer");
            (*len, true)
        }
    }
}

/// A test driver's queue, either layout: what [`wait_used`] needs of it.
pub(super) trait PolledQueue {
    /// The queue index, for messages.
    fn queue_index(&self) -> u16;
    /// The call eventfd.
    fn call_fd(&self) -> &EventFd;
    /// Collects the chains used since the last call.
    fn poll(&mut self) -> Vec<Used>;
}

/// Waits until `count` more chains of `queue` are used, waking on its call eventfd; panics
/// after `timeout`.
pub(super) fn wait_used(
    queue: &mut impl PolledQueue,
    count: usize,
    timeout: Duration,
) -> Vec<Used> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        out.extend(queue.poll());
        if out.len() >= count {
            return out;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "queue {}: {} of {count} chains used before the timeout",
            queue.queue_index(),
            out.len()
        );
        if wait_readable(queue.call_fd().borrow_fd(), left) {
            // Consume the interrupt; a second one may already be pending, which is fine.
            let _ = queue.call_fd().read();
        }
    }
}

/// A split virtqueue laid out in [`DriverMemory`], driven from the test.
#[derive(Debug)]
pub struct SplitQueue {
    index: u16,
    size: u16,
    mem: GuestMemoryMmap,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    data: GuestAddress,
    desc_user: u64,
    avail_user: u64,
    used_user: u64,
    free: Vec<u16>,
    posted: HashMap<u16, Posted>,
    avail_idx: u16,
    last_used: u16,
    event_idx: bool,
    /// The kick eventfd (driver to device), passed with `SET_VRING_KICK`.
    pub kick: EventFd,
    /// The call eventfd (device to driver), passed with `SET_VRING_CALL`.
    pub call: EventFd,
}

impl SplitQueue {
    /// Lays out queue `index` of `size` entries (a power of two) in `memory`, with fresh
    /// kick and call eventfds, everything zeroed.
    pub fn new(memory: &mut DriverMemory, index: u16, size: u16) -> Self {
        assert!(size.is_power_of_two(), "queue size must be a power of two");
        let n = u64::from(size);
        let desc = memory.alloc(layout::desc_table_size(n), 16);
        let avail = memory.alloc(layout::avail_ring_size(n), 2);
        let used = memory.alloc(layout::used_ring_size(n), 4);
        let data = memory.alloc(u64::from(BUF_SIZE) * n, 64);
        let mut q = SplitQueue {
            index,
            size,
            mem: memory.mem().clone(),
            desc,
            avail,
            used,
            data,
            desc_user: memory.user_addr(desc),
            avail_user: memory.user_addr(avail),
            used_user: memory.user_addr(used),
            free: Vec::new(),
            posted: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            event_idx: false,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        };
        q.reset();
        q
    }

    /// Zeroes the rings and forgets every posted chain (a driver reset).
    pub fn reset(&mut self) {
        let n = u64::from(self.size);
        let zero = |addr: GuestAddress, len: u64| {
            let bytes = vec![0u8; usize::try_from(len).expect("ring size")];
            self.mem.write_slice(&bytes, addr).expect("zero ring");
        };
        zero(self.desc, layout::desc_table_size(n));
        zero(self.avail, layout::avail_ring_size(n));
        zero(self.used, layout::used_ring_size(n));
        self.free = (0..self.size).rev().collect();
        self.posted.clear();
        self.avail_idx = 0;
        self.last_used = 0;
    }

    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
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

    /// The guest addresses of the descriptor table, the available ring and the used ring:
    /// what `VringT::set_queue_info` takes when a test drives a vring without a daemon.
    pub fn ring_addrs(&self) -> (GuestAddress, GuestAddress, GuestAddress) {
        (self.desc, self.avail, self.used)
    }

    /// Follows `VIRTIO_RING_F_EVENT_IDX` (as negotiated) for kicks and interrupts.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// How many chains were posted (the available ring's `idx`).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used ring's `idx`, as the device last wrote it.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .load(self.used.unchecked_add(layout::USED_IDX), Ordering::Acquire)
            .expect("read used idx")
    }

    /// How many posted chains the driver has not yet seen used.
    pub fn in_flight(&self) -> usize {
        self.posted.len()
    }

    /// How many descriptors are free.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    fn desc_addr(&self, i: u16) -> GuestAddress {
        self.desc.unchecked_add(layout::DESC_SIZE * u64::from(i))
    }

    fn buf_addr(&self, i: u16) -> GuestAddress {
        self.data.unchecked_add(u64::from(BUF_SIZE) * u64::from(i))
    }

    /// Posts a chain made of `bufs` (each at most [`BUF_SIZE`] bytes) and makes it available,
    /// without kicking. Returns its head descriptor index.
    pub fn post(&mut self, bufs: &[Buf]) -> u16 {
        assert!(!bufs.is_empty(), "a chain needs a buffer");
        assert!(bufs.len() <= self.free.len(), "not enough free descriptors");
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| self.free.pop().expect("free descriptor"))
            .collect();
        let mut descs = Vec::with_capacity(bufs.len());
        for (k, (buf, &id)) in bufs.iter().zip(&ids).enumerate() {
            let addr = self.buf_addr(id);
            let (len, writable) = fill_buffer(&self.mem, buf, addr);
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            let next = ids.get(k + 1).copied().unwrap_or(0);
            if k + 1 < ids.len() {
                flags |= DESC_F_NEXT;
            }
            let d = self.desc_addr(id);
            self.mem
                .write_obj(addr.raw_value().to_le(), d)
                .expect("desc addr");
            self.mem
                .write_obj(len.to_le(), d.unchecked_add(8))
                .expect("desc len");
            self.mem
                .write_obj(flags.to_le(), d.unchecked_add(12))
                .expect("desc flags");
            self.mem
                .write_obj(next.to_le(), d.unchecked_add(14))
                .expect("desc next");
            descs.push((id, flags & DESC_F_WRITE != 0, len));
        }
        let head = ids[0];
        let slot = u64::from(self.avail_idx % self.size);
        let entry = self
            .avail
            .unchecked_add(layout::AVAIL_HEADER + layout::AVAIL_ELEM * slot);
        self.mem
            .write_obj(head.to_le(), entry)
            .expect("avail entry");
        // The entry must be visible before the index that publishes it.
        fence(Ordering::SeqCst);
        let pos = self.avail_idx;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(
                self.avail_idx.to_le(),
                self.avail.unchecked_add(layout::AVAIL_IDX),
                Ordering::Release,
            )
            .expect("avail idx");
        self.posted.insert(
            head,
            Posted {
                avail_pos: pos,
                descs,
            },
        );
        head
    }

    /// Whether the device wants a kick for the chains made available since `old_avail`
    /// (`VIRTQ_USED_F_NO_NOTIFY`, or `avail_event` with EVENT_IDX).
    pub fn needs_kick(&self, old_avail: u16) -> bool {
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event_addr = self
                .used
                .unchecked_add(layout::USED_HEADER + layout::USED_ELEM * u64::from(self.size));
            let event: u16 = self.mem.read_obj(event_addr).expect("avail_event");
            let new = self.avail_idx;
            // virtio's vring_need_event(event, new, old).
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old_avail)
        } else {
            let flags: u16 = self.mem.read_obj(self.used).expect("used flags");
            flags & USED_F_NO_NOTIFY == 0
        }
    }

    /// Kicks the device unconditionally.
    pub fn kick(&self) {
        self.kick.write(1).expect("write kick");
    }

    /// Posts a chain and kicks if the device asked for it; returns the head.
    pub fn post_and_kick(&mut self, bufs: &[Buf]) -> u16 {
        let old = self.avail_idx;
        let head = self.post(bufs);
        if self.needs_kick(old) {
            self.kick();
        }
        head
    }

    /// Collects the used entries the device wrote since the last call, frees their
    /// descriptors and, with EVENT_IDX, asks for an interrupt at the next one.
    pub fn poll_used(&mut self) -> Vec<Used> {
        let mut out = Vec::new();
        let used_idx = self.used_idx();
        while self.last_used != used_idx {
            let slot = u64::from(self.last_used % self.size);
            let elem = self
                .used
                .unchecked_add(layout::USED_HEADER + layout::USED_ELEM * slot);
            let id: u32 = u32::from_le(self.mem.read_obj(elem).expect("used id"));
            let len: u32 =
                u32::from_le(self.mem.read_obj(elem.unchecked_add(4)).expect("used len"));
            let head = u16::try_from(id).expect("used id fits a descriptor index");
            let posted = self
                .posted
                .remove(&head)
                .unwrap_or_else(|| panic!("queue {}: used id {id} was not in flight", self.index));
            let written = posted.written(&self.mem, |d| self.buf_addr(d));
            self.free.extend(posted.descs.iter().map(|&(d, _, _)| d));
            out.push(Used {
                head,
                len,
                avail_pos: posted.avail_pos,
                written,
            });
            self.last_used = self.last_used.wrapping_add(1);
        }
        if self.event_idx {
            let used_event = self
                .avail
                .unchecked_add(layout::AVAIL_HEADER + layout::AVAIL_ELEM * u64::from(self.size));
            self.mem
                .write_obj(self.last_used.to_le(), used_event)
                .expect("used_event");
            fence(Ordering::SeqCst);
        }
        out
    }

    /// Waits until `count` more chains are used, waking on the call eventfd; panics after
    /// `timeout`.
    pub fn wait_used(&mut self, count: usize, timeout: Duration) -> Vec<Used> {
        wait_used(self, count, timeout)
    }

    /// Consumes the call eventfd's counter: how many interrupts arrived (0 if none).
    pub fn take_calls(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }
}

impl PolledQueue for SplitQueue {
    fn queue_index(&self) -> u16 {
        self.index
    }

    fn call_fd(&self) -> &EventFd {
        &self.call
    }

    fn poll(&mut self) -> Vec<Used> {
        self.poll_used()
    }
}

/// Waits until `fd` is readable or `timeout` passes; returns whether it is readable.
///
/// # Panics
///
/// If the epoll set cannot be created or `fd` cannot be added to it.
pub fn wait_readable(fd: impl AsFd, timeout: Duration) -> bool {
    let epoll = Epoll::new().expect("epoll for a wait");
    epoll
        .ctl(
            ControlOperation::Add,
            fd.as_fd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .expect("watch the fd");
    let ms = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    let mut events = [EpollEvent::default()];
    loop {
        match epoll.wait(ms, &mut events) {
            Ok(n) => return n > 0,
            // A signal: wait again (the timeout restarts, which only lengthens a bounded wait).
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => panic!("epoll_wait: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posted_chain_is_published_in_the_avail_ring() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = SplitQueue::new(&mut mem, 0, 8);
        let head = q.post(&[Buf::Readable(vec![1, 2, 3]), Buf::Writable(16)]);
        assert_eq!(q.avail_idx(), 1);
        let idx: u16 = mem
            .mem()
            .read_obj(q.avail.unchecked_add(layout::AVAIL_IDX))
            .unwrap();
        assert_eq!(idx, 1);
        let entry: u16 = mem
            .mem()
            .read_obj(q.avail.unchecked_add(layout::AVAIL_HEADER))
            .unwrap();
        assert_eq!(entry, head);
        let flags: u16 = mem
            .mem()
            .read_obj(q.desc_addr(head).unchecked_add(12))
            .unwrap();
        assert_eq!(flags, DESC_F_NEXT);
        assert_eq!(q.free_descriptors(), 6);
    }

    #[test]
    fn used_entry_frees_descriptors_and_returns_written_data() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = SplitQueue::new(&mut mem, 0, 8);
        let head = q.post(&[Buf::Writable(4)]);
        // Play the device: write the buffer and a used entry.
        mem.mem().write_slice(b"abcd", q.buf_addr(head)).unwrap();
        mem.mem()
            .write_obj(u32::from(head), q.used.unchecked_add(4))
            .unwrap();
        mem.mem().write_obj(4u32, q.used.unchecked_add(8)).unwrap();
        mem.mem().write_obj(1u16, q.used.unchecked_add(2)).unwrap();
        let used = q.poll_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].written, vec![b"abcd".to_vec()]);
        assert_eq!(q.free_descriptors(), 8);
    }

    #[test]
    fn no_notify_flag_suppresses_kicks_without_event_idx() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = SplitQueue::new(&mut mem, 0, 8);
        q.post(&[Buf::Writable(1)]);
        assert!(q.needs_kick(0));
        mem.mem().write_obj(USED_F_NO_NOTIFY, q.used).unwrap();
        assert!(!q.needs_kick(0));
    }

    #[test]
    fn avail_event_decides_kicks_with_event_idx() {
        let mut mem = DriverMemory::new(1 << 20);
        let mut q = SplitQueue::new(&mut mem, 0, 8);
        q.set_event_idx(true);
        let event_addr = q
            .used
            .unchecked_add(layout::USED_HEADER + layout::USED_ELEM * 8);
        q.post(&[Buf::Writable(1)]);
        // avail_event 0: the device wants a kick when entry 0 becomes available.
        assert!(q.needs_kick(0));
        mem.mem().write_obj(5u16, event_addr).unwrap();
        assert!(!q.needs_kick(0));
    }
}
