//! The errors of the daemon: [`SessionError`], why the session refused a frontend request.
//!
//! What a refusal means for the frontend (an ack failure, an error reply, or closing the
//! connection) is decided in one place, the session's `refuse`, which also logs it once.

use std::io;

use vu_mem::{IotlbError, MemError};
use vu_proto::features::ProtocolFeatures;
use vu_proto::request::{FrontendReq, RequestCode};
use vu_proto::DecodeError;

/// Why the session refused a frontend request.
///
/// Every variant names the request and the value that was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The message's body or fds do not match what its request code requires.
    #[error(transparent)]
    Malformed(#[from] DecodeError),
    /// The message has the REPLY flag: the frontend sends requests, not replies.
    #[error("{request} arrived with the REPLY flag set")]
    ReplyFromFrontend {
        /// The request code of the message.
        request: RequestCode,
    },
    /// A request code this backend does not know.
    #[error("unknown {code}")]
    UnknownRequest {
        /// The code the frontend sent.
        code: RequestCode,
    },
    /// A request that needs a protocol feature the frontend has not acknowledged.
    #[error("{request} needs protocol feature {feature:?}, which was not negotiated")]
    NotNegotiated {
        /// The refused request.
        request: FrontendReq,
        /// The protocol feature it needs.
        feature: ProtocolFeatures,
    },
    /// A protocol-features request although the backend does not offer
    /// `VHOST_USER_F_PROTOCOL_FEATURES`, or a request that needs that bit negotiated.
    #[error("{request} needs VHOST_USER_F_PROTOCOL_FEATURES, which was not negotiated")]
    ProtocolFeaturesNotNegotiated {
        /// The refused request.
        request: FrontendReq,
    },
    /// `SET_PROTOCOL_FEATURES` acknowledged bits the backend did not offer.
    #[error("acknowledged protocol features {acked:#x} are not a subset of the offered {offered:#x} (extra {:#x})", acked & !offered)]
    UnofferedProtocolFeatures {
        /// The offered features.
        offered: u64,
        /// The acknowledged features.
        acked: u64,
    },
    /// A queue index at or above the number of queues (checked as the full 32-bit value).
    #[error("{request}: queue index {index} is out of range (the device has {num_queues} queues)")]
    QueueIndex {
        /// The refused request.
        request: FrontendReq,
        /// The index the frontend sent.
        index: u32,
        /// The number of queues of the device.
        num_queues: usize,
    },
    /// A kick, call or error fd that is not an eventfd. A pipe whose writer closed, for
    /// example, would be readable forever and spin the worker; a socket or file would fail
    /// the device's writes.
    #[error("{request}: queue {queue}: the fd is not an eventfd (it is {kind})")]
    NotAnEventfd {
        /// The refused request.
        request: FrontendReq,
        /// The queue.
        queue: u16,
        /// What the fd is: its file type, device and inode.
        kind: String,
    },
    /// A queue size that does not fit in 16 bits (the vring refuses other bad sizes).
    #[error("{request}: queue {queue}: size {size} is out of range")]
    QueueSize {
        /// The refused request.
        request: FrontendReq,
        /// The queue index.
        queue: u16,
        /// The size the frontend sent.
        size: u32,
    },
    /// A vring refused the value (size, ring alignment, ring memory).
    #[error("{request}: queue {queue}: {source}")]
    Vring {
        /// The refused request.
        request: FrontendReq,
        /// The queue index.
        queue: u16,
        /// What the vring reported.
        #[source]
        source: vu_vring::Error,
    },
    /// The memory manager refused a table change, a translation or a log.
    #[error("{request}: {source}")]
    Memory {
        /// The refused request.
        request: FrontendReq,
        /// What vu-mem reported.
        #[source]
        source: MemError,
    },
    /// The device IOTLB refused an update or invalidation.
    #[error("{request}: {source}")]
    Iotlb {
        /// The refused request.
        request: FrontendReq,
        /// What vu-mem reported.
        #[source]
        source: IotlbError,
    },
    /// The backend (device) reported an error.
    #[error("{request}: the backend failed: {source}")]
    Backend {
        /// The request being handled.
        request: FrontendReq,
        /// What the backend reported.
        #[source]
        source: io::Error,
    },
    /// The runtime could not watch, unwatch or quiesce a queue.
    #[error("{request}: queue {queue}: ring control failed: {source}")]
    RingControl {
        /// The request being handled.
        request: FrontendReq,
        /// The queue index.
        queue: u16,
        /// What the runtime reported.
        #[source]
        source: io::Error,
    },
    /// A system call of the session itself (memfd, eventfd, mmap) failed.
    #[error("{request}: {what} failed: {source}")]
    Io {
        /// The request being handled.
        request: FrontendReq,
        /// The operation that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A request this backend refuses, with the reason.
    #[error("{request} is not supported: {reason}")]
    Unsupported {
        /// The refused request.
        request: FrontendReq,
        /// Why.
        reason: &'static str,
    },
    /// `GET_INFLIGHT_FD`/`SET_INFLIGHT_FD` with a queue count or queue size beyond the device's.
    #[error("inflight area for {num_queues} queues of size {queue_size} is out of range (device: {max_queues} queues of at most {max_size})")]
    InflightRange {
        /// The number of queues the frontend sent.
        num_queues: u16,
        /// The queue size the frontend sent.
        queue_size: u16,
        /// The device's number of queues.
        max_queues: usize,
        /// The device's maximum queue size.
        max_size: usize,
    },
    /// `SET_INFLIGHT_FD` describes an area smaller than its queues need.
    #[error(
        "inflight area of {size:#x} bytes is smaller than the {needed:#x} bytes its queues need"
    )]
    InflightTooSmall {
        /// The size the frontend sent.
        size: u64,
        /// The size the layout needs.
        needed: u64,
    },
    /// The inflight area, or a queue's region of it, was refused.
    #[error("{request}: inflight area: {source}")]
    Inflight {
        /// The request.
        request: FrontendReq,
        /// What is wrong with it.
        #[source]
        source: vu_vring::InflightError,
    },
    /// Acknowledged protocol features that the spec forbids together; the spec asks the
    /// backend to close the connection.
    #[error("protocol features {acked:#x}: {reason}")]
    FeatureCombination {
        /// The acknowledged protocol features.
        acked: u64,
        /// Which combination is wrong.
        reason: &'static str,
    },
    /// The fd of `SET_BACKEND_REQ_FD` is not a usable socket.
    #[error("{request}: {source}")]
    Socket {
        /// The request being handled.
        request: FrontendReq,
        /// What the socket layer reported.
        #[source]
        source: vu_proto::socket::SocketError,
    },
    /// The backend returned a config space read of another size than asked for.
    #[error("GET_CONFIG at offset {offset}: {requested} bytes asked for, the backend returned {returned}")]
    ConfigSize {
        /// The offset asked for.
        offset: u32,
        /// The size asked for.
        requested: usize,
        /// The size the backend returned.
        returned: usize,
    },
    /// A value outside the range the request allows (for example a vring base above 16 bits).
    #[error("{request}: {field} {value:#x} is out of range")]
    ValueOutOfRange {
        /// The refused request.
        request: FrontendReq,
        /// Which field.
        field: &'static str,
        /// The value the frontend sent.
        value: u64,
    },
    /// A postcopy step failed.
    #[cfg(feature = "postcopy")]
    #[error("{request}: {source}")]
    Postcopy {
        /// The request being handled.
        request: FrontendReq,
        /// What failed.
        #[source]
        source: crate::postcopy::PostcopyError,
    },
}
