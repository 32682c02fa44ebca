//! Whole messages: [`RawMessage`], what a socket receives, the typed requests it
//! decodes into ([`FrontendRequest`], [`BackendRequest`]), and the reply helpers
//! ([`decode_reply`], [`encode_reply`]).
//!
//! Decoding checks the fd count against the request's [`crate::request::FdRule`],
//! narrowed by the payload where the payload says how many fds follow, in one place
//! (`Parts::split`). On any error the message's fds are dropped, which closes them.
//!
//! The typed requests are generic over their fd type: decoding yields owned fds
//! (`FrontendRequest<OwnedFd>`, the default), while a sender can build a
//! `FrontendRequest<BorrowedFd<'_>>` around fds it keeps. Encoding gives the header and
//! body bytes; [`FrontendRequest::fds`] gives the fds to pass with them, in order.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::features::{ProtocolFeatures, VirtioFeatures};
use crate::header::{Header, HeaderFlags};
use crate::payload::{
    CryptoSession, DeviceConfig, DeviceStateTransfer, Empty, Inflight, Iotlb, Log, MacAddr,
    MemoryRegion, MemoryTable, Payload, SharedObject, ShmemMap, SingleMemoryRegion, VringAddr,
    VringArea, VringEnable, VringEndian, VringFdIndex, VringState, U64,
};
use crate::request::{BackendReq, FdRule, FrontendReq, Request, RequestCode};
use crate::wire::WireError;

/// A message as received from a socket: a validated header, its body and the fds that
/// came with it. No field has been interpreted beyond the header.
#[derive(Debug)]
pub struct RawMessage {
    /// The header, already checked by [`Header::read`].
    pub header: Header,
    /// Exactly `header.size` bytes of payload.
    pub body: Vec<u8>,
    /// The fds received with the message, owned: dropping the message closes them.
    pub fds: Vec<OwnedFd>,
}

/// A message that could not be decoded: its header, so that the request can still be
/// refused, and what was wrong. The message's fds have been closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("malformed message ({}): {error}", .header.request)]
pub struct DecodeError {
    /// The header of the offending message.
    pub header: Header,
    /// What was wrong with it.
    pub error: WireError,
}

