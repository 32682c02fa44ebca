//! Filling device-writable buffers: the receive side of a device (net RX, vsock RX, console
//! input, input events), where data arrives at the device and goes into chains the driver
//! posted, rather than a request arriving in a chain.
//!
//! [`VringData::fill_available`] opens a pass with the discipline of
//! [`serve_available`](VringData::serve_available): one lock (the caller's guard), one memory
//! snapshot, the descriptor table read through its host mapping, chains walked by the same
//! [`Chain`] (split and packed rings, indirect tables, the IOMMU's translation), every chain
//! recorded in the inflight area before the device sees it. Inside the pass the device asks a
//! [`Filler`] for writable room ([`Filler::take`]): chains are taken until the room covers
//! what the device asked for (gathering across chains, as `VIRTIO_NET_F_MRG_RXBUF` needs), and
//! their writable buffers are handed out as guest-memory [`VolatileSlice`]s, which the device
//! fills in place (a socket or tap read straight into guest memory, no copy in between).
//! [`Buffers::commit`] says how many bytes were written: they fill the chains in order, and
//! chains the bytes did not reach are given back; dropping the [`Buffers`] gives them all
//! back (split rings rewind the next available index, packed rings their available position,
//! inflight records are cleared). Completions are written to the used ring when the pass ends,
//! with one publication of the used index, and the caller decides on the interrupt once
//! ([`VringData::signal_used_queue_if_needed`]).

use virtio_queue::QueueT;
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    Permissions, VolatileSlice,
};

use super::{put_used, put_used_round, used_ring_slice, VringData};
use crate::avail::AvailRing;
use crate::chain::{Chain, ChainTable, Table};
use crate::error::Error;
use crate::iommu::Translating;
use crate::packed::{self, Position};
use crate::tracker::Tracker;
use crate::VringT;

/// A device-writable buffer of guest memory, as [`Buffers::slices`] hands it out (a buffer
/// that is not contiguous in the host is several of them).
pub type WritableSlice<'m, G> = VolatileSlice<'m, BS<'m, <G as GuestMemory>::Bitmap>>;

/// Where a taken chain came from, to complete it or give it back.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// Split ring: popped from the available ring, with this head.
    Avail(u16),
    /// Split ring: found in flight at a restart (inflight tracking), with this head.
    Resubmitted(u16),
    /// Packed ring: taken at this position.
    Packed(packed::Taken, Position),
}

/// A chain taken by the current [`Filler::take`]: its room and where its slices end, or
/// `None` when it cannot take data (completed empty once the take is committed).
#[derive(Debug, Clone, Copy)]
struct Item {
    origin: Origin,
    room: Option<(usize, usize)>,
}

/// The device's side of one fill pass of [`VringData::fill_available`]: takes writable room
/// from the chains the driver made available. See the module documentation of
/// [`fill_available`](VringData::fill_available) for an example.
pub struct Filler<'a, 'm, M: GuestAddressSpace> {
    data: &'a mut VringData<M>,
    mem: &'m M::M,
    table: ChainTable<'m, M::M>,
    /// A packed ring's descriptor ring, mapped for writing.
    ring: Option<Table<'m, M::M>>,
    /// A split ring's used ring, when it lies in one region.
    used: Option<WritableSlice<'m, M::M>>,
    /// A split ring's available ring, read through its mapping (`None` for a packed ring).
    avail: Option<AvailRing<'m, M::M>>,
    /// The driver's available index as last read: entries up to it can be taken without
    /// reading it again.
    avail_end: u16,
    iommu: Option<Translating>,
    /// The guest memory region the last buffer was found in, whole, as one writable slice
    /// (with its first address): the pass's next buffers are cut from it without looking the
    /// region up again (a pass's buffers are mostly in one region).
    window: Option<(u64, WritableSlice<'m, M::M>)>,
    /// The current take: its chains in ring order, and their writable slices.
    items: Vec<Item>,
    slices: Vec<WritableSlice<'m, M::M>>,
    /// Completions not yet in the used ring: split `(head, len)`, packed `(chain, len)`.
    done: Vec<(u16, u32)>,
    done_packed: Vec<(packed::Taken, u32)>,
    /// Chains taken in the pass (a packed pass takes at most a ring's worth, as
    /// `serve_available` does, so that a notification window never covers more).
    taken: usize,
    completed: usize,
    malformed: usize,
    error: Option<Error>,
}

/// Completions a pass keeps before writing them to the used ring (a device that fills more
/// in one pass publishes every this many).
const FILL_BATCH: usize = 64;

/// A fill pass's lists that hold no borrow of guest memory, kept in the vring between passes
/// so that a pass allocates nothing (three allocations a pass were about 20 instructions per
/// packet of a 16-packet pass). Empty between passes.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    items: Vec<Item>,
    done: Vec<(u16, u32)>,
    done_packed: Vec<(packed::Taken, u32)>,
}

