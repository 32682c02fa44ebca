//! Inflight I/O tracking (vhost-user spec, "Inflight I/O tracking"): the shared area in which a
//! backend records every descriptor chain it popped and has not yet put in the used ring, so
//! that a backend started after a crash or an upgrade can serve those chains again.
//!
//! # Layout
//!
//! The area is one region per queue, each starting on a 64-byte boundary (as libvhost-user
//! and QEMU lay it out: the frontend only stores it, the backends agree on it). For a split
//! ring a region is a [`QueueRegionSplit`] header followed by `desc_num` [`DescStateSplit`]
//! entries, one per descriptor of the ring; for a packed ring a [`QueueRegionPacked`] header
//! and [`DescStatePacked`] entries (types only: vu serves split rings). The `repr(C)` types
//! are the layout; the byte offsets used to read and write it are taken from them with
//! `offset_of!`, and a test checks each against the C structures of the specification.
//!
//! # Never trusting the area
//!
//! The area is frontend memory: any byte of it may be anything, and may change at any time.
//! [`InflightRegion`] reads and writes it only through a [`VolatileSlice`] whose every access
//! is bounds checked; indices read from it (`last_batch_head`, `next`) are checked against
//! `desc_num` before use; a walk of the batch list takes at most `desc_num` steps. Contents
//! that cannot be right (a version other than 0 or 1, a `desc_num` other than the queue
//! size, a used index more than the queue size ahead, a list index past the ring, an
//! `inflight` flag other than 0 or 1) are refused with an [`InflightError`].
//!
//! # The protocol
//!
//! [`InflightRegion::record`] marks a popped chain: its counter, then its flag. A batch of
//! completions is linked into the last-batch list ([`InflightRegion::link_batch`]), then the
//! used ring is written and its index published, then the flags are cleared and the region's
//! `used_idx` is set to the published index ([`InflightRegion::finish_batch`]). The list is
//! linked so that walking `k` entries from `last_batch_head` finds the first `k` completions
//! of the batch: a crash after publishing only some of them is undone exactly.
//! [`InflightRegion::reconcile`] is the reconnect step: it clears the flags of the entries the
//! used ring shows as completed and returns the others, oldest first.

use std::fs::File;
use std::mem::{offset_of, size_of};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, VolatileSlice};

use crate::sys::SharedMapping;

/// The `version` of a region in use: "It's 1 currently. Zero value indicates an
/// uninitialized buffer".
pub const INFLIGHT_VERSION: u16 = 1;

/// Each queue's region starts on a 64-byte boundary.
pub const QUEUE_REGION_ALIGN: u64 = 64;

/// The spec's `DescStateSplit`: the state of one descriptor of a split ring.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescStateSplit {
    /// "Indicate whether this descriptor is inflight or not. Only available for
    /// head-descriptor."
    pub inflight: u8,
    /// Padding.
    pub padding: [u8; 5],
    /// "Maintain a list for the last batch of used descriptors."
    pub next: u16,
    /// "Used to preserve the order of fetching available descriptors."
    pub counter: u64,
}

/// The spec's `QueueRegionSplit` header, followed in the area by `desc_num`
/// [`DescStateSplit`] entries.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueRegionSplit {
    /// "The feature flags of this region. Now it's initialized to 0."
    pub features: u64,
    /// "The version of this region. It's 1 currently. Zero value indicates an uninitialized
    /// buffer."
    pub version: u16,
    /// "The size of DescStateSplit array. It's equal to the virtqueue size."
    pub desc_num: u16,
    /// "The head of list that track the last batch of used descriptors."
    pub last_batch_head: u16,
    /// "Store the idx value of used ring."
    pub used_idx: u16,
}

/// The spec's `DescStatePacked`: the state of one descriptor of a packed ring (a type for
/// when packed rings are served; nothing reads it yet).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescStatePacked {
    /// Whether this descriptor is inflight (head descriptors only).
    pub inflight: u8,
    /// Padding.
    pub padding: u8,
    /// "Link to the next free entry."
    pub next: u16,
    /// "Link to the last entry of descriptor list."
    pub last: u16,
    /// "The length of descriptor list."
    pub num: u16,
    /// "Used to preserve the order of fetching available descriptors."
    pub counter: u64,
    /// "The buffer id."
    pub id: u16,
    /// "The descriptor flags."
    pub flags: u16,
    /// "The buffer length."
    pub len: u32,
    /// "The buffer address."
    pub addr: u64,
}

