//! The traits a device implements: [`VhostUserBackend`] (through `&self`, for devices with
//! their own interior mutability) and [`VhostUserBackendMut`] (through `&mut self`).
//!
//! A `Mutex<T>` or `RwLock<T>` of a [`VhostUserBackendMut`] is a [`VhostUserBackend`], and so is
//! an `Arc<T>` of a [`VhostUserBackend`], so a device written with `&mut self` is handed to the
//! daemon as `Arc<RwLock<MyDevice>>` (or `Mutex`) and kept by its author as well.
//!
//! # `Send` and `Sync`
//!
//! Neither trait has `Send` or `Sync` as a supertrait. A single-threaded daemon calls the backend
//! from the one thread that owns it and its [`VringState`](vu_vring::VringState) vrings (which
//! are deliberately not `Sync`), so demanding `Sync` there would forbid exactly the lock-free
//! configuration it exists for. The multi-threaded daemon, which shares the backend with its
//! worker threads, states `Send + Sync` in its own bounds.
//!
//! # Memory and bitmap
//!
//! `Bitmap` is the per-region dirty-tracking type of guest memory: `()` for a device that does
//! not support live migration (no cost per write), [`vu_mem::LogBitmap`] for one that does
//! (every write through guest memory is logged while the frontend asks for it).

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vu_mem::RegionBitmap;
use vu_proto::features::ProtocolFeatures;
use vu_proto::payload::{SharedObject, ShmemConfig, TransferDirection, TransferPhase};
use vu_vring::VringT;

/// The guest memory handle given to backends and vrings (the reference calls it `GM` too).
pub type GM<B> = GuestMemoryAtomic<GuestMemoryMmap<B>>;

/// The channel on which the backend sends requests to the frontend (`SET_BACKEND_REQ_FD`):
/// vu-proto's typed sender, told which protocol features were negotiated.
pub use vu_proto::backend::BackendChannel;

/// An `io::Error` of kind `Unsupported` saying what the backend does not do.
fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("the backend does not support {what}"),
    )
}

/// A vhost-user device, called through `&self`.
///
/// Implement it for a device with its own interior mutability, or implement
/// [`VhostUserBackendMut`] and wrap the device in a `Mutex` or `RwLock`.
pub trait VhostUserBackend {
    /// The dirty-tracking bitmap of guest memory regions: `()` or [`vu_mem::LogBitmap`].
    type Bitmap: RegionBitmap;
    /// The vring type: [`vu_vring::VringMutex`] or [`vu_vring::VringRwLock`] for the
    /// multi-threaded daemon, [`vu_vring::VringState`] for the single-threaded one.
    type Vring: VringT<GM<Self::Bitmap>>;

    /// The number of virtqueues.
    fn num_queues(&self) -> usize;

    /// The largest queue size the device accepts (a power of two, at most 32768).
    fn max_queue_size(&self) -> usize;

    /// The virtio features offered (`GET_FEATURES`), including
    /// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30) when protocol features are supported.
    fn features(&self) -> u64;

    /// The virtio features the frontend acknowledged (`SET_FEATURES`), already masked to
    /// those offered.
    fn acked_features(&self, _features: u64) {}

    /// The protocol features offered (`GET_PROTOCOL_FEATURES`).
    fn protocol_features(&self) -> ProtocolFeatures;

    /// Returns the device to its initial state (`RESET_OWNER`, `RESET_DEVICE`, disconnect).
    fn reset_device(&self) {}

    /// Whether `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    fn set_event_idx(&self, enabled: bool);

    /// Reads `size` bytes of the device config space from `offset` (`GET_CONFIG`). An empty
    /// vector tells the frontend the read failed.
    fn get_config(&self, _offset: u32, _size: u32) -> Vec<u8> {
        Vec::new()
    }

