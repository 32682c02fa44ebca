//! The inflight I/O tracking of one vring: which region of the frontend's area it writes, the
//! counter for the next chain popped, and the chains to serve again after a restart. The
//! protocol's stores are [`InflightRegion`]'s; [`VringData`](crate::VringData) calls these
//! at each pop and completion.

use crate::inflight::{InflightError, InflightQueue, InflightRegion};

/// A vring's inflight I/O tracking: its region, the counter for the next popped chain, and
/// the chains found in flight at restart that are still to be served again.
#[derive(Debug)]
pub(crate) struct Tracker {
    pub(crate) queue: InflightQueue,
    pub(crate) counter: u64,
    /// Heads to serve again, newest first: `pop` gives the oldest.
    pub(crate) resubmit: Vec<u16>,
    /// Whether resubmitted chains go to the device (`false`: returned unserved).
    pub(crate) serve_resubmitted: bool,
}

impl Tracker {
    /// Runs `f` on `region` (the tracker's own, made by the caller once for many calls) or,
    /// when `None`, on a view made now; an error is logged once and ends tracking for the
    /// ring.
    pub(crate) fn with_region(
        tracker: &mut Option<Tracker>,
        region: Option<&InflightRegion<'_>>,
        f: impl FnOnce(&InflightRegion<'_>, &mut u64) -> Result<(), InflightError>,
    ) {
        let Some(t) = tracker.as_mut() else { return };
        let result = match region {
            Some(r) => f(r, &mut t.counter),
            None => t.queue.region().and_then(|r| f(&r, &mut t.counter)),
        };
        if let Err(err) = result {
            log::error!("inflight tracking stopped for this ring: {err}");
            *tracker = None;
        }
    }

    /// Records the popped chain `head`.
    pub(crate) fn record(
        tracker: &mut Option<Tracker>,
        region: Option<&InflightRegion<'_>>,
        head: u16,
    ) {
        Tracker::with_region(tracker, region, |r, counter| {
            r.record(head, *counter)?;
            *counter = counter.wrapping_add(1);
            Ok(())
        });
    }

    /// Links a batch of completions before their used elements are written.
    pub(crate) fn link(
        tracker: &mut Option<Tracker>,
        region: Option<&InflightRegion<'_>>,
        heads: &[(u16, u32)],
    ) {
        Tracker::with_region(tracker, region, |r, _| {
            r.link_batch(heads.iter().map(|&(h, _)| h))
        });
    }

    /// Clears a batch of completions once `used_idx` is published.
    pub(crate) fn finish(
        tracker: &mut Option<Tracker>,
        region: Option<&InflightRegion<'_>>,
        heads: &[(u16, u32)],
        used_idx: u16,
    ) {
        Tracker::with_region(tracker, region, |r, _| {
            r.finish_batch(heads.iter().map(|&(h, _)| h), used_idx)
        });
    }
}
