//! The listening socket a backend accepts its frontend connection on.
//!
//! The spec's "Backend program conventions" give a backend two ways to get it:
//! `--socket-path=PATH` (the backend binds and listens on a new socket at `PATH`) and
//! `--fd=FDNUM` (the backend inherits the socket). [`Listener::bind`] and
//! [`Listener::from_fd`] are those two; the spec does not say whether an inherited socket
//! is listening or already connected, and launchers do both, so a connected one is
//! adopted with [`Endpoint::from_fd`] instead.
//!
//! # Invariants
//!
//! - A listener removes its socket file on drop only if it created that file, and only
//!   if the path still names the very socket it bound (same device and inode): a file
//!   that someone replaced meanwhile is left alone. An inherited socket's path is never
//!   touched.
//! - [`Listener::bind`] never deletes anything. An existing file at the path is refused
//!   with [`SocketError::AddressInUse`], which names the path. A socket file left behind
//!   by a crashed backend can be replaced with [`Listener::bind_replacing_stale`], which
//!   removes the file only when it is a socket and nobody listens on it.
//! - [`Listener::bind`]'s path names a socket that already listens from the instant it
//!   appears (bound and listening under a private name beside it, then linked): a launcher
//!   that starts the frontend as soon as the file exists never sees a refused connection.
//! - An inherited fd is checked (`SO_DOMAIN`, `SO_TYPE`, `SO_ACCEPTCONN`) before use and
//!   made close-on-exec, so it does not leak into programs the backend may start.
//!
//! [`Endpoint::from_fd`]: crate::socket::Endpoint::from_fd

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::socket::{adopt_inherited, Endpoint, Role, SocketError};

/// A listening `AF_UNIX` stream socket that accepts vhost-user connections.
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    created: Option<CreatedPath>,
}

/// The socket file a listener created, identified so that drop removes only that file.
#[derive(Debug)]
struct CreatedPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Listener {
    /// Binds and listens on a new socket at `path`.
    ///
    /// Refuses with [`SocketError::AddressInUse`] if anything exists at `path`; nothing
    /// is deleted. The socket file is removed when the listener is dropped.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, SocketError> {
        let path = path.as_ref();
        let bind_error = |source: io::Error| {
            if source.kind() == io::ErrorKind::AddrInUse
                || source.kind() == io::ErrorKind::AlreadyExists
            {
                SocketError::AddressInUse {
                    path: path.to_path_buf(),
                }
            } else {
                SocketError::Bind {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        // bind(2) creates the file before listen(2) makes it accept: a frontend started
        // as soon as the file appears (QEMU after a launcher waited for the path) could
        // be refused in between. So the socket binds and listens under a private name in
        // the same directory, and only then gets `path` as a second name: link(2) refuses
        // an existing path as bind(2) does, and the path names a listening socket from
        // its first instant. A path too long for that private name binds directly.
        let socket = match staging_path(path) {
            Some(staging) => {
                let socket = UnixListener::bind(&staging).map_err(bind_error)?;
                let linked = fs::hard_link(&staging, path);
                // The private name is ours alone: nothing else can have it to lose.
                let _ = fs::remove_file(&staging);
                linked.map_err(bind_error)?;
                socket
            }
            None => UnixListener::bind(path).map_err(bind_error)?,
        };
        // If the file is already gone (someone removed it in between), there is nothing
        // of ours to remove on drop.
        let created = fs::symlink_metadata(path).ok().map(|meta| CreatedPath {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        });
        Ok(Listener { socket, created })
    }

    /// Like [`Listener::bind`], but first removes a stale socket file at `path`.
    ///
    /// The file is removed only if it is a socket and connecting to it is refused
    /// (`ECONNREFUSED`: nobody listens on it). If somebody does listen, the probe
    /// connection is closed at once (that listener sees a connection that ends
    /// immediately; if its backlog is full, the probe waits for room) and the call fails
    /// with [`SocketError::AddressInUse`]; a file that is
    /// not a socket is never removed. Between the probe and the new bind another process
    /// could take the path; that race ends in [`SocketError::AddressInUse`], not in
    /// removing a live socket, unless that process binds in the instant between the
    /// probe and the removal.
    pub fn bind_replacing_stale(path: impl AsRef<Path>) -> Result<Self, SocketError> {
        let path = path.as_ref();
        match Listener::bind(path) {
            Err(SocketError::AddressInUse { .. }) => {}
            other => return other,
        }
        let in_use = || SocketError::AddressInUse {
            path: path.to_path_buf(),
        };
        let is_socket = fs::symlink_metadata(path)
            .map(|meta| meta.file_type().is_socket())
            .unwrap_or(false);
        if !is_socket {
            return Err(in_use());
        }
        match UnixStream::connect(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            _ => return Err(in_use()),
        }
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SocketError::Bind {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        Listener::bind(path)
    }

    /// Adopts an inherited listening socket (the `--fd` convention).
    ///
    /// Checks that `fd` is an `AF_UNIX` `SOCK_STREAM` socket on which `listen` was
    /// called, and sets close-on-exec on it; on failure the fd is closed and the error is
    /// [`SocketError::UnusableFd`]. The listener never removes any file for an inherited
    /// socket. The spec leaves open whether the inherited socket is listening or
    /// connected; a connected one is adopted with [`Endpoint::from_fd`].
    pub fn from_fd(fd: OwnedFd) -> Result<Self, SocketError> {
        adopt_inherited(fd.as_fd(), Role::Listening)?;
        Ok(Listener {
            socket: UnixListener::from(fd),
            created: None,
        })
    }

    /// Waits for and accepts one connection. The accepted socket is close-on-exec and
    /// blocking, whatever the listener's mode.
    pub fn accept(&self) -> Result<Endpoint, SocketError> {
        let (stream, _addr) = self.socket.accept()?;
        Ok(Endpoint::new(stream))
    }

    /// The path of the socket file this listener created, if it created one.
    pub fn path(&self) -> Option<&Path> {
        self.created.as_ref().map(|created| created.path.as_path())
    }

    /// Puts the listener in or out of non-blocking mode; a non-blocking
    /// [`Listener::accept`] with no pending connection fails with [`SocketError::Io`] of
    /// kind `WouldBlock`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), SocketError> {
        Ok(self.socket.set_nonblocking(nonblocking)?)
    }

    /// The underlying listening socket.
    pub fn socket(&self) -> &UnixListener {
        &self.socket
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let Some(created) = &self.created else {
            return;
        };
        let still_ours = fs::symlink_metadata(&created.path)
            .map(|meta| meta.dev() == created.dev && meta.ino() == created.ino)
            .unwrap_or(false);
        if still_ours {
            if let Err(e) = fs::remove_file(&created.path) {
                log::warn!("cannot remove socket {}: {e}", created.path.display());
            }
        }
    }
}

/// `sun_path`'s size: a socket path (with its terminating NUL) must fit in it.
const SUN_PATH_LEN: usize = 108;

/// A private name beside `path` to bind and listen under before `path` appears, or `None`
/// when that name would not fit in `sun_path`.
fn staging_path(path: &Path) -> Option<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        ".vu-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let staging = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => PathBuf::from(name),
    };
    (staging.as_os_str().len() < SUN_PATH_LEN).then_some(staging)
}
