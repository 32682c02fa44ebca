//! Serving the chains found in flight at a restart (inflight I/O tracking), before any new
//! chain.

use virtio_queue::QueueT;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddressSpace, VolatileSlice};

use super::ring_iommu::taken_for_later;
use super::used::put_used;
use super::VringData;
use crate::chain::{Chain, ChainTable};
use crate::error::Error;
use crate::process::Completion;
use crate::tracker::Tracker;

impl<M: GuestAddressSpace> VringData<M> {
    /// Serves the chains found in flight at the restart (or, when the device opted out,
    /// returns them unserved with a used length of 0), one completion each; returns how many
    /// were completed now.
    pub(super) fn serve_resubmitted<F, R, B>(
        &mut self,
        mem: &M::M,
        table: &ChainTable<'_, M::M>,
        ring: Option<&VolatileSlice<'_, B>>,
        serve: &mut F,
    ) -> Result<usize, Error>
    where
        F: FnMut(Chain<'_, M::M>) -> R,
        R: Into<Completion>,
        B: BitmapSlice,
    {
        let mut completed = 0;
        while let Some(tracker) = self.tracker.as_mut() {
            let Some(head) = tracker.resubmit.pop() else {
                break;
            };
            let len = if tracker.serve_resubmitted {
                let mut chain = Chain::resubmitted(head, table);
                if let Err((iova, access)) = chain.pretranslate() {
                    tracker.resubmit.push(head);
                    return Err(Error::IommuMiss { iova, access });
                }
                match serve(chain).into() {
                    Completion::Now(len) => len,
                    Completion::Later => {
                        taken_for_later(&mut self.deferred, &mut self.iommu, head);
                        continue;
                    }
                }
            } else {
                0
            };
            let batch = [(head, len)];
            Tracker::link(&mut self.tracker, None, &batch);
            put_used(&mut self.queue, ring, mem, head, len)?;
            Tracker::finish(&mut self.tracker, None, &batch, self.queue.next_used());
            completed += 1;
        }
        Ok(completed)
    }
}
