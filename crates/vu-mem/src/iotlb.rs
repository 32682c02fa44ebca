//! The device IOTLB of a backend behind a virtual IOMMU (`VIRTIO_F_ACCESS_PLATFORM`).
//!
//! With the feature negotiated, every address the driver hands the device (ring addresses in
//! `SET_VRING_ADDR`, descriptor addresses, indirect tables) is an I/O virtual address (IOVA).
//! The spec: "the front-end sends IOTLB entries update & invalidation by sending
//! `VHOST_USER_IOTLB_MSG` requests to the back-end", an update carrying "the I/O virtual
//! address, the size, the user virtual address, and the permissions flags", an invalidation
//! "the I/O virtual address and the size". [`Iotlb`] is that table: IOVA ranges mapped to
//! addresses with permissions. What the addresses are is the user's choice: vu-daemon takes each update's user address to the
//! guest physical address ([`GuestMemoryManager::vmm_to_guest`]: an update lies in one memory
//! region, so its whole range is contiguous there) and stores that, the address guest memory
//! and the dirty log are indexed by, so a lookup needs no second translation; it empties the
//! table whenever the memory table changes.
//!
//! # Decisions
//!
//! - Entries never overlap. An update replaces whatever part of older entries it covers
//!   (newest wins): QEMU answers each miss with an update, and two queues missing the same page
//!   get two identical updates, which must not be refused.
//! - An update of zero bytes maps nothing and is refused ([`IotlbError::ZeroSize`]); an update
//!   whose IOVA or mapped range wraps past `u64::MAX` is refused ([`IotlbError::Overflow`]).
//! - An invalidation of zero bytes invalidates from its IOVA to the end of the IOVA space: the
//!   kernel's vhost computes the last byte as `iova + size - 1`, which for `iova = 0, size = 0`
//!   is everything, and dropping more of a cache than asked is always safe.
//! - The table holds at most [`Iotlb::limit`] entries (by default
//!   [`DEFAULT_IOTLB_ENTRIES`], the kernel vhost's `max_iotlb_entries`); a flood of updates
//!   evicts the oldest entries first. An evicted translation is a miss the next time, which
//!   the frontend answers again: correct, only slower.
//! - Every invalidation (and eviction, and [`clear`](Iotlb::clear)) bumps
//!   [`generation`](Iotlb::generation): whoever caches a translation or a host pointer
//!   derived from one checks the generation before using it, so no cached pointer outlives an
//!   invalidation.
//! - A mapping with permission "no access" is kept: an access through it is an access failure
//!   ([`IotlbFault::Denied`]), not a miss.
//!
//! [`GuestMemoryManager::vmm_to_guest`]: crate::GuestMemoryManager::vmm_to_guest

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vm_memory::Permissions;

/// The kernel vhost's default `max_iotlb_entries`: how many entries an [`Iotlb`] keeps before
/// it evicts the oldest.
pub const DEFAULT_IOTLB_ENTRIES: usize = 2048;

/// Why an IOTLB update or invalidation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IotlbError {
    /// An update of zero bytes.
    #[error("IOTLB update at IOVA {iova:#x} has zero size")]
    ZeroSize {
        /// The IOVA the frontend sent.
        iova: u64,
    },
    /// The last byte of the range, `start + size - 1`, does not fit in 64 bits.
    #[error("IOTLB {space} {start:#x} + size {size:#x} wraps")]
    Overflow {
        /// Which address the frontend sent: "IOVA" or "mapped address".
        space: &'static str,
        /// The start the frontend sent.
        start: u64,
        /// The size the frontend sent.
        size: u64,
    },
}

/// Why an access could not be translated: what the backend reports to the frontend with
/// `VHOST_USER_BACKEND_IOTLB_MSG` (a miss, or an access failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IotlbFault {
    /// No entry maps `iova`: ask the frontend (IOTLB miss) and retry after its update.
    #[error("IOTLB miss at IOVA {iova:#x}")]
    Miss {
        /// The first IOVA of the access that no entry maps.
        iova: u64,
    },
    /// An entry maps `iova` but does not allow the access (for example a write through a
    /// read-only mapping): fail the access, do not retry.
    #[error("IOTLB access failure at IOVA {iova:#x}: {access:?} through a {perm:?} mapping")]
    Denied {
        /// The first IOVA of the access that is not allowed.
        iova: u64,
        /// The mapping's permissions.
        perm: Permissions,
        /// The access asked for.
        access: Permissions,
    },
    /// `iova + len` does not fit in 64 bits.
    #[error("access at IOVA {iova:#x} of {len:#x} bytes wraps")]
    Wraps {
        /// The IOVA asked for.
        iova: u64,
        /// The length asked for.
        len: u64,
    },
}

