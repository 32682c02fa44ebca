//! The error type of this crate.

use std::io;

/// The part of a split virtqueue a ring address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingPart {
    /// The descriptor table (16-byte aligned).
    Descriptors,
    /// The available ring, written by the driver (2-byte aligned).
    Avail,
    /// The used ring, written by the device (4-byte aligned).
    Used,
}

impl RingPart {
    /// The alignment the virtio specification requires for this part, in bytes.
    pub const fn align(self) -> u64 {
        match self {
            RingPart::Descriptors => 16,
            RingPart::Avail => 2,
            RingPart::Used => 4,
        }
    }
}

impl std::fmt::Display for RingPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RingPart::Descriptors => "descriptor table",
            RingPart::Avail => "available ring",
            RingPart::Used => "used ring",
        })
    }
}

/// Errors of vring operations.
///
/// Each variant carries the value that was refused, so that the daemon can log it and answer
/// the frontend without guessing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The maximum queue size given at creation is not a power of two between 1 and 32768.
    #[error("invalid maximum queue size {max}: must be a power of two between 1 and 32768")]
    InvalidMaxQueueSize {
        /// The refused maximum size.
        max: u16,
    },
    /// A queue size (SET_VRING_NUM) is zero, not a power of two, or above the maximum.
    #[error("invalid queue size {size}: must be a power of two between 1 and {max}")]
    InvalidQueueSize {
        /// The refused size.
        size: u16,
        /// The maximum size this vring was created with.
        max: u16,
    },
    /// A ring address (SET_VRING_ADDR) breaks the alignment the virtio specification requires.
    #[error("{part} address {addr:#x} is not aligned to {} bytes", part.align())]
    MisalignedRing {
        /// Which part of the virtqueue the address is for.
        part: RingPart,
        /// The refused guest address.
        addr: u64,
    },
    /// Putting a descriptor chain into the used ring failed.
    #[error("adding head {head} to the used ring failed: {source}")]
    AddUsed {
        /// The head index of the chain that could not be added.
        head: u16,
        /// What virtio-queue reported (for example an out of range head or unmapped memory).
        #[source]
        source: virtio_queue::Error,
    },
    /// Another virtio-queue operation failed (notification suppression, ring index access).
    #[error("virtqueue operation failed: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Reading a driver field (avail flags or `used_event`) from guest memory failed.
    #[error("reading guest memory at {addr:#x} failed: {source}")]
    GuestMemory {
        /// The guest address that could not be read.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A guest address computed from the ring address and size overflows `u64`.
    #[error("ring address {base:#x} + offset {offset:#x} overflows")]
    AddressOverflow {
        /// The ring base address.
        base: u64,
        /// The offset that was added to it.
        offset: u64,
    },
    /// The available ring's index is more than the queue size ahead of the device's next
    /// index: no chain can be popped (a broken or hostile driver).
    #[error(
        "the available index is more than the queue size ahead of the device's ({next_avail})"
    )]
    InvalidAvailIndex {
        /// The device's next available index.
        next_avail: u16,
    },
    /// The inflight area's contents for this ring cannot be right (see
    /// [`InflightError`](crate::InflightError)).
    #[error("inflight area refused: {0}")]
    Inflight(#[from] crate::inflight::InflightError),
    /// A packed ring's descriptor could not be read or written: the descriptor ring is not
    /// (wholly) in guest memory.
    #[error("packed ring entry {index} is not in guest memory")]
    PackedRingAccess {
        /// The ring position whose descriptor could not be accessed.
        index: u16,
    },
    /// A packed ring's chain is malformed: a descriptor of it is not available, or it never
    /// ends within the ring. The ring stays at the chain's head.
    #[error("packed ring chain at position {head} refused: {reason}")]
    PackedChain {
        /// The ring position of the chain's first descriptor.
        head: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A packed ring's next available or used position (bits 0-14, wrap counter in bit 15)
    /// is past the ring.
    #[error("packed ring positions avail {avail:#x}, used {used:#x} do not fit a ring of {size}")]
    PackedPosition {
        /// The next available position word.
        avail: u16,
        /// The next used position word.
        used: u16,
        /// The queue size.
        size: u16,
    },
    /// A vhost-user ring base (`SET_VRING_BASE`) does not fit the ring layout: above
    /// `u16::MAX` for a split ring.
    #[error("ring base {num:#x} does not fit a split ring")]
    InvalidVringBase {
        /// The refused base.
        num: u32,
    },
    /// The operation exists for split rings only (virtio-queue's `DescriptorChain` and
    /// used-ring calls); a packed ring is served through `serve_available`.
    #[error("{operation} is not available on a packed ring: serve it with serve_available")]
    SplitOnly {
        /// The refused operation.
        operation: &'static str,
    },
    /// Behind an IOMMU (`VIRTIO_F_ACCESS_PLATFORM`), a part of the ring could not be
    /// translated from its IOVA into one contiguous guest range: unmapped after the miss was
    /// answered (or not answered in time), not allowed, or split across guest memory.
    #[error("{part} not translatable through the IOMMU: {source}")]
    Iommu {
        /// The part of the ring.
        part: RingPart,
        /// Why.
        #[source]
        source: crate::iommu::IommuError,
    },
    /// Behind an IOMMU, a translation the ring or a chain needs is not in the IOTLB: the
    /// chain was put back (nothing of it served), and the frontend must be asked, without
    /// the ring's lock ([`process_queue`](crate::process_queue) does this and serves again).
    #[error("IOTLB miss at IOVA {iova:#x} ({access:?}): the frontend must be asked")]
    IommuMiss {
        /// The IOVA missed.
        iova: u64,
        /// The access asked for.
        access: vm_memory::Permissions,
    },
    /// Behind an IOMMU, the ring was read before its addresses were translated (the worker
    /// translates them when it first serves the ring after `SET_VRING_ADDR` or an
    /// invalidation), or before `SET_VRING_ADDR` gave them.
    #[error("the ring's addresses are not translated through the IOMMU yet")]
    RingNotTranslated,
    /// Writing the call eventfd failed.
    #[error("signalling the call eventfd failed: {0}")]
    Io(#[from] io::Error),
}
