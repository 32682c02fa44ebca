//! The memory requests: the memory table (`SET_MEM_TABLE`, `ADD_MEM_REG`, `REM_MEM_REG`,
//! `GET_MAX_MEM_SLOTS`), the dirty log (`SET_LOG_BASE`, `SET_LOG_FD`) and the inflight
//! area (`GET_INFLIGHT_FD`, `SET_INFLIGHT_FD`).

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
#[cfg(feature = "xen")]
use vu_mem::XenMapping;
use vu_mem::{RegionBitmap, RegionSpec};
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::header::Header;
use vu_proto::payload::{Inflight, Log, MemoryRegion, MemoryTable, U64};
use vu_proto::request::FrontendReq;
use vu_vring::VringT;

use super::{Reply, Session};
use crate::backend::VhostUserBackend;
use crate::error::SessionError;

/// The inflight area of a connection: the shared buffer and how it was described.
///
/// The session keeps it for the connection's lifetime, so a reconnecting frontend's
/// `SET_INFLIGHT_FD` finds the same buffer; no backend hook reads it yet (only the tests).
#[derive(Debug)]
#[cfg_attr(any(not(test), feature = "xen"), allow(dead_code))]
pub(crate) struct InflightArea {
    /// The buffer (a memfd the session created, or the frontend's fd).
    file: File,
    /// Its description (size, offset, queues, queue size).
    desc: Inflight,
}

#[cfg_attr(any(not(test), feature = "xen"), allow(dead_code))]
impl InflightArea {
    /// The buffer's fd.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Its description.
    pub(crate) fn desc(&self) -> Inflight {
        self.desc
    }
}

/// The spec's `QueueRegionSplit` header: features (8), version, desc_num, last_batch_head,
/// used_idx (2 each).
const SPLIT_HEADER: u64 = 16;
/// The spec's `DescStateSplit`: inflight (1), padding (5), next (2), counter (8).
const SPLIT_DESC: u64 = 16;
/// The spec's `QueueRegionPacked` header (29 bytes of fields padded to 8-byte alignment).
const PACKED_HEADER: u64 = 32;
/// The spec's `DescStatePacked`: 1 + 1 + 2 + 2 + 2 + 8 + 2 + 2 + 4 + 8 bytes.
const PACKED_DESC: u64 = 32;
/// Each queue's region starts on a 64-byte boundary (as libvhost-user lays it out).
const QUEUE_REGION_ALIGN: u64 = 64;

/// The bytes the spec's inflight layout needs for `num_queues` queues of `queue_size`
/// descriptors. Cannot overflow: both counts are 16-bit.
pub(crate) fn inflight_size(num_queues: u16, queue_size: u16, packed: bool) -> u64 {
    let (header, desc) = if packed {
        (PACKED_HEADER, PACKED_DESC)
    } else {
        (SPLIT_HEADER, SPLIT_DESC)
    };
    let per_queue = (header + desc * u64::from(queue_size)).next_multiple_of(QUEUE_REGION_ALIGN);
    per_queue * u64::from(num_queues)
}