impl IotlbFault {
    /// The IOVA the fault is about.
    pub fn iova(&self) -> u64 {
        match *self {
            IotlbFault::Miss { iova }
            | IotlbFault::Denied { iova, .. }
            | IotlbFault::Wraps { iova, .. } => iova,
        }
    }
}

/// One contiguous piece of a translation: `len` bytes from `iova` are the addresses from
/// `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbMapping {
    /// The first IOVA of the piece.
    pub iova: u64,
    /// The address `iova` maps to.
    pub addr: u64,
    /// The length of the piece in bytes.
    pub len: u64,
}

/// One entry: the IOVA range from its key to `last` (inclusive).
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The last IOVA of the range, inclusive (a range may end at `u64::MAX`).
    last: u64,
    /// The address of the range's first IOVA.
    addr: u64,
    /// What the range allows.
    perm: Permissions,
    /// Insertion order, for eviction; pieces split off an entry keep its number.
    seq: u64,
}

/// The device IOTLB: non-overlapping IOVA ranges mapped to addresses with permissions.
/// See the module documentation for the rules.
#[derive(Debug)]
pub struct Iotlb {
    /// Entries by first IOVA.
    entries: BTreeMap<u64, Entry>,
    /// `(seq, first IOVA)` of every entry, oldest first.
    order: BTreeSet<(u64, u64)>,
    /// The next insertion number.
    next_seq: u64,
    /// The most entries kept.
    limit: usize,
    /// Bumped whenever a translation may have been withdrawn.
    generation: u64,
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    /// An empty IOTLB keeping at most [`DEFAULT_IOTLB_ENTRIES`] entries.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_IOTLB_ENTRIES)
    }

    /// An empty IOTLB keeping at most `limit` entries (at least one).
    pub fn with_limit(limit: usize) -> Self {
        Iotlb {
            entries: BTreeMap::new(),
            order: BTreeSet::new(),
            next_seq: 0,
            limit: limit.max(1),
            generation: 0,
        }
    }

    /// The most entries kept before the oldest is evicted.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no IOVA is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A number that changes whenever a translation may have been withdrawn (invalidation,
    /// eviction, replacement, clear). A cached translation is valid only while it is unchanged.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// IOTLB update: maps `size` bytes from `iova` to the addresses from `addr` with `perm`,
    /// replacing what older entries mapped there.
    pub fn update(
        &mut self,
        iova: u64,
        size: u64,
        addr: u64,
        perm: Permissions,
    ) -> Result<(), IotlbError> {
        if size == 0 {
            return Err(IotlbError::ZeroSize { iova });
        }
        let last = last_byte("IOVA", iova, size)?;
        last_byte("mapped address", addr, size)?;
        self.remove_range(iova, last);
        while self.entries.len() >= self.limit {
            let Some((seq, first)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&first);
            debug_assert!(seq < self.next_seq);
            self.generation = self.generation.wrapping_add(1);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.entries.insert(
            iova,
            Entry {
                last,
                addr,
                perm,
                seq,
            },
        );
        self.order.insert((seq, iova));
        Ok(())
    }

    /// IOTLB invalidate: unmaps `size` bytes from `iova`; a `size` of zero unmaps from `iova`
    /// to the end of the IOVA space. Parts of entries outside the range stay mapped.
    pub fn invalidate(&mut self, iova: u64, size: u64) -> Result<(), IotlbError> {
        let last = if size == 0 {
            u64::MAX
        } else {
            last_byte("IOVA", iova, size)?
        };
        self.remove_range(iova, last);
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// Unmaps everything (a reset or a new connection).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.generation = self.generation.wrapping_add(1);
    }

    /// Translates the first piece of the access of `len` bytes at `iova`: the longest prefix
    /// that one entry maps and allows `access` for. A `len` of zero checks `iova` alone and
    /// returns a piece of zero bytes.
    pub fn lookup(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<IotlbMapping, IotlbFault> {
        if iova.checked_add(len).is_none() {
            return Err(IotlbFault::Wraps { iova, len });
        }
        let Some((&first, entry)) = self.entries.range(..=iova).next_back() else {
            return Err(IotlbFault::Miss { iova });
        };
        if entry.last < iova {
            return Err(IotlbFault::Miss { iova });
        }
        if !entry.perm.allow(access) {
            return Err(IotlbFault::Denied {
                iova,
                perm: entry.perm,
                access,
            });
        }
        // `first <= iova <= entry.last`; the update checked that `addr + (last - first)`
        // does not overflow.
        let offset = iova - first;
        let in_entry = (entry.last - iova).saturating_add(1);
        Ok(IotlbMapping {
            iova,
            addr: entry.addr + offset,
            len: len.min(in_entry),
        })
    }

    /// Translates the whole access of `len` bytes at `iova` into contiguous pieces, in IOVA
    /// order, or reports the first fault. The pieces are not merged: two entries that map
    /// adjacent IOVAs to adjacent addresses give two pieces.
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<Vec<IotlbMapping>, IotlbFault> {
        let mut pieces = Vec::new();
        let mut at = iova;
        let mut left = len;
        loop {
            let piece = self.lookup(at, left, access)?;
            pieces.push(piece);
            left -= piece.len;
            if left == 0 {
                return Ok(pieces);
            }
            // `lookup` checked `at + left` does not overflow, and `piece.len <= left`.
            at += piece.len;
        }
    }

    /// Removes the IOVAs `first..=last` from every entry, keeping the parts outside.
    fn remove_range(&mut self, first: u64, last: u64) {
        let hit: Vec<u64> = self
            .entries
            .range(..=last)
            .rev()
            .take_while(|(_, e)| e.last >= first)
            .map(|(&start, _)| start)
            .collect();
        for start in hit {
            let Some(e) = self.entries.remove(&start) else {
                continue;
            };
            self.order.remove(&(e.seq, start));
            if start < first {
                // The left part keeps its start and address.
                let left = Entry {
                    last: first - 1,
                    ..e
                };
                self.entries.insert(start, left);
                self.order.insert((e.seq, start));
            }
            if e.last > last {
                // `start <= last < e.last`, so `last + 1` does not overflow.
                let right_start = last + 1;
                let right = Entry {
                    addr: e.addr + (right_start - start),
                    ..e
                };
                self.entries.insert(right_start, right);
                self.order.insert((e.seq, right_start));
            }
            self.generation = self.generation.wrapping_add(1);
        }
    }
}

/// Why [`SharedIotlb::resolve`] gave up on an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The access can never succeed as mapped (an access failure or a wrapping range).
    #[error(transparent)]
    Fault(IotlbFault),
    /// The miss could not be reported to the frontend.
    #[error("IOTLB miss at IOVA {iova:#x} could not be sent to the frontend")]
    MissNotSent {
        /// The missing IOVA.
        iova: u64,
    },
    /// The frontend did not map the missing IOVA within the wait.
    #[error("IOTLB miss at IOVA {iova:#x} not answered within {waited:?}")]
    Timeout {
        /// The missing IOVA.
        iova: u64,
        /// How long the access waited.
        waited: Duration,
    },
}

