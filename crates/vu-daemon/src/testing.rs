//! A test kit for device authors (feature `testing`): run a device in-process and drive it
//! as a guest would, without QEMU.
//!
//! The kit plays the two parts a device meets in production:
//!
//! - the *frontend* (QEMU's role): a [`Frontend`] on one end of a socket pair, the daemon
//!   serving the other end ([`InProcess::start`]); [`TestDevice::setup`] negotiates features,
//!   sends the memory table and starts the queues, as QEMU does;
//! - the *guest driver*: [`DriverMemory`] is guest memory (a memfd shared with the device),
//!   [`SplitQueue`] a split virtqueue laid out in it; a test posts chains of buffers it
//!   chooses ([`Buf`]), kicks, and reads back what the device put in the used ring
//!   ([`Used`]: head, length, the bytes of every writable buffer) and how many interrupts it
//!   raised ([`SplitQueue::take_calls`]).
//!
//! The same driver runs the framework's own tests, so it is exercised by every change of the
//! framework; it follows the virtio spec's driver rules (memory barriers, `NO_NOTIFY` and
//! `EVENT_IDX` suppression in both directions). [`PackedQueue`] is its packed-ring
//! counterpart (`VIRTIO_F_RING_PACKED`): the same [`Buf`] chains and [`Used`] results, with
//! buffer ids, wrap counters and both event suppression structures; [`TestDevice`] sets up
//! split queues, and a packed queue is driven over a vring directly (see vu-tests'
//! `packed_ring` tests).
//!
//! Every wait is bounded (a timeout given by the caller, [`DEVICE_TIMEOUT`] in
//! [`TestDevice::setup`]) and the kit panics with a message when one expires or the device
//! misbehaves, which is what a test wants. Its guest memory is a memfd, so it does not work
//! with feature `xen` (whose memory tables describe Xen mappings). It is not meant for
//! production frontends (those use [`Frontend`] and [`SharedMemory`](vu_mem::SharedMemory)
//! directly).
//!
//! # Example
//!
//! ```
//! use std::io;
//! use std::time::Duration;
//!
//! use vu_daemon::backend::VhostUserBackend;
//! use vu_daemon::process::process_queue;
//! use vu_daemon::testing::{Buf, DeviceSetup, InProcess};
//! use vu_proto::features::ProtocolFeatures;
//! use vu_vring::VringMutex;
//! use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};
//! use vmm_sys_util::epoll::EventSet;
//!
//! /// Fills every writable buffer with 0xAB.
//! struct Filler;
//!
//! impl VhostUserBackend for Filler {
//!     type Bitmap = ();
//!     type Vring = VringMutex;
//!     fn num_queues(&self) -> usize { 1 }
//!     fn max_queue_size(&self) -> usize { 256 }
//!     fn features(&self) -> u64 { 1 << 32 | 1 << 30 } // VERSION_1, PROTOCOL_FEATURES
//!     fn protocol_features(&self) -> ProtocolFeatures { ProtocolFeatures::REPLY_ACK }
//!     fn set_event_idx(&self, _enabled: bool) {}
//!     fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
//!         Ok(())
//!     }
//!     fn handle_event(&self, q: u16, _: EventSet, vrings: &[VringMutex], _: usize) -> io::Result<()> {
//!         process_queue(&vrings[usize::from(q)], |chain| {
//!             let mut written = 0;
//!             for desc in chain.clone().writable() {
//!                 let bytes = vec![0xAB; desc.len() as usize];
//!                 chain.memory().write_slice(&bytes, desc.addr()).unwrap();
//!                 written += desc.len();
//!             }
//!             written
//!         });
//!         Ok(())
//!     }
//! }
//!
//! let mut running = InProcess::start(Filler, &DeviceSetup::default());
//! let queue = running.device.queue(0);
//! queue.post_and_kick(&[Buf::Readable(b"ignored".to_vec()), Buf::Writable(4)]);
//! // Wakes on the device's interrupt (the call eventfd), reads the used ring.
//! let used = queue.wait_used(1, Duration::from_secs(10));
//! assert_eq!(used[0].len, 4);
//! assert_eq!(used[0].written, vec![vec![0xAB; 4]]);
//! running.stop().unwrap();
//! ```
//!
//! A [`LocalDaemon`](crate::LocalDaemon) (whose backend need not be `Send`) runs on the
//! test's thread instead: take a [`socket_pair`], move the [`Frontend`] end and the
//! [`TestDevice`] work to a spawned thread, and call `run_connection` with the other end.

