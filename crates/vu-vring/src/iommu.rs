//! Rings behind a virtual IOMMU (`VIRTIO_F_ACCESS_PLATFORM`): the addresses the driver gives
//! the device are I/O virtual addresses (IOVAs), translated here through an [`Iommu`] that
//! the daemon installs with [`VringData::set_iommu`](crate::VringData::set_iommu).
//!
//! What is translated, and when:
//!
//! - The three ring addresses of `SET_VRING_ADDR` are stored as IOVAs and translated by the
//!   worker before it touches the ring (every pass of
//!   [`serve_available`](crate::VringData::serve_available), every notification and
//!   completion call), each part into one contiguous guest range. The translation is cached
//!   with the IOMMU's [`generation`](Iommu::generation) and made again after any
//!   invalidation, before the next access.
//! - Every descriptor of a [`Chain`](crate::Chain) is translated before the device sees the
//!   chain (the whole walk, once), for reading (device-readable) or writing
//!   (device-writable): a buffer that is contiguous in IOVA but not in guest memory is
//!   yielded as several descriptors, one per contiguous piece, with the same flags (the
//!   last one keeps `NEXT` as the original had it). Indirect tables are translated as one
//!   contiguous range.
//! - Nothing waits for the frontend under the vring's lock: translations there use
//!   [`Iommu::translate_now`]. A miss puts the chain back (nothing of it was served; the
//!   available index is where it was) and ends the pass with [`Error::IommuMiss`];
//!   [`process_queue`](crate::process_queue) then asks with [`Iommu::translate`] without the
//!   lock (bounded) and serves again. A completion from another thread
//!   ([`complete_deferred`](crate::VringData::complete_deferred)) whose used ring misses is
//!   kept and published by the worker's next pass, whose kick is delivered.
//! - What cannot be translated (not answered in time, or not allowed) ends that chain's walk
//!   as a malformed chain ends it ([`Chain::is_cut_short`](crate::Chain::is_cut_short)),
//!   or, for a ring part, fails that ring's pass with [`Error::Iommu`]; other rings and the
//!   device go on.
//! - A chain the device takes for later ([`Completion::Later`](crate::Completion::Later))
//!   holds its translations ([`Iommu::hold`]) until it is completed, so that an
//!   invalidation is acknowledged only once nothing uses what it withdrew: the daemon takes
//!   each vring's lock once (what the ring does under it ends) and waits for the older holds.
//!
//! Guest addresses come out: the device reads and writes through [`Chain::memory`] as without
//! an IOMMU, and the dirty log, indexed by guest address, is marked as without one.
//!
//! [`Chain::memory`]: crate::Chain::memory

use std::fmt;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, Permissions};

use crate::error::{Error, RingPart};
use crate::inflight::InflightQueue;

/// An IOMMU's translation of I/O virtual addresses to guest addresses, as a vring needs it.
///
/// The daemon implements it over its device IOTLB (filled by `VHOST_USER_IOTLB_MSG`), asking
/// the frontend for misses over the backend channel; tests implement it with a table.
pub trait Iommu: fmt::Debug + Send + Sync {
    /// A number that changes whenever a translation given before may have been withdrawn
    /// (an invalidation, an eviction, a reset). Translations cached by a vring are made again
    /// when it differs from the one they were made with. Read on every pass: keep it cheap.
    fn generation(&self) -> u64;

    /// Translates the first contiguous piece of the `len` bytes at `iova` for `access`: the
    /// guest address of `iova` and how many bytes from it (at most `len`, at least 1 when
    /// `len` is not 0) are contiguous in guest memory and allowed. Waits for the frontend's
    /// answer to a miss, for a bounded time.
    fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(GuestAddress, u64), IommuError>;