/// An [`Iotlb`] shared between the thread that receives `IOTLB_MSG` (which changes it) and
/// the threads that access guest memory (which translate through it and wait for the
/// answers to their misses).
///
/// Every change wakes every waiter. [`resolve`](SharedIotlb::resolve) reports a miss through
/// a callback with the lock released, so the thread that must receive the update answering
/// the miss is never blocked by the one waiting for it.
#[derive(Debug, Default)]
pub struct SharedIotlb {
    /// The table.
    tlb: Mutex<Iotlb>,
    /// Signalled after every change.
    changed: Condvar,
    /// The table's generation as of its last change through this type, readable without
    /// the lock.
    generation: AtomicU64,
}

impl SharedIotlb {
    /// Shares `tlb`.
    pub fn new(tlb: Iotlb) -> Self {
        let generation = AtomicU64::new(tlb.generation());
        SharedIotlb {
            tlb: Mutex::new(tlb),
            changed: Condvar::new(),
            generation,
        }
    }

    /// [`Iotlb::generation`] as of the last change made through [`update`](Self::update),
    /// [`invalidate`](Self::invalidate) or [`clear`](Self::clear), without taking the lock:
    /// what a worker checks before each use of a cached translation. It is stored before the
    /// lock of the change is released, so a translation made after a change was seen is
    /// made from the changed table.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Publishes the generation of `tlb` (held locked) and wakes the waiters.
    fn publish(&self, tlb: MutexGuard<'_, Iotlb>) {
        self.generation.store(tlb.generation(), Ordering::Release);
        drop(tlb);
        self.changed.notify_all();
    }

