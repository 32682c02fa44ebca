//! The one error type of this crate.

use std::fmt;
use std::io;

use vm_memory::mmap::MmapRegionError;
use vm_memory::GuestRegionCollectionError;

/// Which of a region's three address spaces an overflow happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressSpace {
    /// Guest physical addresses (`guest_phys_addr + memory_size`).
    Guest,
    /// The frontend's user (VMM) addresses (`userspace_addr + memory_size`).
    Vmm,
    /// Offsets in the region's file (`mmap_offset + memory_size`).
    File,
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressSpace::Guest => "guest physical address",
            AddressSpace::Vmm => "VMM user address",
            AddressSpace::File => "file offset",
        })
    }
}

/// Why a memory table change, a translation or a log operation was refused.
///
/// Every variant carries the values the frontend sent, so a log line names the culprit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemError {
    /// A region of zero bytes: it maps nothing and would break the overlap checks.
    #[error("region at guest address {guest_phys_addr:#x} has zero size")]
    ZeroSize {
        /// The region's guest physical address.
        guest_phys_addr: u64,
    },
    /// `start + size` does not fit in 64 bits (or the size does not fit in `usize`).
    #[error("{space} {start:#x} + size {size:#x} overflows")]
    Overflow {
        /// The address space the sum belongs to.
        space: AddressSpace,
        /// The start the frontend sent.
        start: u64,
        /// The size the frontend sent.
        size: u64,
    },
    /// Two regions share guest physical addresses.
    #[error(
        "guest range {first:#x}+{first_size:#x} overlaps guest range {second:#x}+{second_size:#x}"
    )]
    OverlappingGuest {
        /// Guest address of one region.
        first: u64,
        /// Size of that region.
        first_size: u64,
        /// Guest address of the other region.
        second: u64,
        /// Size of the other region.
        second_size: u64,
    },
    /// Two regions share VMM user addresses, so VMM-to-guest translation would be ambiguous.
    #[error(
        "VMM range {first:#x}+{first_size:#x} overlaps VMM range {second:#x}+{second_size:#x}"
    )]
    OverlappingVmm {
        /// VMM address of one region.
        first: u64,
        /// Size of that region.
        first_size: u64,
        /// VMM address of the other region.
        second: u64,
        /// Size of the other region.
        second_size: u64,
    },
    /// The table would hold more regions than the slot limit the backend advertises.
    #[error("{requested} regions exceed the limit of {limit}")]
    TooManyRegions {
        /// The slot limit.
        limit: u32,
        /// How many regions the table would have held.
        requested: usize,
    },
    /// The table would map more guest memory than the size limit allows.
    #[error("regions of {total:#x} bytes in all exceed the limit of {limit:#x} bytes")]
    TooMuchMemory {
        /// The sum of the table's region sizes.
        total: u64,
        /// The size limit.
        limit: u64,
    },
    /// `REM_MEM_REG` named a region that is not in the table.
    #[error(
        "no region at guest address {guest_phys_addr:#x}, size {memory_size:#x}, \
         VMM address {userspace_addr:#x}"
    )]
    NotFound {
        /// The guest address the frontend sent.
        guest_phys_addr: u64,
        /// The size the frontend sent.
        memory_size: u64,
        /// The VMM address the frontend sent.
        userspace_addr: u64,
    },
    /// A VMM address range does not lie wholly inside one region.
    #[error("VMM range {addr:#x}+{len:#x} is not inside one mapped region")]
    NotMapped {
        /// The VMM address asked for.
        addr: u64,
        /// The length asked for.
        len: u64,
    },
    /// The file behind a mapping ends before `offset + size`: touching the missing pages would
    /// raise SIGBUS in the backend, so the mapping is refused up front.
    #[error("file of {file_size:#x} bytes cannot back {size:#x} bytes from offset {offset:#x}")]
    FileTooSmall {
        /// The offset into the file the frontend sent.
        offset: u64,
        /// The size the frontend sent.
        size: u64,
        /// The file's actual size.
        file_size: u64,
    },
    /// Mapping a region's fd failed.
    #[error("cannot map region at guest address {guest_phys_addr:#x}: {source}")]
    Mmap {
        /// The region's guest physical address.
        guest_phys_addr: u64,
        /// What vm-memory reported.
        #[source]
        source: MmapRegionError,
    },
    /// vm-memory refused the region collection (not expected after this crate's own checks).
    #[error("guest memory collection refused: {0}")]
    Collection(#[from] GuestRegionCollectionError),
    /// The dirty log is smaller than one bit per 4 KiB page of guest memory needs.
    #[error("dirty log of {size:#x} bytes is too small, {needed:#x} bytes are needed")]
    LogTooSmall {
        /// The log size the frontend sent.
        size: u64,
        /// The size the highest guest address needs.
        needed: u64,
    },
    /// The dirty log has zero size.
    #[error("dirty log has zero size")]
    EmptyLog,
    /// `mmap_offset + mmap_size` of the log overflows.
    #[error("dirty log offset {offset:#x} + size {size:#x} overflows")]
    LogOverflow {
        /// The log size the frontend sent.
        size: u64,
        /// The log offset the frontend sent.
        offset: u64,
    },
    /// Mapping the dirty log failed.
    #[error("cannot map the dirty log: {0}")]
    LogMmap(#[source] io::Error),
    /// A range to mark dirty lies (partly) beyond the end of the log.
    #[error("guest range {addr:#x}+{len:#x} lies outside the dirty log")]
    OutsideLog {
        /// The guest address asked for.
        addr: u64,
        /// The length asked for.
        len: u64,
    },
    /// Signalling the frontend's log eventfd failed.
    #[error("cannot signal the log eventfd: {0}")]
    LogFd(#[source] io::Error),
    /// The Xen mapping flags are not a valid combination.
    #[cfg(feature = "xen")]
    #[error("invalid Xen mmap flags {flags:#x} for region at guest address {guest_phys_addr:#x}")]
    XenFlags {
        /// The region's guest physical address.
        guest_phys_addr: u64,
        /// The flags the frontend sent.
        flags: u32,
    },
}
