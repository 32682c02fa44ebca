//! The front-end side: [`Frontend`], a typed client that sends every front-end request
//! and checks its reply, and [`BackendReqHandler`] with [`handle_backend_request`], which
//! serve the requests a back-end sends over the back-end channel.
//!
//! [`Frontend`] is for front-end implementers and for tests of back-ends. It is a
//! wire-level client: it does not refuse a request whose feature was not negotiated
//! (a test may want to send it), except that it tracks `REPLY_ACK`. The spec: "When
//! the `VHOST_USER_PROTOCOL_F_REPLY_ACK` is negotiated, the front-end may set the
//! `need_reply` flag"; once [`Frontend::set_protocol_features`] has acknowledged
//! `REPLY_ACK`, every request that has no reply of its own is sent with NEED_REPLY and
//! the client waits for the back-end's `u64` status, a non-zero status being
//! [`FrontendError::Refused`].
//!
//! Every reply is checked: the REPLY flag, the request code, the payload (parsed with
//! the payload type's `read`) and the number of fds. After a [`FrontendError::Socket`],
//! [`FrontendError::UnexpectedReply`] or [`FrontendError::Wire`] the stream may be out
//! of step with the back-end; drop the connection.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use crate::features::{ProtocolFeatures, VirtioFeatures};
use crate::header::{Header, HeaderFlags, MAX_FDS, MAX_PAYLOAD_SIZE};
use crate::message::{decode_reply, DecodeError, FrontendRequest, Reply};
use crate::payload::{
    ConfigFlags, ConfigReply, CryptoSession, DeviceConfig, DeviceStateFdReply, DeviceStateTransfer,
    Inflight, Iotlb, Log, MacAddr, MemoryRegion, MemoryTable, Payload, SharedObject, ShmemConfig,
    SingleMemoryRegion, VringAddr, VringEnable, VringEndian, VringState, U64,
};
use crate::request::{FrontendReq, ReplyRule};
use crate::socket::{Endpoint, SocketError};
use crate::wire::{Reader, WireError};

mod backend_req;

pub use backend_req::{handle_backend_request, BackendReqHandler, HandleError, Handled, Refusal};

/// Why a [`Frontend`] request failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// Sending the request or receiving its reply failed.
    #[error("{request}: socket error: {source}")]
    Socket {
        /// The request being sent.
        request: FrontendReq,
        /// The socket failure.
        #[source]
        source: SocketError,
    },
    /// The message received in place of the reply lacks the REPLY flag or answers
    /// another request.
    #[error("{request}: unexpected reply (request {}, flags {:#x})", .header.request.0, .header.flags.bits())]
    UnexpectedReply {
        /// The request whose reply was awaited.
        request: FrontendReq,
        /// The header of the message received.
        header: Header,
    },
    /// The reply's payload or fd count is malformed.
    #[error("{request}: malformed reply: {source}")]
    Wire {
        /// The request whose reply was awaited.
        request: FrontendReq,
        /// What was wrong with the reply.
        #[source]
        source: WireError,
    },
    /// The back-end answered with a non-zero status (a REPLY_ACK status, or the status
    /// word of a request whose reply carries one).
    #[error("{request}: refused by the back-end with status {code:#x}")]
    Refused {
        /// The refused request.
        request: FrontendReq,
        /// The non-zero status.
        code: u64,
    },
    /// The back-end answered `GET_CONFIG` with an empty payload, which the spec makes
    /// its way of reporting an error.
    #[error("VHOST_USER_GET_CONFIG: the back-end could not read the config space")]
    ConfigUnavailable,
    /// The reply is well formed but does not answer what was asked (another vring,
    /// another config range, another memory region).
    #[error("{request}: reply does not match the request: {what}")]
    ReplyMismatch {
        /// The request whose reply was checked.
        request: FrontendReq,
        /// What differs.
        what: &'static str,
    },
    /// The caller's arguments cannot form a valid request; nothing was sent.
    #[error("{request}: invalid argument: {reason}")]
    InvalidArgument {
        /// The request that was not sent.
        request: FrontendReq,
        /// What is wrong with the arguments.
        reason: &'static str,
    },
}

/// The vring index of a `SET_VRING_KICK/CALL/ERR` message, which has 8 bits for it: "Bits
/// (0-7) of the payload contain the vring index."
fn fd_message_index(request: FrontendReq, index: u32) -> Result<u8> {
    u8::try_from(index).map_err(|_| FrontendError::InvalidArgument {
        request,
        reason: "the vring index of an fd message must be below 256",
    })
}

/// A payload read as a status word: an empty body is success (the form rust-vmm
/// vhost uses for replies that carry an fd), otherwise one `u64`, zero on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status(u64);

