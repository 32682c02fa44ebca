//! Borrowing the fd of the fd-owning types of `vmm-sys-util`, without `unsafe` at the call
//! site.
//!
//! The framework takes fds as [`BorrowedFd`] or `impl AsFd` (the frontend's
//! [`set_vring_kick`](crate::Frontend::set_vring_kick), the daemon's `register_listener`).
//! `vmm-sys-util`'s [`EventFd`], [`EventConsumer`], [`EventNotifier`] and [`TimerFd`] own
//! their fd (they close it when dropped) but implement only `AsRawFd`, and a raw fd becomes
//! a `BorrowedFd` only through `unsafe`. [`BorrowFd`] does that once, here, for exactly these
//! types, with the borrow tied to the owner's lifetime:
//!
//! ```
//! use vmm_sys_util::eventfd::EventFd;
//! use vu_proto::fd::BorrowFd;
//!
//! let kick = EventFd::new(0)?;
//! let fd = kick.borrow_fd(); // a BorrowedFd<'_>, which is `impl AsFd`
//! # let _ = fd;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::os::fd::{AsRawFd, BorrowedFd};

use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// A type that owns an open fd for as long as it lives, and lends it as a [`BorrowedFd`].
///
/// Implemented for the `vmm-sys-util` types the framework's APIs meet; anything that
/// implements [`AsFd`](std::os::fd::AsFd) already needs no adapter.
pub trait BorrowFd {
    /// The owned fd, borrowed for as long as `self` is.
    fn borrow_fd(&self) -> BorrowedFd<'_>;
}

/// Implements [`BorrowFd`] for a type that owns the fd `as_raw_fd` returns.
macro_rules! borrow_owned_fd {
    ($($owner:ty),* $(,)?) => {$(
        impl BorrowFd for $owner {
            fn borrow_fd(&self) -> BorrowedFd<'_> {
                // SAFETY: this type holds its fd in a `File` (vmm-sys-util 0.15), opened by its
                // constructor and closed only when it is dropped, so the fd is open for the
                // whole borrow, whose lifetime is tied to `self`.
                unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
            }
        }
    )*};
}

borrow_owned_fd!(EventFd, EventConsumer, EventNotifier, TimerFd);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};

    use super::*;

    /// A write through a duplicate of the borrowed fd reaches the owner's counter.
    fn signal(fd: impl AsFd) {
        let mut file = File::from(fd.as_fd().try_clone_to_owned().expect("dup"));
        file.write_all(&1u64.to_ne_bytes()).expect("write");
    }

    #[test]
    fn eventfd_borrow_is_the_eventfd() {
        let event = EventFd::new(0).unwrap();
        assert_eq!(event.borrow_fd().as_raw_fd(), event.as_raw_fd());
        signal(event.borrow_fd());
        assert_eq!(event.read().unwrap(), 1);
    }

    #[test]
    fn consumer_and_notifier_borrows_reach_the_same_counter() {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        signal(notifier.borrow_fd());
        let mut file = File::from(consumer.borrow_fd().try_clone_to_owned().unwrap());
        let mut buf = [0u8; 8];
        file.read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1);
    }

    #[test]
    fn timerfd_borrow_is_the_timerfd() {
        let timer = TimerFd::new().unwrap();
        assert_eq!(timer.borrow_fd().as_raw_fd(), timer.as_raw_fd());
    }
}
