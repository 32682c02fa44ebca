//! One region of the frontend's memory table, and mapping it.

use std::fs::File;
use std::os::fd::AsFd;

use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use crate::dirty::RegionBitmap;
use crate::error::{AddressSpace, MemError};

/// The Xen fields of a region description (spec: "Memory region description", Xen mmap
/// description), present when the frontend is a Xen device model.
#[cfg(feature = "xen")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XenMapping {
    /// `xen_mmap_flags`: 0 for a plain Unix mapping, `FOREIGN` (1) or `GRANT` (2), optionally
    /// with `NO_ADVANCE_MAP`; see `vm_memory::MmapXenFlags`.
    ///
    /// The spec's text says "bit 8" for "can not be mapped in advance"; vm-memory (and so
    /// this crate) reads the value 0x8 (bit 3), which is what existing Xen frontends send.
    pub mmap_flags: u32,
    /// `xen_mmap_data`: the Xen domain id for foreign and grant mappings.
    pub mmap_data: u32,
}

/// One region as the frontend describes it (spec: "Memory region description"), with its fd.
///
/// Built with [`RegionSpec::new`] (and, with feature `xen`, `RegionSpec::with_xen`) so that code
/// building it compiles the same with and without the `xen` feature.
#[derive(Debug)]
#[non_exhaustive]
pub struct RegionSpec {
    /// Guest physical address of the region's first byte.
    pub guest_phys_addr: u64,
    /// Size of the region in bytes.
    pub memory_size: u64,
    /// Where the frontend has the region mapped in its own address space (ring addresses
    /// arrive in this form).
    pub userspace_addr: u64,
    /// Offset of the region in `file`.
    pub mmap_offset: u64,
    /// The fd that backs the region; kept open as long as the region is mapped.
    pub file: File,
    /// The Xen mapping, if the frontend sent one.
    #[cfg(feature = "xen")]
    pub xen: Option<XenMapping>,
}

impl RegionSpec {
    /// A region backed by `file` from `mmap_offset`, mapped MAP_SHARED.
    pub fn new(
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
        mmap_offset: u64,
        file: File,
    ) -> Self {
        RegionSpec {
            guest_phys_addr,
            memory_size,
            userspace_addr,
            mmap_offset,
            file,
            #[cfg(feature = "xen")]
            xen: None,
        }
    }

    /// The same region with the Xen fields the frontend sent.
    #[cfg(feature = "xen")]
    pub fn with_xen(mut self, xen: XenMapping) -> Self {
        self.xen = Some(xen);
        self
    }

    /// Checks size and the three overflows; the checked ranges.
    pub(crate) fn ranges(&self) -> Result<Ranges, MemError> {
        let size = self.memory_size;
        if size == 0 {
            return Err(MemError::ZeroSize {
                guest_phys_addr: self.guest_phys_addr,
            });
        }
        let check = |space, start: u64| {
            start
                .checked_add(size)
                .ok_or(MemError::Overflow { space, start, size })
        };
        check(AddressSpace::Guest, self.guest_phys_addr)?;
        check(AddressSpace::Vmm, self.userspace_addr)?;
        let file_end = check(AddressSpace::File, self.mmap_offset)?;
        // mmap takes a signed off_t and a usize length.
        if libc::off_t::try_from(file_end).is_err() || usize::try_from(size).is_err() {
            return Err(MemError::Overflow {
                space: AddressSpace::File,
                start: self.mmap_offset,
                size,
            });
        }
        Ok(Ranges {
            guest: self.guest_phys_addr,
            vmm: self.userspace_addr,
            size,
        })
    }
}

/// A region's validated addresses: `guest + size` and `vmm + size` do not overflow, size > 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ranges {
    pub(crate) guest: u64,
    pub(crate) vmm: u64,
    pub(crate) size: u64,
}

impl Ranges {
    pub(crate) fn guest_end(&self) -> u64 {
        self.guest + self.size
    }

    pub(crate) fn vmm_end(&self) -> u64 {
        self.vmm + self.size
    }

