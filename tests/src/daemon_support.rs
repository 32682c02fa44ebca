//! Running a [`VhostUserDaemon`] over an [`EchoBackend`] on a real socket, and bounding
//! operations that could hang in time.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vmm_sys_util::tempdir::TempDir;
use vu_backend::{VhostUserDaemon, VringMutex};
use vu_proto::frontend::Frontend;
use vu_proto::listener::Listener;

use crate::backends::EchoBackend;
use crate::device::{socket_path, DeviceSetup, TestDevice, DEVICE_TIMEOUT};
use crate::virtqueue::{Buf, SplitQueue};

/// The daemon type of the tests: an echo backend shared with the test through an `Arc`.
pub type EchoDaemon = VhostUserDaemon<Arc<EchoBackend<VringMutex>>>;

/// A daemon serving an echo backend on a socket in a temporary directory.
#[derive(Debug)]
pub struct Running {
    /// The daemon.
    pub daemon: EchoDaemon,
    /// The backend, shared with the daemon.
    pub backend: Arc<EchoBackend<VringMutex>>,
    /// The socket path.
    pub path: PathBuf,
    _dir: TempDir,
}

impl Running {
    /// Builds the daemon and serves frontends one after another on a fresh socket.
    pub fn serving(backend: EchoBackend<VringMutex>) -> Self {
        let mut running = Running::built(backend);
        let listener = Listener::bind(&running.path).expect("bind");
        running
            .daemon
            .start_serving(listener)
            .expect("start_serving");
        running
    }

    /// Builds the daemon and binds the socket, without starting it; see [`Running::listener`].
    pub fn built(backend: EchoBackend<VringMutex>) -> Self {
        let (dir, path) = socket_path();
        let backend = Arc::new(backend);
        let daemon = VhostUserDaemon::new(
            "vu-test".to_owned(),
            backend.clone(),
            vu_backend::GuestMemoryAtomic::new(vu_backend::GuestMemoryMmap::new()),
        )
        .expect("daemon");
        Running {
            daemon,
            backend,
            path,
            _dir: dir,
        }
    }

    /// A listener bound to the socket path.
    pub fn listener(&self) -> Listener {
        Listener::bind(&self.path).expect("bind")
    }

    /// Connects a frontend with a reply timeout.
    pub fn frontend(&self) -> Frontend {
        let fe = Frontend::connect(&self.path).expect("connect");
        fe.set_reply_timeout(Some(DEVICE_TIMEOUT))
            .expect("reply timeout");
        fe
    }

    /// Connects and sets up a device.
    pub fn device(&self, setup: &DeviceSetup) -> TestDevice {
        TestDevice::setup(self.frontend(), setup)
    }
}

/// Posts `rounds` bursts of five two-byte chains on `queue`, each with a kick, and checks
/// that the echo backend returns every one of them and leaves none in flight. With a small
/// ring that is more chains than it has entries: the indexes wrap.
pub fn echo_bursts(queue: &mut SplitQueue, rounds: u8) {
    let mut seen = 0u32;
    for round in 0..rounds {
        for i in 0..5u8 {
            queue.post_and_kick(&[Buf::Readable(vec![round, i]), Buf::Writable(2)]);
        }
        for used in queue.wait_used(5, DEVICE_TIMEOUT) {
            assert_eq!(used.len, 2);
            assert_eq!(used.written[0][0], round);
            seen += 1;
        }
    }
    assert_eq!(seen, u32::from(rounds) * 5);
    assert_eq!(queue.in_flight(), 0);
}

/// Runs `f` on another thread and returns its result, panicking if it takes longer than
/// `timeout` (the thread is then left behind).
pub fn within<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// A [`LocalDaemon`](vu_backend::LocalDaemon) over an echo backend with
/// [`VringState`](vu_backend::VringState) vrings, running on a thread of its own (which stands
/// for the caller's thread of a real device).
#[derive(Debug)]
pub struct LocalRunning {
    /// Stops the daemon.
    pub handle: vu_backend::ShutdownHandle,
    /// The backend, shared with the daemon.
    pub backend: Arc<EchoBackend<vu_backend::VringState>>,
    /// The epoll handler of the daemon's one thread.
    pub epoll: Arc<vu_backend::VringEpollHandler>,
    /// The socket path.
    pub path: PathBuf,
    result: mpsc::Receiver<Result<(), vu_backend::DaemonError>>,
    _dir: TempDir,
}

impl LocalRunning {
    /// Binds a socket and runs the daemon on a new thread until it stops.
    pub fn serving(backend: EchoBackend<vu_backend::VringState>) -> Self {
        Self::start(backend, None)
    }

    /// As [`serving`](Self::serving), with `set_message_polling(budget)`.
    pub fn polling(backend: EchoBackend<vu_backend::VringState>, budget: Duration) -> Self {
        Self::start(backend, Some(budget))
    }

    fn start(backend: EchoBackend<vu_backend::VringState>, polling: Option<Duration>) -> Self {
        let (dir, path) = socket_path();
        let listener = Listener::bind(&path).expect("bind");
        let backend = Arc::new(backend);
        let shared = backend.clone();
        let (setup_tx, setup_rx) = mpsc::channel();
        let (result_tx, result_rx) = mpsc::channel();
        thread::spawn(move || {
            let mut daemon = vu_backend::LocalDaemon::new(
                "vu-local".to_owned(),
                shared,
                vu_backend::GuestMemoryAtomic::new(vu_backend::GuestMemoryMmap::new()),
            )
            .expect("local daemon");
            if let Some(budget) = polling {
                daemon.set_message_polling(budget);
            }
            let _ = setup_tx.send((daemon.shutdown_handle(), daemon.epoll_handler()));
            let _ = result_tx.send(daemon.run(&listener));
        });
        let (handle, epoll) = setup_rx
            .recv_timeout(DEVICE_TIMEOUT)
            .expect("local daemon built");
        LocalRunning {
            handle,
            backend,
            epoll,
            path,
            result: result_rx,
            _dir: dir,
        }
    }

    /// Connects and sets up a device.
    pub fn device(&self, setup: &DeviceSetup) -> TestDevice {
        let fe = Frontend::connect(&self.path).expect("connect");
        TestDevice::setup(fe, setup)
    }

    /// Waits for `run` to return, at most `timeout`.
    pub fn result(&self, timeout: Duration) -> Result<(), vu_backend::DaemonError> {
        self.result
            .recv_timeout(timeout)
            .expect("the local daemon returned within the timeout")
    }
}
