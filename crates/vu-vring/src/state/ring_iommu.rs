//! The IOMMU side of [`VringData`]: putting a ring behind an IOMMU, and translating its
//! parts before the worker touches them (see the [`iommu`](crate::iommu) module).

use std::sync::Arc;

use vm_memory::GuestAddressSpace;

use virtio_queue::QueueT;

use super::{Restart, VringData};
use crate::error::Error;
use crate::inflight::InflightQueue;
use crate::iommu::{Iommu, RingIommu};

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

    /// Behind an IOMMU: translates the rings (see [`translate_rings`](Self::translate_rings))
    /// and returns the IOMMU the chains translate their descriptors through.
    pub(super) fn translated_iommu(&mut self) -> Result<Option<Arc<dyn Iommu>>, Error> {
        self.translate_rings()?;
        Ok(self.iommu.as_ref().map(|i| i.iommu.clone()))
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
