//! The session: the sans-IO state machine that interprets the frontend's requests.
//!
//! One [`Session`] serves one backend across connections. The runtime reads a
//! [`RawMessage`] from the socket, hands it to [`Session::handle`] with its [`RingControl`],
//! sends the [`Outcome`]'s reply if there is one, and closes the connection if the outcome says
//! so. The session does no socket I/O and spawns no thread: it decodes the message, checks it
//! against the negotiated features and the device's limits, applies it to the memory manager,
//! the vrings and the backend, and says what to answer. So every request can be tested with
//! scripted messages and real fds, without a socket.
//!
//! # Refusals
//!
//! Every handler returns `Result<_, SessionError>`. One function, [`Session::refuse`], turns
//! an error into what the frontend sees, and logs it once:
//!
//! - a request whose reply can carry a failure gets that failure: the REPLY_ACK `u64` 1 when
//!   the frontend set NEED_REPLY, an empty `GET_CONFIG` reply, a non-zero `u64` for
//!   `SET_LOG_BASE` (once LOG_SHMFD is negotiated; before, it has no reply),
//!   `CHECK_DEVICE_STATE`, `GET_SHARED_OBJECT` and `POSTCOPY_END`, the error code of
//!   `SET_DEVICE_STATE_FD`, a zero-sized inflight area for `GET_INFLIGHT_FD` (even without
//!   INFLIGHT_SHMFD negotiated: unlike `SET_LOG_BASE`, no frontend sends it then without
//!   waiting for the area), an empty shared memory configuration for `GET_SHMEM_CONFIG`,
//!   no fd for `POSTCOPY_ADVISE`;
//! - a request without NEED_REPLY whose reply is optional gets nothing (the error is logged);
//! - a request that always gets a reply which cannot say "failed" (`GET_VRING_BASE`,
//!   `GET_QUEUE_NUM`, `GET_PROTOCOL_FEATURES`, ...) closes the connection: the frontend waits
//!   for an answer we cannot give truthfully;
//! - in-band notifications without the backend channel and REPLY_ACK close the connection,
//!   as the spec asks.
//!
//! # What each request does
//!
//! docs/conformance.md has one row per request of both directions: the feature it needs,
//! what the session does with it, the spec's words where it leaves a choice, and the tests
//! that prove it; `cargo xtask tidy` checks the table against the request codes and the
//! tests. Which features are offered at all is one table, `offer.rs`: a feature the
//! framework cannot serve end to end is never offered, whatever the backend says.
//! Live migration is offered only by a backend whose bitmap logs writes
//! ([`RegionBitmap::LOGS_WRITES`], vu-mem's `LogBitmap`): with `()`, `VHOST_F_LOG_ALL` and
//! `LOG_SHMFD` are removed from the offer (one warning), so `SET_LOG_BASE` is refused and
//! QEMU refuses to migrate the guest instead of losing every page the device wrote.

mod iommu;
mod memory;
mod offer;
#[cfg(feature = "postcopy")]
mod postcopy;
mod vring;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use log::{error, warn};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vu_mem::{GuestMemoryManager, RegionBitmap};
use vu_proto::features::{check_subset, ProtocolFeatures, VirtioFeatures};
use vu_proto::header::Header;
use vu_proto::message::{encode_reply, FrontendRequest, RawMessage};
use vu_proto::payload::{
    ConfigReply, CryptoSession, DeviceConfig, DeviceStateFdReply, DeviceStateTransfer, Inflight,
    MacAddr, Payload, SharedObject, ShmemConfig, U64,
};
use vu_proto::request::{FrontendReq, ReplyRule};
use vu_vring::VringT;

use crate::backend::VhostUserBackend;
use crate::control::RingControl;
use crate::error::SessionError;
use memory::InflightArea;

/// The failure value of a REPLY_ACK and of the `u64` replies: "non-zero on failure".
const FAILURE: u64 = 1;

/// Ring features the framework implements on every vring whether or not the backend offered
/// them, and so honours when a frontend acknowledges them unoffered (see the module docs).
pub const FRAMEWORK_RING_FEATURES: VirtioFeatures =
    VirtioFeatures::RING_INDIRECT_DESC.union(VirtioFeatures::RING_EVENT_IDX);

/// What the runtime does after a message: send `reply` (if any), then close the connection
/// if `close`.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The reply to send, header included.
    pub(crate) reply: Option<Reply>,
    /// Whether to close the connection after sending the reply.
    pub(crate) close: bool,
}

/// A reply message: header, body and the fds to pass with it.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The reply header (REPLY flag set, size of `body`).
    pub(crate) header: Header,
    /// The payload.
    pub(crate) body: Vec<u8>,
    /// The fds to send as ancillary data.
    pub(crate) fds: Vec<OwnedFd>,
}

impl Reply {
    /// A reply to `request` carrying `payload` and `fds`.
    fn new<P: Payload>(request: &Header, payload: &P, fds: Vec<OwnedFd>) -> Self {
        let (header, body) = encode_reply(request, payload);
        Reply { header, body, fds }
    }

    /// A `u64` reply (REPLY_ACK status or a request's own `u64` answer).
    fn u64(request: &Header, value: u64) -> Self {
        Reply::new(request, &U64(value), Vec::new())
    }
}

