//! The dual-built device of tests/port/sum_device.rs, built against vu's facade: the port of
//! a rust-vmm vhost-user-backend device, whose only changes are these `use` lines and the
//! documented one-line changes (docs/porting-from-rust-vmm.md). Its twin,
//! `port_rustvmm.rs`, builds the same file against rust-vmm.

// The device is written as a device crate's module would be, with `pub` items.
#![allow(unreachable_pub, unnameable_types)]

/// What the device imports from the framework, and the three helpers whose bodies differ
/// between the frameworks (each a line of the porting guide).
mod compat {
    use std::path::Path;

    pub use vu_backend::prelude::*;
    pub use vu_backend::ProtocolFeatures as VhostUserProtocolFeatures;
    use vu_backend::{DaemonError, Listener};

    /// Guide: "`Listener::new(path, true)`: `Listener::bind(path)`".
    pub fn listener(path: &Path) -> Listener {
        Listener::bind(path).expect("bind")
    }

    /// Guide: "`daemon.start(&mut listener)`: `daemon.start(listener)`" (ours returns at once
    /// and accepts on the connection thread).
    pub fn start<S>(daemon: &mut VhostUserDaemon<S>, listener: Listener)
    where
        S: VhostUserBackend + Send + Sync + 'static,
        S::Vring: Clone + Send + Sync + 'static,
        S::Bitmap: Send + Sync + 'static,
    {
        daemon.start(listener).expect("start");
    }

    /// Guide: "`vring.set_queue_size(n)` returns a `Result`" (ours checks the size).
    pub fn set_queue_size(vring: &VringRwLock, size: u16) {
        vring.set_queue_size(size).expect("queue size");
    }

    /// Guide: "`wait()` after a disconnect": ours returns `Ok`, rust-vmm may return
    /// `HandleRequest(Disconnected)`.
    pub fn ended_cleanly(result: &Result<(), DaemonError>) -> bool {
        result.is_ok()
    }
}

#[path = "../port/sum_device.rs"]
mod sum_device;
