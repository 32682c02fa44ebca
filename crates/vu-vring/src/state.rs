//! [`VringData`]: the plain state of one vring, which every [`VringT`](crate::VringT) guard
//! dereferences to.

use std::fs::File;
use std::io;
use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, VolatileSlice};

use crate::chain::{Chain, ChainTable};
use crate::error::{Error, RingPart};
use crate::eventfd::{eventfd_add_one, eventfd_take};
use crate::inflight::{InflightError, InflightQueue, InflightRegion};
use crate::iommu::{RingIommu, Translating};

pub(crate) mod fill;
mod notify;
mod resubmit;
mod ring_iommu;
mod used;
use crate::packed::{PackedRing, Position};
use crate::process::Completion;
use crate::ring_state::{InbandNotifier, Restart, RingState};
use crate::tracker::Tracker;
pub use notify::MidPassInterrupt;
use ring_iommu::taken_for_later;
use used::{put_used, put_used_round, used_ring_slice};

/// The largest queue size a split virtqueue may have: the virtio specification's split
/// virtqueue section makes the size a power of two of at most 32768.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bit 0 of the available ring's `flags`: the driver asks the device not to interrupt it
/// (only meaningful without `VIRTIO_F_EVENT_IDX`).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

// The split ring's layout lives in `layout`, shared with vu-daemon and the test kit.
use crate::layout;

/// Chains `serve_available` takes from one iterator over the available ring before it puts
/// them in the used ring.
const SERVE_BATCH: usize = 64;

/// Chains per round of a [`process_queue`](crate::process_queue) pass while the driver runs
/// concurrently ([`VringData::set_driver_concurrent`]): the used index is published and the
/// interrupt decided after each such round, so that a driver on another CPU reaps and
/// reposts the first completions while the rest of the pass is served.
pub(crate) const CONCURRENT_ROUND: usize = 8;

/// The plain, unsynchronised state of one vring.
///
/// Every guard of a [`VringT`](crate::VringT) implementation dereferences to this type, so
/// code holding `vring.get_mut()` calls these methods directly. It owns the
/// [`virtio_queue::Queue`], the guest memory handle, the three eventfds (stored as [`File`]s),
/// the enabled flag and the dirty-log address of the used ring.
#[derive(Debug)]
pub struct VringData<M: GuestAddressSpace = crate::vring::DefaultMem> {
    queue: Queue,
    mem: M,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    /// Used for a call or an error when `call` or `err` is `None`.
    inband: Option<Arc<dyn InbandNotifier>>,
    enabled: bool,
    log_guest_addr: Option<u64>,
    /// `next_used` when the notification decision was last taken; entries past it are the
    /// ones a notification would announce.
    notified_used: Wrapping<u16>,
    /// The device's state of the ring when it is a packed ring (`VIRTIO_F_RING_PACKED`
    /// acked); `None` for a split ring, served through `queue`.
    packed: Option<PackedRing>,
    /// Inflight I/O tracking, when the frontend gave an area and the ring was restarted with
    /// it ([`VringData::restart`]).
    tracker: Option<Tracker>,
    /// Chains the device took to complete later ([`Completion::Later`]) and has not completed
    /// ([`VringData::complete_deferred`]).
    deferred: usize,
    /// Driver notifications are held off by a poller ([`VringData::hold_kicks`]):
    /// [`VringData::enable_notification`] leaves them suppressed.
    kicks_held: bool,
    /// The driver is known to run concurrently with the device
    /// ([`VringData::set_driver_concurrent`]): passes decide on interrupts per round.
    driver_concurrent: bool,
    /// The driver's marks when a pass first wrote the call eventfd before it ended, since
    /// the device last asked ([`VringData::take_mid_pass_interrupt`]).
    signalled_mid_pass: Option<notify::DriverMarks>,
    /// Chains a pass uses between two of its round interrupts
    /// ([`VringData::space_round_interrupts`]); 0: a decision after every round.
    round_interrupt_spacing: u16,
    /// What a polled pass in rounds remembers of the driver's arming between passes
    /// ([`VringData::leaves_tail`]).
    tail: notify::TailWait,
    /// Behind an IOMMU: the ring addresses as IOVAs and their translation.
    iommu: Option<RingIommu>,
    /// The fill pass's lists, kept between passes (allocated once, not per pass).
    fill: fill::Scratch,
}

impl<M: GuestAddressSpace> VringData<M> {
    /// Creates the state of a stopped, disabled vring whose size is `max_queue_size`.
    ///
    /// Refuses a maximum size that is not a power of two between 1 and [`MAX_QUEUE_SIZE`].
    pub fn new(mem: M, max_queue_size: u16) -> Result<Self, Error> {
        if !is_valid_size(max_queue_size, MAX_QUEUE_SIZE) {
            return Err(Error::InvalidMaxQueueSize {
                max: max_queue_size,
            });
        }
        let queue = Queue::new(max_queue_size)?;
        Ok(VringData {
            queue,
            mem,
            kick: None,
            call: None,
            err: None,
            inband: None,
            enabled: false,
            log_guest_addr: None,
            notified_used: Wrapping(0),
            tracker: None,
            deferred: 0,
            packed: None,
            kicks_held: false,
            driver_concurrent: false,
            signalled_mid_pass: None,
            round_interrupt_spacing: 0,
            tail: notify::TailWait::default(),
            iommu: None,
            fill: fill::Scratch::default(),
        })
    }

    /// Chooses the ring layout from the acked features (`SET_FEATURES`): packed when
    /// `VIRTIO_F_RING_PACKED` was acked, split otherwise. A change of layout starts the
    /// packed positions afresh (index 0, wrap counters 1).
    ///
    /// On a packed ring the three `SET_VRING_ADDR` addresses are the descriptor ring, the
    /// driver area and the device area (the two event suppression structures);
    /// [`serve_available`](Self::serve_available), the notification methods and the index
    /// methods follow the layout, while the calls that hand out or take back virtio-queue
    /// types ([`pop_descriptor_chain`](Self::pop_descriptor_chain),
    /// [`add_used`](Self::add_used), [`add_used_batch`](Self::add_used_batch)) serve split
    /// rings only.
    pub fn set_queue_packed(&mut self, packed: bool) {
        if packed != self.packed.is_some() {
            let size = self.queue.size();
            self.packed = packed.then(|| PackedRing::new(size));
        }
    }

