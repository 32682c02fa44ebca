//! Epoll: a small safe wrapper over vmm-sys-util's [`Epoll`], and [`VringEpollHandler`], through
//! which a backend adds its own fds to the epoll set of a worker.
//!
//! Every fd a worker watches carries a `u64` in its epoll entry, which tells the worker what the
//! fd is:
//!
//! | value                     | fd                                                         |
//! |---------------------------|------------------------------------------------------------|
//! | `0 .. num_queues`         | the kick eventfd of that queue                             |
//! | `num_queues`              | the backend's exit event for this thread                   |
//! | `num_queues + 1 ..= 65535`| an fd the backend registered (passed to `handle_event`)    |
//! | above 65535               | the daemon's own events (stop, socket), never seen by the backend |

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::EventNotifier;
use vmm_sys_util::eventfd::EventFd;
use vu_proto::fd::BorrowFd;

/// The data value of the daemon's own stop event in an epoll set (out of the backend's range).
pub(crate) const STOP_DATA: u64 = u64::MAX;
/// The data value of the connection socket in the single-threaded loop.
pub(crate) const SOCKET_DATA: u64 = u64::MAX - 1;
/// The data value of the listening socket in the single-threaded loop.
pub(crate) const LISTENER_DATA: u64 = u64::MAX - 2;

/// What an event of one of the daemon's epoll sets is about, decoded once from its data word
/// ([`Token::of`]) so that the loops match on meanings rather than numbers.
///
/// The data words: a queue's kick is its queue index; the backend's exit event is
/// `num_queues`; an fd the backend registered carries the device event it chose (above
/// `num_queues`, at most [`MAX_DEVICE_EVENT`]); the daemon's own fds sit at the top of the
/// `u64` range ([`STOP_DATA`], [`SOCKET_DATA`], [`LISTENER_DATA`]), out of every backend's
/// reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// The daemon's stop eventfd.
    Stop,
    /// The frontend connection's socket (single-threaded loop).
    Socket,
    /// The listening socket (single-threaded loop).
    Listener,
    /// The kick eventfd of a queue.
    Kick(u16),
    /// The backend's exit event.
    Exit,
    /// An fd the backend registered, with the device event `handle_event` receives.
    Device(u16),
    /// A data word nothing registers; logged and ignored.
    Unknown(u64),
}

impl Token {
    /// The token of epoll data `data` in a set serving `num_queues` queues.
    pub(crate) fn of(data: u64, num_queues: usize) -> Token {
        match data {
            STOP_DATA => Token::Stop,
            SOCKET_DATA => Token::Socket,
            LISTENER_DATA => Token::Listener,
            d if d == num_queues as u64 => Token::Exit,
            d => match u16::try_from(d) {
                Ok(queue) if usize::from(queue) < num_queues => Token::Kick(queue),
                Ok(device_event) => Token::Device(device_event),
                Err(_) => Token::Unknown(d),
            },
        }
    }
}

/// The largest data value a backend may register: device events reach `handle_event` as `u16`.
pub const MAX_DEVICE_EVENT: u64 = u16::MAX as u64;

/// Borrows the fd of a vmm-sys-util [`EventFd`], which implements `AsRawFd` but not `AsFd`.
pub(crate) fn eventfd_fd(event: &EventFd) -> BorrowedFd<'_> {
    event.borrow_fd()
}

/// Creates a close-on-exec, non-blocking eventfd.
pub(crate) fn new_eventfd() -> io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// An epoll instance (close-on-exec) whose fds are passed as borrowed fds.
#[derive(Debug)]
pub(crate) struct Poller {
    epoll: Epoll,
}