    pub(crate) fn guest_overlaps(&self, other: &Ranges) -> bool {
        self.guest < other.guest_end() && other.guest < self.guest_end()
    }

    pub(crate) fn vmm_overlaps(&self, other: &Ranges) -> bool {
        self.vmm < other.vmm_end() && other.vmm < self.vmm_end()
    }
}

/// `HUGETLBFS_MAGIC` from linux/magic.h.
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// Whether `file` lives on hugetlbfs (None if the kernel will not say).
fn is_hugetlbfs(file: &File) -> Option<bool> {
    crate::sys::fs_type(file).ok().map(|t| t == HUGETLBFS_MAGIC)
}

/// Refuses a mapping of `size` bytes from `offset` that a regular file (memfds included) does not
/// cover. Pages past the end of a file raise SIGBUS when touched, so a frontend that sends a short
/// file could otherwise crash the backend at its first access. Other kinds of fd (Xen's privcmd
/// and gntdev devices) have no meaningful size and are left to the kernel.
pub(crate) fn check_file_covers(fd: impl AsFd, offset: u64, size: u64) -> Result<(), MemError> {
    let Some(file_size) = crate::sys::regular_file_size(fd) else {
        // Nothing to check: fstat failing on a live fd, or an fd that is not a regular file.
        return Ok(());
    };
    match offset.checked_add(size) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(MemError::FileTooSmall {
            offset,
            size,
            file_size,
        }),
    }
}