/// The body and fds of a message being decoded for a known request.
struct Parts {
    request: RequestCode,
    rule: FdRule,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Parts {
    /// Parses the payload and checks the fd count: the one place where fd rules are
    /// enforced. The request's rule bounds the count; when it allows fds at all and the
    /// payload says how many follow, the count must be exactly that.
    fn split<P: Payload>(self) -> Result<(P, Vec<OwnedFd>), WireError> {
        let Parts {
            request,
            rule,
            body,
            fds,
        } = self;
        let actual = fds.len();
        let refuse = |min, max| WireError::WrongFdCount {
            request,
            min,
            max,
            actual,
        };
        if !rule.allows(actual) {
            return Err(refuse(rule.min, rule.max));
        }
        let payload = P::decode_body(request, &body)?;
        if rule.max > 0 {
            if let Some(expected) = payload.expected_fds() {
                if expected != actual {
                    return Err(refuse(expected, expected));
                }
            }
        }
        Ok((payload, fds))
    }

    /// A payload with no fds.
    fn payload<P: Payload>(self) -> Result<P, WireError> {
        self.split().map(|(p, _)| p)
    }

    /// No payload and no fds.
    fn empty(self) -> Result<(), WireError> {
        self.payload::<Empty>().map(|_| ())
    }

    /// A payload and exactly one fd.
    fn with_fd<P: Payload>(self) -> Result<(P, OwnedFd), WireError> {
        let request = self.request;
        let (p, fds) = self.split()?;
        let actual = fds.len();
        let mut fds = fds.into_iter();
        match (fds.next(), fds.next()) {
            (Some(fd), None) => Ok((p, fd)),
            _ => Err(WireError::WrongFdCount {
                request,
                min: 1,
                max: 1,
                actual,
            }),
        }
    }

    /// A payload and at most one fd.
    fn with_opt_fd<P: Payload>(self) -> Result<(P, Option<OwnedFd>), WireError> {
        let request = self.request;
        let (p, fds) = self.split()?;
        let actual = fds.len();
        let mut fds = fds.into_iter();
        match (fds.next(), fds.next()) {
            (fd, None) => Ok((p, fd)),
            _ => Err(WireError::WrongFdCount {
                request,
                min: 0,
                max: 1,
                actual,
            }),
        }
    }
}

/// Decodes `msg` as a request of the direction whose request table is `Q`: a code `Q`
/// does not know becomes `unknown(code, flags)` (the body and fds are dropped); a known
/// one is decoded by `known` from its parts, checked against `fd_rule`. A failure carries
/// the header, so that the request can still be refused.
fn decode_request<Q, T>(
    msg: RawMessage,
    fd_rule: impl FnOnce(Q) -> FdRule,
    unknown: impl FnOnce(RequestCode, HeaderFlags) -> T,
    known: impl FnOnce(Q, Parts) -> Result<T, WireError>,
) -> Result<T, DecodeError>
where
    Q: Copy + TryFrom<RequestCode, Error = RequestCode>,
{
    let header = msg.header;
    let req = match Q::try_from(header.request) {
        Ok(req) => req,
        Err(code) => return Ok(unknown(code, header.flags)),
    };
    let parts = Parts {
        request: header.request,
        rule: fd_rule(req),
        body: msg.body,
        fds: msg.fds,
    };
    known(req, parts).map_err(|error| DecodeError { header, error })
}

/// Encodes a header around a payload.
fn frame(
    request: impl Into<RequestCode>,
    flags: HeaderFlags,
    payload: &impl Payload,
) -> (Header, Vec<u8>) {
    let body = payload.to_vec();
    // Bodies built by this crate are bounded by MAX_PAYLOAD_SIZE; a larger one (a
    // caller's oversized table) saturates and the peer refuses it.
    let size = u32::try_from(body.len()).unwrap_or(u32::MAX);
    (Header::new(request, flags, size), body)
}

/// A request from the front-end, decoded: one variant per request of the spec, with
/// its payload and fds, plus [`FrontendRequest::Unknown`].
///
/// `F` is the fd type: [`OwnedFd`] when decoded, any [`AsFd`] when built to be sent.
/// The header flags (NEED_REPLY) are not part of the value: keep a copy of
/// [`RawMessage::header`] before calling [`FrontendRequest::decode`].
#[non_exhaustive]
#[derive(Debug)]
pub enum FrontendRequest<F = OwnedFd> {
    /// `VHOST_USER_GET_FEATURES`.
    GetFeatures,
    /// `VHOST_USER_SET_FEATURES`.
    SetFeatures(VirtioFeatures),
    /// `VHOST_USER_SET_OWNER`.
    SetOwner,
    /// `VHOST_USER_RESET_OWNER`.
    ResetOwner,
    /// `VHOST_USER_SET_MEM_TABLE`: one fd per region, in order.
    SetMemTable {
        /// The regions.
        table: MemoryTable,
        /// One fd per region.
        fds: Vec<F>,
    },
    /// `VHOST_USER_SET_LOG_BASE`.
    SetLogBase {
        /// Where the log lives in `fd`.
        log: Log,
        /// The shared log memory.
        fd: F,
    },
    /// `VHOST_USER_SET_LOG_FD`.
    SetLogFd {
        /// The eventfd to signal log changes on.
        fd: F,
    },
    /// `VHOST_USER_SET_VRING_NUM`.
    SetVringNum(VringState),
    /// `VHOST_USER_SET_VRING_ADDR`.
    SetVringAddr(VringAddr),
    /// `VHOST_USER_SET_VRING_BASE`.
    SetVringBase(VringState),
    /// `VHOST_USER_GET_VRING_BASE`.
    GetVringBase(VringState),
    /// `VHOST_USER_SET_VRING_KICK`; no fd means "polling should be used".
    SetVringKick {
        /// The vring index.
        index: u8,
        /// The kick eventfd, or none (the no-fd bit).
        fd: Option<F>,
    },
    /// `VHOST_USER_SET_VRING_CALL`; no fd means the front-end polls.
    SetVringCall {
        /// The vring index.
        index: u8,
        /// The call eventfd, or none (the no-fd bit).
        fd: Option<F>,
    },
    /// `VHOST_USER_SET_VRING_ERR`.
    SetVringErr {
        /// The vring index.
        index: u8,
        /// The error eventfd, or none (the no-fd bit).
        fd: Option<F>,
    },
    /// `VHOST_USER_GET_PROTOCOL_FEATURES`.
    GetProtocolFeatures,
    /// `VHOST_USER_SET_PROTOCOL_FEATURES`.
    SetProtocolFeatures(ProtocolFeatures),
    /// `VHOST_USER_GET_QUEUE_NUM`.
    GetQueueNum,
    /// `VHOST_USER_SET_VRING_ENABLE`.
    SetVringEnable(VringEnable),
    /// `VHOST_USER_SEND_RARP`.
    SendRarp(MacAddr),
    /// `VHOST_USER_NET_SET_MTU`.
    NetSetMtu(U64),
    /// `VHOST_USER_SET_BACKEND_REQ_FD`.
    SetBackendReqFd {
        /// The socket for back-end requests.
        fd: F,
    },
    /// `VHOST_USER_IOTLB_MSG`.
    IotlbMsg(Iotlb),
    /// `VHOST_USER_SET_VRING_ENDIAN`.
    SetVringEndian(VringEndian),
    /// `VHOST_USER_GET_CONFIG`.
    GetConfig(DeviceConfig),
    /// `VHOST_USER_SET_CONFIG`.
    SetConfig(DeviceConfig),
    /// `VHOST_USER_CREATE_CRYPTO_SESSION`.
    CreateCryptoSession(CryptoSession),
    /// `VHOST_USER_CLOSE_CRYPTO_SESSION`: the session id.
    CloseCryptoSession(U64),
    /// `VHOST_USER_POSTCOPY_ADVISE`.
    PostcopyAdvise,
    /// `VHOST_USER_POSTCOPY_LISTEN`.
    PostcopyListen,
    /// `VHOST_USER_POSTCOPY_END`.
    PostcopyEnd,
    /// `VHOST_USER_GET_INFLIGHT_FD`.
    GetInflightFd(Inflight),
    /// `VHOST_USER_SET_INFLIGHT_FD`.
    SetInflightFd {
        /// Where the buffer lives in `fd` and its geometry.
        inflight: Inflight,
        /// The shared inflight buffer.
        fd: F,
    },
    /// `VHOST_USER_GPU_SET_SOCKET`.
    GpuSetSocket {
        /// The GPU protocol socket.
        fd: F,
    },
    /// `VHOST_USER_RESET_DEVICE`.
    ResetDevice,
    /// `VHOST_USER_VRING_KICK` (in-band).
    VringKick(VringState),
    /// `VHOST_USER_GET_MAX_MEM_SLOTS`.
    GetMaxMemSlots,
    /// `VHOST_USER_ADD_MEM_REG`.
    AddMemReg {
        /// The region.
        region: MemoryRegion,
        /// Its memory.
        fd: F,
    },
    /// `VHOST_USER_REM_MEM_REG`; an fd sent along by a non-conforming front-end was
    /// closed during decoding, as the spec requires.
    RemMemReg(MemoryRegion),
    /// `VHOST_USER_SET_STATUS`.
    SetStatus(U64),
    /// `VHOST_USER_GET_STATUS`.
    GetStatus,
    /// `VHOST_USER_GET_SHARED_OBJECT`.
    GetSharedObject(SharedObject),
    /// `VHOST_USER_SET_DEVICE_STATE_FD`.
    SetDeviceStateFd {
        /// Direction and phase.
        transfer: DeviceStateTransfer,
        /// The front-end's end of the transfer channel.
        fd: F,
    },
    /// `VHOST_USER_CHECK_DEVICE_STATE`.
    CheckDeviceState,
    /// `VHOST_USER_GET_SHMEM_CONFIG`.
    GetShmemConfig,
    /// A request code this crate does not know; its body and fds were dropped. It can
    /// still be refused (with a REPLY_ACK failure if NEED_REPLY is set).
    Unknown {
        /// The code received.
        code: RequestCode,
        /// The flags received.
        flags: HeaderFlags,
    },
}

impl FrontendRequest<OwnedFd> {
    /// Decodes a received message, checking its payload and its fd count.
    pub fn decode(msg: RawMessage) -> Result<Self, DecodeError> {
        decode_request(
            msg,
            FrontendReq::fd_rule,
            |code, flags| Self::Unknown { code, flags },
            Self::decode_known,
        )
    }

