//! `vhost-user-sum`: a small device written the way rust-vmm vhost-user-backend devices are
//! written, built twice from this one file: against rust-vmm's vhost-user-backend 0.24
//! (`tests/tests/port_rustvmm.rs`) and against vu's facade (`tests/tests/port_vu.rs`). The
//! only difference between the builds is the `compat` module each test file declares: a few
//! `use` lines, and for rust-vmm, shims that give it the spelling of the documented one-line
//! changes of docs/porting-from-rust-vmm.md. If vu changes in a way that breaks such a port,
//! `port_vu` stops compiling or its tests fail, in `cargo test --workspace`.
//!
//! The device (ours, not a virtio standard one): one request queue; each request is a chain
//! of device-readable buffers followed by one device-writable buffer of at least four bytes,
//! in which the device writes the sum of the readable bytes as a little-endian `u32` (used
//! length 4). A config space of 8 bytes holds the largest request it accepts and a seed added
//! to every sum. Besides the kick, the device watches a "doorbell" eventfd of its own
//! (`register_listener`): writing it makes the device serve the queue without a kick.

use std::io;
use std::sync::{Arc, RwLock};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// The framework: the only lines a port changes (see the `compat` modules).
use crate::compat::{
    BorrowFd, VhostUserBackendMut, VhostUserDaemon, VhostUserProtocolFeatures, VringRwLock, VringT,
};

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 30;

/// One queue.
pub const NUM_QUEUES: usize = 1;
/// Its largest size.
pub const QUEUE_SIZE: usize = 256;
/// The doorbell's `device_event`: above the queues and the exit event (`NUM_QUEUES`).
pub const DOORBELL_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Bytes of the config space.
pub const CONFIG_SIZE: usize = 8;

/// What can go wrong serving a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// The frontend has not sent a memory table.
    NoMemoryConfigured,
    /// The available ring could not be read.
    IterateQueue,
    /// A chain has no writable buffer of at least 4 bytes after its readable ones.
    NoStatusBuffer,
    /// A request's readable bytes exceed the configured maximum.
    RequestTooLarge(u32),
    /// Reading or writing guest memory failed.
    GuestMemory,
    /// The used ring could not be updated.
    AddUsed,
    /// The call eventfd could not be written.
    SignalUsedQueue,
    /// `handle_event` got events other than `EPOLLIN`.
    HandleEventNotEpollIn,
    /// `handle_event` got a device event the device does not know.
    HandleEventUnknown(u16),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vhost-user-sum: {self:?}")
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        io::Error::other(err)
    }
}

/// The device.
pub struct VhostUserSumBackend {
    event_idx: bool,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// `max_request` then `seed`, little-endian.
    config: [u8; CONFIG_SIZE],
    /// Written by the device's user to make it serve the queue without a kick.
    pub doorbell: EventFd,
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
    /// Requests served.
    pub served: u64,
}

