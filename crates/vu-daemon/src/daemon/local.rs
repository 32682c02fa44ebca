//! [`LocalDaemon`]: the whole daemon on the caller's thread, with one epoll set.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::event::EventConsumer;
use vu_proto::fd::BorrowFd;
use vu_proto::listener::Listener;
use vu_proto::socket::{Endpoint, SocketError};

use super::connection::{prepare, receive, respond, ConnEnd, StopSignal};
use super::{
    create_vrings, kick_of, single_result, DaemonError, Mem, Serving, SessionOf, ShutdownHandle,
    DEFAULT_MESSAGE_POLLING, DEFAULT_MESSAGE_TIMEOUT,
};
use crate::backend::VhostUserBackend;
use crate::control::RingControl;
use crate::epoll::{
    eventfd_fd, Poller, Token, VringEpollHandler, LISTENER_DATA, SOCKET_DATA, STOP_DATA,
};
use crate::session::Session;
use crate::worker::{call_backend, KickTable};

/// The most events one epoll wait returns.
const MAX_EVENTS: usize = 64;

/// The state of one [`LocalDaemon::run_loop`]: where frontends come from and the one being
/// served.
struct Run<'l> {
    /// Where frontends are accepted, if anywhere.
    listener: Option<&'l Listener>,
    /// Serving one given connection: its end is the end of the loop.
    single: bool,
    /// The frontend being served.
    conn: Option<Endpoint>,
    /// Whether the listener is in the epoll set.
    listening: bool,
    /// Until when the loop polls after a message (`set_message_polling`).
    poll_until: Option<Instant>,
}

/// The backend and its vrings, as a dispatch sees them (a function of the session alone, so
/// that the kick table can be borrowed beside it).
fn serving<S: VhostUserBackend>(session: &SessionOf<S>) -> Serving<'_, S> {
    Serving {
        backend: session.backend(),
        vrings: session.vrings(),
        log: session.dirty_log(),
    }
}

/// What the loop does after an event.
enum Flow {
    /// Go on serving.
    Continue,
    /// Stop the loop with this result.
    Finish(Result<(), DaemonError>),
}

impl From<Result<(), DaemonError>> for Flow {
    fn from(result: Result<(), DaemonError>) -> Self {
        match result {
            Ok(()) => Flow::Continue,
            Err(e) => Flow::Finish(Err(e)),
        }
    }
}

/// A ring operation the session asked for while handling a message, applied right after
/// (the session holds the vrings while it handles the message, and on one thread nothing
/// dispatches in between, so "quiesce" always holds).
#[derive(Debug, Clone, Copy)]
enum Op {
    Watch(u16),
    Unwatch(u16),
    /// Serve a kick of the queue now (in-band `VRING_KICK`), before the reply is sent.
    Dispatch(u16),
}

#[derive(Debug, Default)]
struct Deferred {
    ops: Vec<Op>,
}

impl RingControl for Deferred {
    fn watch_kick(&mut self, queue: u16) -> std::io::Result<()> {
        self.ops.push(Op::Watch(queue));
        Ok(())
    }

    fn unwatch_kick(&mut self, queue: u16) -> std::io::Result<()> {
        self.ops.push(Op::Unwatch(queue));
        Ok(())
    }

    fn quiesce(&mut self, _queue: u16) -> std::io::Result<()> {
        Ok(())
    }

    fn dispatch_now(&mut self, queue: u16) -> std::io::Result<()> {
        self.ops.push(Op::Dispatch(queue));
        Ok(())
    }
}

