//! [`DaemonError`]: why the daemon could not be built, could not start, or stopped. It sits
//! beside `daemon` rather than in it so that the worker threads, which the daemon starts,
//! speak it without importing the daemon (the dependency runs one way: daemon -> worker).

use std::io;

use vu_proto::socket::SocketError;

/// Why the daemon could not be built, could not start, or why it stopped.
///
/// Errors of one frontend connection (a broken socket, a stalled frontend) end that
/// connection; they reach [`wait`](crate::daemon::VhostUserDaemon::wait) only when the daemon
/// served that one connection ([`start`](crate::daemon::VhostUserDaemon::start),
/// [`start_client`](crate::daemon::VhostUserDaemon::start_client)). A daemon serving frontends
/// one after another logs them and accepts the next frontend.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The backend's `queues_per_thread()` returned no mask: there would be no worker thread.
    #[error("queues_per_thread() returned no mask: at least one worker thread is needed")]
    NoThreads,
    /// A queue is in no mask of `queues_per_thread()`: nothing would ever serve it.
    #[error("queue {queue} is in no mask of queues_per_thread()")]
    QueueWithoutThread {
        /// The queue left out.
        queue: u16,
    },
    /// A queue is in two masks of `queues_per_thread()`: two threads would race on it.
    #[error("queue {queue} is in the masks of threads {first} and {second}")]
    QueueInSeveralThreads {
        /// The queue.
        queue: u16,
        /// The first thread claiming it.
        first: usize,
        /// The second thread claiming it.
        second: usize,
    },
    /// The backend declares more queues than a queue index (`u16`) can name.
    #[error("the backend declares {num_queues} queues, at most 65535 are possible")]
    TooManyQueues {
        /// `num_queues()` of the backend.
        num_queues: usize,
    },
    /// The backend's `max_queue_size()` does not fit a queue size (`u16`).
    #[error("max_queue_size() is {max_queue_size}, more than a queue can have (32768)")]
    MaxQueueSizeTooLarge {
        /// `max_queue_size()` of the backend.
        max_queue_size: usize,
    },
    /// The vring of a queue could not be created (for example `max_queue_size()` is not a
    /// power of two, or is above 32768).
    #[error(
        "cannot create the vring of queue {queue} (max queue size {max_queue_size}): {source}"
    )]
    Vring {
        /// The queue.
        queue: u16,
        /// `max_queue_size()` of the backend.
        max_queue_size: usize,
        /// Why.
        #[source]
        source: vu_vring::Error,
    },
    /// An epoll set, an eventfd or a thread could not be created, or `epoll_wait` failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Waiting on a worker's epoll set failed.
    #[error("epoll_wait of {} failed: {source}", thread_name(*thread))]
    Epoll {
        /// The worker thread, `None` for the thread that reads the socket.
        thread: Option<usize>,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Binding, accepting or connecting the vhost-user socket failed, or the one connection
    /// the daemon served broke.
    #[error("vhost-user socket: {0}")]
    Socket(#[from] SocketError),
    /// The backend's `handle_event` returned an error: the daemon stopped.
    #[error("handle_event(device_event {device_event}) on worker {thread} failed: {source}")]
    HandleEvent {
        /// The worker thread.
        thread: usize,
        /// The device event (queue index, or a backend-registered value).
        device_event: u16,
        /// The backend's error.
        #[source]
        source: io::Error,
    },
    /// The backend's `handle_event` panicked: the panic was caught and the daemon stopped.
    #[error("handle_event(device_event {device_event}) on worker {thread} panicked: {message}")]
    BackendPanicked {
        /// The worker thread.
        thread: usize,
        /// The device event being handled.
        device_event: u16,
        /// The panic message.
        message: String,
    },
    /// Reading a queue's kick eventfd failed: the daemon stopped.
    #[error("reading the kick eventfd of queue {queue} failed: {source}")]
    Kick {
        /// The queue.
        queue: u16,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A thread of the daemon panicked outside the backend (a bug in the daemon).
    #[error("{} panicked: {message}", thread_name(*thread))]
    Panicked {
        /// The worker thread, `None` for the thread that reads the socket.
        thread: Option<usize>,
        /// The panic message.
        message: String,
    },
    /// The daemon is already serving a frontend: call `wait` first.
    #[error("the daemon is already started")]
    AlreadyStarted,
    /// The daemon was stopped (shutdown, exit event or a failure) and cannot serve again.
    #[error("the daemon was stopped")]
    Stopped,
}

fn thread_name(thread: Option<usize>) -> String {
    match thread {
        Some(t) => format!("worker {t}"),
        None => "the connection thread".to_owned(),
    }
}
