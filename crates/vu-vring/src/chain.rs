//! [`Chain`]: a descriptor chain whose descriptors are read through a host mapping of their
//! table, translated once per pass instead of once per descriptor.
//!
//! virtio-queue's [`DescriptorChain`] reads every descriptor with `Bytes::read_obj`, which
//! looks the address up among the guest memory regions and copies through vm-memory's generic
//! slice iterator: most of a null device's CPU time per request (callgrind, docs/performance.md).
//! [`VringData::serve_available`](crate::VringData::serve_available) maps the descriptor table
//! once per pass and hands out [`Chain`]s, built from the head indices it reads from the
//! available ring, that read each descriptor with two loads. The walk
//! (loop bound, indirect tables, the 4 GiB length limit) is virtio-queue's, step for step, so
//! both yield the same descriptors for any table, valid or not; a test compares them on random
//! tables.

use std::fmt;
use std::iter::Filter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::{
    Address, AtomicAccess, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice,
};

use crate::iommu::{translate_whole_with, Iommu, IommuError, Translating};
use crate::sys::atomic_view;

/// Bytes of one descriptor: split `addr: u64`, `len: u32`, `flags: u16`, `next: u16`; packed
/// `addr: u64`, `len: u32`, `id: u16`, `flags: u16`.
pub(crate) const DESC_SIZE: usize = 16;
/// Packed descriptor flag: the buffer continues in the next descriptor (same bit as split).
pub(crate) const PACKED_F_NEXT: u16 = 1;
/// Packed descriptor flag: device-writable (same bit as split).
pub(crate) const PACKED_F_WRITE: u16 = 2;
/// Packed descriptor flag: the descriptor points to an indirect table (same bit as split).
pub(crate) const PACKED_F_INDIRECT: u16 = 4;

/// How many descriptors of a packed chain [`PackedRing::take`](crate::packed) hands to its
/// [`Chain`] as it read them, so that the walk does not read them again (chains of up to
/// this many descriptors are read once; longer ones read the rest during the walk).
pub(crate) const PACKED_READ_AHEAD: usize = 4;

/// The fields of a packed descriptor a walk uses, as they were read when the chain was taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PackedDesc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) flags: u16,
}

/// The first descriptors of a packed chain, read (after the Acquire that made the chain
/// visible) and checked when it was taken.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ReadAhead {
    descs: [PackedDesc; PACKED_READ_AHEAD],
    len: u8,
}

impl ReadAhead {
    /// Keeps `desc`, the next descriptor of the chain, if there is room.
    pub(crate) fn push(&mut self, desc: PackedDesc) {
        if let Some(slot) = self.descs.get_mut(usize::from(self.len)) {
            *slot = desc;
            self.len += 1;
        }
    }
}

/// Where a split ring's chain was found: its entry in the available ring and the queue it
/// belongs to, all [`Chain::descriptor_chain`] needs to pop the same chain again through
/// virtio-queue when asked.
#[derive(Debug, Clone, Copy)]
struct AvailEntry {
    /// The available ring's guest address.
    ring: GuestAddress,
    /// The queue's descriptor table.
    table: GuestAddress,
    /// The queue size.
    size: u16,
    /// The available index the chain's head was read at.
    position: u16,
}

/// Where a [`Chain`] comes from.
#[derive(Clone, Copy)]
enum Source {
    /// A split ring: the available entry the head was read from, or `None` for a chain
    /// resubmitted from the inflight area.
    Split(Option<AvailEntry>),
    /// A packed ring of `ring_size` entries; `read_ahead` holds the chain's first
    /// descriptors, of which the walk has used `used`.
    Packed {
        ring_size: u16,
        read_ahead: ReadAhead,
        used: u8,
    },
}

/// One descriptor table (the queue's, or an indirect one; for a packed ring, the descriptor
/// ring): where it is in the guest, how many entries it has, and its host mapping when it
/// lies in one memory region.
pub(crate) struct Table<'m, G: GuestMemory> {
    addr: GuestAddress,
    entries: u16,
    host: Option<VolatileSlice<'m, BS<'m, G::Bitmap>>>,
    /// The same mapping as 8-byte words (two per descriptor), when it is 8-byte aligned:
    /// what [`read_raw`](Self::read_raw) loads from.
    words: Option<&'m [AtomicU64]>,
}

impl<'m, G: GuestMemory> Clone for Table<'m, G> {
    fn clone(&self) -> Self {
        Table {
            addr: self.addr,
            entries: self.entries,
            host: self.host.clone(),
            words: self.words,
        }
    }
}

impl<'m, G: GuestMemory> Table<'m, G> {
    /// The table of `entries` descriptors at `addr`, mapped when it lies in one region.
    pub(crate) fn map(mem: &'m G, addr: GuestAddress, entries: u16) -> Self {
        Self::map_for(mem, addr, entries, Permissions::Read)
    }

    /// The same, mapped for reading and writing: a packed ring, where the device writes its
    /// used descriptors.
    pub(crate) fn map_writable(mem: &'m G, addr: GuestAddress, entries: u16) -> Self {
        Self::map_for(mem, addr, entries, Permissions::ReadWrite)
    }

