//! The vring requests: size, addresses, base, kick/call/err fds, enable, in-band kick, and
//! the ring state transitions of the spec's "Ring states".

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use log::warn;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vu_mem::RegionBitmap;
use vu_proto::backend::BackendChannel;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::header::Header;
use vu_proto::payload::{VringAddr, VringAddrFlags, VringEnable, VringState};
use vu_proto::request::FrontendReq;
use vu_vring::{InbandNotifier, VringT};

use super::{new_eventfd, Reply, Session};
use crate::backend::VhostUserBackend;
use crate::control::RingControl;
use crate::error::SessionError;

use vu_vring::layout;

/// How often a polled ring (`SET_VRING_KICK` with the no-fd flag) is looked at.
pub(crate) const POLL_PERIOD: Duration = Duration::from_millis(1);

/// A ring's in-band notifications: `VHOST_USER_BACKEND_VRING_CALL` and `_ERR` for queue
/// `index` on the back-end channel. With REPLY_ACK (which in-band notifications require)
/// each waits for the frontend's answer: "the latter needs to be used with the in-band
/// notification messages to block until they are processed".
#[derive(Debug)]
pub(super) struct InbandChannel {
    pub(super) channel: BackendChannel,
    pub(super) index: u32,
}

impl InbandNotifier for InbandChannel {
    fn call(&self) -> std::io::Result<()> {
        self.channel
            .vring_call(self.index)
            .map_err(std::io::Error::other)
    }

    fn error(&self) -> std::io::Result<()> {
        self.channel
            .vring_err(self.index)
            .map_err(std::io::Error::other)
    }
}