    fn decode_known(req: FrontendReq, p: Parts) -> Result<Self, WireError> {
        use FrontendRequest as R;
        let vring_fd = |p: Parts| -> Result<(u8, Option<OwnedFd>), WireError> {
            let (index, fd) = p.with_opt_fd::<VringFdIndex>()?;
            Ok((index.index, fd))
        };
        Ok(match req {
            FrontendReq::GetFeatures => p.empty().map(|()| R::GetFeatures)?,
            FrontendReq::SetFeatures => R::SetFeatures(p.payload()?),
            FrontendReq::SetOwner => p.empty().map(|()| R::SetOwner)?,
            FrontendReq::ResetOwner => p.empty().map(|()| R::ResetOwner)?,
            FrontendReq::SetMemTable => {
                let (table, fds) = p.split()?;
                R::SetMemTable { table, fds }
            }
            FrontendReq::SetLogBase => {
                let (log, fd) = p.with_fd()?;
                R::SetLogBase { log, fd }
            }
            FrontendReq::SetLogFd => R::SetLogFd {
                fd: p.with_fd::<Empty>()?.1,
            },
            FrontendReq::SetVringNum => R::SetVringNum(p.payload()?),
            FrontendReq::SetVringAddr => R::SetVringAddr(p.payload()?),
            FrontendReq::SetVringBase => R::SetVringBase(p.payload()?),
            FrontendReq::GetVringBase => R::GetVringBase(p.payload()?),
            FrontendReq::SetVringKick => {
                let (index, fd) = vring_fd(p)?;
                R::SetVringKick { index, fd }
            }
            FrontendReq::SetVringCall => {
                let (index, fd) = vring_fd(p)?;
                R::SetVringCall { index, fd }
            }
            FrontendReq::SetVringErr => {
                let (index, fd) = vring_fd(p)?;
                R::SetVringErr { index, fd }
            }
            FrontendReq::GetProtocolFeatures => p.empty().map(|()| R::GetProtocolFeatures)?,
            FrontendReq::SetProtocolFeatures => R::SetProtocolFeatures(p.payload()?),
            FrontendReq::GetQueueNum => p.empty().map(|()| R::GetQueueNum)?,
            FrontendReq::SetVringEnable => R::SetVringEnable(p.payload()?),
            FrontendReq::SendRarp => R::SendRarp(p.payload()?),
            FrontendReq::NetSetMtu => R::NetSetMtu(p.payload()?),
            FrontendReq::SetBackendReqFd => R::SetBackendReqFd {
                fd: p.with_fd::<Empty>()?.1,
            },
            FrontendReq::IotlbMsg => R::IotlbMsg(p.payload()?),
            FrontendReq::SetVringEndian => R::SetVringEndian(p.payload()?),
            FrontendReq::GetConfig => R::GetConfig(p.payload()?),
            FrontendReq::SetConfig => R::SetConfig(p.payload()?),
            FrontendReq::CreateCryptoSession => R::CreateCryptoSession(p.payload()?),
            FrontendReq::CloseCryptoSession => R::CloseCryptoSession(p.payload()?),
            FrontendReq::PostcopyAdvise => p.empty().map(|()| R::PostcopyAdvise)?,
            FrontendReq::PostcopyListen => p.empty().map(|()| R::PostcopyListen)?,
            FrontendReq::PostcopyEnd => p.empty().map(|()| R::PostcopyEnd)?,
            FrontendReq::GetInflightFd => R::GetInflightFd(p.payload()?),
            FrontendReq::SetInflightFd => {
                let (inflight, fd) = p.with_fd()?;
                R::SetInflightFd { inflight, fd }
            }
            FrontendReq::GpuSetSocket => R::GpuSetSocket {
                fd: p.with_fd::<Empty>()?.1,
            },
            FrontendReq::ResetDevice => p.empty().map(|()| R::ResetDevice)?,
            FrontendReq::VringKick => R::VringKick(p.payload()?),
            FrontendReq::GetMaxMemSlots => p.empty().map(|()| R::GetMaxMemSlots)?,
            FrontendReq::AddMemReg => {
                let (single, fd) = p.with_fd::<SingleMemoryRegion>()?;
                R::AddMemReg {
                    region: single.region,
                    fd,
                }
            }
            FrontendReq::RemMemReg => {
                // Dropping the optional fd here closes it, as the spec requires.
                let (single, _fd) = p.with_opt_fd::<SingleMemoryRegion>()?;
                R::RemMemReg(single.region)
            }
            FrontendReq::SetStatus => R::SetStatus(p.payload()?),
            FrontendReq::GetStatus => p.empty().map(|()| R::GetStatus)?,
            FrontendReq::GetSharedObject => R::GetSharedObject(p.payload()?),
            FrontendReq::SetDeviceStateFd => {
                let (transfer, fd) = p.with_fd()?;
                R::SetDeviceStateFd { transfer, fd }
            }
            FrontendReq::CheckDeviceState => p.empty().map(|()| R::CheckDeviceState)?,
            FrontendReq::GetShmemConfig => p.empty().map(|()| R::GetShmemConfig)?,
        })
    }
}

impl<F: AsFd> FrontendRequest<F> {
    /// The request code of this request.
    pub fn code(&self) -> RequestCode {
        use FrontendRequest as R;
        let req = match self {
            R::GetFeatures => FrontendReq::GetFeatures,
            R::SetFeatures(_) => FrontendReq::SetFeatures,
            R::SetOwner => FrontendReq::SetOwner,
            R::ResetOwner => FrontendReq::ResetOwner,
            R::SetMemTable { .. } => FrontendReq::SetMemTable,
            R::SetLogBase { .. } => FrontendReq::SetLogBase,
            R::SetLogFd { .. } => FrontendReq::SetLogFd,
            R::SetVringNum(_) => FrontendReq::SetVringNum,
            R::SetVringAddr(_) => FrontendReq::SetVringAddr,
            R::SetVringBase(_) => FrontendReq::SetVringBase,
            R::GetVringBase(_) => FrontendReq::GetVringBase,
            R::SetVringKick { .. } => FrontendReq::SetVringKick,
            R::SetVringCall { .. } => FrontendReq::SetVringCall,
            R::SetVringErr { .. } => FrontendReq::SetVringErr,
            R::GetProtocolFeatures => FrontendReq::GetProtocolFeatures,
            R::SetProtocolFeatures(_) => FrontendReq::SetProtocolFeatures,
            R::GetQueueNum => FrontendReq::GetQueueNum,
            R::SetVringEnable(_) => FrontendReq::SetVringEnable,
            R::SendRarp(_) => FrontendReq::SendRarp,
            R::NetSetMtu(_) => FrontendReq::NetSetMtu,
            R::SetBackendReqFd { .. } => FrontendReq::SetBackendReqFd,
            R::IotlbMsg(_) => FrontendReq::IotlbMsg,
            R::SetVringEndian(_) => FrontendReq::SetVringEndian,
            R::GetConfig(_) => FrontendReq::GetConfig,
            R::SetConfig(_) => FrontendReq::SetConfig,
            R::CreateCryptoSession(_) => FrontendReq::CreateCryptoSession,
            R::CloseCryptoSession(_) => FrontendReq::CloseCryptoSession,
            R::PostcopyAdvise => FrontendReq::PostcopyAdvise,
            R::PostcopyListen => FrontendReq::PostcopyListen,
            R::PostcopyEnd => FrontendReq::PostcopyEnd,
            R::GetInflightFd(_) => FrontendReq::GetInflightFd,
            R::SetInflightFd { .. } => FrontendReq::SetInflightFd,
            R::GpuSetSocket { .. } => FrontendReq::GpuSetSocket,
            R::ResetDevice => FrontendReq::ResetDevice,
            R::VringKick(_) => FrontendReq::VringKick,
            R::GetMaxMemSlots => FrontendReq::GetMaxMemSlots,
            R::AddMemReg { .. } => FrontendReq::AddMemReg,
            R::RemMemReg(_) => FrontendReq::RemMemReg,
            R::SetStatus(_) => FrontendReq::SetStatus,
            R::GetStatus => FrontendReq::GetStatus,
            R::GetSharedObject(_) => FrontendReq::GetSharedObject,
            R::SetDeviceStateFd { .. } => FrontendReq::SetDeviceStateFd,
            R::CheckDeviceState => FrontendReq::CheckDeviceState,
            R::GetShmemConfig => FrontendReq::GetShmemConfig,
            R::Unknown { code, .. } => return *code,
        };
        req.code()
    }

