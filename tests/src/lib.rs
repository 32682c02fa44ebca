//! Shared test support for the vu workspace: a scripted-frontend toolbox for the vu-proto
//! tests ([`proto_support`]), a virtqueue driver ([`virtqueue`]), its packed-ring counterpart ([`packed_driver`]) and lean ones for benchmarks ([`lean_driver`], split, and [`lean_packed`]) with the guest driver models the split one is driven as ([`driver_models`]), a device setup helper over
//! vu-proto's `Frontend` ([`device`]), test backends ([`backends`]) and fd-leak helpers
//! ([`fdleak`]).
pub mod proto_support;

pub mod backends;
pub mod daemon_support;
pub mod device;
pub mod driver_models;
pub mod fdleak;
pub mod fill_hostile;
// The hostile frontend sends what `Endpoint` refuses to (fds with any payload, truncated
// ancillary data): raw `sendmsg`/`recv` are its purpose.
#[allow(unsafe_code)]
pub mod hostile;
// The lean driver plays the guest through atomics over raw ring pointers, at bench speed.
#[allow(unsafe_code)]
pub mod lean_driver;
// Its packed-ring counterpart, the same way.
#[allow(unsafe_code)]
pub mod lean_packed;
pub mod packed_driver;
pub mod packed_hostile;
pub mod virtqueue;

/// The README's examples, compiled as doc tests so they cannot drift from the API.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
