//! Shared test support for the vu workspace.
pub mod proto_support;
