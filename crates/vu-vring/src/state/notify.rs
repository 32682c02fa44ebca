//! The split ring's interrupt decision ("does the driver want to be notified of the entries
//! added since the last decision?"), taken at the end of a pass and, while the driver runs
//! concurrently, after each round of one.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use super::{VringData, CONCURRENT_ROUND, SERVE_BATCH, VRING_AVAIL_F_NO_INTERRUPT};
use crate::avail::AvailRing;
use crate::error::Error;
use crate::layout::{AVAIL_ELEM, AVAIL_HEADER, AVAIL_IDX};

/// The longest a polled pass leaves its last round for the driver to arm
/// ([`VringData::leaves_tail`]): more than a wake-up across CPUs in a VM (20 to 40 µs on the
/// bench's machine), as long as the default polling budget.
pub(super) const TAIL_WAIT: Duration = Duration::from_micros(50);

/// What [`VringData::leaves_tail`] remembers between passes.
#[derive(Debug)]
pub(crate) struct TailWait {
    /// The driver's `used_event` when a polled pass in rounds last looked.
    used_event: u16,
    /// Whether `used_event` moved since the driver last failed to arm in time: only a
    /// driver that arms for interrupts is waited for (a polling one never moves it).
    arms: bool,
    /// Since when passes have left the tail: the wait's start.
    since: Option<Instant>,
    /// The longest wait: [`TAIL_WAIT`] (tests shorten it).
    limit: Duration,
}

impl Default for TailWait {
    fn default() -> Self {
        TailWait {
            used_event: 0,
            arms: false,
            since: None,
            limit: TAIL_WAIT,
        }
    }
}

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
    /// What the driver did after a [`process_queue`](crate::process_queue) pass first wrote
    /// the call eventfd before it ended (a round's decision while the driver is known to run
    /// concurrently, [`set_driver_concurrent`](Self::set_driver_concurrent)), since the last
    /// call (which clears the record): whether it has touched the ring since, read now.
    ///
    /// This tells where the driver runs. Woken in the middle of a pass, a driver on another
    /// CPU reaps (its `used_event` moves) or posts (its available index moves) while the
    /// device goes on; one on the device's CPU can do neither before it preempts the device
    /// (vu-daemon's worker sees an involuntary context switch) or the device stops running.
    pub fn take_mid_pass_interrupt(&mut self) -> MidPassInterrupt {
        let Some(marks) = self.signalled_mid_pass.take() else {
            return MidPassInterrupt::NotSent;
        };
        if self.packed.is_some() || self.check_translated().is_err() {
            return MidPassInterrupt::Unanswered;
        }
        let base = self.queue.avail_ring();
        let idx = read_avail_u16(&self.mem, base, AVAIL_IDX);
        let field = read_avail_u16(&self.mem, base, marks.offset);
        match (idx, field) {
            (Ok(idx), Ok(field)) if idx != marks.avail_idx || field != marks.field => {
                MidPassInterrupt::Answered
            }
            _ => MidPassInterrupt::Unanswered,
        }
    }

    /// Spaces the interrupts a pass sends before it ends while the driver is known to run
    /// concurrently ([`set_driver_concurrent`](Self::set_driver_concurrent)): after one, the
    /// pass's rounds go on publishing the used index, but the next round decision waits
    /// until `chains` more entries were used (the decision covers every entry since the
    /// last one). 0, the default: a decision after every round.
    ///
    /// For a driver whose concurrency is only presumed (vu-daemon's worker probing a queue
    /// that does not poll): a driver that re-arms after each reap is otherwise woken after
    /// every round, which costs a pass that is CPU-bound an interrupt every few chains.
    pub fn space_round_interrupts(&mut self, chains: u16) {
        self.round_interrupt_spacing = chains;
    }

    /// The pass's mapping of the available ring; with the driver's `used_event` field when
    /// the pass decides after each round (`decide`) and EVENT_IDX is on.
    pub(super) fn pass_avail<'m>(&self, mem: &'m M::M, decide: bool) -> AvailRing<'m, M::M> {
        let used_event = decide && self.queue.event_idx_enabled();
        let addr = GuestAddress(self.queue.avail_ring());
        AvailRing::map_fields(mem, addr, self.queue.size(), used_event)
    }

    /// After a round of a pass whose driver runs concurrently: the interrupt decision
    /// ([`signal_round`](Self::signal_round)), unless the pass's last interrupt, at used
    /// index `interrupted_at` (then updated), was fewer than the ring's spacing of chains
    /// ago ([`space_round_interrupts`](Self::space_round_interrupts)).
    pub(super) fn decide_round<G: GuestMemory>(
        &mut self,
        avail: &AvailRing<'_, G>,
        interrupted_at: &mut Option<u16>,
    ) -> Result<(), Error> {
        let used = self.queue.next_used();
        let spacing = self.round_interrupt_spacing;
        if interrupted_at.is_none_or(|at| used.wrapping_sub(at) >= spacing)
            && self.signal_round(avail)?
        {
            *interrupted_at = Some(used);
        }
        Ok(())
    }

    /// The interrupt decision after a round of a pass whose driver runs concurrently:
    /// [`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed) for a split ring,
    /// the driver's fields read through the pass's mapping of the available ring.
    /// Returns whether it interrupted the driver; the first such round since
    /// [`take_mid_pass_interrupt`](Self::take_mid_pass_interrupt) records the driver's marks.
    pub(super) fn signal_round<G: GuestMemory>(
        &mut self,
        avail: &AvailRing<'_, G>,
    ) -> Result<bool, Error> {
        let mut read = (0, 0);
        let needed = split_needs_notification(&self.queue, &mut self.notified_used, |o| {
            read = (o, avail.field(o)?);
            Ok(read.1)
        })?;
        if !needed {
            return Ok(false);
        }
        if self.signalled_mid_pass.is_none() {
            let (offset, field) = read;
            self.signalled_mid_pass = Some(DriverMarks {
                avail_idx: avail.idx()?,
                offset,
                field,
            });
        }
        self.signal_used_queue()?;
        Ok(true)
    }
}

