//! The memory requests: the memory table (`SET_MEM_TABLE`, `ADD_MEM_REG`, `REM_MEM_REG`,
//! `GET_MAX_MEM_SLOTS`), the dirty log (`SET_LOG_BASE`, `SET_LOG_FD`) and the inflight
//! area (`GET_INFLIGHT_FD`, `SET_INFLIGHT_FD`).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
#[cfg(feature = "xen")]
use vu_mem::XenMapping;
use vu_mem::{RegionBitmap, RegionSpec};
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::header::Header;
use vu_proto::payload::{Empty, Inflight, Log, MemoryRegion, MemoryTable};
use vu_proto::request::FrontendReq;
use vu_vring::VringT;

use super::{Reply, Session};
use crate::backend::VhostUserBackend;
use crate::error::SessionError;

/// The inflight area of a connection: the shared buffer, mapped, and how it was described.
///
/// The session keeps it for the connection's lifetime; each ring takes its region when it
/// starts (`VringData::restart`), and records into it from then on.
#[derive(Debug)]
pub(crate) struct InflightArea {
    /// The buffer (a memfd the session created, or the frontend's fd).
    file: File,
    /// The mapping of its layout.
    area: vu_vring::InflightArea,
    /// Its description (size, offset, queues, queue size).
    desc: Inflight,
}

impl InflightArea {
    /// The buffer's fd.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Its description.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn desc(&self) -> Inflight {
        self.desc
    }

    /// The mapped area.
    pub(crate) fn area(&self) -> &vu_vring::InflightArea {
        &self.area
    }
}

/// The bytes the spec's inflight layout needs for `num_queues` queues of `queue_size`
/// descriptors (64-byte aligned regions, as libvhost-user lays them out).
pub(crate) use vu_vring::inflight::area_size as inflight_size;

