//! Fuzz target bodies for the inflight area parser, shared by the cargo-fuzz harness
//! (`tests/fuzz`) and the stable replay of its committed corpus (`tests/tests/fuzz_corpus.rs`).
//!
//! Not part of the API: hidden from the documentation and free to change. A body takes the
//! fuzzer's bytes, must never panic on any input, and panics only when a property the
//! inflight view promises is broken.
//!
//! # Input format of [`inflight_region`]
//!
//! ```text
//! bytes 0..2    desc_num (u16, little endian; 0 and values above 1024 are reduced modulo 1024,
//!               0 becomes 1)
//! bytes 2..4    the used ring's index the region is reconciled with
//! bytes 4..     the region as the frontend left it (header, then the descriptors), zero
//!               padded or cut to the size of the layout
//! ```

use std::collections::BTreeSet;

use vm_memory::VolatileSlice;

use crate::inflight::{InflightError, InflightRegion};

/// The largest `desc_num` an input selects: keeps each run short.
const MAX_DESC_NUM: u16 = 1024;

/// Reconciles a region of hostile contents, then checks what came out: every head returned
/// is inside the ring, none twice, in counter order; the region's `used_idx` is the ring's;
/// and recording and completing one more chain keeps the next reconcile consistent.
pub fn inflight_region(data: &[u8]) {
    let Some((header, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let desc_num = match u16::from_le_bytes([header[0], header[1]]) % MAX_DESC_NUM {
        0 => 1,
        n => n,
    };
    let ring_used_idx = u16::from_le_bytes([header[2], header[3]]);
    let mut buf = vec![0u8; 16 + 16 * usize::from(desc_num)];
    let n = rest.len().min(buf.len());
    buf[..n].copy_from_slice(&rest[..n]);
    let Ok(region) = InflightRegion::new(VolatileSlice::from(buf.as_mut_slice()), desc_num) else {
        panic!("a buffer of the layout's size was refused");
    };
    let _ = region.check_header(desc_num);
    let found = match region.reconcile(ring_used_idx) {
        Ok(found) => found,
        Err(InflightError::OutOfBounds { offset }) => {
            panic!("an access at {offset} left the region")
        }
        Err(_) => return,
    };
    assert_eq!(region.used_idx().ok(), Some(ring_used_idx));
    let mut seen = BTreeSet::new();
    let mut last = None;
    for &head in &found.heads {
        assert!(head < desc_num, "head {head} past the ring");
        assert!(seen.insert(head), "head {head} twice");
        assert_eq!(region.inflight(head).ok(), Some(1));
        let counter = region.counter(head).ok();
        assert!(last <= counter, "out of counter order");
        last = counter;
    }
    // One more chain through the protocol: popped, completed, and the area says so.
    let Some(free) = (0..desc_num).find(|h| !seen.contains(h)) else {
        return;
    };
    region.record(free, found.next_counter).ok();
    region.link_batch([free].into_iter()).ok();
    let published = ring_used_idx.wrapping_add(1);
    region.finish_batch([free].into_iter(), published).ok();
    let again = region.reconcile(published);
    assert_eq!(again.map(|f| f.heads), Ok(found.heads));
}
