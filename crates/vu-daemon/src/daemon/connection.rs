//! What both runtimes do with a frontend connection: wait for a frontend while watching the
//! stop event, read one message, send one reply; and the stop signal they share.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vu_proto::listener::Listener;
use vu_proto::message::RawMessage;
use vu_proto::socket::{Endpoint, SocketError};

use crate::daemon::DaemonError;
use crate::epoll::{eventfd_fd, new_eventfd, Poller, SOCKET_DATA, STOP_DATA};
use crate::session::Outcome;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a plain store or take, so a poisoned lock holds a
    // consistent value.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The daemon's "stop now" flag, shared by the daemon, its threads and its shutdown handles.
///
/// Its eventfd is written once and never read, so it stays readable: every epoll set that
/// contains it (each worker's does not; the connection thread's does) sees it at once and
/// forever after.
#[derive(Debug)]
pub(crate) struct StopSignal {
    event: EventFd,
    stopping: AtomicBool,
    failures: Mutex<Vec<DaemonError>>,
    /// A duplicate of the connection being served, shut down for reading on stop so that a
    /// thread blocked reading a message (a frontend that stalls mid-message) returns at once.
    connection: Mutex<Option<UnixStream>>,
}

impl StopSignal {
    pub(crate) fn new() -> Result<Self, DaemonError> {
        Ok(StopSignal {
            event: new_eventfd().map_err(|source| DaemonError::Io {
                what: "creating the daemon's stop eventfd",
                source,
            })?,
            stopping: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
            connection: Mutex::new(None),
        })
    }

    /// The eventfd that becomes readable on stop.
    pub(crate) fn event(&self) -> &EventFd {
        &self.event
    }

    /// Whether a stop was requested.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Requests a stop: wakes the connection thread, which stops the rings and then closes
    /// the connection being served.
    ///
    /// The order is what makes a restart safe: a frontend that sees the connection end takes
    /// the used index in guest memory as the point to restart the rings from (QEMU does, when
    /// `GET_VRING_BASE` fails), so no worker may still be completing a chain by then. The
    /// connection is therefore only shut down for reading here, which wakes a blocked read
    /// with end-of-file and shows the frontend nothing; the frontend sees the end when the
    /// connection thread closes the socket, after `Session::disconnect` quiesced every ring.
    pub(crate) fn request(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot write the daemon's stop eventfd: {e}");
        }
        if let Some(conn) = lock(&self.connection).as_ref() {
            let _ = conn.shutdown(std::net::Shutdown::Read);
        }
    }

    /// Records `error` (the first one is what `wait` returns) and requests a stop.
    pub(crate) fn fail(&self, error: DaemonError) {
        log::error!("{error}; stopping the daemon");
        lock(&self.failures).push(error);
        self.request();
    }

    /// Takes the first recorded failure, logging the others.
    pub(crate) fn take_failure(&self) -> Option<DaemonError> {
        let mut failures = std::mem::take(&mut *lock(&self.failures)).into_iter();
        let first = failures.next();
        for other in failures {
            log::error!("(also) {other}");
        }
        first
    }

    /// Records the connection being served (or none), so that a stop can cut it.
    pub(crate) fn set_connection(&self, endpoint: Option<&Endpoint>) {
        if endpoint.is_some() {
            log::info!("frontend connected");
        }
        let dup = endpoint.and_then(|e| e.stream().try_clone().ok());
        *lock(&self.connection) = dup;
        // A stop requested just before the connection was recorded must still cut it.
        if self.is_stopping() {
            if let Some(conn) = lock(&self.connection).as_ref() {
                let _ = conn.shutdown(std::net::Shutdown::Read);
            }
        }
    }
}

/// Why serving a connection ended.
#[derive(Debug)]
pub(crate) enum ConnEnd {
    /// The frontend closed the connection between two messages.
    Disconnected,
    /// The session asked to close it.
    Closed,
    /// The socket failed, or the frontend broke the protocol framing or stalled.
    Broken(SocketError),
    /// The daemon is stopping.
    Stopped,
}