impl<M: GuestAddressSpace> VringData<M> {
    /// Opens a fill pass over the chains available now and runs `fill` with its [`Filler`];
    /// then writes every chain `fill` committed into the used ring (the used index published
    /// once for up to 64 of them) and returns what `fill` returned. `mem` is the memory
    /// snapshot the slices borrow (normally `self.mem().memory()`, taken once by the caller).
    ///
    /// It does not touch notifications: after the pass, decide on the interrupt once with
    /// [`signal_used_queue_if_needed`](Self::signal_used_queue_if_needed), and, when the device
    /// still has data but the ring ran out of chains, re-enable kicks with
    /// [`enable_notification`](Self::enable_notification) (its EVENT_IDX re-check says whether
    /// chains arrived meanwhile).
    ///
    /// A chain that cannot take data is an error on that chain only: a device-readable
    /// descriptor, no writable room at all (zero-length descriptors are skipped), a buffer
    /// outside guest memory or not translatable through the IOMMU. It is completed with a
    /// used length of 0 (after the chains of the data it was found among, so that a packet's
    /// chains stay consecutive in the used ring), logged, counted ([`Filler::malformed`]), and
    /// the pass goes on. A walk the driver broke (a loop, a bad indirect table) ends the chain
    /// where virtio-queue's walk ends it, as for [`serve_available`](Self::serve_available).
    /// An error of the ring itself (its used ring or a packed descriptor outside guest memory,
    /// a broken packed chain) ends the pass: `fill` gets no more chains, the chains committed
    /// before are completed, and the error is returned.
    ///
    /// # Example
    ///
    /// A device delivering datagrams, one per chain set, each spread over as many chains as
    /// it needs (as `VIRTIO_NET_F_MRG_RXBUF` does), keeping what does not fit for later:
    ///
    /// ```
    /// use std::collections::VecDeque;
    /// use vu_vring::vm_memory::GuestAddressSpace;
    /// use vu_vring::{Error, VringData};
    ///
    /// fn deliver<M: GuestAddressSpace>(
    ///     data: &mut VringData<M>,
    ///     waiting: &mut VecDeque<Vec<u8>>,
    /// ) -> Result<usize, Error> {
    ///     let mem = data.mem().memory();
    ///     let delivered = data.fill_available(&mem, |rx| {
    ///         let mut delivered = 0;
    ///         while let Some(datagram) = waiting.front() {
    ///             // Chains until the datagram's bytes are covered (at most 64 of them).
    ///             let Some(buffers) = rx.take(datagram.len(), 64) else {
    ///                 break; // no chain available: the datagram waits
    ///             };
    ///             if buffers.capacity() < datagram.len() {
    ///                 break; // not enough room yet: dropping `buffers` gives the chains back
    ///             }
    ///             let written = buffers.write_at(0, datagram);
    ///             buffers.commit(written); // the bytes fill the chains in order
    ///             waiting.pop_front();
    ///             delivered += 1;
    ///         }
    ///         delivered
    ///     })?;
    ///     drop(mem);
    ///     data.signal_used_queue_if_needed()?; // one interrupt decision for the pass
    ///     Ok(delivered)
    /// }
    /// # let _ = deliver::<vu_vring::DefaultMem>;
    /// ```
    pub fn fill_available<F, R>(&mut self, mem: &M::M, fill: F) -> Result<R, Error>
    where
        F: FnOnce(&mut Filler<'_, '_, M>) -> R,
    {
        let iommu = self.translated_iommu()?;
        let desc = GuestAddress(self.queue.desc_table());
        let ring = self
            .packed
            .as_ref()
            .map(|p| Table::map_writable(mem, desc, p.size()));
        let (used, avail) = match ring {
            None => (
                used_ring_slice(&self.queue, mem),
                Some(AvailRing::map(
                    mem,
                    GuestAddress(self.queue.avail_ring()),
                    self.queue.size(),
                )),
            ),
            Some(_) => (None, None),
        };
        let avail_end = self.queue.next_avail();
        let packed = ring.is_some();
        let mut scratch = std::mem::take(&mut self.fill);
        // Sized for a pass the first time (growing them chain by chain was 6 % of a small
        // packet's cost), then kept.
        scratch.items.reserve(8);
        let (done, done_packed) = match packed {
            false => (FILL_BATCH, 0),
            true => (0, FILL_BATCH),
        };
        scratch.done.reserve(done);
        scratch.done_packed.reserve(done_packed);
        let mut filler = Filler {
            table: ChainTable::map(
                mem,
                desc,
                GuestAddress(self.queue.avail_ring()),
                self.queue.size(),
            ),
            data: self,
            mem,
            ring,
            used,
            avail,
            avail_end,
            iommu,
            window: None,
            items: scratch.items,
            slices: Vec::with_capacity(8),
            done: scratch.done,
            done_packed: scratch.done_packed,
            taken: 0,
            completed: 0,
            malformed: 0,
            error: None,
        };
        let out = fill(&mut filler);
        // Nothing is left taken unless a `Buffers` was leaked (`mem::forget`): given back.
        filler.give_back(0);
        filler.publish();
        let Filler {
            data,
            items,
            done,
            done_packed,
            error,
            ..
        } = filler;
        // All empty now: taken chains given back, completions published (or, after an error
        // of the ring, dropped as before).
        data.fill = Scratch {
            items,
            done,
            done_packed,
        };
        data.fill.done.clear();
        data.fill.done_packed.clear();
        match error {
            Some(err) => Err(err),
            None => Ok(out),
        }
    }
}

