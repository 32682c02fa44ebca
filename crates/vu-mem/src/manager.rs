//! The memory table: regions in, consistent guest-memory snapshots out.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, PoisonError};

use vm_memory::{
    GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::dirty::{log_size_for, DirtyLog, LogBitmap, RegionBitmap};
use crate::error::MemError;
use crate::region::{map_region, Ranges, RegionSpec};

/// The slot limit advertised by default: 509, the number of memory slots QEMU uses.
pub const DEFAULT_SLOT_LIMIT: u32 = 509;

/// The most guest memory a table may map by default: 32 TiB.
///
/// Mapping a region reserves the backend's virtual address space whether or not the file
/// behind it holds data, so a frontend sending a few sparse regions of many TiB each could
/// leave the backend no room for its own allocations (x86-64 gives a process 128 TiB). While
/// `SET_MEM_TABLE` maps the new table the old one is still mapped, so the limit keeps at least
/// half of that space free even then. Raise it with
/// [`set_size_limit`](GuestMemoryManager::set_size_limit) for larger guests.
pub const DEFAULT_SIZE_LIMIT: u64 = 32 << 40;

/// A mapped region and its validated addresses.
struct Mapped<B> {
    ranges: Ranges,
    region: Arc<GuestRegionMmap<B>>,
}

/// The guest memory of one frontend connection.
///
/// Owns the region table and the dirty log; publishes every table change as a new snapshot in
/// the [`GuestMemoryAtomic`] it was built from, so readers holding the old snapshot keep a
/// consistent view. Table changes take `&mut self`: they come from one session thread.
///
/// Rust does not infer a default type parameter from a call: give the type where the
/// manager is stored (`let m: GuestMemoryManager = ...`) or call
/// `GuestMemoryManager::<LogBitmap>::new`.
pub struct GuestMemoryManager<B: RegionBitmap = LogBitmap> {
    atomic: GuestMemoryAtomic<GuestMemoryMmap<B>>,
    /// Sorted by VMM address, for translation by binary search.
    by_vmm: Vec<Mapped<B>>,
    slot_limit: u32,
    size_limit: u64,
    log: DirtyLog,
}

impl<B: RegionBitmap> std::fmt::Debug for GuestMemoryManager<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemoryManager")
            .field(
                "regions",
                &self.by_vmm.iter().map(|m| m.ranges).collect::<Vec<_>>(),
            )
            .field("slot_limit", &self.slot_limit)
            .field("log", &self.log)
            .finish()
    }
}

impl<B: RegionBitmap> GuestMemoryManager<B> {
    /// A manager with the [default slot limit](DEFAULT_SLOT_LIMIT) publishing into `atomic`.
    ///
    /// The manager owns the contents of `atomic` from now on: it publishes an empty table at
    /// once, since only the frontend's table describes guest memory.
    pub fn new(atomic: GuestMemoryAtomic<GuestMemoryMmap<B>>) -> Self {
        Self::with_slot_limit(atomic, DEFAULT_SLOT_LIMIT)
    }

    /// As [`new`](Self::new), refusing tables of more than `slot_limit` regions.
    pub fn with_slot_limit(atomic: GuestMemoryAtomic<GuestMemoryMmap<B>>, slot_limit: u32) -> Self {
        let manager = GuestMemoryManager {
            atomic,
            by_vmm: Vec::new(),
            slot_limit,
            size_limit: DEFAULT_SIZE_LIMIT,
            log: DirtyLog::new(),
        };
        manager.publish_empty();
        manager
    }

    /// The guest memory to hand to the backend and the vrings.
    pub fn memory(&self) -> &GuestMemoryAtomic<GuestMemoryMmap<B>> {
        &self.atomic
    }

    /// The shared dirty log, for threads that mark used-ring writes or signal the log fd.
    pub fn dirty_log(&self) -> &DirtyLog {
        &self.log
    }

    /// The most regions the table may hold (the value for `GET_MAX_MEM_SLOTS`).
    pub fn slot_limit(&self) -> u32 {
        self.slot_limit
    }

    /// The most guest memory, in bytes, the table may map ([`DEFAULT_SIZE_LIMIT`] unless set).
    pub fn size_limit(&self) -> u64 {
        self.size_limit
    }

    /// Sets the most guest memory, in bytes, later tables may map; the current table stays.
    pub fn set_size_limit(&mut self, bytes: u64) {
        self.size_limit = bytes;
    }

    /// How many regions the table holds.
    pub fn num_regions(&self) -> usize {
        self.by_vmm.len()
    }

    /// `SET_MEM_TABLE`: replaces the whole table.
    ///
    /// All regions are checked and mapped before anything changes; on error the old table
    /// stays. Regions may come in any order.
    pub fn set_table(&mut self, specs: Vec<RegionSpec>) -> Result<(), MemError> {
        let pending = self.prepare_table(specs)?;
        self.publish(pending)
    }

