//! The daemon: [`VhostUserDaemon`] (a connection thread plus worker threads) and
//! [`LocalDaemon`] (everything on the caller's thread), with [`ShutdownHandle`] and
//! [`DaemonError`].
//!
//! # Threads of [`VhostUserDaemon`]
//!
//! - One *connection thread*, started by [`start`](VhostUserDaemon::start) and its siblings,
//!   accepts a frontend and reads its messages. After each message it looks for the next
//!   one for a short while (see [`set_message_polling`](VhostUserDaemon::set_message_polling)),
//!   then waits for it in `recvmsg` itself (one system call per read, no epoll); a stop shuts
//!   the socket down, which wakes it
//!   whether it is idle or in the middle of a message a stalled frontend never finishes; such a
//!   frontend is also dropped once no byte came for the message timeout (see
//!   [`set_message_timeout`](VhostUserDaemon::set_message_timeout)), so that the next one
//!   can be served. Each message goes to the
//!   session, whose reply is sent back; when the frontend goes away the session forgets the
//!   connection (features, memory, rings) and the daemon is ready for the next frontend.
//! - One *worker thread* per mask of the backend's `queues_per_thread()`, spawned by
//!   [`new`](VhostUserDaemon::new) and stopped when the daemon stops or is dropped. Each waits
//!   in its own epoll set for the kicks of its queues, the backend's exit event and the fds
//!   the backend registered through [`get_epoll_handlers`](VhostUserDaemon::get_epoll_handlers),
//!   and calls the backend's `handle_event` (see the `worker` module for kicks of disabled
//!   rings and for how the connection thread waits until a worker is quiet).
//!
//! # Stopping
//!
//! The daemon stops when [`ShutdownHandle::shutdown`] is called (from any thread), when the
//! backend writes one of its exit events, when `handle_event` returns an error or panics, or
//! when it is dropped. [`wait`](VhostUserDaemon::wait) then returns: `Ok` for a shutdown or an
//! exit event, the error otherwise. A stopped daemon cannot be started again.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use std::{fs::File, io};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vu_mem::DirtyLog;
use vu_proto::listener::Listener;
use vu_proto::socket::Endpoint;
use vu_vring::{MidPassInterrupt, VringT};

use crate::backend::{DisabledRing, VhostUserBackend};
use crate::control::RingControl;
use crate::epoll::VringEpollHandler;
use crate::process::process_queue;
use crate::session::Session;
use crate::worker::{assign_queues, panic_message, Dispatch, Ending, Worker};

mod connection;
mod local;

pub use crate::daemon_error::DaemonError;
pub use local::LocalDaemon;

use connection::{accept, prepare, receive, receive_polling, respond, ConnEnd, StopSignal};

/// How long reading the rest of a started message may wait for more bytes (and sending a
/// reply may wait for room), unless changed with `set_message_timeout`.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the connection thread looks for the frontend's next message after a reply before
/// it blocks, unless changed with `set_message_polling`.
pub const DEFAULT_MESSAGE_POLLING: Duration = Duration::from_micros(50);

/// How long a worker spins on a queue's ring after serving it before it sleeps, unless changed
/// with `VhostUserDaemon::set_polling`. This default polling backs off where it does not pay
/// (nothing found in the window, or the worker's CPU wanted by another task, such as a driver
/// on the same CPU): see `set_polling`.
pub const DEFAULT_QUEUE_POLLING: Duration = Duration::from_micros(50);

/// How the connection thread reads messages.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// Per started message (see `set_message_timeout`).
    timeout: Option<Duration>,
    /// After each message (see `set_message_polling`).
    polling: Duration,
}

/// The guest memory type of a backend.
type Mem<S> = GuestMemoryAtomic<GuestMemoryMmap<<S as VhostUserBackend>::Bitmap>>;

/// The session of a backend.
type SessionOf<S> = Session<S, <S as VhostUserBackend>::Vring, <S as VhostUserBackend>::Bitmap>;

/// Creates one vring per queue of `backend`.
fn create_vrings<S: VhostUserBackend>(
    backend: &S,
    mem: &Mem<S>,
) -> Result<Vec<S::Vring>, DaemonError> {
    let num_queues = backend.num_queues();
    let count = u16::try_from(num_queues).map_err(|_| DaemonError::TooManyQueues { num_queues })?;
    let max_queue_size = backend.max_queue_size();
    let size = u16::try_from(max_queue_size)
        .map_err(|_| DaemonError::MaxQueueSizeTooLarge { max_queue_size })?;
    (0..count)
        .map(|queue| {
            S::Vring::new(mem.clone(), size).map_err(|source| DaemonError::Vring {
                queue,
                max_queue_size,
                source,
            })
        })
        .collect()
}