/// Fills chains of `vring` in one pass: locks it once, takes one memory snapshot, runs `fill`
/// with the pass's [`Filler`] ([`VringData::fill_available`]), then decides once whether the
/// driver needs an interrupt for the chains completed and writes the call eventfd at most
/// once. Returns what `fill` returned. The vring is locked for the whole call, so `fill`
/// must not call methods of the same vring.
///
/// Behind an IOMMU, a ring part the IOTLB misses is asked for before the pass, without the
/// lock; a buffer that misses during the pass is waited for under it (bounded): a fill pass
/// cannot put a chain back as [`process_queue`](crate::process_queue) does, so an
/// invalidation arriving meanwhile waits for it (vu_net does not offer ACCESS_PLATFORM).
///
/// A ring the driver broke (see [`VringData::fill_available`]) is the returned error; the
/// chains committed before it are in the used ring and the interrupt is still decided. When
/// the device keeps data because the ring ran out of chains, re-enable kicks afterwards
/// ([`VringT::enable_notification`](crate::VringT::enable_notification)) to hear when the
/// driver posts more.
///
/// # Example
///
/// A console's input: bytes typed on the host go into the chains the driver posted for
/// them, as far as they reach; what does not fit waits for the next pass.
///
/// ```
/// use vu_vring::{fill_queue, Error, VringMutex};
///
/// fn input(vring: &VringMutex, typed: &mut Vec<u8>) -> Result<(), Error> {
///     let sent = fill_queue(vring, |rx| {
///         let mut sent = 0;
///         while sent < typed.len() {
///             let Some(room) = rx.take(typed.len() - sent, 1) else {
///                 break; // no chain posted: the rest waits
///             };
///             let n = room.write_at(0, &typed[sent..]);
///             room.commit(n);
///             sent += n;
///         }
///         sent
///     })?;
///     typed.drain(..sent);
///     Ok(())
/// }
/// # let _ = input;
/// ```
pub fn fill_queue<M, V, F, R>(vring: &V, fill: F) -> Result<R, Error>
where
    M: GuestAddressSpace,
    V: VringT<M> + ?Sized,
    F: FnOnce(&mut Filler<'_, '_, M>) -> R,
{
    let mut guard = vring.get_mut();
    // Behind an IOMMU, a ring part the IOTLB misses is asked for without the lock (a few
    // times at most; then the pass meets the miss as an error).
    for _ in 0..4 {
        let Err(Error::IommuMiss { iova, access }) = guard.translate_rings() else {
            break;
        };
        let iommu = guard.iommu();
        drop(guard);
        if let Some(iommu) = iommu {
            let _ = iommu.translate(iova, 1, access);
        }
        guard = vring.get_mut();
    }
    let data = &mut *guard;
    let mem = data.mem().memory();
    let filled = data.fill_available(&mem, fill);
    drop(mem);
    let decided = data.signal_used_queue_if_needed();
    let out = filled?;
    decided?;
    Ok(out)
}