    fn map_for(mem: &'m G, addr: GuestAddress, entries: u16, access: Permissions) -> Self {
        let len = usize::from(entries) * DESC_SIZE;
        let host = GuestMemory::get_slices(mem, addr, len, access)
            .ok()
            .and_then(|mut slices| slices.next())
            .and_then(Result::ok)
            .filter(|slice| slice.len() == len);
        let words = host.as_ref().and_then(atomic_view);
        Table {
            addr,
            entries,
            host,
            words,
        }
    }

    /// Descriptor `index` (below `entries`) as a split descriptor; see [`read_raw`](Self::read_raw).
    fn read(&self, mem: &G, index: u16) -> Option<Descriptor> {
        let (addr, len, flags, next) = self.read_raw(mem, index)?;
        Some(Descriptor::new(addr, len, flags, next))
    }

    /// The four fields of entry `index` (below `entries`): `addr: u64`, `len: u32`, then the
    /// two `u16`s (split: `flags`, `next`; packed: `id`, `flags`). Two loads from the host
    /// mapping, or, when the table is not mapped in one piece or not 8-byte aligned,
    /// `read_obj` as virtio-queue does. `None` when guest memory refuses the read.
    pub(crate) fn read_raw(&self, mem: &G, index: u16) -> Option<(u64, u32, u16, u16)> {
        let word = usize::from(index) * 2;
        if let Some([addr, rest]) = self.words.and_then(|w| w.get(word..word + 2)) {
            // The driver published the chain before the available index (split) or the head's
            // flags (packed) that the caller read with Acquire, so Relaxed loads see it.
            let (addr, rest) = (addr.load(Ordering::Relaxed), rest.load(Ordering::Relaxed));
            let rest = u64::from_le(rest);
            // Little-endian fields: `len` in the low 32 bits, then the two u16s.
            return Some((
                u64::from_le(addr),
                rest as u32,
                (rest >> 32) as u16,
                (rest >> 48) as u16,
            ));
        }
        self.read_guest(mem, index)
    }

    /// [`read_raw`](Self::read_raw) through guest memory.
    #[inline(never)]
    fn read_guest(&self, mem: &G, index: u16) -> Option<(u64, u32, u16, u16)> {
        let offset = usize::from(index) * DESC_SIZE;
        let addr = self.addr.checked_add(offset as u64)?;
        let desc = mem.read_obj::<Descriptor>(addr).ok()?;
        Some((desc.addr().0, desc.len(), desc.flags(), desc.next()))
    }

    /// The number of entries.
    pub(crate) fn entries(&self) -> u16 {
        self.entries
    }

    /// Loads the `T` at byte `field` of entry `index` (below `entries`) with `order`: from
    /// the host mapping, or through guest memory when there is none or the load is refused
    /// there. `None` when guest memory refuses it.
    pub(crate) fn load<T: AtomicAccess>(
        &self,
        mem: &G,
        index: u16,
        field: usize,
        order: Ordering,
    ) -> Option<T> {
        let offset = usize::from(index) * DESC_SIZE + field;
        if let Some(value) = self.host.as_ref().and_then(|h| h.load(offset, order).ok()) {
            return Some(value);
        }
        mem.load(self.addr.checked_add(offset as u64)?, order).ok()
    }

    /// Stores `value` at byte `field` of entry `index` (below `entries`) with `order`, as
    /// [`load`](Self::load) loads. `None` when guest memory refuses it. Stores through the
    /// host mapping mark the dirty bitmap as guest-memory writes do.
    pub(crate) fn store<T: AtomicAccess>(
        &self,
        mem: &G,
        index: u16,
        field: usize,
        value: T,
        order: Ordering,
    ) -> Option<()> {
        let offset = usize::from(index) * DESC_SIZE + field;
        if let Some(host) = &self.host {
            if host.store(value, offset, order).is_ok() {
                return Some(());
            }
        }
        mem.store(value, self.addr.checked_add(offset as u64)?, order)
            .ok()
    }
}

