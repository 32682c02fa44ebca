//! vu-vring: the state of the virtqueues (vrings) of a vhost-user backend.
//!
//! Docs to be completed.

mod error;
mod state;
mod vring;

pub use error::{Error, RingPart};
pub use state::{RingState, VringData, MAX_QUEUE_SIZE, VRING_AVAIL_F_NO_INTERRUPT};
pub use vring::{VringMutex, VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};

// The types that appear in the public API, so that users need not depend on these crates
// with matching versions just to name them.
pub use virtio_queue;
pub use vm_memory;