impl<'a, 'm, M: GuestAddressSpace> Filler<'a, 'm, M> {
    /// Takes available chains until their writable room covers `bytes` or `max_chains` were
    /// taken (at least one, whatever `bytes` is), and hands out their writable buffers.
    /// `None` when no chain can be taken (the ring has none available, a packed ring's pass
    /// already took a ring's worth, or the ring broke).
    ///
    /// The room may fall short of `bytes` (the ring ran out, or `max_chains` chains were not
    /// enough): [`Buffers::capacity`] says. Chains that cannot take data are skipped (and
    /// completed empty, see [`VringData::fill_available`]).
    pub fn take(&mut self, bytes: usize, max_chains: usize) -> Option<Buffers<'_, 'a, 'm, M>> {
        // Whatever a leaked `Buffers` (`mem::forget`) left taken goes back first.
        self.give_back(0);
        self.slices.clear();
        let mut capacity = 0;
        let mut good = 0;
        while good == 0 || (capacity < bytes && good < max_chains) {
            let Some(origin) = self.next_chain() else {
                break;
            };
            let start = self.slices.len();
            match self.gather(origin) {
                Ok(room) => {
                    self.items.push(Item {
                        origin,
                        room: Some((room, self.slices.len())),
                    });
                    capacity += room;
                    good += 1;
                }
                Err(reason) => self.refuse(origin, reason, start, good == 0),
            }
        }
        if good == 0 {
            return None;
        }
        Some(Buffers {
            filler: self,
            capacity,
        })
    }

    /// A chain of the current take that cannot take data (`reason`): its slices from `start`
    /// dropped, logged, counted, and completed empty (at once when it comes `first` in the
    /// take, else after the take's chains).
    #[cold]
    #[inline(never)]
    fn refuse(&mut self, origin: Origin, reason: &str, start: usize, first: bool) {
        self.slices.truncate(start);
        let head = self.head(origin);
        log::warn!("chain {head} cannot take data: {reason}; completed empty");
        self.malformed += 1;
        if first {
            // Before the take's first chain: nothing of it to keep consecutive.
            self.complete(origin, 0);
        } else {
            self.items.push(Item { origin, room: None });
        }
    }

    /// Chains completed by this pass so far (committed or completed empty).
    pub fn completed(&self) -> usize {
        self.completed
    }

    /// Chains this pass found unable to take data (completed empty).
    pub fn malformed(&self) -> usize {
        self.malformed
    }

    /// The next chain of the ring, recorded for inflight tracking; `None` when there is none
    /// (or a packed pass took a ring's worth, or the ring broke).
    fn next_chain(&mut self) -> Option<Origin> {
        if self.error.is_some() {
            return None;
        }
        let origin = match &self.ring {
            Some(ring) => {
                if self.taken >= usize::from(self.data.queue_size()) {
                    return None;
                }
                let packed = self.data.packed.as_mut()?;
                let at = packed.next_avail();
                match packed.take(ring, self.mem) {
                    Ok(Some(t)) => Origin::Packed(t, at),
                    Ok(None) => return None,
                    Err(err) => {
                        self.error = Some(err);
                        return None;
                    }
                }
            }
            None => self.next_split()?,
        };
        self.taken += 1;
        Some(origin)
    }

    /// The next chain of a split ring: one found in flight at a restart, or the next
    /// available one (an entry whose head is past the table is skipped, as
    /// [`serve_available`](VringData::serve_available) skips it).
    ///
    /// The driver's available index is read (Acquire) only when the entries read before are
    /// used up, and entries through the ring's mapping ([`AvailRing`]), so a pass reads the
    /// index about once, as `serve_available` does per round.
    fn next_split(&mut self) -> Option<Origin> {
        if let Some(head) = self.data.tracker.as_mut().and_then(|t| t.resubmit.pop()) {
            return Some(Origin::Resubmitted(head));
        }
        let avail = self.avail.as_ref()?;
        let size = self.data.queue.size();
        loop {
            let next = self.data.queue.next_avail();
            if next == self.avail_end {
                let idx = avail.idx().ok()?;
                // An index the ring cannot hold (more than `size` ahead) yields nothing.
                if idx == next || idx.wrapping_sub(next) > size {
                    return None;
                }
                self.avail_end = idx;
            }
            let head = avail.head(next).ok()?;
            let data = &mut *self.data;
            data.queue.set_next_avail(next.wrapping_add(1));
            if head >= size {
                log::warn!("skipping available entry with head index {head} (queue size {size})");
                continue;
            }
            if data.tracker.is_some() {
                Tracker::record(&mut data.tracker, None, head);
            }
            return Some(Origin::Avail(head));
        }
    }

    /// Adds the writable buffers of `chain` to the take's slices; returns their room, or why
    /// the chain cannot take data.
    fn gather(&mut self, origin: Origin) -> Result<usize, &'static str> {
        // A split chain of one descriptor (every buffer of a driver posting one per chain, as
        // mergeable receive buffers are) is read straight from the table: what its walk
        // would yield, without building and walking a `Chain`.
        if let (Origin::Avail(head) | Origin::Resubmitted(head), None, None) =
            (origin, &self.ring, &self.iommu)
        {
            if let Some((addr, len, writable)) = self.table.single(head) {
                if !writable {
                    return Err("a device-readable descriptor");
                }
                if len == 0 {
                    return Err("no writable room");
                }
                let len = len as usize;
                self.writable(addr, len)
                    .map_err(|()| "a buffer outside guest memory")?;
                return Ok(len);
            }
        }
        // Built here, walked here: a `Chain` returned or passed along is copied each time.
        let chain = match (origin, &self.ring) {
            (Origin::Packed(t, _), Some(ring)) => {
                Chain::packed(self.mem, ring, (t.head, t.count, t.id), t.read_ahead)
            }
            // A split chain is built from its head, as for one found in flight (it is not
            // handed out, so that it has no virtio-queue twin does not matter). A packed
            // origin always comes with `self.ring`.
            (origin, _) => Chain::resubmitted(self.head(origin), &self.table),
        };
        let mut chain = match &self.iommu {
            Some((iommu, _)) => chain.with_iommu(iommu.clone(), None).waiting_for_misses(),
            None => chain,
        };
        let mut room = 0usize;
        for desc in chain.by_ref() {
            if !desc.is_write_only() {
                return Err("a device-readable descriptor");
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            self.writable(desc.addr(), len)
                .map_err(|()| "a buffer outside guest memory")?;
            room += len;
        }
        if chain.is_cut_short() {
            return Err("a buffer the IOMMU does not translate");
        }
        if room == 0 {
            return Err("no writable room");
        }
        Ok(room)
    }

    /// Adds the guest memory at `addr`, `len` bytes, to the take's slices: cut from the
    /// pass's region window when it lies in it, else looked up (and the window moved to its
    /// region).
    #[inline]
    fn writable(&mut self, addr: GuestAddress, len: usize) -> Result<(), ()> {
        if let Some(slice) = self.in_window(addr, len) {
            self.slices.push(slice);
            return Ok(());
        }
        self.writable_elsewhere(addr, len)
    }

    /// [`writable`](Self::writable) for a buffer outside the window.
    #[inline(never)]
    fn writable_elsewhere(&mut self, addr: GuestAddress, len: usize) -> Result<(), ()> {
        self.window = self.region_window(addr);
        if let Some(slice) = self.in_window(addr, len) {
            self.slices.push(slice);
            return Ok(());
        }
        // Across regions, or a region without one host mapping: slice by slice.
        let slices =
            GuestMemory::get_slices(self.mem, addr, len, Permissions::Write).map_err(|_| ())?;
        for slice in slices {
            self.slices.push(slice.map_err(|_| ())?);
        }
        Ok(())
    }

    /// `len` bytes at `addr` cut from the region window, when they lie in it.
    fn in_window(&self, addr: GuestAddress, len: usize) -> Option<WritableSlice<'m, M::M>> {
        let (start, whole) = self.window.as_ref()?;
        let offset = usize::try_from(addr.0.checked_sub(*start)?).ok()?;
        // `subslice` checks `offset + len` against the window's length.
        whole.subslice(offset, len).ok()
    }

    /// The region holding `addr` as one writable slice of the pass's memory, when it is
    /// mapped in one piece (the bounds come from the physical memory; the slice from the
    /// same `get_slices` a buffer would be read with, so a cut of it is that buffer's slice).
    fn region_window(&self, addr: GuestAddress) -> Option<(u64, WritableSlice<'m, M::M>)> {
        let region = self.mem.physical_memory()?.find_region(addr)?;
        let start = region.start_addr();
        let len = usize::try_from(region.len()).ok()?;
        let mut slices = GuestMemory::get_slices(self.mem, start, len, Permissions::Write).ok()?;
        let whole = slices.next()?.ok()?;
        (whole.len() == len).then_some((start.0, whole))
    }

    /// What the used ring reports for `origin`.
    fn head(&self, origin: Origin) -> u16 {
        match origin {
            Origin::Avail(head) | Origin::Resubmitted(head) => head,
            Origin::Packed(t, _) => t.id,
        }
    }

    /// Queues the completion of `origin` with `len` bytes, writing the queue to the used ring
    /// when it is full.
    fn complete(&mut self, origin: Origin, len: u32) {
        match origin {
            Origin::Avail(head) | Origin::Resubmitted(head) => self.done.push((head, len)),
            Origin::Packed(t, _) => self.done_packed.push((t, len)),
        }
        self.completed += 1;
        if self.done.len() + self.done_packed.len() >= FILL_BATCH && self.items.is_empty() {
            self.publish();
        }
    }

    /// Gives back the take's chains from `items[from]` on, unused: they become available
    /// again, as if never taken (split: the next available index moves back; packed: the
    /// available position; inflight: their records are cleared, resubmitted ones wait
    /// again). The chains before `from` must be completed already.
    #[inline]
    fn give_back(&mut self, from: usize) {
        if from >= self.items.len() {
            self.items.clear();
        } else {
            self.give_back_chains(from);
        }
    }

    /// [`give_back`](Self::give_back) when there are chains to give back.
    fn give_back_chains(&mut self, from: usize) {
        let Some(first) = self.items.get(from).copied() else {
            return;
        };
        let back = &self.items[from..];
        let data = &mut *self.data;
        self.taken -= back.len();
        match first.origin {
            Origin::Packed(_, at) => {
                if let Some(packed) = data.packed.as_mut() {
                    packed.set_next_avail(at);
                }
            }
            _ => {
                let popped = back
                    .iter()
                    .filter(|i| matches!(i.origin, Origin::Avail(_)))
                    .count();
                // A take's chains are all in flight at once: at most the queue size, a u16.
                let next = data.queue.next_avail().wrapping_sub(popped as u16);
                data.queue.set_next_avail(next);
                if data.tracker.is_some() {
                    let heads: Vec<(u16, u32)> = back
                        .iter()
                        .filter_map(|i| match i.origin {
                            Origin::Avail(head) => Some((head, 0)),
                            _ => None,
                        })
                        .collect();
                    let used = data.queue.next_used();
                    Tracker::finish(&mut data.tracker, None, &heads, used);
                }
                if let Some(tracker) = data.tracker.as_mut() {
                    // Newest first in `resubmit`: the oldest given back is popped first.
                    let again = back.iter().rev().filter_map(|i| match i.origin {
                        Origin::Resubmitted(head) => Some(head),
                        _ => None,
                    });
                    tracker.resubmit.extend(again);
                }
            }
        }
        self.items.clear();
    }

    /// Writes the completions kept so far into the used ring. An error is kept for the pass
    /// (and ends it); the completions not written stay with the driver as before.
    fn publish(&mut self) {
        if let Err(err) = self.publish_split().and_then(|()| self.publish_packed()) {
            self.error.get_or_insert(err);
        }
    }

    fn publish_split(&mut self) -> Result<(), Error> {
        if self.done.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.done);
        let data = &mut *self.data;
        let tracked = data.tracker.is_some();
        if tracked {
            Tracker::link(&mut data.tracker, None, &batch);
        }
        let mut published = 0;
        // Untracked, through the ring's mapping: the elements, then one store of the index
        // (tracking keeps one publication per chain: its area follows each).
        if let (false, Some(ring)) = (tracked, self.used.as_ref()) {
            published = put_used_round(&mut data.queue, ring, &batch);
        }
        let mut result = Ok(());
        for &(head, len) in &batch[published..] {
            result = put_used(&mut data.queue, self.used.as_ref(), self.mem, head, len);
            if result.is_err() {
                break;
            }
            published += 1;
        }
        if tracked {
            let used = data.queue.next_used();
            Tracker::finish(&mut data.tracker, None, &batch[..published], used);
        }
        self.done = batch;
        self.done.clear();
        result
    }

    fn publish_packed(&mut self) -> Result<(), Error> {
        let (Some(ring), Some(packed)) = (&self.ring, self.data.packed.as_mut()) else {
            return Ok(());
        };
        let result = self
            .done_packed
            .iter()
            .try_for_each(|&(t, len)| packed.put_used(ring, self.mem, t, len));
        self.done_packed.clear();
        result
    }
}

