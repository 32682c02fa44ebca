//! The codec: every message of the protocol as typed values, parsed from and encoded to
//! bytes. No I/O, no `unsafe` (forbidden below, so no future edit can add any), and no input
//! makes it panic.
//!
//! The modules are re-exported at the crate root ([`crate::header`], [`crate::request`],
//! [`crate::features`], [`crate::payload`], [`crate::message`], [`crate::wire`]); this tree
//! exists so the `forbid` covers every one of them and any module added beside them.

#![forbid(unsafe_code)]

pub mod features;
pub mod header;
pub mod message;
pub mod payload;
pub mod request;
pub mod wire;