/// The spec's `QueueRegionPacked` header, followed by `desc_num` [`DescStatePacked`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueRegionPacked {
    /// "The feature flags of this region. Now it's initialized to 0."
    pub features: u64,
    /// The version of this region (1; 0 for an uninitialised buffer).
    pub version: u16,
    /// "The size of DescStatePacked array. It's equal to the virtqueue size."
    pub desc_num: u16,
    /// "The head of free DescStatePacked entry list."
    pub free_head: u16,
    /// "The old head of free DescStatePacked entry list."
    pub old_free_head: u16,
    /// "The used index of descriptor ring."
    pub used_idx: u16,
    /// "The old used index of descriptor ring."
    pub old_used_idx: u16,
    /// "Device ring wrap counter."
    pub used_wrap_counter: u8,
    /// "The old device ring wrap counter."
    pub old_used_wrap_counter: u8,
    /// Padding.
    pub padding: [u8; 7],
}

/// Byte offsets into a split region, from the types.
const VERSION: usize = offset_of!(QueueRegionSplit, version);
const DESC_NUM: usize = offset_of!(QueueRegionSplit, desc_num);
const LAST_BATCH_HEAD: usize = offset_of!(QueueRegionSplit, last_batch_head);
const USED_IDX: usize = offset_of!(QueueRegionSplit, used_idx);
const SPLIT_HEADER: usize = size_of::<QueueRegionSplit>();
const SPLIT_DESC: usize = size_of::<DescStateSplit>();
const DESC_INFLIGHT: usize = offset_of!(DescStateSplit, inflight);
const DESC_NEXT: usize = offset_of!(DescStateSplit, next);
const DESC_COUNTER: usize = offset_of!(DescStateSplit, counter);

/// Bytes of one queue's region for rings of `queue_size` descriptors, rounded up to
/// [`QUEUE_REGION_ALIGN`].
pub fn queue_region_size(queue_size: u16, packed: bool) -> u64 {
    let (header, desc) = if packed {
        (size_of::<QueueRegionPacked>(), size_of::<DescStatePacked>())
    } else {
        (SPLIT_HEADER, SPLIT_DESC)
    };
    // At most 32 + 32 * 65535: no overflow.
    (header as u64 + desc as u64 * u64::from(queue_size)).next_multiple_of(QUEUE_REGION_ALIGN)
}

/// Bytes of the whole area for `num_queues` queues of `queue_size` descriptors.
pub fn area_size(num_queues: u16, queue_size: u16, packed: bool) -> u64 {
    queue_region_size(queue_size, packed) * u64::from(num_queues)
}

/// Crash injection for the tests: every store of the inflight protocol (to the area and to the
/// used ring) asks [`crash::store_allowed`] first; a test lets the first `n` through and
/// drops the rest, which leaves memory exactly as a process killed after its `n`-th store
/// would. Outside tests the check is a constant `true`.
pub(crate) mod crash {
    #[cfg(test)]
    use std::cell::Cell;

    #[cfg(test)]
    thread_local! {
        /// Stores still allowed; `None`: all.
        static LEFT: Cell<Option<u64>> = const { Cell::new(None) };
        /// Stores asked for since the last [`arm`].
        static ASKED: Cell<u64> = const { Cell::new(0) };
    }

    /// Whether the next store happens (always, outside tests).
    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) fn store_allowed() -> bool {
        true
    }

    /// Whether the next store happens: not once the armed budget is spent.
    #[cfg(test)]
    pub(crate) fn store_allowed() -> bool {
        ASKED.with(|a| a.set(a.get() + 1));
        LEFT.with(|left| match left.get() {
            None => true,
            Some(0) => false,
            Some(n) => {
                left.set(Some(n - 1));
                true
            }
        })
    }

    /// Lets `budget` more stores through on this thread (`None`: all), and restarts the count.
    #[cfg(test)]
    pub(crate) fn arm(budget: Option<u64>) {
        LEFT.with(|left| left.set(budget));
        ASKED.with(|a| a.set(0));
    }

    /// Stores asked for on this thread since the last [`arm`].
    #[cfg(test)]
    pub(crate) fn asked() -> u64 {
        ASKED.with(Cell::get)
    }
}