/// The backend and its vrings, as the worker's dispatch sees them.
pub(crate) struct Serving<'a, S: VhostUserBackend> {
    pub(crate) backend: &'a S,
    pub(crate) vrings: &'a [S::Vring],
    /// The session's dirty log: used rings that log are marked after each dispatch.
    pub(crate) log: &'a DirtyLog,
}

impl<S: VhostUserBackend> Dispatch for Serving<'_, S> {
    fn dispatches_kicks(&self, queue: u16) -> bool {
        self.vrings.get(usize::from(queue)).is_some_and(|v| {
            v.is_enabled() || self.backend.disabled_ring(queue) != DisabledRing::Hold
        })
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, thread: usize) -> io::Result<()> {
        let discard = self.vrings.get(usize::from(device_event)).filter(|vring| {
            !vring.is_enabled() && self.backend.disabled_ring(device_event) == DisabledRing::Discard
        });
        let result = match discard {
            Some(vring) => {
                // "process and discard": every chain completed, nothing written into it.
                process_queue(vring, |_chain| 0);
                Ok(())
            }
            None => self
                .backend
                .handle_event(device_event, evset, self.vrings, thread),
        };
        crate::used_log::mark_used_rings(self.vrings, self.log);
        result
    }

    fn ring_has_work(&self, queue: u16) -> bool {
        let Some(vring) = self.vrings.get(usize::from(queue)) else {
            return false;
        };
        let data = vring.get_ref();
        if !data.ready() || !data.is_enabled() {
            return false;
        }
        if data.queue_packed() {
            // A packed ring holds at most a ring's worth of chains: no index can run ahead.
            return data.has_available().unwrap_or(false);
        }
        // Chains to serve, and not more than the ring holds: an index further ahead cannot be
        // popped from, and polling it would spin until the budget ends.
        data.pending_chains().is_ok_and(|n| n != 0)
    }

    fn hold_kicks(&self, queue: u16) {
        if let Some(vring) = self.vrings.get(usize::from(queue)) {
            if let Err(e) = vring.get_mut().hold_kicks() {
                log::warn!("queue {queue}: cannot hold kicks off while polling: {e}");
            }
        }
    }

    fn release_kicks(&self, queue: u16) -> bool {
        let Some(vring) = self.vrings.get(usize::from(queue)) else {
            return false;
        };
        let released = vring.get_mut().release_kicks();
        released.unwrap_or_else(|e| {
            // Dispatch the queue: the device meets the broken ring and reports it.
            log::warn!("queue {queue}: cannot re-enable kicks: {e}");
            true
        })
    }

    fn set_driver_concurrent(&self, queue: u16, concurrent: bool, spacing: u16) {
        if let Some(vring) = self.vrings.get(usize::from(queue)) {
            let mut ring = vring.get_mut();
            ring.set_driver_concurrent(concurrent);
            ring.space_round_interrupts(spacing);
        }
    }

    fn take_mid_pass_interrupt(&self, queue: u16) -> MidPassInterrupt {
        self.vrings
            .get(usize::from(queue))
            .map_or(MidPassInterrupt::NotSent, |vring| {
                vring.get_mut().take_mid_pass_interrupt()
            })
    }
}

/// A duplicate of the kick eventfd currently stored in `vring`, if any.
pub(crate) fn kick_of<S: VhostUserBackend>(vring: &S::Vring) -> io::Result<Option<File>> {
    vring.get_ref().get_kick().map(File::try_clone).transpose()
}

fn no_such_queue(queue: u16) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("queue {queue} does not exist"),
    )
}

/// What the connection thread and the worker threads share.
struct Threaded<S: VhostUserBackend> {
    backend: Arc<S>,
    vrings: Vec<S::Vring>,
    /// The session's dirty log, for the used rings' logging after each dispatch.
    log: DirtyLog,
    workers: Vec<Arc<Worker>>,
    /// The worker of each queue.
    owner: Vec<usize>,
    signal: Arc<StopSignal>,
}

