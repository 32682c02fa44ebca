//! Test backends: [`EchoBackend`], which completes every chain by copying the bytes of its
//! readable buffers into its writable ones, with switches to fail, panic or record.

use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vu_backend::{DisabledRing, VhostUserBackend, VringT};
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};

/// The memory type of the test backends (no dirty logging).
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// "No queue" for the fail and panic switches.
const NONE: u32 = u32::MAX;

/// A backend whose queues echo: each chain's readable bytes are copied, in order, into its
/// writable buffers, and the chain is used with the number of bytes written.
///
/// Generic over the vring type, so the same device runs on [`VhostUserDaemon`] (with
/// `VringMutex`/`VringRwLock`) and on [`LocalDaemon`] (with `VringState`).
///
/// [`VhostUserDaemon`]: vu_backend::VhostUserDaemon
/// [`LocalDaemon`]: vu_backend::LocalDaemon
#[derive(Debug)]
pub struct EchoBackend<V> {
    num_queues: usize,
    queue_size: usize,
    masks: Vec<u64>,
    event_idx: AtomicBool,
    fail_queue: AtomicU32,
    panic_queue: AtomicU32,
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// `(device_event, thread_id)` of every `handle_event` call.
    pub calls: Mutex<Vec<(u16, usize)>>,
    /// How many chains were completed.
    pub completed: AtomicU64,
    /// How many times `reset_device` was called.
    pub resets: AtomicU64,
    /// What a kick on a disabled ring does (`disabled_ring`).
    disabled: DisabledRing,
    /// The protocol features offered.
    protocol: ProtocolFeatures,
    _vring: PhantomData<fn() -> V>,
}

impl<V> EchoBackend<V> {
    /// A device with `num_queues` queues of at most `queue_size` entries, all served by one
    /// worker thread (`queues_per_thread()` is the all-ones mask, `vec![u64::MAX]`).
    pub fn new(num_queues: usize, queue_size: usize) -> Self {
        EchoBackend {
            num_queues,
            queue_size,
            masks: vec![u64::MAX],
            event_idx: AtomicBool::new(false),
            fail_queue: AtomicU32::new(NONE),
            panic_queue: AtomicU32::new(NONE),
            exits: Vec::new(),
            calls: Mutex::new(Vec::new()),
            completed: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            disabled: DisabledRing::Hold,
            protocol: ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK,
            _vring: PhantomData,
        }
    }

    /// Sets `queues_per_thread()`.
    pub fn with_threads(mut self, masks: Vec<u64>) -> Self {
        self.masks = masks;
        self
    }

    /// Sets what a kick on a started but disabled ring does, for every queue.
    pub fn with_disabled_ring(mut self, policy: DisabledRing) -> Self {
        self.disabled = policy;
        self
    }

    /// Sets the protocol features offered (the default: MQ and REPLY_ACK).
    pub fn with_protocol_features(mut self, protocol: ProtocolFeatures) -> Self {
        self.protocol = protocol;
        self
    }

    /// Gives each of `threads` worker threads an exit event.
    pub fn with_exit_events(mut self, threads: usize) -> Self {
        self.exits = (0..threads)
            .map(|_| {
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                    .expect("exit event")
            })
            .collect();
        self
    }

    /// Writes the exit event of thread `thread`.
    pub fn write_exit_event(&self, thread: usize) {
        self.exits[thread].1.notify().expect("write exit event");
    }

    /// Makes `handle_event` for queue `queue` return an error.
    pub fn fail_on(&self, queue: u16) {
        self.fail_queue.store(u32::from(queue), Ordering::SeqCst);
    }

    /// Makes `handle_event` for queue `queue` panic.
    pub fn panic_on(&self, queue: u16) {
        self.panic_queue.store(u32::from(queue), Ordering::SeqCst);
    }

    /// The threads that handled events of queue `queue`.
    pub fn threads_of(&self, queue: u16) -> Vec<usize> {
        let mut threads: Vec<usize> = self
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(q, _)| *q == queue)
            .map(|(_, t)| *t)
            .collect();
        threads.sort_unstable();
        threads.dedup();
        threads
    }

    /// Whether `set_event_idx(true)` is in force.
    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::SeqCst)
    }
}

/// Completes every available chain of `vring` by echoing; returns how many.
pub fn echo_queue<V: VringT<Mem>>(vring: &V) -> io::Result<u64> {
    let mut done = 0;
    while let Some(chain) = vring.pop_descriptor_chain() {
        let head = chain.head_index();
        let mem = chain.memory();
        let descs: Vec<Descriptor> = chain.clone().collect();
        let mut data = Vec::new();
        for d in descs.iter().filter(|d| !d.is_write_only()) {
            let mut bytes = vec![0u8; d.len() as usize];
            mem.read_slice(&mut bytes, d.addr())
                .map_err(io::Error::other)?;
            data.extend_from_slice(&bytes);
        }
        let mut written = 0usize;
        for d in descs.iter().filter(|d| d.is_write_only()) {
            let take = (d.len() as usize).min(data.len() - written);
            mem.write_slice(&data[written..written + take], d.addr())
                .map_err(io::Error::other)?;
            written += take;
        }
        let len = u32::try_from(written).map_err(io::Error::other)?;
        vring.add_used(head, len).map_err(io::Error::other)?;
        done += 1;
    }
    vring
        .signal_used_queue_if_needed()
        .map_err(io::Error::other)?;
    Ok(done)
}

impl<V: VringT<Mem>> VhostUserBackend for EchoBackend<V> {
    type Bitmap = ();
    type Vring = V;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1
            | VirtioFeatures::RING_EVENT_IDX
            | VirtioFeatures::PROTOCOL_FEATURES)
            .bits()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        self.protocol
    }

    fn reset_device(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::SeqCst);
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.masks.clone()
    }

    fn disabled_ring(&self, _queue: u16) -> DisabledRing {
        self.disabled
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[V],
        thread_id: usize,
    ) -> io::Result<()> {
        self.calls.lock().unwrap().push((device_event, thread_id));
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        if u32::from(device_event) == self.panic_queue.load(Ordering::SeqCst) {
            panic!("echo backend told to panic on queue {device_event}");
        }
        if u32::from(device_event) == self.fail_queue.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "told to fail on queue {device_event}"
            )));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("no queue {device_event}")))?;
        let mut done = 0;
        if self.event_idx() {
            loop {
                vring.disable_notification().map_err(io::Error::other)?;
                done += echo_queue(vring)?;
                if !vring.enable_notification().map_err(io::Error::other)? {
                    break;
                }
            }
        } else {
            done += echo_queue(vring)?;
        }
        self.completed.fetch_add(done, Ordering::SeqCst);
        Ok(())
    }
}