/// A descriptor chain handed to the closure of
/// [`VringData::serve_available`](crate::VringData::serve_available) (and so of
/// `vu_daemon::process::process_queue`), from a split or a packed ring alike.
///
/// On a split ring it iterates over the chain's [`Descriptor`]s like virtio-queue's
/// [`DescriptorChain`] (following `NEXT` links and one level of indirect table, at most as
/// many descriptors as the table has, stopping where virtio-queue stops on a malformed chain),
/// reading them through a host mapping of the table made once per pass. For virtio-queue's
/// `Reader` and `Writer`, or any API that wants the virtio-queue type,
/// [`descriptor_chain`](Self::descriptor_chain) makes the same chain as a [`DescriptorChain`]
/// when asked.
///
/// On a packed ring (`VIRTIO_F_RING_PACKED`) it walks the chain's descriptors in ring order
/// (as many as the chain was counted to have when it was taken, wrapping at the ring's end),
/// and an indirect table's entries in table order, and yields each as a split [`Descriptor`]
/// with the same meaning: `addr`, `len`, `VRING_DESC_F_WRITE` as the driver set it,
/// `VRING_DESC_F_NEXT` on every descriptor but the last, and `next` 0. So a device written for
/// split rings runs unchanged on packed ones.
///
/// # Example
///
/// Serving one request: read it from the device-readable descriptors, write the answer into
/// the device-writable ones (a driver places the readable ones first), return the used
/// length:
///
/// ```
/// use vm_memory::{Bytes, GuestMemoryMmap};
/// use vu_vring::Chain;
///
/// /// Answers each request with its bytes reversed.
/// fn reverse(chain: Chain<'_, GuestMemoryMmap>) -> u32 {
///     let mem = chain.memory();
///     let mut request = Vec::new();
///     for desc in chain.clone().readable() {
///         let mut bytes = vec![0u8; desc.len() as usize];
///         if mem.read_slice(&mut bytes, desc.addr()).is_err() {
///             return 0; // outside guest memory: complete the chain empty
///         }
///         request.extend_from_slice(&bytes);
///     }
///     request.reverse();
///     let mut answer = &request[..];
///     let mut written = 0;
///     for desc in chain.writable() {
///         let n = answer.len().min(desc.len() as usize);
///         if mem.write_slice(&answer[..n], desc.addr()).is_err() {
///             break;
///         }
///         answer = &answer[n..];
///         written += n as u32;
///     }
///     written
/// }
/// # let _ = reverse;
/// ```
///
/// Such a function is the closure of `process_queue(vring, |chain| reverse(chain))`.
pub struct Chain<'m, G: GuestMemory> {
    mem: &'m G,
    /// The ring layout, with what each needs besides the walk.
    source: Source,
    /// What the used ring reports: the head index (split) or the buffer id (packed).
    id: u16,
    /// The table the walk is in: the queue's, then an indirect one.
    table: Table<'m, G>,
    next_index: u16,
    /// Descriptors the walk may still take from `table` (a loop in the links ends it).
    ttl: u16,
    yielded_bytes: u32,
    in_indirect: bool,
    /// Behind an IOMMU: the translation every descriptor goes through (boxed, so that a
    /// chain without one stays as small as before: one null pointer).
    translated: Option<Box<Translated>>,
}

/// A chain's translation state behind an IOMMU.
#[derive(Clone)]
struct Translated {
    iommu: Arc<dyn Iommu>,
    /// What is left of a descriptor whose buffer is not contiguous in guest memory (`addr`
    /// the IOVA of the rest), yielded next.
    rest: Option<Descriptor>,
    /// The walk ended at a buffer or indirect table that did not translate.
    cut_short: bool,
    /// An IOVA the frontend did not answer a miss for: missing, it fails the walk (any
    /// other miss is one to ask about).
    unanswered: Option<u64>,
    /// The miss the walk stopped at.
    miss: Option<(u64, Permissions)>,
    /// A miss is waited for ([`Iommu::translate`]) rather than reported (the fill pass,
    /// which cannot put a chain back).
    wait: bool,
    /// The descriptors as [`Chain::pretranslate`] translated them, yielded from here, and
    /// whether that walk was cut short.
    ready: Option<Ready>,
}

/// How many descriptors of a translated chain are kept without an allocation.
const READY_INLINE: usize = 4;

/// The descriptors of a chain as [`Chain::pretranslate`] translated them: the first
/// [`READY_INLINE`] in place, the rest in a vector; and whether that walk was cut short.
#[derive(Clone, Default)]
struct Ready {
    first: [Descriptor; READY_INLINE],
    rest: Vec<Descriptor>,
    len: usize,
    next: usize,
    cut_short: bool,
}

impl Ready {
    fn push(&mut self, desc: Descriptor) {
        match self.first.get_mut(self.len) {
            Some(slot) => *slot = desc,
            None => self.rest.push(desc),
        }
        self.len += 1;
    }

    fn next(&mut self) -> Option<Descriptor> {
        let at = self.next;
        let desc = match at.checked_sub(READY_INLINE) {
            None => self.first.get(at).filter(|_| at < self.len).copied(),
            Some(spilled) => self.rest.get(spilled).copied(),
        }?;
        self.next += 1;
        Some(desc)
    }
}

impl Translated {
    /// The state of a chain not walked yet.
    fn new(iommu: Arc<dyn Iommu>, unanswered: Option<u64>) -> Box<Self> {
        Box::new(Translated {
            iommu,
            rest: None,
            cut_short: false,
            unanswered,
            wait: false,
            miss: None,
            ready: None,
        })
    }

    /// Ends the walk at a translation that failed with `err` (`what` and `iova` for the
    /// log): a miss is kept to be asked about, anything else cuts the chain short.
    fn fail(&mut self, id: u16, what: &str, iova: u64, err: IommuError) {
        match err {
            IommuError::Miss { iova, access } if self.unanswered != Some(iova) => {
                log::debug!("chain {id}: {what} at IOVA {iova:#x} missed; put back");
                self.miss = Some((iova, access));
            }
            err => log::warn!("chain {id}: {what} at IOVA {iova:#x} not translatable: {err}"),
        }
        self.cut_short = true;
    }
}

