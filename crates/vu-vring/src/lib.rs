//! vu-vring: the state of the virtqueues ("vrings") of a vhost-user backend.
//!
//! # What this crate is
//!
//! One vring is a split or packed virtqueue living in guest memory plus what the vhost-user
//! protocol attaches to it: the kick, call and error eventfds, the enabled flag, whether it is
//! started, and the address where used-ring writes are logged during migration. [`VringData`] holds all
//! of that around a [`virtio_queue::Queue`]; the [`VringT`] trait gives access to it through
//! `&self`, and three types implement the trait:
//!
//! | type            | synchronisation        | `Send` | `Sync` | `Clone`         |
//! |-----------------|------------------------|--------|--------|-----------------|
//! | [`VringState`]  | `RefCell`, none        | yes    | **no** | no              |
//! | [`VringMutex`]  | `Arc<Mutex<_>>`        | yes    | yes    | yes (shares)    |
//! | [`VringRwLock`] | `Arc<RwLock<_>>`       | yes    | yes    | yes (shares)    |
//!
//! (`Send`/`Sync` as far as the memory handle `M` is; `GuestMemoryAtomic` is both.) The
//! memory type parameter defaults to [`DefaultMem`] (`GuestMemoryAtomic<GuestMemoryMmap>`),
//! as in the reference, so a bare `&VringMutex` names the usual vring.
//!
//! # What it is not
//!
//! It knows rings, not sockets: it parses no vhost-user message, opens no socket, spawns no
//! thread and runs no epoll loop; those are vu-proto's and vu-daemon's. Ring addresses
//! arrive here as *guest* addresses, already translated from the frontend's VMM addresses by
//! the daemon (with vu-mem); behind a virtual IOMMU (`VIRTIO_F_ACCESS_PLATFORM`) they are
//! I/O virtual addresses, which this crate translates, with every descriptor, through the
//! [`Iommu`] the daemon installs ([`VringT::set_iommu`]; see the [`iommu`] module). It does not mark the dirty log either:
//! it stores the log address and tells which range to mark ([`VringData::log_used`]); vu-mem's
//! bitmap does the marking. It decides nothing about ring state transitions; the daemon does,
//! following the specification, and records them here.
//!
//! # The order of calls
//!
//! The daemon, one vring per queue, for each frontend request:
//!
//! 1. Creation: `V::new(mem, max_queue_size)` ([`VringT::new`]); the vring is stopped,
//!    disabled, and of size `max_queue_size`.
//! 2. `SET_FEATURES`: [`set_queue_event_idx`](VringT::set_queue_event_idx) with whether
//!    `VIRTIO_F_RING_EVENT_IDX` was acked.
//! 3. `SET_VRING_NUM`: [`set_queue_size`](VringT::set_queue_size), which refuses a size that
//!    is 0, not a power of two (a packed ring takes any size), or above the maximum, with
//!    [`Error::InvalidQueueSize`] (the reference logs and ignores such a size).
//! 4. `SET_VRING_ADDR`: translate, then [`set_queue_info`](VringT::set_queue_info)`(desc,
//!    avail, used)`, [`set_log_guest_addr`](VringT::set_log_guest_addr)`(Some(log))` when
//!    flag bit 0 (`VHOST_VRING_F_LOG`) is set (else `None`), and
//!    [`set_queue_next_used`](VringT::set_queue_next_used)`(`[`queue_used_idx`](VringT::queue_used_idx)`()?)`
//!    so that a rebooted driver's used index is picked up.
//! 5. `SET_VRING_BASE`: [`set_queue_next_avail`](VringT::set_queue_next_avail).
//! 6. `SET_VRING_CALL`, `SET_VRING_ERR`: [`set_call`](VringT::set_call),
//!    [`set_err`](VringT::set_err) (`None` when the message carries `NOFD`).
//! 7. `SET_VRING_KICK`: [`set_kick`](VringT::set_kick), then
//!    [`set_queue_ready(true)`](VringT::set_queue_ready) (the ring is started) and, when
//!    `VHOST_USER_F_PROTOCOL_FEATURES` was not negotiated, [`set_enabled(true)`](VringT::set_enabled).
//!    With in-band notifications the frontend sends no kick fd: install an eventfd of the
//!    daemon's own with `set_kick`, and turn each `VRING_KICK` message into
//!    [`deliver_kick`](VringT::deliver_kick); the worker then wakes as for any kick.
//! 8. `SET_VRING_ENABLE`: [`set_enabled`](VringT::set_enabled).
//! 9. `GET_VRING_BASE`: [`set_queue_ready(false)`](VringT::set_queue_ready) (stopped), reply
//!    with [`queue_next_avail`](VringT::queue_next_avail), then `set_kick(None)` and
//!    `set_call(None)`.
//! 10. `RESET_OWNER`, `RESET_DEVICE`: [`reset`](VringT::reset).
//!
//! The worker, when the kick fd is readable:
//!
//! ```
//! use vu_vring::{Error, VringT};
//! use vu_vring::vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
//!
//! type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
//!
//! fn on_kick<V: VringT<Mem>>(vring: &V) -> Result<(), Error> {
//!     if !vring.read_kick()? {
//!         return Ok(()); // started but disabled: the kick is consumed, nothing processed
//!     }
//!     loop {
//!         vring.disable_notification()?;
//!         let mut done = Vec::new();
//!         while let Some(chain) = vring.pop_descriptor_chain() {
//!             // ... serve the request ...
//!             done.push((chain.head_index(), 0));
//!         }
//!         vring.add_used_batch(done)?;
//!         vring.signal_used_queue_if_needed()?; // one decision, at most one signal
//!         if !vring.enable_notification()? {
//!             break;
//!         }
//!     }
//!     // When logging, mark `vring.log_used()` dirty (vu-mem) after writing the used ring.
//!     Ok(())
//! }
//! ```
//!
//! # Batched completion and notification
//!
//! [`add_used_batch`](VringT::add_used_batch) puts many completed chains into the used ring
//! under one lock and one memory snapshot; [`signal_used_queue_if_needed`](VringT::signal_used_queue_if_needed)
//! then decides once for everything added since the previous decision:
//!
//! - with `VIRTIO_F_RING_EVENT_IDX`, it signals when the driver's `used_event` lies inside
//!   that window (the driver asked to hear about an entry that is now used);
//! - without, it signals unless the driver set `VRING_AVAIL_F_NO_INTERRUPT`;
//! - when nothing was added, it does not signal.
//!
//! virtio-queue 0.18's `Queue::needs_notification` is not used for this: it counts the
//! entries added through its own `add_used` since its last call (so the EVENT_IDX window is
//! right), but it ignores `VRING_AVAIL_F_NO_INTERRUPT` and answers `true` when nothing was
//! added. [`VringData`] keeps its own window start (`next_used` at the last decision), which
//! also covers entries added directly through `get_queue_mut().add_used(..)` and is restarted
//! by [`set_queue_next_used`](VringT::set_queue_next_used) and [`reset`](VringT::reset).
//! Measured with the reference implementation, one signal per batch instead of one per chain
//! took depth-128 throughput on one CPU from 3.5 M to 8.7 M requests/s.
//!
//! # Serving a queue, and inflight I/O tracking
//!
//! [`process_queue`] is the loop a device gets for free (pop, serve, complete, one interrupt
//! decision per pass, re-enable kicks with the EVENT_IDX re-check; while a poller holds the
//! ring's kicks off with [`VringData::hold_kicks`], the re-enable is left to the poller's
//! [`VringData::release_kicks`]); its inner loop is
//! [`VringData::serve_available`], which hands out [`Chain`]s. With an inflight area from the
//! frontend ([`InflightArea`], mapped by the daemon on `SET_INFLIGHT_FD`), the daemon starts
//! each ring with [`VringData::restart`]: from then on every chain popped is recorded in the
//! area before the device sees it and cleared after its used element is published, and the
//! chains found in flight at the restart are served again first. The layouts and the
//! protocol are in [`inflight`]; docs/inflight.md says what a device author gets.
//!
//! # Filling device-writable chains
//!
//! A device whose data arrives on its own (net RX, vsock RX, console input, input events)
//! fills the chains the driver posted with [`VringData::fill_available`]: one lock, one
//! memory snapshot and the same [`Chain`] walk as `serve_available` (packed rings, inflight
//! tracking, IOMMU translation included), a [`Filler`] that takes chains until their writable
//! room covers what the device asks for (gathering across chains for `VIRTIO_NET_F_MRG_RXBUF`),
//! the room handed out as guest-memory slices ([`Buffers::slices`], written in place), chains
//! not used given back, and the completions published together when the pass ends.
//! [`fill_queue`] wraps one pass with the lock and the interrupt decision, as
//! [`process_queue`] does for serving.
//! # Packed rings
//!
//! When `VIRTIO_F_RING_PACKED` is acked the daemon calls
//! [`set_queue_packed(true)`](VringT::set_queue_packed) at `SET_FEATURES`, and the vring is a
//! packed virtqueue (virtio 1.2, 2.8) served by this crate's own implementation (virtio-queue
//! 0.18 has split rings only). The `SET_VRING_ADDR` addresses are then the descriptor ring,
//! the driver area and the device area; `SET_VRING_BASE` and `GET_VRING_BASE` carry the avail
//! wrap counter in bit 15 and, as QEMU sends and reads them, the used position with its wrap
//! counter in bits 16-31 ([`set_vring_base`](VringT::set_vring_base),
//! [`vring_base`](VringT::vring_base)).
//!
//! The device API does not change: [`VringData::serve_available`] (and [`process_queue`]
//! around it) hands the device the same [`Chain`], whose descriptors read as
//! split descriptors, and completes each chain, in order, with the used length the device
//! returns: the used descriptor goes to the position of the chain's first descriptor, with
//! the buffer id of its last one, AVAIL and USED both equal to the used wrap counter, and
//! the used position advances by the chain's descriptor count. Notifications follow the two
//! event suppression structures: the device area is written by
//! [`disable_notification`](VringT::disable_notification) (DISABLE) and
//! [`enable_notification`](VringT::enable_notification) (ENABLE, or DESC with the next
//! available position when EVENT_IDX is on), and the driver area decides
//! [`signal_used_queue_if_needed`](VringT::signal_used_queue_if_needed) (DISABLE: no; DESC:
//! when its position was just used; otherwise yes). A chain whose descriptors are not all
//! available, or which does not end within the ring, is an [`Error`] on that ring and the
//! ring stays at the chain; indirect tables are walked with the split path's bounds.
//!
//! The calls that trade in virtio-queue types ([`pop_descriptor_chain`](VringT::pop_descriptor_chain),
//! [`add_used`](VringT::add_used), [`add_used_batch`](VringT::add_used_batch),
//! [`Chain::descriptor_chain`]) serve split rings only.
//!
//! # `Send` and `Sync`
//!
//! [`VringT`] requires neither. A multi-threaded daemon, whose vrings are touched by the
//! thread that reads the socket and by worker threads, asks for them where it needs them
//! (`V: VringT<M> + Send + Sync + Clone`), which [`VringMutex`] and [`VringRwLock`] satisfy.
//! A single-threaded daemon keeps its vrings on one thread and needs neither, so
//! [`VringState`] uses a `RefCell`: no lock and no atomic operation on the hot path, and it is
//! deliberately not `Sync`, so that it cannot be shared with another thread by mistake:
//!
//! ```compile_fail
//! use vu_vring::{VringState, vm_memory::{GuestMemoryAtomic, GuestMemoryMmap}};
//! fn needs_sync<T: Sync>() {}
//! needs_sync::<VringState<GuestMemoryAtomic<GuestMemoryMmap>>>();
//! ```
//!
//! It is still `Send`, so a daemon can build its vrings on one thread and move them to the
//! thread that serves them. It is not `Clone`: share it by reference or `Rc`.
//!
//! # Guards
//!
//! [`VringT::get_ref`] and [`VringT::get_mut`] return guards that dereference to
//! [`VringData`]; their types are named by [`VringStateGuard`] and [`VringStateMutGuard`],
//! so code can be generic over `V: VringT<M>` and still name them. Every other method takes
//! its guard for the length of the call. Never call a method of a vring while holding one of
//! its guards: [`VringMutex`] and [`VringRwLock`] deadlock, [`VringState`] panics. Beware
//! that the temporaries of a `while let` condition live until the end of the loop body, so
//! `while let Some(c) = vring.get_mut().get_queue_mut().iter(m)?.next() { vring.add_used(..) }`
//! keeps the guard across `add_used`; collect the chains first or use
//! [`pop_descriptor_chain`](VringT::pop_descriptor_chain).
//!
//! # Names
//!
//! The house style drops `get_` from accessors, but [`VringT::get_ref`], [`VringT::get_mut`],
//! [`VringData::get_queue`], [`VringData::get_queue_mut`], [`VringData::get_kick`],
//! [`VringData::get_call`] and [`VringData::get_err`] keep the names of the reference
//! implementation (vhost-user-backend), and so do the `set_queue_*`/`queue_*` methods, so
//! that device code written against it compiles against this crate with few changes.
//! Iterating a queue needs virtio-queue's `QueueOwnedT` trait in scope, as there.
//!
//! # Errors and fds
//!
//! Fallible operations return [`Error`], which carries the refused value; eventfd reads and
//! writes return [`std::io::Error`]. Eventfds are stored as [`std::fs::File`] (an eventfd
//! received from the frontend is an `OwnedFd`; `File::from(fd)` converts it without
//! `unsafe`), read and written 8 bytes at a time. A full counter on write and an empty
//! counter on a non-blocking read are not errors.