/// What the driver did after a pass interrupted it before the pass ended
/// ([`VringData::take_mid_pass_interrupt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidPassInterrupt {
    /// No pass interrupted the driver before it ended.
    NotSent,
    /// One did, and the driver has not touched the ring since: it has not run yet (on the
    /// device's CPU, it waits for the device to stop or be preempted), or the ring is packed
    /// or not readable now.
    Unanswered,
    /// One did, and the driver has touched the ring since: it reaped (moved `used_event`,
    /// or the available ring's flags without EVENT_IDX) or posted chains.
    Answered,
}

/// The driver's fields when a pass first interrupted it mid-pass: its available index and
/// the field the interrupt decision read (`used_event`, or the flags without EVENT_IDX), at
/// byte `offset` of the available ring.
#[derive(Debug, Clone, Copy)]
pub(super) struct DriverMarks {
    avail_idx: u16,
    offset: u64,
    field: u16,
}

impl<M: GuestAddressSpace> VringData<M> {
    /// Whether a polled pass in rounds (a poller holds the kicks, the driver runs on another
    /// CPU) with `ahead` chains still available, no more than a round, leaves them in the
    /// available ring for now: yes while the driver has not reaped what is published (its `used_event`,
    /// which it moves when it arms for interrupts, is behind the used index) and for at most
    /// [`TAIL_WAIT`]. The poller finds them again and a later pass serves them once the
    /// driver has armed: their completions and the interrupt then come while it reposts, and
    /// it finds that interrupt pending when it waits, instead of sleeping and paying a
    /// wake-up across CPUs (served at once, they would be reaped with the rest, and the
    /// driver's next wait would find nothing). Needs EVENT_IDX and a driver seen to move
    /// `used_event`; a driver that does not arm in time is not waited for again until it
    /// moves it.
    pub(super) fn leaves_tail<G: GuestMemory>(
        &mut self,
        avail: &AvailRing<'_, G>,
        ahead: u16,
    ) -> Result<bool, Error> {
        let last_round = ahead > 0 && usize::from(ahead) <= CONCURRENT_ROUND;
        if !(self.kicks_held && last_round && self.queue.event_idx_enabled()) {
            return Ok(false);
        }
        let size = self.queue.size();
        let used_event = avail.field(AVAIL_HEADER + AVAIL_ELEM * u64::from(size))?;
        let tail = &mut self.tail;
        if used_event != tail.used_event {
            tail.used_event = used_event;
            tail.arms = true;
        }
        let behind = self.queue.next_used().wrapping_sub(used_event);
        if !tail.arms || behind == 0 || behind > size {
            tail.since = None;
            return Ok(false);
        }
        let now = Instant::now();
        match tail.since {
            None => {
                tail.since = Some(now);
                Ok(true)
            }
            Some(since) if now.duration_since(since) < tail.limit => Ok(true),
            Some(_) => {
                tail.arms = false;
                tail.since = None;
                Ok(false)
            }
        }
    }

    /// Shortens [`TAIL_WAIT`] (tests).
    #[cfg(test)]
    pub(crate) fn set_tail_wait(&mut self, limit: Duration) {
        self.tail.limit = limit;
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
