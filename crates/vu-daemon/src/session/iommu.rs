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
//!
//! An update's user address is taken to its guest address as it arrives (it must lie in one
//! memory region, so the whole range is contiguous there), and the table
//! ([`SharedIotlb`]) maps IOVAs to guest addresses; it is emptied when the memory table
//! changes. [`SessionIommu`] is the table as the rings see it ([`vu_vring::Iommu`]): the
//! session installs it in every ring at `SET_FEATURES` when ACCESS_PLATFORM is acked, and the
//! workers translate through it, sending the miss over the backend channel and waiting (at
//! most [`MISS_TIMEOUT`]) for the update, which this connection thread receives.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, Permissions};
use vu_mem::{IotlbFault, IotlbMapping, RegionBitmap, ResolveError, SharedIotlb};
use vu_proto::backend::BackendChannel;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::payload::{Iotlb, IotlbPerm, IotlbType};
use vu_proto::request::FrontendReq;
use vu_vring::{Iommu, IommuError, VringT};

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
                let guest = self
                    .mem
                    .vmm_to_guest(msg.uaddr, msg.size)
                    .map_err(|source| SessionError::Memory {
                        request: REQ,
                        source,
                    })?;
                self.iommu
                    .iotlb
                    .update(msg.iova, msg.size, guest.0, permissions(msg.perm))
                    .map_err(iotlb)
            }
            IotlbType::Invalidate => {
                self.iommu
                    .iotlb
                    .invalidate(msg.iova, msg.size)
                    .map_err(iotlb)?;
                self.quiesce_translations();
                Ok(())
            }
            IotlbType::Miss | IotlbType::AccessFail => Err(unsupported(
                REQ,
                "misses and access failures go from the back-end to the front-end",
            )),
        }
    }
}