impl Payload for Status {
    const MIN_SIZE: usize = 0;
    const MAX_SIZE: usize = 8;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        if r.remaining() == 0 {
            Ok(Status(0))
        } else {
            Ok(Status(r.u64()?))
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_ne_bytes());
    }
}

/// A reply payload whose content is not used: the spec gives `SET_LOG_BASE` a reply
/// without saying what it holds (QEMU ignores it, rust-vmm echoes the log description).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ignored;

impl Payload for Ignored {
    const MIN_SIZE: usize = 0;
    const MAX_SIZE: usize = MAX_PAYLOAD_SIZE as usize;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.rest();
        Ok(Ignored)
    }
    fn encode(&self, _out: &mut Vec<u8>) {}
}

/// A typed vhost-user front-end client over an [`Endpoint`].
///
/// One method per front-end request, named after it. Methods take `&mut self`: a
/// request and its reply are one exchange. Set a reply timeout with
/// [`Frontend::set_reply_timeout`] so that a silent back-end becomes an error.
///
/// # Example
///
/// Setting up queue 0 of a back-end, as a VMM does, with no `unsafe`: the guest's RAM is a
/// shared file this process has mapped at `ram_user_addr`, the ring addresses are given in
/// that mapping, and the eventfds are lent with [`BorrowFd`](crate::fd::BorrowFd). The
/// `vu-backend` crate's documentation has the same path running end to end against a
/// back-end, guest memory from `vu_mem::SharedMemory`, a kick and the completion read back.
///
/// ```no_run
/// use std::fs::OpenOptions;
/// use std::os::fd::AsFd;
/// use std::time::Duration;
///
/// use vmm_sys_util::eventfd::EventFd;
/// use vu_proto::fd::BorrowFd;
/// use vu_proto::payload::{MemoryRegion, VringAddr, VringAddrFlags};
/// use vu_proto::{Frontend, ProtocolFeatures, VirtioFeatures};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let ram_user_addr: u64 = 0x7f00_0000_0000;
/// let mut fe = Frontend::connect("/run/vm/blk0.sock")?;
/// fe.set_reply_timeout(Some(Duration::from_secs(5)))?;
/// fe.set_owner()?;
/// let features = fe.get_features()? & (VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES);
/// let protocol = fe.get_protocol_features()?;
/// fe.set_protocol_features(protocol & ProtocolFeatures::REPLY_ACK)?;
/// fe.set_features(features)?;
///
/// // 1 GiB of guest RAM at guest address 0, shared with the back-end through its fd.
/// let ram = OpenOptions::new().read(true).write(true).open("/dev/shm/vm-ram")?;
/// fe.set_mem_table(&[MemoryRegion::new(0, 1 << 30, ram_user_addr, 0)], &[ram.as_fd()])?;
///
/// // Queue 0: 256 entries; the rings' addresses in this process's mapping.
/// fe.set_vring_num(0, 256)?;
/// fe.set_vring_addr(&VringAddr {
///     index: 0,
///     flags: VringAddrFlags::empty(),
///     descriptor: ram_user_addr + 0x1000,
///     available: ram_user_addr + 0x2000,
///     used: ram_user_addr + 0x3000,
///     log: 0,
/// })?;
/// fe.set_vring_base(0, 0)?;
/// let (kick, call) = (EventFd::new(0)?, EventFd::new(0)?);
/// fe.set_vring_call(0, Some(call.borrow_fd()))?;
/// fe.set_vring_kick(0, Some(kick.borrow_fd()))?;
/// fe.set_vring_enable(0, true)?;
/// // Post chains in the rings, then `kick.write(1)`; `call` becomes readable on completion.
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Frontend {
    endpoint: Endpoint,
    acked_protocol: ProtocolFeatures,
    postcopy_listening: bool,
}

type Result<T, E = FrontendError> = std::result::Result<T, E>;

impl Frontend {
    /// Wraps a connected endpoint. No protocol feature is considered negotiated yet.
    pub fn new(endpoint: Endpoint) -> Self {
        Frontend {
            endpoint,
            acked_protocol: ProtocolFeatures::empty(),
            postcopy_listening: false,
        }
    }

