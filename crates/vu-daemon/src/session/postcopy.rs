//! The postcopy requests (feature `postcopy`): `POSTCOPY_ADVISE`, `POSTCOPY_LISTEN`,
//! `POSTCOPY_END`, and the memory table replies while listening.

use std::os::fd::OwnedFd;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vu_mem::{PendingTable, RegionBitmap};
use vu_proto::features::ProtocolFeatures;
use vu_proto::header::Header;
use vu_proto::message::RawMessage;
use vu_proto::payload::{Empty, MemoryRegion, MemoryTable, SingleMemoryRegion, U64};
use vu_proto::request::FrontendReq;
use vu_vring::VringT;

use super::{Reply, Session};
use crate::backend::VhostUserBackend;
use crate::error::SessionError;

/// The body of QEMU's acknowledgement of a postcopy memory table reply: one `u64`.
const ACK_BODY: usize = 8;

impl<S, V, B> Session<S, V, B>
where
    S: VhostUserBackend<Vring = V, Bitmap = B>,
    V: VringT<GuestMemoryAtomic<GuestMemoryMmap<B>>>,
    B: RegionBitmap,
{
    /// QEMU answers a postcopy `SET_MEM_TABLE` reply with a `SET_MEM_TABLE` carrying a `u64`
    /// 0 and no fds; that message is consumed here, it is not a new table. With
    /// CONFIGURE_MEM_SLOTS it sends the regions as `ADD_MEM_REG`s instead and, after reading
    /// every region reply, the same acknowledgement under the last request code it used,
    /// `ADD_MEM_REG` (libvhost-user's `vu_add_mem_reg` expects it too). QEMU sets no
    /// NEED_REPLY on either and reads nothing after it; a frontend that does set it gets the
    /// REPLY_ACK it asked for from the caller.
    pub(super) fn is_postcopy_mem_table_ack(&mut self, msg: &RawMessage) -> bool {
        let table_request = msg.header.request == FrontendReq::SetMemTable.into()
            || msg.header.request == FrontendReq::AddMemReg.into();
        table_request
            && msg.body.len() == ACK_BODY
            && msg.fds.is_empty()
            && self.postcopy.take_ack()
    }

    fn postcopy_err(
        request: FrontendReq,
    ) -> impl Fn(crate::postcopy::PostcopyError) -> SessionError {
        move |source| SessionError::Postcopy { request, source }
    }

    /// `VHOST_USER_POSTCOPY_ADVISE`: opens the userfaultfd and answers with it (`PAGEFAULT`).
    pub(super) fn handle_postcopy_advise(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        let request = FrontendReq::PostcopyAdvise;
        self.require(request, ProtocolFeatures::PAGEFAULT)?;
        let fd: OwnedFd = self
            .postcopy
            .advise()
            .map_err(Self::postcopy_err(request))?;
        log::info!("postcopy: userfaultfd opened and sent to the frontend");
        Ok(Reply::new(hdr, &Empty, vec![fd]))
    }

    /// `VHOST_USER_POSTCOPY_LISTEN`.
    ///
    /// "The back-end must ensure that shared memory is registered with userfaultfd": memory
    /// mapped before LISTEN was not registered, and QEMU never learned its local base to
    /// resolve faults, so LISTEN with a table in place is refused (as libvhost-user does).
    /// QEMU sends the destination's table only after LISTEN.
    pub(super) fn handle_postcopy_listen(&mut self) -> Result<(), SessionError> {
        let request = FrontendReq::PostcopyListen;
        self.require(request, ProtocolFeatures::PAGEFAULT)?;
        if self.mem.num_regions() > 0 {
            return Err(Self::postcopy_err(request)(
                crate::postcopy::PostcopyError::State(
                    "POSTCOPY_LISTEN with guest memory already mapped, which was never \
                     registered with the userfaultfd",
                ),
            ));
        }
        self.postcopy
            .listen()
            .map_err(Self::postcopy_err(request))?;
        log::info!("postcopy: listening (new memory is registered with the userfaultfd)");
        Ok(())
    }

    /// `VHOST_USER_POSTCOPY_END`: closes the userfaultfd and answers (`PAGEFAULT`).
    pub(super) fn handle_postcopy_end(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        let request = FrontendReq::PostcopyEnd;
        self.require(request, ProtocolFeatures::PAGEFAULT)?;
        let mappings = self.postcopy.end().map_err(Self::postcopy_err(request))?;
        log::info!("postcopy: end, {mappings} mapping(s) unregistered, userfaultfd closed");
        Ok(Reply::u64(hdr, U64::ACK_SUCCESS.0))
    }

    /// While listening: registers the new regions of `pending` with the userfaultfd and
    /// answers with the same regions, their user address replaced by the backend's own
    /// mapping address ("replies with the bases of the memory mapped regions to the
    /// front-end"). The table is not published yet: "The back-end must have mmap'd the
    /// regions but not yet accessed them", and "only upon reception of [QEMU's
    /// acknowledgement] may the guest start accessing the memory and generating faults",
    /// which QEMU can resolve only once it knows these addresses. The device gets the table
    /// with that acknowledgement ([`publish_pending_table`](Self::publish_pending_table)).
    pub(super) fn postcopy_register(
        &mut self,
        hdr: &Header,
        request: FrontendReq,
        regions: &[MemoryRegion],
        pending: PendingTable<B>,
    ) -> Result<Option<Reply>, SessionError> {
        let mut local = Vec::with_capacity(regions.len());
        for region in regions {
            let (addr, len) = pending.host_range(region.guest_phys_addr).ok_or(
                SessionError::ValueOutOfRange {
                    request,
                    field: "region guest address (not mapped)",
                    value: region.guest_phys_addr,
                },
            )?;
            self.postcopy
                .register(addr, len)
                .map_err(Self::postcopy_err(request))?;
            local.push(MemoryRegion {
                user_addr: addr as u64,
                ..*region
            });
        }
        let reply = if request == FrontendReq::AddMemReg {
            let Some(region) = local.first().copied() else {
                return Ok(None);
            };
            Reply::new(hdr, &SingleMemoryRegion { region }, Vec::new())
        } else {
            Reply::new(hdr, &MemoryTable { regions: local }, Vec::new())
        };
        self.pending_table = Some(pending);
        self.postcopy.expect_ack();
        Ok(Some(reply))
    }

    /// QEMU acknowledged the table reply: the registered table becomes the device's.
    pub(super) fn publish_pending_table(&mut self) -> Result<(), SessionError> {
        let request = FrontendReq::SetMemTable;
        let Some(pending) = self.pending_table.take() else {
            return Ok(());
        };
        let regions = pending.num_regions();
        self.mem
            .publish(pending)
            .map_err(|source| SessionError::Memory { request, source })?;
        log::info!("postcopy: memory table acknowledged, {regions} region(s) published");
        self.memory_changed(request)
    }
}
