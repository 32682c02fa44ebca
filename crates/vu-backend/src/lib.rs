//! vu-backend: write a vhost-user device backend with one dependency.
//!
//! # What it is
//!
//! A vhost-user backend is a process that implements a virtio device (a block device, a
//! network card, a random number generator...) for a virtual machine whose monitor (QEMU,
//! cloud-hypervisor, crosvm: the *frontend*) talks to it over a UNIX socket. The frontend
//! shares the guest's memory and the virtqueues' eventfds; the backend reads requests from
//! the queues and writes the answers back, without the monitor on the data path.
//!
//! This crate is the front door of the `vu` framework. It holds no logic: it re-exports what
//! a device author needs from the framework's crates (the backend traits and the daemon from
//! `vu-daemon`, the vrings from `vu-vring`, the dirty-log bitmap from `vu-mem`, the feature
//! words and the backend channel from `vu-proto`) and from the crates whose types appear in
//! those APIs (`vm-memory`, `virtio-queue`, `vmm-sys-util`), at the versions the framework
//! was built with. `use vu_backend::prelude::*;` brings the usual names into scope. Two
//! modules of `vu-daemon` are re-exported whole: [`conventions`] (the backend program
//! conventions for a device's `main`) and, with feature `testing`, `testing` (a test kit that
//! serves a device in-process and drives it as a guest would, without QEMU).
//!
//! # What it is not
//!
//! It is not a device: no virtio device is implemented here. It is not the frontend side of
//! the protocol either (see `vu_proto::frontend`).
//!
//! # Walk-through
//!
//! 1. **Describe the device.** Implement [`VhostUserBackendMut`] (methods take `&mut self`;
//!    hand the daemon an `Arc<RwLock<_>>` or `Arc<Mutex<_>>` of it) or [`VhostUserBackend`]
//!    (methods take `&self`, for a device with its own interior mutability). Say how many
//!    queues it has and how large they may be, which virtio and vhost-user protocol features
//!    it offers, and pick two types:
//!    - `Bitmap`: `()` if the device does not support live migration, [`LogBitmap`] if it
//!      does (every write to guest memory is then logged while the frontend asks for it);
//!    - `Vring`: [`VringMutex`] or [`VringRwLock`] for the multi-threaded
//!      [`VhostUserDaemon`], [`VringState`] (no lock at all) for the single-threaded
//!      [`LocalDaemon`].
//! 2. **Serve the queues.** When the guest kicks queue `q`, a worker thread calls
//!    `handle_event(q, EventSet::IN, vrings, thread_id)`. Pop descriptor chains from
//!    `vrings[q]`, read the request from the chain's readable descriptors through guest
//!    memory, write the answer into its writable descriptors, put the chain in the used
//!    ring ([`VringT::add_used`]) and notify the guest
//!    ([`VringT::signal_used_queue_if_needed`]). With `VIRTIO_RING_F_EVENT_IDX` negotiated
//!    (the daemon calls `set_event_idx(true)`), loop until
//!    [`VringT::enable_notification`] reports no new chain, so that a chain posted while
//!    notifications were off is not missed. [`process_queue`] does all of this for you,
//!    batched (one lock, one memory snapshot and one interrupt decision per pass): give it a
//!    closure that serves one chain and returns the number of bytes it wrote. The example
//!    below spells the loop out, as rust-vmm's `vhost-user-backend` documentation does;
//!    `examples/vu_rng.rs` uses `process_queue`. A queue the device fills as its own data
//!    arrives (network or vsock receive, console input) is served with [`fill_queue`]
//!    instead: a [`Filler`] takes chains until their room covers what the device has, hands
//!    the room out as guest-memory slices, and gives back what the data did not reach
//!    (`examples/vu_net/` receives that way).
//! 3. **Run the daemon.** Build a [`VhostUserDaemon`] with the backend and an empty guest
//!    memory (the frontend's memory table fills it) and call
//!    [`serve`](VhostUserDaemon::serve) with the socket path: it serves frontend after
//!    frontend (a frontend that reconnects finds it ready) until the daemon is stopped.
//!    [`start`](VhostUserDaemon::start) and [`wait`](VhostUserDaemon::wait) do the same in
//!    two steps; [`start_client`](VhostUserDaemon::start_client) connects to a listening
//!    frontend instead.
//! 4. **Add your own fds** (a tap device, a timer) to a worker's epoll set with
//!    [`VringEpollHandler::register_listener`] from
//!    [`get_epoll_handlers`](VhostUserDaemon::get_epoll_handlers); `handle_event` then gets
//!    their data value as `device_event`.
//! 5. **Stop** from any thread with a [`ShutdownHandle`], or by writing the backend's exit
//!    event; `wait`/`serve` return `Ok`. If `handle_event` fails or panics the daemon stops
//!    too, and `wait` returns the error.
//!
//! # Example
//!
//! A device with two queues that completes every request it receives, written with
//! `&mut self` and served from worker threads:
//!
//! ```no_run
//! use std::io;
//! use std::sync::{Arc, RwLock};
//!
//! use vu_backend::prelude::*;
//!
//! struct VhostUserService {
//!     event_idx: bool,
//!     mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
//! }
//!
//! impl VhostUserService {
//!     fn process_queue(&mut self, vring: &VringMutex) -> io::Result<()> {
//!         // Pop each chain in its own statement: the vring's lock is not held in between.
//!         while let Some(chain) = vring.pop_descriptor_chain() {
//!             // Read the request from the readable descriptors of `chain`, write the answer
//!             // into its writable ones, then return it with the number of bytes written.
//!             vring.add_used(chain.head_index(), 0).map_err(io::Error::other)?;
//!         }
//!         vring.signal_used_queue_if_needed().map_err(io::Error::other)?;
//!         Ok(())
//!     }
//! }
//!
//! impl VhostUserBackendMut for VhostUserService {
//!     type Bitmap = ();
//!     type Vring = VringMutex;
//!
//!     fn num_queues(&self) -> usize {
//!         2
//!     }
//!
//!     fn max_queue_size(&self) -> usize {
//!         256
//!     }
//!
//!     fn features(&self) -> u64 {
//!         (VirtioFeatures::VERSION_1
//!             | VirtioFeatures::RING_EVENT_IDX
//!             | VirtioFeatures::PROTOCOL_FEATURES)
//!             .bits()
//!     }
//!
//!     fn protocol_features(&self) -> ProtocolFeatures {
//!         ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK
//!     }
//!
//!     fn set_event_idx(&mut self, enabled: bool) {
//!         self.event_idx = enabled;
//!     }
//!
//!     fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
//!         self.mem = Some(mem);
//!         Ok(())
//!     }
//!
//!     fn handle_event(
//!         &mut self,
//!         device_event: u16,
//!         evset: EventSet,
//!         vrings: &[VringMutex],
//!         _thread_id: usize,
//!     ) -> io::Result<()> {
//!         if evset != EventSet::IN {
//!             return Err(io::Error::other(format!("unexpected events {evset:?}")));
//!         }
//!         let Some(vring) = vrings.get(usize::from(device_event)) else {
//!             return Err(io::Error::other(format!("unknown device event {device_event}")));
//!         };
//!         if self.event_idx {
//!             // Process until the guest posted nothing while notifications were off.
//!             loop {
//!                 vring.disable_notification().map_err(io::Error::other)?;
//!                 self.process_queue(vring)?;
//!                 if !vring.enable_notification().map_err(io::Error::other)? {
//!                     break;
//!                 }
//!             }
//!         } else {
//!             self.process_queue(vring)?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> Result<(), DaemonError> {
//!     let backend = Arc::new(RwLock::new(VhostUserService {
//!         event_idx: false,
//!         mem: None,
//!     }));
//!     let mut daemon = VhostUserDaemon::new(
//!         "vhost-user-service".to_owned(),
//!         backend,
//!         GuestMemoryAtomic::new(GuestMemoryMmap::new()),
//!     )?;
//!     // Serves frontends until a ShutdownHandle (see `daemon.shutdown_handle()`) stops it.
//!     daemon.serve("/tmp/vhost-user-service.sock")
//! }
//! ```
//!
//! # Single-threaded
//!
//! [`LocalDaemon`] serves the socket, the kicks and the device's own fds from one epoll loop
//! on the thread that calls [`run`](LocalDaemon::run) or [`serve`](LocalDaemon::serve). With
//! `type Vring = VringState;` no lock is taken on the data path, and the backend needs to be
//! neither `Send` nor `Sync`: here it keeps its state in `Cell`s and an `Rc`.
//!
//! ```no_run
//! use std::cell::Cell;
//! use std::io;
//! use std::rc::Rc;
//!
//! use vu_backend::prelude::*;
//!
//! struct Counter {
//!     event_idx: Cell<bool>,
//!     served: Rc<Cell<u64>>,
//! }
//!
//! impl VhostUserBackend for Counter {
//!     type Bitmap = ();
//!     type Vring = VringState;
//!
//!     fn num_queues(&self) -> usize {
//!         1
//!     }
//!     fn max_queue_size(&self) -> usize {
//!         128
//!     }
//!     fn features(&self) -> u64 {
//!         (VirtioFeatures::VERSION_1 | VirtioFeatures::RING_EVENT_IDX).bits()
//!     }
//!     fn protocol_features(&self) -> ProtocolFeatures {
//!         ProtocolFeatures::empty()
//!     }
//!     fn set_event_idx(&self, enabled: bool) {
//!         self.event_idx.set(enabled);
//!     }
//!     fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
//!         Ok(())
//!     }
//!     fn handle_event(
//!         &self,
//!         _device_event: u16,
//!         _evset: EventSet,
//!         vrings: &[VringState],
//!         _thread_id: usize,
//!     ) -> io::Result<()> {
//!         let vring = &vrings[0];
//!         loop {
//!             if self.event_idx.get() {
//!                 vring.disable_notification().map_err(io::Error::other)?;
//!             }
//!             while let Some(chain) = vring.pop_descriptor_chain() {
//!                 vring.add_used(chain.head_index(), 0).map_err(io::Error::other)?;
//!                 self.served.set(self.served.get() + 1);
//!             }
//!             vring.signal_used_queue_if_needed().map_err(io::Error::other)?;
//!             if !self.event_idx.get() || !vring.enable_notification().map_err(io::Error::other)? {
//!                 return Ok(());
//!             }
//!         }
//!     }
//! }
//!
//! fn main() -> Result<(), DaemonError> {
//!     let served = Rc::new(Cell::new(0));
//!     let backend = Counter { event_idx: Cell::new(false), served: served.clone() };
//!     let mut daemon = LocalDaemon::new(
//!         "counter".to_owned(),
//!         backend,
//!         GuestMemoryAtomic::new(GuestMemoryMmap::new()),
//!     )?;
//!     daemon.serve("/tmp/counter.sock")?;
//!     println!("served {} requests", served.get());
//!     Ok(())
//! }
//! ```
//!
//! # Frontend side
//!
//! The same crates serve a frontend (a VMM, or a test playing one): [`Frontend`] sends the
//! requests, [`SharedMemory`] is guest memory to share, [`MemoryRegion::new`] describes it,
//! and [`BorrowFd`] lends the kick and call eventfds, all without `unsafe`. Here the whole
//! path runs against a daemon in this process: memory table, ring addresses, one chain
//! posted by hand, the kick, the interrupt and the completion read back.
//!
//! ```
//! use std::io;
//! use std::os::fd::AsRawFd;
//!
//! use vu_backend::prelude::*;
//! use vu_backend::vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
//! use vu_backend::{Endpoint, Frontend, MemoryRegion, SharedMemory, VringAddr, VringAddrFlags};
//!
//! /// The device: answers every chain with "pong".
//! struct Pong;
//!
//! impl VhostUserBackend for Pong {
//!     type Bitmap = ();
//!     type Vring = VringMutex;
//!     fn num_queues(&self) -> usize { 1 }
//!     fn max_queue_size(&self) -> usize { 256 }
//!     fn features(&self) -> u64 {
//!         (VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES).bits()
//!     }
//!     fn protocol_features(&self) -> ProtocolFeatures { ProtocolFeatures::REPLY_ACK }
//!     fn set_event_idx(&self, _: bool) {}
//!     fn update_memory(&self, _: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
//!         Ok(())
//!     }
//!     fn handle_event(&self, q: u16, _: EventSet, vrings: &[VringMutex], _: usize) -> io::Result<()> {
//!         process_queue(&vrings[usize::from(q)], |chain| {
//!             let Some(desc) = chain.clone().writable().next() else { return 0 };
//!             chain.memory().write_slice(b"pong", desc.addr()).map_or(0, |()| 4)
//!         });
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // With feature `xen` a memory table must describe Xen mappings, which a memfd is not.
//! # if cfg!(feature = "xen") { return Ok(()); }
//! let (device_end, frontend_end) = Endpoint::pair()?;
//! let mut daemon =
//!     VhostUserDaemon::new("pong".to_owned(), Pong, GuestMemoryAtomic::new(GuestMemoryMmap::new()))?;
//! daemon.start_connection(device_end)?;
//!
//! // Negotiation.
//! let mut fe = Frontend::new(frontend_end);
//! fe.set_reply_timeout(Some(std::time::Duration::from_secs(10)))?;
//! fe.set_owner()?;
//! let features = fe.get_features()?;
//! let protocol = fe.get_protocol_features()?;
//! fe.set_protocol_features(protocol & ProtocolFeatures::REPLY_ACK)?;
//! fe.set_features(features & (VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES))?;
//!
//! // Guest memory: 1 MiB at guest address 0x100000, shared through a memfd.
//! let memory = SharedMemory::new(GuestAddress(0x10_0000), 1 << 20)?;
//! let region = MemoryRegion::new(memory.guest_addr().0, memory.size(), memory.user_addr(), 0);
//! fe.set_mem_table(&[region], &[memory.fd()])?;
//!
//! // A split ring of 8 entries, and one device-writable buffer of 64 bytes.
//! let (desc, avail, used, buf) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64, 0x10_3000u64);
//! let mem = memory.memory();
//! mem.write_obj(buf.to_le(), GuestAddress(desc))?; // descriptor 0: address,
//! mem.write_obj(64u32.to_le(), GuestAddress(desc + 8))?; // length,
//! mem.write_obj(2u16.to_le(), GuestAddress(desc + 12))?; // flags: VIRTQ_DESC_F_WRITE
//! mem.write_obj(0u16.to_le(), GuestAddress(avail + 4))?; // avail ring[0] = head 0
//! mem.write_obj(1u16.to_le(), GuestAddress(avail + 2))?; // avail idx = 1
//!
//! // The ring addresses are the frontend's (this process's) addresses.
//! let user = |gpa: u64| memory.user_addr_of(GuestAddress(gpa)).ok_or("address outside memory");
//! fe.set_vring_num(0, 8)?;
//! fe.set_vring_addr(&VringAddr {
//!     index: 0,
//!     flags: VringAddrFlags::empty(),
//!     descriptor: user(desc)?,
//!     available: user(avail)?,
//!     used: user(used)?,
//!     log: 0,
//! })?;
//! fe.set_vring_base(0, 0)?;
//! let (kick, call) = (EventFd::new(0)?, EventFd::new(0)?);
//! fe.set_vring_call(0, Some(call.borrow_fd()))?;
//! fe.set_vring_kick(0, Some(kick.borrow_fd()))?;
//! fe.set_vring_enable(0, true)?;
//!
//! // Kick, wait (bounded) for the interrupt, read the used ring.
//! kick.write(1)?;
//! let epoll = Epoll::new()?;
//! epoll.ctl(ControlOperation::Add, call.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))?;
//! assert_eq!(epoll.wait(10_000, &mut [EpollEvent::default()])?, 1, "no interrupt");
//! assert_eq!(u16::from_le(mem.read_obj(GuestAddress(used + 2))?), 1); // used idx
//! assert_eq!(u32::from_le(mem.read_obj(GuestAddress(used + 4))?), 0); // used ring[0].id
//! assert_eq!(u32::from_le(mem.read_obj(GuestAddress(used + 8))?), 4); // used ring[0].len
//! let mut answer = [0u8; 4];
//! mem.read_slice(&mut answer, GuestAddress(buf))?;
//! assert_eq!(&answer, b"pong");
//!
//! daemon.stop()?;
//! # Ok(())
//! # }
//! ```

