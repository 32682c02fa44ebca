//! The split used ring as `serve_available` and the fill pass write it: one host mapping
//! per pass, used elements and the used index stored through it (with `Release` on the
//! index), and virtio-queue's `add_used` where the ring is not mapped in one piece.

use std::num::Wrapping;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use crate::error::Error;
use crate::inflight::crash;
use crate::layout::{USED_ELEM, USED_HEADER, USED_IDX};
use crate::sys::atomic_view;

/// The used ring's header and `size` elements as one host slice, when the whole range lies in
/// one guest memory region; `None` otherwise (the caller then writes through virtio-queue,
/// which reports a bad ring). A misaligned ring fails the first, 4-byte, store of
/// [`put_used`] before anything is written, and takes the same way.
pub(super) fn used_ring_slice<'m, G>(
    queue: &Queue,
    mem: &'m G,
) -> Option<VolatileSlice<'m, BS<'m, G::Bitmap>>>
where
    G: GuestMemory + ?Sized,
{
    let len = USED_HEADER.checked_add(USED_ELEM.checked_mul(u64::from(queue.size()))?)?;
    let len = usize::try_from(len).ok()?;
    let addr = GuestAddress(queue.used_ring());
    let mut slices = GuestMemory::get_slices(mem, addr, len, Permissions::Write).ok()?;
    let ring = slices.next()?.ok()?;
    (ring.len() == len).then_some(ring)
}

/// Writes the used element `(head, len)` at `next_used` and publishes `next_used + 1` as the
/// used index, like `Queue::add_used`: the element first, then the index with `Release`, so a
/// driver that sees the index sees the element. Through `ring` (from [`used_ring_slice`]) when
/// there is one; otherwise, or for a head index past the queue size, through
/// `Queue::add_used`, which does the same with a guest-memory walk per field and produces the
/// errors. Stores through a [`VolatileSlice`] mark the dirty bitmap as `Bytes` writes do.
pub(super) fn put_used<G, B>(
    queue: &mut Queue,
    ring: Option<&VolatileSlice<'_, B>>,
    mem: &G,
    head: u16,
    len: u32,
) -> Result<(), Error>
where
    G: GuestMemory,
    B: BitmapSlice,
{
    let size = queue.size();
    if let Some(ring) = ring.filter(|_| head < size) {
        let next = Wrapping(queue.next_used());
        let slot = u64::from(next.0 % size);
        // In bounds: `slot < size` and the slice covers the header and `size` elements.
        let elem = (USED_HEADER + USED_ELEM * slot) as usize;
        let published = next + Wrapping(1);
        if store_used(ring, u32::from(head).to_le(), elem, Ordering::Relaxed)
            && store_used(ring, len.to_le(), elem + 4, Ordering::Relaxed)
            && store_used(
                ring,
                published.0.to_le(),
                USED_IDX as usize,
                Ordering::Release,
            )
        {
            queue.set_next_used(published.0);
            return Ok(());
        }
    }
    queue
        .add_used(mem, head, len)
        .map_err(|source| Error::AddUsed { head, source })
}

/// Writes the used elements of `batch` from `next_used` on through `ring` (from
/// [`used_ring_slice`]), then publishes the index after the last one with one `Release`
/// store: a driver that sees the index sees every element before it, as with [`put_used`],
/// for one index store per round instead of one per chain. Returns how many were written and
/// published; the rest of the batch (none, unless a head is past the queue size or the ring
/// is misaligned) is left to [`put_used`].
///
/// The stores go through atomic views of the mapping (one bounds check each) and mark the
/// slice's dirty bitmap as `VolatileSlice::store` would.
pub(super) fn put_used_round<B: BitmapSlice>(
    queue: &mut Queue,
    ring: &VolatileSlice<'_, B>,
    batch: &[(u16, u32)],
) -> usize {
    // `idx` is the header's second u16.
    let (Some(words), Some(idx)) = (
        atomic_view::<AtomicU32, _>(ring),
        atomic_view::<AtomicU16, _>(ring).and_then(|halves| halves.get(1)),
    ) else {
        return 0;
    };
    let size = queue.size();
    let mut next = Wrapping(queue.next_used());
    let mut written = 0;
    for &(head, len) in batch {
        // The header is word 0; element `slot` is words `1 + 2 * slot` (id) and the next one
        // (len), below the `1 + 2 * size` words mapped.
        let word = 1 + 2 * usize::from(next.0 % size);
        let Some([id_word, len_word]) = words.get(word..word + 2) else {
            break;
        };
        if head >= size {
            break;
        }
        if crash::store_allowed() {
            id_word.store(u32::from(head).to_le(), Ordering::Relaxed);
        }
        if crash::store_allowed() {
            len_word.store(len.to_le(), Ordering::Relaxed);
        }
        ring.bitmap().mark_dirty(word * 4, 8);
        next += Wrapping(1);
        written += 1;
    }
    if written == 0 {
        return 0;
    }
    if crash::store_allowed() {
        idx.store(next.0.to_le(), Ordering::Release);
    }
    ring.bitmap().mark_dirty(USED_IDX as usize, 2);
    queue.set_next_used(next.0);
    written
}

/// One store of [`put_used`]; `false` when guest memory refused it. (The tests' crash
/// injection can drop it, as if the process had died before it.)
fn store_used<B: BitmapSlice, T: vm_memory::AtomicAccess>(
    ring: &VolatileSlice<'_, B>,
    value: T,
    offset: usize,
    order: Ordering,
) -> bool {
    if !crash::store_allowed() {
        return true;
    }
    ring.store(value, offset, order).is_ok()
}