/// A single-threaded vhost-user daemon: the frontend's messages, the queues' kicks and the
/// backend's own fds are all served by one epoll loop on the thread that calls
/// [`run`](Self::run).
///
/// Nothing is shared between threads, so the backend needs neither `Send` nor `Sync` and the
/// vrings can be [`VringState`](vu_vring::VringState), which takes no lock. `handle_event`
/// always gets `thread_id` 0; `queues_per_thread()` is not consulted. A long `handle_event`
/// delays the frontend's messages, which is the price of having no threads.
///
/// # Example
///
/// A backend that is neither `Send` nor `Sync` (it counts in a `Cell`), on [`VringState`]
/// vrings, serving one connection on the calling thread until the frontend leaves:
///
/// ```
/// use std::cell::Cell;
/// use std::io;
///
/// use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
/// use vmm_sys_util::epoll::EventSet;
/// use vu_daemon::backend::VhostUserBackend;
/// use vu_daemon::LocalDaemon;
/// use vu_proto::features::ProtocolFeatures;
/// use vu_proto::socket::Endpoint;
/// use vu_vring::VringState;
///
/// struct Counter {
///     kicks: Cell<u64>,
/// }
///
/// impl VhostUserBackend for Counter {
///     type Bitmap = ();
///     type Vring = VringState;
///     fn num_queues(&self) -> usize { 1 }
///     fn max_queue_size(&self) -> usize { 256 }
///     fn features(&self) -> u64 { 1 << 32 }
///     fn protocol_features(&self) -> ProtocolFeatures { ProtocolFeatures::empty() }
///     fn set_event_idx(&self, _: bool) {}
///     fn update_memory(&self, _: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
///         Ok(())
///     }
///     fn handle_event(&self, _: u16, _: EventSet, _: &[VringState], _: usize) -> io::Result<()> {
///         self.kicks.set(self.kicks.get() + 1);
///         Ok(())
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (ours, frontend) = Endpoint::pair()?;
/// let backend = Counter { kicks: Cell::new(0) };
/// let mut daemon =
///     LocalDaemon::new("counter".to_owned(), backend, GuestMemoryAtomic::new(GuestMemoryMmap::new()))?;
/// drop(frontend); // the frontend leaves at once
/// daemon.run_connection(ours)?; // returns when it has gone
/// assert_eq!(daemon.backend().kicks.get(), 0);
/// # Ok(())
/// # }
/// ```
///
/// [`VringState`]: vu_vring::VringState
pub struct LocalDaemon<S: VhostUserBackend> {
    name: String,
    session: SessionOf<S>,
    poller: Arc<Poller>,
    table: KickTable,
    signal: Arc<StopSignal>,
    handler: Arc<VringEpollHandler>,
    _exit: Option<EventConsumer>,
    message_timeout: Option<Duration>,
    message_polling: Duration,
}