    /// [`translate`](Self::translate) from what is known now: a miss is
    /// [`IommuError::Miss`] at once, nothing is asked and nothing waited for. The vring
    /// translates this way under its lock (a pass, a completion, a notification), so that no
    /// lock is held while the frontend is asked; [`process_queue`](crate::process_queue)
    /// then asks with [`translate`](Self::translate) without the lock and serves again. The
    /// default is [`translate`](Self::translate), for an IOMMU that never waits.
    fn translate_now(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(GuestAddress, u64), IommuError> {
        self.translate(iova, len, access)
    }

    /// A chain the device keeps past the pass that took it ([`Completion::Later`]) holds
    /// translations made at `generation` or later until it is completed
    /// ([`release`](Self::release) with the same `generation`). An IOMMU that acknowledges
    /// invalidations waits for the holds older than the invalidation before it acknowledges
    /// (what the vring accesses under its lock needs no hold: take each vring's lock once
    /// instead). The default does nothing.
    ///
    /// [`Completion::Later`]: crate::Completion::Later
    fn hold(&self, generation: u64) {
        let _ = generation;
    }

    /// Ends a [`hold`](Self::hold) of `generation`.
    fn release(&self, generation: u64) {
        let _ = generation;
    }
}

/// Why an IOVA could not be translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IommuError {
    /// Nothing maps `iova`, even after asking the frontend (or it could not be asked).
    #[error("IOVA {iova:#x} is not mapped")]
    Unmapped {
        /// The first IOVA not mapped.
        iova: u64,
    },
    /// A mapping exists but does not allow the access (a write through a read-only mapping).
    #[error("IOVA {iova:#x} does not allow {access:?}")]
    Denied {
        /// The first IOVA refused.
        iova: u64,
        /// The access asked for.
        access: Permissions,
    },
    /// Nothing maps `iova` now ([`Iommu::translate_now`]): [`Iommu::translate`] would ask
    /// the frontend and wait for its answer.
    #[error("IOVA {iova:#x} is not in the IOTLB yet (miss for {access:?})")]
    Miss {
        /// The first IOVA not mapped.
        iova: u64,
        /// The access asked for.
        access: Permissions,
    },
    /// `iova + len` wraps, or the range does not map to guest memory.
    #[error("IOVA range {iova:#x} + {len:#x} is invalid")]
    Invalid {
        /// The IOVA asked for.
        iova: u64,
        /// The length asked for.
        len: u64,
    },
}

/// What a pass translates its chains through: the IOMMU, and the IOVA whose miss fails a
/// chain (the frontend did not answer it in time) rather than putting it back.
pub(crate) type Translating = (Arc<dyn Iommu>, Option<u64>);

/// Translates the whole range of `len` bytes at `iova` into one contiguous guest range, or
/// fails: ring parts and indirect tables must be contiguous in guest memory. Never waits
/// ([`Iommu::translate_now`]).
pub(crate) fn translate_whole(
    iommu: &dyn Iommu,
    iova: u64,
    len: u64,
    access: Permissions,
) -> Result<GuestAddress, IommuError> {
    translate_whole_with(iommu, iova, len, access, false)
}

/// [`translate_whole`], waiting for a miss's answer when `wait` ([`Iommu::translate`]).
pub(crate) fn translate_whole_with(
    iommu: &dyn Iommu,
    iova: u64,
    len: u64,
    access: Permissions,
    wait: bool,
) -> Result<GuestAddress, IommuError> {
    let translate = |iova, len| match wait {
        true => iommu.translate(iova, len, access),
        false => iommu.translate_now(iova, len, access),
    };
    let (gpa, got) = translate(iova, len)?;
    if got != len {
        // The next piece is elsewhere in guest memory (or missing).
        return Err(match translate(iova + got, len - got) {
            Err(err) => err,
            Ok(_) => IommuError::Invalid { iova, len },
        });
    }
    Ok(gpa)
}

/// A vring's IOMMU state: the IOMMU, the ring addresses as the frontend gave them (IOVAs),
/// and the generation of the IOMMU they were last translated at.
#[derive(Debug)]
pub(crate) struct RingIommu {
    pub(crate) iommu: Arc<dyn Iommu>,
    /// Descriptor table (ring), available ring (driver area), used ring (device area).
    iovas: Option<[u64; 3]>,
    /// The generation the queue's guest addresses were translated at; `None`: not yet.
    translated: Option<u64>,
    /// The used index must be read from the ring at the next translation (a split ring
    /// whose addresses were just set: the daemon does this at `SET_VRING_ADDR` without an
    /// IOMMU, where the ring is readable at once).
    sync_used: bool,
    /// The restart of the ring (`VringData::restart`), waiting for the ring to be readable.
    deferred_restart: Option<(Option<InflightQueue>, bool)>,
    /// An IOVA the frontend was asked for and did not answer in time: for one more try, its
    /// miss counts as unmapped rather than stopping the pass to ask again.
    pub(crate) unanswered: Option<u64>,
    /// The IOMMU's generation when the current pass started: its chains' translations are
    /// that recent at least.
    pub(crate) pass_generation: u64,
    /// The chains taken for later (head index) and the generation of their hold.
    held: Vec<(u16, u64)>,
    /// Completions waiting for the used ring's translation (a miss when they came).
    pub(crate) unpublished: Vec<(u16, u32)>,
}

impl Drop for RingIommu {
    fn drop(&mut self) {
        for (_, generation) in self.held.drain(..) {
            self.iommu.release(generation);
        }
    }
}