impl<'m, G: GuestMemory> Chain<'m, G> {
    /// The chain whose head index `head` the available ring held at index `position`; the
    /// queue's descriptor table and available ring are `table`'s.
    pub(crate) fn split(head: u16, position: u16, table: &ChainTable<'m, G>) -> Self {
        Chain {
            mem: table.mem,
            source: Source::Split(Some(AvailEntry {
                ring: table.avail,
                table: table.table.addr,
                size: table.table.entries,
                position,
            })),
            id: head,
            table: table.table.clone(),
            next_index: head,
            ttl: table.table.entries,
            yielded_bytes: 0,
            in_indirect: false,
            translated: table.translated(),
        }
    }

    /// The chain starting at descriptor `head` of the queue's table, found in the inflight
    /// area after a reconnect rather than popped.
    pub(crate) fn resubmitted(head: u16, table: &ChainTable<'m, G>) -> Self {
        Chain {
            mem: table.mem,
            source: Source::Split(None),
            id: head,
            table: table.table.clone(),
            next_index: head,
            ttl: table.table.entries,
            yielded_bytes: 0,
            in_indirect: false,
            translated: table.translated(),
        }
    }

    /// The chain of a packed ring whose descriptor ring is `ring`: `count` descriptors from
    /// position `head`, completed with buffer id `id`, its first descriptors as `read_ahead`
    /// holds them.
    pub(crate) fn packed(
        mem: &'m G,
        ring: &Table<'m, G>,
        (head, count, id): (u16, u16, u16),
        read_ahead: ReadAhead,
    ) -> Self {
        Chain {
            mem,
            source: Source::Packed {
                ring_size: ring.entries,
                read_ahead,
                used: 0,
            },
            id,
            table: ring.clone(),
            next_index: head,
            ttl: count,
            yielded_bytes: 0,
            in_indirect: false,
            translated: None,
        }
    }

    /// What the used ring reports for this chain: the index of its first descriptor on a
    /// split ring, its buffer id (the `id` of its last descriptor) on a packed ring.
    pub fn head_index(&self) -> u16 {
        self.id
    }