    /// The first half of [`set_table`](Self::set_table): checks and maps the regions and
    /// returns them unpublished, so that nothing reads them before [`publish`](Self::publish).
    ///
    /// Postcopy needs the two halves: the mappings must be registered with the userfaultfd,
    /// and the frontend must have acknowledged their addresses, before the device may touch
    /// them (a fault nobody can resolve would hang it).
    pub fn prepare_table(&self, specs: Vec<RegionSpec>) -> Result<PendingTable<B>, MemError> {
        self.check_count(specs.len())?;
        let ranges = specs
            .iter()
            .map(RegionSpec::ranges)
            .collect::<Result<Vec<_>, _>>()?;
        check_disjoint(&ranges)?;
        self.check_size(ranges.iter())?;
        self.check_log_covers(ranges.iter().map(Ranges::guest_end).max().unwrap_or(0))?;
        let mut mapped = specs
            .into_iter()
            .zip(ranges)
            .map(|(spec, ranges)| self.map(spec, ranges))
            .collect::<Result<Vec<_>, _>>()?;
        mapped.sort_by_key(|m| m.ranges.vmm);
        Ok(PendingTable { mapped })
    }

    /// `ADD_MEM_REG`: adds one region.
    pub fn add_region(&mut self, spec: RegionSpec) -> Result<(), MemError> {
        let pending = self.prepare_add_region(None, spec)?;
        self.publish(pending)
    }

    /// The first half of [`add_region`](Self::add_region): the table with the region added,
    /// unpublished (see [`prepare_table`](Self::prepare_table)). The region is added to
    /// `pending` if given (several `ADD_MEM_REG`s before one acknowledgement), else to the
    /// current table; either stays as it was.
    pub fn prepare_add_region(
        &self,
        pending: Option<&PendingTable<B>>,
        spec: RegionSpec,
    ) -> Result<PendingTable<B>, MemError> {
        let base = pending.map_or(&self.by_vmm, |p| &p.mapped);
        self.check_count(base.len() + 1)?;
        let new = spec.ranges()?;
        for old in base.iter().map(|m| &m.ranges) {
            check_pair(old, &new)?;
        }
        self.check_size(base.iter().map(|m| &m.ranges).chain([&new]))?;
        let highest = base
            .iter()
            .map(|m| m.ranges.guest_end())
            .max()
            .unwrap_or(0)
            .max(new.guest_end());
        self.check_log_covers(highest)?;
        let added = self.map(spec, new)?;
        let at = base.partition_point(|m| m.ranges.vmm < new.vmm);
        let mut mapped = shallow_copy(base);
        mapped.insert(at, added);
        Ok(PendingTable { mapped })
    }

    /// The second half of [`set_table`](Self::set_table) and
    /// [`add_region`](Self::add_region): makes `pending` the table that readers see.
    pub fn publish(&mut self, pending: PendingTable<B>) -> Result<(), MemError> {
        self.commit(pending.mapped)
    }

    /// `REM_MEM_REG`: removes the region with exactly this guest address, size and VMM
    /// address (the spec ignores the mmap offset here).
    ///
    /// The mapping goes away once the last snapshot holding it is dropped.
    pub fn remove_region(
        &mut self,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
    ) -> Result<(), MemError> {
        let wanted = Ranges {
            guest: guest_phys_addr,
            vmm: userspace_addr,
            size: memory_size,
        };
        let at = self
            .by_vmm
            .iter()
            .position(|m| m.ranges == wanted)
            .ok_or(MemError::NotFound {
                guest_phys_addr,
                memory_size,
                userspace_addr,
            })?;
        let mut mapped = shallow_copy(&self.by_vmm);
        mapped.remove(at);
        self.commit(mapped)
    }

    /// Drops every region and the log (for `RESET_OWNER` or a disconnect).
    pub fn reset(&mut self) {
        self.by_vmm.clear();
        self.publish_empty();
        self.log.clear_log();
        self.log.set_notify_fd(None);
        self.log.set_logging(false);
    }

    /// Translates the frontend's VMM address range `vmm_addr..vmm_addr+len` to the guest
    /// address of its first byte. The whole range must lie inside one region; a zero `len`
    /// checks the address alone.
    pub fn vmm_to_guest(&self, vmm_addr: u64, len: u64) -> Result<GuestAddress, MemError> {
        let not_mapped = MemError::NotMapped {
            addr: vmm_addr,
            len,
        };
        let Some(end) = vmm_addr.checked_add(len) else {
            return Err(not_mapped);
        };
        let after = self.by_vmm.partition_point(|m| m.ranges.vmm <= vmm_addr);
        let Some(m) = after.checked_sub(1).and_then(|i| self.by_vmm.get(i)) else {
            return Err(not_mapped);
        };
        // `m.ranges.vmm <= vmm_addr <= end`, so neither subtraction underflows.
        let offset = vmm_addr - m.ranges.vmm;
        if offset >= m.ranges.size || end - m.ranges.vmm > m.ranges.size {
            return Err(not_mapped);
        }
        Ok(GuestAddress(m.ranges.guest + offset))
    }