impl<S: VhostUserBackend> Threaded<S> {
    fn worker_of(&self, queue: u16) -> io::Result<&Worker> {
        self.owner
            .get(usize::from(queue))
            .and_then(|&w| self.workers.get(w))
            .map(|w| &**w)
            .ok_or_else(|| no_such_queue(queue))
    }

    fn serving(&self) -> Serving<'_, S> {
        Serving {
            backend: &*self.backend,
            vrings: &self.vrings,
            log: &self.log,
        }
    }

    /// Re-arms parked kicks of rings enabled since; called after every frontend message.
    fn rearm(&self) {
        let serving = self.serving();
        for w in &self.workers {
            if let Err(e) = w.rearm(&serving) {
                log::error!("worker {}: cannot re-arm a kick: {e}", w.index);
            }
        }
    }

    /// Unwatches every kick, whatever the session did on disconnect.
    fn unwatch_all(&self) {
        for w in &self.workers {
            if let Err(e) = w.update(|table, poller| table.unwatch_all(poller)) {
                log::warn!("worker {}: cannot unwatch a kick: {e}", w.index);
            }
        }
    }
}

impl<S: VhostUserBackend> RingControl for &Threaded<S> {
    fn watch_kick(&mut self, queue: u16) -> io::Result<()> {
        let worker = self.worker_of(queue)?;
        let vring = self
            .vrings
            .get(usize::from(queue))
            .ok_or_else(|| no_such_queue(queue))?;
        // Read the fd before taking the table: never hold a vring lock and the table at once
        // in this order (the worker takes the table, then the vring).
        let kick = kick_of::<S>(vring)?;
        worker.update(|table, poller| match kick {
            Some(kick) => table.watch(poller, queue, kick),
            None => table.unwatch(poller, queue),
        })
    }

    fn unwatch_kick(&mut self, queue: u16) -> io::Result<()> {
        let worker = self.worker_of(queue)?;
        worker.update(|table, poller| table.unwatch(poller, queue))
    }

    fn quiesce(&mut self, queue: u16) -> io::Result<()> {
        // The worker holds its table for each whole dispatch: once we have it, none runs.
        drop(self.worker_of(queue)?.table());
        Ok(())
    }

    fn dispatch_now(&mut self, queue: u16) -> io::Result<()> {
        // On this thread, under the worker's table: the worker cannot dispatch meanwhile. A
        // backend error refuses the in-band kick instead of stopping the daemon.
        let worker = self.worker_of(queue)?;
        let serving = self.serving();
        worker
            .update(|table, poller| table.kick(poller, queue, EventSet::IN, &serving, worker.index))
            .map(drop)
            .map_err(io::Error::other)
    }
}

/// Where the connection thread gets its frontends.
enum Source {
    /// Accept frontends; `repeat`: one after another until stopped, else only one.
    Listener { listener: Listener, repeat: bool },
    /// Serve this one connection.
    Connected(Endpoint),
}

/// A handle that stops a daemon from any thread; see [`VhostUserDaemon::shutdown_handle`].
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    signal: Arc<StopSignal>,
}

impl ShutdownHandle {
    /// Stops the daemon: the connection thread closes the connection and returns, worker
    /// threads return after their current dispatch, and `wait` (or `run`) returns `Ok`.
    /// Calling it again, or after the daemon stopped, does nothing more.
    pub fn shutdown(&self) {
        self.signal.request();
    }
}

type MainThread<S> = JoinHandle<(SessionOf<Arc<S>>, Result<(), DaemonError>)>;

