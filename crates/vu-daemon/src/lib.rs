//! vu-daemon: being written; see the crate description.

#![deny(clippy::unwrap_used)]

#[cfg(all(feature = "xen", feature = "postcopy"))]
compile_error!("the `xen` and `postcopy` features are mutually exclusive: Xen mappings cannot be registered with userfaultfd");

pub mod backend;
pub mod error;
mod control;
mod session;
pub mod epoll;
mod worker;
pub mod daemon;
#[cfg(feature = "postcopy")]
mod postcopy;
#[cfg(feature = "postcopy")]
pub use postcopy::PostcopyError;