    /// The guest memory the descriptors point into.
    pub fn memory(&self) -> &'m G {
        self.mem
    }

    /// The same chain, from its first descriptor, as virtio-queue's [`DescriptorChain`] (for
    /// `reader`/`writer` and other virtio-queue APIs). Reads through it take virtio-queue's
    /// slower path.
    ///
    /// Made when asked: virtio-queue builds a `DescriptorChain` only by popping it from the
    /// available ring, and the `Chain` was read from the ring without one (see
    /// docs/ARCHITECTURE.md), so this pops the chain's available entry again through a
    /// scratch virtio-queue `Queue`. `None` when the entry no longer holds the chain's head
    /// (the driver rewrote an entry it had published: a driver bug) or the ring cannot be
    /// read.
    ///
    /// `None` for a chain served again after a reconnect (inflight I/O tracking): it was not
    /// read from the available ring; and `None` for a chain of a packed ring: virtio-queue
    /// 0.18 walks split rings only. Iterate over the `Chain` itself, which yields the same
    /// descriptors.
    ///
    /// `None` behind an IOMMU too: virtio-queue's chain would hand out the descriptors' IOVAs
    /// as guest addresses, where the `Chain` yields them translated.
    pub fn descriptor_chain(&self) -> Option<DescriptorChain<&'m G>> {
        let (Source::Split(Some(entry)), None) = (self.source, &self.translated) else {
            return None;
        };
        let mut queue = Queue::new(entry.size).ok()?;
        queue.try_set_desc_table_address(entry.table).ok()?;
        queue.try_set_avail_ring_address(entry.ring).ok()?;
        queue.set_ready(true);
        queue.set_next_avail(entry.position);
        let chain = queue.pop_descriptor_chain(self.mem)?;
        (chain.head_index() == self.id).then_some(chain)
    }

    /// The same chain, yielding its descriptors translated through `iommu` (see the
    /// [`iommu`](crate::iommu) module); a miss of `unanswered` fails the walk.
    pub(crate) fn with_iommu(mut self, iommu: Arc<dyn Iommu>, unanswered: Option<u64>) -> Self {
        self.translated = Some(Translated::new(iommu, unanswered));
        self
    }

    /// The same chain, its misses waited for under the caller's lock (bounded, as
    /// [`Iommu::translate`] waits): for the fill pass, which cannot put a chain back.
    pub(crate) fn waiting_for_misses(mut self) -> Self {
        if let Some(t) = self.translated.as_mut() {
            t.wait = true;
        }
        self
    }

    /// Behind an IOMMU, translates the whole chain now, never waiting
    /// ([`Iommu::translate_now`]), so that the device's walk yields it with no lookup of its
    /// own (the device sees the chain only if this succeeds: nothing of it is touched
    /// before). `Err` with the miss that stopped the walk (IOVA and access): the chain must
    /// be put back and the frontend asked. Nothing to do without an IOMMU.
    #[inline(always)]
    pub(crate) fn pretranslate(&mut self) -> Result<(), (u64, Permissions)> {
        if self.translated.is_none() {
            return Ok(());
        }
        self.pretranslate_walk()
    }

    #[inline(never)]
    fn pretranslate_walk(&mut self) -> Result<(), (u64, Permissions)> {
        // The walk itself (the chain is handed out only when it succeeds): each descriptor
        // translated once; what it yielded is then yielded again from the list.
        let mut ready = Ready::default();
        for desc in self.by_ref() {
            ready.push(desc);
        }
        let Some(t) = self.translated.as_mut() else {
            return Ok(());
        };
        if let Some(miss) = t.miss {
            return Err(miss);
        }
        ready.cut_short = std::mem::take(&mut t.cut_short);
        t.ready = Some(ready);
        Ok(())
    }

    /// Whether the walk so far ended because a buffer or an indirect table could not be
    /// translated through the IOMMU: the descriptors it yielded are then not the whole
    /// chain, and a device must not serve them as if they were (a truncated chain can look
    /// well formed). Always `false` without an IOMMU.
    pub fn is_cut_short(&self) -> bool {
        self.translated.as_ref().is_some_and(|t| t.cut_short)
    }

    /// Whether the chain comes from a packed ring.
    pub fn is_packed(&self) -> bool {
        matches!(self.source, Source::Packed { .. })
    }

    /// The remaining device-readable descriptors.
    pub fn readable(self) -> Filter<Self, fn(&Descriptor) -> bool> {
        self.filter(is_readable)
    }

    /// The remaining device-writable descriptors.
    pub fn writable(self) -> Filter<Self, fn(&Descriptor) -> bool> {
        self.filter(is_writable)
    }

    /// Continues the walk in the indirect table `desc` refers to, with virtio-queue's checks:
    /// no indirect table inside one, a length that is a whole number of descriptors, at most
    /// `u16::MAX` of them.
    /// The same checks hold for a packed ring's indirect descriptor.
    #[inline(never)]
    fn enter_indirect(&mut self, addr: GuestAddress, len: u32) -> Option<()> {
        if self.in_indirect || len as usize % DESC_SIZE != 0 {
            return None;
        }
        let entries = u16::try_from(len as usize / DESC_SIZE).ok()?;
        let id = self.id;
        let addr = match &mut self.translated {
            None => addr,
            Some(t) => {
                translate_whole_with(&*t.iommu, addr.0, u64::from(len), Permissions::Read, t.wait)
                    .map_err(|err| t.fail(id, "indirect table", addr.0, err))
                    .ok()?
            }
        };
        self.table = Table::map(self.mem, addr, entries);
        self.next_index = 0;
        self.ttl = entries;
        self.in_indirect = true;
        Some(())
    }
}

impl<G: GuestMemory> Iterator for Chain<'_, G> {
    type Item = Descriptor;

    #[inline]
    fn next(&mut self) -> Option<Descriptor> {
        if self.translated.is_none() {
            return self.next_raw();
        }
        self.next_translated()
    }
}