use std::time::Duration;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vu_proto::fd::BorrowFd;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::frontend::Frontend;
use vu_proto::socket::Endpoint;

use crate::backend::VhostUserBackend;
use crate::daemon::{DaemonError, VhostUserDaemon};

mod packed;
mod virtqueue;

pub use packed::{
    avail_bits, PackedQueue, Pos, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, PACKED_AVAIL,
    PACKED_INDIRECT, PACKED_NEXT, PACKED_USED, PACKED_WRITE,
};
pub use virtqueue::{wait_readable, Buf, DriverMemory, SplitQueue, Used, BUF_SIZE, GPA_BASE};

/// How long [`TestDevice::setup`] waits for each reply of the device before failing instead of
/// hanging; also a reasonable bound for a test's own waits.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected socket pair: the device's end, and a [`Frontend`] on the other end whose
/// replies time out after [`DEVICE_TIMEOUT`].
///
/// # Panics
///
/// If the socket pair cannot be created.
pub fn socket_pair() -> (Endpoint, Frontend) {
    let (device, frontend) = Endpoint::pair().expect("socketpair");
    let frontend = Frontend::new(frontend);
    frontend
        .set_reply_timeout(Some(DEVICE_TIMEOUT))
        .expect("reply timeout");
    (device, frontend)
}

/// What [`TestDevice::setup`] negotiates and lays out.
#[derive(Debug, Clone)]
pub struct DeviceSetup {
    /// How many queues to set up (from 0).
    pub queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Whether to acknowledge `VIRTIO_RING_F_EVENT_IDX` (if offered).
    pub event_idx: bool,
    /// Protocol features to acknowledge, of those offered.
    pub protocol: ProtocolFeatures,
    /// Bytes of guest memory.
    pub memory: u64,
}

impl Default for DeviceSetup {
    /// One queue of 64 entries, no EVENT_IDX, `MQ` and `REPLY_ACK`, 4 MiB of memory.
    fn default() -> Self {
        DeviceSetup {
            queues: 1,
            queue_size: 64,
            event_idx: false,
            protocol: ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK,
            memory: 4 << 20,
        }
    }
}

/// A device set up over a [`Frontend`]: its guest memory and driven queues.
#[derive(Debug)]
pub struct TestDevice {
    /// The frontend connection.
    pub frontend: Frontend,
    /// The guest memory shared with the backend.
    pub memory: DriverMemory,
    /// The queues, by index.
    pub queues: Vec<SplitQueue>,
    /// The virtio features acknowledged.
    pub features: VirtioFeatures,
    /// Whether `VHOST_USER_F_PROTOCOL_FEATURES` was negotiated (rings start disabled).
    pub protocol_negotiated: bool,
}

impl TestDevice {
    /// `SET_OWNER`, feature negotiation (`VERSION_1`, `PROTOCOL_FEATURES` and, if asked,
    /// `RING_EVENT_IDX`, of those offered), `SET_MEM_TABLE` with the driver's memfd, then
    /// every queue started ([`start_queue`](Self::start_queue)) and enabled.
    ///
    /// # Panics
    ///
    /// If the device refuses or fails to answer a request within [`DEVICE_TIMEOUT`].
    pub fn setup(mut frontend: Frontend, setup: &DeviceSetup) -> Self {
        frontend
            .set_reply_timeout(Some(DEVICE_TIMEOUT))
            .expect("reply timeout");
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        let mut wanted = VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES;
        if setup.event_idx {
            wanted |= VirtioFeatures::RING_EVENT_IDX;
        }
        let features = offered & wanted;
        let protocol_negotiated = features.contains(VirtioFeatures::PROTOCOL_FEATURES);
        if protocol_negotiated {
            let offered_protocol = frontend
                .get_protocol_features()
                .expect("GET_PROTOCOL_FEATURES");
            frontend
                .set_protocol_features(offered_protocol & setup.protocol)
                .expect("SET_PROTOCOL_FEATURES");
        }
        frontend.set_features(features).expect("SET_FEATURES");
        let memory = DriverMemory::new(setup.memory);
        frontend
            .set_mem_table(&[memory.region()], &[memory.fd()])
            .expect("SET_MEM_TABLE");
        let mut device = TestDevice {
            frontend,
            memory,
            queues: Vec::new(),
            features,
            protocol_negotiated,
        };
        for q in 0..setup.queues {
            let mut queue = SplitQueue::new(&mut device.memory, q, setup.queue_size);
            queue.set_event_idx(features.contains(VirtioFeatures::RING_EVENT_IDX));
            device.queues.push(queue);
            device.start_queue(q, 0);
            device.enable_queue(q, true);
        }
        device
    }

