//! The small public types of a vring's state: [`RingState`], [`InbandNotifier`] and what
//! [`VringData::restart`](crate::VringData::restart) did ([`Restart`]).

use std::fmt;
use std::io;

/// The three states a vring can be in (vhost-user spec, "Ring states").
///
/// The specification starts a ring when its first kick arrives and stops it on
/// `GET_VRING_BASE`; here a ring is *started* while it is marked ready, which the daemon does
/// when the kick fd arrives (`SET_VRING_KICK`, as the reference does) and undoes on
/// `GET_VRING_BASE` or a reset. A started ring is processed only when it is also *enabled*
/// (`SET_VRING_ENABLE`, or from the start when `VHOST_USER_F_PROTOCOL_FEATURES` was not
/// negotiated). The daemon decides the transitions; the vring only stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingState {
    /// Not started: the backend must not touch the rings.
    Stopped,
    /// Started but disabled: the backend consumes kicks but does not process buffers.
    Disabled,
    /// Started and enabled: the backend processes buffers.
    Enabled,
}

/// Where a ring's notifications go when the frontend gave no eventfd for them: the in-band
/// messages `VHOST_USER_BACKEND_VRING_CALL` and `VHOST_USER_BACKEND_VRING_ERR`, sent by the
/// daemon over the back-end channel when in-band notifications are negotiated. This crate
/// knows no sockets; the daemon implements the trait.
pub trait InbandNotifier: fmt::Debug + Send + Sync {
    /// Tells the frontend the ring's used ring has new entries (in place of the call fd).
    fn call(&self) -> io::Result<()>;
    /// Tells the frontend the ring hit an error (in place of the error fd).
    fn error(&self) -> io::Result<()>;
}

/// What [`VringData::restart`](crate::VringData::restart) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// The used index read from guest memory: the device's next used index.
    pub next_used: u16,
    /// The next available index the ring starts from.
    pub next_avail: u16,
    /// Chains found in flight, to be served again before new ones.
    pub resubmit: usize,
}