impl VhostUserSumBackend {
    /// A device that accepts requests of up to `max_request` bytes and adds `seed` to sums.
    pub fn new(max_request: u32, seed: u32) -> io::Result<Self> {
        let mut config = [0u8; CONFIG_SIZE];
        config[..4].copy_from_slice(&max_request.to_le_bytes());
        config[4..].copy_from_slice(&seed.to_le_bytes());
        let (exit_consumer, exit_notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(VhostUserSumBackend {
            event_idx: false,
            mem: None,
            config,
            doorbell: EventFd::new(EFD_NONBLOCK)?,
            exit_consumer,
            exit_notifier,
            served: 0,
        })
    }

    fn max_request(&self) -> u32 {
        u32::from_le_bytes([
            self.config[0],
            self.config[1],
            self.config[2],
            self.config[3],
        ])
    }

    fn seed(&self) -> u32 {
        u32::from_le_bytes([
            self.config[4],
            self.config[5],
            self.config[6],
            self.config[7],
        ])
    }

    /// Makes the worker thread exit (through the exit event).
    pub fn stop_worker(&self) -> io::Result<()> {
        self.exit_notifier.notify()
    }

    /// Serves every available chain; returns whether there was one.
    pub fn process_queue(&mut self, vring: &VringRwLock) -> Result<bool, Error> {
        let mem = self.mem.as_ref().ok_or(Error::NoMemoryConfigured)?.memory();
        let requests: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem)
            .map_err(|_| Error::IterateQueue)?
            .collect();
        if requests.is_empty() {
            return Ok(false);
        }
        for chain in requests {
            let mem = chain.memory();
            let mut sum = self.seed();
            let mut total = 0u32;
            let mut status = None;
            for desc in chain.clone() {
                if desc.is_write_only() {
                    if desc.len() >= 4 {
                        status = Some(desc.addr());
                    }
                    break;
                }
                total = total.saturating_add(desc.len());
                if total > self.max_request() {
                    return Err(Error::RequestTooLarge(total));
                }
                let mut bytes = vec![0u8; desc.len() as usize];
                mem.read_slice(&mut bytes, desc.addr())
                    .map_err(|_| Error::GuestMemory)?;
                sum = bytes
                    .iter()
                    .fold(sum, |acc, &b| acc.wrapping_add(u32::from(b)));
            }
            let status = status.ok_or(Error::NoStatusBuffer)?;
            mem.write_obj(sum.to_le(), status)
                .map_err(|_| Error::GuestMemory)?;
            vring
                .add_used(chain.head_index(), 4)
                .map_err(|_| Error::AddUsed)?;
            self.served += 1;
        }
        vring
            .signal_used_queue()
            .map_err(|_| Error::SignalUsedQueue)?;
        Ok(true)
    }

    /// Serves queue 0, with the EVENT_IDX re-check when it was negotiated.
    fn serve(&mut self, vring: &VringRwLock) -> Result<(), Error> {
        if self.event_idx {
            loop {
                vring
                    .disable_notification()
                    .map_err(|_| Error::IterateQueue)?;
                self.process_queue(vring)?;
                if !vring
                    .enable_notification()
                    .map_err(|_| Error::IterateQueue)?
                {
                    break;
                }
            }
        } else {
            self.process_queue(vring)?;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for VhostUserSumBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        let Some(end) = start.checked_add(size as usize) else {
            return Vec::new();
        };
        self.config
            .get(start..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        let end = start
            .checked_add(buf.len())
            .filter(|&end| end <= CONFIG_SIZE)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "outside the config space")
            })?;
        self.config[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((
            self.exit_consumer.try_clone().ok()?,
            self.exit_notifier.try_clone().ok()?,
        ))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(Error::HandleEventNotEpollIn.into());
        }
        match device_event {
            0 => self.serve(&vrings[0])?,
            DOORBELL_EVENT => {
                // Consume the doorbell (level-triggered), then serve as for a kick. The
                // doorbell is the device's own event: it can ring after the frontend stopped
                // the ring (GET_VRING_BASE), when there is nothing to serve (and iterating a
                // stopped queue is an error).
                let _ = self.doorbell.read();
                if vrings[0].get_ref().get_queue().ready() {
                    self.serve(&vrings[0])?;
                }
            }
            other => return Err(Error::HandleEventUnknown(other).into()),
        }
        Ok(())
    }
}

/// The daemon type of this device.
pub type SumDaemon = VhostUserDaemon<Arc<RwLock<VhostUserSumBackend>>>;

/// The tests, the same for both builds.
mod tests {
    use std::thread;

    use vm_memory::GuestMemoryAtomic;
    use vu_backend::testing::{Buf, DeviceSetup, DriverMemory, SplitQueue, TestDevice, Used};
    use vu_backend::Frontend;
    use vu_tests::device::{socket_path, DEVICE_TIMEOUT};

    use super::*;
    use crate::compat;

    fn sum_of(bytes: &[u8], seed: u32) -> Vec<u8> {
        let sum = bytes
            .iter()
            .fold(seed, |acc, &b| acc.wrapping_add(u32::from(b)));
        sum.to_le_bytes().to_vec()
    }