impl<S: VhostUserBackend> std::fmt::Debug for LocalDaemon<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDaemon")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<S: VhostUserBackend> LocalDaemon<S> {
    /// Builds the daemon of `backend` over guest memory `mem`, with one vring per queue.
    /// Nothing runs until [`run`](Self::run) or one of its siblings is called.
    pub fn new(name: String, backend: S, mem: Mem<S>) -> Result<Self, DaemonError> {
        let num_queues = backend.num_queues();
        let vrings = create_vrings(&backend, &mem)?;
        let queues = (0..num_queues)
            .map(u16::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| DaemonError::TooManyQueues { num_queues })?;
        let signal = Arc::new(StopSignal::new()?);
        let io_err = |what| move |source| DaemonError::Io { what, source };
        let poller = Arc::new(Poller::new().map_err(io_err("creating the epoll set"))?);
        poller
            .add(eventfd_fd(signal.event()), EventSet::IN, STOP_DATA)
            .map_err(io_err("watching the stop eventfd"))?;
        let (consumer, notifier) = backend.exit_event(0).unzip();
        if let Some(exit) = &consumer {
            // `exit` is kept in `self._exit` for as long as the epoll set exists.
            poller
                .add(exit.borrow_fd(), EventSet::IN, num_queues as u64)
                .map_err(io_err("watching the backend's exit event"))?;
        }
        let handler = Arc::new(VringEpollHandler::new(
            poller.clone(),
            num_queues,
            0,
            queues,
            notifier,
        ));
        Ok(LocalDaemon {
            name,
            session: Session::new(backend, mem, vrings),
            poller,
            table: KickTable::new(num_queues),
            signal,
            handler,
            _exit: consumer,
            message_timeout: Some(DEFAULT_MESSAGE_TIMEOUT),
            message_polling: DEFAULT_MESSAGE_POLLING,
        })
    }

    /// The name given to [`new`](Self::new).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend.
    pub fn backend(&self) -> &S {
        self.session.backend()
    }

    /// The vrings, one per queue.
    pub fn vrings(&self) -> &[S::Vring] {
        self.session.vrings()
    }

    /// Sets how long reading a message the frontend started may wait for more bytes; `None`
    /// waits forever. A frontend that exceeds it is disconnected. Note that, on one thread,
    /// queues are not served while a message is being read.
    pub fn set_message_timeout(&mut self, timeout: Option<Duration>) {
        self.message_timeout = timeout;
    }

    /// Sets how long, after handling a message, the thread keeps looking at its epoll set
    /// without sleeping (a wait with no timeout, then `sched_yield`, in a loop) before it
    /// blocks in `epoll_wait` again; `Duration::ZERO` blocks at once. As
    /// [`VhostUserDaemon::set_message_polling`](super::VhostUserDaemon::set_message_polling):
    /// the frontend's next message, and any kick meanwhile, cost no wake-up. The default is
    /// [`DEFAULT_MESSAGE_POLLING`].
    pub fn set_message_polling(&mut self, budget: Duration) {
        self.message_polling = budget;
    }

    /// The epoll handler of the one thread, to add the backend's own fds.
    pub fn epoll_handler(&self) -> Arc<VringEpollHandler> {
        self.handler.clone()
    }

    /// A handle that stops [`run`](Self::run) from another thread (or from `handle_event`).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            signal: self.signal.clone(),
        }
    }

    /// Serves frontends accepted on `listener`, one after another, until the daemon is shut
    /// down or the backend writes its exit event (`Ok`), or `handle_event` fails (`Err`).
    /// The listener is switched to non-blocking mode.
    pub fn run(&mut self, listener: &Listener) -> Result<(), DaemonError> {
        listener.set_nonblocking(true)?;
        self.run_loop(Some(listener), None)
    }

    /// Serves one connected frontend until it goes away (`Ok`, or `Err` if the connection
    /// broke), the daemon is shut down, or `handle_event` fails.
    pub fn run_connection(&mut self, endpoint: Endpoint) -> Result<(), DaemonError> {
        self.run_loop(None, Some(endpoint))
    }

    /// Client mode: connects to a frontend listening on `path` and serves that connection.
    pub fn run_client(&mut self, path: impl AsRef<Path>) -> Result<(), DaemonError> {
        let endpoint = Endpoint::connect(path)?;
        self.run_connection(endpoint)
    }

    /// Binds `path` (replacing a stale socket) and [`run`](Self::run)s.
    pub fn serve(&mut self, path: impl AsRef<Path>) -> Result<(), DaemonError> {
        let listener = Listener::bind_replacing_stale(path)?;
        self.run(&listener)
    }

    fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> DaemonError {
        move |source| DaemonError::Io { what, source }
    }

    fn open_connection(&mut self, endpoint: &Endpoint) -> Result<(), DaemonError> {
        prepare(endpoint, self.message_timeout)?;
        self.poller
            .add(endpoint.as_fd(), EventSet::IN, SOCKET_DATA)
            .map_err(Self::io_err("watching the connection socket"))?;
        self.signal.set_connection(Some(endpoint));
        Ok(())
    }

    fn close_connection(&mut self, endpoint: &Endpoint) {
        self.signal.set_connection(None);
        if let Err(e) = self.poller.delete(endpoint.as_fd()) {
            log::warn!("cannot remove the connection socket from the epoll set: {e}");
        }
        let mut ctl = Deferred::default();
        self.session.disconnect(&mut ctl);
        self.apply(ctl);
        // Whatever the session did, nothing of this connection stays watched.
        if let Err(e) = self.table.unwatch_all(&self.poller) {
            log::warn!("cannot unwatch a kick: {e}");
        }
    }

    fn apply(&mut self, ctl: Deferred) {
        for op in ctl.ops {
            let result = match op {
                Op::Watch(q) => match self.session.vrings().get(usize::from(q)).map(kick_of::<S>) {
                    Some(Ok(Some(kick))) => self.table.watch(&self.poller, q, kick),
                    Some(Ok(None)) | None => self.table.unwatch(&self.poller, q),
                    Some(Err(e)) => Err(e),
                },
                Op::Unwatch(q) => self.table.unwatch(&self.poller, q),
                // The reply is sent after this; a backend error is logged, the kick is not
                // served again.
                Op::Dispatch(q) => self
                    .table
                    .kick(&self.poller, q, EventSet::IN, &serving(&self.session), 0)
                    .map(drop)
                    .map_err(std::io::Error::other),
            };
            if let Err(e) = result {
                log::error!("{op:?} failed: {e}");
            }
        }
    }

    /// Reads and handles one message.
    fn message(&mut self, endpoint: &Endpoint) -> Result<(), ConnEnd> {
        let Some(msg) = receive(endpoint)? else {
            return Ok(());
        };
        let mut ctl = Deferred::default();
        let outcome = self.session.handle(msg, &mut ctl);
        self.apply(ctl);
        if let Err(e) = self.table.rearm(&self.poller, &serving(&self.session)) {
            log::error!("cannot re-arm a kick: {e}");
        }
        respond(endpoint, outcome)
    }

    fn run_loop(
        &mut self,
        listener: Option<&Listener>,
        conn: Option<Endpoint>,
    ) -> Result<(), DaemonError> {
        if self.signal.is_stopping() {
            return Err(DaemonError::Stopped);
        }
        let mut run = Run {
            listener,
            single: conn.is_some(),
            conn,
            listening: false,
            poll_until: None,
        };
        if let Some(endpoint) = &run.conn {
            if let Err(e) = self.open_connection(endpoint) {
                self.signal.set_connection(None);
                return Err(e);
            }
        } else {
            self.listen(&mut run)?;
        }
        let num_queues = self.session.vrings().len();
        // One slot more than a wait fills, for the socket event of a message read ahead.
        let mut events = vec![EpollEvent::default(); MAX_EVENTS + 1];
        let result = 'serve: loop {
            let n = match self.wait(&mut run, &mut events) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) => break 'serve Err(e),
            };
            for event in &events[..n] {
                let evset = event.event_set();
                let flow = match Token::of(event.data(), num_queues) {
                    Token::Stop => Flow::Finish(Ok(())),
                    Token::Exit => {
                        log::info!("the backend's exit event was written; stopping");
                        Flow::Finish(Ok(()))
                    }
                    Token::Listener => self.accept(&mut run),
                    Token::Socket => self.serve_socket(&mut run),
                    Token::Kick(queue) => {
                        match self.table.kick(
                            &self.poller,
                            queue,
                            evset,
                            &serving(&self.session),
                            0,
                        ) {
                            Ok(_) => Flow::Continue,
                            Err(e) => Flow::Finish(Err(e)),
                        }
                    }
                    Token::Device(device_event) => {
                        match call_backend(&serving(&self.session), device_event, evset, 0) {
                            Ok(()) => Flow::Continue,
                            Err(e) => Flow::Finish(Err(e)),
                        }
                    }
                    Token::Unknown(d) => {
                        log::warn!("ignoring unknown epoll data {d}");
                        Flow::Continue
                    }
                };
                if let Flow::Finish(result) = flow {
                    break 'serve result;
                }
            }
        };
        if let Some(endpoint) = run.conn.take() {
            self.close_connection(&endpoint);
            ConnEnd::Stopped.log();
        }
        if let (true, Some(l)) = (run.listening, run.listener) {
            let _ = self.poller.delete(l.as_fd());
        }
        if let Err(e) = &result {
            log::error!("{e}; stopping");
        }
        result
    }

    /// Waits for events; `None` when a polling round found nothing (after a yield), else how
    /// many of `events` to handle.
    ///
    /// The connection reads ahead (`prepare`): a message already in its buffer leaves nothing
    /// for epoll to report. Then the wait only polls, and the socket is served as if it were
    /// readable, one message a round, so that kicks and the stop event are looked at between
    /// two buffered messages. A message only partly buffered is completed by the endpoint's
    /// blocking read, within the message timeout.
    fn wait(
        &self,
        run: &mut Run<'_>,
        events: &mut [EpollEvent],
    ) -> Result<Option<usize>, DaemonError> {
        let buffered = run.conn.as_ref().is_some_and(Endpoint::has_buffered_bytes);
        run.poll_until = run.poll_until.filter(|&until| Instant::now() < until);
        let polling = run.poll_until.is_some();
        let timeout = (buffered || polling).then_some(Duration::ZERO);
        let mut n = self
            .poller
            .wait(&mut events[..MAX_EVENTS], timeout)
            .map_err(|source| DaemonError::Epoll {
                thread: None,
                source,
            })?;
        if n == 0 && polling && !buffered {
            // Nothing yet: let a frontend on this CPU run, then look again.
            std::thread::yield_now();
            return Ok(None);
        }
        if buffered && !events[..n].iter().any(|e| e.data() == SOCKET_DATA) {
            // The wait filled at most MAX_EVENTS slots, so the slot after them exists.
            if let Some(slot) = events.get_mut(n) {
                *slot = EpollEvent::new(EventSet::IN, SOCKET_DATA);
                n += 1;
            }
        }
        Ok(Some(n))
    }

    /// Watches the listening socket, if there is one, for the next frontend.
    fn listen(&self, run: &mut Run<'_>) -> Result<(), DaemonError> {
        if let Some(l) = run.listener {
            self.poller
                .add(l.as_fd(), EventSet::IN, LISTENER_DATA)
                .map_err(Self::io_err("watching the listening socket"))?;
            run.listening = true;
        }
        Ok(())
    }

    /// Accepts a frontend on the listening socket and serves it; the listener is not
    /// watched while a frontend is connected.
    fn accept(&mut self, run: &mut Run<'_>) -> Flow {
        let (Some(l), None) = (run.listener, &run.conn) else {
            return Flow::Continue;
        };
        let endpoint = match l.accept() {
            Ok(endpoint) => endpoint,
            Err(SocketError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Flow::Continue
            }
            Err(e) => return Flow::Finish(Err(DaemonError::Socket(e))),
        };
        if let Err(e) = self.poller.delete(l.as_fd()) {
            return Flow::Finish(Err(DaemonError::Io {
                what: "pausing the listening socket",
                source: e,
            }));
        }
        run.listening = false;
        match self.open_connection(&endpoint) {
            Ok(()) => {
                run.conn = Some(endpoint);
                Flow::Continue
            }
            Err(e) => {
                log::warn!("cannot serve the frontend: {e}");
                self.signal.set_connection(None);
                Flow::from(self.listen(run))
            }
        }
    }

    /// Handles the frontend's next message; when the connection ends, closes it and either
    /// finishes (one connection, or stopping) or listens for the next frontend.
    fn serve_socket(&mut self, run: &mut Run<'_>) -> Flow {
        let Some(endpoint) = run.conn.take() else {
            return Flow::Continue;
        };
        let end = match self.message(&endpoint) {
            Ok(()) => {
                run.conn = Some(endpoint);
                if !self.message_polling.is_zero() {
                    run.poll_until = Instant::now().checked_add(self.message_polling);
                }
                return Flow::Continue;
            }
            Err(end) => end,
        };
        self.close_connection(&endpoint);
        if self.signal.is_stopping() {
            ConnEnd::Stopped.log();
            return Flow::Finish(Ok(()));
        }
        end.log();
        if run.single {
            return Flow::Finish(single_result(end));
        }
        Flow::from(self.listen(run))
    }
}