/// What is wrong with an inflight area or its contents.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum InflightError {
    /// The mapped bytes are fewer than the layout needs.
    #[error("the inflight area has {size} bytes, its layout needs {needed}")]
    TooSmall {
        /// Bytes available.
        size: u64,
        /// Bytes the layout needs.
        needed: u64,
    },
    /// Mapping the frontend's fd failed.
    #[error("mapping the inflight area failed: {0}")]
    Map(String),
    /// A region's `version` is neither 0 (uninitialised) nor 1.
    #[error("inflight region version {version} (expected 0 or 1)")]
    Version {
        /// The version found.
        version: u16,
    },
    /// A region's `desc_num` is not the queue size of the description.
    #[error("inflight region desc_num {desc_num}, expected {expected}")]
    DescNum {
        /// The value found.
        desc_num: u16,
        /// The queue size of the description.
        expected: u16,
    },
    /// The used ring's index is more than `desc_num` ahead of the region's `used_idx`.
    #[error(
        "inflight used_idx {recorded} is {ahead} behind the used ring's index (ring of {desc_num})"
    )]
    UsedIdx {
        /// The region's `used_idx`.
        recorded: u16,
        /// How far the used ring's index is ahead.
        ahead: u16,
        /// The ring size.
        desc_num: u16,
    },
    /// A descriptor index found in the area is past the ring.
    #[error("inflight {field} {index} is past the ring of {desc_num} descriptors")]
    Index {
        /// Which field held it.
        field: &'static str,
        /// The index.
        index: u16,
        /// The ring size.
        desc_num: u16,
    },
    /// A descriptor's `inflight` flag is neither 0 nor 1.
    #[error("inflight flag {value} of descriptor {index} (expected 0 or 1)")]
    Flag {
        /// The descriptor.
        index: u16,
        /// The value found.
        value: u8,
    },
    /// The region's `desc_num` does not match the size of the ring it tracks.
    #[error("inflight region of {desc_num} descriptors for a ring of {queue_size}")]
    RingSize {
        /// The region's `desc_num`.
        desc_num: u16,
        /// The ring's size.
        queue_size: u16,
    },
    /// A queue's region is wrong; `source` says how.
    #[error("queue {queue}: {source}")]
    Queue {
        /// The queue.
        queue: u16,
        /// What is wrong with its region.
        source: Box<InflightError>,
    },
    /// An access fell outside the mapped bytes (the region was sized wrong).
    #[error("inflight access at offset {offset} outside the region")]
    OutOfBounds {
        /// The byte offset.
        offset: usize,
    },
}

/// An inflight area mapped in this process: `num_queues` split-ring regions of `queue_size`
/// descriptors. Cheap to clone; the mapping lives while a clone or an [`InflightQueue`] does.
#[derive(Debug, Clone)]
pub struct InflightArea {
    map: Arc<Mapping>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightArea {
    /// Maps `size` bytes of `file` from `offset` as the area for `num_queues` split rings of
    /// `queue_size` descriptors, and checks every region's header: version 0 or 1, and
    /// `desc_num` equal to `queue_size` once initialised.
    ///
    /// The file must hold the layout's bytes from `offset` (checked with `fstat`: a mapping
    /// past the end of a file faults on access).
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let needed = area_size(num_queues, queue_size, false);
        if size < needed {
            return Err(InflightError::TooSmall { size, needed });
        }
        // Only the bytes of the layout are mapped.
        let map = map_area(&file, offset, needed)?;
        let area = InflightArea {
            map: Arc::new(map),
            num_queues,
            queue_size,
        };
        for queue in 0..num_queues {
            if let Some(q) = area.queue(queue) {
                q.region()
                    .and_then(|r| r.check_header(queue_size))
                    .map_err(|source| InflightError::Queue {
                        queue,
                        source: Box::new(source),
                    })?;
            }
        }
        Ok(area)
    }

    /// The number of queues.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The queue size every region was laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The region of queue `index`, or `None` past the last queue.
    pub fn queue(&self, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        let stride = usize::try_from(queue_region_size(self.queue_size, false)).ok()?;
        Some(InflightQueue {
            map: Arc::clone(&self.map),
            offset: stride.checked_mul(usize::from(index))?,
            desc_num: self.queue_size,
        })
    }
}

/// The inflight area's mapping (the raw memory lives in `sys`).
type Mapping = SharedMapping;

/// Maps `len` bytes of `file` from `offset`, after checking that the file holds them.
fn map_area(file: &File, offset: u64, len: u64) -> Result<Mapping, InflightError> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| InflightError::Map(format!("offset {offset} + {len} overflows")))?;
    let file_len = file
        .metadata()
        .map_err(|e| InflightError::Map(e.to_string()))?
        .len();
    if file_len < end {
        return Err(InflightError::TooSmall {
            size: file_len.saturating_sub(offset),
            needed: len,
        });
    }
    if len == 0 {
        return Err(InflightError::TooSmall { size: 0, needed: 1 });
    }
    SharedMapping::map(file, offset, len).map_err(|e| InflightError::Map(e.to_string()))
}

