//! A packed virtqueue *driver* (`VIRTIO_F_RING_PACKED`), the guest's side, for tests of the
//! device side; the packed counterpart of [`SplitQueue`](super::SplitQueue), with the same
//! [`Buf`] chains and [`Used`] results.
//!
//! [`PackedQueue`] lays out one packed virtqueue in [`DriverMemory`]: the descriptor ring, the
//! driver area and the device area (the two event suppression structures), and one data
//! buffer per ring position. It posts chains as the Linux driver does (descriptors in ring
//! order from the avail position, each with AVAIL/USED set from the avail wrap counter of its
//! own position, the head's flags written last), hands out buffer ids from a free list,
//! kicks when the device area asks for it (ENABLE, or DESC with `off_wrap`), and reads used
//! descriptors in order from its used position (AVAIL and USED both equal to the used wrap
//! counter), advancing by the descriptor count of the chain each one completes. With
//! EVENT_IDX it asks for an interrupt at its next used position (driver area DESC). Every
//! wait is bounded by a timeout and panics when it expires.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vu_proto::payload::{VringAddr, VringAddrFlags};
use vu_vring::layout;

use super::virtqueue::{
    fill_buffer, wait_used, Buf, DriverMemory, PolledQueue, Posted, Used, BUF_SIZE,
};

/// `VIRTQ_DESC_F_NEXT`.
pub const PACKED_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const PACKED_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub const PACKED_INDIRECT: u16 = 4;
/// `VIRTQ_DESC_F_AVAIL` (bit 7).
pub const PACKED_AVAIL: u16 = 1 << 7;
/// `VIRTQ_DESC_F_USED` (bit 15).
pub const PACKED_USED: u16 = 1 << 15;
/// Event suppression: enabled.
pub const EVENT_ENABLE: u16 = 0;
/// Event suppression: disabled.
pub const EVENT_DISABLE: u16 = 1;
/// Event suppression: at the position in `off_wrap`.
pub const EVENT_DESC: u16 = 2;

/// The flags bits that make a descriptor at a position whose avail wrap counter is `wrap`
/// available: AVAIL equal to the counter, USED its inverse.
pub fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        PACKED_AVAIL
    } else {
        PACKED_USED
    }
}

/// A ring position with its wrap counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    /// The index in the ring.
    pub idx: u16,
    /// The wrap counter (starts at `true`).
    pub wrap: bool,
}

impl Pos {
    /// A fresh ring's position: 0, wrap counter 1.
    pub const START: Pos = Pos { idx: 0, wrap: true };

    /// The position `n` further in a ring of `size`.
    pub fn advance(self, n: u16, size: u16) -> Pos {
        let idx = u32::from(self.idx) + u32::from(n);
        let size = u32::from(size);
        if idx >= size {
            Pos {
                idx: u16::try_from(idx - size).expect("n at most the ring size"),
                wrap: !self.wrap,
            }
        } else {
            Pos {
                idx: u16::try_from(idx).expect("below the ring size"),
                wrap: self.wrap,
            }
        }
    }

    /// The word of `off_wrap` and of the vhost-user ring base: index, wrap counter in bit 15.
    pub fn word(self) -> u16 {
        self.idx | if self.wrap { 1 << 15 } else { 0 }
    }

    fn linear(self, size: u16) -> u32 {
        u32::from(self.idx) + if self.wrap { 0 } else { u32::from(size) }
    }
}

/// A packed virtqueue laid out in [`DriverMemory`], driven from the test.
#[derive(Debug)]
pub struct PackedQueue {
    index: u16,
    size: u16,
    mem: GuestMemoryMmap,
    desc: GuestAddress,
    driver: GuestAddress,
    device: GuestAddress,
    data: GuestAddress,
    desc_user: u64,
    driver_user: u64,
    device_user: u64,
    free_ids: Vec<u16>,
    free_descs: u16,
    posted: HashMap<u16, Posted>,
    next_avail: Pos,
    next_used: Pos,
    chains_posted: u16,
    event_idx: bool,
    /// The kick eventfd (driver to device).
    pub kick: EventFd,
    /// The call eventfd (device to driver).
    pub call: EventFd,
}

impl PackedQueue {
    /// Lays out queue `index` of `size` entries in `memory`, with fresh eventfds, zeroed.
    pub fn new(memory: &mut DriverMemory, index: u16, size: u16) -> Self {
        assert!(size > 0 && size <= 1 << 15, "packed ring size out of range");
        let n = u64::from(size);
        let desc = memory.alloc(layout::desc_table_size(n), 16);
        let driver = memory.alloc(layout::EVENT_SUPPRESSION, 4);
        let device = memory.alloc(layout::EVENT_SUPPRESSION, 4);
        let data = memory.alloc(u64::from(BUF_SIZE) * n, 64);
        let mut q = PackedQueue {
            index,
            size,
            mem: memory.mem().clone(),
            desc,
            driver,
            device,
            data,
            desc_user: memory.user_addr(desc),
            driver_user: memory.user_addr(driver),
            device_user: memory.user_addr(device),
            free_ids: Vec::new(),
            free_descs: size,
            posted: HashMap::new(),
            next_avail: Pos::START,
            next_used: Pos::START,
            chains_posted: 0,
            event_idx: false,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        };
        q.reset();
        q
    }

