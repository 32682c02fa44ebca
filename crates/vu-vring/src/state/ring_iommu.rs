//! The IOMMU side of [`VringData`]: putting a ring behind an IOMMU, and translating its
//! parts before the worker touches them (see the [`iommu`](crate::iommu) module).

use std::sync::Arc;

use vm_memory::GuestAddressSpace;

use virtio_queue::QueueT;

use super::{Restart, VringData};
use crate::chain::Chain;
use crate::error::Error;
use crate::inflight::InflightQueue;
use crate::inflight::InflightRegion;
use crate::iommu::{Iommu, RingIommu, Translating};
use crate::process::Completion;
use crate::tracker::Tracker;

impl<M: GuestAddressSpace> VringData<M> {
    /// Puts the ring behind an IOMMU (`VIRTIO_F_ACCESS_PLATFORM` acked; the daemon calls this
    /// at `SET_FEATURES`), or takes it out with `None`. Behind one, the addresses of
    /// [`set_queue_info`](Self::set_queue_info) are IOVAs, translated by the worker before it
    /// touches the ring, and every descriptor of a [`Chain`](crate::Chain) is translated as it is yielded;
    /// see the [`iommu`](crate::iommu) module. Installing the IOMMU the ring already has
    /// changes nothing (QEMU sends `SET_FEATURES` again to turn logging on).
    ///
    /// Behind an IOMMU, [`pop_descriptor_chain`](Self::pop_descriptor_chain) returns `None`
    /// (virtio-queue's chain would hand out IOVAs as guest addresses): serve the ring with
    /// [`serve_available`](Self::serve_available) or `process_queue`.
    pub fn set_iommu(&mut self, iommu: Option<Arc<dyn Iommu>>) {
        match (&self.iommu, iommu) {
            (Some(current), Some(new)) if Arc::ptr_eq(&current.iommu, &new) => {}
            (_, new) => self.iommu = new.map(RingIommu::new),
        }
    }

    /// Whether the ring is behind an IOMMU.
    pub fn has_iommu(&self) -> bool {
        self.iommu.is_some()
    }

    /// Behind an IOMMU, makes the queue's guest addresses those of the current translation
    /// (translating again after an invalidation), and does what waited for the ring to be
    /// readable: reading the used index of new addresses, or the restart.
    pub(super) fn translate_rings(&mut self) -> Result<(), Error> {
        let Some(iommu) = &mut self.iommu else {
            return Ok(());
        };
        let sync_used = iommu.ensure(&mut self.queue, self.packed.is_some())?;
        if let Some((inflight, serve_resubmitted)) = iommu.take_deferred_restart() {
            self.restart(inflight, serve_resubmitted)?;
        } else if sync_used {
            let used = self.queue_used_idx()?;
            self.set_queue_next_used(used);
        }
        Ok(())
    }

    /// Behind an IOMMU, refuses a read of the ring from a `&self` call while its translation
    /// is not current (such calls come from the connection thread, which must not wait for
    /// a miss: the worker translates).
    pub(super) fn check_translated(&self) -> Result<(), Error> {
        match &self.iommu {
            Some(iommu) if !iommu.is_current() => Err(Error::RingNotTranslated),
            _ => Ok(()),
        }
    }

    /// The start of the used ring's log range (see [`log_used`](Self::log_used)). Behind an
    /// IOMMU the log address is the used ring's IOVA, as the driver gave it (QEMU sends the
    /// ring's bus address): the guest range it was translated to is logged, which is what
    /// was written; nothing before the first translation (nothing was written).
    pub(super) fn used_log_start(&self) -> Option<u64> {
        let start = self.log_guest_addr?;
        match &self.iommu {
            None => Some(start),
            Some(iommu) => iommu.is_current().then(|| self.queue.used_ring()),
        }
    }

    /// Behind an IOMMU, a split ring whose translation is not current is restarted by the
    /// worker when it first translates it: reading the used ring may need the frontend's
    /// answer to a miss, which this (connection) thread must be free to receive. `Ok` with
    /// the ring's positions when deferred, else `inflight` back.
    pub(super) fn defer_restart(
        &mut self,
        inflight: Option<InflightQueue>,
        serve_resubmitted: bool,
    ) -> Result<Restart, Option<InflightQueue>> {
        match &mut self.iommu {
            Some(iommu) if self.packed.is_none() && !iommu.is_current() => {
                iommu.defer_restart(inflight, serve_resubmitted);
                Ok(Restart {
                    next_used: self.queue.next_used(),
                    next_avail: self.queue.next_avail(),
                    resubmit: 0,
                })
            }
            _ => Err(inflight),
        }
    }

    /// Behind an IOMMU, the ring addresses as the frontend gave them (zero before any).
    pub(super) fn ring_iovas(&self) -> Option<(u64, u64, u64)> {
        let [desc, avail, used] = self.iommu.as_ref()?.iovas().unwrap_or([0; 3]);
        Some((desc, avail, used))
    }

    /// The memory snapshot to touch the ring through, behind an IOMMU once its parts are
    /// translated (see [`translate_rings`](Self::translate_rings)).
    pub(super) fn ring_memory(&mut self) -> Result<M::T, Error> {
        self.translate_rings()?;
        Ok(self.mem.memory())
    }

    /// The same for a `&self` read (see [`check_translated`](Self::check_translated)).
    pub(super) fn ring_memory_now(&self) -> Result<M::T, Error> {
        self.check_translated()?;
        Ok(self.mem.memory())
    }

