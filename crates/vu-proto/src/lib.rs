//! The vhost-user wire protocol: a codec for every message, a socket endpoint that
//! passes fds, and typed channels for both ends of a connection.
//!
//! # What this crate is
//!
//! - **The codec** ([`header`], [`request`], [`features`], [`payload`], [`message`],
//!   [`wire`]): every request of the spec in both directions, parsed once into typed
//!   values ([`FrontendRequest`], [`BackendRequest`], [`Reply`]) and encoded back. It
//!   does no I/O, contains no `unsafe`, and no input makes it panic: a malformed
//!   message is a [`DecodeError`] naming the request and what was wrong.
//! - **The socket** ([`socket::Endpoint`], [`listener::Listener`]): whole messages
//!   over a Unix stream socket with their fds (`SCM_RIGHTS`); a received fd is an
//!   `OwnedFd` at once, and a message with the wrong number of fds is refused and its
//!   fds closed.
//! - **The front-end side** ([`frontend`]): [`frontend::Frontend`], a client with one
//!   method per front-end request that handles `REPLY_ACK` and checks every reply, and
//!   [`frontend::handle_backend_request`], which serves the back-end channel through a
//!   [`frontend::BackendReqHandler`].
//! - **The back-end side** ([`backend`]): [`backend::BackendChannel`], the shareable
//!   sender of back-end requests (config change, in-band calls, IOTLB misses, shared
//!   objects, shared memory maps).
//!
//! # What it is not
//!
//! It keeps no session state beyond what a channel needs for `REPLY_ACK`: which
//! request is legal when, what a memory table means and how vrings run are the
//! business of `vu-daemon`, `vu-mem` and `vu-vring`. It maps no memory and spawns no
//! threads. [`frontend::Frontend`] does not enforce feature negotiation (a test may
//! want to send what a real front-end would not).
//!
//! # Order of calls
//!
//! A back-end: [`listener::Listener::bind`] and [`listener::Listener::accept`] (or
//! [`socket::Endpoint::from_fd`] for an inherited socket) give an
//! [`socket::Endpoint`]; then, for each message, [`socket::Endpoint::recv_message`] →
//! [`FrontendRequest::decode`] → handle the request → [`encode_reply`] →
//! [`socket::Endpoint::send_message`] when the request has a reply, or a `u64` status
//! when the front-end set NEED_REPLY under `REPLY_ACK`. When `SET_BACKEND_REQ_FD`
//! arrives, [`backend::BackendChannel::from_fd`] wraps its fd, told the negotiated
//! [`ProtocolFeatures`].
//!
//! A front-end: [`frontend::Frontend::connect`] → `get_features` → `set_owner` →
//! `set_features` → `get_protocol_features` → `set_protocol_features` (from here on
//! `REPLY_ACK` applies if acknowledged) → `get_queue_num`, `get_config`, … →
//! `set_mem_table` → for each vring: `set_vring_num`, `set_vring_addr`,
//! `set_vring_base`, `set_vring_kick`, `set_vring_call`, `set_vring_enable` → … →
//! `get_vring_base` to stop a vring. With `BACKEND_REQ`,
//! [`frontend::Frontend::open_backend_channel`] hands the back-end its channel and
//! [`frontend::handle_backend_request`] serves it.
//!
//! # Example
//!
//! A front-end doing the handshake with a tiny back-end, written with the codec, on
//! the other end of a socket pair:
//!
//! ```
//! use vu_proto::frontend::Frontend;
//! use vu_proto::payload::{VringState, U64};
//! use vu_proto::socket::{Endpoint, SocketError};
//! use vu_proto::{encode_reply, FrontendRequest, ProtocolFeatures, VirtioFeatures};
//!
//! type BoxError = Box<dyn std::error::Error + Send + Sync>;
//! # fn main() -> Result<(), BoxError> {
//! let (frontend_end, backend_end) = Endpoint::pair()?;
//!
//! // The back-end: receive, decode, answer what has a reply, ack under REPLY_ACK.
//! let backend = std::thread::spawn(move || -> Result<(), BoxError> {
//!     let offered = VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES;
//!     let mut acked = ProtocolFeatures::empty();
//!     loop {
//!         let raw = match backend_end.recv_message() {
//!             Ok(raw) => raw,
//!             Err(SocketError::Disconnected) => return Ok(()),
//!             Err(e) => return Err(e.into()),
//!         };
//!         let header = raw.header;
//!         let (reply_header, body) = match FrontendRequest::decode(raw)? {
//!             FrontendRequest::GetFeatures => encode_reply(&header, &offered),
//!             FrontendRequest::GetProtocolFeatures => {
//!                 encode_reply(&header, &(ProtocolFeatures::REPLY_ACK | ProtocolFeatures::MQ))
//!             }
//!             FrontendRequest::GetQueueNum => encode_reply(&header, &U64(1)),
//!             FrontendRequest::GetVringBase(state) => {
//!                 encode_reply(&header, &VringState { index: state.index, num: 0 })
//!             }
//!             FrontendRequest::SetProtocolFeatures(features) => {
//!                 acked = features;
//!                 continue;
//!             }
//!             _ if header.needs_reply() && acked.contains(ProtocolFeatures::REPLY_ACK) => {
//!                 encode_reply(&header, &U64::ACK_SUCCESS)
//!             }
//!             _ => continue,
//!         };
//!         backend_end.send_message(&reply_header, &body, &[])?;
//!     }
//! });
//!
//! // The front-end.
//! let mut frontend = Frontend::new(frontend_end);
//! frontend.set_reply_timeout(Some(std::time::Duration::from_secs(10)))?;
//! let features = frontend.get_features()?;
//! frontend.set_owner()?;
//! frontend.set_features(features)?;
//! let protocol = frontend.get_protocol_features()?;
//! frontend.set_protocol_features(protocol)?;
//! assert!(frontend.reply_ack());
//! assert_eq!(frontend.get_queue_num()?, 1);
//! frontend.set_vring_num(0, 256)?; // waits for the back-end's ack
//! assert_eq!(frontend.get_vring_base(0)?, 0);
//!
//! drop(frontend);
//! backend.join().expect("back-end thread")?;
//! # Ok(())
//! # }
//! ```

#![deny(clippy::unwrap_used)]
// `unsafe` is allowed in `sys` alone (raw system calls behind safe wrappers); the codec
// forbids it outright.
#![deny(unsafe_code)]

pub mod backend;
mod codec;
// Lends the fds of vmm-sys-util's fd-owning types; its one `unsafe` block is justified per type.
#[allow(unsafe_code)]
pub mod fd;
pub mod frontend;
/// Fuzz target bodies (see `tests/fuzz`); not part of the API.
#[doc(hidden)]
pub mod fuzzing;
pub mod listener;
pub mod socket;
#[allow(unsafe_code)]
mod sys;

pub use codec::{features, header, message, payload, request, wire};

pub use backend::{BackendChannel, ChannelError};
pub use fd::BorrowFd;
pub use features::{check_subset, ProtocolFeatures, VirtioFeatures};
pub use frontend::{Frontend, FrontendError};
pub use header::{Header, HeaderFlags, MAX_FDS, MAX_PAYLOAD_SIZE};
pub use message::{
    decode_reply, encode_reply, BackendRequest, DecodeError, FrontendRequest, RawMessage, Reply,
};
pub use payload::Payload;
pub use request::{BackendReq, FdRule, FrontendReq, ReplyRule, Request, RequestCode};
pub use wire::{Reader, WireError};
