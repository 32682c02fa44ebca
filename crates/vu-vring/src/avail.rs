//! [`AvailRing`]: a split ring's available ring read through a host mapping made once per
//! pass, as [`Table`](crate::chain) reads the descriptor table and `used_ring_slice` writes
//! the used ring.
//!
//! virtio-queue's `AvailIter` reads the index and every entry with `GuestMemory::load`, which
//! looks the address up among the regions each time: about 150 instructions per chain, a
//! quarter of a null device's work per request (docs/performance.md). Here the index is one
//! Acquire load and each entry one Relaxed load from the mapping; a ring that does not lie in
//! one region, or is misaligned, is read through guest memory with the same results.

use std::sync::atomic::{AtomicU16, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::error::Error;
use crate::layout::{AVAIL_ELEM, AVAIL_HEADER};
use crate::sys::atomic_view;

/// A split ring's available ring of `size` entries: its `flags`, `idx` and `ring`
/// (`used_event` is read by the notification code, not here).
pub(crate) struct AvailRing<'m, G: GuestMemory> {
    mem: &'m G,
    addr: GuestAddress,
    size: u16,
    /// The mapping as 2-byte words (`flags`, `idx`, then the entries), when the ring lies
    /// in one region and is aligned.
    words: Option<&'m [AtomicU16]>,
}

impl<'m, G: GuestMemory> AvailRing<'m, G> {
    /// The available ring of `size` entries at `addr`, mapped when it lies in one region.
    pub(crate) fn map(mem: &'m G, addr: GuestAddress, size: u16) -> Self {
        Self::map_fields(mem, addr, size, false)
    }

    /// [`map`](Self::map), with the driver's `used_event` field after the ring when
    /// `used_event` (`VIRTIO_F_EVENT_IDX`), for the interrupt decisions of a pass.
    pub(crate) fn map_fields(mem: &'m G, addr: GuestAddress, size: u16, used_event: bool) -> Self {
        let entries = u64::from(size) + u64::from(used_event);
        let len = (AVAIL_HEADER + AVAIL_ELEM * entries) as usize;
        let host = GuestMemory::get_slices(mem, addr, len, Permissions::Read)
            .ok()
            .and_then(|mut slices| slices.next())
            .and_then(Result::ok)
            .filter(|slice| slice.len() == len);
        let words = host.as_ref().and_then(atomic_view);
        AvailRing {
            mem,
            addr,
            size,
            words,
        }
    }

    /// The driver's available index, read with Acquire: every entry (and every descriptor)
    /// the driver published before it is visible to the Relaxed loads that follow.
    pub(crate) fn idx(&self) -> Result<u16, Error> {
        self.load(1, Ordering::Acquire)
    }

    /// The head index in the entry for available index `position` (the entry
    /// `position % size`), read after [`idx`](Self::idx) showed it published. Unchecked: the
    /// caller compares it with the queue size.
    pub(crate) fn head(&self, position: u16) -> Result<u16, Error> {
        // `size` is not 0: a queue's size is a power of two (VringData::set_queue_size).
        let slot = position.checked_rem(self.size).unwrap_or(0);
        self.load(2 + usize::from(slot), Ordering::Relaxed)
    }

    /// The little-endian `u16` word `word` of the ring (1: `idx`, 2 on: the entries): from
    /// the mapping, or through guest memory when there is none.
    /// The 16-bit field at byte `offset` of the ring (`flags` at 0, `used_event` after the
    /// entries), loaded Relaxed: through the mapping when it covers the field, else through
    /// guest memory.
    pub(crate) fn field(&self, offset: u64) -> Result<u16, Error> {
        match usize::try_from(offset / AVAIL_ELEM) {
            Ok(word) => self.load(word, Ordering::Relaxed),
            Err(_) => self.load_guest(offset, Ordering::Relaxed),
        }
    }

    fn load(&self, word: usize, order: Ordering) -> Result<u16, Error> {
        // `word` is below the `2 + size` words mapped.
        match self.words.and_then(|w| w.get(word)) {
            Some(value) => Ok(u16::from_le(value.load(order))),
            None => self.load_guest(word as u64 * AVAIL_ELEM, order),
        }
    }

    /// [`load`](Self::load) through guest memory.
    #[inline(never)]
    fn load_guest(&self, offset: u64, order: Ordering) -> Result<u16, Error> {
        let base = self.addr.raw_value();
        let addr = self
            .addr
            .checked_add(offset)
            .ok_or(Error::AddressOverflow { base, offset })?;
        self.mem
            .load::<u16>(addr, order)
            .map(u16::from_le)
            .map_err(|source| Error::GuestMemory {
                addr: addr.raw_value(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// Reads every entry of rings of 8 entries placed at each even offset around the boundary
    /// of two regions (adjacent in the guest, apart in the host): mapped, or read through guest
    /// memory, the values are the same.
    #[test]
    fn reads_the_same_mapped_or_across_regions() {
        const BOUNDARY: u64 = 0x1000;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), BOUNDARY as usize),
            (GuestAddress(BOUNDARY), BOUNDARY as usize),
        ])
        .unwrap();
        let (mut mapped, mut unmapped) = (0, 0);
        for start in (BOUNDARY - 40..BOUNDARY + 8).step_by(2) {
            let idx = 0xbeefu16.wrapping_add(start as u16);
            mem.write_obj(idx.to_le(), GuestAddress(start + crate::layout::AVAIL_IDX))
                .unwrap();
            for slot in 0..8u16 {
                let at = start + AVAIL_HEADER + AVAIL_ELEM * u64::from(slot);
                mem.write_obj((slot * 3 + 1).to_le(), GuestAddress(at))
                    .unwrap();
            }
            let ring = AvailRing::map(&mem, GuestAddress(start), 8);
            if ring.words.is_some() {
                mapped += 1;
            } else {
                unmapped += 1;
            }
            assert_eq!(ring.idx().unwrap(), idx, "ring at {start:#x}");
            // Positions wrap at the queue size.
            for position in [0u16, 5, 7, 8, 13, u16::MAX] {
                let expected = (position % 8) * 3 + 1;
                assert_eq!(ring.head(position).unwrap(), expected, "at {start:#x}");
            }
        }
        // With the `xen` feature there is no atomic view: every ring goes through guest memory.
        let views = !cfg!(feature = "xen");
        assert!(
            (mapped > 0) == views && unmapped > 0,
            "{mapped} mapped, {unmapped} not"
        );
        // Past the end of guest memory: a typed error, no panic.
        // The driver's fields, `flags` and `used_event`, mapped with the ring or not.
        for start in (BOUNDARY - 24..BOUNDARY + 8).step_by(2) {
            let used_event_at = start + AVAIL_HEADER + AVAIL_ELEM * 8;
            mem.write_obj(0x0101u16.to_le(), GuestAddress(start))
                .unwrap();
            mem.write_obj(0xfeedu16.to_le(), GuestAddress(used_event_at))
                .unwrap();
            for used_event in [false, true] {
                let ring = AvailRing::map_fields(&mem, GuestAddress(start), 8, used_event);
                assert_eq!(ring.field(0).unwrap(), 0x0101, "flags at {start:#x}");
                let field = ring.field(AVAIL_HEADER + AVAIL_ELEM * 8).unwrap();
                assert_eq!(field, 0xfeed, "used_event at {start:#x}");
            }
        }
        let ring = AvailRing::map(&mem, GuestAddress(2 * BOUNDARY - 6), 8);
        assert!(ring.idx().is_ok());
        assert!(matches!(ring.head(7), Err(Error::GuestMemory { .. })));
    }
}