/// A vhost-user backend daemon: serves a backend to a frontend over a UNIX socket, with a
/// connection thread and worker threads (see the module documentation).
///
/// The vrings are shared between threads, so `S::Vring` must be `Clone + Send + Sync`
/// ([`VringMutex`](vu_vring::VringMutex) or [`VringRwLock`](vu_vring::VringRwLock)); for
/// [`VringState`](vu_vring::VringState) use [`LocalDaemon`].
///
/// # Example
///
/// Serve one frontend on an already connected socket, then stop from another handle (a
/// device's `main` would call [`serve`](Self::serve) with a socket path instead):
///
/// ```
/// use std::io;
///
/// use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
/// use vmm_sys_util::epoll::EventSet;
/// use vu_daemon::backend::VhostUserBackend;
/// use vu_daemon::VhostUserDaemon;
/// use vu_proto::features::ProtocolFeatures;
/// use vu_proto::socket::Endpoint;
/// use vu_vring::VringMutex;
///
/// struct Idle;
///
/// impl VhostUserBackend for Idle {
///     type Bitmap = ();
///     type Vring = VringMutex;
///     fn num_queues(&self) -> usize { 1 }
///     fn max_queue_size(&self) -> usize { 256 }
///     fn features(&self) -> u64 { 1 << 32 }
///     fn protocol_features(&self) -> ProtocolFeatures { ProtocolFeatures::empty() }
///     fn set_event_idx(&self, _: bool) {}
///     fn update_memory(&self, _: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
///         Ok(())
///     }
///     fn handle_event(&self, _: u16, _: EventSet, _: &[VringMutex], _: usize) -> io::Result<()> {
///         Ok(())
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (ours, _frontend) = Endpoint::pair()?;
/// let mut daemon =
///     VhostUserDaemon::new("idle".to_owned(), Idle, GuestMemoryAtomic::new(GuestMemoryMmap::new()))?;
/// let stop = daemon.shutdown_handle(); // Send + Clone: give it to a signal handler thread
/// daemon.start_connection(ours)?; // returns at once; the connection thread serves
/// stop.shutdown();
/// daemon.wait()?; // Ok: stopped on request
/// # Ok(())
/// # }
/// ```
pub struct VhostUserDaemon<S: VhostUserBackend> {
    name: String,
    shared: Arc<Threaded<S>>,
    session: Option<SessionOf<Arc<S>>>,
    main: Option<MainThread<S>>,
    worker_threads: Vec<JoinHandle<()>>,
    handlers: Vec<Arc<VringEpollHandler>>,
    reading: Reading,
}

impl<S: VhostUserBackend> std::fmt::Debug for VhostUserDaemon<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDaemon")
            .field("name", &self.name)
            .field("workers", &self.handlers)
            .field("started", &self.main.is_some())
            .finish_non_exhaustive()
    }
}