/// The per-connection state machine of one backend; see the module documentation.
pub(crate) struct Session<S, V, B: RegionBitmap> {
    backend: S,
    vrings: Vec<V>,
    mem: GuestMemoryManager<B>,
    /// The backend's protocol features minus those the session cannot serve.
    offered_protocol: ProtocolFeatures,
    /// Virtio features from `SET_FEATURES`, masked to those offered.
    acked_features: u64,
    /// Protocol features from `SET_PROTOCOL_FEATURES`.
    acked_protocol: ProtocolFeatures,
    /// Whether `SET_PROTOCOL_FEATURES` was received on this connection.
    protocol_set: bool,
    /// Whether `SET_OWNER` was received.
    owner: bool,
    /// The device status from `SET_STATUS`.
    status: u64,
    /// Per queue, whether its ring is polled (`SET_VRING_KICK` without an fd).
    polled: Vec<bool>,
    /// Whether the "unoffered virtio features" warning was logged on this connection.
    warned_unoffered: bool,
    /// The inflight area handed out or received.
    inflight: Option<InflightArea>,
    /// The device IOTLB that `IOTLB_MSG` fills (empty without ACCESS_PLATFORM), which the
    /// rings translate through when ACCESS_PLATFORM is acked.
    iommu: Arc<iommu::SessionIommu>,
    #[cfg(feature = "postcopy")]
    postcopy: crate::postcopy::Postcopy,
    /// While listening: the table answered with local addresses and registered with the
    /// userfaultfd, published to the device only once the frontend acknowledged it.
    #[cfg(feature = "postcopy")]
    pending_table: Option<vu_mem::PendingTable<B>>,
}