    /// The header and body bytes of this request; `flags` may add NEED_REPLY (the
    /// version is always set). Send [`FrontendRequest::fds`] with them.
    pub fn encode(&self, flags: HeaderFlags) -> (Header, Vec<u8>) {
        use FrontendRequest as R;
        let code = self.code();
        let vring_fd = |index: u8, fd: &Option<F>| VringFdIndex {
            index,
            no_fd: fd.is_none(),
        };
        match self {
            R::GetFeatures
            | R::SetOwner
            | R::ResetOwner
            | R::SetLogFd { .. }
            | R::GetProtocolFeatures
            | R::GetQueueNum
            | R::SetBackendReqFd { .. }
            | R::PostcopyAdvise
            | R::PostcopyListen
            | R::PostcopyEnd
            | R::GpuSetSocket { .. }
            | R::ResetDevice
            | R::GetMaxMemSlots
            | R::GetStatus
            | R::CheckDeviceState
            | R::GetShmemConfig
            | R::Unknown { .. } => frame(code, flags, &Empty),
            R::SetFeatures(f) => frame(code, flags, f),
            R::SetMemTable { table, .. } => frame(code, flags, table),
            R::SetLogBase { log, .. } => frame(code, flags, log),
            R::SetVringNum(s) | R::SetVringBase(s) | R::GetVringBase(s) | R::VringKick(s) => {
                frame(code, flags, s)
            }
            R::SetVringAddr(a) => frame(code, flags, a),
            R::SetVringKick { index, fd }
            | R::SetVringCall { index, fd }
            | R::SetVringErr { index, fd } => frame(code, flags, &vring_fd(*index, fd)),
            R::SetProtocolFeatures(f) => frame(code, flags, f),
            R::SetVringEnable(e) => frame(code, flags, e),
            R::SendRarp(m) => frame(code, flags, m),
            R::NetSetMtu(v) | R::CloseCryptoSession(v) | R::SetStatus(v) => frame(code, flags, v),
            R::IotlbMsg(i) => frame(code, flags, i),
            R::SetVringEndian(e) => frame(code, flags, e),
            R::GetConfig(c) | R::SetConfig(c) => frame(code, flags, c),
            R::CreateCryptoSession(c) => frame(code, flags, c),
            R::GetInflightFd(i) | R::SetInflightFd { inflight: i, .. } => frame(code, flags, i),
            R::AddMemReg { region, .. } | R::RemMemReg(region) => {
                frame(code, flags, &SingleMemoryRegion { region: *region })
            }
            R::GetSharedObject(o) => frame(code, flags, o),
            R::SetDeviceStateFd { transfer, .. } => frame(code, flags, transfer),
        }
    }