impl ConnEnd {
    /// Logs the end of a connection and its reason, once per connection.
    pub(crate) fn log(&self) {
        match self {
            ConnEnd::Disconnected => log::info!("frontend disconnected"),
            ConnEnd::Closed => log::info!("frontend connection closed after a fatal error"),
            ConnEnd::Broken(e) => log::warn!("frontend connection lost: {e}"),
            ConnEnd::Stopped => log::info!("frontend connection closed: the daemon is stopping"),
        }
    }
}

/// Prepares an accepted or connected socket for serving: blocking, with a per-message timeout,
/// and with read-ahead, so that a message takes one `recvmsg` instead of two and messages the
/// frontend sends back to back arrive together. A reader that waits for readiness before a
/// message must then also serve the messages already read ahead
/// ([`Endpoint::has_buffered_bytes`]): they leave nothing for the socket to report.
pub(crate) fn prepare(endpoint: &Endpoint, timeout: Option<Duration>) -> Result<(), SocketError> {
    endpoint.set_read_ahead(true);
    endpoint.set_nonblocking(false)?;
    endpoint.set_read_timeout(timeout)?;
    endpoint.set_write_timeout(timeout)
}

/// Reads one message once the socket is readable. `Ok(None)`: nothing to read after all.
pub(crate) fn receive(endpoint: &Endpoint) -> Result<Option<RawMessage>, ConnEnd> {
    endpoint.recv_message().map(Some).or_else(ended)
}

/// Looks for the next message without blocking, again and again, yielding the CPU between
/// two looks (a frontend on the same CPU then runs at once), until one has begun (it is then
/// read whole, as [`receive`] reads it), `until` has passed, or the daemon is stopping; in
/// the last two cases `Ok(None)`.
pub(crate) fn receive_polling(
    endpoint: &Endpoint,
    until: Instant,
    signal: &StopSignal,
) -> Result<Option<RawMessage>, ConnEnd> {
    loop {
        match endpoint.try_recv_message() {
            Ok(Some(msg)) => return Ok(Some(msg)),
            Ok(None) => {}
            Err(e) => return ended(e),
        }
        if signal.is_stopping() || Instant::now() >= until {
            return Ok(None);
        }
        std::thread::yield_now();
    }
}

/// What a failed read means for the connection.
fn ended(e: SocketError) -> Result<Option<RawMessage>, ConnEnd> {
    match e {
        SocketError::Disconnected => Err(ConnEnd::Disconnected),
        SocketError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) =>
        {
            // Nothing of a message was consumed (see `SocketError::Io`).
            Ok(None)
        }
        e => Err(ConnEnd::Broken(e)),
    }
}

/// Sends the reply of `outcome`, if any; then says whether to go on.
pub(crate) fn respond(endpoint: &Endpoint, outcome: Outcome) -> Result<(), ConnEnd> {
    if let Some(reply) = outcome.reply {
        let fds: Vec<_> = reply.fds.iter().map(|f| f.as_fd()).collect();
        endpoint
            .send_message(&reply.header, &reply.body, &fds)
            .map_err(ConnEnd::Broken)?;
    }
    if outcome.close {
        return Err(ConnEnd::Closed);
    }
    Ok(())
}