#[cfg(all(feature = "xen", feature = "postcopy"))]
compile_error!("the `xen` and `postcopy` features are mutually exclusive: Xen mappings cannot be registered with userfaultfd");

// The framework's crates, whole, for what the re-exports below leave out.
pub use vu_daemon;
pub use vu_mem;
pub use vu_proto;
pub use vu_vring;

// The crates whose types appear in the backend traits, at the framework's versions.
pub use virtio_queue;
pub use vm_memory;
pub use vmm_sys_util;

// The backend traits and the daemon.
pub use vu_daemon::backend::{
    config_read, BackendChannel, DisabledRing, VhostUserBackend, VhostUserBackendMut,
    DEFAULT_QUEUES_MASK, GM,
};
pub use vu_daemon::daemon::{
    DEFAULT_MESSAGE_POLLING, DEFAULT_MESSAGE_TIMEOUT, DEFAULT_QUEUE_POLLING,
};
pub use vu_daemon::process::{process_queue, process_queue_async, Completion};
pub use vu_daemon::{
    DaemonError, ListenerError, LocalDaemon, Offload, ShutdownHandle, VhostUserDaemon,
    VringEpollHandler, FRAMEWORK_RING_FEATURES,
};

// The vrings, and the error their methods return.
pub use vu_vring::Error as VringError;
pub use vu_vring::{
    fill_queue, Buffers, Chain, DefaultMem, Filler, VringData, VringMutex, VringRwLock, VringState,
    VringStateGuard, VringStateMutGuard, VringT,
};