/// Writable room taken by [`Filler::take`]: the buffers of one or more chains, in order.
/// [`commit`](Self::commit) completes the chains the device wrote into; dropping it gives
/// every chain back.
pub struct Buffers<'f, 'a, 'm, M: GuestAddressSpace> {
    filler: &'f mut Filler<'a, 'm, M>,
    capacity: usize,
}

impl<'m, M: GuestAddressSpace> Buffers<'_, '_, 'm, M> {
    /// The writable bytes of all the chains together.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many chains were taken (chains that cannot take data are not counted).
    pub fn chains(&self) -> usize {
        self.rooms().count()
    }

    /// The writable bytes of chain `index` (in the order taken), 0 past the last.
    pub fn chain_capacity(&self, index: usize) -> usize {
        self.rooms().nth(index).map_or(0, |(room, _)| room)
    }

    /// How many chains `bytes` written from the start fill (at least 1): with
    /// `VIRTIO_NET_F_MRG_RXBUF`, the header's `num_buffers` for a packet of `bytes`.
    pub fn chains_for(&self, bytes: usize) -> usize {
        let mut left = bytes;
        let mut n = 0;
        for (room, _) in self.rooms() {
            n += 1;
            if left <= room {
                break;
            }
            left -= room;
        }
        n.max(1)
    }