    /// `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE(base)`, `SET_VRING_CALL`,
    /// `SET_VRING_KICK` for queue `q` (the ring is started).
    ///
    /// # Panics
    ///
    /// If there is no queue `q` or the device refuses a request.
    pub fn start_queue(&mut self, q: u16, base: u16) {
        let queue = &self.queues[usize::from(q)];
        let index = u32::from(q);
        let fe = &mut self.frontend;
        fe.set_vring_num(index, u32::from(queue.size()))
            .expect("SET_VRING_NUM");
        fe.set_vring_addr(&queue.vring_addr())
            .expect("SET_VRING_ADDR");
        fe.set_vring_base(index, u32::from(base))
            .expect("SET_VRING_BASE");
        fe.set_vring_call(index, Some(queue.call.borrow_fd()))
            .expect("SET_VRING_CALL");
        fe.set_vring_kick(index, Some(queue.kick.borrow_fd()))
            .expect("SET_VRING_KICK");
    }

    /// `SET_VRING_ENABLE` for queue `q`, when protocol features were negotiated (otherwise
    /// rings are enabled when started).
    ///
    /// # Panics
    ///
    /// If the device refuses the request.
    pub fn enable_queue(&mut self, q: u16, enable: bool) {
        if self.protocol_negotiated {
            self.frontend
                .set_vring_enable(u32::from(q), enable)
                .expect("SET_VRING_ENABLE");
        }
    }

    /// `GET_VRING_BASE` for queue `q`: stops the ring and returns its next available index.
    ///
    /// # Panics
    ///
    /// If the device refuses the request or answers a base above `u16::MAX`.
    pub fn stop_queue(&mut self, q: u16) -> u16 {
        let base = self
            .frontend
            .get_vring_base(u32::from(q))
            .expect("GET_VRING_BASE");
        u16::try_from(base).expect("vring base fits u16")
    }

    /// Queue `q`.
    ///
    /// # Panics
    ///
    /// If there is no queue `q`.
    pub fn queue(&mut self, q: u16) -> &mut SplitQueue {
        &mut self.queues[usize::from(q)]
    }
}

/// A device served in-process by a [`VhostUserDaemon`] over a socket pair, set up by a
/// [`TestDevice`].
#[derive(Debug)]
pub struct InProcess<S: VhostUserBackend> {
    /// The daemon; [`VhostUserDaemon::backend`] reaches the device.
    pub daemon: VhostUserDaemon<S>,
    /// The frontend and the guest driver.
    pub device: TestDevice,
}

impl<S> InProcess<S>
where
    S: VhostUserBackend + Send + Sync + 'static,
    S::Vring: Clone + Send + Sync + 'static,
    S::Bitmap: Send + Sync + 'static,
{
    /// Builds a daemon for `backend` (with empty guest memory), serves one end of a
    /// [`socket_pair`] from it, and sets the device up from the other end as `setup` says.
    ///
    /// # Panics
    ///
    /// If the daemon cannot be built or started, or the setup fails (see
    /// [`TestDevice::setup`]).
    pub fn start(backend: S, setup: &DeviceSetup) -> Self {
        let mut daemon = VhostUserDaemon::new(
            "vu-testing".to_owned(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::<S::Bitmap>::new()),
        )
        .expect("build the daemon");
        let (device_end, frontend) = socket_pair();
        daemon
            .start_connection(device_end)
            .expect("start the daemon");
        let device = TestDevice::setup(frontend, setup);
        InProcess { daemon, device }
    }

    /// Stops the daemon and returns how it ended: `Ok`, or the error that stopped it (a
    /// failed or panicking `handle_event`, a refused message).
    pub fn stop(&mut self) -> Result<(), DaemonError> {
        self.daemon.stop()
    }
}
