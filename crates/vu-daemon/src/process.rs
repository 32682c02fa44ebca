//! Serving a queue the fast way by default: [`process_queue`] (and [`process_queue_async`]
//! for a device that completes later, out of order), which live in vu-vring (the
//! layer that owns ring semantics, inflight I/O tracking included) and is re-exported here so
//! that `vu_daemon::process::process_queue` keeps working.

pub use vu_vring::{process_queue, process_queue_async, Completion};