impl<S, V, B> Session<S, V, B>
where
    S: VhostUserBackend<Vring = V, Bitmap = B>,
    V: VringT<GuestMemoryAtomic<GuestMemoryMmap<B>>>,
    B: RegionBitmap,
{
    /// Checks a queue index as the full 32-bit value the frontend sent, before narrowing it
    /// (CVE-2020-10723: an index truncated to 8 or 16 bits aliased another queue).
    pub(super) fn queue(&self, request: FrontendReq, index: u32) -> Result<u16, SessionError> {
        let num_queues = self.vrings.len();
        let out_of_range = SessionError::QueueIndex {
            request,
            index,
            num_queues,
        };
        match usize::try_from(index) {
            Ok(i) if i < num_queues => u16::try_from(index).map_err(|_| out_of_range),
            _ => Err(out_of_range),
        }
    }

    /// The vring of a queue checked by [`queue`](Self::queue).
    fn vring(&self, queue: u16) -> &V {
        // `queue` < vrings.len() was checked by `queue()`; the index is in range.
        &self.vrings[usize::from(queue)]
    }

    /// `VHOST_USER_SET_VRING_NUM`: the ring's size.
    pub(super) fn handle_set_vring_num(&mut self, state: VringState) -> Result<(), SessionError> {
        let request = FrontendReq::SetVringNum;
        let queue = self.queue(request, state.index)?;
        let size = u16::try_from(state.num).map_err(|_| SessionError::QueueSize {
            request,
            queue,
            size: state.num,
        })?;
        self.vring(queue)
            .set_queue_size(size)
            .map_err(|source| SessionError::Vring {
                request,
                queue,
                source,
            })
    }

    /// `VHOST_USER_SET_VRING_ADDR`: the ring's three areas, translated from VMM to guest addresses
    /// (unless `GPA_ADDRESSES`), and its log address.
    pub(super) fn handle_set_vring_addr(&mut self, addr: VringAddr) -> Result<(), SessionError> {
        let request = FrontendReq::SetVringAddr;
        let queue = self.queue(request, addr.index)?;
        let vring = self.vring(queue);
        let size = u64::from(vring.queue_size());
        // A packed ring's three addresses are the descriptor ring, the driver area and the
        // device area.
        let parts = if vring.queue_packed() {
            [
                (addr.descriptor, layout::desc_table_size(size)),
                (addr.available, layout::EVENT_SUPPRESSION),
                (addr.used, layout::EVENT_SUPPRESSION),
            ]
        } else {
            [
                (addr.descriptor, layout::desc_table_size(size)),
                (addr.available, layout::avail_ring_size(size)),
                (addr.used, layout::used_ring_size(size)),
            ]
        };
        // Behind an IOMMU the addresses are IOVAs: the vring translates them when the worker
        // first touches the ring (a miss there waits for this thread to receive the update).
        let iommu = self.acked_features & VirtioFeatures::ACCESS_PLATFORM.bits() != 0;
        let mut guest = [0u64; 3];
        for (slot, (vmm, len)) in guest.iter_mut().zip(parts) {
            *slot = if iommu
                || self
                    .acked_protocol
                    .contains(ProtocolFeatures::GPA_ADDRESSES)
            {
                vmm
            } else {
                self.mem
                    .vmm_to_guest(vmm, len)
                    .map_err(|source| SessionError::Memory { request, source })?
                    .0
            };
        }
        let [desc, avail, used] = guest;
        let vring_err = |source| SessionError::Vring {
            request,
            queue,
            source,
        };
        let log = addr.flags.contains(VringAddrFlags::LOG).then_some(addr.log);
        // Behind an IOMMU the log address is the used ring's IOVA (QEMU sends the address the
        // driver gave), and the vring logs the guest range it translates it to.
        if let Some(start) = log.filter(|_| !iommu) {
            self.check_used_ring_in_log(start, size)?;
        }
        vring.set_queue_info(desc, avail, used).map_err(vring_err)?;
        vring.set_log_guest_addr(log);
        // A rebooted driver starts from the used index it finds in memory (a packed ring has
        // none: its used position comes with SET_VRING_BASE). Behind an IOMMU the vring reads
        // it when it first translates the ring.
        if !vring.queue_packed() && !iommu {
            let used_idx = vring.queue_used_idx().map_err(vring_err)?;
            vring.set_queue_next_used(used_idx);
        }
        Ok(())
    }

    /// "The bit offset of the last byte of the ring must fall within the size supplied by
    /// `VhostUserLog`": checked against the log mapped now, if any (QEMU sends `SET_LOG_BASE`
    /// before it turns the flag on).
    fn check_used_ring_in_log(&self, start: u64, queue_size: u64) -> Result<(), SessionError> {
        let Some(log_size) = self.mem.dirty_log().log_size() else {
            return Ok(());
        };
        let len = layout::used_ring_size(queue_size);
        let inside = start
            .checked_add(len)
            .is_some_and(|end| vu_mem::log_size_for(end) <= log_size);
        if inside {
            Ok(())
        } else {
            Err(SessionError::Memory {
                request: FrontendReq::SetVringAddr,
                source: vu_mem::MemError::OutsideLog { addr: start, len },
            })
        }
    }

    /// `VHOST_USER_SET_VRING_BASE`: the index (split) or positions with wrap counters (packed) the
    /// ring resumes from.
    pub(super) fn handle_set_vring_base(&mut self, state: VringState) -> Result<(), SessionError> {
        let request = FrontendReq::SetVringBase;
        let queue = self.queue(request, state.index)?;
        // Split: the next available index (16 bits). Packed: the avail position with its wrap
        // counter in bit 15, the used position with its wrap counter in bits 16-31.
        self.vring(queue)
            .set_vring_base(state.num)
            .map_err(|_| SessionError::ValueOutOfRange {
                request,
                field: "split vring base",
                value: u64::from(state.num),
            })
    }

    /// `VHOST_USER_GET_VRING_BASE`.
    ///
    /// Stops the ring: no longer watched, no worker inside it, the device drained; then
    /// answers with the index to resume from.
    pub(super) fn handle_get_vring_base(
        &mut self,
        hdr: &Header,
        state: VringState,
        ctl: &mut dyn RingControl,
    ) -> Result<Reply, SessionError> {
        let request = FrontendReq::GetVringBase;
        let queue = self.queue(request, state.index)?;
        let ctl_err = |source| SessionError::RingControl {
            request,
            queue,
            source,
        };
        ctl.unwatch_kick(queue).map_err(ctl_err)?;
        ctl.quiesce(queue).map_err(ctl_err)?;
        let vring = self.vring(queue);
        // A poller was holding kicks off: whoever drives the ring next (QEMU itself, a
        // migration's destination, another back-end) finds the driver asked to kick.
        if vring.get_ref().kicks_held() {
            if let Err(err) = vring.get_mut().release_kicks() {
                warn!("GET_VRING_BASE: queue {queue}: notifications not re-enabled: {err}");
            }
        }
        vring.set_queue_ready(false);
        if let Err(err) = self.backend.stop_vring(queue) {
            // The ring is stopped whatever the device says; the index is still the truth.
            warn!("GET_VRING_BASE: queue {queue}: the backend failed to stop: {err}");
        }
        // The ring's final contents go into the log QEMU syncs after stopping the device.
        let log = self.mem.dirty_log();
        if let Err(err) = crate::used_log::mark_used_ring(vring, log) {
            warn!("GET_VRING_BASE: queue {queue}: used ring not logged: {err}");
        }
        if let Err(err) = log.notify_changed() {
            warn!("GET_VRING_BASE: {err}");
        }
        let base = vring.vring_base();
        // Packed rings: the avail position with its wrap counter in bit 15.
        log::debug!(
            "queue {queue} stopped (size {}) at available index {}",
            vring.queue_size(),
            vring.queue_next_avail()
        );
        vring.set_kick(None);
        vring.set_call(None);
        self.set_polled(request, queue, false)?;
        let reply = VringState {
            index: state.index,
            num: base,
        };
        Ok(Reply::new(hdr, &reply, Vec::new()))
    }

    /// `VHOST_USER_SET_VRING_KICK`.
    ///
    /// Installs the kick fd and starts the ring; without negotiated protocol features the
    /// ring is enabled as well.
    ///
    /// With the no-fd flag, "polling should be used instead of waiting for the kick": the
    /// session installs a periodic timerfd ([`POLL_PERIOD`]) as the ring's kick, so the
    /// worker serves the ring every period as it would on a kick, and tells the backend
    /// (`set_vring_polled`), which may refuse.
    pub(super) fn handle_set_vring_kick(
        &mut self,
        index: u8,
        fd: Option<OwnedFd>,
        ctl: &mut dyn RingControl,
    ) -> Result<(), SessionError> {
        let request = FrontendReq::SetVringKick;
        let queue = self.queue(request, u32::from(index))?;
        let polled = fd.is_none();
        let kick = match fd {
            Some(fd) => notifier(request, queue, fd)?,
            None => poll_timer(POLL_PERIOD).map_err(|source| SessionError::Io {
                request,
                what: "creating the timer of a polled ring",
                source,
            })?,
        };
        self.set_polled(request, queue, polled)?;
        self.start_ring(request, queue, kick, ctl)
    }

    /// Records whether `queue` is polled and tells the backend when that changes.
    fn set_polled(
        &mut self,
        request: FrontendReq,
        queue: u16,
        polled: bool,
    ) -> Result<(), SessionError> {
        let slot = usize::from(queue);
        if self.polled.get(slot).copied().unwrap_or(false) == polled {
            return Ok(());
        }
        self.backend
            .set_vring_polled(queue, polled)
            .map_err(|source| SessionError::Backend { request, source })?;
        if let Some(flag) = self.polled.get_mut(slot) {
            *flag = polled;
        }
        Ok(())
    }

    /// Wakes the worker of `queue` through its kick fd, unless the ring is polled: a polled
    /// ring's kick is a timer, which wakes the worker within a period anyway.
    fn wake(
        &self,
        request: FrontendReq,
        queue: u16,
        what: &'static str,
    ) -> Result<(), SessionError> {
        if self
            .polled
            .get(usize::from(queue))
            .copied()
            .unwrap_or(false)
        {
            return Ok(());
        }
        self.vring(queue)
            .deliver_kick()
            .map(drop)
            .map_err(|source| SessionError::Io {
                request,
                what,
                source,
            })
    }

    /// Installs the in-band notifiers of every ring on `channel` when in-band notifications
    /// were acknowledged (and removes them otherwise): a ring without a call or error fd then
    /// sends `VRING_CALL`/`VRING_ERR` messages instead.
    pub(super) fn install_inband(&self, channel: Option<&BackendChannel>) {
        let inband = self
            .acked_protocol
            .contains(ProtocolFeatures::INBAND_NOTIFICATIONS);
        for (index, vring) in self.vrings.iter().enumerate() {
            let notifier = match (channel, u32::try_from(index)) {
                (Some(channel), Ok(index)) if inband => Some(Arc::new(InbandChannel {
                    channel: channel.clone(),
                    index,
                })
                    as Arc<dyn InbandNotifier>),
                _ => None,
            };
            vring.set_inband(notifier);
        }
    }

    /// Replaces the kick fd of `queue` with `kick`, marks the ring started and watches it.
    fn start_ring(
        &mut self,
        request: FrontendReq,
        queue: u16,
        kick: File,
        ctl: &mut dyn RingControl,
    ) -> Result<(), SessionError> {
        let ctl_err = |source| SessionError::RingControl {
            request,
            queue,
            source,
        };
        ctl.unwatch_kick(queue).map_err(ctl_err)?;
        let vring = self.vring(queue);
        if !vring.ready() {
            // The restart point, fixed once as the ring starts: see `VringData::restart`.
            let inflight = self.inflight_queue(queue);
            let restart = vring
                .get_mut()
                .restart(inflight, self.backend.resubmit_inflight())
                .map_err(|source| match source {
                    vu_vring::Error::Inflight(source) => SessionError::Inflight { request, source },
                    source => SessionError::Vring {
                        request,
                        queue,
                        source,
                    },
                })?;
            // A packed ring takes no tracking (the vring says why); ask the vring, not the area.
            if vring.get_ref().inflight_tracking() {
                log::info!(
                    "queue {queue}: inflight I/O tracking on; {} chains in flight before the \
                     restart are served first",
                    restart.resubmit
                );
            }
        }
        let vring = self.vring(queue);
        vring.set_kick(Some(kick));
        vring.set_queue_ready(true);
        if !self.protocol_negotiated() {
            vring.set_enabled(true);
        }
        ctl.watch_kick(queue).map_err(ctl_err)?;
        log::debug!(
            "queue {queue} started: size {}, enabled {}",
            vring.queue_size(),
            vring.is_enabled()
        );
        // The driver is asked to kick from the restart point on, whatever the ring's previous
        // owner left in it: a back-end killed (or stopped by an older version) while a poller
        // held kicks off leaves `avail_event` behind or NO_NOTIFY set, and a driver that
        // finds either never kicks again.
        // (A ring behind an IOMMU whose rings are not translated yet is re-armed by its first
        // pass instead.)
        if let Err(err) = vring.get_mut().release_kicks() {
            log::warn!("queue {queue}: notifications not re-enabled at start: {err}");
        }
        // As on enable: a ring that goes live holding chains gets one look.
        if vring.is_enabled() && has_available_chains(vring) {
            self.wake(request, queue, "waking the worker of a started ring")?;
        }
        Ok(())
    }

    /// `VHOST_USER_SET_VRING_CALL`: the ring's call eventfd (none: in-band
    /// `VHOST_USER_BACKEND_VRING_CALL`).
    pub(super) fn handle_set_vring_call(
        &mut self,
        index: u8,
        fd: Option<OwnedFd>,
    ) -> Result<(), SessionError> {
        let request = FrontendReq::SetVringCall;
        let queue = self.queue(request, u32::from(index))?;
        let call = fd.map(|fd| notifier(request, queue, fd)).transpose()?;
        let vring = self.vring(queue);
        let has_call = call.is_some();
        vring.set_call(call);
        // A ring restarted with inflight tracking may have served its resubmitted chains
        // before the frontend installed the call fd (QEMU sends SET_VRING_CALL after the
        // kick): one interrupt makes the driver look at the used ring. A spurious one costs
        // the driver a look.
        if has_call && vring.ready() && vring.get_ref().inflight_tracking() {
            vring
                .signal_used_queue()
                .map_err(|source| SessionError::Io {
                    request,
                    what: "signalling the new call eventfd",
                    source,
                })?;
        }
        Ok(())
    }

    /// `VHOST_USER_SET_VRING_ERR`: the ring's error eventfd (none: in-band
    /// `VHOST_USER_BACKEND_VRING_ERR`).
    pub(super) fn handle_set_vring_err(
        &mut self,
        index: u8,
        fd: Option<OwnedFd>,
    ) -> Result<(), SessionError> {
        let request = FrontendReq::SetVringErr;
        let queue = self.queue(request, u32::from(index))?;
        let err = fd.map(|fd| notifier(request, queue, fd)).transpose()?;
        self.vring(queue).set_err(err);
        Ok(())
    }

    /// `VHOST_USER_SET_VRING_ENABLE`: enables or disables a ring
    /// ([`enable_ring`](Self::enable_ring)); needs negotiated protocol features.
    pub(super) fn handle_set_vring_enable(
        &mut self,
        enable: VringEnable,
    ) -> Result<(), SessionError> {
        let request = FrontendReq::SetVringEnable;
        if !self.protocol_negotiated() {
            return Err(SessionError::ProtocolFeaturesNotNegotiated { request });
        }
        let queue = self.queue(request, enable.index)?;
        self.enable_ring(request, usize::from(queue), enable.enable)
    }

    /// Enables or disables a ring.
    ///
    /// A kick that arrived while the ring was disabled needs nothing from the session: it is
    /// still in the counter (the runtimes never read it for a disabled ring), its fd is
    /// parked, and the runtime re-arms parked kicks of enabled rings after every message,
    /// which reports the counter at once (docs/ARCHITECTURE.md, "Threads, and why nothing is
    /// lost"). Enabling a started ring (or starting an enabled one, in `start_ring`) kicks
    /// its worker only when the available ring holds chains the device has not popped, which
    /// a driver may have posted while the ring was stopped without a kick the device could
    /// see (on a kick fd it replaced, for one). An idle ring,
    /// as at the end of every handshake, gets no kick: on a single CPU that kick woke the
    /// worker before the reply was sent, for nothing.
    pub(super) fn enable_ring(
        &mut self,
        request: FrontendReq,
        queue: usize,
        enable: bool,
    ) -> Result<(), SessionError> {
        let (Some(vring), Ok(index)) = (self.vrings.get(queue), u16::try_from(queue)) else {
            return Ok(());
        };
        let was_enabled = vring.is_enabled();
        vring.set_enabled(enable);
        if enable && !was_enabled && vring.ready() && has_available_chains(vring) {
            self.wake(request, index, "waking the worker of an enabled ring")?;
        }
        Ok(())
    }

    /// `VHOST_USER_VRING_KICK`: an in-band kick. It starts a ring that has no kick fd yet (with an
    /// eventfd of the session's own), kicks it through that fd, and has the runtime serve the
    /// kick before the answer ([`RingControl::dispatch_now`]).
    pub(super) fn handle_vring_kick(
        &mut self,
        state: VringState,
        ctl: &mut dyn RingControl,
    ) -> Result<(), SessionError> {
        let request = FrontendReq::VringKick;
        self.require(request, ProtocolFeatures::INBAND_NOTIFICATIONS)?;
        let queue = self.queue(request, state.index)?;
        let io_err = |what| {
            move |source| SessionError::Io {
                request,
                what,
                source,
            }
        };
        let has_kick = self.vring(queue).get_ref().get_kick().is_some();
        if !has_kick {
            let kick = new_eventfd().map_err(io_err("creating an in-band kick eventfd"))?;
            self.start_ring(request, queue, kick, ctl)?;
        }
        self.wake(request, queue, "delivering an in-band kick")?;
        // "to block until they are processed": the REPLY_ACK follows the device's handling
        // of the kick, as libvhost-user's does.
        ctl.dispatch_now(queue)
            .map_err(|source| SessionError::RingControl {
                request,
                queue,
                source,
            })
    }

    /// Stops every ring (unwatched, quiesced, the backend's `stop_vring` for a started one)
    /// and returns it to its initial state.
    pub(super) fn reset_rings(&mut self, ctl: &mut dyn RingControl) {
        for (queue, vring) in self.vrings.iter().enumerate() {
            let Ok(queue) = u16::try_from(queue) else {
                break;
            };
            if let Err(err) = ctl.unwatch_kick(queue) {
                warn!("reset: queue {queue}: cannot stop watching the kick: {err}");
            }
            if let Err(err) = ctl.quiesce(queue) {
                warn!("reset: queue {queue}: cannot quiesce: {err}");
            }
            // A device completing requests asynchronously finishes them while the ring is
            // still where they belong (before a disconnect closes the socket, too).
            if vring.ready() {
                if let Err(err) = self.backend.stop_vring(queue) {
                    warn!("reset: queue {queue}: the backend failed to stop: {err}");
                }
            }
            vring.reset();
        }
        for queue in 0..self.vrings.len() {
            let Ok(queue) = u16::try_from(queue) else {
                break;
            };
            if let Err(err) = self.set_polled(FrontendReq::ResetDevice, queue, false) {
                warn!("reset: queue {queue}: {err}");
            }
        }
    }
}