impl<S, V, B> Session<S, V, B>
where
    S: VhostUserBackend<Vring = V, Bitmap = B>,
    V: VringT<GuestMemoryAtomic<GuestMemoryMmap<B>>>,
    B: RegionBitmap,
{
    /// After an invalidation, before its acknowledgement: waits until nothing can still
    /// reach guest memory through a translation made before it (the frontend may reuse the
    /// IOVA or the page once it has the ack).
    ///
    /// - What a vring does under its lock (a pass with the chains it serves at once, a
    ///   completion, a notification decision) ends: each ring's lock is taken once. What
    ///   comes after translates again (the IOMMU's generation changed). No thread waits
    ///   for the frontend under a ring's lock (misses are asked without it, see
    ///   [`vu_vring::Iommu::translate_now`]), so this cannot wait for the frontend, which is
    ///   itself waiting for this ack.
    /// - Chains a device took for later with older translations: their completion, at most
    ///   [`HOLD_TIMEOUT`].
    fn quiesce_translations(&self) {
        let generation = self.iommu.iotlb.generation();
        for vring in &self.vrings {
            drop(vring.get_mut());
        }
        if let Err(held) = self.iommu.wait_for_holds_before(generation, HOLD_TIMEOUT) {
            log::error!(
                "IOTLB invalidation acknowledged while {held} chain(s) taken before it are \
                 still not completed after {HOLD_TIMEOUT:?}: they may still use the old \
                 translations"
            );
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

/// How long a worker waits for the frontend's answer to an IOTLB miss before it gives up on
/// the access (the chain, or the ring's pass). QEMU answers from its main loop, in well under
/// a millisecond when idle.
pub(crate) const MISS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the acknowledgement of an invalidation waits for the chains a device took for
/// later, with translations from before it, to be completed (their I/O to finish).
pub(crate) const HOLD_TIMEOUT: Duration = Duration::from_secs(10);

/// The holds of chains taken for later ([`vu_vring::Iommu::hold`]): how many per IOMMU
/// generation.
#[derive(Debug, Default)]
struct Holds {
    by_generation: BTreeMap<u64, usize>,
    /// Threads waiting in [`SessionIommu::wait_for_holds_before`] (seen by tests).
    waiting: usize,
}

/// The device IOTLB of a connection as its rings translate through it: IOVAs to guest
/// addresses, misses asked over the backend channel.
#[derive(Debug)]
pub(crate) struct SessionIommu {
    /// IOVAs to guest addresses, filled by `IOTLB_MSG`.
    pub(crate) iotlb: SharedIotlb,
    /// Where misses go (`SET_BACKEND_REQ_FD`).
    channel: Mutex<Option<BackendChannel>>,
    /// How long an access waits for a miss to be answered.
    timeout: Duration,
    /// Chains taken for later and the generation of their translations.
    holds: Mutex<Holds>,
    /// Signalled when a hold ends, or a thread starts waiting for them.
    holds_changed: Condvar,
}

impl SessionIommu {
    /// An empty IOTLB, no channel yet, misses waited for at most `timeout`.
    pub(crate) fn new(timeout: Duration) -> Self {
        SessionIommu {
            iotlb: SharedIotlb::default(),
            channel: Mutex::new(None),
            timeout,
            holds: Mutex::default(),
            holds_changed: Condvar::new(),
        }
    }

    fn holds(&self) -> MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no chain holds translations of a generation before `generation`, at
    /// most `timeout`; `Err` with how many still do then.
    pub(crate) fn wait_for_holds_before(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> Result<(), usize> {
        let older = |holds: &Holds| -> usize {
            holds
                .by_generation
                .range(..generation)
                .map(|(_, n)| n)
                .sum()
        };
        let mut holds = self.holds();
        if older(&holds) == 0 {
            return Ok(());
        }
        holds.waiting += 1;
        self.holds_changed.notify_all();
        let (mut holds, _) = self
            .holds_changed
            .wait_timeout_while(holds, timeout, |h| older(h) > 0)
            .unwrap_or_else(PoisonError::into_inner);
        holds.waiting -= 1;
        match older(&holds) {
            0 => Ok(()),
            held => Err(held),
        }
    }

    /// Waits until a thread waits in [`wait_for_holds_before`](Self::wait_for_holds_before),
    /// at most `timeout`; whether one does.
    #[cfg(all(test, not(feature = "xen")))]
    pub(crate) fn wait_for_a_waiter(&self, timeout: Duration) -> bool {
        let holds = self.holds();
        let (holds, _) = self
            .holds_changed
            .wait_timeout_while(holds, timeout, |h| h.waiting == 0)
            .unwrap_or_else(PoisonError::into_inner);
        holds.waiting > 0
    }

    /// Sets (or removes) the backend channel misses are sent on.
    pub(crate) fn set_channel(&self, channel: Option<BackendChannel>) {
        *self.channel.lock().unwrap_or_else(PoisonError::into_inner) = channel;
    }

    /// Sends the miss of `iova` for `access`; `false` when there is no channel or the send
    /// failed (logged).
    fn ask(&self, iova: u64, access: Permissions) -> bool {
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(channel) = channel else {
            log::warn!("IOTLB miss at IOVA {iova:#x}: no backend channel to ask the frontend");
            return false;
        };
        let perm = if access.allow(Permissions::Write) {
            if access.allow(Permissions::Read) {
                IotlbPerm::ReadWrite
            } else {
                IotlbPerm::Write
            }
        } else {
            IotlbPerm::Read
        };
        match channel.iotlb_miss(iova, perm) {
            Ok(()) => true,
            Err(err) => {
                log::warn!("IOTLB miss at IOVA {iova:#x} not sent: {err}");
                false
            }
        }
    }
}

impl Iommu for SessionIommu {
    fn generation(&self) -> u64 {
        self.iotlb.generation()
    }

    fn translate_now(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(GuestAddress, u64), IommuError> {
        let pieces =
            self.iotlb
                .lock()
                .translate(iova, len, access)
                .map_err(|fault| match fault {
                    IotlbFault::Miss { iova } => IommuError::Miss { iova, access },
                    fault => iommu_error(ResolveError::Fault(fault), iova, len, access),
                })?;
        first_run(pieces, iova)
    }

    fn hold(&self, generation: u64) {
        *self.holds().by_generation.entry(generation).or_default() += 1;
    }

    fn release(&self, generation: u64) {
        let mut holds = self.holds();
        if let Entry::Occupied(mut held) = holds.by_generation.entry(generation) {
            *held.get_mut() -= 1;
            if *held.get() == 0 {
                held.remove();
            }
        }
        drop(holds);
        self.holds_changed.notify_all();
    }

    fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(GuestAddress, u64), IommuError> {
        let pieces = self
            .iotlb
            .resolve(iova, len, access, self.timeout, |miss, access| {
                self.ask(miss, access)
            })
            .map_err(|err| iommu_error(err, iova, len, access))?;
        first_run(pieces, iova)
    }
}

/// The IOTLB's answer for the `len` bytes at `iova` as a vring takes it (logged).
fn iommu_error(err: ResolveError, iova: u64, len: u64, access: Permissions) -> IommuError {
    let err = match err {
        ResolveError::Fault(IotlbFault::Denied { iova, .. }) => IommuError::Denied { iova, access },
        ResolveError::Fault(IotlbFault::Wraps { iova, len }) => IommuError::Invalid { iova, len },
        ResolveError::Fault(fault) => IommuError::Unmapped { iova: fault.iova() },
        ResolveError::MissNotSent { iova } | ResolveError::Timeout { iova, .. } => {
            IommuError::Unmapped { iova }
        }
        _ => IommuError::Unmapped { iova },
    };
    log::debug!("IOTLB translation of {iova:#x} + {len:#x} failed: {err}");
    err
}

/// The first piece of a translation and the pieces that follow it in guest memory too, as
/// one run.
fn first_run(pieces: Vec<IotlbMapping>, iova: u64) -> Result<(GuestAddress, u64), IommuError> {
    let mut pieces = pieces.into_iter();
    let Some(first) = pieces.next() else {
        return Err(IommuError::Unmapped { iova });
    };
    let mut run = first.len;
    for piece in pieces {
        if first.addr.checked_add(run) != Some(piece.addr) {
            break;
        }
        run += piece.len;
    }
    Ok((GuestAddress(first.addr), run))
}