/// A memfd of `size` zero bytes, close-on-exec, sealed against shrinking and growing.
fn inflight_memfd(size: u64) -> std::io::Result<File> {
    crate::sys::memfd(c"vu-inflight", size, true)
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

    /// Tells the backend the table changed; the vrings share the same memory handle. The
    /// IOTLB, which maps IOVAs to guest addresses found in the old table, is emptied: what is
    /// still mapped comes back as misses the frontend answers.
    pub(super) fn memory_changed(&mut self, request: FrontendReq) -> Result<(), SessionError> {
        self.iommu.iotlb.clear();
        self.backend
            .update_memory(self.mem.memory().clone())
            .map_err(|source| SessionError::Backend { request, source })
    }

    /// `VHOST_USER_SET_MEM_TABLE`: replaces the memory table (while postcopy listens: registers it
    /// and answers with our mapping addresses) and tells the backend.
    pub(super) fn handle_set_mem_table(
        &mut self,
        #[cfg_attr(not(feature = "postcopy"), allow(unused_variables))] hdr: &Header,
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
        #[cfg(feature = "postcopy")]
        if self.postcopy.listening() {
            let pending = self
                .mem
                .prepare_table(specs)
                .map_err(|source| SessionError::Memory { request, source })?;
            return self.postcopy_register(hdr, request, &table.regions, pending);
        }
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
        Ok(None)
    }

    /// `VHOST_USER_ADD_MEM_REG`: adds one region to the table (`CONFIGURE_MEM_SLOTS`) and tells the
    /// backend.
    pub(super) fn handle_add_mem_reg(
        &mut self,
        #[cfg_attr(not(feature = "postcopy"), allow(unused_variables))] hdr: &Header,
        region: MemoryRegion,
        fd: OwnedFd,
    ) -> Result<Option<Reply>, SessionError> {
        let request = FrontendReq::AddMemReg;
        self.require(request, ProtocolFeatures::CONFIGURE_MEM_SLOTS)?;
        self.require_xen_mmap(request)?;
        #[cfg(feature = "postcopy")]
        if self.postcopy.listening() {
            let pending = self
                .mem
                .prepare_add_region(self.pending_table.as_ref(), region_spec(&region, fd))
                .map_err(|source| SessionError::Memory { request, source })?;
            return self.postcopy_register(hdr, request, &[region], pending);
        }
        self.mem
            .add_region(region_spec(&region, fd))
            .map_err(|source| SessionError::Memory { request, source })?;
        self.memory_changed(request)?;
        Ok(None)
    }

    /// `VHOST_USER_REM_MEM_REG`: removes one region from the table (`CONFIGURE_MEM_SLOTS`) and
    /// tells the backend.
    pub(super) fn handle_rem_mem_reg(&mut self, region: MemoryRegion) -> Result<(), SessionError> {
        let request = FrontendReq::RemMemReg;
        self.require(request, ProtocolFeatures::CONFIGURE_MEM_SLOTS)?;
        self.mem
            .remove_region(region.guest_phys_addr, region.memory_size, region.user_addr)
            .map_err(|source| SessionError::Memory { request, source })?;
        self.memory_changed(request)
    }

    /// `VHOST_USER_GET_MAX_MEM_SLOTS`: how many regions the table holds at most
    /// (`CONFIGURE_MEM_SLOTS`).
    pub(super) fn handle_get_max_mem_slots(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        self.require(
            FrontendReq::GetMaxMemSlots,
            ProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )?;
        Ok(Reply::u64(hdr, u64::from(self.mem.slot_limit())))
    }

    /// `VHOST_USER_SET_LOG_BASE`: maps the dirty log (`LOG_SHMFD`) and answers, as QEMU waits for
    /// it.
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
        // A reply is due "if `VHOST_USER_PROTOCOL_F_LOG_SHMFD`", and its "reply payload" is
        // "N/A": a header with no body. QEMU reads a reply of any size and checks only its
        // request code (`vhost_user_set_log_base`); rust-vmm's frontend waits for its own
        // 16-byte log description echoed instead (docs/conformance.md).
        Ok(Some(Reply::new(hdr, &Empty, Vec::new())))
    }

    /// `VHOST_USER_SET_LOG_FD`: the eventfd written when the log changed, made non-blocking.
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

    /// The inflight region of `queue`, when `INFLIGHT_SHMFD` was negotiated and the
    /// frontend gave an area that covers the queue.
    pub(super) fn inflight_queue(&self, queue: u16) -> Option<vu_vring::InflightQueue> {
        if !self
            .acked_protocol
            .contains(ProtocolFeatures::INFLIGHT_SHMFD)
        {
            return None;
        }
        self.inflight.as_ref()?.area().queue(queue)
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

    /// `VHOST_USER_GET_INFLIGHT_FD`: creates and maps a zeroed inflight area for the described
    /// queues (`INFLIGHT_SHMFD`, docs/inflight.md) and answers with its fd.
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
        let ours = file
            .try_clone()
            .map_err(io_err("duplicating the inflight memfd"))?;
        let area = vu_vring::InflightArea::map(ours, 0, size, desc.num_queues, desc.queue_size)
            .map_err(|source| SessionError::Inflight { request, source })?;
        let desc = Inflight {
            mmap_size: size,
            mmap_offset: 0,
            ..desc
        };
        self.inflight = Some(InflightArea { file, area, desc });
        Ok(Reply::new(hdr, &desc, vec![theirs]))
    }

    /// `VHOST_USER_SET_INFLIGHT_FD`: maps the frontend's inflight area after a restart, checked
    /// against the described queues (`INFLIGHT_SHMFD`, docs/inflight.md).
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
        let mapped = file.try_clone().map_err(|source| SessionError::Io {
            request,
            what: "duplicating the inflight fd",
            source,
        })?;
        let area = vu_vring::InflightArea::map(
            mapped,
            desc.mmap_offset,
            needed,
            desc.num_queues,
            desc.queue_size,
        )
        .map_err(|source| SessionError::Inflight { request, source })?;
        self.inflight = Some(InflightArea { file, area, desc });
        Ok(())
    }
}
