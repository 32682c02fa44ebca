//! The split ring's interrupt decision ("does the driver want to be notified of the entries
//! added since the last decision?"), taken at the end of a pass and, while the driver runs
//! concurrently, after each round of one.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use super::{VringData, CONCURRENT_ROUND, SERVE_BATCH, VRING_AVAIL_F_NO_INTERRUPT};
use crate::avail::AvailRing;
use crate::error::Error;
use crate::layout::{AVAIL_ELEM, AVAIL_HEADER};

/// Chains per round of a pass: [`CONCURRENT_ROUND`] when each round ends with an interrupt
/// decision (`decide`), else [`SERVE_BATCH`].
pub(super) fn round(decide: bool) -> usize {
    if decide {
        CONCURRENT_ROUND
    } else {
        SERVE_BATCH
    }
}

impl<M: GuestAddressSpace> VringData<M> {
    /// The pass's mapping of the available ring; with the driver's `used_event` field when
    /// the pass decides after each round (`decide`) and EVENT_IDX is on.
    pub(super) fn pass_avail<'m>(&self, mem: &'m M::M, decide: bool) -> AvailRing<'m, M::M> {
        let used_event = decide && self.queue.event_idx_enabled();
        let addr = GuestAddress(self.queue.avail_ring());
        AvailRing::map_fields(mem, addr, self.queue.size(), used_event)
    }

    /// The interrupt decision after a round of a pass whose driver runs concurrently:
    /// [`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed) for a split ring,
    /// the driver's fields read through the pass's mapping of the available ring.
    pub(super) fn signal_round<G: GuestMemory>(
        &mut self,
        avail: &AvailRing<'_, G>,
    ) -> Result<(), Error> {
        let needed =
            split_needs_notification(&self.queue, &mut self.notified_used, |o| avail.field(o))?;
        if needed {
            self.signal_used_queue()?;
        }
        Ok(())
    }
}

/// The 16-bit field at byte `offset` of the available ring at `base`, loaded Relaxed.
pub(super) fn read_avail_u16<M: GuestAddressSpace>(
    mem: &M,
    base: u64,
    offset: u64,
) -> Result<u16, Error> {
    let addr = base
        .checked_add(offset)
        .ok_or(Error::AddressOverflow { base, offset })?;
    mem.memory()
        .load::<u16>(GuestAddress(addr), Ordering::Relaxed)
        .map(u16::from_le)
        .map_err(|source| Error::GuestMemory { addr, source })
}

/// [`VringData::needs_notification`] for a split ring: whether the entries added since
/// `notified` (then moved to `next_used`) need an interrupt, `read(offset)` loading the
/// available ring's 16-bit field at that byte offset (`flags`, or `used_event` with EVENT_IDX).
pub(super) fn split_needs_notification(
    queue: &Queue,
    notified: &mut Wrapping<u16>,
    read: impl FnOnce(u64) -> Result<u16, Error>,
) -> Result<bool, Error> {
    let used = Wrapping(queue.next_used());
    let old = *notified;
    if used == old {
        return Ok(false);
    }
    // The used index store in `add_used` (Release) must be visible to the driver before
    // we read what the driver asked for; otherwise both sides can miss each other's update
    // and the driver sleeps forever.
    fence(Ordering::SeqCst);
    let needed = if queue.event_idx_enabled() {
        let offset = AVAIL_HEADER + AVAIL_ELEM * u64::from(queue.size());
        let used_event = Wrapping(read(offset)?);
        used - used_event - Wrapping(1) < used - old
    } else {
        read(0)? & VRING_AVAIL_F_NO_INTERRUPT == 0
    };
    *notified = used;
    Ok(needed)
}