/// Waits for a frontend on `listener`, or for the stop signal (`Ok(None)`).
pub(crate) fn accept(
    listener: &Listener,
    stop: &StopSignal,
) -> Result<Option<Endpoint>, DaemonError> {
    let io_err = |what| move |source| DaemonError::Io { what, source };
    listener
        .set_nonblocking(true)
        .map_err(DaemonError::Socket)?;
    let poller = Poller::new().map_err(io_err("creating the accept epoll set"))?;
    poller
        .add(listener.as_fd(), EventSet::IN, SOCKET_DATA)
        .map_err(io_err("watching the listening socket"))?;
    poller
        .add(eventfd_fd(stop.event()), EventSet::IN, STOP_DATA)
        .map_err(io_err("watching the stop eventfd"))?;
    let mut events = [EpollEvent::default(); 2];
    loop {
        if stop.is_stopping() {
            return Ok(None);
        }
        let n = poller
            .wait(&mut events, None)
            .map_err(|source| DaemonError::Epoll {
                thread: None,
                source,
            })?;
        if events[..n].iter().any(|e| e.data() == STOP_DATA) {
            return Ok(None);
        }
        match listener.accept() {
            Ok(endpoint) => return Ok(Some(endpoint)),
            Err(SocketError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(DaemonError::Socket(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn request_makes_the_stop_event_readable_for_good() {
        let signal = StopSignal::new().unwrap();
        assert!(!signal.is_stopping());
        signal.request();
        assert!(signal.is_stopping());
        let poller = Poller::new().unwrap();
        poller
            .add(eventfd_fd(signal.event()), EventSet::IN, STOP_DATA)
            .unwrap();
        let mut events = [EpollEvent::default(); 1];
        for _ in 0..2 {
            assert_eq!(poller.wait(&mut events, Some(Duration::ZERO)).unwrap(), 1);
        }
    }

    /// Whether `stream` has something to report (data, end of file, hang-up) right now.
    fn readable_now(stream: &UnixStream) -> bool {
        let poller = Poller::new().unwrap();
        poller
            .add(stream.as_fd(), EventSet::IN, SOCKET_DATA)
            .unwrap();
        let mut events = [EpollEvent::default(); 1];
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap() == 1
    }

    #[test]
    fn request_wakes_our_reader_but_shows_the_frontend_nothing_until_closed() {
        let signal = StopSignal::new().unwrap();
        let (ours, theirs) = Endpoint::pair().unwrap();
        signal.set_connection(Some(&ours));
        signal.request();
        let mut buf = [0u8; 1];
        // A blocked reader of `ours` returns at once with end of file ...
        assert_eq!(ours.stream().read(&mut buf).unwrap(), 0);
        // ... while the frontend sees no end until the connection is closed, after the
        // rings were stopped.
        assert!(!readable_now(theirs.stream()));
        signal.set_connection(None);
        drop(ours);
        assert!(readable_now(theirs.stream()));
        assert_eq!(theirs.stream().read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn connection_recorded_after_a_stop_is_cut_at_once() {
        let signal = StopSignal::new().unwrap();
        signal.request();
        let (ours, _theirs) = Endpoint::pair().unwrap();
        signal.set_connection(Some(&ours));
        let mut buf = [0u8; 1];
        assert_eq!(ours.stream().read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn first_failure_is_the_one_taken() {
        let signal = StopSignal::new().unwrap();
        signal.fail(DaemonError::NoThreads);
        signal.fail(DaemonError::Stopped);
        assert!(signal.is_stopping());
        assert!(matches!(
            signal.take_failure(),
            Some(DaemonError::NoThreads)
        ));
        assert!(signal.take_failure().is_none());
    }

    #[test]
    fn clean_close_between_messages_is_a_disconnect() {
        let (ours, theirs) = Endpoint::pair().unwrap();
        drop(theirs);
        assert!(matches!(receive(&ours), Err(ConnEnd::Disconnected)));
    }

    #[test]
    fn close_mid_message_breaks_the_connection() {
        let (ours, theirs) = Endpoint::pair().unwrap();
        theirs.send(&[&[1, 0, 0, 0]], &[]).unwrap();
        drop(theirs);
        assert!(matches!(receive(&ours), Err(ConnEnd::Broken(_))));
    }

    #[test]
    fn accept_returns_none_once_stopped() {
        let dir = std::env::temp_dir().join(format!("vu-accept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = Listener::bind(dir.join("s")).unwrap();
        let signal = StopSignal::new().unwrap();
        signal.request();
        assert!(accept(&listener, &signal).unwrap().is_none());
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