    /// Whether the ring is a packed ring.
    pub fn queue_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The underlying virtio-queue [`Queue`] (named as in the reference implementation, see
    /// the crate documentation).
    pub fn get_queue(&self) -> &Queue {
        &self.queue
    }

    /// The underlying virtio-queue [`Queue`], mutably: iterate over available chains with
    /// `get_queue_mut().iter(mem)` and complete them with `get_queue_mut().add_used(..)`.
    pub fn get_queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// The guest memory handle this vring reads and writes through.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Pops the next available descriptor chain, or `None` when the driver has offered
    /// nothing new (or the ring is not valid in guest memory).
    ///
    /// An available entry whose head index is past the descriptor table is consumed and
    /// skipped with a warning: no chain starts there, and the used ring could not take it
    /// back (`add_used` refuses it), so a device that passed its error on would stop over a
    /// driver's mistake.
    ///
    /// With inflight tracking, the chain is recorded in the inflight area before it is
    /// returned. Chains found in flight at a restart are not returned here: only
    /// [`serve_available`](Self::serve_available) (and so `process_queue`) serves them again.
    ///
    /// A packed ring has no virtio-queue chain to hand out: `None` (serve it with
    /// [`serve_available`](Self::serve_available)).
    pub fn pop_descriptor_chain(&mut self) -> Option<DescriptorChain<M::T>> {
        if self.packed.is_some() || self.iommu.is_some() {
            return None;
        }
        let chain = pop_servable(&mut self.queue, self.mem.memory())?;
        if self.tracker.is_some() {
            Tracker::record(&mut self.tracker, None, chain.head_index());
        }
        Some(chain)
    }

    /// Puts one completed chain into the used ring and publishes the new used index.
    ///
    /// With inflight tracking, the chain is cleared from the inflight area following the
    /// specification's protocol (linked, published, cleared). [`Error::SplitOnly`] on a
    /// packed ring.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), Error> {
        self.split_only("add_used")?;
        if self.tracker.is_some() {
            return self.add_used_batch([(head, len)]).map(|_| ());
        }
        let mem = self.ring_memory()?;
        self.queue
            .add_used(mem.deref(), head, len)
            .map_err(|source| Error::AddUsed { head, source })
    }

    /// Puts many completed chains `(head, len)` into the used ring, taking the memory
    /// snapshot once, and returns how many were added.
    ///
    /// It does not notify: call [`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed)
    /// once after the batch. On error the entries before the failing one are already
    /// published in the used ring.
    pub fn add_used_batch<I>(&mut self, used: I) -> Result<usize, Error>
    where
        I: IntoIterator<Item = (u16, u32)>,
    {
        self.split_only("add_used_batch")?;
        let mem = self.ring_memory()?;
        if self.tracker.is_some() {
            let batch: Vec<(u16, u32)> = used.into_iter().collect();
            let start = self.queue.next_used();
            let ring = used_ring_slice(&self.queue, mem.deref());
            Tracker::link(&mut self.tracker, None, &batch);
            let result = batch.iter().try_for_each(|&(head, len)| {
                put_used(&mut self.queue, ring.as_ref(), mem.deref(), head, len)
            });
            // On error, only the entries before the failing one were published.
            let added = usize::from(self.queue.next_used().wrapping_sub(start));
            let done = &batch[..added.min(batch.len())];
            Tracker::finish(&mut self.tracker, None, done, self.queue.next_used());
            return result.map(|()| batch.len());
        }
        let mut added = 0;
        for (head, len) in used {
            self.queue
                .add_used(mem.deref(), head, len)
                .map_err(|source| Error::AddUsed { head, source })?;
            added += 1;
        }
        Ok(added)
    }

