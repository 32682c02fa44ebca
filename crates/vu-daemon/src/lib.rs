//! vu-daemon: the part of a vhost-user backend that talks to the frontend and runs the
//! queues: the message state machine (the *session*), the epoll loops and worker threads, and
//! the daemon that ties them to a UNIX socket.
//!
//! # What it is not
//!
//! It does not parse bytes (vu-proto does), map guest memory (vu-mem) or walk virtqueues
//! (vu-vring), and it implements no device: a device is a type implementing
//! [`VhostUserBackend`](backend::VhostUserBackend) or
//! [`VhostUserBackendMut`](backend::VhostUserBackendMut). Device authors usually depend on
//! `vu-backend`, which re-exports this crate with everything its traits mention.
//!
//! # The order of calls
//!
//! 1. Implement the backend trait for the device.
//! 2. Build the daemon: [`VhostUserDaemon::new`](daemon::VhostUserDaemon::new)`(name,
//!    backend, GuestMemoryAtomic::new(GuestMemoryMmap::new()))` for worker threads and locked
//!    vrings ([`VringMutex`](vu_vring::VringMutex), [`VringRwLock`](vu_vring::VringRwLock)),
//!    or [`LocalDaemon::new`](daemon::LocalDaemon::new) to run everything on one thread with
//!    [`VringState`](vu_vring::VringState). Worker threads start at once.
//! 3. Optionally add the device's own fds to the workers' epoll sets through
//!    [`get_epoll_handlers`](daemon::VhostUserDaemon::get_epoll_handlers)
//!    ([`VringEpollHandler::register_listener`](epoll::VringEpollHandler::register_listener)).
//! 4. Serve: [`serve(path)`](daemon::VhostUserDaemon::serve) (blocks, frontend after frontend),
//!    or [`start(listener)`](daemon::VhostUserDaemon::start) /
//!    [`start_serving`](daemon::VhostUserDaemon::start_serving) /
//!    [`start_client(path)`](daemon::VhostUserDaemon::start_client) then
//!    [`wait`](daemon::VhostUserDaemon::wait).
//! 5. Stop: the backend writes its exit event, or any thread calls
//!    [`ShutdownHandle::shutdown`](daemon::ShutdownHandle::shutdown); `wait` returns. A
//!    `handle_event` error or panic also stops the daemon, and `wait` returns it.
//!
//! # Threads
//!
//! The session never touches a thread: it asks the runtime, through an internal
//! `RingControl` trait, to watch or unwatch a queue's kick and to wait until the worker that
//! owns a queue is quiet (`GET_VRING_BASE`). See [`daemon`] for the threads and the `worker`
//! module's documentation for kicks that arrive while a ring is disabled (they are kept, not
//! lost, and served once the ring is enabled).

// `unsafe` is allowed in `sys` alone (raw system calls behind safe functions).
#![deny(unsafe_code)]
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

#[cfg(all(feature = "xen", feature = "postcopy"))]
compile_error!("the `xen` and `postcopy` features are mutually exclusive: Xen mappings cannot be registered with userfaultfd");

pub mod backend;
mod control;
pub mod conventions;
pub mod daemon;
mod daemon_error;
pub mod device_state;
pub mod epoll;
pub mod error;
/// Fuzz target bodies (see `tests/fuzz`); not part of the API.
#[doc(hidden)]
pub mod fuzzing;
pub mod offload;
#[cfg(feature = "postcopy")]
mod postcopy;
pub mod process;
mod session;
// The one module allowed `unsafe`: the crate's raw system calls behind safe functions.
#[allow(unsafe_code)]
mod sys;
// The crate's own tests drive devices with the kit too (postcopy faults).
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod used_log;
mod worker;
#[cfg(feature = "postcopy")]
pub use postcopy::PostcopyError;

pub use daemon::{DaemonError, LocalDaemon, ShutdownHandle, VhostUserDaemon};
pub use epoll::{ListenerError, VringEpollHandler};
pub use offload::{Offload, OffloadStats};
pub use session::FRAMEWORK_RING_FEATURES;
