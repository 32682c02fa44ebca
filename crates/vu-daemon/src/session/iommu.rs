//! `VHOST_USER_IOTLB_MSG`: the device IOTLB of a backend behind a virtual IOMMU.
//!
//! The spec: "When the `VIRTIO_F_IOMMU_PLATFORM` feature has been negotiated, the front-end
//! sends IOTLB entries update & invalidation by sending `VHOST_USER_IOTLB_MSG` requests";
//! "Addresses and size must be within vhost memory regions set via the
//! `VHOST_USER_SET_MEM_TABLE` request"; "The back-end has to acknowledge the request with
//! sending zero as `u64` payload for success, non-zero otherwise" (the REPLY_ACK the session
//! adds to every accepted request with NEED_REPLY).
//!
//! The request is accepted only with `VIRTIO_F_ACCESS_PLATFORM` acknowledged and with
//! BACKEND_REQ and REPLY_ACK, the protocol features QEMU requires for a vhost-user device
//! behind an IOMMU ("IOMMU support requires reply-ack and backend-req protocol features"):
//! misses go to the frontend over the backend channel. Otherwise it is refused as before.
//! The table lives in a [`SharedIotlb`](vu_mem::SharedIotlb); ring accesses do not translate
//! through it yet, which is why the offer table still masks ACCESS_PLATFORM.

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap, Permissions};
use vu_mem::RegionBitmap;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::payload::{Iotlb, IotlbPerm, IotlbType};
use vu_proto::request::FrontendReq;
use vu_vring::VringT;

use super::{unsupported, Session};
use crate::backend::VhostUserBackend;
use crate::error::SessionError;

/// The request this module handles.
const REQ: FrontendReq = FrontendReq::IotlbMsg;

impl<S, V, B> Session<S, V, B>
where
    S: VhostUserBackend<Vring = V, Bitmap = B>,
    V: VringT<GuestMemoryAtomic<GuestMemoryMmap<B>>>,
    B: RegionBitmap,
{
    /// `VHOST_USER_IOTLB_MSG`: an update (checked against the memory table) or an invalidation.
    pub(super) fn handle_iotlb_msg(&mut self, msg: Iotlb) -> Result<(), SessionError> {
        if self.acked_features & VirtioFeatures::ACCESS_PLATFORM.bits() == 0 {
            return Err(unsupported(
                REQ,
                "VIRTIO_F_ACCESS_PLATFORM is not negotiated",
            ));
        }
        self.require(REQ, ProtocolFeatures::BACKEND_REQ)?;
        self.require(REQ, ProtocolFeatures::REPLY_ACK)?;
        let iotlb = |source| SessionError::Iotlb {
            request: REQ,
            source,
        };
        match msg.kind {
            IotlbType::Update => {
                self.mem
                    .vmm_to_guest(msg.uaddr, msg.size)
                    .map_err(|source| SessionError::Memory {
                        request: REQ,
                        source,
                    })?;
                self.iotlb
                    .update(msg.iova, msg.size, msg.uaddr, permissions(msg.perm))
                    .map_err(iotlb)
            }
            IotlbType::Invalidate => self.iotlb.invalidate(msg.iova, msg.size).map_err(iotlb),
            IotlbType::Miss | IotlbType::AccessFail => Err(unsupported(
                REQ,
                "misses and access failures go from the back-end to the front-end",
            )),
        }
    }
}

/// The wire permissions as vm-memory's.
fn permissions(perm: IotlbPerm) -> Permissions {
    match perm {
        IotlbPerm::None => Permissions::No,
        IotlbPerm::Read => Permissions::Read,
        IotlbPerm::Write => Permissions::Write,
        IotlbPerm::ReadWrite => Permissions::ReadWrite,
    }
}