    /// Behind an IOMMU, at the start of a pass: notes the IOMMU's generation (the chains the
    /// pass takes for later hold translations that recent), translates the rings (see
    /// [`translate_rings`](Self::translate_rings)), publishes the completions that waited
    /// for the used ring, and returns the IOMMU the chains translate their descriptors
    /// through, with the IOVA whose miss fails them.
    pub(super) fn translated_iommu(&mut self) -> Result<Option<Translating>, Error> {
        let Some(ring) = &mut self.iommu else {
            return Ok(None);
        };
        ring.pass_generation = ring.iommu.generation();
        self.translate_rings()?;
        let Some(ring) = &mut self.iommu else {
            return Ok(None);
        };
        let translating = (ring.iommu.clone(), ring.unanswered);
        let unpublished = std::mem::take(&mut ring.unpublished);
        if !unpublished.is_empty() {
            if let Err(err) = self.add_used_batch(unpublished.iter().copied()) {
                if let (Error::IommuMiss { .. }, Some(ring)) = (&err, &mut self.iommu) {
                    ring.unpublished = unpublished;
                }
                return Err(err);
            }
        }
        Ok(Some(translating))
    }

    /// Completes chains taken for later behind an IOMMU ([`complete_deferred`]): their
    /// holds end (the device is done with their buffers), then they go into the used ring;
    /// when the used ring's translation misses (an invalidation since the last pass), they
    /// wait for the worker's next pass, which asks for it without this lock: the ring's
    /// kick is delivered to wake it. Returns how many were completed (or left to publish).
    ///
    /// [`complete_deferred`]: Self::complete_deferred
    pub(super) fn complete_translated(&mut self, done: Vec<(u16, u32)>) -> Result<usize, Error> {
        let completed = done.len();
        let Some(ring) = &mut self.iommu else {
            return self.add_used_batch(done);
        };
        for &(head, _) in &done {
            ring.release(head);
        }
        // Completions still waiting for the used ring go first, in the order they came.
        let mut batch = std::mem::take(&mut ring.unpublished);
        batch.extend(done);
        match self.add_used_batch(batch.iter().copied()) {
            Err(err @ Error::IommuMiss { .. }) => {
                if let Some(ring) = &mut self.iommu {
                    ring.unpublished = batch;
                }
                self.leave_miss_to_worker(err).map(|()| completed)
            }
            result => result.map(|_| completed),
        }
    }

    /// Behind an IOMMU, in a pass: translates `chain` whole without waiting, then records it
    /// (inflight tracking, when `TRACK`) and hands it to `serve`. [`Error::IommuMiss`] when a
    /// translation missed: nothing of the chain was served or recorded, the caller puts it
    /// back.
    pub(super) fn serve_whole<const TRACK: bool, F, R>(
        &mut self,
        mut chain: Chain<'_, M::M>,
        region: Option<&InflightRegion<'_>>,
        serve: &mut F,
    ) -> Result<Completion, Error>
    where
        F: FnMut(Chain<'_, M::M>) -> R,
        R: Into<Completion>,
    {
        if let Err((iova, access)) = chain.pretranslate() {
            return Err(Error::IommuMiss { iova, access });
        }
        if TRACK {
            Tracker::record(&mut self.tracker, region, chain.head_index());
        }
        Ok(serve(chain).into())
    }

    /// Outside a pass (a completion from another thread, a notification decision), a miss
    /// is left to the worker: its kick is delivered, and its next pass asks the frontend
    /// without the ring's lock. Any other error is returned.
    pub(super) fn leave_miss_to_worker(&self, err: Error) -> Result<(), Error> {
        match err {
            Error::IommuMiss { iova, .. } => {
                log::debug!("IOTLB miss at IOVA {iova:#x} outside a pass: left to the worker");
                self.deliver_kick()?;
                Ok(())
            }
            err => Err(err),
        }
    }

    /// Behind an IOMMU, sets the IOVA whose miss fails what needs it (the chain, or the pass
    /// for a ring part) rather than stopping the pass to ask the frontend:
    /// [`process_queue`](crate::process_queue) sets it for one try after the frontend did
    /// not answer that miss in time.
    pub(crate) fn set_unanswered(&mut self, iova: Option<u64>) {
        if let Some(ring) = &mut self.iommu {
            ring.unanswered = iova;
        }
    }

    /// The IOMMU the ring is behind.
    pub(crate) fn iommu(&self) -> Option<Arc<dyn Iommu>> {
        self.iommu.as_ref().map(|ring| ring.iommu.clone())
    }

    /// Behind an IOMMU, keeps `SET_VRING_ADDR`'s addresses as IOVAs, to be translated before
    /// the next access, and returns `true`; `false` without one.
    pub(super) fn set_ring_iovas(&mut self, desc: u64, avail: u64, used: u64) -> bool {
        let split = self.packed.is_none();
        match &mut self.iommu {
            Some(iommu) => {
                iommu.set_iovas(desc, avail, used, split);
                true
            }
            None => false,
        }
    }
}

/// A chain the device took for later ([`Completion::Later`](crate::Completion::Later)):
/// counted, and behind an IOMMU its translations held until it is completed.
#[inline(always)]
pub(super) fn taken_for_later(deferred: &mut usize, iommu: &mut Option<RingIommu>, head: u16) {
    *deferred += 1;
    if let Some(iommu) = iommu {
        iommu.hold(head);
    }
}
