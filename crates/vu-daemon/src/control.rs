//! The seam between the session (which interprets messages) and the runtime (which owns threads
//! and epoll). The session never touches a thread or an epoll set; it asks through this trait, so
//! every message can be tested with a recording implementation and no threads.

use std::io;

/// What the session needs from the threads that process the queues.
///
/// Implemented by the daemon's runtime (multi-threaded workers or the single-threaded loop) and
/// by a recording double in the session's tests.
pub(crate) trait RingControl {
    /// Starts watching queue `queue`'s kick eventfd (the one now stored in its vring), so that a
    /// kick wakes the worker that owns the queue. Called after SET_VRING_KICK with an fd.
    fn watch_kick(&mut self, queue: u16) -> io::Result<()>;

    /// Stops watching queue `queue`'s kick eventfd. Called before the vring's kick fd is replaced
    /// or dropped, and when the ring stops. Must be a no-op if the queue is not watched.
    fn unwatch_kick(&mut self, queue: u16) -> io::Result<()>;

    /// Returns once no worker is inside `handle_event` for queue `queue` and none will start
    /// before the queue is watched again (GET_VRING_BASE: "wait until the worker is quiet").
    fn quiesce(&mut self, queue: u16) -> io::Result<()>;

    /// Serves a kick of queue `queue` now, before the frontend gets its answer (in-band
    /// `VRING_KICK`): the backend's `handle_event` for the queue runs to completion, under the
    /// same exclusion as a worker's dispatch, if the queue is watched and its ring takes kicks
    /// (a disabled ring under `DisabledRing::Hold` parks the kick instead). The kick must have
    /// been delivered to the kick fd first, so that a kick not served now stays pending.
    fn dispatch_now(&mut self, queue: u16) -> io::Result<()>;
}
