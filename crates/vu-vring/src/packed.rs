//! Packed virtqueues (`VIRTIO_F_RING_PACKED`, virtio 1.2 section 2.8): the device side of the
//! descriptor ring, its wrap counters and both event suppression structures.
//!
//! virtio-queue 0.18 serves split rings only, so this is the crate's own implementation. The
//! ring addresses, size and `VIRTIO_F_RING_EVENT_IDX` stay in the [`Queue`] (the three
//! `SET_VRING_ADDR` addresses mean the descriptor ring, the driver area and the device area);
//! what a packed ring adds is kept here: the device's next available and next used positions
//! with their wrap counters, and the position of the last notification decision.
//!
//! Every access goes through vm-memory with bounds checks, and nothing the driver wrote is
//! trusted: a descriptor that is not available where a chain says it continues, a chain longer
//! than the ring, or a ring outside guest memory is an [`Error`] on that ring; the device's
//! positions then stay where they were.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::chain::{Chain, PackedDesc, ReadAhead, Table, DESC_SIZE, PACKED_F_NEXT};
use crate::error::Error;
use crate::iommu::Translating;

/// Descriptor flag: the driver's avail wrap counter when it made the descriptor available.
pub(crate) const PACKED_F_AVAIL: u16 = 1 << 7;
/// Descriptor flag: set by the device to its used wrap counter when it used the descriptor.
pub(crate) const PACKED_F_USED: u16 = 1 << 15;
/// Event suppression flags: notifications enabled.
pub(crate) const EVENT_F_ENABLE: u16 = 0;
/// Event suppression flags: notifications disabled.
pub(crate) const EVENT_F_DISABLE: u16 = 1;
/// Event suppression flags: notify only at the position in `off_wrap` (needs
/// `VIRTIO_F_RING_EVENT_IDX`).
pub(crate) const EVENT_F_DESC: u16 = 2;
/// Bit 15 of a position word (`off_wrap`, the vhost-user ring base): the wrap counter; bits
/// 0-14 are the position.
pub(crate) const WRAP_BIT: u16 = 1 << 15;
/// Offset of `flags` in an event suppression structure (`off_wrap: u16` comes first).
const EVENT_FLAGS: u64 = 2;
/// Offset of `len: u32` in a packed descriptor.
const DESC_LEN: usize = 8;
/// Offset of `id: u16` in a packed descriptor.
const DESC_ID: usize = 12;
/// Offset of `flags: u16` in a packed descriptor.
const DESC_FLAGS: usize = 14;

/// A position in the ring with its wrap counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// The index in the ring, below the queue size.
    pub(crate) idx: u16,
    /// The wrap counter, starting at `true` (1) and flipped at each pass over the ring's end.
    pub(crate) wrap: bool,
}

impl Position {
    /// The position of a fresh ring: index 0, wrap counter 1.
    const START: Position = Position { idx: 0, wrap: true };

    /// The position word of vhost-user and `off_wrap`: the index in bits 0-14, the wrap
    /// counter in bit 15.
    pub(crate) fn word(self) -> u16 {
        self.idx | if self.wrap { WRAP_BIT } else { 0 }
    }

    /// The position a word encodes (see [`word`](Self::word)).
    pub(crate) fn from_word(word: u16) -> Self {
        Position {
            idx: word & !WRAP_BIT,
            wrap: word & WRAP_BIT != 0,
        }
    }