impl Poller {
    /// Creates an empty epoll set.
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Poller {
            epoll: Epoll::new()?,
        })
    }

    /// Adds `fd` with `events`, tagged with `data`.
    pub(crate) fn add(&self, fd: BorrowedFd<'_>, events: EventSet, data: u64) -> io::Result<()> {
        self.ctl(ControlOperation::Add, fd, events, data)
    }

    /// Changes the events and data of `fd`, which must be in the set. An empty `events` keeps
    /// the fd in the set but disarms it (errors and hang-ups are still reported).
    pub(crate) fn modify(&self, fd: BorrowedFd<'_>, events: EventSet, data: u64) -> io::Result<()> {
        self.ctl(ControlOperation::Modify, fd, events, data)
    }

    /// Removes `fd` from the set.
    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(ControlOperation::Delete, fd, EventSet::empty(), 0)
    }

    fn ctl(
        &self,
        op: ControlOperation,
        fd: BorrowedFd<'_>,
        events: EventSet,
        data: u64,
    ) -> io::Result<()> {
        self.epoll
            .ctl(op, fd.as_raw_fd(), EpollEvent::new(events, data))
    }

    /// Waits for events, retrying when interrupted by a signal; `None` waits forever.
    pub(crate) fn wait(
        &self,
        events: &mut [EpollEvent],
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let ms = match timeout {
            None => -1,
            Some(t) => i32::try_from(t.as_millis()).unwrap_or(i32::MAX),
        };
        loop {
            match self.epoll.wait(ms, events) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

impl Poller {
    /// Whether an event is pending, without consuming it or blocking (one `poll(2)` on the
    /// epoll fd, which is readable while its ready list is not empty).
    pub(crate) fn has_events(&self) -> bool {
        crate::sys::readable_within(self.as_fd(), std::time::Duration::ZERO)
    }
}

impl AsFd for Poller {
    fn as_fd(&self) -> BorrowedFd<'_> {
        crate::sys::epoll_fd(&self.epoll)
    }
}

/// Why a backend's fd could not be added to or removed from a worker's epoll set.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The data value is reserved: `0..num_queues` tag the queues' kicks and `num_queues`
    /// the exit event.
    #[error(
        "data value {data} is reserved for the daemon (queues and exit event use 0..={num_queues})"
    )]
    ReservedData {
        /// The value given.
        data: u64,
        /// The number of queues of the backend.
        num_queues: usize,
    },
    /// The data value does not fit the `u16` device event given to `handle_event`.
    #[error("data value {data} does not fit a u16 device event (at most {max})", max = MAX_DEVICE_EVENT)]
    DataTooLarge {
        /// The value given.
        data: u64,
    },
    /// `epoll_ctl` failed (for example the fd is already registered, or is not registered).
    #[error("epoll_ctl on fd {fd} failed: {source}")]
    Epoll {
        /// The fd number, for the log.
        fd: i32,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

impl From<ListenerError> for io::Error {
    fn from(e: ListenerError) -> io::Error {
        let kind = match &e {
            ListenerError::Epoll { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// The epoll set of one worker thread, as a backend sees it.
///
/// Returned by the daemon's `get_epoll_handlers()` (one per worker thread, in thread order) so
/// that a backend can have its own fds (a tap device, a timer, a socket...) watched by the
/// worker that serves its queues. When such an fd is ready, the worker calls the backend's
/// `handle_event` with the data value given at registration as `device_event`, on that
/// worker's thread, with the same exclusion as queue events.
///
/// Data values `0..=num_queues` are reserved (the queues' kicks and the exit event); a backend
/// uses values from `num_queues + 1` up to `u16::MAX`.
pub struct VringEpollHandler {
    poller: Arc<Poller>,
    num_queues: usize,
    thread_index: usize,
    queues: Vec<u16>,
    exit: Option<EventNotifier>,
}

impl fmt::Debug for VringEpollHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VringEpollHandler")
            .field("thread_index", &self.thread_index)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl VringEpollHandler {
    pub(crate) fn new(
        poller: Arc<Poller>,
        num_queues: usize,
        thread_index: usize,
        queues: Vec<u16>,
        exit: Option<EventNotifier>,
    ) -> Self {
        VringEpollHandler {
            poller,
            num_queues,
            thread_index,
            queues,
            exit,
        }
    }

    /// Writes the backend's exit event of this thread (the one `exit_event(thread_index)`
    /// returned), which stops the daemon; does nothing if the backend gave none.
    pub fn send_exit_event(&self) -> io::Result<()> {
        match &self.exit {
            Some(exit) => exit.notify(),
            None => Ok(()),
        }
    }

    /// The index of the worker thread whose epoll set this is (the `thread_id` that
    /// `handle_event` receives on it).
    pub fn thread_index(&self) -> usize {
        self.thread_index
    }

    /// The queues this worker thread serves, in increasing order.
    pub fn queues(&self) -> &[u16] {
        &self.queues
    }

    fn check_data(&self, data: u64) -> Result<(), ListenerError> {
        if data <= self.num_queues as u64 {
            return Err(ListenerError::ReservedData {
                data,
                num_queues: self.num_queues,
            });
        }
        if data > MAX_DEVICE_EVENT {
            return Err(ListenerError::DataTooLarge { data });
        }
        Ok(())
    }

    /// Adds `fd` to this worker's epoll set: when one of `ev_type` is ready, the worker calls
    /// `handle_event(data as u16, events, vrings, thread_index)`.
    ///
    /// `data` must be above `num_queues` and at most `u16::MAX`. The fd must stay open until
    /// [`unregister_listener`](Self::unregister_listener) (closing it also removes it). Epoll is
    /// level-triggered unless `ev_type` has `EDGE_TRIGGERED`: `handle_event` must consume
    /// what made the fd ready, or it is called again.
    pub fn register_listener(
        &self,
        fd: impl AsFd,
        ev_type: EventSet,
        data: u64,
    ) -> Result<(), ListenerError> {
        self.check_data(data)?;
        let fd = fd.as_fd();
        self.poller
            .add(fd, ev_type, data)
            .map_err(|source| ListenerError::Epoll {
                fd: fd.as_raw_fd(),
                source,
            })
    }

    /// Removes `fd`, registered earlier with [`register_listener`](Self::register_listener),
    /// from this worker's epoll set. `ev_type` and `data` are checked as at registration.
    pub fn unregister_listener(
        &self,
        fd: impl AsFd,
        ev_type: EventSet,
        data: u64,
    ) -> Result<(), ListenerError> {
        let _ = ev_type;
        self.check_data(data)?;
        let fd = fd.as_fd();
        self.poller
            .delete(fd)
            .map_err(|source| ListenerError::Epoll {
                fd: fd.as_raw_fd(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decode_every_range_of_data() {
        let nq = 3;
        assert_eq!(Token::of(STOP_DATA, nq), Token::Stop);
        assert_eq!(Token::of(SOCKET_DATA, nq), Token::Socket);
        assert_eq!(Token::of(LISTENER_DATA, nq), Token::Listener);
        assert_eq!(Token::of(0, nq), Token::Kick(0));
        assert_eq!(Token::of(2, nq), Token::Kick(2));
        assert_eq!(Token::of(3, nq), Token::Exit);
        assert_eq!(Token::of(4, nq), Token::Device(4));
        assert_eq!(Token::of(MAX_DEVICE_EVENT, nq), Token::Device(u16::MAX));
        assert_eq!(
            Token::of(MAX_DEVICE_EVENT + 1, nq),
            Token::Unknown(MAX_DEVICE_EVENT + 1)
        );
    }

    fn handler(num_queues: usize) -> (VringEpollHandler, Arc<Poller>) {
        let poller = Arc::new(Poller::new().unwrap());
        (
            VringEpollHandler::new(poller.clone(), num_queues, 0, vec![0, 1], None),
            poller,
        )
    }

    fn ready(poller: &Poller) -> Vec<(u64, EventSet)> {
        let mut events = [EpollEvent::default(); 8];
        let n = poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        events[..n]
            .iter()
            .map(|e| (e.data(), e.event_set()))
            .collect()
    }

    #[test]
    fn registered_fd_is_reported_with_its_data() {
        let (h, poller) = handler(2);
        let evt = new_eventfd().unwrap();
        h.register_listener(eventfd_fd(&evt), EventSet::IN, 3)
            .unwrap();
        assert!(ready(&poller).is_empty());
        evt.write(1).unwrap();
        assert_eq!(ready(&poller), vec![(3, EventSet::IN)]);
    }

    #[test]
    fn unregistered_fd_is_no_longer_reported() {
        let (h, poller) = handler(2);
        let evt = new_eventfd().unwrap();
        h.register_listener(eventfd_fd(&evt), EventSet::IN, 7)
            .unwrap();
        h.unregister_listener(eventfd_fd(&evt), EventSet::IN, 7)
            .unwrap();
        evt.write(1).unwrap();
        assert!(ready(&poller).is_empty());
    }

    #[test]
    fn queue_and_exit_data_values_are_refused() {
        let (h, _poller) = handler(2);
        let evt = new_eventfd().unwrap();
        for data in 0..=2 {
            let err = h
                .register_listener(eventfd_fd(&evt), EventSet::IN, data)
                .unwrap_err();
            assert!(
                matches!(err, ListenerError::ReservedData { data: d, num_queues: 2 } if d == data)
            );
        }
    }

    #[test]
    fn data_above_u16_is_refused() {
        let (h, _poller) = handler(2);
        let evt = new_eventfd().unwrap();
        let err = h
            .register_listener(eventfd_fd(&evt), EventSet::IN, 65536)
            .unwrap_err();
        assert!(matches!(err, ListenerError::DataTooLarge { data: 65536 }));
    }

    #[test]
    fn registering_twice_is_an_epoll_error() {
        let (h, _poller) = handler(1);
        let evt = new_eventfd().unwrap();
        h.register_listener(eventfd_fd(&evt), EventSet::IN, 5)
            .unwrap();
        let err = h
            .register_listener(eventfd_fd(&evt), EventSet::IN, 5)
            .unwrap_err();
        assert!(matches!(err, ListenerError::Epoll { .. }));
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn disarmed_fd_stays_registered_but_silent() {
        let poller = Poller::new().unwrap();
        let evt = new_eventfd().unwrap();
        poller.add(eventfd_fd(&evt), EventSet::IN, 0).unwrap();
        evt.write(1).unwrap();
        poller
            .modify(eventfd_fd(&evt), EventSet::empty(), 0)
            .unwrap();
        assert!(ready(&poller).is_empty());
        poller.modify(eventfd_fd(&evt), EventSet::IN, 0).unwrap();
        assert_eq!(ready(&poller), vec![(0, EventSet::IN)]);
    }

    #[test]
    fn poller_fd_is_close_on_exec() {
        let poller = Poller::new().unwrap();
        assert!(crate::sys::is_cloexec(&poller).unwrap());
    }
}