    /// Writes `buf` into the device config space at `offset` (`SET_CONFIG`).
    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(unsupported("writing the config space"))
    }

    /// The guest memory table changed; `mem` is the same handle the vrings hold.
    fn update_memory(&self, mem: GM<Self::Bitmap>) -> io::Result<()>;

    /// Hands over the channel for backend-initiated requests (`SET_BACKEND_REQ_FD`).
    fn set_backend_req_fd(&self, _channel: BackendChannel) {}

    /// Returns a dma-buf fd for the shared object named by `uuid` (`GET_SHARED_OBJECT`).
    fn get_shared_object(&self, _uuid: SharedObject) -> io::Result<File> {
        Err(unsupported("shared objects"))
    }

    /// One bit mask of queues per worker thread: bit `q` of mask `t` puts queue `q` on thread
    /// `t`. The default puts up to 64 queues on one thread; the daemon refuses a queue that is
    /// in no mask or in more than one.
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![u64::MAX]
    }

    /// An event pair whose notifier, when signalled, makes worker thread `thread_index` exit.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        None
    }

    /// Queue `queue` is stopping (`GET_VRING_BASE`). Called after its kick is no longer
    /// watched and no worker is handling it, before the frontend learns the index to resume
    /// from: an asynchronous device completes or drains what it accepted from the queue here.
    fn stop_vring(&self, _queue: u16) -> io::Result<()> {
        Ok(())
    }

    /// Handles a readable kick (`device_event` < `num_queues`) or an event of an fd the
    /// device registered itself (higher `device_event`), on worker thread `thread_id`.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()>;

    /// Starts a device state transfer (`SET_DEVICE_STATE_FD`) over `file`. Returning a file
    /// tells the frontend to use it instead of its own. Must not block on the transfer.
    fn set_device_state_fd(
        &self,
        _direction: TransferDirection,
        _phase: TransferPhase,
        _file: File,
    ) -> io::Result<Option<File>> {
        Err(unsupported("device state transfer"))
    }

    /// Reports whether the last device state transfer succeeded (`CHECK_DEVICE_STATE`).
    fn check_device_state(&self) -> io::Result<()> {
        Err(unsupported("device state transfer"))
    }

    /// The device's shared memory regions (`GET_SHMEM_CONFIG`).
    fn get_shmem_config(&self) -> io::Result<ShmemConfig> {
        Err(unsupported("shared memory regions"))
    }
}

/// A vhost-user device, called through `&mut self`; see [`VhostUserBackend`] for each method.
///
/// Wrap it in a `Mutex` or an `RwLock` (then in an `Arc` to keep a handle) to hand it to the
/// daemon. Read-only queries take `&self`, so an `RwLock` serves them with its read lock.
pub trait VhostUserBackendMut {
    /// See [`VhostUserBackend::Bitmap`].
    type Bitmap: RegionBitmap;
    /// See [`VhostUserBackend::Vring`].
    type Vring: VringT<GM<Self::Bitmap>>;

    /// See [`VhostUserBackend::num_queues`].
    fn num_queues(&self) -> usize;

    /// See [`VhostUserBackend::max_queue_size`].
    fn max_queue_size(&self) -> usize;

    /// See [`VhostUserBackend::features`].
    fn features(&self) -> u64;

    /// See [`VhostUserBackend::acked_features`].
    fn acked_features(&mut self, _features: u64) {}

    /// See [`VhostUserBackend::protocol_features`].
    fn protocol_features(&self) -> ProtocolFeatures;

    /// See [`VhostUserBackend::reset_device`].
    fn reset_device(&mut self) {}

    /// See [`VhostUserBackend::set_event_idx`].
    fn set_event_idx(&mut self, enabled: bool);

    /// See [`VhostUserBackend::get_config`].
    fn get_config(&self, _offset: u32, _size: u32) -> Vec<u8> {
        Vec::new()
    }

    /// See [`VhostUserBackend::set_config`].
    fn set_config(&mut self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(unsupported("writing the config space"))
    }

    /// See [`VhostUserBackend::update_memory`].
    fn update_memory(&mut self, mem: GM<Self::Bitmap>) -> io::Result<()>;

    /// See [`VhostUserBackend::set_backend_req_fd`].
    fn set_backend_req_fd(&mut self, _channel: BackendChannel) {}

    /// See [`VhostUserBackend::get_shared_object`].
    fn get_shared_object(&mut self, _uuid: SharedObject) -> io::Result<File> {
        Err(unsupported("shared objects"))
    }

    /// See [`VhostUserBackend::queues_per_thread`].
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![u64::MAX]
    }

    /// See [`VhostUserBackend::exit_event`].
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        None
    }

    /// See [`VhostUserBackend::stop_vring`].
    fn stop_vring(&mut self, _queue: u16) -> io::Result<()> {
        Ok(())
    }

    /// See [`VhostUserBackend::handle_event`].
    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()>;

    /// See [`VhostUserBackend::set_device_state_fd`].
    fn set_device_state_fd(
        &mut self,
        _direction: TransferDirection,
        _phase: TransferPhase,
        _file: File,
    ) -> io::Result<Option<File>> {
        Err(unsupported("device state transfer"))
    }

    /// See [`VhostUserBackend::check_device_state`].
    fn check_device_state(&self) -> io::Result<()> {
        Err(unsupported("device state transfer"))
    }

    /// See [`VhostUserBackend::get_shmem_config`].
    fn get_shmem_config(&self) -> io::Result<ShmemConfig> {
        Err(unsupported("shared memory regions"))
    }
}