    /// The position `n` (at most `size`) descriptors further.
    fn advance(self, n: u16, size: u16) -> Self {
        let idx = u32::from(self.idx) + u32::from(n);
        if idx >= u32::from(size) {
            Position {
                idx: (idx - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Position {
                idx: idx as u16,
                wrap: self.wrap,
            }
        }
    }

    /// The position on a circle of `2 * size` steps where both wrap values have their place,
    /// so that distances between positions are differences modulo `2 * size`.
    fn linear(self, size: u16) -> u32 {
        u32::from(self.idx) + if self.wrap { 0 } else { u32::from(size) }
    }
}

/// Whether descriptor `flags` say "available" to a device whose avail wrap counter is `wrap`:
/// the AVAIL bit equals the counter and the USED bit does not (virtio 1.2, 2.8.1). Flags that
/// claim both available and used, or neither, are not available.
fn is_available(flags: u16, wrap: bool) -> bool {
    (flags & PACKED_F_AVAIL != 0) == wrap && (flags & PACKED_F_USED != 0) != wrap
}

/// A chain taken from the ring: `count` descriptors from position `head`, with the buffer id
/// of its last descriptor and its first descriptors as they were read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Taken {
    pub(crate) head: u16,
    pub(crate) count: u16,
    pub(crate) id: u16,
    pub(crate) read_ahead: ReadAhead,
}

/// The device's state of one packed ring.
#[derive(Debug, Clone)]
pub(crate) struct PackedRing {
    /// The ring's size: any number of entries from 1 to 32768, not only powers of two
    /// (virtio 1.2, 2.8: "Queue Size ... need not be a power of 2" for packed rings), so it
    /// is kept here rather than in the [`Queue`], which takes powers of two only.
    size: u16,
    next_avail: Position,
    next_used: Position,
    /// `next_used` when the notification decision was last taken.
    notified: Position,
}

impl PackedRing {
    /// A fresh ring of `size` entries: positions 0, wrap counters 1.
    pub(crate) fn new(size: u16) -> Self {
        PackedRing {
            size,
            next_avail: Position::START,
            next_used: Position::START,
            notified: Position::START,
        }
    }
}

impl PackedRing {
    /// The ring's size.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Sets the ring's size (`SET_VRING_NUM`; checked by the caller).
    pub(crate) fn set_size(&mut self, size: u16) {
        self.size = size;
    }

    /// The next position the device reads from, with the avail wrap counter.
    pub(crate) fn next_avail(&self) -> Position {
        self.next_avail
    }

    /// The next position the device writes a used descriptor to, with the used wrap counter.
    pub(crate) fn next_used(&self) -> Position {
        self.next_used
    }

    /// Sets the next available position (`SET_VRING_BASE`, low half).
    pub(crate) fn set_next_avail(&mut self, pos: Position) {
        self.next_avail = pos;
    }

    /// Sets the next used position (`SET_VRING_BASE`, high half), restarting the notification
    /// window.
    pub(crate) fn set_next_used(&mut self, pos: Position) {
        self.next_used = pos;
        self.notified = pos;
    }