/// A memfd of `size` zero bytes, close-on-exec, sealed against shrinking and growing.
fn inflight_memfd(size: u64) -> std::io::Result<File> {
    const NAME: &CStr = c"vu-inflight";
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: NAME is a valid NUL-terminated string; memfd_create keeps no pointer to it.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is valid and owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int argument; the fd is the memfd owned by `file`.
    if unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// The region as vu-mem takes it, with its fd.
fn region_spec(region: &MemoryRegion, fd: OwnedFd) -> RegionSpec {
    let spec = RegionSpec::new(
        region.guest_phys_addr,
        region.memory_size,
        region.user_addr,
        region.mmap_offset,
        File::from(fd),
    );
    #[cfg(feature = "xen")]
    let spec = spec.with_xen(XenMapping {
        mmap_flags: region.xen_mmap_flags.bits(),
        mmap_data: region.xen_mmap_data,
    });
    spec
}

impl<S, V, B> Session<S, V, B>
where
    S: VhostUserBackend<Vring = V, Bitmap = B>,
    V: VringT<GuestMemoryAtomic<GuestMemoryMmap<B>>>,
    B: RegionBitmap,
{
    /// With `xen` the codec reads every memory region with the Xen fields, which "the memory
    /// region description contains ... when the `VHOST_USER_PROTOCOL_F_XEN_MMAP` protocol
    /// feature has been successfully negotiated": a table from a frontend that did not
    /// acknowledge it is refused rather than misread. XEN_MMAP is always offered by a `xen`
    /// build (`offer.rs`).
    #[cfg(feature = "xen")]
    fn require_xen_mmap(&self, request: FrontendReq) -> Result<(), SessionError> {
        self.require(request, ProtocolFeatures::XEN_MMAP)
    }

    /// Without `xen` the regions have no Xen fields; nothing to check.
    #[cfg(not(feature = "xen"))]
    fn require_xen_mmap(&self, _request: FrontendReq) -> Result<(), SessionError> {
        Ok(())
    }

    /// Tells the backend the table changed; the vrings share the same memory handle.
    fn memory_changed(&mut self, request: FrontendReq) -> Result<(), SessionError> {
        self.backend
            .update_memory(self.mem.memory().clone())
            .map_err(|source| SessionError::Backend { request, source })
    }

    pub(super) fn handle_set_mem_table(
        &mut self,
        hdr: &Header,
        table: MemoryTable,
        fds: Vec<OwnedFd>,
    ) -> Result<Option<Reply>, SessionError> {
        let request = FrontendReq::SetMemTable;
        self.require_xen_mmap(request)?;
        let specs = table
            .regions
            .iter()
            .zip(fds)
            .map(|(region, fd)| region_spec(region, fd))
            .collect();
        self.mem
            .set_table(specs)
            .map_err(|source| SessionError::Memory { request, source })?;
        log::info!(
            "memory table: {} region(s), {} bytes",
            table.regions.len(),
            table
                .regions
                .iter()
                .fold(0u64, |sum, r| sum.saturating_add(r.memory_size))
        );
        self.memory_changed(request)?;
        self.postcopy_register(hdr, request, &table.regions)
    }

    pub(super) fn handle_add_mem_reg(
        &mut self,
        hdr: &Header,
        region: MemoryRegion,
        fd: OwnedFd,
    ) -> Result<Option<Reply>, SessionError> {
        let request = FrontendReq::AddMemReg;
        self.require(request, ProtocolFeatures::CONFIGURE_MEM_SLOTS)?;
        self.require_xen_mmap(request)?;
        self.mem
            .add_region(region_spec(&region, fd))
            .map_err(|source| SessionError::Memory { request, source })?;
        self.memory_changed(request)?;
        self.postcopy_register(hdr, request, &[region])
    }

    pub(super) fn handle_rem_mem_reg(&mut self, region: MemoryRegion) -> Result<(), SessionError> {
        let request = FrontendReq::RemMemReg;
        self.require(request, ProtocolFeatures::CONFIGURE_MEM_SLOTS)?;
        self.mem
            .remove_region(region.guest_phys_addr, region.memory_size, region.user_addr)
            .map_err(|source| SessionError::Memory { request, source })?;
        self.memory_changed(request)
    }

    pub(super) fn handle_get_max_mem_slots(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        self.require(
            FrontendReq::GetMaxMemSlots,
            ProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )?;
        Ok(Reply::u64(hdr, u64::from(self.mem.slot_limit())))
    }

    pub(super) fn handle_set_log_base(
        &mut self,
        hdr: &Header,
        log: Log,
        fd: OwnedFd,
    ) -> Result<Option<Reply>, SessionError> {
        let request = FrontendReq::SetLogBase;
        self.require(request, ProtocolFeatures::LOG_SHMFD)?;
        self.mem
            .set_log_base(&fd, log.mmap_size, log.mmap_offset)
            .map_err(|source| SessionError::Memory { request, source })?;
        Ok(Some(Reply::u64(hdr, U64::ACK_SUCCESS.0)))
    }

    pub(super) fn handle_set_log_fd(&mut self, fd: OwnedFd) -> Result<(), SessionError> {
        // A blocking eventfd whose counter the frontend filled would block the device's
        // "log changed" write forever.
        super::vring::set_nonblocking(&fd).map_err(|source| SessionError::Io {
            request: FrontendReq::SetLogFd,
            what: "making the log eventfd non-blocking",
            source,
        })?;
        self.mem.set_log_fd(Some(File::from(fd)));
        Ok(())
    }

    /// Refuses an inflight description for more queues, or larger queues, than the device
    /// has; returns the size its layout needs.
    fn inflight_needs(&self, request: FrontendReq, desc: &Inflight) -> Result<u64, SessionError> {
        self.require(request, ProtocolFeatures::INFLIGHT_SHMFD)?;
        let max_queues = self.vrings.len();
        let max_size = self.backend.max_queue_size();
        if desc.num_queues == 0
            || usize::from(desc.num_queues) > max_queues
            || desc.queue_size == 0
            || usize::from(desc.queue_size) > max_size
        {
            return Err(SessionError::InflightRange {
                num_queues: desc.num_queues,
                queue_size: desc.queue_size,
                max_queues,
                max_size,
            });
        }
        let packed = self.acked_features & VirtioFeatures::RING_PACKED.bits() != 0;
        Ok(inflight_size(desc.num_queues, desc.queue_size, packed))
    }

    pub(super) fn handle_get_inflight_fd(
        &mut self,
        hdr: &Header,
        desc: Inflight,
    ) -> Result<Reply, SessionError> {
        let request = FrontendReq::GetInflightFd;
        let size = self.inflight_needs(request, &desc)?;
        let io_err = |what| {
            move |source| SessionError::Io {
                request,
                what,
                source,
            }
        };
        let file = inflight_memfd(size).map_err(io_err("creating the inflight memfd"))?;
        let theirs = file
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err("duplicating the inflight memfd"))?;
        let desc = Inflight {
            mmap_size: size,
            mmap_offset: 0,
            ..desc
        };
        self.inflight = Some(InflightArea { file, desc });
        Ok(Reply::new(hdr, &desc, vec![theirs]))
    }

    pub(super) fn handle_set_inflight_fd(
        &mut self,
        desc: Inflight,
        fd: OwnedFd,
    ) -> Result<(), SessionError> {
        let request = FrontendReq::SetInflightFd;
        let needed = self.inflight_needs(request, &desc)?;
        let file = File::from(fd);
        let available = file
            .metadata()
            .map_err(|source| SessionError::Io {
                request,
                what: "reading the inflight fd's size",
                source,
            })?
            .len()
            .saturating_sub(desc.mmap_offset)
            .min(desc.mmap_size);
        if available < needed {
            return Err(SessionError::InflightTooSmall {
                size: available,
                needed,
            });
        }
        self.inflight = Some(InflightArea { file, desc });
        Ok(())
    }

    /// Without postcopy there is nothing to register and no reply of its own.
    #[cfg(not(feature = "postcopy"))]
    fn postcopy_register(
        &mut self,
        _hdr: &Header,
        _request: FrontendReq,
        _regions: &[MemoryRegion],
    ) -> Result<Option<Reply>, SessionError> {
        Ok(None)
    }
}