/// One queue's region of a mapped [`InflightArea`], kept by the vring that records into it.
#[derive(Debug, Clone)]
pub struct InflightQueue {
    map: Arc<Mapping>,
    offset: usize,
    desc_num: u16,
}

impl InflightQueue {
    /// The typed view of the region.
    pub fn region(&self) -> Result<InflightRegion<'_>, InflightError> {
        let len = SPLIT_HEADER + SPLIT_DESC * usize::from(self.desc_num);
        let slice = self
            .map
            .slice(self.offset, len)
            .ok_or(InflightError::OutOfBounds {
                offset: self.offset,
            })?;
        InflightRegion::new(slice, self.desc_num)
    }

    /// The number of descriptors the region tracks.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }
}

/// What [`InflightRegion::reconcile`] found: the chains to serve again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resubmit {
    /// Head indices still in flight, oldest (lowest counter) first.
    pub heads: Vec<u16>,
    /// The counter to give the next popped chain.
    pub next_counter: u64,
    /// Whether the region was uninitialised (version 0) and has now been initialised.
    pub initialised: bool,
}

/// A typed, bounds-checked view of one split-ring queue region.
///
/// Every access goes through the slice's checked volatile reads and writes; an access
/// outside it is [`InflightError::OutOfBounds`], never undefined behaviour.
#[derive(Debug, Clone, Copy)]
pub struct InflightRegion<'a> {
    slice: VolatileSlice<'a, ()>,
    desc_num: u16,
}

impl<'a> InflightRegion<'a> {
    /// A view of `slice` as a region of `desc_num` descriptors; refuses a slice shorter than
    /// the header and `desc_num` entries.
    pub fn new(slice: VolatileSlice<'a, ()>, desc_num: u16) -> Result<Self, InflightError> {
        let needed = SPLIT_HEADER + SPLIT_DESC * usize::from(desc_num);
        if slice.len() < needed {
            return Err(InflightError::TooSmall {
                size: slice.len() as u64,
                needed: needed as u64,
            });
        }
        Ok(InflightRegion { slice, desc_num })
    }

    /// The number of descriptors this view tracks.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// One field: an aligned atomic load (the area's mapping is page aligned, so every field
    /// is naturally aligned), or a volatile copy for a view that is not (a test buffer).
    fn read<T: vm_memory::AtomicAccess>(&self, offset: usize) -> Result<T, InflightError> {
        self.slice
            .load(offset, Ordering::Acquire)
            .or_else(|_| self.slice.read_obj(offset))
            .map_err(|_| InflightError::OutOfBounds { offset })
    }

    /// One field, stored in program order with the others (`Release`), so that a process
    /// killed at any instruction leaves the stores before it, and only those, in the area.
    fn write<T: vm_memory::AtomicAccess>(
        &self,
        value: T,
        offset: usize,
    ) -> Result<(), InflightError> {
        if !crash::store_allowed() {
            return Ok(());
        }
        self.slice
            .store(value, offset, Ordering::Release)
            .or_else(|_| self.slice.write_obj(value, offset))
            .map_err(|_| InflightError::OutOfBounds { offset })
    }

    /// The byte offset of field `field` of descriptor `index`, checked against `desc_num`.
    fn desc(&self, index: u16, field: usize, name: &'static str) -> Result<usize, InflightError> {
        if index >= self.desc_num {
            return Err(InflightError::Index {
                field: name,
                index,
                desc_num: self.desc_num,
            });
        }
        Ok(SPLIT_HEADER + SPLIT_DESC * usize::from(index) + field)
    }

    /// The header's `version`.
    pub fn version(&self) -> Result<u16, InflightError> {
        self.read::<u16>(VERSION).map(u16::from_le)
    }

    /// The header's `desc_num` as stored in the area.
    pub fn stored_desc_num(&self) -> Result<u16, InflightError> {
        self.read::<u16>(DESC_NUM).map(u16::from_le)
    }

    /// The header's `last_batch_head`.
    pub fn last_batch_head(&self) -> Result<u16, InflightError> {
        self.read::<u16>(LAST_BATCH_HEAD).map(u16::from_le)
    }

    /// The header's `used_idx`.
    pub fn used_idx(&self) -> Result<u16, InflightError> {
        self.read::<u16>(USED_IDX).map(u16::from_le)
    }