// `unsafe` is allowed in `sys` alone (raw system calls and memory behind safe types).
#![deny(unsafe_code)]

mod avail;
mod chain;
mod error;
mod eventfd;
#[doc(hidden)]
pub mod fuzzing;
pub mod inflight;
pub mod iommu;
pub mod layout;
mod packed;
mod process;
mod ring_state;
mod state;
#[cfg(test)]
mod tests_fill;
#[cfg(test)]
mod tests_inflight;
#[cfg(test)]
mod tests_iommu;
#[cfg(test)]
mod testutil;
mod tracker;
mod vring;
// The one module allowed `unsafe`.
#[allow(unsafe_code)]
mod sys;

pub use chain::Chain;
pub use error::{Error, RingPart};
pub use inflight::{InflightArea, InflightError, InflightQueue};
pub use iommu::{Iommu, IommuError};
pub use process::{process_queue, process_queue_async, Completion};
pub use ring_state::{InbandNotifier, Restart, RingState};
pub use state::fill::{fill_queue, Buffers, Filler, WritableSlice};
pub use state::{MidPassInterrupt, VringData, MAX_QUEUE_SIZE, VRING_AVAIL_F_NO_INTERRUPT};
pub use vring::{
    DefaultMem, VringMutex, VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT,
};

// The crates whose types appear in this API, so users can name them with matching versions.
pub use virtio_queue;
pub use vm_memory;