impl<G: GuestMemory> Chain<'_, G> {
    /// The next descriptor as the driver wrote it (see the type's documentation).
    #[inline(always)]
    fn next_raw(&mut self) -> Option<Descriptor> {
        if let Source::Packed { ring_size, .. } = self.source {
            return self.next_packed(ring_size);
        }
        loop {
            if self.ttl == 0 || self.next_index >= self.table.entries {
                return None;
            }
            let desc = self.table.read(self.mem, self.next_index)?;
            if desc.refers_to_indirect_table() {
                self.enter_indirect(desc.addr(), desc.len())?;
                continue;
            }
            // A chain longer than 4 GiB in total is invalid (virtio 1.2, 2.7.5.2): the walk
            // ends there.
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next_index = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }

    /// Behind an IOMMU: the next descriptor with its buffer translated to guest addresses,
    /// for reading or for writing as its `WRITE` flag says; the first contiguous piece of
    /// it, the rest coming next. A buffer that cannot be translated ends the chain.
    #[inline(never)]
    fn next_translated(&mut self) -> Option<Descriptor> {
        if let Some(t) = self.translated.as_mut() {
            if let Some(ready) = &mut t.ready {
                let next = ready.next();
                // The end of the translated walk is where the device learns how it ended.
                t.cut_short = next.is_none() && ready.cut_short;
                return next;
            }
        }
        let rest = self.translated.as_mut().and_then(|t| t.rest.take());
        let desc = match rest {
            Some(rest) => rest,
            None => self.next_raw()?,
        };
        let t = self.translated.as_mut()?;
        let access = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let (iova, len) = (desc.addr().0, desc.len());
        let translated = match t.wait {
            true => t.iommu.translate(iova, u64::from(len), access),
            false => t.iommu.translate_now(iova, u64::from(len), access),
        };
        match translated {
            // `got <= len`, so it fits in u32 and `iova + got` does not wrap (the
            // translation checked `iova + len`).
            Ok((gpa, got)) if got < u64::from(len) => {
                let got = got as u32;
                t.rest = Some(Descriptor::new(
                    iova + u64::from(got),
                    len - got,
                    desc.flags(),
                    desc.next(),
                ));
                // The `NEXT` bit is the same in split and packed layouts.
                let flags = desc.flags() | PACKED_F_NEXT;
                Some(Descriptor::new(gpa.0, got, flags, desc.next()))
            }
            Ok((gpa, _)) => Some(Descriptor::new(gpa.0, len, desc.flags(), desc.next())),
            Err(err) => {
                t.fail(self.id, "buffer", iova, err);
                self.ttl = 0;
                None
            }
        }
    }

    /// The next descriptor of a packed chain's ring part from what was read when it was
    /// taken, if the walk is still in the ring and that far was read.
    fn read_ahead(&mut self) -> Option<PackedDesc> {
        match &mut self.source {
            Source::Packed {
                read_ahead, used, ..
            } if !self.in_indirect => {
                let desc =
                    read_ahead.descs[..usize::from(read_ahead.len)].get(usize::from(*used))?;
                *used += 1;
                Some(*desc)
            }
            _ => None,
        }
    }

    /// The next descriptor of a packed ring's chain (see the type's documentation).
    fn next_packed(&mut self, ring_size: u16) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next_index >= self.table.entries {
                return None;
            }
            let PackedDesc { addr, len, flags } = match self.read_ahead() {
                Some(desc) => desc,
                None => {
                    // Packed layout: `addr`, `len`, `id`, `flags`.
                    let (addr, len, _id, flags) = self.table.read_raw(self.mem, self.next_index)?;
                    PackedDesc { addr, len, flags }
                }
            };
            // Inside an indirect table only VIRTQ_DESC_F_WRITE means something; the others
            // are ignored (virtio 1.2, 2.8.19).
            if !self.in_indirect && flags & PACKED_F_INDIRECT != 0 {
                // "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT in
                // flags": such a chain ends here, as a malformed split chain does.
                if flags & PACKED_F_NEXT != 0 {
                    return None;
                }
                self.enter_indirect(GuestAddress(addr), len)?;
                continue;
            }
            self.yielded_bytes = self.yielded_bytes.checked_add(len)?;
            self.ttl -= 1;
            self.next_index = match self.next_index.checked_add(1) {
                Some(next) if self.in_indirect || next < ring_size => next,
                _ => 0,
            };
            let next = if self.ttl > 0 { PACKED_F_NEXT } else { 0 };
            return Some(Descriptor::new(
                addr,
                len,
                (flags & PACKED_F_WRITE) | next,
                0,
            ));
        }
    }
}

impl<G: GuestMemory> Clone for Chain<'_, G> {
    fn clone(&self) -> Self {
        Chain {
            mem: self.mem,
            source: self.source,
            id: self.id,
            table: self.table.clone(),
            next_index: self.next_index,
            ttl: self.ttl,
            yielded_bytes: self.yielded_bytes,
            in_indirect: self.in_indirect,
            translated: self.translated.clone(),
        }
    }
}

impl<G: GuestMemory> fmt::Debug for Chain<'_, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain")
            .field("head_index", &self.head_index())
            .field("packed", &self.is_packed())
            .field("table", &self.table.addr)
            .field("mapped", &self.table.host.is_some())
            .field("next_index", &self.next_index)
            .field("ttl", &self.ttl)
            .field("in_indirect", &self.in_indirect)
            .field("iommu", &self.translated.is_some())
            .finish()
    }
}

/// The filter of [`Chain::readable`].
fn is_readable(desc: &Descriptor) -> bool {
    !desc.is_write_only()
}

/// The filter of [`Chain::writable`].
fn is_writable(desc: &Descriptor) -> bool {
    desc.is_write_only()
}

/// A queue's descriptor table mapped for one pass over its available ring, and where that
/// ring is (for [`Chain::descriptor_chain`]).
pub(crate) struct ChainTable<'m, G: GuestMemory> {
    mem: &'m G,
    table: Table<'m, G>,
    avail: GuestAddress,
    /// The IOMMU, and the IOVA whose miss fails a chain's walk.
    iommu: Option<Translating>,
}

impl<'m, G: GuestMemory> ChainTable<'m, G> {
    /// The descriptor table of `size` entries at `addr` in `mem`, of the queue whose
    /// available ring is at `avail`.
    pub(crate) fn map(mem: &'m G, addr: GuestAddress, avail: GuestAddress, size: u16) -> Self {
        ChainTable {
            mem,
            table: Table::map(mem, addr, size),
            avail,
            iommu: None,
        }
    }

    /// The same table, its chains translated through `iommu` (see [`Chain::with_iommu`]).
    pub(crate) fn with_iommu(mut self, iommu: Option<Translating>) -> Self {
        self.iommu = iommu;
        self
    }