    /// Descriptor `index`'s `inflight` flag.
    pub fn inflight(&self, index: u16) -> Result<u8, InflightError> {
        self.read(self.desc(index, DESC_INFLIGHT, "descriptor")?)
    }

    /// Descriptor `index`'s `counter`.
    pub fn counter(&self, index: u16) -> Result<u64, InflightError> {
        self.read::<u64>(self.desc(index, DESC_COUNTER, "descriptor")?)
            .map(u64::from_le)
    }

    /// Descriptor `index`'s `next`.
    pub fn next(&self, index: u16) -> Result<u16, InflightError> {
        self.read::<u16>(self.desc(index, DESC_NEXT, "descriptor")?)
            .map(u16::from_le)
    }

    /// Refuses a header that cannot be right for a queue of `queue_size` (see the module
    /// documentation).
    pub fn check_header(&self, queue_size: u16) -> Result<(), InflightError> {
        match self.version()? {
            0 => Ok(()),
            INFLIGHT_VERSION => {
                let desc_num = self.stored_desc_num()?;
                if desc_num == queue_size && desc_num == self.desc_num {
                    Ok(())
                } else {
                    Err(InflightError::DescNum {
                        desc_num,
                        expected: queue_size,
                    })
                }
            }
            version => Err(InflightError::Version { version }),
        }
    }

    /// Records that the chain at `head` was popped: "Set `desc[i].counter` to the value of
    /// global counter", then "Set `desc[i].inflight` to 1".
    pub fn record(&self, head: u16, counter: u64) -> Result<(), InflightError> {
        self.write(counter.to_le(), self.desc(head, DESC_COUNTER, "head")?)?;
        self.write(1u8, self.desc(head, DESC_INFLIGHT, "head")?)
    }

    /// Links the completions `heads` (in the order their used elements are written) into the
    /// last-batch list: "Set `desc[i].next` to `last_batch_head`; set `last_batch_head` to
    /// `i`", in reverse, so that the list from `last_batch_head` starts with `heads[0]`.
    pub fn link_batch(
        &self,
        heads: impl DoubleEndedIterator<Item = u16>,
    ) -> Result<(), InflightError> {
        let mut last = self.last_batch_head()?;
        for head in heads.rev() {
            self.write(last.to_le(), self.desc(head, DESC_NEXT, "head")?)?;
            self.write(head.to_le(), LAST_BATCH_HEAD)?;
            last = head;
        }
        Ok(())
    }

    /// After the used index `used_idx` was published: "Set the `inflight` field of each
    /// `DescStateSplit` entry in the batch to 0", then "Set `used_idx` to the `idx` value of
    /// used ring".
    pub fn finish_batch(
        &self,
        heads: impl Iterator<Item = u16>,
        used_idx: u16,
    ) -> Result<(), InflightError> {
        for head in heads {
            self.write(0u8, self.desc(head, DESC_INFLIGHT, "head")?)?;
        }
        self.write(used_idx.to_le(), USED_IDX)
    }