    /// Connects to a back-end listening at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, SocketError> {
        Endpoint::connect(path).map(Frontend::new)
    }

    /// The underlying endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Gives the endpoint back.
    pub fn into_endpoint(self) -> Endpoint {
        self.endpoint
    }

    /// Bounds how long a reply is awaited; `None` waits forever.
    pub fn set_reply_timeout(&self, timeout: Option<Duration>) -> Result<(), SocketError> {
        self.endpoint.set_read_timeout(timeout)
    }

    /// The protocol features acknowledged by the last successful
    /// [`Frontend::set_protocol_features`].
    pub fn acked_protocol_features(&self) -> ProtocolFeatures {
        self.acked_protocol
    }

    /// Whether requests without a reply of their own are sent with NEED_REPLY.
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol.contains(ProtocolFeatures::REPLY_ACK)
    }

    /// `VHOST_USER_GET_FEATURES`: the virtio features the back-end offers.
    pub fn get_features(&mut self) -> Result<VirtioFeatures> {
        let reply = self.call(FrontendReq::GetFeatures, &FrontendRequest::GetFeatures)?;
        Ok(reply.payload)
    }

    /// `VHOST_USER_SET_FEATURES`: acknowledges `features`.
    pub fn set_features(&mut self, features: VirtioFeatures) -> Result<()> {
        let msg = FrontendRequest::SetFeatures(features);
        self.command(FrontendReq::SetFeatures, &msg)
    }

    /// `VHOST_USER_SET_OWNER`: claims the back-end for this session.
    pub fn set_owner(&mut self) -> Result<()> {
        self.command(FrontendReq::SetOwner, &FrontendRequest::SetOwner)
    }

    /// `VHOST_USER_RESET_OWNER` (deprecated by the spec; for testing back-ends).
    pub fn reset_owner(&mut self) -> Result<()> {
        self.command(FrontendReq::ResetOwner, &FrontendRequest::ResetOwner)
    }

    /// `VHOST_USER_SET_MEM_TABLE`: `regions[i]` is mapped from `fds[i]`.
    ///
    /// There must be as many fds as regions, 1 to [`MAX_FDS`]. While postcopy is
    /// listening use [`Frontend::set_mem_table_postcopy`] instead.
    pub fn set_mem_table(
        &mut self,
        regions: &[MemoryRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let msg = Self::mem_table(regions, fds)?;
        if self.postcopy_listening {
            return Err(FrontendError::InvalidArgument {
                request: FrontendReq::SetMemTable,
                reason: "postcopy is listening: use set_mem_table_postcopy",
            });
        }
        self.command(FrontendReq::SetMemTable, &msg)
    }

    /// `VHOST_USER_SET_MEM_TABLE` while postcopy is listening: the back-end replies
    /// with the table holding its own mapping addresses in `user_addr`, which is
    /// returned after the front-end's acknowledgement (a `u64` zero) has been sent.
    pub fn set_mem_table_postcopy(
        &mut self,
        regions: &[MemoryRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<MemoryTable> {
        let request = FrontendReq::SetMemTable;
        let msg = Self::mem_table(regions, fds)?;
        let reply: Reply<MemoryTable> = self.call(request, &msg)?;
        let table = reply.payload;
        let same = table.regions.len() == regions.len()
            && table.regions.iter().zip(regions).all(|(got, sent)| {
                got.guest_phys_addr == sent.guest_phys_addr && got.memory_size == sent.memory_size
            });
        if !same {
            return Err(FrontendError::ReplyMismatch {
                request,
                what: "regions of the postcopy reply",
            });
        }
        self.postcopy_ack(request)?;
        Ok(table)
    }

    /// `VHOST_USER_SET_LOG_BASE`: the dirty log lives in `fd` at `log`. Waits for the
    /// back-end's reply, whose payload is ignored.
    pub fn set_log_base(&mut self, log: Log, fd: BorrowedFd<'_>) -> Result<()> {
        let msg = FrontendRequest::SetLogBase { log, fd };
        self.call::<Ignored>(FrontendReq::SetLogBase, &msg)
            .map(drop)
    }

    /// `VHOST_USER_SET_LOG_FD`: the eventfd signalled when the log changes.
    pub fn set_log_fd(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        self.command(FrontendReq::SetLogFd, &FrontendRequest::SetLogFd { fd })
    }

    /// `VHOST_USER_SET_VRING_NUM`: vring `index` has `num` descriptors.
    pub fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let msg = FrontendRequest::SetVringNum(VringState { index, num });
        self.command(FrontendReq::SetVringNum, &msg)
    }

    /// `VHOST_USER_SET_VRING_ADDR`: where the parts of a vring are (for a packed ring: the
    /// descriptor ring, the driver area as `available`, the device area as `used`).
    pub fn set_vring_addr(&mut self, addr: &VringAddr) -> Result<()> {
        let msg = FrontendRequest::SetVringAddr(*addr);
        self.command(FrontendReq::SetVringAddr, &msg)
    }

    /// `VHOST_USER_SET_VRING_BASE`: the next available index of vring `index`. For a packed
    /// ring: the avail position with its wrap counter in bit 15, and (as QEMU sends it) the
    /// used position with its wrap counter in bits 16-31.
    pub fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let msg = FrontendRequest::SetVringBase(VringState { index, num: base });
        self.command(FrontendReq::SetVringBase, &msg)
    }

    /// `VHOST_USER_GET_VRING_BASE`: stops vring `index` and returns its next available
    /// index (for a packed ring, the word [`set_vring_base`](Self::set_vring_base) takes).
    pub fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        let request = FrontendReq::GetVringBase;
        let msg = FrontendRequest::GetVringBase(VringState { index, num: 0 });
        let reply: Reply<VringState> = self.call(request, &msg)?;
        if reply.payload.index != index {
            return Err(FrontendError::ReplyMismatch {
                request,
                what: "vring index",
            });
        }
        Ok(reply.payload.num)
    }

    /// `VHOST_USER_SET_VRING_KICK`: the kick eventfd of vring `index`; `None` sets the
    /// invalid-fd bit (the back-end then polls, or uses in-band kicks).
    ///
    /// `index` is a `u32` like every other vring index of this client; the message has room
    /// for 8 bits, so an index above 255 is [`FrontendError::InvalidArgument`].
    pub fn set_vring_kick(&mut self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let index = fd_message_index(FrontendReq::SetVringKick, index)?;
        let msg = FrontendRequest::SetVringKick { index, fd };
        self.command(FrontendReq::SetVringKick, &msg)
    }

    /// `VHOST_USER_SET_VRING_CALL`: the call eventfd of vring `index`, or `None`.
    /// `index` as for [`set_vring_kick`](Self::set_vring_kick).
    pub fn set_vring_call(&mut self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let index = fd_message_index(FrontendReq::SetVringCall, index)?;
        let msg = FrontendRequest::SetVringCall { index, fd };
        self.command(FrontendReq::SetVringCall, &msg)
    }

    /// `VHOST_USER_SET_VRING_ERR`: the error eventfd of vring `index`, or `None`.
    /// `index` as for [`set_vring_kick`](Self::set_vring_kick).
    pub fn set_vring_err(&mut self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let index = fd_message_index(FrontendReq::SetVringErr, index)?;
        let msg = FrontendRequest::SetVringErr { index, fd };
        self.command(FrontendReq::SetVringErr, &msg)
    }

    /// `VHOST_USER_GET_PROTOCOL_FEATURES`: the protocol features the back-end offers.
    pub fn get_protocol_features(&mut self) -> Result<ProtocolFeatures> {
        let msg = FrontendRequest::GetProtocolFeatures;
        let reply = self.call(FrontendReq::GetProtocolFeatures, &msg)?;
        Ok(reply.payload)
    }

    /// `VHOST_USER_SET_PROTOCOL_FEATURES`: acknowledges `features`. The request itself
    /// follows the features negotiated before it; from the next request on, `REPLY_ACK`
    /// applies if `features` holds it.
    ///
    /// Protocol features exist only once the back-end has offered
    /// `VHOST_USER_F_PROTOCOL_FEATURES` in its `GET_FEATURES` reply, and back-ends (rust-vmm's
    /// among them) only acknowledge requests after seeing that offer: call
    /// [`Frontend::get_features`] first, or a request may wait for an ack that never comes.
    pub fn set_protocol_features(&mut self, features: ProtocolFeatures) -> Result<()> {
        let msg = FrontendRequest::SetProtocolFeatures(features);
        self.command(FrontendReq::SetProtocolFeatures, &msg)?;
        self.acked_protocol = features;
        Ok(())
    }

    /// `VHOST_USER_GET_QUEUE_NUM`: how many queues the back-end supports.
    pub fn get_queue_num(&mut self) -> Result<u64> {
        let reply: Reply<U64> =
            self.call(FrontendReq::GetQueueNum, &FrontendRequest::GetQueueNum)?;
        Ok(reply.payload.0)
    }

    /// `VHOST_USER_SET_VRING_ENABLE`: enables or disables vring `index`.
    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let msg = FrontendRequest::SetVringEnable(VringEnable { index, enable });
        self.command(FrontendReq::SetVringEnable, &msg)
    }

    /// `VHOST_USER_SEND_RARP`: asks a net back-end to announce `mac`.
    pub fn send_rarp(&mut self, mac: MacAddr) -> Result<()> {
        self.command(FrontendReq::SendRarp, &FrontendRequest::SendRarp(mac))
    }

    /// `VHOST_USER_NET_SET_MTU`: tells a net back-end the MTU.
    pub fn net_set_mtu(&mut self, mtu: u64) -> Result<()> {
        let msg = FrontendRequest::NetSetMtu(U64(mtu));
        self.command(FrontendReq::NetSetMtu, &msg)
    }

    /// `VHOST_USER_SET_BACKEND_REQ_FD`: hands the back-end the socket `fd` for its
    /// requests.
    pub fn set_backend_req_fd(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        let msg = FrontendRequest::SetBackendReqFd { fd };
        self.command(FrontendReq::SetBackendReqFd, &msg)
    }

    /// Makes a socket pair, hands one end to the back-end with
    /// `VHOST_USER_SET_BACKEND_REQ_FD` and returns the other, on which to serve the
    /// back-end's requests with [`handle_backend_request`].
    pub fn open_backend_channel(&mut self) -> Result<Endpoint> {
        let request = FrontendReq::SetBackendReqFd;
        let (ours, theirs) =
            Endpoint::pair().map_err(|source| FrontendError::Socket { request, source })?;
        self.set_backend_req_fd(std::os::fd::AsFd::as_fd(theirs.stream()))?;
        Ok(ours)
    }

    /// `VHOST_USER_IOTLB_MSG`: an IOTLB update or invalidation.
    pub fn iotlb_msg(&mut self, msg: &Iotlb) -> Result<()> {
        self.command(FrontendReq::IotlbMsg, &FrontendRequest::IotlbMsg(*msg))
    }

    /// `VHOST_USER_SET_VRING_ENDIAN`: the endianness of legacy vring `index`.
    pub fn set_vring_endian(&mut self, index: u32, big_endian: bool) -> Result<()> {
        let msg = FrontendRequest::SetVringEndian(VringEndian { index, big_endian });
        self.command(FrontendReq::SetVringEndian, &msg)
    }

    /// `VHOST_USER_GET_CONFIG`: reads `size` bytes of config space at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32, flags: ConfigFlags) -> Result<Vec<u8>> {
        let request = FrontendReq::GetConfig;
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        if len == 0 || len > crate::payload::MAX_CONFIG_SIZE as usize {
            return Err(FrontendError::InvalidArgument {
                request,
                reason: "config size must be 1..=MAX_CONFIG_SIZE",
            });
        }
        let msg = FrontendRequest::GetConfig(DeviceConfig {
            offset,
            flags,
            data: vec![0; len],
        });
        let reply: Reply<ConfigReply> = self.call(request, &msg)?;
        match reply.payload {
            ConfigReply::Failed => Err(FrontendError::ConfigUnavailable),
            ConfigReply::Config(c) if c.offset != offset || c.data.len() != len => {
                Err(FrontendError::ReplyMismatch {
                    request,
                    what: "config offset or size",
                })
            }
            ConfigReply::Config(c) => Ok(c.data),
        }
    }

    /// `VHOST_USER_SET_CONFIG`: writes `data` to config space at `offset`.
    pub fn set_config(&mut self, offset: u32, flags: ConfigFlags, data: &[u8]) -> Result<()> {
        let msg = FrontendRequest::SetConfig(DeviceConfig {
            offset,
            flags,
            data: data.to_vec(),
        });
        self.command(FrontendReq::SetConfig, &msg)
    }

    /// `VHOST_USER_CREATE_CRYPTO_SESSION`: returns the back-end's reply (the session
    /// description with its session id filled in).
    pub fn create_crypto_session(&mut self, session: &CryptoSession) -> Result<CryptoSession> {
        let msg = FrontendRequest::CreateCryptoSession(session.clone());
        let reply = self.call(FrontendReq::CreateCryptoSession, &msg)?;
        Ok(reply.payload)
    }

    /// `VHOST_USER_CLOSE_CRYPTO_SESSION`: closes session `session_id`.
    pub fn close_crypto_session(&mut self, session_id: u64) -> Result<()> {
        let msg = FrontendRequest::CloseCryptoSession(U64(session_id));
        self.command(FrontendReq::CloseCryptoSession, &msg)
    }

    /// `VHOST_USER_POSTCOPY_ADVISE`: returns the back-end's userfaultfd.
    pub fn postcopy_advise(&mut self) -> Result<OwnedFd> {
        let request = FrontendReq::PostcopyAdvise;
        let reply = self.status_call(request, &FrontendRequest::PostcopyAdvise)?;
        reply.ok_or(FrontendError::Wire {
            request,
            source: missing_fd(request),
        })
    }

    /// `VHOST_USER_POSTCOPY_LISTEN`: the back-end starts listening on its
    /// userfaultfd; memory table changes then use the postcopy variants.
    pub fn postcopy_listen(&mut self) -> Result<()> {
        self.command(
            FrontendReq::PostcopyListen,
            &FrontendRequest::PostcopyListen,
        )?;
        self.postcopy_listening = true;
        Ok(())
    }

    /// `VHOST_USER_POSTCOPY_END`: postcopy is over; waits for the back-end's status.
    pub fn postcopy_end(&mut self) -> Result<()> {
        let request = FrontendReq::PostcopyEnd;
        self.status_call(request, &FrontendRequest::PostcopyEnd)?;
        self.postcopy_listening = false;
        Ok(())
    }

    /// `VHOST_USER_GET_INFLIGHT_FD`: asks for an inflight buffer for `queues`;
    /// returns its description and fd.
    pub fn get_inflight_fd(&mut self, queues: &Inflight) -> Result<(Inflight, OwnedFd)> {
        let request = FrontendReq::GetInflightFd;
        let reply: Reply<Inflight> =
            self.call(request, &FrontendRequest::GetInflightFd(*queues))?;
        match reply.fd {
            Some(fd) => Ok((reply.payload, fd)),
            None => Err(FrontendError::Wire {
                request,
                source: missing_fd(request),
            }),
        }
    }

    /// `VHOST_USER_SET_INFLIGHT_FD`: hands the back-end the inflight buffer `fd`.
    pub fn set_inflight_fd(&mut self, inflight: &Inflight, fd: BorrowedFd<'_>) -> Result<()> {
        let msg = FrontendRequest::SetInflightFd {
            inflight: *inflight,
            fd,
        };
        self.command(FrontendReq::SetInflightFd, &msg)
    }

    /// `VHOST_USER_GPU_SET_SOCKET`: hands a GPU back-end its display socket.
    pub fn gpu_set_socket(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        self.command(
            FrontendReq::GpuSetSocket,
            &FrontendRequest::GpuSetSocket { fd },
        )
    }

    /// `VHOST_USER_RESET_DEVICE`.
    pub fn reset_device(&mut self) -> Result<()> {
        self.command(FrontendReq::ResetDevice, &FrontendRequest::ResetDevice)
    }

    /// `VHOST_USER_VRING_KICK`: an in-band kick of vring `index`.
    pub fn vring_kick(&mut self, index: u32) -> Result<()> {
        let msg = FrontendRequest::VringKick(VringState { index, num: 0 });
        self.command(FrontendReq::VringKick, &msg)
    }

    /// `VHOST_USER_GET_MAX_MEM_SLOTS`: how many memory regions the back-end takes.
    pub fn get_max_mem_slots(&mut self) -> Result<u64> {
        let msg = FrontendRequest::GetMaxMemSlots;
        let reply: Reply<U64> = self.call(FrontendReq::GetMaxMemSlots, &msg)?;
        Ok(reply.payload.0)
    }

    /// `VHOST_USER_ADD_MEM_REG`: adds `region`, mapped from `fd`.
    pub fn add_mem_reg(&mut self, region: &MemoryRegion, fd: BorrowedFd<'_>) -> Result<()> {
        if self.postcopy_listening {
            return Err(FrontendError::InvalidArgument {
                request: FrontendReq::AddMemReg,
                reason: "postcopy is listening: use add_mem_reg_postcopy",
            });
        }
        let msg = FrontendRequest::AddMemReg {
            region: *region,
            fd,
        };
        self.command(FrontendReq::AddMemReg, &msg)
    }

    /// `VHOST_USER_ADD_MEM_REG` while postcopy is listening: returns the region as the
    /// back-end mapped it (its own address in `user_addr`), after acknowledging it.
    pub fn add_mem_reg_postcopy(
        &mut self,
        region: &MemoryRegion,
        fd: BorrowedFd<'_>,
    ) -> Result<MemoryRegion> {
        let request = FrontendReq::AddMemReg;
        let msg = FrontendRequest::AddMemReg {
            region: *region,
            fd,
        };
        let reply: Reply<SingleMemoryRegion> = self.call(request, &msg)?;
        let got = reply.payload.region;
        if got.guest_phys_addr != region.guest_phys_addr || got.memory_size != region.memory_size {
            return Err(FrontendError::ReplyMismatch {
                request,
                what: "region of the postcopy reply",
            });
        }
        self.postcopy_ack(request)?;
        Ok(got)
    }

    /// `VHOST_USER_REM_MEM_REG`: removes `region` (sent without an fd).
    pub fn rem_mem_reg(&mut self, region: &MemoryRegion) -> Result<()> {
        let msg = FrontendRequest::RemMemReg(*region);
        self.command(FrontendReq::RemMemReg, &msg)
    }

    /// `VHOST_USER_SET_STATUS`: sets the virtio device status byte.
    pub fn set_status(&mut self, status: u8) -> Result<()> {
        let msg = FrontendRequest::SetStatus(U64(u64::from(status)));
        self.command(FrontendReq::SetStatus, &msg)
    }

    /// `VHOST_USER_GET_STATUS`: the virtio device status byte.
    pub fn get_status(&mut self) -> Result<u8> {
        let request = FrontendReq::GetStatus;
        let reply: Reply<U64> = self.call(request, &FrontendRequest::GetStatus)?;
        u8::try_from(reply.payload.0).map_err(|_| FrontendError::Wire {
            request,
            source: WireError::InvalidValue {
                field: "device status",
                value: reply.payload.0,
            },
        })
    }

    /// `VHOST_USER_GET_SHARED_OBJECT`: the fd of the object `uuid` exported by the
    /// back-end.
    pub fn get_shared_object(&mut self, uuid: &SharedObject) -> Result<OwnedFd> {
        let request = FrontendReq::GetSharedObject;
        let reply = self.status_call(request, &FrontendRequest::GetSharedObject(*uuid))?;
        reply.ok_or(FrontendError::Wire {
            request,
            source: missing_fd(request),
        })
    }

    /// `VHOST_USER_SET_DEVICE_STATE_FD`: starts a state transfer over `fd`. Returns
    /// the back-end's own pipe end if it gave one (the front-end then uses it instead).
    pub fn set_device_state_fd(
        &mut self,
        transfer: DeviceStateTransfer,
        fd: BorrowedFd<'_>,
    ) -> Result<Option<OwnedFd>> {
        let request = FrontendReq::SetDeviceStateFd;
        let msg = FrontendRequest::SetDeviceStateFd { transfer, fd };
        let reply: Reply<DeviceStateFdReply> = self.call(request, &msg)?;
        if reply.payload.error != 0 {
            return Err(FrontendError::Refused {
                request,
                code: u64::from(reply.payload.error),
            });
        }
        Ok(reply.fd)
    }

    /// `VHOST_USER_CHECK_DEVICE_STATE`: whether the last transfer succeeded.
    pub fn check_device_state(&mut self) -> Result<()> {
        let msg = FrontendRequest::CheckDeviceState;
        self.status_call(FrontendReq::CheckDeviceState, &msg)
            .map(drop)
    }

    /// `VHOST_USER_GET_SHMEM_CONFIG`: the back-end's shared memory region sizes.
    pub fn get_shmem_config(&mut self) -> Result<ShmemConfig> {
        let msg = FrontendRequest::GetShmemConfig;
        let reply = self.call(FrontendReq::GetShmemConfig, &msg)?;
        Ok(reply.payload)
    }

    /// Checks the arguments of a memory table and builds the request.
    fn mem_table<'a>(
        regions: &[MemoryRegion],
        fds: &[BorrowedFd<'a>],
    ) -> Result<FrontendRequest<BorrowedFd<'a>>> {
        let reason = if regions.is_empty() || regions.len() > MAX_FDS {
            Some("a memory table holds 1..=8 regions")
        } else if regions.len() != fds.len() {
            Some("one fd per region")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(FrontendError::InvalidArgument {
                request: FrontendReq::SetMemTable,
                reason,
            });
        }
        Ok(FrontendRequest::SetMemTable {
            table: MemoryTable {
                regions: regions.to_vec(),
            },
            fds: fds.to_vec(),
        })
    }

    /// Sends `msg` with `flags`.
    fn send(
        &self,
        request: FrontendReq,
        msg: &FrontendRequest<BorrowedFd<'_>>,
        flags: HeaderFlags,
    ) -> Result<()> {
        debug_assert_eq!(msg.code(), request.code());
        let (header, body) = msg.encode(flags);
        self.endpoint
            .send_message(&header, &body, &msg.fds())
            .map_err(|source| FrontendError::Socket { request, source })
    }

    /// Receives and checks the reply to `request`.
    fn recv_reply<T: Payload>(&self, request: FrontendReq) -> Result<Reply<T>> {
        let raw = self
            .endpoint
            .recv_message()
            .map_err(|source| FrontendError::Socket { request, source })?;
        decode_reply(request, raw).map_err(|e| reply_error(request, e))
    }

    /// Sends a request that always has a reply and returns the reply.
    fn call<T: Payload>(
        &mut self,
        request: FrontendReq,
        msg: &FrontendRequest<BorrowedFd<'_>>,
    ) -> Result<Reply<T>> {
        self.send(request, msg, HeaderFlags::empty())?;
        self.recv_reply(request)
    }

    /// Sends a request whose reply is a status word (possibly with an fd); a non-zero
    /// status is [`FrontendError::Refused`].
    fn status_call(
        &mut self,
        request: FrontendReq,
        msg: &FrontendRequest<BorrowedFd<'_>>,
    ) -> Result<Option<OwnedFd>> {
        let reply: Reply<Status> = self.call(request, msg)?;
        match reply.payload {
            Status(0) => Ok(reply.fd),
            Status(code) => Err(FrontendError::Refused { request, code }),
        }
    }

    /// Sends a request that has no reply of its own; with `REPLY_ACK` negotiated, sets
    /// NEED_REPLY and waits for the status.
    fn command(
        &mut self,
        request: FrontendReq,
        msg: &FrontendRequest<BorrowedFd<'_>>,
    ) -> Result<()> {
        debug_assert_ne!(request.reply_rule(), ReplyRule::Always);
        if !self.reply_ack() {
            return self.send(request, msg, HeaderFlags::empty());
        }
        self.send(request, msg, HeaderFlags::NEED_REPLY)?;
        let reply: Reply<U64> = self.recv_reply(request)?;
        match reply.payload {
            U64(0) => Ok(()),
            U64(code) => Err(FrontendError::Refused { request, code }),
        }
    }

    /// The front-end's acknowledgement of a postcopy memory reply: the same request
    /// code with a `u64` zero, as QEMU and rust-vmm send it.
    fn postcopy_ack(&self, request: FrontendReq) -> Result<()> {
        let body = U64(0).to_vec();
        let header = Header::new(request, HeaderFlags::empty(), U64::SIZE as u32);
        self.endpoint
            .send_message(&header, &body, &[])
            .map_err(|source| FrontendError::Socket { request, source })
    }
}