    /// Whether the chains translate through an IOMMU.
    pub(crate) fn has_iommu(&self) -> bool {
        self.iommu.is_some()
    }

    /// The chain at `head` (below the table's size) when it is one plain descriptor (no
    /// `NEXT` link, no indirect table) of a table without an IOMMU: its buffer's address and
    /// length, and whether it is device-writable. That is all a walk of it would yield, so a
    /// caller may skip building and walking a [`Chain`]; `None` means walk it. (The fill pass
    /// keeps its IOMMU apart from its table: it asks only without one.)
    #[inline]
    pub(crate) fn single(&self, head: u16) -> Option<(GuestAddress, u32, bool)> {
        if self.iommu.is_some() {
            return None;
        }
        let desc = self.table.read(self.mem, head)?;
        if desc.has_next() || desc.refers_to_indirect_table() {
            return None;
        }
        Some((desc.addr(), desc.len(), desc.is_write_only()))
    }

    /// A chain's translation state behind this table's IOMMU, if it has one.
    #[inline(always)]
    fn translated(&self) -> Option<Box<Translated>> {
        let (iommu, unanswered) = self.iommu.as_ref()?;
        Some(Translated::new(iommu.clone(), *unanswered))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    /// Two regions, adjacent in the guest, separate in the host: a table across 0x10000 is
    /// not mapped in one piece.
    const BOUNDARY: u64 = 0x1_0000;
    const MEM_END: u64 = 2 * BOUNDARY;
    const SIZE: u16 = 16;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;

    /// xorshift64*: deterministic, so a failing case can be replayed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), BOUNDARY as usize),
            (GuestAddress(BOUNDARY), BOUNDARY as usize),
        ])
        .unwrap()
    }

    fn write_desc(mem: &GuestMemoryMmap, at: u64, desc: (u64, u32, u16, u16)) {
        let (addr, len, flags, next) = desc;
        mem.write_obj(Descriptor::new(addr, len, flags, next), GuestAddress(at))
            .unwrap();
    }

    fn fields(desc: &Descriptor) -> (u64, u32, u16, u16) {
        (desc.addr().0, desc.len(), desc.flags(), desc.next())
    }

    /// A queue over `table` offering every head once, in order.
    fn queue_offering_all(mem: &GuestMemoryMmap, table: u64) -> Queue {
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_desc_table_address(Some(table as u32), Some((table >> 32) as u32));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        for head in 0..SIZE {
            mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(head)))
                .unwrap();
        }
        mem.write_obj(SIZE, GuestAddress(AVAIL + 2)).unwrap();
        queue
    }

    /// A random descriptor: flags from every combination of NEXT, WRITE and INDIRECT, `next`
    /// sometimes past the table, lengths sometimes valid indirect lengths, sometimes huge,
    /// addresses near the places indirect tables are put.
    fn random_desc(rng: &mut Rng, indirect_at: &[u64]) -> (u64, u32, u16, u16) {
        let flags = rng.below(8) as u16;
        let next = rng.below(u64::from(SIZE) + 4) as u16;
        let len = match rng.below(4) {
            0 => 16 * rng.below(6) as u32,
            1 => rng.below(64) as u32,
            2 => u32::MAX - rng.below(16) as u32,
            _ => 0x8000_0000,
        };
        let addr = match rng.below(3) {
            0 => indirect_at[rng.below(indirect_at.len() as u64) as usize],
            1 => rng.below(MEM_END + 64),
            _ => rng.next(),
        };
        (addr, len, flags, next)
    }

    #[test]
    fn walks_like_virtio_queue_on_random_tables() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut mapped, mut unmapped, mut descriptors) = (0, 0, 0);
        for round in 0..2000 {
            let mem = memory();
            // The queue's table: aligned in one region, or across the region boundary.
            let table = if round % 3 == 0 {
                BOUNDARY - 16 * (1 + rng.below(u64::from(SIZE) - 1))
            } else {
                0x4000 + 16 * rng.below(64)
            };
            // Places for indirect tables: aligned, misaligned, across the boundary, at the end
            // of memory.
            let indirect_at = [0x8000, 0x9003, BOUNDARY - 24, MEM_END - 32, table];
            for &at in &indirect_at[..4] {
                for i in 0..4 {
                    if at + 16 * (i + 1) <= MEM_END {
                        write_desc(&mem, at + 16 * i, random_desc(&mut rng, &indirect_at));
                    }
                }
            }
            for i in 0..u64::from(SIZE) {
                write_desc(&mem, table + 16 * i, random_desc(&mut rng, &indirect_at));
            }
            // Some chains valid from end to end: head 0 -> 1 -> indirect table at 0x8000.
            if round % 2 == 0 {
                write_desc(&mem, table, (0x100, 64, NEXT, 1));
                write_desc(&mem, table + 16, (0x8000, 48, INDIRECT, 0));
                write_desc(&mem, 0x8000, (0x200, 16, NEXT, 1));
                write_desc(&mem, 0x8010, (0x300, 32, NEXT | WRITE, 2));
                write_desc(&mem, 0x8020, (0x400, 1, WRITE, 0));
            }
            let mut queue = queue_offering_all(&mem, table);
            let chain_table = ChainTable::map(&mem, GuestAddress(table), GuestAddress(AVAIL), SIZE);
            if chain_table.table.host.is_some() {
                mapped += 1;
            } else {
                unmapped += 1;
            }
            while let Some(popped) = queue.pop_descriptor_chain(&mem) {
                let position = queue.next_avail().wrapping_sub(1);
                let ours = Chain::split(popped.head_index(), position, &chain_table);
                let theirs: Vec<_> = popped.clone().map(|d| fields(&d)).collect();
                // virtio-queue's view, made when asked, is the same chain.
                let lazy = ours
                    .descriptor_chain()
                    .expect("the entry still holds the head");
                assert_eq!(lazy.head_index(), popped.head_index());
                let lazy: Vec<_> = lazy.map(|d| fields(&d)).collect();
                assert_eq!(lazy, theirs, "round {round}: descriptor_chain()");
                let mut walked = ours.clone();
                let got: Vec<_> = walked.by_ref().map(|d| fields(&d)).collect();
                assert_eq!(got, theirs, "round {round}, head {}", popped.head_index());
                assert!(walked.next().is_none(), "a finished walk stays finished");
                let writable: Vec<_> = ours.clone().writable().map(|d| fields(&d)).collect();
                let expected: Vec<_> = popped.clone().writable().map(|d| fields(&d)).collect();
                assert_eq!(writable, expected);
                let readable: Vec<_> = ours.readable().map(|d| fields(&d)).collect();
                let expected: Vec<_> = popped.readable().map(|d| fields(&d)).collect();
                assert_eq!(readable, expected);
                descriptors += got.len();
            }
        }
        assert!(
            mapped > 0 && unmapped > 0,
            "{mapped} mapped, {unmapped} not"
        );
        assert!(descriptors > 5000, "only {descriptors} descriptors walked");
    }

    #[test]
    fn indirect_chain_is_read_through_the_mapping() {
        let mem = memory();
        write_desc(&mem, 0x4000, (0x8000, 32, INDIRECT, 0));
        write_desc(&mem, 0x8000, (0x100, 12, NEXT, 1));
        write_desc(&mem, 0x8010, (0x200, 34, WRITE, 0));
        let mut queue = queue_offering_all(&mem, 0x4000);
        let table = ChainTable::map(&mem, GuestAddress(0x4000), GuestAddress(AVAIL), SIZE);
        let head = queue.pop_descriptor_chain(&mem).unwrap().head_index();
        let mut chain = Chain::split(head, 0, &table);
        assert_eq!(chain.head_index(), 0);
        assert_eq!(fields(&chain.next().unwrap()), (0x100, 12, NEXT, 1));
        assert!(chain.in_indirect && chain.table.host.is_some());
        assert_eq!(fields(&chain.next().unwrap()), (0x200, 34, WRITE, 0));
        assert!(chain.next().is_none());
        // The virtio-queue view of the same chain starts from the head again.
        let again: Vec<_> = chain.descriptor_chain().unwrap().map(|d| d.len()).collect();
        assert_eq!(again, vec![12, 34]);
        assert!(std::ptr::eq(chain.memory(), &mem));
    }

    #[test]
    fn table_across_two_regions_is_read_entry_by_entry() {
        let mem = memory();
        let table = BOUNDARY - 32;
        write_desc(&mem, table, (0x100, 1, NEXT, 3));
        write_desc(&mem, table + 48, (0x300, 3, WRITE, 0));
        let mut queue = queue_offering_all(&mem, table);
        let chain_table = ChainTable::map(&mem, GuestAddress(table), GuestAddress(AVAIL), SIZE);
        assert!(chain_table.table.host.is_none());
        let head = queue.pop_descriptor_chain(&mem).unwrap().head_index();
        let chain = Chain::split(head, 0, &chain_table);
        let lens: Vec<_> = chain.map(|d| d.len()).collect();
        assert_eq!(lens, vec![1, 3]);
    }

    #[test]
    fn descriptor_chain_is_none_once_the_entry_changed() {
        let mem = memory();
        write_desc(&mem, 0x4000, (0x100, 12, 0, 0));
        write_desc(&mem, 0x4010, (0x200, 34, 0, 0));
        let _queue = queue_offering_all(&mem, 0x4000);
        let table = ChainTable::map(&mem, GuestAddress(0x4000), GuestAddress(AVAIL), SIZE);
        let chain = Chain::split(0, 0, &table);
        let lens: Vec<_> = chain.descriptor_chain().unwrap().map(|d| d.len()).collect();
        assert_eq!(lens, vec![12]);
        // The driver rewrites the entry it published: virtio-queue would pop another chain.
        mem.write_obj(1u16.to_le(), GuestAddress(AVAIL + 4))
            .unwrap();
        assert!(chain.descriptor_chain().is_none());
        // The chain itself is the one the device was handed.
        assert_eq!(chain.map(|d| d.len()).collect::<Vec<_>>(), vec![12]);
    }
}