impl<S, V, B> Session<S, V, B>
where
    S: VhostUserBackend<Vring = V, Bitmap = B>,
    V: VringT<GuestMemoryAtomic<GuestMemoryMmap<B>>>,
    B: RegionBitmap,
{
    /// A session over `backend`, with `mem` (which the vrings were built over) and one vring
    /// per queue.
    ///
    /// `vrings` are created by the daemon (`VringT::new(mem.clone(), max_queue_size)`), one
    /// per `backend.num_queues()`, and may be shared with workers: the session changes them
    /// only through `&self` methods. The session takes over `mem`'s contents: it publishes an
    /// empty table until the frontend sends one.
    pub(crate) fn new(
        backend: S,
        mem: GuestMemoryAtomic<GuestMemoryMmap<B>>,
        vrings: Vec<V>,
    ) -> Self {
        let offered_protocol = without_unlogged_migration::<B>(
            offer::offered_protocol(
                backend.protocol_features(),
                offer::offered_virtio(backend.features()),
            ),
            backend.features(),
        );
        let polled = vec![false; vrings.len()];
        Session {
            backend,
            vrings,
            mem: GuestMemoryManager::new(mem),
            offered_protocol,
            acked_features: 0,
            acked_protocol: ProtocolFeatures::empty(),
            protocol_set: false,
            owner: false,
            status: 0,
            polled,
            warned_unoffered: false,
            inflight: None,
            iommu: Arc::new(iommu::SessionIommu::new(iommu::MISS_TIMEOUT)),
            #[cfg(feature = "postcopy")]
            postcopy: crate::postcopy::Postcopy::default(),
            #[cfg(feature = "postcopy")]
            pending_table: None,
        }
    }

    /// The backend.
    pub(crate) fn backend(&self) -> &S {
        &self.backend
    }

    /// The vrings, indexed by queue.
    pub(crate) fn vrings(&self) -> &[V] {
        &self.vrings
    }

    /// The dirty log of the connection's memory (the same handle for the session's life).
    pub(crate) fn dirty_log(&self) -> &vu_mem::DirtyLog {
        self.mem.dirty_log()
    }

    /// Interprets one received message. Never panics on peer input, never does socket I/O.
    pub(crate) fn handle(&mut self, msg: RawMessage, ctl: &mut dyn RingControl) -> Outcome {
        let header = msg.header;
        if header.is_reply() {
            let err = SessionError::ReplyFromFrontend {
                request: header.request,
            };
            return self.refuse(&header, None, err);
        }
        #[cfg(feature = "postcopy")]
        if self.is_postcopy_mem_table_ack(&msg) {
            // QEMU sends the acknowledgement without NEED_REPLY; a frontend that sets it
            // gets a REPLY_ACK.
            let request = FrontendReq::try_from(header.request).ok();
            return match self.publish_pending_table() {
                Ok(()) => Outcome {
                    reply: header
                        .needs_reply()
                        .then(|| Reply::u64(&header, U64::ACK_SUCCESS.0)),
                    close: false,
                },
                Err(err) => self.refuse(&header, request, err),
            };
        }
        let request = match FrontendRequest::decode(msg) {
            Ok(FrontendRequest::Unknown { code, .. }) => {
                return self.refuse(&header, None, SessionError::UnknownRequest { code });
            }
            Ok(request) => request,
            Err(err) => {
                let req = FrontendReq::try_from(header.request).ok();
                return self.refuse(&header, req, err.into());
            }
        };
        let req = FrontendReq::try_from(header.request).ok();
        match self.dispatch(&header, request, ctl) {
            Ok(Some(reply)) => Outcome {
                reply: Some(reply),
                close: false,
            },
            Ok(None) if header.needs_reply() => Outcome {
                reply: Some(Reply::u64(&header, U64::ACK_SUCCESS.0)),
                close: false,
            },
            Ok(None) => Outcome::default(),
            Err(err) => self.refuse(&header, req, err),
        }
    }

    /// The frontend went away: forget everything about the connection (features, memory
    /// table, log, rings, inflight area, postcopy state) and reset the device, so the next
    /// connection starts clean. Every queue is unwatched and quiesced first.
    pub(crate) fn disconnect(&mut self, ctl: &mut dyn RingControl) {
        self.reset_rings(ctl);
        self.install_inband(None);
        self.backend.reset_device();
        self.mem.reset();
        self.acked_features = 0;
        self.acked_protocol = ProtocolFeatures::empty();
        self.protocol_set = false;
        self.owner = false;
        self.status = 0;
        self.warned_unoffered = false;
        self.inflight = None;
        self.iommu.iotlb.clear();
        self.iommu.set_channel(None);
        #[cfg(feature = "postcopy")]
        {
            self.postcopy = crate::postcopy::Postcopy::default();
            self.pending_table = None;
        }
    }

    /// One line per request, each calling its handler. `Ok(Some(_))` is the request's own
    /// reply; `Ok(None)` means success without one (a REPLY_ACK is added if asked for).
    fn dispatch(
        &mut self,
        hdr: &Header,
        request: FrontendRequest,
        ctl: &mut dyn RingControl,
    ) -> Result<Option<Reply>, SessionError> {
        use FrontendRequest as R;
        match request {
            R::GetFeatures => Ok(Some(self.handle_get_features(hdr))),
            R::SetFeatures(features) => self.handle_set_features(features).map(none),
            R::SetOwner => self.handle_set_owner().map(none),
            R::ResetOwner => self.handle_reset_owner(ctl).map(none),
            R::SetMemTable { table, fds } => self.handle_set_mem_table(hdr, table, fds),
            R::SetLogBase { log, fd } => self.handle_set_log_base(hdr, log, fd),
            R::SetLogFd { fd } => self.handle_set_log_fd(fd).map(none),
            R::SetVringNum(state) => self.handle_set_vring_num(state).map(none),
            R::SetVringAddr(addr) => self.handle_set_vring_addr(addr).map(none),
            R::SetVringBase(state) => self.handle_set_vring_base(state).map(none),
            R::GetVringBase(state) => self.handle_get_vring_base(hdr, state, ctl).map(Some),
            R::SetVringKick { index, fd } => self.handle_set_vring_kick(index, fd, ctl).map(none),
            R::SetVringCall { index, fd } => self.handle_set_vring_call(index, fd).map(none),
            R::SetVringErr { index, fd } => self.handle_set_vring_err(index, fd).map(none),
            R::GetProtocolFeatures => self.handle_get_protocol_features(hdr).map(Some),
            R::SetProtocolFeatures(f) => self.handle_set_protocol_features(f).map(none),
            R::GetQueueNum => self.handle_get_queue_num(hdr).map(Some),
            R::SetVringEnable(enable) => self.handle_set_vring_enable(enable).map(none),
            R::SendRarp(mac) => self.handle_send_rarp(mac).map(none),
            R::NetSetMtu(mtu) => self.handle_net_set_mtu(mtu).map(none),
            R::SetBackendReqFd { fd } => self.handle_set_backend_req_fd(fd).map(none),
            R::IotlbMsg(msg) => self.handle_iotlb_msg(msg).map(none),
            R::SetVringEndian(_) => Err(refuse_unserved(FrontendReq::SetVringEndian)),
            R::GetConfig(config) => self.handle_get_config(hdr, config).map(Some),
            R::SetConfig(config) => self.handle_set_config(config).map(none),
            R::CreateCryptoSession(session) => Ok(Some(refuse_crypto_session(hdr, session))),
            R::CloseCryptoSession(_) => Err(refuse_unserved(FrontendReq::CloseCryptoSession)),
            R::PostcopyAdvise => self.handle_postcopy_advise(hdr).map(Some),
            R::PostcopyListen => self.handle_postcopy_listen().map(none),
            R::PostcopyEnd => self.handle_postcopy_end(hdr).map(Some),
            R::GetInflightFd(inflight) => self.handle_get_inflight_fd(hdr, inflight).map(Some),
            R::SetInflightFd { inflight, fd } => {
                self.handle_set_inflight_fd(inflight, fd).map(none)
            }
            R::GpuSetSocket { fd } => self.handle_gpu_set_socket(fd).map(none),
            R::ResetDevice => self.handle_reset_device(ctl).map(none),
            R::VringKick(state) => self.handle_vring_kick(state, ctl).map(none),
            R::GetMaxMemSlots => self.handle_get_max_mem_slots(hdr).map(Some),
            R::AddMemReg { region, fd } => self.handle_add_mem_reg(hdr, region, fd),
            R::RemMemReg(region) => self.handle_rem_mem_reg(region).map(none),
            R::SetStatus(status) => self.handle_set_status(status).map(none),
            R::GetStatus => self.handle_get_status(hdr).map(Some),
            R::GetSharedObject(object) => self.handle_get_shared_object(hdr, object).map(Some),
            R::SetDeviceStateFd { transfer, fd } => {
                self.handle_set_device_state_fd(hdr, transfer, fd).map(Some)
            }
            R::CheckDeviceState => self.handle_check_device_state(hdr).map(Some),
            R::GetShmemConfig => self.handle_get_shmem_config(hdr).map(Some),
            // Decoded before dispatch; kept for exhaustiveness of a non-exhaustive enum.
            R::Unknown { code, .. } => Err(SessionError::UnknownRequest { code }),
            _ => Err(SessionError::UnknownRequest { code: hdr.request }),
        }
    }

    /// The one place that decides what an error means for the frontend, and logs it once.
    /// See the module documentation for the rules.
    fn refuse(&self, hdr: &Header, req: Option<FrontendReq>, err: SessionError) -> Outcome {
        let failure = match (&err, req) {
            (SessionError::FeatureCombination { .. }, _) => Failure::Close,
            // A reply where a request must be: the peer's view of the conversation is not
            // ours, and whatever it waits for, we cannot know; closing tells it at once.
            (SessionError::ReplyFromFrontend { .. }, _) => Failure::Close,
            (_, Some(req)) => failure_reply(hdr, req, self.postcopy_listening(), self.log_shmfd()),
            (_, None) if hdr.needs_reply() => Failure::Reply(Reply::u64(hdr, FAILURE)),
            (_, None) => Failure::Silent,
        };
        match failure {
            Failure::Reply(reply) => {
                warn!("refused {}: {err}", describe(hdr, req));
                Outcome {
                    reply: Some(reply),
                    close: false,
                }
            }
            Failure::Silent => {
                warn!("ignored {} (no reply asked for): {err}", describe(hdr, req));
                Outcome::default()
            }
            Failure::Close => {
                error!("closing the connection after {}: {err}", describe(hdr, req));
                Outcome {
                    reply: None,
                    close: true,
                }
            }
        }
    }

    #[cfg(feature = "postcopy")]
    fn postcopy_listening(&self) -> bool {
        self.postcopy.listening()
    }

    #[cfg(not(feature = "postcopy"))]
    fn postcopy_listening(&self) -> bool {
        false
    }

    /// Whether LOG_SHMFD was acknowledged: only then does `SET_LOG_BASE` get a reply.
    fn log_shmfd(&self) -> bool {
        self.acked_protocol.contains(ProtocolFeatures::LOG_SHMFD)
    }

    /// Whether `VHOST_USER_F_PROTOCOL_FEATURES` is negotiated (see the module documentation).
    fn protocol_negotiated(&self) -> bool {
        self.protocol_set || self.acked_features & VirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Refuses `request` unless protocol feature `feature` was acknowledged.
    fn require(&self, request: FrontendReq, feature: ProtocolFeatures) -> Result<(), SessionError> {
        if self.acked_protocol.contains(feature) {
            Ok(())
        } else {
            Err(SessionError::NotNegotiated { request, feature })
        }
    }

    /// The virtio features offered to the frontend: the backend's, less those the framework
    /// cannot serve (`offer::VIRTIO_SERVICE`).
    fn offered_features(&self) -> u64 {
        offer::offered_virtio(self.backend.features()) & !unlogged_features::<B>()
    }

    /// Whether the backend offers `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn offers_protocol_features(&self) -> bool {
        self.offered_features() & VirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// `VHOST_USER_GET_FEATURES`: the virtio features offered
    /// ([`offered_features`](Self::offered_features)).
    fn handle_get_features(&self, hdr: &Header) -> Reply {
        Reply::u64(hdr, self.offered_features())
    }

    /// `VHOST_USER_SET_FEATURES`: acknowledges the offered virtio features and the ring
    /// features the framework serves; sets logging, event index and ring layout on every
    /// vring, and enables every ring when protocol features are not negotiated.
    fn handle_set_features(&mut self, features: VirtioFeatures) -> Result<(), SessionError> {
        let offered = self.offered_features();
        let requested = features.bits();
        let masked = requested & (offered | FRAMEWORK_RING_FEATURES.bits());
        if requested & !offered != 0 && !self.warned_unoffered {
            self.warned_unoffered = true;
            warn!(
                "SET_FEATURES {requested:#x} acknowledges unoffered bits {:#x}: honouring the \
                 ring features among them ({:#x}), dropping the rest ({:#x})",
                requested & !offered,
                masked & !offered,
                requested & !masked,
            );
        }
        let log_all = masked & VirtioFeatures::LOG_ALL.bits() != 0;
        self.mem
            .set_logging(log_all)
            .map_err(|source| SessionError::Memory {
                request: FrontendReq::SetFeatures,
                source,
            })?;
        self.acked_features = masked;
        log::info!(
            "virtio features negotiated: {masked:#x} ({:?})",
            VirtioFeatures::from_bits_retain(masked)
        );
        let event_idx = masked & VirtioFeatures::RING_EVENT_IDX.bits() != 0;
        let packed = masked & VirtioFeatures::RING_PACKED.bits() != 0;
        // Behind an IOMMU the rings translate their IOVAs through the connection's IOTLB.
        let iommu = (masked & VirtioFeatures::ACCESS_PLATFORM.bits() != 0)
            .then(|| self.iommu.clone() as Arc<dyn vu_vring::Iommu>);
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
            vring.set_queue_packed(packed);
            vring.set_iommu(iommu.clone());
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(masked);
        if masked & VirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            // "upon receiving a VHOST_USER_SET_FEATURES message from the front-end without
            // VHOST_USER_F_PROTOCOL_FEATURES set, the back-end must enable all rings
            // immediately."
            for queue in 0..self.vrings.len() {
                self.enable_ring(FrontendReq::SetFeatures, queue, true)?;
            }
        }
        Ok(())
    }

    /// `VHOST_USER_SET_OWNER`.
    ///
    /// "Issued when a new connection is established. It marks the sender as the front-end
    /// that owns of the session." A second one on the same connection comes from the same
    /// front-end, which owns the session already: it is accepted and changes nothing. QEMU's
    /// multiqueue vhost-user-net sends one per queue pair over one connection (each queue
    /// pair's `vhost_dev_init` calls `vhost_set_owner`), so refusing it would only add
    /// warnings, or failures where a front-end asks for a REPLY_ACK.
    fn handle_set_owner(&mut self) -> Result<(), SessionError> {
        self.owner = true;
        Ok(())
    }

    /// `VHOST_USER_GPU_SET_SOCKET`.
    ///
    /// Hands the GPU protocol socket to the backend, which speaks that protocol or refuses.
    fn handle_gpu_set_socket(&mut self, fd: OwnedFd) -> Result<(), SessionError> {
        let request = FrontendReq::GpuSetSocket;
        self.backend
            .set_gpu_socket(fd)
            .map_err(|source| SessionError::Backend { request, source })
    }

    /// `VHOST_USER_RESET_OWNER`: forgets the device state (as `RESET_DEVICE`) and the owner.
    fn handle_reset_owner(&mut self, ctl: &mut dyn RingControl) -> Result<(), SessionError> {
        self.reset_device_state(ctl);
        self.owner = false;
        Ok(())
    }

    /// `VHOST_USER_RESET_DEVICE`.
    ///
    /// "Only valid if the `VHOST_USER_PROTOCOL_F_RESET_DEVICE` protocol feature is set by the
    /// back-end": offered, not necessarily acknowledged.
    fn handle_reset_device(&mut self, ctl: &mut dyn RingControl) -> Result<(), SessionError> {
        if !self
            .offered_protocol
            .contains(ProtocolFeatures::RESET_DEVICE)
        {
            return Err(unsupported(
                FrontendReq::ResetDevice,
                "the backend does not offer protocol feature RESET_DEVICE",
            ));
        }
        self.reset_device_state(ctl);
        Ok(())
    }

    /// Stops and resets every ring, resets the device and forgets the virtio features and
    /// the inflight area (what was in flight belonged to a driver the reset ended; a
    /// frontend hands an area over again before it starts the rings).
    fn reset_device_state(&mut self, ctl: &mut dyn RingControl) {
        self.reset_rings(ctl);
        self.backend.reset_device();
        self.inflight = None;
        self.acked_features = 0;
        self.iommu.iotlb.clear();
        self.status = 0;
        self.backend.set_event_idx(false);
        // Logging off cannot fail.
        let _ = self.mem.set_logging(false);
    }

    /// `VHOST_USER_GET_PROTOCOL_FEATURES`: the protocol features the framework serves, when the
    /// backend offers `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn handle_get_protocol_features(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        if !self.offers_protocol_features() {
            return Err(SessionError::ProtocolFeaturesNotNegotiated {
                request: FrontendReq::GetProtocolFeatures,
            });
        }
        Ok(Reply::u64(hdr, self.offered_protocol.bits()))
    }

    /// `VHOST_USER_SET_PROTOCOL_FEATURES`: acknowledges a subset of the offered protocol features;
    /// in-band notifications without `BACKEND_REQ` and `REPLY_ACK` close the connection.
    fn handle_set_protocol_features(
        &mut self,
        features: ProtocolFeatures,
    ) -> Result<(), SessionError> {
        if !self.offers_protocol_features() {
            return Err(SessionError::ProtocolFeaturesNotNegotiated {
                request: FrontendReq::SetProtocolFeatures,
            });
        }
        let offered = self.offered_protocol.bits();
        if check_subset(offered, features.bits()).is_err() {
            return Err(SessionError::UnofferedProtocolFeatures {
                offered,
                acked: features.bits(),
            });
        }
        let inband = ProtocolFeatures::INBAND_NOTIFICATIONS;
        let needed = ProtocolFeatures::BACKEND_REQ | ProtocolFeatures::REPLY_ACK;
        if features.contains(inband) && !features.contains(needed) {
            // "the back-end should close the connection as a response to a
            // VHOST_USER_SET_PROTOCOL_FEATURES message that sets the in-band notifications
            // feature flag without the other two."
            return Err(SessionError::FeatureCombination {
                acked: features.bits(),
                reason: "INBAND_NOTIFICATIONS needs BACKEND_REQ and REPLY_ACK",
            });
        }
        self.acked_protocol = features;
        log::info!("protocol features negotiated: {features:?}");
        self.protocol_set = true;
        Ok(())
    }

    /// `VHOST_USER_GET_QUEUE_NUM`.
    ///
    /// "This request should be sent only when `VHOST_USER_PROTOCOL_F_MQ` is set in queried
    /// protocol features": offered, not necessarily acknowledged.
    fn handle_get_queue_num(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        if !self.offers_protocol_features() || !self.offered_protocol.contains(ProtocolFeatures::MQ)
        {
            return Err(unsupported(
                FrontendReq::GetQueueNum,
                "the backend does not offer protocol feature MQ",
            ));
        }
        Ok(Reply::u64(hdr, self.vrings.len() as u64))
    }

    /// `VHOST_USER_SET_BACKEND_REQ_FD`: the back-end channel (`BACKEND_REQ`), handed to the backend
    /// and used for in-band notifications.
    fn handle_set_backend_req_fd(&mut self, fd: OwnedFd) -> Result<(), SessionError> {
        let request = FrontendReq::SetBackendReqFd;
        if !self.protocol_negotiated() {
            return Err(SessionError::ProtocolFeaturesNotNegotiated { request });
        }
        self.require(request, ProtocolFeatures::BACKEND_REQ)?;
        let channel = vu_proto::backend::BackendChannel::from_fd(fd, self.acked_protocol)
            .map_err(|source| SessionError::Socket { request, source })?;
        self.install_inband(Some(&channel));
        self.iommu.set_channel(Some(channel.clone()));
        self.backend.set_backend_req_fd(channel);
        Ok(())
    }

    /// `VHOST_USER_GET_CONFIG`: the backend's configuration space bytes (`CONFIG`); a reply of
    /// another size than asked for is refused.
    fn handle_get_config(
        &mut self,
        hdr: &Header,
        config: DeviceConfig,
    ) -> Result<Reply, SessionError> {
        self.require(FrontendReq::GetConfig, ProtocolFeatures::CONFIG)?;
        // The codec bounds the size by MAX_CONFIG_SIZE, so it fits in u32.
        let size = u32::try_from(config.data.len()).unwrap_or(u32::MAX);
        let data = self.backend.get_config(config.offset, size);
        if data.len() != config.data.len() {
            return Err(SessionError::ConfigSize {
                offset: config.offset,
                requested: config.data.len(),
                returned: data.len(),
            });
        }
        let reply = ConfigReply::Config(DeviceConfig {
            offset: config.offset,
            flags: config.flags,
            data,
        });
        Ok(Reply::new(hdr, &reply, Vec::new()))
    }

    /// `VHOST_USER_SET_CONFIG`: writes the configuration space through the backend, with the
    /// request's flags (`CONFIG`).
    fn handle_set_config(&mut self, config: DeviceConfig) -> Result<(), SessionError> {
        let request = FrontendReq::SetConfig;
        self.require(request, ProtocolFeatures::CONFIG)?;
        self.backend
            .set_config_with_flags(config.offset, &config.data, config.flags)
            .map_err(|source| SessionError::Backend { request, source })
    }

    /// `VHOST_USER_SEND_RARP`: hands the guest's MAC address to the backend, which broadcasts
    /// the fake RARP ([`VhostUserBackend::send_rarp`]).
    fn handle_send_rarp(&mut self, mac: MacAddr) -> Result<(), SessionError> {
        let request = FrontendReq::SendRarp;
        self.require(request, ProtocolFeatures::RARP)?;
        self.backend
            .send_rarp(mac.0)
            .map_err(|source| SessionError::Backend { request, source })
    }

    /// `VHOST_USER_NET_SET_MTU`: hands the host MTU to the backend
    /// ([`VhostUserBackend::set_mtu`]); a value wider than 16 bits (the virtio-net config
    /// space's `mtu`) is refused before it.
    fn handle_net_set_mtu(&mut self, mtu: U64) -> Result<(), SessionError> {
        let request = FrontendReq::NetSetMtu;
        self.require(request, ProtocolFeatures::MTU)?;
        let mtu = u16::try_from(mtu.0).map_err(|_| SessionError::ValueOutOfRange {
            request,
            field: "MTU",
            value: mtu.0,
        })?;
        self.backend
            .set_mtu(mtu)
            .map_err(|source| SessionError::Backend { request, source })
    }

    /// `VHOST_USER_SET_STATUS`.
    ///
    /// Stores the status for `GET_STATUS` once the backend accepted it. The virtio status is
    /// one byte; a wider value is refused.
    fn handle_set_status(&mut self, status: U64) -> Result<(), SessionError> {
        let request = FrontendReq::SetStatus;
        self.require(request, ProtocolFeatures::STATUS)?;
        let byte = u8::try_from(status.0).map_err(|_| SessionError::ValueOutOfRange {
            request,
            field: "device status",
            value: status.0,
        })?;
        self.backend
            .set_status(byte)
            .map_err(|source| SessionError::Backend { request, source })?;
        self.status = status.0;
        Ok(())
    }

    /// `VHOST_USER_GET_STATUS`: the status last accepted by `VHOST_USER_SET_STATUS` (`STATUS`).
    fn handle_get_status(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        self.require(FrontendReq::GetStatus, ProtocolFeatures::STATUS)?;
        Ok(Reply::u64(hdr, self.status))
    }

    /// `VHOST_USER_GET_SHARED_OBJECT`: the backend's fd for a shared object's UUID
    /// (`SHARED_OBJECT`).
    fn handle_get_shared_object(
        &mut self,
        hdr: &Header,
        object: SharedObject,
    ) -> Result<Reply, SessionError> {
        let request = FrontendReq::GetSharedObject;
        self.require(request, ProtocolFeatures::SHARED_OBJECT)?;
        let file = self
            .backend
            .get_shared_object(object)
            .map_err(|source| SessionError::Backend { request, source })?;
        Ok(Reply::new(
            hdr,
            &U64::ACK_SUCCESS,
            vec![OwnedFd::from(file)],
        ))
    }

    /// `VHOST_USER_SET_DEVICE_STATE_FD`: hands the state transfer pipe to the backend and answers
    /// whether it gives one of its own (`DEVICE_STATE`).
    fn handle_set_device_state_fd(
        &mut self,
        hdr: &Header,
        transfer: DeviceStateTransfer,
        fd: OwnedFd,
    ) -> Result<Reply, SessionError> {
        let request = FrontendReq::SetDeviceStateFd;
        self.require(request, ProtocolFeatures::DEVICE_STATE)?;
        let own = self
            .backend
            .set_device_state_fd(transfer.direction, transfer.phase, File::from(fd))
            .map_err(|source| SessionError::Backend { request, source })?;
        let answer = DeviceStateFdReply {
            error: 0,
            no_fd: own.is_none(),
        };
        Ok(Reply::new(
            hdr,
            &answer,
            own.into_iter().map(OwnedFd::from).collect(),
        ))
    }

    /// `VHOST_USER_CHECK_DEVICE_STATE`: whether the backend's state transfer succeeded
    /// (`DEVICE_STATE`).
    fn handle_check_device_state(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        let request = FrontendReq::CheckDeviceState;
        self.require(request, ProtocolFeatures::DEVICE_STATE)?;
        self.backend
            .check_device_state()
            .map_err(|source| SessionError::Backend { request, source })?;
        Ok(Reply::u64(hdr, U64::ACK_SUCCESS.0))
    }

    /// `VHOST_USER_GET_SHMEM_CONFIG`: the backend's shared memory regions (`SHMEM`).
    fn handle_get_shmem_config(&mut self, hdr: &Header) -> Result<Reply, SessionError> {
        let request = FrontendReq::GetShmemConfig;
        self.require(request, ProtocolFeatures::SHMEM)?;
        let config = self
            .backend
            .get_shmem_config()
            .map_err(|source| SessionError::Backend { request, source })?;
        Ok(Reply::new(hdr, &config, Vec::new()))
    }

    /// `VHOST_USER_POSTCOPY_ADVISE`: refused: built without the `postcopy` feature
    /// (`session/postcopy.rs` serves it otherwise).
    #[cfg(not(feature = "postcopy"))]
    fn handle_postcopy_advise(&mut self, _hdr: &Header) -> Result<Reply, SessionError> {
        Err(unsupported(
            FrontendReq::PostcopyAdvise,
            "built without the `postcopy` feature",
        ))
    }

    /// `VHOST_USER_POSTCOPY_LISTEN`: refused: built without the `postcopy` feature
    /// (`session/postcopy.rs` serves it otherwise).
    #[cfg(not(feature = "postcopy"))]
    fn handle_postcopy_listen(&mut self) -> Result<(), SessionError> {
        Err(unsupported(
            FrontendReq::PostcopyListen,
            "built without the `postcopy` feature",
        ))
    }

    /// `VHOST_USER_POSTCOPY_END`: refused: built without the `postcopy` feature
    /// (`session/postcopy.rs` serves it otherwise).
    #[cfg(not(feature = "postcopy"))]
    fn handle_postcopy_end(&mut self, _hdr: &Header) -> Result<Reply, SessionError> {
        Err(unsupported(
            FrontendReq::PostcopyEnd,
            "built without the `postcopy` feature",
        ))
    }
}

