//! The vhost-user wire protocol.
//!
//! (Crate documentation: to be completed with the codec.)

#![deny(clippy::unwrap_used)]

pub mod wire;
pub mod header;
pub mod request;
pub mod features;
pub mod payload;
pub mod message;
pub mod socket;
pub mod listener;
pub mod frontend;
pub mod backend;

pub use features::{check_subset, ProtocolFeatures, VirtioFeatures};
pub use header::{Header, HeaderFlags, MAX_FDS, MAX_PAYLOAD_SIZE};
pub use message::{
    decode_reply, encode_reply, BackendRequest, DecodeError, FrontendRequest, RawMessage, Reply,
};
pub use payload::Payload;
pub use request::{BackendReq, FdRule, FrontendReq, ReplyRule, Request, RequestCode};
pub use wire::{Reader, WireError};