    /// Pops every chain available now (at most a ring's worth of descriptors, so a
    /// notification window never covers more than the ring), serves each and writes its
    /// used descriptor, in order. Returns how many chains were completed.
    ///
    /// A malformed chain after completed ones ends the call with their count: the ring stays
    /// at the bad chain, so the next call reports its error with nothing completed, and a
    /// caller counting completions (or deciding on an interrupt) sees every completed chain.
    pub(crate) fn serve<G, F>(
        &mut self,
        queue: &Queue,
        mem: &G,
        iommu: Option<&Translating>,
        mut serve: F,
    ) -> Result<usize, Error>
    where
        G: GuestMemory,
        F: FnMut(Chain<'_, G>) -> u32,
    {
        let size = self.size;
        let ring = Table::map_writable(mem, GuestAddress(queue.desc_table()), size);
        let mut completed = 0;
        let mut descriptors = 0u32;
        while descriptors < u32::from(size) {
            let position = self.next_avail;
            let taken = match self.take(&ring, mem) {
                Ok(Some(taken)) => taken,
                Ok(None) => break,
                Err(err) if completed == 0 => return Err(err),
                Err(_) => break,
            };
            let chain = Chain::packed(
                mem,
                &ring,
                (taken.head, taken.count, taken.id),
                taken.read_ahead,
            );
            let len = match iommu {
                None => serve(chain),
                Some((iommu, unanswered)) => {
                    let mut chain = chain.with_iommu(iommu.clone(), *unanswered);
                    if let Err((iova, access)) = chain.pretranslate() {
                        // Put back, to be taken again once the frontend answered the miss.
                        self.next_avail = position;
                        return Err(Error::IommuMiss { iova, access });
                    }
                    serve(chain)
                }
            };
            self.put_used(&ring, mem, taken, len)?;
            descriptors += u32::from(taken.count);
            completed += 1;
        }
        Ok(completed)
    }

    /// Whether the descriptor at the next available position is available.
    pub(crate) fn has_available<G: GuestMemory>(
        &self,
        queue: &Queue,
        mem: &G,
    ) -> Result<bool, Error> {
        self.check_position(self.size)?;
        // One load through guest memory, not a mapping of the whole ring: this runs once or
        // twice per pass, for one descriptor.
        let offset = (usize::from(self.next_avail.idx) * DESC_SIZE + DESC_FLAGS) as u64;
        let flags = read_u16(mem, queue.desc_table(), offset)?;
        Ok(is_available(flags, self.next_avail.wrap))
    }

    /// Takes the chain at the next available position, if the driver made one available.
    pub(crate) fn take<G: GuestMemory>(
        &mut self,
        ring: &Table<'_, G>,
        mem: &G,
    ) -> Result<Option<Taken>, Error> {
        self.check_position(ring.entries())?;
        let size = ring.entries();
        let head = self.next_avail;
        let flags = load_u16(ring, mem, head.idx, DESC_FLAGS)?;
        if !is_available(flags, head.wrap) {
            return Ok(None);
        }
        // The driver writes the head's flags last, with Release: the rest of the chain is
        // visible after this fence.
        fence(Ordering::Acquire);
        let mut pos = head;
        let mut count = 0u16;
        // What is read here is what the device's walk sees: no descriptor is read twice.
        let mut read_ahead = ReadAhead::default();
        loop {
            // `let else`, not `ok_or`: an error value built and dropped for every descriptor
            // was 5 % of a null device's instructions.
            let Some((addr, len, id, flags)) = ring.read_raw(mem, pos.idx) else {
                return Err(Error::PackedRingAccess { index: pos.idx });
            };
            // Each descriptor of a chain is made available with the wrap counter of its own
            // position: one that is not (a flipped counter, a stale entry) breaks the chain.
            if !is_available(flags, pos.wrap) {
                return Err(Error::PackedChain {
                    head: head.idx,
                    reason: "a descriptor of the chain is not available",
                });
            }
            read_ahead.push(PackedDesc { addr, len, flags });
            count += 1;
            pos = pos.advance(1, size);
            if flags & PACKED_F_NEXT == 0 {
                self.next_avail = pos;
                return Ok(Some(Taken {
                    head: head.idx,
                    count,
                    id,
                    read_ahead,
                }));
            }
            if count == size {
                return Err(Error::PackedChain {
                    head: head.idx,
                    reason: "the chain is longer than the ring",
                });
            }
        }
    }

    /// Writes the used descriptor of `taken` at the next used position: `len`, `id` and the
    /// flags (AVAIL and USED both equal to the used wrap counter) in one 8-byte store with
    /// Release (the three fields are the descriptor's last 8 bytes, and a ring is 16-byte
    /// aligned), or one by one with the flags last when that store is refused, so a driver
    /// that sees the flags sees the rest; the position then advances by the chain's
    /// descriptor count. The descriptor's `addr` is left as the driver wrote
    /// it (virtio 1.2, 2.8.8: only the buffer id, length and flags of a used descriptor
    /// mean something).
    pub(crate) fn put_used<G: GuestMemory>(
        &mut self,
        ring: &Table<'_, G>,
        mem: &G,
        taken: Taken,
        len: u32,
    ) -> Result<(), Error> {
        let at = self.next_used.idx;
        let flags = if self.next_used.wrap {
            PACKED_F_AVAIL | PACKED_F_USED
        } else {
            0
        };
        let word = u64::from(len)
            | u64::from(taken.id) << (8 * (DESC_ID - DESC_LEN))
            | u64::from(flags) << (8 * (DESC_FLAGS - DESC_LEN));
        if ring
            .store(mem, at, DESC_LEN, word.to_le(), Ordering::Release)
            .is_none()
        {
            // A host mapping that is not 8-byte aligned where the guest address is (or guest
            // memory that refuses the store): the three fields one by one, flags last.
            let access = || Error::PackedRingAccess { index: at };
            ring.store(mem, at, DESC_LEN, len.to_le(), Ordering::Relaxed)
                .ok_or_else(access)?;
            ring.store(mem, at, DESC_ID, taken.id.to_le(), Ordering::Relaxed)
                .ok_or_else(access)?;
            ring.store(mem, at, DESC_FLAGS, flags.to_le(), Ordering::Release)
                .ok_or_else(access)?;
        }
        self.next_used = self.next_used.advance(taken.count, ring.entries());
        Ok(())
    }

    /// Decides whether the driver wants a notification for the used descriptors written
    /// since the last decision, and restarts the window (virtio 1.2, 2.8.10).
    ///
    /// The driver area's flags say: ENABLE, notify; DISABLE, do not; DESC (with
    /// `VIRTIO_F_RING_EVENT_IDX`), notify when the position in `off_wrap` lies in the window.
    /// DESC without EVENT_IDX is not a valid value and is read as ENABLE.
    pub(crate) fn needs_notification<G: GuestMemory>(
        &mut self,
        queue: &Queue,
        mem: &G,
    ) -> Result<bool, Error> {
        let old = self.notified;
        let new = self.next_used;
        if old == new {
            return Ok(false);
        }
        // The used flags (Release) must be visible before we read what the driver asked for.
        fence(Ordering::SeqCst);
        // `off_wrap` and `flags` in one load (the area is 4-byte aligned).
        let area = read_u32(mem, queue.avail_ring())?;
        let flags = (area >> 16) as u16;
        let needed = match flags & 3 {
            EVENT_F_DISABLE => false,
            EVENT_F_DESC if queue.event_idx_enabled() => {
                let event = Position::from_word(area as u16);
                let size = self.size;
                let span = 2 * u32::from(size);
                let dist = |from: Position, to: Position| {
                    (to.linear(size) + span - from.linear(size)) % span
                };
                // The driver's event position lies in [old, new).
                event.idx < size && dist(old, event) < dist(old, new)
            }
            _ => true,
        };
        self.notified = new;
        Ok(needed)
    }

    /// Asks the driver not to notify (device area flags DISABLE).
    pub(crate) fn disable_notification<G: GuestMemory>(
        &self,
        queue: &Queue,
        mem: &G,
    ) -> Result<(), Error> {
        write_u16(mem, queue.used_ring(), EVENT_FLAGS, EVENT_F_DISABLE)
    }

    /// Re-enables driver notifications: with EVENT_IDX, at the next available position
    /// (DESC with `off_wrap`), else for every buffer (ENABLE); then returns whether a chain
    /// became available meanwhile.
    pub(crate) fn enable_notification<G: GuestMemory>(
        &self,
        queue: &Queue,
        mem: &G,
    ) -> Result<bool, Error> {
        let device = queue.used_ring();
        if queue.event_idx_enabled() {
            // `off_wrap` and `flags` in one store (the area is 4-byte aligned).
            let area = u32::from(self.next_avail.word()) | u32::from(EVENT_F_DESC) << 16;
            write_u32(mem, device, area)?;
        } else {
            write_u16(mem, device, EVENT_FLAGS, EVENT_F_ENABLE)?;
        }
        // The flags must be visible to the driver before we look at the ring again, or both
        // sides may miss each other.
        fence(Ordering::SeqCst);
        self.has_available(queue, mem)
    }

    /// Refuses a position past the ring (a `SET_VRING_BASE` beyond the queue size).
    fn check_position(&self, size: u16) -> Result<(), Error> {
        if self.next_avail.idx >= size || self.next_used.idx >= size {
            return Err(Error::PackedPosition {
                avail: self.next_avail.word(),
                used: self.next_used.word(),
                size,
            });
        }
        Ok(())
    }
}

/// Loads the `u16` at byte `field` of ring entry `index` with Acquire.
fn load_u16<G: GuestMemory>(
    ring: &Table<'_, G>,
    mem: &G,
    index: u16,
    field: usize,
) -> Result<u16, Error> {
    match ring.load::<u16>(mem, index, field, Ordering::Acquire) {
        Some(value) => Ok(u16::from_le(value)),
        None => Err(Error::PackedRingAccess { index }),
    }
}

/// Reads the `u16` at `base + offset` (an event suppression structure field).
fn read_u16<G: GuestMemory>(mem: &G, base: u64, offset: u64) -> Result<u16, Error> {
    let Some(addr) = base.checked_add(offset) else {
        return Err(Error::AddressOverflow { base, offset });
    };
    mem.load::<u16>(GuestAddress(addr), Ordering::Acquire)
        .map(u16::from_le)
        .map_err(|source| Error::GuestMemory { addr, source })
}

/// Reads a whole event suppression structure at `addr`: `off_wrap` in the low half, `flags`
/// in the high half.
fn read_u32<G: GuestMemory>(mem: &G, addr: u64) -> Result<u32, Error> {
    mem.load::<u32>(GuestAddress(addr), Ordering::Acquire)
        .map(u32::from_le)
        .map_err(|source| Error::GuestMemory { addr, source })
}

/// Writes a whole event suppression structure at `addr` (see [`read_u32`]).
fn write_u32<G: GuestMemory>(mem: &G, addr: u64, value: u32) -> Result<(), Error> {
    mem.store(value.to_le(), GuestAddress(addr), Ordering::Release)
        .map_err(|source| Error::GuestMemory { addr, source })
}

/// Writes the `u16` at `base + offset` (a field of the device area).
fn write_u16<G: GuestMemory>(mem: &G, base: u64, offset: u64, value: u16) -> Result<(), Error> {
    let Some(addr) = base.checked_add(offset) else {
        return Err(Error::AddressOverflow { base, offset });
    };
    mem.store(value.to_le(), GuestAddress(addr), Ordering::Release)
        .map_err(|source| Error::GuestMemory { addr, source })
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::{VringMutex, VringT};

    type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

    /// Two regions, adjacent in the guest, separate in the host.
    const BOUNDARY: u64 = 0x1_0000;

    fn write_desc(mem: &GuestMemoryMmap, at: u64, desc: (u64, u32, u16, u16)) {
        let (addr, len, id, flags) = desc;
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(id, GuestAddress(at + 12)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 14)).unwrap();
    }