/// `VHOST_USER_CREATE_CRYPTO_SESSION`.
///
/// The failure reply to `CREATE_CRYPTO_SESSION`, which no backend can serve (CRYPTO_SESSION
/// is never offered): the spec's "The back-end must return the session id, 0 or positive for
/// success, negative for failure", instead of closing the connection.
///
/// The reply echoes the request's bytes (QEMU checks that the reply has the size of its
/// `VhostUserCryptoSession`) with -1 written where the session id lies in both layouts QEMU
/// has used: at offset 0 (QEMU up to 7.2, `session_id` first) and at offset 8 (later
/// releases, after the 64-bit `op_code`; offset 0 of the earlier layout is then the
/// op code, which the front-end does not read back).
fn refuse_crypto_session(hdr: &Header, session: CryptoSession) -> Reply {
    warn!(
        "refused {}: no crypto session support",
        FrontendReq::CreateCryptoSession
    );
    Reply::new(hdr, &failed_crypto_session(session.0), Vec::new())
}

/// `bytes` with -1 (as a native-endian `i64`) written at offsets 0 and 8, as far as they fit.
fn failed_crypto_session(mut bytes: Vec<u8>) -> CryptoSession {
    let failed = (-1i64).to_ne_bytes();
    for start in [0, 8] {
        for (i, b) in failed.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(start + i) {
                *slot = *b;
            }
        }
    }
    if bytes.is_empty() {
        bytes.extend_from_slice(&failed);
    }
    CryptoSession(bytes)
}