/// A close-on-exec, non-blocking timerfd that expires every `period`: the kick of a polled
/// ring. Each expiry wakes an edge-triggered epoll watcher, as a kick does; reading it
/// consumes the expiries as reading an eventfd consumes kicks.
fn poll_timer(period: Duration) -> std::io::Result<File> {
    crate::sys::periodic_timer(period)
}

/// Whether a started `vring` holds chains the device has not served (an unreadable or broken
/// ring counts as having some: the worker will find out and report it).
fn has_available_chains<V, B>(vring: &V) -> bool
where
    V: VringT<GuestMemoryAtomic<GuestMemoryMmap<B>>>,
    B: RegionBitmap,
{
    let data = vring.get_ref();
    if data.queue_packed() {
        return data.has_available().unwrap_or(true);
    }
    data.pending_chains().map_or(true, |n| n != 0)
}

/// The device and inode numbers of the kernel's shared anonymous inode, which every eventfd
/// has, learned once from an eventfd of our own.
fn eventfd_inode() -> std::io::Result<(u64, u64)> {
    static INODE: OnceLock<(u64, u64)> = OnceLock::new();
    if let Some(&id) = INODE.get() {
        return Ok(id);
    }
    let probe = new_eventfd()?;
    let meta = probe.metadata()?;
    let id = (meta.dev(), meta.ino());
    Ok(*INODE.get_or_init(|| id))
}