    /// Zeroes the ring and both areas and forgets every posted chain (a driver reset).
    pub fn reset(&mut self) {
        let zero =
            vec![0u8; usize::try_from(layout::DESC_SIZE * u64::from(self.size)).expect("size")];
        self.mem.write_slice(&zero, self.desc).expect("zero ring");
        self.mem
            .write_slice(&[0; 4], self.driver)
            .expect("zero area");
        self.mem
            .write_slice(&[0; 4], self.device)
            .expect("zero area");
        self.free_ids = (0..self.size).rev().collect();
        self.free_descs = self.size;
        self.posted.clear();
        self.next_avail = Pos::START;
        self.next_used = Pos::START;
        self.chains_posted = 0;
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the descriptor ring, the driver area and the device area.
    pub fn guest_addrs(&self) -> (u64, u64, u64) {
        (
            self.desc.raw_value(),
            self.driver.raw_value(),
            self.device.raw_value(),
        )
    }

    /// The `SET_VRING_ADDR` payload (frontend addresses): descriptor ring, driver area as
    /// `available`, device area as `used`.
    pub fn vring_addr(&self) -> VringAddr {
        VringAddr {
            index: u32::from(self.index),
            flags: VringAddrFlags::empty(),
            descriptor: self.desc_user,
            used: self.device_user,
            available: self.driver_user,
            log: 0,
        }
    }

    /// Follows `VIRTIO_RING_F_EVENT_IDX` for kicks and interrupts.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// The driver's next avail position.
    pub fn next_avail(&self) -> Pos {
        self.next_avail
    }

    /// The driver's next used position.
    pub fn next_used(&self) -> Pos {
        self.next_used
    }

    /// How many posted chains are not yet used.
    pub fn in_flight(&self) -> usize {
        self.posted.len()
    }

    /// How many descriptors are free.
    pub fn free_descriptors(&self) -> usize {
        usize::from(self.free_descs)
    }

    fn desc_addr(&self, pos: u16) -> GuestAddress {
        self.desc.unchecked_add(layout::DESC_SIZE * u64::from(pos))
    }

    /// The data buffer of ring position `pos`.
    pub fn buf_addr(&self, pos: u16) -> GuestAddress {
        self.data
            .unchecked_add(u64::from(BUF_SIZE) * u64::from(pos))
    }

    /// Writes `addr`, `len` and `id` of descriptor `pos`, not its flags.
    fn write_desc_fields(&self, pos: u16, addr: u64, len: u32, id: u16) {
        let d = self.desc_addr(pos);
        self.mem.write_obj(addr.to_le(), d).expect("desc addr");
        self.mem
            .write_obj(len.to_le(), d.unchecked_add(8))
            .expect("desc len");
        self.mem
            .write_obj(id.to_le(), d.unchecked_add(12))
            .expect("desc id");
    }

    /// Writes descriptor `pos` raw: `addr`, `len`, `id`, then `flags` (with Release).
    pub fn write_desc(&self, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        self.write_desc_fields(pos, addr, len, id);
        let d = self.desc_addr(pos);
        fence(Ordering::SeqCst);
        self.mem
            .store(flags.to_le(), d.unchecked_add(14), Ordering::Release)
            .expect("desc flags");
    }

    /// Reads descriptor `pos` raw: `(addr, len, id, flags)`.
    pub fn read_desc(&self, pos: u16) -> (u64, u32, u16, u16) {
        let d = self.desc_addr(pos);
        let addr: u64 = self.mem.read_obj(d).expect("desc addr");
        let len: u32 = self.mem.read_obj(d.unchecked_add(8)).expect("desc len");
        let id: u16 = self.mem.read_obj(d.unchecked_add(12)).expect("desc id");
        let flags: u16 = self.mem.read_obj(d.unchecked_add(14)).expect("desc flags");
        (
            u64::from_le(addr),
            u32::from_le(len),
            u16::from_le(id),
            u16::from_le(flags),
        )
    }

    /// Posts a chain made of `bufs` (each at most [`BUF_SIZE`] bytes) and makes it available,
    /// without kicking. Returns its buffer id.
    pub fn post(&mut self, bufs: &[Buf]) -> u16 {
        assert!(!bufs.is_empty(), "a chain needs a buffer");
        let count = u16::try_from(bufs.len()).expect("chain length");
        assert!(count <= self.free_descs, "not enough free descriptors");
        let id = self.free_ids.pop().expect("free buffer id");
        let head = self.next_avail;
        let mut pos = head;
        let mut descs = Vec::with_capacity(bufs.len());
        let mut head_flags = 0;
        for (k, buf) in bufs.iter().enumerate() {
            let addr = self.buf_addr(pos.idx);
            let (len, writable) = fill_buffer(&self.mem, buf, addr);
            let mut flags = if writable { PACKED_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= PACKED_NEXT;
            }
            flags |= avail_bits(pos.wrap);
            if k == 0 {
                // The head's flags are written last: they publish the chain.
                self.write_desc_fields(pos.idx, addr.raw_value(), len, id);
                head_flags = flags;
            } else {
                self.write_desc(pos.idx, addr.raw_value(), len, id, flags);
            }
            descs.push((pos.idx, flags & PACKED_WRITE != 0, len));
            pos = pos.advance(1, self.size);
        }
        fence(Ordering::SeqCst);
        self.mem
            .store(
                head_flags.to_le(),
                self.desc_addr(head.idx).unchecked_add(14),
                Ordering::Release,
            )
            .expect("head flags");
        self.next_avail = pos;
        self.free_descs -= count;
        self.posted.insert(
            id,
            Posted {
                avail_pos: self.chains_posted,
                descs,
            },
        );
        self.chains_posted = self.chains_posted.wrapping_add(1);
        id
    }

    /// Whether the device wants a kick for what was made available since `old`: the device
    /// area's flags (ENABLE yes, DISABLE no, DESC when its `off_wrap` lies in `[old, now)`).
    pub fn needs_kick(&self, old: Pos) -> bool {
        fence(Ordering::SeqCst);
        let off_wrap: u16 = u16::from_le(self.mem.read_obj(self.device).expect("off_wrap"));
        let flags: u16 = u16::from_le(
            self.mem
                .read_obj(self.device.unchecked_add(2))
                .expect("flags"),
        );
        match flags & 3 {
            EVENT_DISABLE => false,
            EVENT_DESC => {
                let event = Pos {
                    idx: off_wrap & 0x7fff,
                    wrap: off_wrap & 0x8000 != 0,
                };
                let span = 2 * u32::from(self.size);
                let dist =
                    |a: Pos, b: Pos| (b.linear(self.size) + span - a.linear(self.size)) % span;
                dist(old, event) < dist(old, self.next_avail)
            }
            _ => true,
        }
    }

    /// Kicks the device unconditionally.
    pub fn kick(&self) {
        self.kick.write(1).expect("write kick");
    }

    /// Posts a chain and kicks if the device asked for it; returns its buffer id.
    pub fn post_and_kick(&mut self, bufs: &[Buf]) -> u16 {
        let old = self.next_avail;
        let id = self.post(bufs);
        if self.needs_kick(old) {
            self.kick();
        }
        id
    }

    /// Sets the driver area (`off_wrap`, `flags`): what the driver asks of the device's
    /// interrupts.
    pub fn set_driver_area(&self, off_wrap: u16, flags: u16) {
        self.mem
            .write_obj(off_wrap.to_le(), self.driver)
            .expect("driver off_wrap");
        self.mem
            .write_obj(flags.to_le(), self.driver.unchecked_add(2))
            .expect("driver flags");
        fence(Ordering::SeqCst);
    }

    /// The device area as the device last wrote it: `(off_wrap, flags)`.
    pub fn device_area(&self) -> (u16, u16) {
        let off_wrap: u16 = self.mem.read_obj(self.device).expect("off_wrap");
        let flags: u16 = self
            .mem
            .read_obj(self.device.unchecked_add(2))
            .expect("flags");
        (u16::from_le(off_wrap), u16::from_le(flags))
    }

    /// Collects the used descriptors the device wrote since the last call, in order, frees
    /// their ids and descriptors and, with EVENT_IDX, asks for an interrupt at the next one.
    /// The [`Used::head`] of each is its buffer id.
    pub fn poll_used(&mut self) -> Vec<Used> {
        let mut out = Vec::new();
        loop {
            // The flags first, with Acquire: `len` and `id` read before them could be the
            // descriptor's own (the driver's) values, from before the device's used write.
            let d = self.desc_addr(self.next_used.idx);
            let flags = u16::from_le(
                self.mem
                    .load::<u16>(d.unchecked_add(14), Ordering::Acquire)
                    .expect("desc flags"),
            );
            let used = (flags & PACKED_AVAIL != 0) == self.next_used.wrap
                && (flags & PACKED_USED != 0) == self.next_used.wrap;
            if !used {
                break;
            }
            let (_, len, id, _) = self.read_desc(self.next_used.idx);
            let posted = self
                .posted
                .remove(&id)
                .unwrap_or_else(|| panic!("queue {}: used id {id} was not in flight", self.index));
            let written = posted.written(&self.mem, |pos| self.buf_addr(pos));
            let count = u16::try_from(posted.descs.len()).expect("chain length");
            self.next_used = self.next_used.advance(count, self.size);
            self.free_descs += count;
            self.free_ids.push(id);
            out.push(Used {
                head: id,
                len,
                avail_pos: posted.avail_pos,
                written,
            });
        }
        if self.event_idx {
            self.set_driver_area(self.next_used.word(), EVENT_DESC);
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

impl PolledQueue for PackedQueue {
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