/// The error for a reply that should have carried an fd and did not.
fn missing_fd(request: FrontendReq) -> WireError {
    WireError::WrongFdCount {
        request: request.code(),
        min: 1,
        max: 1,
        actual: 0,
    }
}

/// Sorts a reply decode failure: the wrong message, or a malformed reply.
fn reply_error(request: FrontendReq, e: DecodeError) -> FrontendError {
    match e.error {
        WireError::NotAReply { .. } | WireError::ReplyMismatch { .. } => {
            FrontendError::UnexpectedReply {
                request,
                header: e.header,
            }
        }
        source => FrontendError::Wire { request, source },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::message::encode_reply;

    fn pair() -> (Frontend, Endpoint) {
        let (ours, theirs) = Endpoint::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let frontend = Frontend::new(ours);
        frontend
            .set_reply_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (frontend, theirs)
    }

    #[test]
    fn vring_fd_index_above_255_is_refused_before_sending() {
        let (mut fe, be) = pair();
        let err = fe.set_vring_kick(256, None).unwrap_err();
        assert!(matches!(
            err,
            FrontendError::InvalidArgument {
                request: FrontendReq::SetVringKick,
                ..
            }
        ));
        assert!(fe.set_vring_call(u32::MAX, None).is_err());
        assert!(fe.set_vring_err(300, None).is_err());
        // Nothing reached the back-end: the next message it reads is this one.
        fe.set_vring_call(255, None).unwrap();
        let raw = be.recv_message().unwrap();
        assert!(matches!(
            FrontendRequest::decode(raw).unwrap(),
            FrontendRequest::SetVringCall {
                index: 255,
                fd: None
            }
        ));
    }

    #[test]
    fn status_payload_reads_empty_as_success() {
        assert_eq!(
            Status::decode_body(FrontendReq::GetStatus.code(), &[]),
            Ok(Status(0))
        );
        assert_eq!(
            Status::decode_body(FrontendReq::GetStatus.code(), &3u64.to_ne_bytes()),
            Ok(Status(3))
        );
    }

    #[test]
    fn get_features_parses_the_reply() {
        let (mut fe, be) = pair();
        let peer = std::thread::spawn(move || {
            let raw = be.recv_message().unwrap();
            let header = raw.header;
            assert!(matches!(
                FrontendRequest::decode(raw).unwrap(),
                FrontendRequest::GetFeatures
            ));
            let (h, b) = encode_reply(&header, &VirtioFeatures::VERSION_1);
            be.send_message(&h, &b, &[]).unwrap();
        });
        assert_eq!(fe.get_features().unwrap(), VirtioFeatures::VERSION_1);
        peer.join().unwrap();
    }

    #[test]
    fn reply_without_reply_flag_is_unexpected() {
        let (mut fe, be) = pair();
        let peer = std::thread::spawn(move || {
            let raw = be.recv_message().unwrap();
            let body = 1u64.to_ne_bytes();
            let h = Header::new(raw.header.request, HeaderFlags::empty(), 8);
            be.send_message(&h, &body, &[]).unwrap();
        });
        assert!(matches!(
            fe.get_queue_num(),
            Err(FrontendError::UnexpectedReply {
                request: FrontendReq::GetQueueNum,
                ..
            })
        ));
        peer.join().unwrap();
    }

    #[test]
    fn mem_table_with_fewer_fds_than_regions_is_not_sent() {
        let (mut fe, _be) = pair();
        let region = crate::payload::memory::tests::region(0, 0x1000);
        assert!(matches!(
            fe.set_mem_table(&[region], &[]),
            Err(FrontendError::InvalidArgument { .. })
        ));
    }
}