// The sockets `start` and `start_connection` take.
pub use vu_proto::listener::Listener;
pub use vu_proto::socket::Endpoint;

// Borrowing the fd of an `EventFd`, `EventConsumer`, `EventNotifier` or `TimerFd` as `impl
// AsFd` (for `register_listener` and the frontend's `set_vring_kick/call`), without `unsafe`.
pub use vu_proto::fd::BorrowFd;

// The frontend side, for frontend writers and tests: the client, the memory table entry, the
// ring addresses, and guest memory to share.
pub use vu_mem::SharedMemory;
pub use vu_proto::frontend::{Frontend, FrontendError};
pub use vu_proto::payload::{MemoryRegion, VringAddr, VringAddrFlags};

// Dirty logging for live migration.
pub use vu_mem::{LogBitmap, RegionBitmap};

// Feature words and the payloads the backend traits take or return.
pub use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
pub use vu_proto::payload::{
    ConfigFlags, SharedObject, ShmemConfig, TransferDirection, TransferPhase,
};

// Guest memory, queues and events.
pub use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
pub use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryBackend, GuestMemoryMmap,
};
pub use vmm_sys_util::epoll::EventSet;
pub use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier};
pub use vmm_sys_util::eventfd::EventFd;

/// The vhost-user spec's backend program conventions (`--socket-path`/`--fd`,
/// `--print-capabilities`, SIGTERM, `--log-level`) for a device's `main`, from `vu-daemon`.
pub use vu_daemon::conventions;

/// The test kit for device authors (feature `testing`): serve a device in-process on a socket
/// pair and drive it as a guest would, without QEMU. See the module's documentation.
///
/// This is the one part of the facade that is not a plain re-export of API: it is a
/// re-export of `vu-daemon`'s test kit, behind a feature, because a device's tests need a
/// frontend and a guest driver and the framework already has faithful ones. Enable it for
/// tests only: `vu-backend = { version = "…", features = ["testing"] }` under
/// `[dev-dependencies]`.
#[cfg(feature = "testing")]
pub use vu_daemon::testing;

/// The names most device code uses: `use vu_backend::prelude::*;`.
pub mod prelude {
    pub use crate::{
        process_queue, process_queue_async, Address, BorrowFd, Bytes, Chain, Completion,
        DaemonError, DescriptorChain, EventConsumer, EventFd, EventNotifier, EventSet,
        GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend,
        GuestMemoryMmap, Listener, LocalDaemon, ProtocolFeatures, QueueOwnedT, QueueT,
        ShutdownHandle, VhostUserBackend, VhostUserBackendMut, VhostUserDaemon, VirtioFeatures,
        VringData, VringEpollHandler, VringError, VringMutex, VringRwLock, VringState, VringT,
    };
}
