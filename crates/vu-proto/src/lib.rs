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
