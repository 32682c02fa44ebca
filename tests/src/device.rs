//! Setting up a device over a vu-proto [`Frontend`], as QEMU does, with the queues of a
//! [`SplitQueue`] driver; and short socket paths for tests.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use vmm_sys_util::tempdir::TempDir;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::frontend::Frontend;

use crate::proto_support::eventfd_fd;
use crate::virtqueue::{DriverMemory, SplitQueue};

/// How long a test waits for the backend before failing instead of hanging.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket path in a fresh directory under `/tmp` (short enough for `sun_path`); the
/// directory is removed when the returned [`TempDir`] is dropped.
pub fn socket_path() -> (TempDir, PathBuf) {
    let dir = TempDir::new_with_prefix("/tmp/vu-").expect("temp dir");
    let path = dir.as_path().join("s.sock");
    assert!(path.as_os_str().len() < 100, "socket path too long");
    (dir, path)
}

/// What to negotiate and lay out.
#[derive(Debug, Clone)]
pub struct DeviceSetup {
    /// How many queues to set up (from 0).
    pub queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Whether to acknowledge `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// Protocol features to acknowledge, of those offered.
    pub protocol: ProtocolFeatures,
    /// Bytes of guest memory.
    pub memory: u64,
}

impl Default for DeviceSetup {
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
    /// `SET_OWNER`, feature negotiation, `SET_MEM_TABLE` with the driver's memfd, then every
    /// queue started ([`start_queue`](Self::start_queue)) and enabled.
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
        fe.set_vring_call(index, Some(eventfd_fd(&queue.call)))
            .expect("SET_VRING_CALL");
        fe.set_vring_kick(index, Some(eventfd_fd(&queue.kick)))
            .expect("SET_VRING_KICK");
    }

    /// `SET_VRING_ENABLE` for queue `q`, when protocol features were negotiated (otherwise
    /// rings are enabled when started).
    pub fn enable_queue(&mut self, q: u16, enable: bool) {
        if self.protocol_negotiated {
            self.frontend
                .set_vring_enable(u32::from(q), enable)
                .expect("SET_VRING_ENABLE");
        }
    }

    /// `GET_VRING_BASE` for queue `q`: stops the ring and returns its next available index.
    pub fn stop_queue(&mut self, q: u16) -> u16 {
        let base = self
            .frontend
            .get_vring_base(u32::from(q))
            .expect("GET_VRING_BASE");
        u16::try_from(base).expect("vring base fits u16")
    }

    /// Queue `q`.
    pub fn queue(&mut self, q: u16) -> &mut SplitQueue {
        &mut self.queues[usize::from(q)]
    }

    /// The raw fd of the frontend's socket (for tests that cut it).
    pub fn socket_fd(&self) -> i32 {
        self.frontend.endpoint().as_raw_fd()
    }
}