/// Maps `Ok(())` to "no reply of its own".
fn none(_: ()) -> Option<Reply> {
    None
}

/// `VHOST_USER_SET_VRING_ENDIAN` and `VHOST_USER_CLOSE_CRYPTO_SESSION`: refused, as the
/// features they belong to are never offered (docs/conformance.md).
fn refuse_unserved(request: FrontendReq) -> SessionError {
    let reason = match request {
        FrontendReq::SetVringEndian => "legacy cross-endian rings are not supported",
        FrontendReq::CloseCryptoSession => "no crypto sessions",
        _ => "not served",
    };
    unsupported(request, reason)
}

fn unsupported(request: FrontendReq, reason: &'static str) -> SessionError {
    SessionError::Unsupported { request, reason }
}

/// The virtio features never offered for bitmap `B`: `VHOST_F_LOG_ALL` when `B` does not log
/// writes (see [`RegionBitmap::LOGS_WRITES`]).
fn unlogged_features<B: RegionBitmap>() -> u64 {
    if B::LOGS_WRITES {
        0
    } else {
        VirtioFeatures::LOG_ALL.bits()
    }
}

/// `protocol` without `VHOST_USER_PROTOCOL_F_LOG_SHMFD` when bitmap `B` does not log writes:
/// a frontend would then migrate the guest and lose every page the device wrote. Warns once
/// (per backend) if the backend offered either logging feature.
fn without_unlogged_migration<B: RegionBitmap>(
    protocol: ProtocolFeatures,
    virtio: u64,
) -> ProtocolFeatures {
    if B::LOGS_WRITES {
        return protocol;
    }
    if protocol.contains(ProtocolFeatures::LOG_SHMFD) || virtio & unlogged_features::<B>() != 0 {
        warn!(
            "the backend offers live migration (LOG_SHMFD or LOG_ALL) with a bitmap that does \
             not log writes; not offering it (use vu_mem::LogBitmap)"
        );
    }
    protocol - ProtocolFeatures::LOG_SHMFD
}