    /// The fds to send with the encoded request, in order.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        use FrontendRequest as R;
        match self {
            R::SetMemTable { fds, .. } => fds.iter().map(AsFd::as_fd).collect(),
            R::SetLogBase { fd, .. }
            | R::SetLogFd { fd }
            | R::SetBackendReqFd { fd }
            | R::SetInflightFd { fd, .. }
            | R::GpuSetSocket { fd }
            | R::AddMemReg { fd, .. }
            | R::SetDeviceStateFd { fd, .. } => vec![fd.as_fd()],
            R::SetVringKick { fd, .. } | R::SetVringCall { fd, .. } | R::SetVringErr { fd, .. } => {
                fd.iter().map(AsFd::as_fd).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// A request from the back-end (on the back-end channel), decoded: one variant per
/// request of the spec plus [`BackendRequest::Unknown`]. Generic over the fd type like
/// [`FrontendRequest`].
#[non_exhaustive]
#[derive(Debug)]
pub enum BackendRequest<F = OwnedFd> {
    /// `VHOST_USER_BACKEND_IOTLB_MSG`: a miss or an access failure.
    IotlbMsg(Iotlb),
    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
    ConfigChangeMsg,
    /// `VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG`: with an fd, registers the area as
    /// the vring's notifier; without, removes the notifier.
    VringHostNotifierMsg {
        /// The vring index.
        index: u8,
        /// The size of the area in `fd` (ignored without an fd).
        size: u64,
        /// The offset of the area in `fd` (ignored without an fd).
        offset: u64,
        /// The notifier memory, or none to remove the notifier.
        fd: Option<F>,
    },
    /// `VHOST_USER_BACKEND_VRING_CALL` (in-band).
    VringCall(VringState),
    /// `VHOST_USER_BACKEND_VRING_ERR` (in-band).
    VringErr(VringState),
    /// `VHOST_USER_BACKEND_SHARED_OBJECT_ADD`.
    SharedObjectAdd(SharedObject),
    /// `VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE`.
    SharedObjectRemove(SharedObject),
    /// `VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP`.
    SharedObjectLookup(SharedObject),
    /// `VHOST_USER_BACKEND_SHMEM_MAP`.
    ShmemMap {
        /// What to map where.
        map: ShmemMap,
        /// The memory to map.
        fd: F,
    },
    /// `VHOST_USER_BACKEND_SHMEM_UNMAP` (`fd_offset` is ignored).
    ShmemUnmap(ShmemMap),
    /// A request code this crate does not know; its body and fds were dropped.
    Unknown {
        /// The code received.
        code: RequestCode,
        /// The flags received.
        flags: HeaderFlags,
    },
}

impl BackendRequest<OwnedFd> {
    /// Decodes a received message, checking its payload and its fd count.
    pub fn decode(msg: RawMessage) -> Result<Self, DecodeError> {
        decode_request(
            msg,
            BackendReq::fd_rule,
            |code, flags| Self::Unknown { code, flags },
            Self::decode_known,
        )
    }

    fn decode_known(req: BackendReq, p: Parts) -> Result<Self, WireError> {
        use BackendRequest as R;
        Ok(match req {
            BackendReq::IotlbMsg => R::IotlbMsg(p.payload()?),
            BackendReq::ConfigChangeMsg => p.empty().map(|()| R::ConfigChangeMsg)?,
            BackendReq::VringHostNotifierMsg => {
                let (area, fd) = p.with_opt_fd::<VringArea>()?;
                R::VringHostNotifierMsg {
                    index: area.index.index,
                    size: area.size,
                    offset: area.offset,
                    fd,
                }
            }
            BackendReq::VringCall => R::VringCall(p.payload()?),
            BackendReq::VringErr => R::VringErr(p.payload()?),
            BackendReq::SharedObjectAdd => R::SharedObjectAdd(p.payload()?),
            BackendReq::SharedObjectRemove => R::SharedObjectRemove(p.payload()?),
            BackendReq::SharedObjectLookup => R::SharedObjectLookup(p.payload()?),
            BackendReq::ShmemMap => {
                let (map, fd) = p.with_fd()?;
                R::ShmemMap { map, fd }
            }
            BackendReq::ShmemUnmap => R::ShmemUnmap(p.payload()?),
        })
    }
}

impl<F: AsFd> BackendRequest<F> {
    /// The request code of this request.
    pub fn code(&self) -> RequestCode {
        use BackendRequest as R;
        let req = match self {
            R::IotlbMsg(_) => BackendReq::IotlbMsg,
            R::ConfigChangeMsg => BackendReq::ConfigChangeMsg,
            R::VringHostNotifierMsg { .. } => BackendReq::VringHostNotifierMsg,
            R::VringCall(_) => BackendReq::VringCall,
            R::VringErr(_) => BackendReq::VringErr,
            R::SharedObjectAdd(_) => BackendReq::SharedObjectAdd,
            R::SharedObjectRemove(_) => BackendReq::SharedObjectRemove,
            R::SharedObjectLookup(_) => BackendReq::SharedObjectLookup,
            R::ShmemMap { .. } => BackendReq::ShmemMap,
            R::ShmemUnmap(_) => BackendReq::ShmemUnmap,
            R::Unknown { code, .. } => return *code,
        };
        req.code()
    }

    /// The header and body bytes of this request; `flags` may add NEED_REPLY. Send
    /// [`BackendRequest::fds`] with them.
    pub fn encode(&self, flags: HeaderFlags) -> (Header, Vec<u8>) {
        use BackendRequest as R;
        let code = self.code();
        match self {
            R::ConfigChangeMsg | R::Unknown { .. } => frame(code, flags, &Empty),
            R::IotlbMsg(i) => frame(code, flags, i),
            R::VringHostNotifierMsg {
                index,
                size,
                offset,
                fd,
            } => frame(
                code,
                flags,
                &VringArea {
                    index: VringFdIndex {
                        index: *index,
                        no_fd: fd.is_none(),
                    },
                    size: *size,
                    offset: *offset,
                },
            ),
            R::VringCall(s) | R::VringErr(s) => frame(code, flags, s),
            R::SharedObjectAdd(o) | R::SharedObjectRemove(o) | R::SharedObjectLookup(o) => {
                frame(code, flags, o)
            }
            R::ShmemMap { map, .. } | R::ShmemUnmap(map) => frame(code, flags, map),
        }
    }

    /// The fds to send with the encoded request, in order.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            BackendRequest::VringHostNotifierMsg { fd, .. } => fd.iter().map(AsFd::as_fd).collect(),
            BackendRequest::ShmemMap { fd, .. } => vec![fd.as_fd()],
            _ => Vec::new(),
        }
    }
}

/// A decoded reply: its payload and the fd it carried, if its request allows one.
#[derive(Debug)]
pub struct Reply<T> {
    /// The reply's payload.
    pub payload: T,
    /// The fd passed with the reply (`GET_INFLIGHT_FD`, `POSTCOPY_ADVISE`,
    /// `GET_SHARED_OBJECT`, `SET_DEVICE_STATE_FD`, `BACKEND_SHARED_OBJECT_LOOKUP`).
    pub fd: Option<OwnedFd>,
}

/// Decodes `msg` as the reply to `request`.
///
/// Checks that the REPLY flag is set, that the reply answers `request`, the payload,
/// and the fd count against the request's reply rule (narrowed by the payload, as for
/// [`DeviceStateFdReply`](crate::payload::DeviceStateFdReply)). For a REPLY_ACK status
/// use `T = U64`; for `GET_CONFIG`, [`ConfigReply`](crate::payload::ConfigReply).
pub fn decode_reply<T: Payload>(
    request: impl Request,
    msg: RawMessage,
) -> Result<Reply<T>, DecodeError> {
    let header = msg.header;
    let expected: RequestCode = request.into();
    let checked = if !header.is_reply() {
        Err(WireError::NotAReply {
            request: header.request,
        })
    } else if header.request != expected {
        Err(WireError::ReplyMismatch {
            expected,
            actual: header.request,
        })
    } else {
        Parts {
            request: expected,
            rule: request.reply_fds(),
            body: msg.body,
            fds: msg.fds,
        }
        .with_opt_fd::<T>()
    };
    checked
        .map(|(payload, fd)| Reply { payload, fd })
        .map_err(|error| DecodeError { header, error })
}

/// The header and body of the reply to `request` carrying `payload`: same request code,
/// REPLY set. Pass the reply's fd, if any, alongside.
pub fn encode_reply<T: Payload>(request: &Header, payload: &T) -> (Header, Vec<u8>) {
    frame(request.request, HeaderFlags::REPLY, payload)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::features::ProtocolFeatures;
    use crate::payload::memory::tests::region;
    use crate::payload::{
        ConfigFlags, ConfigReply, DeviceStateFdReply, IotlbPerm, IotlbType, ShmemMapFlags,
        TransferDirection, TransferPhase, VringAddrFlags,
    };

    fn null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn raw(
        request: impl Into<RequestCode>,
        flags: HeaderFlags,
        body: Vec<u8>,
        fds: Vec<OwnedFd>,
    ) -> RawMessage {
        let size = u32::try_from(body.len()).unwrap();
        RawMessage {
            header: Header::new(request, flags, size),
            body,
            fds,
        }
    }

    /// Turns a request built to be sent into the message a peer would receive.
    fn wire<F: AsFd>(req: &FrontendRequest<F>) -> RawMessage {
        let (header, body) = req.encode(HeaderFlags::NEED_REPLY);
        let fds = req
            .fds()
            .into_iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        RawMessage { header, body, fds }
    }

    fn backend_wire<F: AsFd>(req: &BackendRequest<F>) -> RawMessage {
        let (header, body) = req.encode(HeaderFlags::empty());
        let fds = req
            .fds()
            .into_iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        RawMessage { header, body, fds }
    }

    fn config() -> DeviceConfig {
        DeviceConfig {
            offset: 0,
            flags: ConfigFlags::empty(),
            data: vec![7; 8],
        }
    }

    fn inflight() -> Inflight {
        Inflight {
            mmap_size: 0x1000,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 128,
        }
    }

    fn map() -> ShmemMap {
        ShmemMap {
            shmid: 1,
            fd_offset: 0,
            shm_offset: 0x1000,
            len: 0x1000,
            flags: ShmemMapFlags::WRITABLE,
        }
    }

    /// One valid request of every front-end kind, in spec order.
    pub(super) fn frontend_samples() -> Vec<FrontendRequest> {
        use FrontendRequest as R;
        let state = VringState { index: 1, num: 256 };
        vec![
            R::GetFeatures,
            R::SetFeatures(VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES),
            R::SetOwner,
            R::ResetOwner,
            R::SetMemTable {
                table: MemoryTable {
                    regions: vec![region(0, 0x10_0000), region(0x10_0000, 0x10_0000)],
                },
                fds: vec![null(), null()],
            },
            R::SetLogBase {
                log: Log {
                    mmap_size: 0x1000,
                    mmap_offset: 0,
                },
                fd: null(),
            },
            R::SetLogFd { fd: null() },
            R::SetVringNum(state),
            R::SetVringAddr(VringAddr {
                index: 1,
                flags: VringAddrFlags::LOG,
                descriptor: 0x1000,
                used: 0x2000,
                available: 0x3000,
                log: 0x4000,
            }),
            R::SetVringBase(state),
            R::GetVringBase(VringState { index: 1, num: 0 }),
            R::SetVringKick {
                index: 1,
                fd: Some(null()),
            },
            R::SetVringCall { index: 2, fd: None },
            R::SetVringErr {
                index: 3,
                fd: Some(null()),
            },
            R::GetProtocolFeatures,
            R::SetProtocolFeatures(ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK),
            R::GetQueueNum,
            R::SetVringEnable(VringEnable {
                index: 0,
                enable: true,
            }),
            R::SendRarp(MacAddr([0x52, 0x54, 0, 1, 2, 3])),
            R::NetSetMtu(U64(1500)),
            R::SetBackendReqFd { fd: null() },
            R::IotlbMsg(Iotlb {
                iova: 0x1000,
                size: 0x1000,
                uaddr: 0x7000,
                perm: IotlbPerm::ReadWrite,
                kind: IotlbType::Update,
            }),
            R::SetVringEndian(VringEndian {
                index: 0,
                big_endian: false,
            }),
            R::GetConfig(config()),
            R::SetConfig(config()),
            R::CreateCryptoSession(CryptoSession(vec![1; 100])),
            R::CloseCryptoSession(U64(3)),
            R::PostcopyAdvise,
            R::PostcopyListen,
            R::PostcopyEnd,
            R::GetInflightFd(inflight()),
            R::SetInflightFd {
                inflight: inflight(),
                fd: null(),
            },
            R::GpuSetSocket { fd: null() },
            R::ResetDevice,
            R::VringKick(VringState { index: 0, num: 0 }),
            R::GetMaxMemSlots,
            R::AddMemReg {
                region: region(0x20_0000, 0x1000),
                fd: null(),
            },
            R::RemMemReg(region(0x20_0000, 0x1000)),
            R::SetStatus(U64(0xf)),
            R::GetStatus,
            R::GetSharedObject(SharedObject { uuid: [9; 16] }),
            R::SetDeviceStateFd {
                transfer: DeviceStateTransfer {
                    direction: TransferDirection::Save,
                    phase: TransferPhase::Stopped,
                },
                fd: null(),
            },
            R::CheckDeviceState,
            R::GetShmemConfig,
        ]
    }

    /// One valid request of every back-end kind, in spec order.
    pub(super) fn backend_samples() -> Vec<BackendRequest> {
        use BackendRequest as R;
        let uuid = SharedObject { uuid: [1; 16] };
        vec![
            R::IotlbMsg(Iotlb {
                iova: 0x1000,
                size: 0,
                uaddr: 0,
                perm: IotlbPerm::Read,
                kind: IotlbType::Miss,
            }),
            R::ConfigChangeMsg,
            R::VringHostNotifierMsg {
                index: 1,
                size: 0x1000,
                offset: 0,
                fd: Some(null()),
            },
            R::VringCall(VringState { index: 0, num: 0 }),
            R::VringErr(VringState { index: 1, num: 0 }),
            R::SharedObjectAdd(uuid),
            R::SharedObjectRemove(uuid),
            R::SharedObjectLookup(uuid),
            R::ShmemMap {
                map: map(),
                fd: null(),
            },
            R::ShmemUnmap(map()),
        ]
    }

    #[test]
    fn every_frontend_request_round_trips_in_spec_order() {
        let samples = frontend_samples();
        assert_eq!(samples.len(), FrontendReq::ALL.len());
        for (sample, req) in samples.iter().zip(FrontendReq::ALL) {
            assert_eq!(sample.code(), req.code(), "{req}");
            let msg = wire(sample);
            let (header, body) = sample.encode(HeaderFlags::NEED_REPLY);
            let nfds = sample.fds().len();
            assert!(req.fd_rule().allows(nfds), "{req}");
            let decoded = FrontendRequest::decode(msg).unwrap();
            assert_eq!(
                decoded.encode(HeaderFlags::NEED_REPLY),
                (header, body),
                "{req}"
            );
            assert_eq!(decoded.fds().len(), nfds, "{req}");
        }
    }

    #[test]
    fn every_backend_request_round_trips_in_spec_order() {
        let samples = backend_samples();
        assert_eq!(samples.len(), BackendReq::ALL.len());
        for (sample, req) in samples.iter().zip(BackendReq::ALL) {
            assert_eq!(sample.code(), req.code(), "{req}");
            let (header, body) = sample.encode(HeaderFlags::empty());
            let nfds = sample.fds().len();
            let decoded = BackendRequest::decode(backend_wire(sample)).unwrap();
            assert_eq!(
                decoded.encode(HeaderFlags::empty()),
                (header, body),
                "{req}"
            );
            assert_eq!(decoded.fds().len(), nfds, "{req}");
        }
    }

    #[test]
    fn encode_sets_version_and_caller_flags() {
        let (header, body) =
            FrontendRequest::<OwnedFd>::GetFeatures.encode(HeaderFlags::NEED_REPLY);
        assert_eq!(header.to_bytes(), {
            let mut b = [0u8; 12];
            b[0..4].copy_from_slice(&1u32.to_ne_bytes());
            b[4..8].copy_from_slice(&9u32.to_ne_bytes());
            b
        });
        assert!(body.is_empty());
    }

    #[test]
    fn set_features_decodes_known_bytes() {
        let word = (1u64 << 32) | (1 << 30) | 1;
        let msg = raw(
            FrontendReq::SetFeatures,
            HeaderFlags::empty(),
            word.to_ne_bytes().to_vec(),
            vec![],
        );
        match FrontendRequest::decode(msg).unwrap() {
            FrontendRequest::SetFeatures(f) => assert_eq!(f.bits(), word),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_vring_kick_with_no_fd_bit_decodes_without_fd() {
        let msg = raw(
            FrontendReq::SetVringKick,
            HeaderFlags::empty(),
            0x102u64.to_ne_bytes().to_vec(),
            vec![],
        );
        match FrontendRequest::decode(msg).unwrap() {
            FrontendRequest::SetVringKick { index: 2, fd: None } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_vring_kick_fd_count_must_agree_with_no_fd_bit() {
        let msg = raw(
            FrontendReq::SetVringKick,
            HeaderFlags::empty(),
            0x102u64.to_ne_bytes().to_vec(),
            vec![null()],
        );
        let err = FrontendRequest::decode(msg).unwrap_err();
        assert_eq!(
            err.error,
            WireError::WrongFdCount {
                request: FrontendReq::SetVringKick.code(),
                min: 0,
                max: 0,
                actual: 1
            }
        );
        let msg = raw(
            FrontendReq::SetVringCall,
            HeaderFlags::empty(),
            2u64.to_ne_bytes().to_vec(),
            vec![],
        );
        assert!(matches!(
            FrontendRequest::decode(msg).unwrap_err().error,
            WireError::WrongFdCount {
                min: 1,
                max: 1,
                actual: 0,
                ..
            }
        ));
    }

    #[test]
    fn set_mem_table_needs_one_fd_per_region() {
        let sample = &frontend_samples()[4];
        let mut msg = wire(sample);
        msg.fds.pop();
        assert!(matches!(
            FrontendRequest::decode(msg).unwrap_err().error,
            WireError::WrongFdCount {
                min: 2,
                max: 2,
                actual: 1,
                ..
            }
        ));
    }

    #[test]
    fn more_fds_than_max_fds_is_refused_by_the_rule() {
        let mut msg = wire(&frontend_samples()[4]);
        msg.fds = (0..9).map(|_| null()).collect();
        assert!(matches!(
            FrontendRequest::decode(msg).unwrap_err().error,
            WireError::WrongFdCount {
                min: 1,
                max: 8,
                actual: 9,
                ..
            }
        ));
    }

    #[test]
    fn fd_on_a_request_without_fds_is_refused() {
        let msg = raw(
            FrontendReq::GetFeatures,
            HeaderFlags::empty(),
            vec![],
            vec![null()],
        );
        let err = FrontendRequest::decode(msg).unwrap_err();
        assert_eq!(err.header.request, FrontendReq::GetFeatures.code());
        assert!(matches!(
            err.error,
            WireError::WrongFdCount {
                max: 0,
                actual: 1,
                ..
            }
        ));
    }

    #[test]
    fn missing_fd_is_refused() {
        for req in [
            FrontendReq::SetLogFd,
            FrontendReq::SetBackendReqFd,
            FrontendReq::GpuSetSocket,
        ] {
            let msg = raw(req, HeaderFlags::empty(), vec![], vec![]);
            assert!(
                matches!(
                    FrontendRequest::decode(msg).unwrap_err().error,
                    WireError::WrongFdCount {
                        min: 1,
                        actual: 0,
                        ..
                    }
                ),
                "{req}"
            );
        }
    }

    #[test]
    fn fds_of_a_refused_message_are_closed() {
        let (kept, sent) = UnixStream::pair().unwrap();
        // A valid body with a wrong fd count: the fd must not outlive the error.
        let msg = raw(
            FrontendReq::SetOwner,
            HeaderFlags::empty(),
            vec![],
            vec![sent.into()],
        );
        assert!(FrontendRequest::decode(msg).is_err());
        let mut buf = [0u8; 1];
        assert_eq!((&kept).read(&mut buf).unwrap(), 0, "peer end closed");
    }

    #[test]
    fn rem_mem_reg_accepts_and_closes_a_stray_fd() {
        let (kept, sent) = UnixStream::pair().unwrap();
        let mut msg = wire(&frontend_samples()[37]);
        msg.fds = vec![sent.into()];
        assert!(matches!(
            FrontendRequest::decode(msg).unwrap(),
            FrontendRequest::RemMemReg(_)
        ));
        let mut buf = [0u8; 1];
        assert_eq!((&kept).read(&mut buf).unwrap(), 0, "peer end closed");
    }

    #[test]
    fn wrong_size_names_the_request() {
        let msg = raw(
            FrontendReq::SetVringNum,
            HeaderFlags::empty(),
            vec![0; 4],
            vec![],
        );
        assert_eq!(
            FrontendRequest::decode(msg).unwrap_err().error,
            WireError::WrongSize {
                request: FrontendReq::SetVringNum.code(),
                min: 8,
                max: 8,
                actual: 4
            }
        );
    }

    #[test]
    fn unknown_request_is_kept_for_a_refusal() {
        let msg = raw(
            RequestCode(99),
            HeaderFlags::NEED_REPLY,
            vec![1, 2, 3],
            vec![null()],
        );
        match FrontendRequest::decode(msg).unwrap() {
            FrontendRequest::Unknown { code, flags } => {
                assert_eq!(code, RequestCode(99));
                assert!(flags.contains(HeaderFlags::NEED_REPLY));
            }
            other => panic!("{other:?}"),
        }
        let msg = raw(RequestCode(11), HeaderFlags::empty(), vec![], vec![]);
        assert!(matches!(
            BackendRequest::decode(msg).unwrap(),
            BackendRequest::Unknown { .. }
        ));
    }

    #[test]
    fn borrowed_fds_can_be_sent_without_dup() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let req = FrontendRequest::SetLogFd { fd: file.as_fd() };
        assert_eq!(req.fds().len(), 1);
        assert_eq!(req.encode(HeaderFlags::empty()).0.size, 0);
    }

    #[test]
    fn host_notifier_fd_count_must_agree_with_no_fd_bit() {
        let mut msg = backend_wire(&backend_samples()[2]);
        msg.fds.clear();
        assert!(matches!(
            BackendRequest::decode(msg).unwrap_err().error,
            WireError::WrongFdCount {
                min: 1,
                max: 1,
                actual: 0,
                ..
            }
        ));
    }

    #[test]
    fn reply_decodes_payload_and_fd() {
        let (header, body) = encode_reply(
            &Header::new(FrontendReq::GetInflightFd, HeaderFlags::empty(), 24),
            &inflight(),
        );
        let msg = RawMessage {
            header,
            body,
            fds: vec![null()],
        };
        let reply = decode_reply::<Inflight>(FrontendReq::GetInflightFd, msg).unwrap();
        assert_eq!(reply.payload, inflight());
        assert!(reply.fd.is_some());
    }

    #[test]
    fn reply_without_reply_flag_is_refused() {
        let msg = raw(
            FrontendReq::GetFeatures,
            HeaderFlags::empty(),
            vec![0; 8],
            vec![],
        );
        assert!(matches!(
            decode_reply::<U64>(FrontendReq::GetFeatures, msg)
                .unwrap_err()
                .error,
            WireError::NotAReply { .. }
        ));
    }

    #[test]
    fn reply_to_another_request_is_refused() {
        let msg = raw(
            FrontendReq::GetQueueNum,
            HeaderFlags::REPLY,
            vec![0; 8],
            vec![],
        );
        assert_eq!(
            decode_reply::<U64>(FrontendReq::GetFeatures, msg)
                .unwrap_err()
                .error,
            WireError::ReplyMismatch {
                expected: FrontendReq::GetFeatures.code(),
                actual: FrontendReq::GetQueueNum.code()
            }
        );
    }

    #[test]
    fn reply_fd_is_refused_where_the_rule_has_none() {
        let msg = raw(
            FrontendReq::GetFeatures,
            HeaderFlags::REPLY,
            vec![0; 8],
            vec![null()],
        );
        assert!(matches!(
            decode_reply::<U64>(FrontendReq::GetFeatures, msg)
                .unwrap_err()
                .error,
            WireError::WrongFdCount { max: 0, .. }
        ));
    }

    #[test]
    fn device_state_reply_fd_must_agree_with_no_fd_bit() {
        let reply = DeviceStateFdReply {
            error: 0,
            no_fd: true,
        };
        let msg = raw(
            FrontendReq::SetDeviceStateFd,
            HeaderFlags::REPLY,
            reply.to_vec(),
            vec![null()],
        );
        assert!(decode_reply::<DeviceStateFdReply>(FrontendReq::SetDeviceStateFd, msg).is_err());
        let msg = raw(
            FrontendReq::SetDeviceStateFd,
            HeaderFlags::REPLY,
            reply.to_vec(),
            vec![],
        );
        let ok = decode_reply::<DeviceStateFdReply>(FrontendReq::SetDeviceStateFd, msg).unwrap();
        assert!(ok.fd.is_none());
    }

    #[test]
    fn postcopy_mem_table_reply_carries_no_fds() {
        let table = MemoryTable {
            regions: vec![region(0, 0x1000)],
        };
        let msg = raw(
            FrontendReq::SetMemTable,
            HeaderFlags::REPLY,
            table.to_vec(),
            vec![],
        );
        let reply = decode_reply::<MemoryTable>(FrontendReq::SetMemTable, msg).unwrap();
        assert_eq!(reply.payload, table);
    }

    #[test]
    fn get_config_empty_reply_is_failure() {
        let msg = raw(FrontendReq::GetConfig, HeaderFlags::REPLY, vec![], vec![]);
        let reply = decode_reply::<ConfigReply>(FrontendReq::GetConfig, msg).unwrap();
        assert_eq!(reply.payload, ConfigReply::Failed);
    }

    #[test]
    fn backend_lookup_reply_may_carry_an_fd() {
        let msg = raw(
            BackendReq::SharedObjectLookup,
            HeaderFlags::REPLY,
            vec![0; 8],
            vec![null()],
        );
        let reply = decode_reply::<U64>(BackendReq::SharedObjectLookup, msg).unwrap();
        assert!(reply.fd.is_some());
    }

    /// xorshift64*: a small deterministic generator for the no-panic test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> usize {
            usize::try_from(self.next() % n).unwrap()
        }
    }

    #[test]
    fn random_and_mutated_messages_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let front: Vec<_> = frontend_samples()
            .iter()
            .map(|s| s.encode(HeaderFlags::empty()))
            .collect();
        let back: Vec<_> = backend_samples()
            .iter()
            .map(|s| s.encode(HeaderFlags::empty()))
            .collect();
        let base = null();
        let (mut ok, mut err) = (0, 0);
        for case in 0..6000 {
            // Header bytes: random words must never panic the header parser.
            let mut hb = [0u8; Header::SIZE];
            for b in hb.iter_mut() {
                *b = rng.next() as u8;
            }
            let _ = Header::read(&hb);

            let backend = case % 4 == 3;
            let pool = if backend { &back } else { &front };
            let (mut header, mut body) = pool[rng.below(pool.len() as u64)].clone();
            match rng.below(4) {
                // Flip a few bytes.
                0 | 1 => {
                    for _ in 0..=rng.below(4) {
                        if !body.is_empty() {
                            let at = rng.below(body.len() as u64);
                            body[at] = rng.next() as u8;
                        }
                    }
                }
                // Truncate or extend.
                2 => body.resize(rng.below(body.len() as u64 + 16), rng.next() as u8),
                // Entirely random body and request code.
                _ => {
                    header.request = RequestCode(rng.below(48) as u32);
                    body = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
                }
            }
            header.size = body.len() as u32;
            if rng.below(4) == 0 {
                header.flags |= HeaderFlags::REPLY;
            }
            let fds = (0..rng.below(10))
                .map(|_| base.try_clone().unwrap())
                .collect();
            let msg = RawMessage { header, body, fds };
            let result = if backend {
                BackendRequest::decode(msg)
                    .map(|r| r.encode(HeaderFlags::empty()))
                    .map(drop)
            } else if rng.below(3) == 0 {
                let code =
                    FrontendReq::try_from(header.request).unwrap_or(FrontendReq::GetFeatures);
                decode_reply::<DeviceStateFdReply>(code, msg).map(drop)
            } else {
                FrontendRequest::decode(msg)
                    .map(|r| r.encode(HeaderFlags::empty()))
                    .map(drop)
            };
            match result {
                Ok(()) => ok += 1,
                Err(_) => err += 1,
            }
        }
        assert!(
            ok > 100 && err > 100,
            "both paths exercised: {ok} ok, {err} err"
        );
    }
}