    /// The writable buffers of every chain, in order, as slices of guest memory: the device
    /// writes into them in place (zero copy). Writes through them mark the dirty log as
    /// guest-memory writes do; a device writing through their raw pointers (a `readv`)
    /// marks it itself (`slice.bitmap().mark_dirty(..)`).
    pub fn slices(&self) -> &[WritableSlice<'m, M::M>] {
        &self.filler.slices
    }

    /// Copies `bytes` into the buffers from byte `offset` of their room on, as far as they
    /// reach; returns how many bytes were copied.
    #[inline]
    pub fn write_at(&self, mut offset: usize, bytes: &[u8]) -> usize {
        let mut copied = 0;
        for slice in &self.filler.slices {
            if copied == bytes.len() {
                break;
            }
            if offset >= slice.len() {
                offset -= slice.len();
                continue;
            }
            let n = (slice.len() - offset).min(bytes.len() - copied);
            // In bounds: `offset + n <= slice.len()`.
            if slice
                .write_slice(&bytes[copied..copied + n], offset)
                .is_err()
            {
                break;
            }
            copied += n;
            offset = 0;
        }
        copied
    }

    /// Copies the guest-memory slice `src` into the buffers from byte `offset` of their room
    /// on, as far as they reach, with no copy in between (a device moving data from one
    /// chain to another: a loopback, a bridge); returns how many bytes were copied.
    pub fn write_volatile_at<B: BitmapSlice>(
        &self,
        mut offset: usize,
        src: &VolatileSlice<'_, B>,
    ) -> usize {
        let mut copied = 0;
        for slice in &self.filler.slices {
            if copied == src.len() {
                break;
            }
            if offset >= slice.len() {
                offset -= slice.len();
                continue;
            }
            let n = (slice.len() - offset).min(src.len() - copied);
            // In bounds: `offset + n <= slice.len()` and `copied + n <= src.len()`.
            match (src.subslice(copied, n), slice.subslice(offset, n)) {
                (Ok(from), Ok(to)) => from.copy_to_volatile_slice(to),
                _ => break,
            }
            copied += n;
            offset = 0;
        }
        copied
    }