    /// `SET_LOG_BASE`: maps `mmap_size` bytes of `fd` from `mmap_offset` as the dirty log,
    /// replacing any previous log. The fd may be closed afterwards.
    ///
    /// Refused if the log has fewer than one bit per 4 KiB page up to the highest guest
    /// address of the table.
    pub fn set_log_base(
        &mut self,
        fd: impl AsFd,
        mmap_size: u64,
        mmap_offset: u64,
    ) -> Result<(), MemError> {
        if mmap_size == 0 {
            return Err(MemError::EmptyLog);
        }
        if mmap_offset.checked_add(mmap_size).is_none() {
            return Err(MemError::LogOverflow {
                size: mmap_size,
                offset: mmap_offset,
            });
        }
        let needed = log_size_for(self.highest_guest_end());
        if mmap_size < needed {
            return Err(MemError::LogTooSmall {
                size: mmap_size,
                needed,
            });
        }
        self.log.map_log(fd, mmap_size, mmap_offset)
    }

    /// Unmaps the dirty log, if any.
    pub fn clear_log(&mut self) {
        self.log.clear_log();
    }

    /// `SET_LOG_FD`: the eventfd to signal when the log changed (`None` drops it).
    pub fn set_log_fd(&mut self, fd: Option<File>) {
        self.log.set_notify_fd(fd);
    }

    /// Follows `VHOST_F_LOG_ALL`: logging on or off.
    ///
    /// Turning logging on with a mapped log that does not cover the table is refused with
    /// [`MemError::LogTooSmall`] and leaves logging off: bits past the log's end would be lost
    /// and the migrated guest silently corrupted.
    pub fn set_logging(&self, on: bool) -> Result<(), MemError> {
        if on {
            if let Some(size) = self.log.log_size() {
                let needed = log_size_for(self.highest_guest_end());
                if size < needed {
                    return Err(MemError::LogTooSmall { size, needed });
                }
            }
        }
        self.log.set_logging(on);
        Ok(())
    }

    /// Marks a guest range dirty explicitly; see [`DirtyLog::mark_dirty`].
    pub fn mark_dirty(&self, gpa: GuestAddress, len: u64) -> Result<(), MemError> {
        self.log.mark_dirty(gpa, len)
    }

    /// Signals the log eventfd if the log changed; see [`DirtyLog::notify_changed`].
    pub fn notify_log_changed(&self) -> Result<bool, MemError> {
        self.log.notify_changed()
    }

    /// Refuses a table whose regions add up to more than the size limit.
    fn check_size<'a>(&self, ranges: impl Iterator<Item = &'a Ranges>) -> Result<(), MemError> {
        // Each size is at most u64::MAX; saturating keeps an absurd sum above any limit.
        let total = ranges.fold(0u64, |sum, r| sum.saturating_add(r.size));
        if total > self.size_limit {
            return Err(MemError::TooMuchMemory {
                total,
                limit: self.size_limit,
            });
        }
        Ok(())
    }

    fn check_count(&self, requested: usize) -> Result<(), MemError> {
        if requested > self.slot_limit as usize {
            return Err(MemError::TooManyRegions {
                limit: self.slot_limit,
                requested,
            });
        }
        Ok(())
    }

    /// While logging, a table must stay inside the log. Not otherwise: QEMU drops its log
    /// after a migration without telling the backend, so a stale, smaller log may remain
    /// mapped; and it grows the log (`SET_LOG_BASE`) before it grows the table.
    fn check_log_covers(&self, guest_end: u64) -> Result<(), MemError> {
        if !self.log.is_logging() {
            return Ok(());
        }
        match self.log.log_size() {
            Some(size) if size < log_size_for(guest_end) => Err(MemError::LogTooSmall {
                size,
                needed: log_size_for(guest_end),
            }),
            _ => Ok(()),
        }
    }

    fn highest_guest_end(&self) -> u64 {
        self.by_vmm
            .iter()
            .map(|m| m.ranges.guest_end())
            .max()
            .unwrap_or(0)
    }

    fn map(&self, spec: RegionSpec, ranges: Ranges) -> Result<Mapped<B>, MemError> {
        let region = map_region::<B>(spec, ranges)?;
        // The mapping's own bitmap, not the region-trait slice of it.
        let mapping: &MmapRegion<B> = &region;
        mapping.bitmap().bind(region.start_addr(), &self.log);
        Ok(Mapped {
            ranges,
            region: Arc::new(region),
        })
    }

    /// Publishes `mapped` (sorted by VMM address) as the new table.
    fn commit(&mut self, mapped: Vec<Mapped<B>>) -> Result<(), MemError> {
        let mut regions: Vec<_> = mapped.iter().map(|m| Arc::clone(&m.region)).collect();
        regions.sort_by_key(|r| r.start_addr());
        let memory = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(regions)?
        };
        self.atomic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(memory);
        self.by_vmm = mapped;
        Ok(())
    }

    fn publish_empty(&self) {
        self.atomic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(GuestMemoryMmap::new());
    }
}