    /// Pops every chain available now, hands each to `serve` as a [`Chain`] and puts it into
    /// the used ring with the length `serve` returns (the bytes it wrote), publishing the used
    /// index after each; returns how many chains were completed. `mem` is the memory snapshot
    /// the chains borrow (normally `self.mem().memory()`, taken once by the caller).
    ///
    /// This is the inner loop of vu-daemon's `process_queue`: it does not touch notifications
    /// in either direction. The available index is read (Acquire) once per round of up to 64
    /// chains, which are served in order and then put in the used ring in order; an index more
    /// than the queue size ahead of the device's is [`Error::InvalidAvailIndex`], nothing
    /// taken. The available ring, the descriptor table and the used ring are translated to
    /// host memory once per call, so reading an entry or a descriptor is one or two loads and
    /// each completion two stores (and one of the index per round) rather than guest-memory
    /// walks; a ring or table that does not lie in one guest memory region goes through
    /// vm-memory and virtio-queue instead, with the same results and errors. An available
    /// entry whose head index is past the queue size is skipped, as
    /// [`pop_descriptor_chain`](Self::pop_descriptor_chain) skips it. On error, the chains
    /// completed before it stay completed; the chains served in the same round after it are
    /// not completed (the used ring is broken: the device needs a reset).
    ///
    /// Decide on the interrupt with [`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed)
    /// (or [`needs_notification`](Self::needs_notification)), which see these entries through
    /// `next_used`; virtio-queue's `Queue::needs_notification` only counts the entries added
    /// through its own `add_used`, and so does not see the ones written here.
    pub fn serve_available<F>(&mut self, mem: &M::M, mut serve: F) -> Result<usize, Error>
    where
        F: FnMut(Chain<'_, M::M>) -> u32,
    {
        let translating = self.translated_iommu()?;
        self.serve_translated(mem, translating, &mut serve, false)
    }

    /// [`serve_available`](Self::serve_available) for a device that may complete chains
    /// later, in any order: `serve` returns [`Completion::Now`] with the used length, or
    /// [`Completion::Later`] when it keeps the chain (having copied out what it needs: the
    /// [`Chain`] borrows the snapshot `mem`) and will complete it with
    /// [`complete_deferred`](Self::complete_deferred). Returns how many chains were handed to
    /// `serve`, completed or not.
    ///
    /// A chain taken for later is recorded in the inflight area like any other (before
    /// `serve` sees it) and stays recorded until its completion, so a crash in between
    /// serves it again after the restart. Chains served again after a restart may be taken
    /// for later too. A packed ring completes in order: there a chain `serve` takes for later
    /// is completed at once with a used length of 0 and an error is logged; serve packed
    /// rings ([`Chain::is_packed`]) with [`Completion::Now`].
    ///
    /// Behind an IOMMU (see the [`iommu`](crate::iommu) module) each chain is translated
    /// whole before `serve` sees it, without waiting: a miss puts the chain back and ends the
    /// call with [`Error::IommuMiss`] (the chains before it stay completed), for the caller
    /// to ask the frontend without the lock ([`process_queue`](crate::process_queue) does).
    pub fn serve_available_async<F>(&mut self, mem: &M::M, mut serve: F) -> Result<usize, Error>
    where
        F: FnMut(Chain<'_, M::M>) -> Completion,
    {
        let translating = self.translated_iommu()?;
        self.serve_translated(mem, translating, &mut serve, false)
    }

    /// One pass of [`process_queue_async`](crate::process_queue_async):
    /// [`serve_available_async`](Self::serve_available_async), with an interrupt decision
    /// ([`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed)) after every round
    /// of [`CONCURRENT_ROUND`] chains while the driver runs concurrently
    /// ([`set_driver_concurrent`](Self::set_driver_concurrent)).
    ///
    /// `serve` is borrowed and returns anything that converts into a [`Completion`] (a used
    /// length is [`Completion::Now`]), so that the device's own closure is what the rounds
    /// call: no adapter between them moves each [`Chain`] once more.
    pub(crate) fn serve_pass<F, R>(&mut self, mem: &M::M, serve: &mut F) -> Result<usize, Error>
    where
        F: FnMut(Chain<'_, M::M>) -> R,
        R: Into<Completion>,
    {
        let translating = self.translated_iommu()?;
        let decide = self.driver_concurrent;
        self.serve_translated(mem, translating, serve, decide)
    }

    /// [`serve_available_async`](Self::serve_available_async) once the rings are translated,
    /// the chains translated through `iommu` (and the IOVA whose miss fails them) behind one;
    /// `decide`: rounds of [`CONCURRENT_ROUND`], each followed by an interrupt decision.
    fn serve_translated<F, R>(
        &mut self,
        mem: &M::M,
        iommu: Option<Translating>,
        serve: &mut F,
        decide: bool,
    ) -> Result<usize, Error>
    where
        F: FnMut(Chain<'_, M::M>) -> R,
        R: Into<Completion>,
    {
        if let Some(packed) = &mut self.packed {
            return packed.serve(&self.queue, mem, iommu.as_ref(), |chain| {
                match serve(chain).into() {
                    Completion::Now(len) => len,
                    Completion::Later => {
                        log::error!("a packed ring completes in order: chain completed now, empty");
                        0
                    }
                }
            });
        }
        let deferred_before = self.deferred;
        let ring = used_ring_slice(&self.queue, mem);
        let table = ChainTable::map(
            mem,
            GuestAddress(self.queue.desc_table()),
            GuestAddress(self.queue.avail_ring()),
            self.queue.size(),
        )
        .with_iommu(iommu);
        let mut completed = 0;
        // Chains found in flight at a restart come first, oldest first.
        if self
            .tracker
            .as_ref()
            .is_some_and(|t| !t.resubmit.is_empty())
        {
            completed += self.serve_resubmitted(mem, &table, ring.as_ref(), serve)?;
        }
        // One instance of the loop per (tracking, IOMMU), so that a ring without either pays
        // for no check of it.
        let (table, ring) = (&table, ring.as_ref());
        completed += match (self.tracker.is_some(), table.has_iommu()) {
            (true, true) => {
                self.serve_rounds::<true, true, F, R, _>(mem, table, ring, serve, decide)
            }
            (true, false) => {
                self.serve_rounds::<true, false, F, R, _>(mem, table, ring, serve, decide)
            }
            (false, true) => {
                self.serve_rounds::<false, true, F, R, _>(mem, table, ring, serve, decide)
            }
            (false, false) => {
                self.serve_rounds::<false, false, F, R, _>(mem, table, ring, serve, decide)
            }
        }?;
        Ok(completed + self.deferred.wrapping_sub(deferred_before))
    }

    /// Completes chains the device took with [`Completion::Later`]: `(head, used length)`
    /// each, in any order. Like [`add_used_batch`](Self::add_used_batch) (the used elements
    /// are written and the used index published; with inflight tracking the chains are then
    /// cleared from the area with the last-batch protocol), and it does not notify: call
    /// [`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed) after. Returns how
    /// many were completed.
    ///
    /// Behind an IOMMU the chains' translations stop being held (see
    /// [`Iommu::hold`](crate::Iommu::hold)); when the used ring's translation misses, the
    /// completions wait for the worker's next pass, whose kick is delivered.
    pub fn complete_deferred<I>(&mut self, done: I) -> Result<usize, Error>
    where
        I: IntoIterator<Item = (u16, u32)>,
    {
        let done: Vec<(u16, u32)> = done.into_iter().collect();
        self.deferred = self.deferred.saturating_sub(done.len());
        if self.iommu.is_some() {
            return self.complete_translated(done);
        }
        self.add_used_batch(done)
    }

    /// Chains taken with [`Completion::Later`] and not completed yet. A device that defers
    /// completes them all before its ring stops (`VhostUserBackend::stop_vring` in
    /// vu-daemon): what it completes after the frontend learned the ring's index would be
    /// lost or, worse, completed twice by the next process.
    pub fn deferred(&self) -> usize {
        self.deferred
    }

    /// The rounds of [`serve_available`](Self::serve_available), with inflight tracking when
    /// `TRACK` (then `self.tracker` is set on entry; an area error inside ends it, after which
    /// the tracker calls do nothing); `decide`: rounds of [`CONCURRENT_ROUND`] chains, each
    /// followed by an interrupt decision.
    fn serve_rounds<'m, const TRACK: bool, const IOMMU: bool, F, R, B>(
        &mut self,
        mem: &'m M::M,
        table: &ChainTable<'m, M::M>,
        ring: Option<&VolatileSlice<'_, B>>,
        serve: &mut F,
        decide: bool,
    ) -> Result<usize, Error>
    where
        F: FnMut(Chain<'_, M::M>) -> R,
        R: Into<Completion>,
        B: BitmapSlice,
    {
        let size = self.queue.size();
        let mut completed = 0;
        // The region's view, made once for the call (a shared handle of the mapping).
        let queue = TRACK
            .then(|| self.tracker.as_ref().map(|t| t.queue.clone()))
            .flatten();
        let region = queue.as_ref().and_then(|q| q.region().ok());
        let region = region.as_ref();
        // As virtio-queue's iterator: a queue not set up yields nothing.
        if !self.queue.ready() || self.queue.avail_ring() == 0 {
            return Ok(0);
        }
        let avail = self.pass_avail(mem, decide);
        // Chains are read from the available ring in rounds of up to `SERVE_BATCH` (one read
        // of the available index per round), served as they come, and put in the used ring
        // at the end of their round. While the driver runs concurrently the rounds are
        // shorter and each ends with an interrupt decision: the driver on the other CPU can
        // reap the first ones (and be woken for them) while the rest are served.
        let round = notify::round(decide);
        // The used index at the pass's last interrupt before it ended.
        let mut interrupted_at = None;
        let mut served = [(0u16, 0u32); SERVE_BATCH];
        loop {
            let mut n = 0;
            let next = self.queue.next_avail();
            let ahead = avail.idx()?.wrapping_sub(next);
            if ahead > size {
                return Err(Error::InvalidAvailIndex { next_avail: next });
            }
            // Polled and in rounds, the last round may wait for the driver to arm
            // (notify.rs): chains left are not popped, a stop finds them available.
            if decide && self.leaves_tail(&avail, ahead)? {
                return Ok(completed);
            }
            let taken = usize::from(ahead).min(round);
            for position in (0..taken as u16).map(|i| next.wrapping_add(i)) {
                let head = match avail.head(position) {
                    Ok(head) => head,
                    Err(err) => {
                        // The round's chains before it are served: complete them first.
                        self.queue.set_next_avail(position);
                        self.put_round::<TRACK, _>(mem, ring, region, &served[..n])?;
                        return Err(err);
                    }
                };
                if head >= size {
                    warn_head_beyond(head, size);
                    continue;
                }
                let outcome = if IOMMU {
                    let chain = Chain::split(head, position, table);
                    match self.serve_whole::<TRACK, F, R>(chain, region, serve) {
                        Ok(outcome) => outcome,
                        Err(miss) => {
                            // Put back, to be asked for without the lock.
                            self.queue.set_next_avail(position);
                            self.put_round::<TRACK, _>(mem, ring, region, &served[..n])?;
                            return Err(miss);
                        }
                    }
                } else {
                    // Recorded before the device sees it.
                    if TRACK {
                        Tracker::record(&mut self.tracker, region, head);
                    }
                    serve(Chain::split(head, position, table)).into()
                };
                match outcome {
                    Completion::Now(len) => {
                        served[n] = (head, len);
                        n += 1;
                    }
                    Completion::Later => taken_for_later(&mut self.deferred, &mut self.iommu, head),
                }
            }
            self.queue.set_next_avail(next.wrapping_add(taken as u16));
            completed += self.put_round::<TRACK, _>(mem, ring, region, &served[..n])?;
            if taken < round {
                return Ok(completed);
            }
            if decide {
                // Not after the last round: the caller decides after the pass.
                self.decide_round(&avail, &mut interrupted_at)?;
            }
        }
    }

    /// Puts a round's completed chains `batch` into the used ring, in order, and returns
    /// how many (all of them, or an error): untracked through the ring's mapping, the
    /// elements then one store of the index; tracked (`TRACK`), one publication per chain,
    /// its area following each.
    fn put_round<const TRACK: bool, B: BitmapSlice>(
        &mut self,
        mem: &M::M,
        ring: Option<&VolatileSlice<'_, B>>,
        region: Option<&InflightRegion<'_>>,
        batch: &[(u16, u32)],
    ) -> Result<usize, Error> {
        if TRACK {
            Tracker::link(&mut self.tracker, region, batch);
        }
        let mut published = 0;
        if let (false, Some(ring)) = (TRACK, ring) {
            published = put_used_round(&mut self.queue, ring, batch);
        }
        for &(head, len) in &batch[published..] {
            if let Err(err) = put_used(&mut self.queue, ring, mem, head, len) {
                if TRACK {
                    let done = &batch[..published];
                    Tracker::finish(&mut self.tracker, region, done, self.queue.next_used());
                }
                return Err(err);
            }
            published += 1;
        }
        if TRACK {
            Tracker::finish(&mut self.tracker, region, batch, self.queue.next_used());
        }
        Ok(published)
    }

    /// Fixes the point the ring starts from when it is started (`SET_VRING_KICK` on a stopped
    /// ring), after `SET_VRING_BASE` gave the next available index and `SET_VRING_ADDR` the
    /// ring addresses. The used index is read from guest memory and becomes the device's next
    /// used index ("the device is supposed to read the next index in the Used Ring from the
    /// respective vring structure in guest memory").
    ///
    /// With an inflight region (`inflight`, when the frontend gave an area and
    /// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` was negotiated), the region is reconciled with
    /// that used index as the specification's "When reconnecting" steps say, the chains still
    /// in flight are kept to be served again by the next
    /// [`serve_available`](Self::serve_available) before any new chain (or returned unserved,
    /// used length 0, when `serve_resubmitted` is false), and the next available index is the
    /// used index plus their number: every chain popped before is either in the used ring or
    /// in flight. A region whose contents cannot be right is refused with
    /// [`Error::Inflight`], and the ring is left as it was.
    ///
    /// Without one, when the used ring cannot be read, nothing changes (the worker reports
    /// the broken ring). Otherwise the next available index is the frontend's, unless the used index is
    /// ahead of it (by at most the queue size): the device completed chains the frontend did
    /// not count (it read the index before the device's last completions landed), and serving
    /// them again would complete them twice; the ring then resumes at the used index.
    pub fn restart(
        &mut self,
        inflight: Option<InflightQueue>,
        serve_resubmitted: bool,
    ) -> Result<Restart, Error> {
        let inflight = match self.defer_restart(inflight, serve_resubmitted) {
            Ok(deferred) => return Ok(deferred),
            Err(inflight) => inflight,
        };
        // A packed ring starts from the positions SET_VRING_BASE gave; its inflight layout
        // (descriptor copies, not heads) is not tracked: nothing is recorded or served again.
        if self.packed.is_some() {
            if inflight.is_some() {
                log::warn!("inflight I/O tracking is not done for packed rings: area ignored");
            }
            self.tracker = None;
            return Ok(Restart {
                next_used: self.queue_next_used(),
                next_avail: self.queue_next_avail(),
                resubmit: 0,
            });
        }
        let used = match self.queue_used_idx() {
            Ok(used) => used,
            // Nothing to reconcile with: the ring keeps the indices it was given, and the
            // worker reports the unreadable ring when it looks at it.
            Err(err) if inflight.is_none() => {
                log::warn!("the used ring is unreadable as the ring starts: {err}");
                return Ok(Restart {
                    next_used: self.queue.next_used(),
                    next_avail: self.queue.next_avail(),
                    resubmit: 0,
                });
            }
            Err(err) => return Err(err),
        };
        let size = self.queue.size();
        let mut next_avail = self.queue.next_avail();
        let mut resubmit = 0;
        let tracker = match inflight {
            None => {
                let ahead = used.wrapping_sub(next_avail);
                if ahead != 0 && ahead <= size {
                    log::warn!(
                        "the used index {used} is ahead of the frontend's next available index \
                         {next_avail}: resuming at {used}"
                    );
                    next_avail = used;
                }
                None
            }
            Some(queue) => {
                if queue.desc_num() != size {
                    return Err(Error::Inflight(InflightError::RingSize {
                        desc_num: queue.desc_num(),
                        queue_size: size,
                    }));
                }
                let found = queue.region()?.reconcile(used)?;
                if !found.initialised {
                    resubmit = found.heads.len();
                    // At most `desc_num` = `size` heads: fits in u16 for any valid size.
                    let in_flight = u16::try_from(resubmit).unwrap_or(u16::MAX);
                    next_avail = used.wrapping_add(in_flight);
                }
                Some(Tracker {
                    queue,
                    counter: found.next_counter,
                    resubmit: found.heads.into_iter().rev().collect(),
                    serve_resubmitted,
                })
            }
        };
        self.queue.set_next_avail(next_avail);
        self.set_queue_next_used(used);
        self.tracker = tracker;
        Ok(Restart {
            next_used: used,
            next_avail,
            resubmit,
        })
    }

    /// Whether inflight I/O tracking is on for this ring.
    pub fn inflight_tracking(&self) -> bool {
        self.tracker.is_some()
    }

    /// The chains found in flight at the restart that have not been served again yet.
    pub fn resubmit_pending(&self) -> usize {
        self.tracker.as_ref().map_or(0, |t| t.resubmit.len())
    }

    /// The number of chains waiting for the device: those to serve again after a restart,
    /// plus those the driver made available and the device has not popped.
    ///
    /// An available index more than the queue size ahead of the device's is
    /// [`Error::InvalidAvailIndex`] (nothing can be popped from it); an unreadable available
    /// ring is the memory error. A packed ring counts 1 when a chain is available (its number
    /// is not known without walking the ring), else 0.
    pub fn pending_chains(&self) -> Result<usize, Error> {
        if self.packed.is_some() {
            return self.has_available().map(usize::from);
        }
        let mem = self.ring_memory_now()?;
        let idx = self.queue.avail_idx(mem.deref(), Ordering::Acquire)?.0;
        let next_avail = self.queue.next_avail();
        let available = idx.wrapping_sub(next_avail);
        if available > self.queue.size() {
            return Err(Error::InvalidAvailIndex { next_avail });
        }
        Ok(usize::from(available) + self.resubmit_pending())
    }

    /// Writes the call eventfd, telling the frontend that the used ring has new entries.
    ///
    /// When no call fd is set, sends the in-band call instead if the daemon installed an
    /// [`InbandNotifier`] (the spec prefers the fd: it "will be preferred over the
    /// message"), and does nothing otherwise. This is unconditional: prefer
    /// [`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed).
    pub fn signal_used_queue(&self) -> io::Result<()> {
        match (&self.call, &self.inband) {
            (Some(call), _) => eventfd_add_one(call),
            (None, Some(inband)) => inband.call(),
            (None, None) => Ok(()),
        }
    }

    /// Installs (or removes) the in-band notifier used when no call or error fd is set.
    /// It survives [`reset`](Self::reset): it belongs to the connection, not to the ring.
    pub fn set_inband(&mut self, notifier: Option<Arc<dyn InbandNotifier>>) {
        self.inband = notifier;
    }

    /// Decides whether the driver wants to be notified of the used entries added since the
    /// last decision, and restarts the count.
    ///
    /// - Nothing added since the last decision: `false`.
    /// - With `VIRTIO_F_EVENT_IDX`: `true` when the driver's `used_event` lies in the window
    ///   of indices added since the last decision (the "crossed `used_event`" test of the
    ///   virtio specification, applied to a whole batch as Linux's `vring_need_event` does).
    /// - Without: `true` unless the driver set [`VRING_AVAIL_F_NO_INTERRUPT`] in the
    ///   available ring's flags.
    ///
    /// The window is computed from `next_used` itself, so entries added directly through
    /// [`get_queue_mut`](Self::get_queue_mut) count as well. virtio-queue's own
    /// `Queue::needs_notification` is not used: it ignores `VRING_AVAIL_F_NO_INTERRUPT` and
    /// answers `true` when nothing was added.
    ///
    /// On a packed ring the driver area's event suppression structure decides instead: see
    /// the [crate documentation](crate#packed-rings).
    pub fn needs_notification(&mut self) -> Result<bool, Error> {
        if let Err(err) = self.translate_rings() {
            // Behind an IOMMU, a miss leaves the decision to the worker's next pass.
            return self.leave_miss_to_worker(err).map(|()| false);
        }
        if let Some(packed) = &mut self.packed {
            return packed.needs_notification(&self.queue, self.mem.memory().deref());
        }
        let (mem, base) = (&self.mem, self.queue.avail_ring());
        notify::split_needs_notification(&self.queue, &mut self.notified_used, |offset| {
            notify::read_avail_u16(mem, base, offset)
        })
    }

    /// Signals the call eventfd once if the entries added since the last decision need a
    /// notification (see [`needs_notification`](Self::needs_notification)).
    ///
    /// Returns whether a notification was needed. When it was but no call fd is set, the
    /// caller (the daemon) is responsible for the in-band `VRING_CALL`.
    pub fn signal_used_queue_if_needed(&mut self) -> Result<bool, Error> {
        let needed = self.needs_notification()?;
        if needed {
            self.signal_used_queue()?;
        }
        Ok(needed)
    }

    /// Re-enables driver notifications (kicks) and returns whether new chains arrived in the
    /// meantime, in which case the caller processes the queue again.
    ///
    /// While a poller holds kicks off ([`hold_kicks`](Self::hold_kicks)) this leaves them
    /// suppressed and returns `false`: the poller looks at the ring itself, and
    /// [`release_kicks`](Self::release_kicks) does the re-enable and its re-check.
    pub fn enable_notification(&mut self) -> Result<bool, Error> {
        if self.kicks_held {
            return Ok(false);
        }
        self.enable_notification_now()
    }

    fn enable_notification_now(&mut self) -> Result<bool, Error> {
        let mem = self.ring_memory()?;
        if let Some(packed) = &self.packed {
            return packed.enable_notification(&self.queue, mem.deref());
        }
        Ok(self.queue.enable_notification(mem.deref())?)
    }

    /// Asks the driver not to kick while the queue is being processed.
    pub fn disable_notification(&mut self) -> Result<(), Error> {
        let mem = self.ring_memory()?;
        if let Some(packed) = &self.packed {
            return packed.disable_notification(&self.queue, mem.deref());
        }
        Ok(self.queue.disable_notification(mem.deref())?)
    }

    /// Suppresses driver notifications for as long as a poller (vu-daemon's polling worker)
    /// watches the ring, so that the driver does not kick for chains the poller finds anyway:
    /// [`enable_notification`](Self::enable_notification) leaves them suppressed until
    /// [`release_kicks`](Self::release_kicks). A ring that is not started is only marked.
    pub fn hold_kicks(&mut self) -> Result<(), Error> {
        self.kicks_held = true;
        if !self.ready() {
            return Ok(());
        }
        self.disable_notification()
    }

    /// Ends [`hold_kicks`](Self::hold_kicks): re-enables driver notifications (with
    /// `VIRTIO_F_EVENT_IDX`, `avail_event` at the device's next available index) and returns
    /// whether chains are available, which no kick will announce: the poller must have them
    /// served before it sleeps. A ring that is not started is only unmarked (`false`).
    pub fn release_kicks(&mut self) -> Result<bool, Error> {
        self.kicks_held = false;
        if !self.ready() {
            return Ok(false);
        }
        self.enable_notification_now()
    }

    /// Whether a poller holds kicks off ([`hold_kicks`](Self::hold_kicks) without its
    /// [`release_kicks`](Self::release_kicks) yet).
    pub fn kicks_held(&self) -> bool {
        self.kicks_held
    }

    /// Tells the ring whether its driver is known to run concurrently with the device, on
    /// another CPU (vu-daemon's worker sets it while a polling window finds chains without
    /// the worker losing its CPU, and clears it when the window closes; without polling, it
    /// sets it for a probe pass and keeps it while the driver answers the passes' mid-pass
    /// interrupts, [`take_mid_pass_interrupt`](Self::take_mid_pass_interrupt), without the
    /// worker losing its CPU, with [`space_round_interrupts`](Self::space_round_interrupts)).
    ///
    /// While it is set, each [`process_queue`](crate::process_queue) pass serves the split
    /// ring in rounds of 8 chains, publishes the used index after each and decides on an
    /// interrupt after each ([`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed)),
    /// instead of once at the end of the pass: a driver sleeping for the next completion is
    /// woken by the first round and reaps and reposts while the rest is served, rather than
    /// waiting for the whole pass. While it is not (the default), a pass decides once: a
    /// driver that shares the device's CPU would, woken early, preempt the device in the
    /// middle of its pass and split it, for more interrupts and context switches per
    /// request. A driver that is already awake and has not asked for an interrupt
    /// (`used_event` behind) costs nothing more either way. Packed rings decide once per pass.
    pub fn set_driver_concurrent(&mut self, concurrent: bool) {
        self.driver_concurrent = concurrent;
    }

    /// Whether the driver is known to run concurrently
    /// ([`set_driver_concurrent`](Self::set_driver_concurrent)).
    pub fn driver_concurrent(&self) -> bool {
        self.driver_concurrent
    }

    /// Whether the ring is enabled (`SET_VRING_ENABLE`).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Sets the enabled flag (`SET_VRING_ENABLE`).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Whether the ring is started (ready): set by the daemon on `SET_VRING_KICK`, cleared on
    /// `GET_VRING_BASE`.
    pub fn ready(&self) -> bool {
        self.queue.ready()
    }

    /// Marks the ring started or stopped.
    pub fn set_queue_ready(&mut self, ready: bool) {
        self.queue.set_ready(ready);
    }

    /// The spec's ring state, derived from `ready` and `enabled`.
    pub fn ring_state(&self) -> RingState {
        match (self.ready(), self.enabled) {
            (false, _) => RingState::Stopped,
            (true, false) => RingState::Disabled,
            (true, true) => RingState::Enabled,
        }
    }

    /// Sets the guest addresses of the descriptor table, the available ring and the used ring
    /// (`SET_VRING_ADDR`, after the daemon translated the frontend's VMM addresses); behind an
    /// IOMMU ([`set_iommu`](Self::set_iommu)), the IOVAs as the frontend gave them, translated
    /// before the ring is next touched.
    ///
    /// All three are checked before any is stored, so a refused request changes nothing.
    /// On a packed ring they are the descriptor ring, the driver area and the device area;
    /// the two areas are 4-byte aligned.
    pub fn set_queue_info(&mut self, desc: u64, avail: u64, used: u64) -> Result<(), Error> {
        for (part, addr) in [
            (RingPart::Descriptors, desc),
            (RingPart::Avail, avail),
            (RingPart::Used, used),
        ] {
            let align = if self.packed.is_some() {
                part.align().max(4)
            } else {
                part.align()
            };
            if addr % align != 0 {
                return Err(Error::MisalignedRing { part, addr });
            }
        }
        if self.set_ring_iovas(desc, avail, used) {
            return Ok(());
        }
        self.queue.try_set_desc_table_address(GuestAddress(desc))?;
        self.queue.try_set_avail_ring_address(GuestAddress(avail))?;
        self.queue.try_set_used_ring_address(GuestAddress(used))?;
        Ok(())
    }

    /// The addresses of the descriptor table, available ring and used ring, as
    /// [`set_queue_info`](Self::set_queue_info) took them: guest addresses, or behind an
    /// IOMMU the IOVAs (zero before any).
    pub fn queue_info(&self) -> (u64, u64, u64) {
        if let Some(iovas) = self.ring_iovas() {
            return iovas;
        }
        (
            self.queue.desc_table(),
            self.queue.avail_ring(),
            self.queue.used_ring(),
        )
    }

    /// Sets the queue size (`SET_VRING_NUM`).
    ///
    /// Refuses 0, a size above the maximum given at creation (itself at most
    /// [`MAX_QUEUE_SIZE`]), and on a split ring a size that is not a power of two; the size
    /// is then unchanged. A packed ring takes any size from 1 to the maximum (virtio 1.2,
    /// 2.8: its queue size need not be a power of two), so the layout must be chosen
    /// ([`set_queue_packed`](Self::set_queue_packed), at `SET_FEATURES`) first, as QEMU
    /// sends `SET_FEATURES` before `SET_VRING_NUM`.
    pub fn set_queue_size(&mut self, size: u16) -> Result<(), Error> {
        let max = self.queue.max_size();
        if let Some(packed) = &mut self.packed {
            if size == 0 || size > max || size > MAX_QUEUE_SIZE {
                return Err(Error::InvalidQueueSize { size, max });
            }
            packed.set_size(size);
            return Ok(());
        }
        if !is_valid_size(size, max) {
            return Err(Error::InvalidQueueSize { size, max });
        }
        self.queue
            .try_set_size(size)
            .map_err(|_| Error::InvalidQueueSize { size, max })
    }

    /// The current queue size (a packed ring's own, see
    /// [`set_queue_size`](Self::set_queue_size)).
    pub fn queue_size(&self) -> u16 {
        match &self.packed {
            Some(packed) => packed.size(),
            None => self.queue.size(),
        }
    }

    /// The maximum queue size given at creation.
    pub fn max_queue_size(&self) -> u16 {
        self.queue.max_size()
    }

    /// Turns `VIRTIO_F_RING_EVENT_IDX` handling on or off (from the acked features).
    pub fn set_queue_event_idx(&mut self, enabled: bool) {
        self.queue.set_event_idx(enabled);
    }

    /// Whether `VIRTIO_F_RING_EVENT_IDX` handling is on.
    pub fn event_idx(&self) -> bool {
        self.queue.event_idx_enabled()
    }

    /// The index of the next available entry the device will read (`GET_VRING_BASE`). On a
    /// packed ring: the position in bits 0-14 and the avail wrap counter in bit 15.
    pub fn queue_next_avail(&self) -> u16 {
        match &self.packed {
            Some(packed) => packed.next_avail().word(),
            None => self.queue.next_avail(),
        }
    }

    /// Sets the index of the next available entry (`SET_VRING_BASE`). On a packed ring: the
    /// position in bits 0-14 and the avail wrap counter in bit 15.
    pub fn set_queue_next_avail(&mut self, idx: u16) {
        match &mut self.packed {
            Some(packed) => packed.set_next_avail(Position::from_word(idx)),
            None => self.queue.set_next_avail(idx),
        }
    }

    /// The ring state word of `GET_VRING_BASE`: for a split ring the next available index;
    /// for a packed ring, as QEMU reads it, the next available position with its wrap
    /// counter in bit 15 and the next used position with its wrap counter in bits 16-31.
    pub fn vring_base(&self) -> u32 {
        match &self.packed {
            Some(packed) => {
                u32::from(packed.next_avail().word()) | u32::from(packed.next_used().word()) << 16
            }
            None => u32::from(self.queue.next_avail()),
        }
    }

    /// Sets the ring state from `SET_VRING_BASE`'s word (see [`vring_base`](Self::vring_base)).
    /// A split ring refuses a word above `u16::MAX`. A packed ring takes the available
    /// position from the low half (vhost-user spec, "Ring states": bit 15 is the avail wrap
    /// counter) and the used position from the high half, as QEMU sends it; the positions are
    /// checked against the queue size when the ring is used.
    pub fn set_vring_base(&mut self, num: u32) -> Result<(), Error> {
        match &mut self.packed {
            Some(packed) => {
                packed.set_next_avail(Position::from_word(num as u16));
                packed.set_next_used(Position::from_word((num >> 16) as u16));
            }
            None => {
                let idx = u16::try_from(num).map_err(|_| Error::InvalidVringBase { num })?;
                self.queue.set_next_avail(idx);
            }
        }
        Ok(())
    }

    /// Whether the driver made chains available that the device has not taken: the split
    /// ring's available index differs from the device's, or the packed ring's descriptor at
    /// the next available position is available.
    pub fn has_available(&self) -> Result<bool, Error> {
        let mem = self.ring_memory_now()?;
        match &self.packed {
            Some(packed) => packed.has_available(&self.queue, mem.deref()),
            None => {
                Ok(self.queue.avail_idx(mem.deref(), Ordering::Acquire)?.0
                    != self.queue.next_avail())
            }
        }
    }

    /// The index of the next used entry the device will write. On a packed ring: the
    /// position in bits 0-14 and the used wrap counter in bit 15.
    pub fn queue_next_used(&self) -> u16 {
        match &self.packed {
            Some(packed) => packed.next_used().word(),
            None => self.queue.next_used(),
        }
    }

    /// Sets the index of the next used entry, typically to
    /// [`queue_used_idx`](Self::queue_used_idx) once the ring addresses are known. This also
    /// restarts the notification window.
    pub fn set_queue_next_used(&mut self, idx: u16) {
        if let Some(packed) = &mut self.packed {
            packed.set_next_used(Position::from_word(idx));
            return;
        }
        self.queue.set_next_used(idx);
        self.notified_used = Wrapping(idx);
    }

    /// Reads the used ring's `idx` from guest memory. A packed ring has no used index in
    /// memory: its device's next used position ([`queue_next_used`](Self::queue_next_used)).
    pub fn queue_used_idx(&self) -> Result<u16, Error> {
        if self.packed.is_some() {
            return Ok(self.queue_next_used());
        }
        let mem = self.ring_memory_now()?;
        Ok(self.queue.used_idx(mem.deref(), Ordering::Acquire)?.0)
    }

    /// The kick eventfd (driver to device), if set.
    pub fn get_kick(&self) -> Option<&File> {
        self.kick.as_ref()
    }

    /// The call eventfd (device to driver), if set.
    pub fn get_call(&self) -> Option<&File> {
        self.call.as_ref()
    }

    /// The error eventfd (device to frontend), if set.
    pub fn get_err(&self) -> Option<&File> {
        self.err.as_ref()
    }

    /// Sets or clears the kick eventfd (`SET_VRING_KICK`), closing the previous one.
    pub fn set_kick(&mut self, fd: Option<File>) {
        self.kick = fd;
    }

    /// Sets or clears the call eventfd (`SET_VRING_CALL`), closing the previous one.
    pub fn set_call(&mut self, fd: Option<File>) {
        self.call = fd;
    }

    /// Sets or clears the error eventfd (`SET_VRING_ERR`), closing the previous one.
    pub fn set_err(&mut self, fd: Option<File>) {
        self.err = fd;
    }

    /// Consumes the kick eventfd's counter and returns whether the ring is enabled, i.e.
    /// whether the kick should lead to processing the queue.
    ///
    /// An empty counter on a non-blocking eventfd (a spurious wake-up) is not an error.
    pub fn read_kick(&self) -> io::Result<bool> {
        if let Some(kick) = &self.kick {
            eventfd_take(kick)?;
        }
        Ok(self.enabled)
    }

    /// Delivers a kick that arrived in-band (`VHOST_USER_VRING_KICK`) by adding one to the
    /// kick eventfd, so the worker wakes exactly as for a kick from the driver.
    ///
    /// With in-band notifications the frontend sends no kick fd; the daemon then installs an
    /// eventfd of its own with [`set_kick`](Self::set_kick). Returns `false` when no kick fd
    /// is set, so the kick could not be delivered.
    pub fn deliver_kick(&self) -> io::Result<bool> {
        match &self.kick {
            Some(kick) => eventfd_add_one(kick).map(|()| true),
            None => Ok(false),
        }
    }

    /// Writes the error eventfd, telling the frontend that this vring hit an error. When none
    /// is set, sends the in-band error instead if an [`InbandNotifier`] is installed, and
    /// does nothing otherwise.
    pub fn signal_error(&self) -> io::Result<()> {
        match (&self.err, &self.inband) {
            (Some(err), _) => eventfd_add_one(err),
            (None, Some(inband)) => inband.error(),
            (None, None) => Ok(()),
        }
    }

    /// Sets where used-ring writes must be logged during migration: `Some(log_guest_addr)`
    /// when `SET_VRING_ADDR` carried `VHOST_VRING_F_LOG`, `None` otherwise.
    pub fn set_log_guest_addr(&mut self, log_guest_addr: Option<u64>) {
        self.log_guest_addr = log_guest_addr;
    }

    /// The used ring's address for dirty logging, when `VHOST_VRING_F_LOG` is set.
    pub fn log_guest_addr(&self) -> Option<u64> {
        self.log_guest_addr
    }

    /// The log-address range covering the whole used ring (header, `size` elements and
    /// `avail_event`), when logging is on and the range does not overflow.
    ///
    /// After completing chains the daemon marks this range dirty in the log (vu-mem's
    /// bitmap); marking the whole ring is a little coarser than per element but never
    /// misses a write.
    ///
    /// On a packed ring the range is the 4-byte device area the log address stands for (as
    /// QEMU gives it); the used descriptors written into the descriptor ring are not
    /// covered, so dirty logging is not complete for packed rings.
    pub fn log_used(&self) -> Option<std::ops::Range<u64>> {
        let start = self.used_log_start()?;
        if self.packed.is_some() {
            return Some(start..start.checked_add(4)?);
        }
        let len = layout::used_ring_size(u64::from(self.queue.size()));
        Some(start..start.checked_add(len)?)
    }

    /// Returns the vring to its state at creation (`RESET_OWNER`, `RESET_DEVICE`): stopped,
    /// disabled, size back to the maximum, default addresses, indices zero, no eventfds, no
    /// event index, no logging. The memory handle is kept.
    pub fn reset(&mut self) {
        self.queue.reset();
        self.kick = None;
        self.call = None;
        self.err = None;
        self.enabled = false;
        self.log_guest_addr = None;
        self.notified_used = Wrapping(0);
        self.tracker = None;
        self.packed = None;
        self.deferred = 0;
        self.kicks_held = false;
        self.driver_concurrent = false;
        self.signalled_mid_pass = None;
        self.round_interrupt_spacing = 0;
        self.iommu.iter_mut().for_each(RingIommu::forget_rings);
    }

    /// Refuses `operation` on a packed ring.
    fn split_only(&self, operation: &'static str) -> Result<(), Error> {
        match self.packed {
            Some(_) => Err(Error::SplitOnly { operation }),
            None => Ok(()),
        }
    }
}

/// Pops the next available chain whose head index is in the descriptor table; an entry with
/// a head past it is consumed and skipped with a warning (see
/// [`VringData::pop_descriptor_chain`]).
fn pop_servable<T>(queue: &mut Queue, mem: T) -> Option<DescriptorChain<T>>
where
    T: Deref + Clone,
    T::Target: GuestMemory,
{
    let size = queue.size();
    // Each pop consumes an entry, and the ring never holds more than `size` new ones.
    for _ in 0..=size {
        let chain = queue.pop_descriptor_chain(mem.clone())?;
        if chain.head_index() < size {
            return Some(chain);
        }
        log::warn!(
            "skipping available entry with head index {} (queue size {size})",
            chain.head_index()
        );
    }
    None
}

/// A queue size is valid when it is a non-zero power of two no larger than `max`.
/// The log line for an available entry whose head index is past the queue (skipped).
fn warn_head_beyond(head: u16, size: u16) {
    log::warn!("skipping available entry with head index {head} (queue size {size})");
}

fn is_valid_size(size: u16, max: u16) -> bool {
    size.is_power_of_two() && size <= max && size <= MAX_QUEUE_SIZE
}