    /// The reconnect step, given the used ring's index `ring_used_idx` read from guest memory.
    ///
    /// An uninitialised region (version 0) is initialised (features 0, version 1, `desc_num`,
    /// `used_idx` = `ring_used_idx`) and nothing is resubmitted. Otherwise, when `used_idx`
    /// lags the ring's, the entries of the last batch the ring shows as used are cleared and
    /// `used_idx` catches up; then every descriptor still marked is returned, oldest first
    /// (ties, which only a hostile area holds, by index).
    pub fn reconcile(&self, ring_used_idx: u16) -> Result<Resubmit, InflightError> {
        let desc_num = self.desc_num;
        match self.version()? {
            0 => {
                self.write(0u64, offset_of!(QueueRegionSplit, features))?;
                self.write(desc_num.to_le(), DESC_NUM)?;
                self.write(0u16, LAST_BATCH_HEAD)?;
                self.write(ring_used_idx.to_le(), USED_IDX)?;
                for index in 0..desc_num {
                    self.write(0u8, self.desc(index, DESC_INFLIGHT, "descriptor")?)?;
                }
                self.write(INFLIGHT_VERSION.to_le(), VERSION)?;
                return Ok(Resubmit {
                    heads: Vec::new(),
                    next_counter: 0,
                    initialised: true,
                });
            }
            INFLIGHT_VERSION => {}
            version => return Err(InflightError::Version { version }),
        }
        let stored = self.stored_desc_num()?;
        if stored != desc_num {
            return Err(InflightError::DescNum {
                desc_num: stored,
                expected: desc_num,
            });
        }
        let recorded = self.used_idx()?;
        let ahead = ring_used_idx.wrapping_sub(recorded);
        if ahead > desc_num {
            return Err(InflightError::UsedIdx {
                recorded,
                ahead,
                desc_num,
            });
        }
        if ahead != 0 {
            let mut head = self.last_batch_head()?;
            for step in 0..ahead {
                let offset = self.desc(head, DESC_INFLIGHT, "last batch entry")?;
                self.write(0u8, offset)?;
                if step + 1 < ahead {
                    head = self.next(head)?;
                }
            }
            self.write(ring_used_idx.to_le(), USED_IDX)?;
        }
        let mut found = Vec::new();
        for index in 0..desc_num {
            match self.inflight(index)? {
                0 => {}
                1 => found.push((self.counter(index)?, index)),
                value => return Err(InflightError::Flag { index, value }),
            }
        }
        found.sort_unstable();
        let next_counter = found.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Ok(Resubmit {
            heads: found.into_iter().map(|(_, head)| head).collect(),
            next_counter,
            initialised: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region of `desc_num` descriptors over a byte buffer.
    fn region(buf: &mut [u8], desc_num: u16) -> InflightRegion<'_> {
        InflightRegion::new(VolatileSlice::from(buf), desc_num).unwrap()
    }

    fn buffer(desc_num: u16) -> Vec<u8> {
        vec![0; SPLIT_HEADER + SPLIT_DESC * usize::from(desc_num)]
    }

    /// A version-1 region of 8 descriptors whose `used_idx` is `used_idx`.
    fn initialised(buf: &mut [u8], used_idx: u16) {
        region(buf, 8).reconcile(used_idx).unwrap();
    }

    fn put_u16(buf: &mut [u8], at: usize, v: u16) {
        buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(buf: &mut [u8], at: usize, v: u64) {
        buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Byte offset of descriptor `i` in a split region.
    fn desc_at(i: usize) -> usize {
        16 + 16 * i
    }

    #[test]
    fn split_layout_matches_the_spec_byte_for_byte() {
        // The C structures of the specification, field by field (no packing: natural
        // alignment).
        assert_eq!(size_of::<DescStateSplit>(), 16);
        assert_eq!(offset_of!(DescStateSplit, inflight), 0);
        assert_eq!(offset_of!(DescStateSplit, padding), 1);
        assert_eq!(offset_of!(DescStateSplit, next), 6);
        assert_eq!(offset_of!(DescStateSplit, counter), 8);
        assert_eq!(size_of::<QueueRegionSplit>(), 16);
        assert_eq!(offset_of!(QueueRegionSplit, features), 0);
        assert_eq!(offset_of!(QueueRegionSplit, version), 8);
        assert_eq!(offset_of!(QueueRegionSplit, desc_num), 10);
        assert_eq!(offset_of!(QueueRegionSplit, last_batch_head), 12);
        assert_eq!(offset_of!(QueueRegionSplit, used_idx), 14);
    }

    #[test]
    fn packed_layout_matches_the_spec_byte_for_byte() {
        assert_eq!(size_of::<DescStatePacked>(), 32);
        assert_eq!(offset_of!(DescStatePacked, inflight), 0);
        assert_eq!(offset_of!(DescStatePacked, padding), 1);
        assert_eq!(offset_of!(DescStatePacked, next), 2);
        assert_eq!(offset_of!(DescStatePacked, last), 4);
        assert_eq!(offset_of!(DescStatePacked, num), 6);
        assert_eq!(offset_of!(DescStatePacked, counter), 8);
        assert_eq!(offset_of!(DescStatePacked, id), 16);
        assert_eq!(offset_of!(DescStatePacked, flags), 18);
        assert_eq!(offset_of!(DescStatePacked, len), 20);
        assert_eq!(offset_of!(DescStatePacked, addr), 24);
        assert_eq!(size_of::<QueueRegionPacked>(), 32);
        assert_eq!(offset_of!(QueueRegionPacked, features), 0);
        assert_eq!(offset_of!(QueueRegionPacked, version), 8);
        assert_eq!(offset_of!(QueueRegionPacked, desc_num), 10);
        assert_eq!(offset_of!(QueueRegionPacked, free_head), 12);
        assert_eq!(offset_of!(QueueRegionPacked, old_free_head), 14);
        assert_eq!(offset_of!(QueueRegionPacked, used_idx), 16);
        assert_eq!(offset_of!(QueueRegionPacked, old_used_idx), 18);
        assert_eq!(offset_of!(QueueRegionPacked, used_wrap_counter), 20);
        assert_eq!(offset_of!(QueueRegionPacked, old_used_wrap_counter), 21);
        assert_eq!(offset_of!(QueueRegionPacked, padding), 22);
    }

    #[test]
    fn region_sizes_are_those_libvhost_user_computes() {
        // libvhost-user sizes a split region as 16 * queue_size + 2 rounded up to 64 bytes
        // (its header's fields before `desc[]` and the alignment); the header here is the
        // spec's 16 bytes. Both round to the same size for every queue size.
        for queue_size in [1u16, 2, 4, 64, 128, 256, 1024, 32768] {
            let theirs = (16 * u64::from(queue_size) + 2).next_multiple_of(64);
            assert_eq!(queue_region_size(queue_size, false), theirs, "{queue_size}");
        }
        assert_eq!(area_size(2, 128, false), 2 * 2112);
        assert_eq!(area_size(1, 4, true), 192);
    }

    #[test]
    fn stores_land_on_the_spec_offsets_little_endian() {
        let mut buf = buffer(8);
        {
            let r = region(&mut buf, 8);
            r.reconcile(0x0102).unwrap();
            r.record(3, 0x1122_3344_5566_7788).unwrap();
            r.link_batch([3u16].into_iter()).unwrap();
            r.finish_batch([3u16].into_iter(), 0x0103).unwrap();
        }
        assert_eq!(&buf[0..8], &[0; 8], "features");
        assert_eq!(&buf[8..10], &[1, 0], "version");
        assert_eq!(&buf[10..12], &[8, 0], "desc_num");
        assert_eq!(&buf[12..14], &[3, 0], "last_batch_head");
        assert_eq!(&buf[14..16], &[0x03, 0x01], "used_idx");
        let d = desc_at(3);
        assert_eq!(buf[d], 0, "inflight cleared");
        assert_eq!(
            &buf[d + 6..d + 8],
            &[0, 0],
            "next: the previous last_batch_head"
        );
        assert_eq!(
            &buf[d + 8..d + 16],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11],
            "counter"
        );
    }

    #[test]
    fn uninitialised_region_is_initialised_and_resubmits_nothing() {
        let mut buf = buffer(8);
        buf[desc_at(2)] = 1; // stale garbage in a fresh area is cleared
        let found = region(&mut buf, 8).reconcile(5).unwrap();
        assert!(found.initialised);
        assert!(found.heads.is_empty());
        let r = region(&mut buf, 8);
        assert_eq!(r.version().unwrap(), INFLIGHT_VERSION);
        assert_eq!(r.stored_desc_num().unwrap(), 8);
        assert_eq!(r.used_idx().unwrap(), 5);
        assert_eq!(r.inflight(2).unwrap(), 0);
    }

    #[test]
    fn inflight_heads_come_back_in_counter_order() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        let r = region(&mut buf, 8);
        r.record(6, 10).unwrap();
        r.record(1, 11).unwrap();
        r.record(4, 12).unwrap();
        let found = r.reconcile(0).unwrap();
        assert_eq!(found.heads, vec![6, 1, 4]);
        assert_eq!(found.next_counter, 13);
    }

    #[test]
    fn completions_the_used_ring_shows_are_not_resubmitted() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        let r = region(&mut buf, 8);
        for (counter, head) in [5u16, 2, 7].into_iter().enumerate() {
            r.record(head, counter as u64).unwrap();
        }
        // Batch [2, 7] linked, both used elements published (used idx 2), flags not cleared.
        r.link_batch([2u16, 7].into_iter()).unwrap();
        let found = r.reconcile(2).unwrap();
        assert_eq!(found.heads, vec![5]);
        assert_eq!(r.used_idx().unwrap(), 2);
    }

    #[test]
    fn a_partly_published_batch_clears_exactly_its_published_part() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        let r = region(&mut buf, 8);
        for (counter, head) in [5u16, 2, 7].into_iter().enumerate() {
            r.record(head, counter as u64).unwrap();
        }
        r.link_batch([2u16, 7, 5].into_iter()).unwrap();
        // Only the first element (head 2) reached the used ring.
        assert_eq!(r.reconcile(1).unwrap().heads, vec![5, 7]);
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut buf = buffer(8);
        put_u16(&mut buf, 8, 7);
        let r = region(&mut buf, 8);
        assert_eq!(r.reconcile(0), Err(InflightError::Version { version: 7 }));
        assert_eq!(
            r.check_header(8),
            Err(InflightError::Version { version: 7 })
        );
    }