/// Forwards every method to the shared backend.
impl<T: VhostUserBackend + ?Sized> VhostUserBackend for Arc<T> {
    type Bitmap = T::Bitmap;
    type Vring = T::Vring;

    fn num_queues(&self) -> usize {
        self.deref().num_queues()
    }
    fn max_queue_size(&self) -> usize {
        self.deref().max_queue_size()
    }
    fn features(&self) -> u64 {
        self.deref().features()
    }
    fn acked_features(&self, features: u64) {
        self.deref().acked_features(features)
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        self.deref().protocol_features()
    }
    fn reset_device(&self) {
        self.deref().reset_device()
    }
    fn set_event_idx(&self, enabled: bool) {
        self.deref().set_event_idx(enabled)
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.deref().get_config(offset, size)
    }
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.deref().set_config(offset, buf)
    }
    fn update_memory(&self, mem: GM<Self::Bitmap>) -> io::Result<()> {
        self.deref().update_memory(mem)
    }
    fn set_backend_req_fd(&self, channel: BackendChannel) {
        self.deref().set_backend_req_fd(channel)
    }
    fn get_shared_object(&self, uuid: SharedObject) -> io::Result<File> {
        self.deref().get_shared_object(uuid)
    }
    fn queues_per_thread(&self) -> Vec<u64> {
        self.deref().queues_per_thread()
    }
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.deref().exit_event(thread_index)
    }
    fn stop_vring(&self, queue: u16) -> io::Result<()> {
        self.deref().stop_vring(queue)
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        self.deref()
            .handle_event(device_event, evset, vrings, thread_id)
    }
    fn set_device_state_fd(
        &self,
        direction: TransferDirection,
        phase: TransferPhase,
        file: File,
    ) -> io::Result<Option<File>> {
        self.deref().set_device_state_fd(direction, phase, file)
    }
    fn check_device_state(&self) -> io::Result<()> {
        self.deref().check_device_state()
    }
    fn get_shmem_config(&self) -> io::Result<ShmemConfig> {
        self.deref().get_shmem_config()
    }
}

/// Implements [`VhostUserBackend`] for a lock around a [`VhostUserBackendMut`]: `$read` and
/// `$write` take the shared and the exclusive guard. A poisoned lock is entered anyway: a
/// device that panicked in one call should not take every later request down with it, and
/// the panic was already reported on its own thread.
macro_rules! locked_backend {
    ($lock:ident, $read:ident, $write:ident) => {
        /// Takes the lock for each call (the shared guard for queries where the lock has one).
        impl<T: VhostUserBackendMut> VhostUserBackend for $lock<T> {
            type Bitmap = T::Bitmap;
            type Vring = T::Vring;

            fn num_queues(&self) -> usize {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .num_queues()
            }
            fn max_queue_size(&self) -> usize {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .max_queue_size()
            }
            fn features(&self) -> u64 {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .features()
            }
            fn acked_features(&self, features: u64) {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .acked_features(features)
            }
            fn protocol_features(&self) -> ProtocolFeatures {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .protocol_features()
            }
            fn reset_device(&self) {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .reset_device()
            }
            fn set_event_idx(&self, enabled: bool) {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_event_idx(enabled)
            }
            fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_config(offset, size)
            }
            fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_config(offset, buf)
            }
            fn update_memory(&self, mem: GM<Self::Bitmap>) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .update_memory(mem)
            }
            fn set_backend_req_fd(&self, channel: BackendChannel) {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_backend_req_fd(channel)
            }
            fn get_shared_object(&self, uuid: SharedObject) -> io::Result<File> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_shared_object(uuid)
            }
            fn queues_per_thread(&self) -> Vec<u64> {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .queues_per_thread()
            }
            fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .exit_event(thread_index)
            }
            fn stop_vring(&self, queue: u16) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .stop_vring(queue)
            }
            fn handle_event(
                &self,
                device_event: u16,
                evset: EventSet,
                vrings: &[Self::Vring],
                thread_id: usize,
            ) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .handle_event(device_event, evset, vrings, thread_id)
            }
            fn set_device_state_fd(
                &self,
                direction: TransferDirection,
                phase: TransferPhase,
                file: File,
            ) -> io::Result<Option<File>> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_device_state_fd(direction, phase, file)
            }
            fn check_device_state(&self) -> io::Result<()> {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .check_device_state()
            }
            fn get_shmem_config(&self) -> io::Result<ShmemConfig> {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_shmem_config()
            }
        }
    };
}

locked_backend!(Mutex, lock, lock);
locked_backend!(RwLock, read, write);
