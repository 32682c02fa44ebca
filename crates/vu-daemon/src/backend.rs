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
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vu_mem::RegionBitmap;
use vu_proto::features::ProtocolFeatures;
use vu_proto::payload::{ConfigFlags, SharedObject, ShmemConfig, TransferDirection, TransferPhase};
use vu_vring::VringT;

/// The guest memory handle given to backends and vrings (the reference calls it `GM` too).
pub type GM<B> = GuestMemoryAtomic<GuestMemoryMmap<B>>;

/// The channel on which the backend sends requests to the frontend (`SET_BACKEND_REQ_FD`):
/// vu-proto's typed sender, told which protocol features were negotiated.
pub use vu_proto::backend::BackendChannel;

/// The default `queues_per_thread()` mask: queues 0 to 31 on one thread, as in rust-vmm's
/// vhost-user-backend (a port's test that checks the default passes unchanged).
pub const DEFAULT_QUEUES_MASK: u64 = 0xffff_ffff;

/// The `size` bytes at `offset` of a device's config space `config`, for
/// [`VhostUserBackend::get_config`]: what lies past the end of `config` reads as zeros (the
/// frontend asks for the config size it knows, which may be larger than the fields this
/// device fills).
pub fn config_read(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(config.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(config.len());
    out[..end - start].copy_from_slice(&config[start..end]);
    out
}

/// An `io::Error` of kind `Unsupported` saying what the backend does not do.
fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("the backend does not support {what}"),
    )
}