/// How a refused request is answered.
enum Failure {
    /// Send this reply.
    Reply(Reply),
    /// Send nothing; the frontend expects nothing.
    Silent,
    /// Close the connection: the frontend waits for a reply that cannot say "failed".
    Close,
}

/// How a refusal of `req` is answered: the request's own reply in its failure form where it
/// has one, a REPLY_ACK failure where the frontend asked for one, nothing or a close
/// otherwise.
///
/// `SET_LOG_BASE` has a reply only "if `VHOST_USER_PROTOCOL_F_LOG_SHMFD`": without it QEMU
/// sends no fd and reads no reply, so the refusal follows the REPLY_ACK rule instead.
fn failure_reply(
    hdr: &Header,
    req: FrontendReq,
    postcopy_listening: bool,
    log_shmfd: bool,
) -> Failure {
    let fail_u64 = || Failure::Reply(Reply::u64(hdr, FAILURE));
    match req {
        FrontendReq::SetLogBase if !log_shmfd && hdr.needs_reply() => fail_u64(),
        FrontendReq::SetLogBase if !log_shmfd => Failure::Silent,
        FrontendReq::SetLogBase
        | FrontendReq::CheckDeviceState
        | FrontendReq::GetSharedObject
        | FrontendReq::PostcopyEnd => fail_u64(),
        FrontendReq::GetConfig => Failure::Reply(Reply::new(hdr, &ConfigReply::Failed, Vec::new())),
        FrontendReq::CreateCryptoSession => Failure::Reply(Reply::new(
            hdr,
            &failed_crypto_session(Vec::new()),
            Vec::new(),
        )),
        FrontendReq::SetDeviceStateFd => Failure::Reply(Reply::new(
            hdr,
            &DeviceStateFdReply {
                error: 1,
                no_fd: true,
            },
            Vec::new(),
        )),
        FrontendReq::GetShmemConfig => {
            let none = ShmemConfig {
                nregions: 0,
                memory_sizes: Box::new([0; vu_proto::payload::MAX_SHMEM_REGIONS]),
            };
            Failure::Reply(Reply::new(hdr, &none, Vec::new()))
        }
        FrontendReq::PostcopyAdvise => {
            Failure::Reply(Reply::new(hdr, &vu_proto::payload::Empty, Vec::new()))
        }
        // The frontend's `Inflight` is not known here when decoding failed; an all-zero
        // area with no fd tells QEMU there is no inflight tracking.
        FrontendReq::GetInflightFd => Failure::Reply(Reply {
            header: hdr.reply(Inflight::SIZE as u32),
            body: vec![0; Inflight::SIZE],
            fds: Vec::new(),
        }),
        _ => match req.reply_rule() {
            ReplyRule::Always => Failure::Close,
            ReplyRule::PostcopyOrNeedReply if postcopy_listening => Failure::Close,
            _ if hdr.needs_reply() => fail_u64(),
            _ => Failure::Silent,
        },
    }
}

/// The request's spec name, or its code when unknown.
fn describe(hdr: &Header, req: Option<FrontendReq>) -> String {
    match req {
        Some(req) => req.to_string(),
        None => hdr.request.to_string(),
    }
}

/// Creates a close-on-exec, non-blocking eventfd owned by the session.
fn new_eventfd() -> std::io::Result<File> {
    crate::sys::eventfd(true)
}
