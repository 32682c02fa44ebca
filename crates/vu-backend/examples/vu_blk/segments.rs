//! A request's guest-memory segments, held without allocating in the usual case.

use vu_backend::prelude::GuestAddress;

/// Segments a list holds without allocating: a request's header and data, or its data and
/// status, are two.
const INLINE_SEGMENTS: usize = 4;

/// A list of guest-memory segments `(address, length)`, in place up to
/// [`INLINE_SEGMENTS`] (the usual request needs no allocation), on the heap beyond.
pub(crate) struct SegmentList {
    inline: [(GuestAddress, usize); INLINE_SEGMENTS],
    len: usize,
    /// Every segment once there are more than fit inline.
    spilled: Vec<(GuestAddress, usize)>,
}

impl SegmentList {
    pub(crate) fn new() -> Self {
        SegmentList {
            inline: [(GuestAddress(0), 0); INLINE_SEGMENTS],
            len: 0,
            spilled: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, entry: (GuestAddress, usize)) {
        if self.spilled.is_empty() && self.len < INLINE_SEGMENTS {
            self.inline[self.len] = entry;
            self.len += 1;
            return;
        }
        if self.spilled.is_empty() {
            self.spilled.extend_from_slice(&self.inline[..self.len]);
        }
        self.spilled.push(entry);
    }
}

impl std::ops::Deref for SegmentList {
    type Target = [(GuestAddress, usize)];

    fn deref(&self) -> &Self::Target {
        if self.spilled.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }
}