    #[test]
    fn mismatched_desc_num_is_refused() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        put_u16(&mut buf, 10, 16);
        let r = region(&mut buf, 8);
        let err = InflightError::DescNum {
            desc_num: 16,
            expected: 8,
        };
        assert_eq!(r.reconcile(0), Err(err.clone()));
        assert_eq!(r.check_header(8), Err(err));
    }

    #[test]
    fn used_idx_further_behind_than_the_ring_is_refused() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        let r = region(&mut buf, 8);
        assert_eq!(
            r.reconcile(9),
            Err(InflightError::UsedIdx {
                recorded: 0,
                ahead: 9,
                desc_num: 8
            })
        );
    }

    #[test]
    fn last_batch_head_past_the_ring_is_refused() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        put_u16(&mut buf, 12, 8);
        assert!(matches!(
            region(&mut buf, 8).reconcile(1),
            Err(InflightError::Index { index: 8, .. })
        ));
    }

    #[test]
    fn batch_list_link_past_the_ring_is_refused() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        put_u16(&mut buf, 12, 3);
        put_u16(&mut buf, desc_at(3) + 6, 0xffff);
        assert!(matches!(
            region(&mut buf, 8).reconcile(2),
            Err(InflightError::Index { index: 0xffff, .. })
        ));
    }

    #[test]
    fn a_looping_batch_list_ends_after_the_batch_size() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        // Head 3 links to itself: the walk takes `ahead` steps and stops.
        put_u16(&mut buf, 12, 3);
        put_u16(&mut buf, desc_at(3) + 6, 3);
        buf[desc_at(3)] = 1;
        buf[desc_at(4)] = 1;
        assert_eq!(region(&mut buf, 8).reconcile(8).unwrap().heads, vec![4]);
    }

    #[test]
    fn inflight_flag_other_than_0_or_1_is_refused() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        buf[desc_at(6)] = 0x80;
        assert_eq!(
            region(&mut buf, 8).reconcile(0),
            Err(InflightError::Flag {
                index: 6,
                value: 0x80
            })
        );
    }

    #[test]
    fn counters_at_the_top_of_the_range_wrap_without_panicking() {
        let mut buf = buffer(8);
        initialised(&mut buf, 0);
        for (head, counter) in [(2usize, u64::MAX), (5, u64::MAX - 1), (0, u64::MAX)] {
            buf[desc_at(head)] = 1;
            put_u64(&mut buf, desc_at(head) + 8, counter);
        }
        let found = region(&mut buf, 8).reconcile(0).unwrap();
        // Oldest first; equal counters (only a hostile area has them) by index.
        assert_eq!(found.heads, vec![5, 0, 2]);
        assert_eq!(found.next_counter, 0);
    }

    #[test]
    fn accesses_past_the_view_are_refused() {
        let mut buf = buffer(8);
        assert!(matches!(
            InflightRegion::new(VolatileSlice::from(&mut buf[..100]), 8),
            Err(InflightError::TooSmall { .. })
        ));
        let r = region(&mut buf, 8);
        assert!(matches!(r.record(8, 0), Err(InflightError::Index { .. })));
        assert!(matches!(r.inflight(9), Err(InflightError::Index { .. })));
        assert!(matches!(
            r.link_batch([8u16].into_iter()),
            Err(InflightError::Index { .. })
        ));
    }

    #[test]
    fn mapping_refuses_an_area_smaller_than_its_layout() {
        let file = crate::testutil::memfd(4096);
        assert_eq!(
            InflightArea::map(file, 0, 4096, 4, 256).unwrap_err(),
            InflightError::TooSmall {
                size: 4096,
                needed: area_size(4, 256, false)
            }
        );
    }

    #[test]
    fn mapping_checks_every_queue_header() {
        let size = area_size(2, 8, false);
        let file = crate::testutil::memfd(size);
        let bytes = 5u16.to_le_bytes();
        std::os::unix::fs::FileExt::write_at(&file, &bytes, queue_region_size(8, false) + 8)
            .unwrap();
        let err = InflightArea::map(file, 0, size, 2, 8).unwrap_err();
        assert_eq!(
            err,
            InflightError::Queue {
                queue: 1,
                source: Box::new(InflightError::Version { version: 5 })
            }
        );
    }
}