impl<S> VhostUserDaemon<S>
where
    S: VhostUserBackend + Send + Sync + 'static,
    S::Vring: Clone + Send + Sync + 'static,
    S::Bitmap: Send + Sync + 'static,
{
    /// Builds the daemon of `backend` over guest memory `mem`: one vring per queue
    /// (`S::Vring::new(mem.clone(), max_queue_size)`), the session, and the worker threads
    /// (one per mask of `queues_per_thread()`), which start waiting at once.
    ///
    /// `name` names the threads (`<name>-w<index>`, `<name>-conn`).
    pub fn new(name: String, backend: S, mem: Mem<S>) -> Result<Self, DaemonError> {
        let num_queues = backend.num_queues();
        let threads = assign_queues(&backend.queues_per_thread(), num_queues)?;
        let vrings = create_vrings(&backend, &mem)?;
        let signal = Arc::new(StopSignal::new()?);
        let backend = Arc::new(backend);

        let mut owner = vec![0; num_queues];
        let mut workers = Vec::with_capacity(threads.len());
        let mut handlers = Vec::with_capacity(threads.len());
        for (index, queues) in threads.into_iter().enumerate() {
            let (consumer, notifier) = backend.exit_event(index).unzip();
            let worker =
                Worker::new(index, num_queues, consumer).map_err(|source| DaemonError::Io {
                    what: "creating a worker's epoll set",
                    source,
                })?;
            for &q in &queues {
                owner[usize::from(q)] = index;
            }
            handlers.push(Arc::new(worker.handler(num_queues, queues, notifier)));
            workers.push(Arc::new(worker));
        }
        let session = Session::new(backend.clone(), mem, vrings.clone());
        let shared = Arc::new(Threaded {
            backend,
            vrings,
            log: session.dirty_log().clone(),
            workers,
            owner,
            signal,
        });

        let mut daemon = VhostUserDaemon {
            name,
            shared: shared.clone(),
            session: Some(session),
            main: None,
            worker_threads: Vec::new(),
            handlers,
            reading: Reading {
                timeout: Some(DEFAULT_MESSAGE_TIMEOUT),
                polling: DEFAULT_MESSAGE_POLLING,
            },
        };
        for index in 0..shared.workers.len() {
            let shared = shared.clone();
            let thread = thread::Builder::new()
                .name(format!("{}-w{index}", daemon.name))
                .spawn(move || worker_thread(&shared, index))
                .map_err(|source| DaemonError::Io {
                    what: "spawning a worker thread",
                    source,
                })?;
            // On an early return, dropping `daemon` stops the threads spawned so far.
            daemon.worker_threads.push(thread);
        }
        Ok(daemon)
    }

    /// The name given to [`new`](Self::new).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend.
    pub fn backend(&self) -> &S {
        &self.shared.backend
    }

    /// Sets how long reading a message the frontend started may wait for more bytes (and
    /// sending a reply may wait for room); `None` waits forever. A frontend that exceeds it
    /// is disconnected. Between messages the connection thread waits without a limit, so an
    /// idle frontend is never timed out. Applies to connections served afterwards.
    pub fn set_message_timeout(&mut self, timeout: Option<Duration>) {
        self.reading.timeout = timeout;
    }

    /// Sets how long, after handling a message, the connection thread keeps looking for the
    /// next one (a non-blocking `recvmsg`, then `sched_yield`, in a loop) before it blocks in
    /// `recvmsg`; `Duration::ZERO` blocks at once. A frontend sets a device up with tens of
    /// messages sent back to back, each waiting for the previous reply: while the thread
    /// looks, a message costs no wake-up on the backend's side, and a reply that comes
    /// quickly often reaches the frontend before its CPU went idle. Between two CPUs this
    /// takes the handshake's time down several times (docs/performance.md); the cost is at
    /// most the budget of CPU time per message, and nothing while the frontend is quiet.
    /// The default is [`DEFAULT_MESSAGE_POLLING`]. Applies to connections served afterwards.
    /// ([`LocalDaemon::set_message_polling`] does the same on its one epoll set.)
    pub fn set_message_polling(&mut self, budget: Duration) {
        self.reading.polling = budget;
    }

    /// Polling for queue `queue`: after serving a kick of it, its worker spins on the ring for
    /// up to `budget`, serving chains as soon as the driver publishes them, before it sleeps
    /// again; each chain found restarts the budget. A worker whose polled queues go quiet
    /// sleeps in epoll as without polling, so it costs CPU only while the guest is busy (at
    /// most `budget` after each burst). `Duration::ZERO` turns it off. Takes effect at the
    /// queue's next kick; may be called at any time, from any thread. It trades CPU time for
    /// latency: the wake-up of the worker by the kick, tens of microseconds between two
    /// vCPUs, is skipped while the guest keeps it busy.
    ///
    /// Every queue polls by default, adaptively: [`DEFAULT_QUEUE_POLLING`], backing off where
    /// polling does not pay. A window that closes with nothing found, or during which the
    /// worker was preempted (another task wanted its CPU: the driver itself when both share
    /// one CPU, where spinning only delays it), makes the queue's next served kick open no
    /// window, then 2, 4, ... up to 1024 after each window that does not pay; a window that
    /// finds chains without losing the CPU ends the backoff. So on a CPU of its own a busy
    /// queue is polled, and on a shared one it is served on kicks, with a window tried now
    /// and then. A budget set here is the device's decision and does not back off: the
    /// worker polls after every kick, so give it a CPU of its own.
    ///
    /// While the queue is polled, the driver is asked not to kick
    /// ([`VringData::hold_kicks`](vu_vring::VringData::hold_kicks)): a device's own
    /// `enable_notification` then returns `false` and leaves kicks suppressed, as the worker
    /// looks at the ring itself; notifications are re-enabled, with the usual re-check, before
    /// the worker sleeps.
    ///
    /// Fails (an `Io` error of kind `InvalidInput`) if the queue does not exist.
    pub fn set_polling(&self, queue: u16, budget: Duration) -> Result<(), DaemonError> {
        self.shared
            .worker_of(queue)
            .and_then(|w| w.set_polling(queue, budget))
            .map_err(|source| DaemonError::Io {
                what: "setting a queue's polling budget",
                source,
            })
    }

    /// One epoll handler per worker thread, in thread order, through which the backend adds
    /// its own fds to the worker's epoll set.
    pub fn get_epoll_handlers(&self) -> Vec<Arc<VringEpollHandler>> {
        self.handlers.clone()
    }

    /// A handle that stops the daemon from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            signal: self.shared.signal.clone(),
        }
    }

    /// Stops the daemon (as [`ShutdownHandle::shutdown`]) without waiting.
    pub fn request_shutdown(&self) {
        self.shared.signal.request();
    }

    /// Serves one frontend accepted on `listener`, on the connection thread; returns at once.
    /// [`wait`](Self::wait) returns when that frontend disconnects (or the daemon stops), after
    /// which the daemon can be started again.
    pub fn start(&mut self, listener: Listener) -> Result<(), DaemonError> {
        self.spawn_main(Source::Listener {
            listener,
            repeat: false,
        })
    }

    /// Serves frontends accepted on `listener` one after another (a frontend that reconnects,
    /// as QEMU does, finds the daemon ready) until the daemon stops; returns at once.
    pub fn start_serving(&mut self, listener: Listener) -> Result<(), DaemonError> {
        self.spawn_main(Source::Listener {
            listener,
            repeat: true,
        })
    }

    /// Client mode: connects to a frontend listening on `path` and serves that connection.
    pub fn start_client(&mut self, path: impl AsRef<Path>) -> Result<(), DaemonError> {
        let endpoint = Endpoint::connect(path)?;
        self.start_connection(endpoint)
    }

    /// Serves an already connected socket (for example one inherited from a parent process
    /// through [`Endpoint::from_fd`]).
    pub fn start_connection(&mut self, endpoint: Endpoint) -> Result<(), DaemonError> {
        self.spawn_main(Source::Connected(endpoint))
    }

    /// Binds `path` (replacing a stale socket left by a previous run), serves frontends one
    /// after another, and returns when the daemon stops.
    pub fn serve(&mut self, path: impl AsRef<Path>) -> Result<(), DaemonError> {
        let listener = Listener::bind_replacing_stale(path)?;
        self.start_serving(listener)?;
        self.wait()
    }

    /// Waits for the connection thread (if started) to return, and returns why it did: `Ok`
    /// when the frontend disconnected (single connection), or the daemon was shut down or the
    /// backend wrote its exit event; the error of a failed worker (`handle_event` error or
    /// panic) or of the connection otherwise. When the daemon is stopping, also waits for the
    /// worker threads.
    pub fn wait(&mut self) -> Result<(), DaemonError> {
        let result = match self.main.take() {
            None => Ok(()),
            Some(main) => match main.join() {
                Ok((session, result)) => {
                    self.session = Some(session);
                    result
                }
                Err(payload) => Err(DaemonError::Panicked {
                    thread: None,
                    message: panic_message(payload.as_ref()),
                }),
            },
        };
        if self.shared.signal.is_stopping() {
            self.stop_workers();
        }
        match self.shared.signal.take_failure() {
            Some(failure) => Err(failure),
            None => result,
        }
    }

    /// Stops the daemon and waits for its threads: [`request_shutdown`](Self::request_shutdown)
    /// then [`wait`](Self::wait).
    pub fn stop(&mut self) -> Result<(), DaemonError> {
        self.request_shutdown();
        self.wait()
    }

    fn spawn_main(&mut self, source: Source) -> Result<(), DaemonError> {
        if self.main.is_some() {
            return Err(DaemonError::AlreadyStarted);
        }
        if self.shared.signal.is_stopping() {
            return Err(self
                .shared
                .signal
                .take_failure()
                .unwrap_or(DaemonError::Stopped));
        }
        let Some(mut session) = self.session.take() else {
            // Only a panicked connection thread loses the session.
            return Err(DaemonError::Stopped);
        };
        let shared = self.shared.clone();
        let reading = self.reading;
        let thread = thread::Builder::new()
            .name(format!("{}-conn", self.name))
            .spawn(move || {
                let result = connection_thread(&shared, &mut session, source, reading);
                (session, result)
            })
            .map_err(|source| DaemonError::Io {
                what: "spawning the connection thread",
                source,
            })?;
        self.main = Some(thread);
        Ok(())
    }

    fn stop_workers(&mut self) {
        for w in &self.shared.workers {
            w.request_stop();
        }
        for thread in self.worker_threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a worker thread panicked while stopping");
            }
        }
    }
}