    /// A vring of `size` entries over `memory`, set up as the daemon would for a started
    /// queue (the rust-vmm device tests' idiom), and the driver's queue laid out in it.
    fn vring_over(memory: &mut DriverMemory, size: u16) -> (VringRwLock, SplitQueue) {
        let queue = SplitQueue::new(memory, 0, size);
        let vring = VringRwLock::new(GuestMemoryAtomic::new(memory.mem().clone()), 256).unwrap();
        let (desc, avail, used) = queue.ring_addrs();
        compat::set_queue_size(&vring, size);
        vring.set_queue_info(desc.0, avail.0, used.0).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        (vring, queue)
    }

    #[test]
    fn device_describes_itself_as_rust_vmm_devices_do() {
        let dev = VhostUserSumBackend::new(64, 0).unwrap();
        assert_eq!(dev.num_queues(), 1);
        assert_eq!(dev.max_queue_size(), 256);
        assert_eq!(dev.features() >> VIRTIO_F_VERSION_1 & 1, 1);
        assert!(dev
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        // The trait's default, the same on both frameworks.
        assert_eq!(dev.queues_per_thread(), vec![0xffff_ffff]);
        assert!(dev.exit_event(0).is_some());
    }

    #[test]
    fn config_space_reads_and_writes_in_range_only() {
        let mut dev = VhostUserSumBackend::new(64, 7).unwrap();
        assert_eq!(dev.get_config(0, 4), 64u32.to_le_bytes());
        assert_eq!(dev.get_config(4, 4), 7u32.to_le_bytes());
        assert!(dev.get_config(6, 4).is_empty());
        assert!(dev.get_config(u32::MAX, 2).is_empty());
        dev.set_config(4, &9u32.to_le_bytes()).unwrap();
        assert_eq!(dev.get_config(4, 4), 9u32.to_le_bytes());
        assert!(dev.set_config(6, &[0; 4]).is_err());
    }

    #[test]
    fn process_queue_sums_each_chain_into_its_status_buffer() {
        let mut memory = DriverMemory::new(1 << 20);
        let (vring, mut queue) = vring_over(&mut memory, 16);
        let mut dev = VhostUserSumBackend::new(1024, 3).unwrap();
        dev.update_memory(GuestMemoryAtomic::new(memory.mem().clone()))
            .unwrap();
        assert_eq!(dev.process_queue(&vring), Ok(false));
        queue.post(&[Buf::Readable(vec![1, 2, 3]), Buf::Writable(4)]);
        queue.post(&[
            Buf::Readable(vec![200; 10]),
            Buf::Readable(vec![5]),
            Buf::Writable(8),
        ]);
        assert_eq!(dev.process_queue(&vring), Ok(true));
        let used: Vec<Used> = queue.poll_used();
        assert_eq!(used.len(), 2);
        assert_eq!(used[0].len, 4);
        assert_eq!(used[0].written[0], sum_of(&[1, 2, 3], 3));
        assert_eq!(
            used[1].written[0][..4],
            sum_of(&[&[200u8; 10][..], &[5]].concat(), 3)[..]
        );
        assert_eq!(dev.served, 2);
    }

    #[test]
    fn process_queue_refuses_a_chain_without_status_buffer() {
        let mut memory = DriverMemory::new(1 << 20);
        let (vring, mut queue) = vring_over(&mut memory, 16);
        let mut dev = VhostUserSumBackend::new(1024, 0).unwrap();
        dev.update_memory(GuestMemoryAtomic::new(memory.mem().clone()))
            .unwrap();
        queue.post(&[Buf::Readable(vec![1, 2, 3])]);
        assert_eq!(dev.process_queue(&vring), Err(Error::NoStatusBuffer));
    }

    #[test]
    fn process_queue_without_memory_is_an_error() {
        let mut memory = DriverMemory::new(1 << 20);
        let (vring, _queue) = vring_over(&mut memory, 16);
        let mut dev = VhostUserSumBackend::new(1024, 0).unwrap();
        assert_eq!(dev.process_queue(&vring), Err(Error::NoMemoryConfigured));
    }

    #[test]
    fn handle_event_refuses_unknown_events() {
        let mut memory = DriverMemory::new(1 << 20);
        let (vring, _queue) = vring_over(&mut memory, 16);
        let mut dev = VhostUserSumBackend::new(1024, 0).unwrap();
        dev.update_memory(GuestMemoryAtomic::new(memory.mem().clone()))
            .unwrap();
        let vrings = [vring];
        assert!(dev.handle_event(9, EventSet::IN, &vrings, 0).is_err());
        assert!(dev.handle_event(0, EventSet::OUT, &vrings, 0).is_err());
        assert!(dev.handle_event(0, EventSet::IN, &vrings, 0).is_ok());
    }

    /// The whole device over a socket: the framework's daemon, our frontend and guest driver,
    /// a kick, the doorbell registered with `register_listener`, the config space over the
    /// wire, and the exit event.
    fn serve_over_a_socket(event_idx: bool) {
        let (_dir, path) = socket_path();
        let backend = Arc::new(RwLock::new(VhostUserSumBackend::new(4096, 1).unwrap()));
        let mut daemon: SumDaemon = VhostUserDaemon::new(
            "vhost-user-sum".to_owned(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        // The device's own fd in the worker's epoll set, as rust-vmm devices' mains do it.
        let handlers = daemon.get_epoll_handlers();
        handlers[0]
            .register_listener(
                backend.read().unwrap().doorbell.borrow_fd(),
                EventSet::IN,
                u64::from(DOORBELL_EVENT),
            )
            .unwrap();
        let doorbell = backend.read().unwrap().doorbell.try_clone().unwrap();

        let listener = compat::listener(&path);
        let setup = DeviceSetup {
            event_idx,
            protocol: vu_backend::ProtocolFeatures::MQ
                | vu_backend::ProtocolFeatures::REPLY_ACK
                | vu_backend::ProtocolFeatures::CONFIG,
            ..DeviceSetup::default()
        };
        // The frontend connects (the listener is bound: the connection waits in its backlog)
        // while this thread starts the daemon (rust-vmm's `start` accepts before returning).
        let guest = thread::spawn(move || {
            let fe = Frontend::connect(&path).expect("connect");
            let mut dev = TestDevice::setup(fe, &setup);
            let config = dev
                .frontend
                .get_config(0, 8, vu_backend::vu_proto::payload::ConfigFlags::empty())
                .expect("GET_CONFIG");
            assert_eq!(config[..4], 4096u32.to_le_bytes());
            let queue = dev.queue(0);
            queue.post_and_kick(&[Buf::Readable(vec![10, 20]), Buf::Writable(4)]);
            let used = queue.wait_used(1, DEVICE_TIMEOUT);
            assert_eq!(used[0].written[0], sum_of(&[10, 20], 1));
            // Posted without a kick: the doorbell makes the device look.
            queue.post(&[Buf::Readable(vec![1; 100]), Buf::Writable(4)]);
            doorbell.write(1).unwrap();
            let used = queue.wait_used(1, DEVICE_TIMEOUT);
            assert_eq!(used[0].written[0], sum_of(&[1; 100], 1));
            assert_eq!(dev.stop_queue(0), 2);
        });
        compat::start(&mut daemon, listener);
        guest.join().expect("the guest's checks");
        let ended = daemon.wait();
        assert!(
            compat::ended_cleanly(&ended),
            "the daemon ended with {ended:?}"
        );
        assert_eq!(backend.read().unwrap().served, 2);
        backend.read().unwrap().stop_worker().unwrap();
    }

    #[test]
    fn serves_a_frontend_over_a_socket() {
        serve_over_a_socket(false);
    }

    #[test]
    fn serves_a_frontend_over_a_socket_with_event_idx() {
        serve_over_a_socket(true);
    }
}