/// A second handle on each mapping of `table`.
fn shallow_copy<B>(table: &[Mapped<B>]) -> Vec<Mapped<B>> {
    table
        .iter()
        .map(|m| Mapped {
            ranges: m.ranges,
            region: Arc::clone(&m.region),
        })
        .collect()
}

/// Regions checked and mapped by [`GuestMemoryManager::prepare_table`] or
/// [`GuestMemoryManager::prepare_add_region`] and not yet published: no guest-memory
/// snapshot holds them. Dropping it unmaps what no published table holds.
pub struct PendingTable<B: RegionBitmap = LogBitmap> {
    /// Sorted by VMM address.
    mapped: Vec<Mapped<B>>,
}

impl<B: RegionBitmap> std::fmt::Debug for PendingTable<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingTable")
            .field(
                "regions",
                &self.mapped.iter().map(|m| m.ranges).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<B: RegionBitmap> PendingTable<B> {
    /// The backend's mapping of the region starting at guest address `guest_phys_addr`: its
    /// host address and length.
    pub fn host_range(&self, guest_phys_addr: u64) -> Option<(*mut u8, usize)> {
        self.mapped
            .iter()
            .find(|m| m.ranges.guest == guest_phys_addr)
            .map(|m| (m.region.as_ptr(), m.region.size()))
    }

    /// How many regions the table holds.
    pub fn num_regions(&self) -> usize {
        self.mapped.len()
    }
}

/// Refuses two regions that share guest or VMM addresses.
fn check_pair(a: &Ranges, b: &Ranges) -> Result<(), MemError> {
    if a.guest_overlaps(b) {
        return Err(MemError::OverlappingGuest {
            first: a.guest,
            first_size: a.size,
            second: b.guest,
            second_size: b.size,
        });
    }
    if a.vmm_overlaps(b) {
        return Err(MemError::OverlappingVmm {
            first: a.vmm,
            first_size: a.size,
            second: b.vmm,
            second_size: b.size,
        });
    }
    Ok(())
}

/// Refuses any overlap in a whole table: sorted, only neighbours can overlap.
fn check_disjoint(ranges: &[Ranges]) -> Result<(), MemError> {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.guest);
    for pair in sorted.windows(2) {
        if pair[0].guest_overlaps(&pair[1]) {
            return check_pair(&pair[0], &pair[1]);
        }
    }
    sorted.sort_by_key(|r| r.vmm);
    for pair in sorted.windows(2) {
        if pair[0].vmm_overlaps(&pair[1]) {
            return check_pair(&pair[0], &pair[1]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryBackend};

    use super::*;
    use crate::error::AddressSpace;
    use crate::testutil::{dirty_pages, log_bit, memfd, region};

    const MIB: u64 = 1 << 20;

    fn manager() -> GuestMemoryManager {
        GuestMemoryManager::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()))
    }

    /// Two regions: guest 0..1M at VMM 0x10_0000_0000, guest 1M..2M at VMM 0x20_0000_0000.
    fn two_regions() -> GuestMemoryManager {
        let mut m = manager();
        m.set_table(vec![
            region(0, MIB, 0x10_0000_0000),
            region(MIB, MIB, 0x20_0000_0000),
        ])
        .unwrap();
        m
    }

    #[test]
    fn set_table_maps_each_region_shared_from_its_fd() {
        let mut m = manager();
        let file = memfd(2 * MIB);
        let spec = RegionSpec::new(
            0x4000_0000,
            MIB,
            0x7f00_0000_0000,
            MIB,
            file.try_clone().unwrap(),
        );
        m.set_table(vec![spec]).unwrap();
        let mem = m.memory().memory();
        mem.write_obj(0xabcd_u32, GuestAddress(0x4000_0010))
            .unwrap();
        let mut back = [0u8; 4];
        file.read_exact_at(&mut back, MIB + 0x10).unwrap();
        assert_eq!(u32::from_ne_bytes(back), 0xabcd);
    }

    #[test]
    fn set_table_accepts_unsorted_regions() {
        let mut m = manager();
        m.set_table(vec![
            region(2 * MIB, MIB, 0x1000_0000),
            region(0, MIB, 0x3000_0000),
            region(MIB, MIB, 0x2000_0000),
        ])
        .unwrap();
        assert_eq!(m.num_regions(), 3);
        assert_eq!(m.memory().memory().num_regions(), 3);
        assert_eq!(m.vmm_to_guest(0x3000_0010, 4).unwrap(), GuestAddress(0x10));
    }

    #[test]
    fn zero_size_region_is_refused() {
        let mut m = manager();
        let spec = RegionSpec::new(0x1000, 0, 0x1000, 0, memfd(4096));
        let err = m.set_table(vec![spec]).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::ZeroSize {
                    guest_phys_addr: 0x1000
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn overlapping_guest_ranges_are_refused() {
        let mut m = manager();
        let err = m
            .set_table(vec![
                region(0, 2 * MIB, 0x1000_0000),
                region(MIB, MIB, 0x2000_0000),
            ])
            .unwrap_err();
        assert!(matches!(err, MemError::OverlappingGuest { .. }), "{err}");
    }

    #[test]
    fn overlapping_vmm_ranges_are_refused() {
        let mut m = manager();
        let err = m
            .set_table(vec![
                region(0, MIB, 0x1000_0000),
                region(4 * MIB, MIB, 0x1000_1000),
            ])
            .unwrap_err();
        assert!(matches!(err, MemError::OverlappingVmm { .. }), "{err}");
    }

    #[test]
    fn guest_size_overflow_is_refused() {
        let mut m = manager();
        let spec = RegionSpec::new(u64::MAX - 0xfff, 0x2000, 0, 0, memfd(0x2000));
        let err = m.set_table(vec![spec]).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::Overflow {
                    space: AddressSpace::Guest,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn vmm_size_overflow_is_refused() {
        let mut m = manager();
        let spec = RegionSpec::new(0, 0x2000, u64::MAX - 0xfff, 0, memfd(0x2000));
        let err = m.set_table(vec![spec]).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::Overflow {
                    space: AddressSpace::Vmm,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn file_offset_size_overflow_is_refused() {
        let mut m = manager();
        let spec = RegionSpec::new(0, 0x2000, 0x1000, u64::MAX - 0xfff, memfd(0x2000));
        let err = m.set_table(vec![spec]).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::Overflow {
                    space: AddressSpace::File,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn table_over_size_limit_is_refused() {
        let mut m = manager();
        m.set_size_limit(MIB);
        let err = m
            .set_table(vec![
                region(0, MIB, 0x1000_0000),
                region(MIB, 4096, 0x2000_0000),
            ])
            .unwrap_err();
        assert!(
            matches!(
                err,
                MemError::TooMuchMemory {
                    total,
                    limit: MIB
                } if total == MIB + 4096
            ),
            "{err}"
        );
        assert_eq!(m.num_regions(), 0);
        m.set_table(vec![region(0, MIB, 0x1000_0000)]).unwrap();
    }

    #[test]
    fn add_region_over_size_limit_is_refused() {
        let mut m = manager();
        m.set_size_limit(MIB);
        m.add_region(region(0, MIB, 0x1000_0000)).unwrap();
        let err = m.add_region(region(MIB, 4096, 0x2000_0000)).unwrap_err();
        assert!(matches!(err, MemError::TooMuchMemory { .. }), "{err}");
        assert_eq!(m.num_regions(), 1);
    }

    #[test]
    fn default_size_limit_is_32_tib() {
        assert_eq!(manager().size_limit(), 32 << 40);
    }

    #[test]
    fn default_slot_limit_is_509() {
        assert_eq!(manager().slot_limit(), 509);
    }

    #[test]
    fn table_over_slot_limit_is_refused() {
        let mut m = GuestMemoryManager::<LogBitmap>::with_slot_limit(
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            2,
        );
        let err = m
            .set_table(
                (0..3)
                    .map(|i| region(i * MIB, MIB, (i + 1) * 0x1000_0000))
                    .collect(),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                MemError::TooManyRegions {
                    limit: 2,
                    requested: 3
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn add_region_over_slot_limit_is_refused() {
        let mut m = GuestMemoryManager::<LogBitmap>::with_slot_limit(
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            1,
        );
        m.add_region(region(0, MIB, 0x1000_0000)).unwrap();
        let err = m.add_region(region(MIB, MIB, 0x2000_0000)).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::TooManyRegions {
                    limit: 1,
                    requested: 2
                }
            ),
            "{err}"
        );
        assert_eq!(m.num_regions(), 1);
    }

    #[test]
    fn refused_table_keeps_the_old_table() {
        let mut m = two_regions();
        let err = m.set_table(vec![region(0, MIB, 1 << 32), region(0, MIB, 2 << 32)]);
        assert!(err.is_err());
        assert_eq!(m.num_regions(), 2);
        assert_eq!(m.memory().memory().num_regions(), 2);
    }

    #[test]
    fn a_prepared_table_is_invisible_until_published() {
        let mut m = manager();
        let pending = m
            .prepare_table(vec![RegionSpec::new(0, MIB, 0x10_0000_0000, 0, memfd(MIB))])
            .unwrap();
        assert_eq!(m.num_regions(), 0);
        assert_eq!(m.memory().memory().num_regions(), 0);
        assert!(pending
            .host_range(0)
            .is_some_and(|(_, len)| len == MIB as usize));
        let added = m
            .prepare_add_region(
                Some(&pending),
                RegionSpec::new(MIB, MIB, 0x20_0000_0000, 0, memfd(MIB)),
            )
            .unwrap();
        assert_eq!(added.num_regions(), 2);
        assert_eq!(m.memory().memory().num_regions(), 0);
        m.publish(added).unwrap();
        assert_eq!(m.memory().memory().num_regions(), 2);
    }

    #[test]
    fn set_table_replaces_the_table() {
        let mut m = two_regions();
        m.set_table(vec![region(8 * MIB, MIB, 0x30_0000_0000)])
            .unwrap();
        let mem = m.memory().memory();
        assert_eq!(mem.num_regions(), 1);
        assert!(!mem.address_in_range(GuestAddress(0)));
        assert!(m.vmm_to_guest(0x10_0000_0000, 1).is_err());
    }

    #[test]
    fn add_region_leaves_an_old_snapshot_unchanged() {
        let mut m = two_regions();
        let before = m.memory().memory();
        m.add_region(region(4 * MIB, MIB, 0x40_0000_0000)).unwrap();
        assert_eq!(before.num_regions(), 2);
        assert_eq!(m.memory().memory().num_regions(), 3);
        assert_eq!(
            m.vmm_to_guest(0x40_0000_0000, 8).unwrap(),
            GuestAddress(4 * MIB)
        );
    }

    #[test]
    fn add_region_overlapping_an_existing_one_is_refused() {
        let mut m = two_regions();
        let err = m
            .add_region(region(MIB + 4096, 4096, 0x50_0000_0000))
            .unwrap_err();
        assert!(matches!(err, MemError::OverlappingGuest { .. }), "{err}");
        let err = m
            .add_region(region(8 * MIB, MIB, 0x20_0000_0000 + 4096))
            .unwrap_err();
        assert!(matches!(err, MemError::OverlappingVmm { .. }), "{err}");
    }

    #[test]
    fn remove_region_drops_memory_and_translation() {
        let mut m = two_regions();
        m.remove_region(MIB, MIB, 0x20_0000_0000).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert!(!m.memory().memory().address_in_range(GuestAddress(MIB)));
        assert!(m.vmm_to_guest(0x20_0000_0000, 1).is_err());
        assert_eq!(m.vmm_to_guest(0x10_0000_0000, 1).unwrap(), GuestAddress(0));
    }

    #[test]
    fn removing_the_last_region_leaves_an_empty_table() {
        let mut m = manager();
        m.add_region(region(0, MIB, 0x1000_0000)).unwrap();
        m.remove_region(0, MIB, 0x1000_0000).unwrap();
        assert_eq!(m.memory().memory().num_regions(), 0);
    }

    #[test]
    fn remove_of_an_unknown_region_is_refused() {
        let mut m = two_regions();
        let err = m.remove_region(MIB, MIB, 0x30_0000_0000).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::NotFound {
                    guest_phys_addr: MIB,
                    memory_size: MIB,
                    userspace_addr: 0x30_0000_0000
                }
            ),
            "{err}"
        );
        assert_eq!(m.num_regions(), 2);
    }

    #[test]
    fn translation_of_a_range_ending_at_a_region_end_succeeds() {
        let m = two_regions();
        let vmm = 0x20_0000_0000 + MIB - 16;
        assert_eq!(m.vmm_to_guest(vmm, 16).unwrap(), GuestAddress(2 * MIB - 16));
    }

    #[test]
    fn translation_of_a_range_one_byte_past_a_region_end_is_refused() {
        let m = two_regions();
        let err = m.vmm_to_guest(0x20_0000_0000 + MIB - 16, 17).unwrap_err();
        assert!(matches!(err, MemError::NotMapped { .. }), "{err}");
    }

    #[test]
    fn translation_of_a_range_crossing_two_regions_is_refused() {
        // Adjacent in VMM space as well as in guest space: still two regions.
        let mut m = manager();
        m.set_table(vec![
            region(0, MIB, 0x1000_0000),
            region(MIB, MIB, 0x1000_0000 + MIB),
        ])
        .unwrap();
        assert!(m.vmm_to_guest(0x1000_0000 + MIB - 8, 8).is_ok());
        let err = m.vmm_to_guest(0x1000_0000 + MIB - 8, 16).unwrap_err();
        assert!(matches!(err, MemError::NotMapped { .. }), "{err}");
    }

    #[test]
    fn translation_of_a_range_wrapping_past_u64_max_is_refused() {
        let m = two_regions();
        let err = m.vmm_to_guest(0x10_0000_0000, u64::MAX).unwrap_err();
        assert!(matches!(err, MemError::NotMapped { .. }), "{err}");
    }

    #[test]
    fn translation_outside_every_region_is_refused() {
        let m = two_regions();
        assert!(m.vmm_to_guest(0, 1).is_err());
        assert!(m.vmm_to_guest(0x10_0000_0000 + MIB, 1).is_err());
        assert!(m.vmm_to_guest(u64::MAX, 0).is_err());
    }

    #[test]
    fn translation_matches_a_linear_scan_over_509_regions() {
        let mut m = manager();
        // Shuffled VMM order so that guest and VMM orders differ.
        let specs = (0..509u64)
            .map(|i| {
                region(
                    i * 0x10000,
                    0x8000,
                    ((i * 263) % 509) * 0x20000 + 0x1_0000_0000,
                )
            })
            .collect();
        m.set_table(specs).unwrap();
        for i in 0..509u64 {
            let vmm = ((i * 263) % 509) * 0x20000 + 0x1_0000_0000;
            assert_eq!(
                m.vmm_to_guest(vmm + 0x7ff0, 0x10).unwrap(),
                GuestAddress(i * 0x10000 + 0x7ff0)
            );
            assert!(m.vmm_to_guest(vmm + 0x8000, 1).is_err());
        }
    }

    /// A manager with two regions and a 1 KiB log covering 32 MiB, logging on.
    fn logged() -> (GuestMemoryManager, std::fs::File) {
        let mut m = two_regions();
        let log = memfd(1024);
        m.set_log_base(&log, 1024, 0).unwrap();
        m.set_logging(true).unwrap();
        (m, log)
    }

    #[test]
    fn log_smaller_than_guest_memory_is_refused() {
        let mut m = two_regions();
        // 2 MiB of guest memory is 512 pages, 64 bytes of log.
        let err = m.set_log_base(memfd(64), 63, 0).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::LogTooSmall {
                    size: 63,
                    needed: 64
                }
            ),
            "{err}"
        );
        m.set_log_base(memfd(64), 64, 0).unwrap();
    }

    #[test]
    fn log_size_offset_overflow_is_refused() {
        let mut m = two_regions();
        let err = m
            .set_log_base(memfd(4096), 4096, u64::MAX - 100)
            .unwrap_err();
        assert!(
            matches!(err, MemError::LogOverflow { size: 4096, .. }),
            "{err}"
        );
    }

    #[test]
    fn log_longer_than_its_file_is_refused() {
        let mut m = two_regions();
        let err = m.set_log_base(memfd(32), 64, 0).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::FileTooSmall {
                    size: 64,
                    file_size: 32,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn empty_log_is_refused() {
        let mut m = manager();
        assert!(matches!(
            m.set_log_base(memfd(4096), 0, 0),
            Err(MemError::EmptyLog)
        ));
    }

    #[test]
    fn region_beyond_the_log_is_refused_while_logging() {
        let mut m = two_regions();
        m.set_log_base(memfd(64), 64, 0).unwrap();
        m.set_logging(true).unwrap();
        let err = m
            .add_region(region(2 * MIB, 4096, 0x30_0000_0000))
            .unwrap_err();
        assert!(
            matches!(
                err,
                MemError::LogTooSmall {
                    size: 64,
                    needed: 65
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn region_beyond_a_stale_log_is_accepted_while_not_logging() {
        let mut m = two_regions();
        m.set_log_base(memfd(64), 64, 0).unwrap();
        m.add_region(region(2 * MIB, 4096, 0x30_0000_0000)).unwrap();
        assert_eq!(m.num_regions(), 3);
    }

    #[test]
    fn logging_on_with_a_log_smaller_than_the_table_is_refused() {
        let mut m = two_regions();
        m.set_log_base(memfd(64), 64, 0).unwrap();
        m.add_region(region(2 * MIB, 4096, 0x30_0000_0000)).unwrap();
        let err = m.set_logging(true).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::LogTooSmall {
                    size: 64,
                    needed: 65
                }
            ),
            "{err}"
        );
        assert!(!m.dirty_log().is_logging());
    }

    #[test]
    fn write_obj_marks_its_page() {
        let (m, log) = logged();
        m.memory()
            .memory()
            .write_obj(7u64, GuestAddress(0x5008))
            .unwrap();
        assert_eq!(dirty_pages(&log, 0, 1024), vec![5]);
    }

    #[test]
    fn write_slice_spanning_two_pages_marks_both() {
        let (m, log) = logged();
        m.memory()
            .memory()
            .write_slice(&[1u8; 16], GuestAddress(0x3ff8))
            .unwrap();
        assert_eq!(dirty_pages(&log, 0, 1024), vec![3, 4]);
    }

    #[test]
    fn write_spanning_two_regions_marks_both_pages() {
        let (m, log) = logged();
        m.memory()
            .memory()
            .write_slice(&[1u8; 32], GuestAddress(MIB - 16))
            .unwrap();
        let last_of_first = MIB / 4096 - 1;
        assert_eq!(
            dirty_pages(&log, 0, 1024),
            vec![last_of_first, last_of_first + 1]
        );
    }

    #[test]
    fn large_write_marks_every_page_it_touches() {
        let (m, log) = logged();
        m.memory()
            .memory()
            .write_slice(&vec![1u8; 20 * 4096], GuestAddress(0x1_0800))
            .unwrap();
        assert_eq!(
            dirty_pages(&log, 0, 1024),
            (0x10..=0x24).collect::<Vec<_>>()
        );
    }

    #[test]
    fn writes_with_logging_off_mark_nothing() {
        let (m, log) = logged();
        m.set_logging(false).unwrap();
        m.memory()
            .memory()
            .write_obj(7u64, GuestAddress(0x5008))
            .unwrap();
        assert!(dirty_pages(&log, 0, 1024).is_empty());
    }

    #[test]
    fn writes_without_a_log_mark_nothing_and_do_not_fail() {
        let m = two_regions();
        m.set_logging(true).unwrap();
        m.memory()
            .memory()
            .write_obj(7u64, GuestAddress(0x5008))
            .unwrap();
        assert!(!m.dirty_log().is_dirty(GuestAddress(0x5008)));
    }

    #[test]
    fn region_added_after_set_log_base_is_logged() {
        let (mut m, log) = logged();
        m.add_region(region(16 * MIB, MIB, 0x30_0000_0000)).unwrap();
        m.memory()
            .memory()
            .write_obj(1u8, GuestAddress(16 * MIB + 0x2000))
            .unwrap();
        assert_eq!(dirty_pages(&log, 0, 1024), vec![16 * MIB / 4096 + 2]);
    }

    #[test]
    fn a_replaced_log_gets_the_later_bits() {
        let (mut m, old) = logged();
        let new = memfd(8192);
        m.set_log_base(&new, 1024, 4096).unwrap();
        m.memory()
            .memory()
            .write_obj(1u8, GuestAddress(0x9000))
            .unwrap();
        assert!(dirty_pages(&old, 0, 1024).is_empty());
        assert_eq!(dirty_pages(&new, 4096, 1024), vec![9]);
    }

    #[test]
    fn a_log_at_an_unaligned_offset_is_used_from_that_offset() {
        let mut m = two_regions();
        let log = memfd(8192);
        m.set_log_base(&log, 64, 100).unwrap();
        m.set_logging(true).unwrap();
        m.memory()
            .memory()
            .write_obj(1u8, GuestAddress(0x1000))
            .unwrap();
        assert!(log_bit(&log, 100, 1));
        assert_eq!(dirty_pages(&log, 0, 8192), vec![100 * 8 + 1]);
    }

    #[test]
    fn mark_dirty_sets_the_bits_of_a_range() {
        let (m, log) = logged();
        m.mark_dirty(GuestAddress(0x2fff), 2).unwrap();
        assert_eq!(dirty_pages(&log, 0, 1024), vec![2, 3]);
    }

    #[test]
    fn mark_dirty_outside_guest_ram_but_inside_the_log_is_accepted() {
        let (m, log) = logged();
        m.mark_dirty(GuestAddress(30 * MIB), 4).unwrap();
        assert_eq!(dirty_pages(&log, 0, 1024), vec![30 * MIB / 4096]);
    }

    #[test]
    fn mark_dirty_past_the_log_is_refused() {
        let (m, log) = logged();
        let err = m.mark_dirty(GuestAddress(32 * MIB - 8), 16).unwrap_err();
        assert!(matches!(err, MemError::OutsideLog { .. }), "{err}");
        assert!(dirty_pages(&log, 0, 1024).is_empty());
        assert!(m.mark_dirty(GuestAddress(u64::MAX), 2).is_err());
    }

    #[test]
    fn mark_dirty_with_logging_off_marks_nothing() {
        let (m, log) = logged();
        m.set_logging(false).unwrap();
        m.mark_dirty(GuestAddress(0x2000), 1).unwrap();
        assert!(dirty_pages(&log, 0, 1024).is_empty());
    }

    #[test]
    fn log_fd_is_signalled_once_after_a_change() {
        let (mut m, _log) = logged();
        let event = crate::sys::eventfd().unwrap();
        m.set_log_fd(Some(event.try_clone().unwrap()));
        assert!(!m.notify_log_changed().unwrap());
        m.memory()
            .memory()
            .write_obj(1u8, GuestAddress(0x1000))
            .unwrap();
        m.memory()
            .memory()
            .write_obj(1u8, GuestAddress(0x2000))
            .unwrap();
        assert!(m.notify_log_changed().unwrap());
        assert!(!m.notify_log_changed().unwrap());
        let mut count = [0u8; 8];
        std::io::Read::read_exact(&mut &event, &mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 1);
    }

    #[test]
    fn reset_drops_regions_log_and_logging() {
        let (mut m, _log) = logged();
        m.reset();
        assert_eq!(m.num_regions(), 0);
        assert_eq!(m.memory().memory().num_regions(), 0);
        assert_eq!(m.dirty_log().log_size(), None);
        assert!(!m.dirty_log().is_logging());
    }

    #[test]
    fn atomic_store_marks_its_page() {
        let (m, log) = logged();
        let mem = m.memory().memory();
        mem.store(
            1u16,
            GuestAddress(0x7002),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
        assert_eq!(dirty_pages(&log, 0, 1024), vec![7]);
    }

    #[test]
    fn manager_and_memory_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GuestMemoryManager>();
        send_sync::<GuestMemoryAtomic<GuestMemoryMmap<LogBitmap>>>();
    }

    #[test]
    fn unit_bitmap_manager_maps_without_logging() {
        let mut m = GuestMemoryManager::<()>::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()));
        m.set_table(vec![region(0, MIB, 0x1000_0000)]).unwrap();
        m.memory()
            .memory()
            .write_obj(1u8, GuestAddress(0x10))
            .unwrap();
        assert_eq!(m.vmm_to_guest(0x1000_0010, 1).unwrap(), GuestAddress(0x10));
    }
}