    #[test]
    fn a_ring_across_two_regions_is_served_entry_by_entry() {
        let mmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), BOUNDARY as usize),
            (GuestAddress(BOUNDARY), BOUNDARY as usize),
        ])
        .unwrap();
        let mem: Mem = GuestMemoryAtomic::new(mmap);
        let vring = VringMutex::<Mem>::new(mem.clone(), 16).unwrap();
        vring.set_queue_packed(true);
        vring.set_queue_size(8).unwrap();
        // Entries 0-3 below the boundary, 4-7 above it.
        let ring = BOUNDARY - 64;
        vring.set_queue_info(ring, 0x1000, 0x2000).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let m = mem.memory();
        // A chain of three at positions 3, 4, 5: it crosses the boundary.
        vring.set_vring_base(0x8003_8003).unwrap();
        write_desc(&m, ring + 64, (0x100, 2, 0, PACKED_F_NEXT | PACKED_F_AVAIL));
        write_desc(&m, ring + 80, (0x200, 3, 9, PACKED_F_AVAIL));
        write_desc(&m, ring + 48, (0x300, 1, 0, PACKED_F_NEXT | PACKED_F_AVAIL));
        let mut lens = Vec::new();
        let served = vring
            .get_mut()
            .serve_available(&m, |chain| {
                lens = chain.map(|d| d.len()).collect();
                6
            })
            .unwrap();
        assert_eq!((served, lens), (1, vec![1, 2, 3]));
        let len: u32 = m.read_obj(GuestAddress(ring + 48 + 8)).unwrap();
        let id: u16 = m.read_obj(GuestAddress(ring + 48 + 12)).unwrap();
        let flags: u16 = m.read_obj(GuestAddress(ring + 48 + 14)).unwrap();
        assert_eq!((len, id, flags), (6, 9, PACKED_F_AVAIL | PACKED_F_USED));
        assert_eq!(vring.vring_base(), 0x8006_8006);
    }

    #[test]
    fn restart_keeps_the_packed_positions_and_ignores_an_inflight_area() {
        use crate::inflight::area_size;
        use crate::InflightArea;

        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vring = VringMutex::<Mem>::new(GuestMemoryAtomic::new(mmap), 16).unwrap();
        vring.set_queue_packed(true);
        vring.set_queue_size(8).unwrap();
        vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        vring.set_vring_base(0x0003_8005).unwrap();
        let size = area_size(1, 8, true);
        let file = crate::testutil::memfd(size);
        let area = InflightArea::map(file, 0, size, 1, 8).unwrap();
        let restart = vring.get_mut().restart(area.queue(0), true).unwrap();
        assert_eq!(
            (restart.next_avail, restart.next_used, restart.resubmit),
            (0x8005, 0x0003, 0)
        );
        assert!(!vring.get_ref().inflight_tracking());
        assert_eq!(vring.vring_base(), 0x0003_8005);
    }

    #[test]
    fn positions_wrap_and_linearise_on_a_circle_of_twice_the_ring() {
        let p = Position::START.advance(7, 8);
        assert_eq!(p, Position { idx: 7, wrap: true });
        let q = p.advance(3, 8);
        assert_eq!(
            q,
            Position {
                idx: 2,
                wrap: false
            }
        );
        assert_eq!((q.word(), Position::from_word(q.word())), (2, q));
        assert_eq!((p.linear(8), q.linear(8)), (7, 10));
        assert_eq!(q.advance(8, 8), Position { idx: 2, wrap: true });
        assert!(is_available(PACKED_F_AVAIL, true) && is_available(PACKED_F_USED, false));
        assert!(!is_available(PACKED_F_AVAIL | PACKED_F_USED, true));
        assert!(!is_available(0, false) && !is_available(0, true));
    }
}