impl<S: VhostUserBackend> Drop for VhostUserDaemon<S> {
    fn drop(&mut self) {
        // Our own stop events, not the backend's exit events: dropping never depends on the
        // backend having one.
        self.shared.signal.request();
        if let Some(main) = self.main.take() {
            let _ = main.join();
        }
        for w in &self.shared.workers {
            w.request_stop();
        }
        for thread in self.worker_threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The body of worker thread `index`.
fn worker_thread<S: VhostUserBackend>(shared: &Threaded<S>, index: usize) {
    let Some(worker) = shared.workers.get(index) else {
        return;
    };
    let serving = shared.serving();
    let num_queues = shared.vrings.len();
    match catch_unwind(AssertUnwindSafe(|| worker.run(num_queues, &serving))) {
        Ok(Ok(Ending::Stopped)) => {}
        Ok(Ok(Ending::ExitEvent)) => {
            log::info!("worker {index}: the backend's exit event was written; stopping");
            shared.signal.request();
        }
        Ok(Err(e)) => shared.signal.fail(e),
        Err(payload) => shared.signal.fail(DaemonError::Panicked {
            thread: Some(index),
            message: panic_message(payload.as_ref()),
        }),
    }
}

/// The body of the connection thread.
fn connection_thread<S: VhostUserBackend>(
    shared: &Threaded<S>,
    session: &mut SessionOf<Arc<S>>,
    source: Source,
    reading: Reading,
) -> Result<(), DaemonError> {
    match source {
        Source::Connected(endpoint) => {
            let end = serve_connection(shared, session, &endpoint, reading)?;
            single_result(end)
        }
        Source::Listener { listener, repeat } => loop {
            let Some(endpoint) = accept(&listener, &shared.signal)? else {
                return Ok(());
            };
            let end = serve_connection(shared, session, &endpoint, reading)?;
            if !repeat {
                return single_result(end);
            }
            if matches!(end, ConnEnd::Stopped) {
                return Ok(());
            }
        },
    }
}

/// What `wait` returns after the one connection a daemon served.
fn single_result(end: ConnEnd) -> Result<(), DaemonError> {
    match end {
        ConnEnd::Broken(e) => Err(DaemonError::Socket(e)),
        ConnEnd::Disconnected | ConnEnd::Closed | ConnEnd::Stopped => Ok(()),
    }
}

/// Serves one frontend until it goes away or the daemon stops; then resets the session.
fn serve_connection<S: VhostUserBackend>(
    shared: &Threaded<S>,
    session: &mut SessionOf<Arc<S>>,
    endpoint: &Endpoint,
    reading: Reading,
) -> Result<ConnEnd, DaemonError> {
    let signal = &shared.signal;
    shared.signal.set_connection(Some(endpoint));
    let end = message_loop(shared, session, endpoint, reading);
    signal.set_connection(None);
    session.disconnect(&mut &*shared);
    shared.unwatch_all();
    let end = end?;
    let end = if signal.is_stopping() {
        ConnEnd::Stopped
    } else {
        end
    };
    end.log();
    Ok(end)
}

fn message_loop<S: VhostUserBackend>(
    shared: &Threaded<S>,
    session: &mut SessionOf<Arc<S>>,
    endpoint: &Endpoint,
    reading: Reading,
) -> Result<ConnEnd, DaemonError> {
    if let Err(e) = prepare(endpoint, reading.timeout) {
        return Ok(ConnEnd::Broken(e));
    }
    // The thread blocks in recvmsg(2) itself, not in epoll: one system call less per message.
    // A stop shuts the socket down (`StopSignal::request`), which wakes the read with an end
    // of file; a read timeout with nothing of a message read is not an error (`Ok(None)`), so
    // an idle frontend is never dropped, and the loop looks at the stop flag again. `prepare`
    // turns read-ahead on: a message already buffered is served without a system call, but
    // only after the stop flag was looked at, so buffered messages never outlive a stop.
    // After each message the thread first polls for the next one (`set_message_polling`),
    // looking at the stop flag as it goes.
    let mut poll_until = None;
    loop {
        if shared.signal.is_stopping() {
            return Ok(ConnEnd::Stopped);
        }
        let received = match poll_until.take() {
            Some(until) => receive_polling(endpoint, until, &shared.signal),
            None => receive(endpoint),
        };
        let msg = match received {
            Ok(Some(msg)) => msg,
            Ok(None) => continue,
            Err(end) => return Ok(end),
        };
        let outcome = session.handle(msg, &mut &*shared);
        shared.rearm();
        if let Err(end) = respond(endpoint, outcome) {
            return Ok(end);
        }
        if !reading.polling.is_zero() {
            poll_until = Instant::now().checked_add(reading.polling);
        }
    }
}