    /// Copies the `len` bytes at `addr` of guest memory `mem` (a buffer of another chain: a
    /// loopback, a bridge between queues; `mem` is that chain's snapshot,
    /// [`Chain::memory`]) into the buffers from byte `offset` of their room on, as far as
    /// they reach, with no copy in between; returns how many bytes were copied. When `mem`
    /// is the pass's own snapshot (the same guest memory, not updated in between), the
    /// source is cut from the pass's region window as the room's buffers are (no region
    /// lookup). Guest memory that does not hold all `len` bytes is [`Error::GuestMemory`],
    /// and nothing is copied.
    #[inline]
    pub fn write_guest_at(
        &self,
        offset: usize,
        mem: &M::M,
        addr: GuestAddress,
        len: usize,
    ) -> Result<usize, Error> {
        if std::ptr::eq(mem, self.filler.mem) {
            if let Some(src) = self.filler.in_window(addr, len) {
                return Ok(self.write_volatile_at(offset, &src));
            }
        }
        self.write_guest_elsewhere(offset, mem, addr, len)
    }

    /// [`write_guest_at`](Self::write_guest_at) from outside the pass's window.
    #[inline(never)]
    fn write_guest_elsewhere(
        &self,
        offset: usize,
        mem: &M::M,
        addr: GuestAddress,
        len: usize,
    ) -> Result<usize, Error> {
        let refused = |source| Error::GuestMemory {
            addr: addr.0,
            source,
        };
        // Across regions, or outside the window: every piece is checked before any is copied.
        let slices = GuestMemory::get_slices(mem, addr, len, Permissions::Read)
            .map_err(refused)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(refused)?;
        let mut copied = 0;
        for slice in &slices {
            let n = self.write_volatile_at(offset + copied, slice);
            copied += n;
            if n < slice.len() {
                break;
            }
        }
        Ok(copied)
    }