/// Maps `spec` (already checked by [`RegionSpec::ranges`]) as a guest region.
pub(crate) fn map_region<B: RegionBitmap>(
    spec: RegionSpec,
    ranges: Ranges,
) -> Result<GuestRegionMmap<B>, MemError> {
    let gpa = spec.guest_phys_addr;
    let size = usize::try_from(ranges.size).map_err(|_| MemError::Overflow {
        space: AddressSpace::File,
        start: spec.mmap_offset,
        size: ranges.size,
    })?;
    check_file_covers(&spec.file, spec.mmap_offset, ranges.size)?;
    let hugetlbfs = is_hugetlbfs(&spec.file);
    let file_offset = FileOffset::new(spec.file, spec.mmap_offset);
    let mmap_err = |source| MemError::Mmap {
        guest_phys_addr: gpa,
        source,
    };

    #[cfg(not(feature = "xen"))]
    let mapping = {
        let mut mapping = MmapRegion::<B>::from_file(file_offset, size).map_err(mmap_err)?;
        if let Some(h) = hugetlbfs {
            mapping.set_hugetlbfs(h);
        }
        mapping
    };

    #[cfg(feature = "xen")]
    let mapping = {
        use vm_memory::{MmapRange, MmapXenFlags};
        let mut range = match spec.xen {
            // A plain fd: vm-memory's xen mode maps it as MmapXenFlags::UNIX, MAP_SHARED.
            None => MmapRange::new_unix(size, Some(file_offset), GuestAddress(gpa)),
            Some(xen) => {
                let valid = MmapXenFlags::from_bits(xen.mmap_flags).is_some_and(|f| f.is_valid());
                if !valid {
                    return Err(MemError::XenFlags {
                        guest_phys_addr: gpa,
                        flags: xen.mmap_flags,
                    });
                }
                MmapRange::new(
                    size,
                    Some(file_offset),
                    GuestAddress(gpa),
                    xen.mmap_flags,
                    xen.mmap_data,
                )
            }
        };
        if let Some(h) = hugetlbfs {
            range.set_hugetlbfs(h);
        }
        MmapRegion::<B>::from_range(range).map_err(mmap_err)?
    };

    GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(MemError::Overflow {
        space: AddressSpace::Guest,
        start: gpa,
        size: ranges.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::LogBitmap;
    use crate::testutil::memfd;

    #[test]
    fn ranges_of_a_region_ending_at_u64_max_are_accepted() {
        let spec = RegionSpec::new(u64::MAX - 0x1000, 0x1000, u64::MAX - 0x1000, 0, memfd(1));
        let r = spec.ranges().unwrap();
        assert_eq!(r.guest_end(), u64::MAX);
    }

    #[test]
    fn an_offset_beyond_off_t_is_refused() {
        let spec = RegionSpec::new(0, 0x1000, 0x1000, 1 << 63, memfd(1));
        let err = spec.ranges().unwrap_err();
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
    fn touching_ranges_do_not_overlap() {
        let a = Ranges {
            guest: 0,
            vmm: 0x1000,
            size: 0x1000,
        };
        let b = Ranges {
            guest: 0x1000,
            vmm: 0x2000,
            size: 0x1000,
        };
        assert!(!a.guest_overlaps(&b) && !a.vmm_overlaps(&b));
        let c = Ranges {
            guest: 0xfff,
            vmm: 0x1fff,
            size: 2,
        };
        assert!(a.guest_overlaps(&c) && a.vmm_overlaps(&c) && c.guest_overlaps(&b));
    }

    #[test]
    fn a_region_longer_than_its_file_is_refused() {
        let file = memfd(0x1000);
        let spec = RegionSpec::new(0, 0x2000, 0x10_0000, 0, file);
        let ranges = spec.ranges().unwrap();
        let err = map_region::<LogBitmap>(spec, ranges).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::FileTooSmall {
                    offset: 0,
                    size: 0x2000,
                    file_size: 0x1000
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let file = memfd(0x2000);
        let spec = RegionSpec::new(0, 0x2000, 0x10_0000, 0x1000, file);
        let ranges = spec.ranges().unwrap();
        let err = map_region::<LogBitmap>(spec, ranges).unwrap_err();
        assert!(matches!(err, MemError::FileTooSmall { .. }), "{err:?}");
    }

    #[test]
    fn mapping_an_invalid_fd_offset_is_a_typed_error() {
        // mmap needs a page-aligned file offset.
        let spec = RegionSpec::new(0, 0x1000, 0x1000, 1, memfd(0x2000));
        let ranges = spec.ranges().unwrap();
        let err = map_region::<LogBitmap>(spec, ranges).unwrap_err();
        assert!(
            matches!(
                err,
                MemError::Mmap {
                    guest_phys_addr: 0,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[cfg(feature = "xen")]
    #[test]
    fn xen_unix_flags_map_a_plain_fd() {
        use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};
        let spec = RegionSpec::new(0x1000, 0x2000, 0x5000, 0, memfd(0x2000)).with_xen(XenMapping {
            mmap_flags: 0,
            mmap_data: 0,
        });
        let ranges = spec.ranges().unwrap();
        let region = map_region::<LogBitmap>(spec, ranges).unwrap();
        assert_eq!(region.start_addr(), GuestAddress(0x1000));
        region.write_obj(5u32, MemoryRegionAddress(0x1ffc)).unwrap();
        assert_eq!(
            region.read_obj::<u32>(MemoryRegionAddress(0x1ffc)).unwrap(),
            5
        );
    }

    #[cfg(feature = "xen")]
    #[test]
    fn xen_foreign_and_grant_together_are_refused() {
        let spec = RegionSpec::new(0, 0x1000, 0x1000, 0, memfd(0x1000)).with_xen(XenMapping {
            mmap_flags: 0x3,
            mmap_data: 1,
        });
        let ranges = spec.ranges().unwrap();
        let err = map_region::<LogBitmap>(spec, ranges).unwrap_err();
        assert!(
            matches!(err, MemError::XenFlags { flags: 0x3, .. }),
            "{err}"
        );
    }

    #[cfg(feature = "xen")]
    #[test]
    fn xen_unknown_flag_bits_are_refused() {
        let spec = RegionSpec::new(0, 0x1000, 0x1000, 0, memfd(0x1000)).with_xen(XenMapping {
            mmap_flags: 0x10,
            mmap_data: 1,
        });
        let ranges = spec.ranges().unwrap();
        let err = map_region::<LogBitmap>(spec, ranges).unwrap_err();
        assert!(
            matches!(err, MemError::XenFlags { flags: 0x10, .. }),
            "{err}"
        );
    }
}