    /// The table, for a read or a change of its own; a change made through this guard wakes
    /// no waiter (use the methods below for changes).
    pub fn lock(&self) -> MutexGuard<'_, Iotlb> {
        // A panic elsewhere while holding the lock leaves a consistent table: every method
        // of `Iotlb` restores its invariants before it can panic.
        self.tlb.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`Iotlb::update`], then wakes the waiters.
    pub fn update(
        &self,
        iova: u64,
        size: u64,
        addr: u64,
        perm: Permissions,
    ) -> Result<(), IotlbError> {
        let mut tlb = self.lock();
        let result = tlb.update(iova, size, addr, perm);
        self.publish(tlb);
        result
    }

    /// [`Iotlb::invalidate`], then wakes the waiters.
    pub fn invalidate(&self, iova: u64, size: u64) -> Result<(), IotlbError> {
        let mut tlb = self.lock();
        let result = tlb.invalidate(iova, size);
        self.publish(tlb);
        result
    }

    /// [`Iotlb::clear`], then wakes the waiters.
    pub fn clear(&self) {
        let mut tlb = self.lock();
        tlb.clear();
        self.publish(tlb);
    }

    /// Translates the access of `len` bytes at `iova`, asking for what is missing: for each
    /// missing IOVA, `ask_miss(iova, access)` is called (without the lock held) to send the
    /// back-end IOTLB miss, and the access waits for the frontend's update, at most `timeout`
    /// in all. An IOVA still missing after the table changed is asked again: the update that
    /// answered it may have been invalidated before this thread looked (QEMU's intel-iommu
    /// invalidates whole domains, up to the end of the address space, while misses are in
    /// flight). An access failure ends at once; `ask_miss` returning `false` ends with
    /// [`ResolveError::MissNotSent`].
    pub fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        timeout: Duration,
        mut ask_miss: impl FnMut(u64, Permissions) -> bool,
    ) -> Result<Vec<IotlbMapping>, ResolveError> {
        let start = Instant::now();
        // The IOVA last asked for, and the table's generation when it was found missing.
        let mut asked: Option<(u64, u64)> = None;
        let mut tlb = self.lock();
        loop {
            let missing = match tlb.translate(iova, len, access) {
                Ok(pieces) => return Ok(pieces),
                Err(IotlbFault::Miss { iova }) => iova,
                Err(fault) => return Err(ResolveError::Fault(fault)),
            };
            let generation = tlb.generation();
            if asked != Some((missing, generation)) {
                drop(tlb);
                if !ask_miss(missing, access) {
                    return Err(ResolveError::MissNotSent { iova: missing });
                }
                asked = Some((missing, generation));
                tlb = self.lock();
                continue;
            }
            let waited = start.elapsed();
            let Some(left) = timeout.checked_sub(waited).filter(|l| !l.is_zero()) else {
                return Err(ResolveError::Timeout {
                    iova: missing,
                    waited,
                });
            };
            tlb = self
                .changed
                .wait_timeout(tlb, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// `start + size - 1` for a non-zero `size`, or the overflow error naming `space`.
fn last_byte(space: &'static str, start: u64, size: u64) -> Result<u64, IotlbError> {
    size.checked_sub(1)
        .and_then(|s| start.checked_add(s))
        .ok_or(IotlbError::Overflow { space, start, size })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RW: Permissions = Permissions::ReadWrite;
    const RO: Permissions = Permissions::Read;

    fn map(iova: u64, addr: u64, len: u64) -> IotlbMapping {
        IotlbMapping { iova, addr, len }
    }

    #[test]
    fn update_then_lookup_translates_inside_the_entry() {
        let mut t = Iotlb::new();
        t.update(0x1000, 0x2000, 0x7f00_0000, RW).unwrap();
        assert_eq!(
            t.lookup(0x1800, 0x10, RO),
            Ok(map(0x1800, 0x7f00_0800, 0x10))
        );
        assert_eq!(t.lookup(0x2fff, 1, RW), Ok(map(0x2fff, 0x7f00_1fff, 1)));
    }

    #[test]
    fn lookup_outside_every_entry_is_a_miss() {
        let mut t = Iotlb::new();
        t.update(0x1000, 0x1000, 0x5000, RW).unwrap();
        assert_eq!(
            t.lookup(0xfff, 1, RO),
            Err(IotlbFault::Miss { iova: 0xfff })
        );
        assert_eq!(
            t.lookup(0x2000, 1, RO),
            Err(IotlbFault::Miss { iova: 0x2000 })
        );
        assert_eq!(
            Iotlb::new().lookup(0, 0, RO),
            Err(IotlbFault::Miss { iova: 0 })
        );
    }

    #[test]
    fn lookup_is_clipped_at_the_entry_end() {
        let mut t = Iotlb::new();
        t.update(0x1000, 0x1000, 0x5000, RW).unwrap();
        assert_eq!(t.lookup(0x1f00, 0x1000, RO), Ok(map(0x1f00, 0x5f00, 0x100)));
    }

    #[test]
    fn translate_spanning_two_entries_gives_two_pieces() {
        let mut t = Iotlb::new();
        t.update(0x1000, 0x1000, 0x9000, RW).unwrap();
        t.update(0x2000, 0x1000, 0x3000, RW).unwrap();
        assert_eq!(
            t.translate(0x1800, 0x1000, RO),
            Ok(vec![map(0x1800, 0x9800, 0x800), map(0x2000, 0x3000, 0x800)])
        );
    }

    #[test]
    fn translate_with_a_hole_reports_the_first_missing_iova() {
        let mut t = Iotlb::new();
        t.update(0x1000, 0x1000, 0x9000, RW).unwrap();
        t.update(0x3000, 0x1000, 0x3000, RW).unwrap();
        assert_eq!(
            t.translate(0x1800, 0x2000, RO),
            Err(IotlbFault::Miss { iova: 0x2000 })
        );
    }

    #[test]
    fn write_through_read_only_mapping_is_denied() {
        let mut t = Iotlb::new();
        t.update(0x1000, 0x1000, 0x9000, RO).unwrap();
        assert_eq!(
            t.lookup(0x1000, 4, Permissions::Write),
            Err(IotlbFault::Denied {
                iova: 0x1000,
                perm: RO,
                access: Permissions::Write
            })
        );
        assert!(t.lookup(0x1000, 4, RO).is_ok());
    }

    #[test]
    fn write_only_mapping_refuses_reads() {
        let mut t = Iotlb::new();
        t.update(0, 0x1000, 0x9000, Permissions::Write).unwrap();
        assert!(matches!(t.lookup(0, 4, RO), Err(IotlbFault::Denied { .. })));
        assert!(t.lookup(0, 4, Permissions::Write).is_ok());
    }

    #[test]
    fn no_access_mapping_denies_rather_than_misses() {
        let mut t = Iotlb::new();
        t.update(0, 0x1000, 0x9000, Permissions::No).unwrap();
        assert!(matches!(t.lookup(0, 1, RO), Err(IotlbFault::Denied { .. })));
    }

    #[test]
    fn zero_size_update_is_refused() {
        let mut t = Iotlb::new();
        assert_eq!(
            t.update(0x1000, 0, 0x5000, RW),
            Err(IotlbError::ZeroSize { iova: 0x1000 })
        );
        assert!(t.is_empty());
    }

    #[test]
    fn wrapping_iova_update_is_refused() {
        let mut t = Iotlb::new();
        assert!(matches!(
            t.update(u64::MAX - 0xfff, 0x2000, 0x5000, RW),
            Err(IotlbError::Overflow { space: "IOVA", .. })
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn wrapping_mapped_address_update_is_refused() {
        let mut t = Iotlb::new();
        assert!(matches!(
            t.update(0, 0x2000, u64::MAX - 0xfff, RW),
            Err(IotlbError::Overflow {
                space: "mapped address",
                ..
            })
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn update_ending_at_the_top_of_the_iova_space_is_accepted() {
        let mut t = Iotlb::new();
        t.update(u64::MAX - 0xfff, 0x1000, 0x5000, RW).unwrap();
        assert_eq!(t.lookup(u64::MAX, 0, RO), Ok(map(u64::MAX, 0x5fff, 0)));
        assert_eq!(
            t.lookup(u64::MAX, 1, RO),
            Err(IotlbFault::Wraps {
                iova: u64::MAX,
                len: 1
            })
        );
    }

    #[test]
    fn whole_space_mapping_lookup_does_not_overflow() {
        let mut t = Iotlb::new();
        t.update(0, u64::MAX, 0, RW).unwrap();
        assert_eq!(t.lookup(0, u64::MAX, RO), Ok(map(0, 0, u64::MAX)));
    }

    #[test]
    fn overlapping_update_replaces_the_covered_part() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x3000, 0x10_0000, RW).unwrap();
        t.update(0x1000, 0x1000, 0x50_0000, RO).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(0x0, 0x3000, RW), Ok(map(0x0, 0x10_0000, 0x1000)));
        assert_eq!(t.lookup(0x1000, 0x10, RO), Ok(map(0x1000, 0x50_0000, 0x10)));
        assert_eq!(
            t.lookup(0x2000, 0x1000, RW),
            Ok(map(0x2000, 0x10_2000, 0x1000))
        );
        assert!(matches!(
            t.lookup(0x1000, 1, Permissions::Write),
            Err(IotlbFault::Denied { .. })
        ));
    }

    #[test]
    fn identical_update_twice_keeps_one_entry() {
        let mut t = Iotlb::new();
        t.update(0x1000, 0x1000, 0x5000, RW).unwrap();
        t.update(0x1000, 0x1000, 0x5000, RW).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.lookup(0x1000, 0x1000, RW),
            Ok(map(0x1000, 0x5000, 0x1000))
        );
    }

    #[test]
    fn update_covering_several_entries_replaces_them_all() {
        let mut t = Iotlb::new();
        for i in 0..4 {
            t.update(i * 0x1000, 0x1000, 0x10_0000 + i * 0x1000, RO)
                .unwrap();
        }
        t.update(0x800, 0x3000, 0x90_0000, RW).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(0x0, 0x1000, RO), Ok(map(0x0, 0x10_0000, 0x800)));
        assert_eq!(
            t.lookup(0x800, 0x3000, RW),
            Ok(map(0x800, 0x90_0000, 0x3000))
        );
        assert_eq!(
            t.lookup(0x3800, 0x800, RO),
            Ok(map(0x3800, 0x10_3800, 0x800))
        );
    }

    #[test]
    fn invalidate_removes_the_range_and_keeps_the_rest() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x3000, 0x10_0000, RW).unwrap();
        t.invalidate(0x1000, 0x1000).unwrap();
        assert_eq!(
            t.lookup(0x1000, 1, RO),
            Err(IotlbFault::Miss { iova: 0x1000 })
        );
        assert_eq!(
            t.lookup(0x1fff, 1, RO),
            Err(IotlbFault::Miss { iova: 0x1fff })
        );
        assert_eq!(t.lookup(0xfff, 1, RO), Ok(map(0xfff, 0x10_0fff, 1)));
        assert_eq!(t.lookup(0x2000, 1, RO), Ok(map(0x2000, 0x10_2000, 1)));
    }

    #[test]
    fn invalidate_of_an_unmapped_range_is_harmless() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x1000, 0x10_0000, RW).unwrap();
        t.invalidate(0x8000, 0x1000).unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn zero_size_invalidate_unmaps_to_the_end_of_the_space() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x1000, 0x10_0000, RW).unwrap();
        t.update(0x4000, 0x1000, 0x20_0000, RW).unwrap();
        t.update(u64::MAX - 0xfff, 0x1000, 0x30_0000, RW).unwrap();
        t.invalidate(0x800, 0).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(0x7ff, 1, RO), Ok(map(0x7ff, 0x10_07ff, 1)));
        t.invalidate(0, 0).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn wrapping_invalidate_is_refused_and_changes_nothing() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x1000, 0x10_0000, RW).unwrap();
        assert!(matches!(
            t.invalidate(u64::MAX, 2),
            Err(IotlbError::Overflow { .. })
        ));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn invalidate_bumps_the_generation() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x1000, 0x10_0000, RW).unwrap();
        let g = t.generation();
        t.invalidate(0x0, 0x1000).unwrap();
        assert_ne!(t.generation(), g);
    }

    #[test]
    fn replacing_update_bumps_the_generation_but_a_fresh_one_does_not() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x1000, 0x10_0000, RW).unwrap();
        let g = t.generation();
        t.update(0x1000, 0x1000, 0x10_1000, RW).unwrap();
        assert_eq!(t.generation(), g);
        t.update(0x0, 0x1000, 0x20_0000, RW).unwrap();
        assert_ne!(t.generation(), g);
    }

    #[test]
    fn flood_of_updates_evicts_the_oldest_and_stays_bounded() {
        let mut t = Iotlb::with_limit(8);
        for i in 0..1000u64 {
            t.update(i * 0x1000, 0x1000, 0x10_0000 + i * 0x1000, RW)
                .unwrap();
            assert!(t.len() <= 8);
        }
        assert_eq!(t.len(), 8);
        assert_eq!(t.lookup(0, 1, RO), Err(IotlbFault::Miss { iova: 0 }));
        assert_eq!(
            t.lookup(999 * 0x1000, 1, RO),
            Ok(map(999 * 0x1000, 0x10_0000 + 999 * 0x1000, 1))
        );
        assert_eq!(t.order.len(), t.entries.len());
    }

    #[test]
    fn splitting_at_the_limit_still_stays_bounded() {
        let mut t = Iotlb::with_limit(2);
        t.update(0x0, 0x3000, 0x10_0000, RW).unwrap();
        t.update(0x1000, 0x1000, 0x20_0000, RW).unwrap();
        assert!(t.len() <= 2);
        assert_eq!(t.lookup(0x1000, 1, RO), Ok(map(0x1000, 0x20_0000, 1)));
        assert_eq!(t.order.len(), t.entries.len());
    }

    #[test]
    fn clear_unmaps_everything() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x1000, 0x10_0000, RW).unwrap();
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.lookup(0, 1, RO), Err(IotlbFault::Miss { iova: 0 }));
    }

    #[test]
    fn wrapping_access_is_a_fault_not_a_panic() {
        let mut t = Iotlb::new();
        t.update(0x0, 0x1000, 0x10_0000, RW).unwrap();
        assert_eq!(
            t.translate(0x10, u64::MAX, RO),
            Err(IotlbFault::Wraps {
                iova: 0x10,
                len: u64::MAX
            })
        );
    }

    #[test]
    fn resolve_hit_asks_nothing() {
        let shared = SharedIotlb::default();
        shared.update(0x1000, 0x1000, 0x5000, RW).unwrap();
        let got = shared.resolve(0x1000, 8, RO, Duration::from_secs(5), |_, _| {
            panic!("a hit must not ask")
        });
        assert_eq!(got, Ok(vec![map(0x1000, 0x5000, 8)]));
    }

    #[test]
    fn resolve_miss_asks_and_returns_once_another_thread_updates() {
        let shared = std::sync::Arc::new(SharedIotlb::default());
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Permissions)>();
        let frontend = {
            let shared = shared.clone();
            // Plays the connection thread: answers each miss with an update.
            std::thread::spawn(move || {
                let mut answered = Vec::new();
                while let Ok((iova, perm)) = rx.recv() {
                    let page = iova & !0xfff;
                    shared.update(page, 0x1000, 0x10_0000 + page, perm).unwrap();
                    answered.push(iova);
                }
                answered
            })
        };
        let got = shared.resolve(0x1ff0, 0x20, RO, Duration::from_secs(30), |iova, perm| {
            tx.send((iova, perm)).is_ok()
        });
        drop(tx);
        assert_eq!(
            got,
            Ok(vec![
                map(0x1ff0, 0x10_1ff0, 0x10),
                map(0x2000, 0x10_2000, 0x10)
            ])
        );
        assert_eq!(frontend.join().unwrap(), vec![0x1ff0, 0x2000]);
    }

    /// The update answering a miss is invalidated before the waiting thread looks (QEMU's
    /// intel-iommu invalidates to the end of the address space while misses are in flight):
    /// the IOVA is asked again, not waited for until the timeout.
    #[test]
    fn resolve_asks_again_when_the_answer_was_invalidated_before_it_was_used() {
        let shared = SharedIotlb::default();
        let mut asks = 0;
        let got = shared.resolve(0x1000, 8, RO, Duration::from_secs(30), |iova, perm| {
            asks += 1;
            shared.update(iova, 0x1000, 0x5000, perm).unwrap();
            if asks == 1 {
                shared.invalidate(0x1000, 0x1000).unwrap();
            }
            true
        });
        assert_eq!(got, Ok(vec![map(0x1000, 0x5000, 8)]));
        assert_eq!(asks, 2);
    }

    #[test]
    fn resolve_unanswered_miss_times_out() {
        let shared = SharedIotlb::default();
        let mut asks = 0;
        let got = shared.resolve(0x1000, 8, RO, Duration::from_millis(20), |_, _| {
            asks += 1;
            true
        });
        assert!(matches!(
            got,
            Err(ResolveError::Timeout { iova: 0x1000, .. })
        ));
        assert_eq!(asks, 1);
    }

    #[test]
    fn resolve_miss_that_cannot_be_sent_fails_at_once() {
        let shared = SharedIotlb::default();
        let got = shared.resolve(0x1000, 8, RO, Duration::from_secs(30), |_, _| false);
        assert_eq!(got, Err(ResolveError::MissNotSent { iova: 0x1000 }));
    }

    #[test]
    fn resolve_access_failure_fails_without_asking() {
        let shared = SharedIotlb::default();
        shared.update(0x1000, 0x1000, 0x5000, RO).unwrap();
        let got = shared.resolve(
            0x1000,
            8,
            Permissions::Write,
            Duration::from_secs(30),
            |_, _| panic!("an access failure is not a miss"),
        );
        assert!(matches!(
            got,
            Err(ResolveError::Fault(IotlbFault::Denied { .. }))
        ));
    }

    /// A small deterministic generator: the hostile-sequence test needs no crate.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Random updates and invalidations, checked against a byte-per-page model: no panic,
    /// entries never overlap, and every lookup agrees with the model.
    #[test]
    fn random_operations_agree_with_a_page_model() {
        const PAGES: u64 = 64;
        const PAGE: u64 = 0x1000;
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let mut t = Iotlb::with_limit(1 << 20);
        // Per page: the address of its first byte and its permissions.
        let mut model: Vec<Option<(u64, Permissions)>> = vec![None; PAGES as usize];
        let perms = [Permissions::No, RO, Permissions::Write, RW];
        for _ in 0..5000 {
            let first = next(&mut state) % PAGES;
            let count = 1 + next(&mut state) % (PAGES - first);
            if next(&mut state) % 3 == 0 {
                t.invalidate(first * PAGE, count * PAGE).unwrap();
                for p in first..first + count {
                    model[p as usize] = None;
                }
            } else {
                let addr = (next(&mut state) % 1024) * PAGE;
                let perm = perms[(next(&mut state) % 4) as usize];
                t.update(first * PAGE, count * PAGE, addr, perm).unwrap();
                for p in first..first + count {
                    model[p as usize] = Some((addr + (p - first) * PAGE, perm));
                }
            }
            let mut prev_last: Option<u64> = None;
            for (&start, e) in &t.entries {
                assert!(start <= e.last);
                assert!(prev_last.is_none_or(|l| l < start));
                prev_last = Some(e.last);
            }
            assert_eq!(t.order.len(), t.entries.len());
            for (p, m) in model.iter().enumerate() {
                let iova = p as u64 * PAGE + 8;
                match (m, t.lookup(iova, 1, Permissions::No)) {
                    (None, Err(IotlbFault::Miss { .. })) => {}
                    (Some((addr, perm)), Ok(got)) => {
                        assert_eq!(got.addr, addr + 8);
                        assert!(perm.allow(RO) == t.lookup(iova, 1, RO).is_ok());
                        assert!(
                            perm.allow(Permissions::Write)
                                == t.lookup(iova, 1, Permissions::Write).is_ok()
                        );
                    }
                    (m, got) => panic!("page {p}: model {m:?}, table {got:?}"),
                }
            }
        }
    }
}