/// What the framework does with a kick on a started ring that the frontend disabled
/// (`SET_VRING_ENABLE` with 0); chosen per queue by [`VhostUserBackend::disabled_ring`].
///
/// The spec: "started and disabled: The back-end must process the ring without causing any
/// side effects. For example, for a networking device, in the disabled state the back-end
/// must not supply any new RX packets, but must process and discard any TX packets." Which
/// processing has no side effect depends on the queue, so the device says.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisabledRing {
    /// The default: the kick is held, and the ring is served as soon as it is enabled again
    /// (or its chains are left for the next start after `GET_VRING_BASE`). Nothing is
    /// consumed, so nothing has a side effect; right for queues whose requests act on the
    /// world (a block write, an RX buffer). QEMU disables the rings just before it stops
    /// them (`vhost_dev_stop`), where serving a request would be wrong.
    Hold,
    /// `handle_event` is called as for an enabled ring; the device sees
    /// `vring.is_enabled() == false` and must serve without side effects (a net device
    /// consumes and drops TX buffers, supplies no RX buffers).
    Dispatch,
    /// The framework completes every available chain with a used length of 0 without
    /// calling the device, and interrupts the driver as usual: "process and discard", for a
    /// queue whose chains only carry data to the device (a net TX queue).
    Discard,
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
    /// vector tells the frontend the read failed. [`config_read`] cuts the window out of a
    /// device's config bytes.
    fn get_config(&self, _offset: u32, _size: u32) -> Vec<u8> {
        Vec::new()
    }

    /// Writes `buf` into the device config space at `offset` (`SET_CONFIG`), with rust-vmm
    /// vhost-user-backend's signature; the default
    /// [`set_config_with_flags`](Self::set_config_with_flags) calls it. The default refuses.
    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(unsupported("writing the config space"))
    }

    /// `SET_CONFIG` with the message's flags; the default ignores them and calls
    /// [`set_config`](Self::set_config). The spec: "The vhost-user back-end must check the
    /// flags field, and back-ends MUST NOT accept SET_CONFIG for read-only configuration space
    /// fields unless the live migration bit is set": a device with read-only fields overrides
    /// this and refuses a write to one of them unless
    /// [`flags.is_live_migration()`](ConfigFlags::is_live_migration). A rust-vmm front-end
    /// sends its `WRITABLE` flag (1) on ordinary writes, which QEMU's numbering, followed
    /// here, reads as the live migration flag.
    fn set_config_with_flags(
        &self,
        offset: u32,
        buf: &[u8],
        _flags: ConfigFlags,
    ) -> io::Result<()> {
        self.set_config(offset, buf)
    }

    /// The frontend set the virtio device status (`SET_STATUS`, protocol feature STATUS): the
    /// spec's "updated device status as defined in the Virtio specification", one byte
    /// (ACKNOWLEDGE 1, DRIVER 2, DRIVER_OK 4, FEATURES_OK 8, DEVICE_NEEDS_RESET 64, FAILED
    /// 128). An error refuses the request and leaves the status `GET_STATUS` returns as it
    /// was. Status 0 is not a reset here: QEMU sends it when it stops the device, before the
    /// `GET_VRING_BASE`s, and resets with `RESET_DEVICE` (then [`reset_device`] is called).
    ///
    /// [`reset_device`]: Self::reset_device
    fn set_status(&self, _status: u8) -> io::Result<()> {
        Ok(())
    }

    /// What a kick on queue `queue`'s started but disabled ring does; see [`DisabledRing`].
    fn disabled_ring(&self, _queue: u16) -> DisabledRing {
        DisabledRing::Hold
    }

    /// Queue `queue`'s ring is polled (`SET_VRING_KICK` with the no-fd flag: "polling should
    /// be used instead of waiting for the kick") or waits for kicks again (`polled` false,
    /// a kick fd arrived). While polled, the framework calls `handle_event` for the queue
    /// every millisecond whether or not the driver posted anything. An error refuses the
    /// `SET_VRING_KICK`.
    fn set_vring_polled(&self, _queue: u16, _polled: bool) -> io::Result<()> {
        Ok(())
    }

    /// Hands over the vhost-user GPU protocol socket (`GPU_SET_SOCKET`); the GPU protocol
    /// (docs/interop/vhost-user-gpu.rst) is the device's to speak. The default refuses.
    fn set_gpu_socket(&self, _socket: OwnedFd) -> io::Result<()> {
        Err(unsupported("the vhost-user GPU protocol"))
    }

    /// Broadcasts a fake RARP for the guest whose MAC address is `mac` (`SEND_RARP`, protocol
    /// feature RARP): the spec's "broadcast a fake RARP to notify the migration is terminated
    /// for guest that does not support GUEST_ANNOUNCE", so that the network learns where the
    /// guest now is. A network device that offers
    /// [`ProtocolFeatures::RARP`] implements it; the default refuses.
    fn send_rarp(&self, _mac: [u8; 6]) -> io::Result<()> {
        Err(unsupported("broadcasting a RARP"))
    }

    /// The host MTU exposed to the guest (`NET_SET_MTU`, protocol feature NET_MTU, sent once
    /// `VIRTIO_NET_F_MTU` is negotiated); `mtu` is the message's value, which the framework
    /// has checked fits 16 bits. An error tells the frontend the MTU is not valid ("the
    /// back-end must respond with zero in case the specified MTU is valid, or non-zero
    /// otherwise"). A network device that offers [`ProtocolFeatures::MTU`] implements it; the
    /// default refuses.
    fn set_mtu(&self, _mtu: u16) -> io::Result<()> {
        Err(unsupported("setting the MTU"))
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
    /// `t`; the all-ones mask `u64::MAX` claims every queue, however many.
    ///
    /// The default, `vec![0xffff_ffff]` (rust-vmm vhost-user-backend's), puts queues 0 to 31 on
    /// one thread. A device with more queues returns `vec![u64::MAX]` or its own masks: the
    /// daemon refuses (at [`VhostUserDaemon::new`](crate::VhostUserDaemon::new)) a queue that
    /// is in no mask or in more than one, rather than never serving it.
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![DEFAULT_QUEUES_MASK]
    }

    /// An event pair whose notifier, when signalled, makes worker thread `thread_index` exit.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        None
    }

    /// Queue `queue` is stopping (`GET_VRING_BASE`, or a reset or disconnect of a started
    /// ring). Called after its kick is no longer watched and no worker is handling it, before
    /// the frontend learns the index to resume from and before the ring is reset: an
    /// asynchronous device completes or drains what it accepted from the queue here
    /// ([`Offload::drain`](crate::Offload::drain)).
    fn stop_vring(&self, _queue: u16) -> io::Result<()> {
        Ok(())
    }

    /// Whether chains found in flight after a reconnect (inflight I/O tracking,
    /// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) are handed to the device again, oldest first,
    /// before new ones. The default is yes, right for a device whose requests are idempotent
    /// (a block device's reads and writes). A device whose requests must not be executed twice
    /// returns `false`: those chains are then returned to the driver unserved, with a used
    /// length of 0.
    fn resubmit_inflight(&self) -> bool {
        true
    }

    /// Handles a readable kick (`device_event` < `num_queues`) or an event of an fd the
    /// device registered itself (higher `device_event`), on worker thread `thread_id`.
    ///
    /// An in-band `VRING_KICK` is served before the frontend's answer, on the connection
    /// thread with the `thread_id` of the queue's worker, which does not dispatch the queue
    /// meanwhile: calls for one queue never overlap.
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

    /// See [`VhostUserBackend::set_config_with_flags`].
    fn set_config_with_flags(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: ConfigFlags,
    ) -> io::Result<()> {
        self.set_config(offset, buf)
    }

    /// See [`VhostUserBackend::set_status`].
    fn set_status(&mut self, _status: u8) -> io::Result<()> {
        Ok(())
    }

    /// See [`VhostUserBackend::disabled_ring`].
    fn disabled_ring(&self, _queue: u16) -> DisabledRing {
        DisabledRing::Hold
    }

    /// See [`VhostUserBackend::set_vring_polled`].
    fn set_vring_polled(&mut self, _queue: u16, _polled: bool) -> io::Result<()> {
        Ok(())
    }

    /// See [`VhostUserBackend::set_gpu_socket`].
    fn set_gpu_socket(&mut self, _socket: OwnedFd) -> io::Result<()> {
        Err(unsupported("the vhost-user GPU protocol"))
    }

    /// See [`VhostUserBackend::send_rarp`].
    fn send_rarp(&mut self, _mac: [u8; 6]) -> io::Result<()> {
        Err(unsupported("broadcasting a RARP"))
    }

    /// See [`VhostUserBackend::set_mtu`].
    fn set_mtu(&mut self, _mtu: u16) -> io::Result<()> {
        Err(unsupported("setting the MTU"))
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
        vec![DEFAULT_QUEUES_MASK]
    }

    /// See [`VhostUserBackend::exit_event`].
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        None
    }

    /// See [`VhostUserBackend::stop_vring`].
    fn stop_vring(&mut self, _queue: u16) -> io::Result<()> {
        Ok(())
    }

    /// See [`VhostUserBackend::resubmit_inflight`].
    fn resubmit_inflight(&self) -> bool {
        true
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
    fn set_config_with_flags(&self, offset: u32, buf: &[u8], flags: ConfigFlags) -> io::Result<()> {
        self.deref().set_config_with_flags(offset, buf, flags)
    }
    fn set_status(&self, status: u8) -> io::Result<()> {
        self.deref().set_status(status)
    }
    fn disabled_ring(&self, queue: u16) -> DisabledRing {
        self.deref().disabled_ring(queue)
    }
    fn set_vring_polled(&self, queue: u16, polled: bool) -> io::Result<()> {
        self.deref().set_vring_polled(queue, polled)
    }
    fn set_gpu_socket(&self, socket: OwnedFd) -> io::Result<()> {
        self.deref().set_gpu_socket(socket)
    }
    fn send_rarp(&self, mac: [u8; 6]) -> io::Result<()> {
        self.deref().send_rarp(mac)
    }
    fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        self.deref().set_mtu(mtu)
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
    fn resubmit_inflight(&self) -> bool {
        self.deref().resubmit_inflight()
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
            fn set_config_with_flags(
                &self,
                offset: u32,
                buf: &[u8],
                flags: ConfigFlags,
            ) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_config_with_flags(offset, buf, flags)
            }
            fn set_status(&self, status: u8) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_status(status)
            }
            fn disabled_ring(&self, queue: u16) -> DisabledRing {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .disabled_ring(queue)
            }
            fn set_vring_polled(&self, queue: u16, polled: bool) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_vring_polled(queue, polled)
            }
            fn set_gpu_socket(&self, socket: OwnedFd) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_gpu_socket(socket)
            }
            fn send_rarp(&self, mac: [u8; 6]) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .send_rarp(mac)
            }
            fn set_mtu(&self, mtu: u16) -> io::Result<()> {
                self.$write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_mtu(mtu)
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
            fn resubmit_inflight(&self) -> bool {
                self.$read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .resubmit_inflight()
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

#[cfg(test)]
mod tests {
    use super::config_read;

    #[test]
    fn config_read_cuts_the_window_and_reads_zeros_past_the_end() {
        let config = [1u8, 2, 3, 4];
        assert_eq!(config_read(&config, 1, 2), [2, 3]);
        assert_eq!(config_read(&config, 2, 4), [3, 4, 0, 0]);
        assert_eq!(config_read(&config, 9, 3), [0, 0, 0]);
        assert_eq!(config_read(&config, u32::MAX, 2), [0, 0]);
        assert!(config_read(&config, 0, 0).is_empty());
    }
}