impl RingIommu {
    /// No ring addresses yet.
    pub(crate) fn new(iommu: Arc<dyn Iommu>) -> Self {
        RingIommu {
            iommu,
            iovas: None,
            translated: None,
            sync_used: false,
            deferred_restart: None,
            unanswered: None,
            pass_generation: 0,
            held: Vec::new(),
            unpublished: Vec::new(),
        }
    }

    /// Forgets the ring addresses and their translation (a reset), keeping the IOMMU; the
    /// holds of chains not completed end.
    pub(crate) fn forget_rings(&mut self) {
        *self = RingIommu::new(self.iommu.clone());
    }

    /// A miss as this ring takes it now: [`IommuError::Unmapped`] for the unanswered IOVA.
    pub(crate) fn miss(&self, err: IommuError) -> IommuError {
        match err {
            IommuError::Miss { iova, .. } if self.unanswered == Some(iova) => {
                IommuError::Unmapped { iova }
            }
            err => err,
        }
    }

    /// The chain `head` was taken for later, with translations of the current pass.
    pub(crate) fn hold(&mut self, head: u16) {
        self.iommu.hold(self.pass_generation);
        self.held.push((head, self.pass_generation));
    }

    /// The chain `head` was completed: its hold ends.
    pub(crate) fn release(&mut self, head: u16) {
        if let Some(at) = self.held.iter().position(|&(h, _)| h == head) {
            let (_, generation) = self.held.swap_remove(at);
            self.iommu.release(generation);
        }
    }

    /// Keeps the restart of the ring for the first translation.
    pub(crate) fn defer_restart(&mut self, inflight: Option<InflightQueue>, serve: bool) {
        self.deferred_restart = Some((inflight, serve));
    }

    /// The restart kept by [`defer_restart`](Self::defer_restart), once the ring is current.
    pub(crate) fn take_deferred_restart(&mut self) -> Option<(Option<InflightQueue>, bool)> {
        self.deferred_restart.take()
    }

    /// Stores the ring addresses (IOVAs); they are translated before the next access.
    pub(crate) fn set_iovas(&mut self, desc: u64, avail: u64, used: u64, split: bool) {
        self.iovas = Some([desc, avail, used]);
        self.translated = None;
        self.sync_used = split;
    }

    /// The ring addresses as the frontend gave them.
    pub(crate) fn iovas(&self) -> Option<[u64; 3]> {
        self.iovas
    }

    /// Whether the queue's guest addresses are those of the current translation.
    pub(crate) fn is_current(&self) -> bool {
        self.translated.is_some() && self.translated == Some(self.iommu.generation())
    }

    /// Makes the queue's guest addresses current (translating the ring parts again when the
    /// IOMMU changed since), and returns whether the used index must be read from the ring
    /// now (the first translation of a split ring's new addresses).
    pub(crate) fn ensure(&mut self, queue: &mut Queue, packed: bool) -> Result<bool, Error> {
        let generation = self.iommu.generation();
        if self.translated == Some(generation) {
            return Ok(false);
        }
        let Some([desc, avail, used]) = self.iovas else {
            return Err(Error::RingNotTranslated);
        };
        let size = u64::from(queue.size());
        // Sizes and accesses of the three parts (virtio 1.2, 2.7 and 2.8).
        let parts = if packed {
            [
                (
                    RingPart::Descriptors,
                    desc,
                    16 * size,
                    Permissions::ReadWrite,
                ),
                (RingPart::Avail, avail, 4, Permissions::Read),
                (RingPart::Used, used, 4, Permissions::Write),
            ]
        } else {
            [
                (RingPart::Descriptors, desc, 16 * size, Permissions::Read),
                (RingPart::Avail, avail, 6 + 2 * size, Permissions::Read),
                (RingPart::Used, used, 6 + 8 * size, Permissions::ReadWrite),
            ]
        };
        let mut gpas = [GuestAddress(0); 3];
        for (slot, (part, iova, len, access)) in gpas.iter_mut().zip(parts) {
            *slot =
                translate_whole(&*self.iommu, iova, len, access).map_err(|source| {
                    match self.miss(source) {
                        IommuError::Miss { iova, access } => Error::IommuMiss { iova, access },
                        source => Error::Iommu { part, source },
                    }
                })?;
            let align = if packed {
                part.align().max(4)
            } else {
                part.align()
            };
            if slot.0 % align != 0 {
                return Err(Error::MisalignedRing { part, addr: slot.0 });
            }
        }
        queue.try_set_desc_table_address(gpas[0])?;
        queue.try_set_avail_ring_address(gpas[1])?;
        queue.try_set_used_ring_address(gpas[2])?;
        self.translated = Some(generation);
        Ok(std::mem::take(&mut self.sync_used))
    }
}
