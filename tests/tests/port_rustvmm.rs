//! The dual-built device of tests/port/sum_device.rs, built against rust-vmm's
//! vhost-user-backend 0.24: the reference the vu build (`port_vu.rs`) must match. The shims
//! below give rust-vmm the spelling a device has after the port (each a line of
//! docs/porting-from-rust-vmm.md), so that one source file serves both.

// The device is written as a device crate's module would be, with `pub` items.
#![allow(unreachable_pub, unnameable_types)]

mod compat {
    use std::os::fd::{AsRawFd, RawFd};
    use std::path::Path;

    pub use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::Listener;
    pub use vhost_user_backend::{
        VhostUserBackend, VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT,
    };

    /// rust-vmm's `register_listener` takes a `RawFd`; after the port the device writes
    /// `fd.borrow_fd()` where it wrote `fd.as_raw_fd()`.
    pub trait BorrowFd {
        fn borrow_fd(&self) -> RawFd;
    }

    impl<T: AsRawFd> BorrowFd for T {
        fn borrow_fd(&self) -> RawFd {
            self.as_raw_fd()
        }
    }

    pub fn listener(path: &Path) -> Listener {
        Listener::new(path, true).expect("bind")
    }

    pub fn start<S>(daemon: &mut VhostUserDaemon<S>, mut listener: Listener)
    where
        S: VhostUserBackend + Clone + 'static,
        S::Bitmap: vhost_user_backend::bitmap::BitmapReplace
            + vm_memory::bitmap::NewBitmap
            + Clone
            + Send
            + Sync,
        S::Vring: Clone + Send + Sync,
    {
        daemon.start(&mut listener).expect("start");
    }

    pub fn set_queue_size(vring: &VringRwLock, size: u16) {
        vring.set_queue_size(size);
    }

    pub fn ended_cleanly(result: &vhost_user_backend::Result<()>) -> bool {
        use vhost::vhost_user::Error as VhostUserError;
        use vhost_user_backend::Error;
        matches!(
            result,
            Ok(())
                | Err(Error::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage
                ))
        )
    }
}

#[path = "../port/sum_device.rs"]
mod sum_device;