/// What a refused fd is, for the error.
fn describe(meta: &std::fs::Metadata) -> String {
    let kind = meta.file_type();
    let name = if kind.is_fifo() {
        "a pipe"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_file() {
        "a regular file"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "an anonymous inode of another kind"
    };
    format!("{name} (device {}, inode {})", meta.dev(), meta.ino())
}

/// Checks that a kick, call or error fd from the frontend is an eventfd and makes it
/// non-blocking.
///
/// A frontend is free to send any fd. A pipe whose writer closed stays readable with nothing
/// to read and would spin the worker; a blocking eventfd whose counter the frontend filled
/// would block the worker's next write forever, and with it `GET_VRING_BASE` and the whole
/// daemon. `O_NONBLOCK` is a flag of the open file description, shared with the frontend's
/// copy: frontends create these eventfds non-blocking anyway (QEMU does), and the vrings treat
/// a full counter on write and an empty one on read as nothing to do.
///
/// The type check is one `fstat`: an eventfd lives on the kernel's shared anonymous inode, so
/// its device and inode numbers are those of an eventfd of our own. Pipes, sockets, files and
/// devices are refused. The shared inode also backs a few other kinds (epoll, timerfd,
/// signalfd, inotify), which this check lets through where the `/proc/self/fd` name (a path
/// walk per fd, which cost the handshake more than any other check) told them apart; none of
/// them can hurt the worker once non-blocking: an 8-byte read or write of one either moves a
/// counter, as an eventfd's does, or fails with `EINVAL`, and edge-triggered epoll reports
/// each of their wake-ups once, as it does a kick.
fn notifier(request: FrontendReq, queue: u16, fd: OwnedFd) -> Result<File, SessionError> {
    let io_err = |what| {
        move |source| SessionError::Io {
            request,
            what,
            source,
        }
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(io_err("looking at an eventfd"))?;
    let eventfd = eventfd_inode().map_err(io_err("creating an eventfd"))?;
    if (meta.dev(), meta.ino()) != eventfd {
        return Err(SessionError::NotAnEventfd {
            request,
            queue,
            kind: describe(&meta),
        });
    }
    let fd = OwnedFd::from(file);
    set_nonblocking(&fd).map_err(io_err("making an eventfd non-blocking"))?;
    Ok(File::from(fd))
}

/// Sets `O_NONBLOCK` on `fd` (an eventfd from the frontend that the device writes), so that a
/// counter the frontend filled cannot block the writer.
pub(super) fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    crate::sys::set_nonblocking(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifier_refuses_a_pipe() {
        let (read, _write) = crate::sys::pipe().unwrap();
        let err = notifier(FrontendReq::SetVringKick, 0, OwnedFd::from(read)).unwrap_err();
        assert!(
            matches!(err, SessionError::NotAnEventfd { queue: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn notifier_refuses_a_socket() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = notifier(FrontendReq::SetVringCall, 2, OwnedFd::from(ours)).unwrap_err();
        match err {
            SessionError::NotAnEventfd { queue: 2, kind, .. } => {
                assert!(kind.starts_with("a socket"), "{kind}")
            }
            other => panic!("expected NotAnEventfd, got {other}"),
        }
    }

    #[test]
    fn notifier_refuses_a_regular_file() {
        let file = File::open("/proc/self/exe")
            .or_else(|_| File::open("/dev/null"))
            .unwrap();
        let err = notifier(FrontendReq::SetVringErr, 0, OwnedFd::from(file)).unwrap_err();
        assert!(matches!(err, SessionError::NotAnEventfd { .. }), "{err}");
    }

    #[test]
    fn notifier_makes_a_blocking_eventfd_non_blocking() {
        let blocking = crate::sys::eventfd(false).unwrap();
        assert!(!crate::sys::is_nonblocking(&blocking).unwrap());
        let file = notifier(FrontendReq::SetVringCall, 1, OwnedFd::from(blocking)).unwrap();
        assert!(crate::sys::is_nonblocking(&file).unwrap());
    }
}