    /// Completes the chains `written` bytes (written from the start of the room) fill, in
    /// order, each with the bytes that went into it (at least the first chain, with 0 when
    /// `written` is 0), and gives back the chains after them; returns how many chains were
    /// completed. More than [`capacity`](Self::capacity) counts as the capacity.
    #[inline]
    pub fn commit(self, written: usize) -> usize {
        let filler = &mut *self.filler;
        // One chain (a packet without mergeable buffers, or that fits one): it takes it all.
        if let [Item {
            origin,
            room: Some(_),
        }] = filler.items[..]
        {
            filler.items.clear();
            // At most a descriptor chain's length, which is below 4 GiB.
            filler.complete(origin, written.min(self.capacity) as u32);
            return 1;
        }
        Self::commit_chains(filler, written.min(self.capacity))
    }

    /// [`commit`](Self::commit) of a take of several chains (or with chains that cannot take
    /// data among them), `written` at most the capacity.
    #[inline(never)]
    fn commit_chains(filler: &mut Filler<'_, 'm, M>, written: usize) -> usize {
        let mut left = written;
        let mut used = 0;
        let mut cut = filler.items.len();
        for (i, item) in filler.items.iter().enumerate() {
            if let Some((room, _)) = item.room {
                if used > 0 && left == 0 {
                    cut = i;
                    break;
                }
                used += 1;
                left -= left.min(room);
            }
        }
        left = written;
        let items = std::mem::take(&mut filler.items);
        // The data's chains first, then the chains found unable to take data among them.
        for item in &items[..cut] {
            if let Some((room, _)) = item.room {
                let n = left.min(room);
                left -= n;
                // At most a descriptor chain's length, which is below 4 GiB.
                filler.complete(item.origin, n as u32);
            }
        }
        for item in items[..cut].iter().filter(|i| i.room.is_none()) {
            filler.complete(item.origin, 0);
        }
        filler.items = items;
        filler.give_back(cut);
        used
    }

    /// The room of each chain and where its slices end.
    fn rooms(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.filler.items.iter().filter_map(|i| i.room)
    }
}

impl<M: GuestAddressSpace> Drop for Buffers<'_, '_, '_, M> {
    fn drop(&mut self) {
        self.filler.give_back(0);
    }
}
