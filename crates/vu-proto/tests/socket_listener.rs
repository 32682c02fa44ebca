//! `vu_proto::listener::Listener`: binding a path, adopting an inherited fd, accepting,
//! and which socket files it removes (only its own) or refuses to bind over; and
//! `Endpoint::from_fd`, the other way to adopt an inherited socket.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use vu_proto::header::{Header, HeaderFlags};
use vu_proto::listener::Listener;
use vu_proto::request::RequestCode;
use vu_proto::socket::{Endpoint, FdProblem, SocketError};

/// A directory of its own for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("vu-proto-listener-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path)
        .map(|meta| meta.file_type().is_socket())
        .unwrap_or(false)
}

// Raw `fcntl` and `socket` calls: the fd flags these tests set and check, and a socket
// that no std type leaves unconnected.
#[allow(unsafe_code)]
fn cloexec(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GETFD takes no argument and touches no memory; `fd` is borrowed, open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    assert!(flags >= 0);
    flags & libc::FD_CLOEXEC != 0
}

/// Clears close-on-exec on `fd`, as an fd inherited across exec would be.
#[allow(unsafe_code)]
fn clear_cloexec(fd: BorrowedFd<'_>) {
    // SAFETY: F_SETFD takes an integer and touches no memory; the fd is borrowed, open.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    assert_eq!(rc, 0);
}

/// Connects to `listener` at `path` and checks one message crosses the connection.
fn check_connection(listener: &Listener, path: &Path) {
    let client = Endpoint::connect(path).unwrap();
    let server = listener.accept().unwrap();
    let header = Header::new(RequestCode(1), HeaderFlags::empty(), 2);
    client.send_message(&header, b"hi", &[]).unwrap();
    assert_eq!(server.recv_message().unwrap().body, b"hi");
}

#[test]
fn bound_listener_accepts_a_connection() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    let listener = Listener::bind(&path).unwrap();
    assert_eq!(listener.path(), Some(path.as_path()));
    check_connection(&listener, &path);
}

#[test]
fn accepted_endpoint_is_cloexec() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    let listener = Listener::bind(&path).unwrap();
    let _client = Endpoint::connect(&path).unwrap();
    let server = listener.accept().unwrap();
    assert!(cloexec(server.as_fd()));
}

#[test]
fn drop_removes_the_socket_file_it_created() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    let listener = Listener::bind(&path).unwrap();
    assert!(is_socket(&path));
    drop(listener);
    assert!(!path.exists());
}

#[test]
fn drop_leaves_a_file_that_replaced_its_socket_alone() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    let first = Listener::bind(&path).unwrap();
    fs::remove_file(&path).unwrap();
    let second = Listener::bind(&path).unwrap();
    drop(first);
    assert!(is_socket(&path));
    check_connection(&second, &path);
}

#[test]
fn bind_over_an_existing_file_is_refused_naming_the_path() {
    let dir = TempDir::new();
    let path = dir.path("file");
    fs::write(&path, b"keep me").unwrap();
    match Listener::bind(&path) {
        Err(SocketError::AddressInUse { path: named }) => assert_eq!(named, path),
        other => panic!("expected AddressInUse, got {other:?}"),
    }
    assert_eq!(fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn bind_over_a_stale_socket_is_refused_and_leaves_it() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    // The standard library does not remove the file on drop: this leaves a stale socket.
    drop(UnixListener::bind(&path).unwrap());
    assert!(matches!(
        Listener::bind(&path),
        Err(SocketError::AddressInUse { .. })
    ));
    assert!(is_socket(&path));
}

#[test]
fn bind_replacing_stale_replaces_a_socket_nobody_listens_on() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    drop(UnixListener::bind(&path).unwrap());
    let listener = Listener::bind_replacing_stale(&path).unwrap();
    check_connection(&listener, &path);
}

#[test]
fn bind_replacing_stale_refuses_a_live_socket() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    let live = Listener::bind(&path).unwrap();
    assert!(matches!(
        Listener::bind_replacing_stale(&path),
        Err(SocketError::AddressInUse { .. })
    ));
    // The probe connection is pending on the live listener; it still serves new ones.
    drop(live.accept().unwrap());
    check_connection(&live, &path);
}

#[test]
fn bind_replacing_stale_never_removes_a_file_that_is_not_a_socket() {
    let dir = TempDir::new();
    let path = dir.path("file");
    fs::write(&path, b"keep me").unwrap();
    assert!(matches!(
        Listener::bind_replacing_stale(&path),
        Err(SocketError::AddressInUse { .. })
    ));
    assert_eq!(fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn bind_in_a_missing_directory_is_a_bind_error_naming_the_path() {
    let dir = TempDir::new();
    let path = dir.path("missing/sock");
    match Listener::bind(&path) {
        Err(SocketError::Bind { path: named, .. }) => assert_eq!(named, path),
        other => panic!("expected Bind, got {other:?}"),
    }
}

#[test]
fn connect_to_a_missing_path_is_a_connect_error_naming_the_path() {
    let dir = TempDir::new();
    let path = dir.path("nobody");
    match Endpoint::connect(&path) {
        Err(SocketError::Connect { path: named, .. }) => assert_eq!(named, path),
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[test]
fn from_fd_adopts_a_listening_socket_and_never_removes_its_file() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    let inherited = OwnedFd::from(UnixListener::bind(&path).unwrap());
    let listener = Listener::from_fd(inherited).unwrap();
    assert_eq!(listener.path(), None);
    check_connection(&listener, &path);
    drop(listener);
    assert!(is_socket(&path));
}

#[test]
fn from_fd_sets_close_on_exec() {
    let dir = TempDir::new();
    let inherited = OwnedFd::from(UnixListener::bind(dir.path("sock")).unwrap());
    clear_cloexec(inherited.as_fd());
    assert!(!cloexec(inherited.as_fd()));
    let listener = Listener::from_fd(inherited).unwrap();
    assert!(cloexec(listener.as_fd()));
}

#[test]
fn from_fd_refuses_a_file_that_is_not_a_socket() {
    let file = OwnedFd::from(fs::File::open("/dev/null").unwrap());
    assert!(matches!(
        Listener::from_fd(file),
        Err(SocketError::UnusableFd {
            problem: FdProblem::NotASocket,
            ..
        })
    ));
}

#[test]
fn from_fd_refuses_a_connected_stream_socket() {
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(matches!(
        Listener::from_fd(OwnedFd::from(a)),
        Err(SocketError::UnusableFd {
            problem: FdProblem::NotListening,
            ..
        })
    ));
}

#[test]
fn from_fd_refuses_a_datagram_socket() {
    let socket = UnixDatagram::unbound().unwrap();
    assert!(matches!(
        Listener::from_fd(OwnedFd::from(socket)),
        Err(SocketError::UnusableFd {
            problem: FdProblem::Type(libc::SOCK_DGRAM),
            ..
        })
    ));
}

#[test]
fn from_fd_refuses_a_socket_of_another_domain() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(matches!(
        Listener::from_fd(OwnedFd::from(tcp)),
        Err(SocketError::UnusableFd {
            problem: FdProblem::Domain(libc::AF_INET),
            ..
        })
    ));
}

#[test]
fn nonblocking_accept_without_a_pending_connection_is_would_block() {
    let dir = TempDir::new();
    let listener = Listener::bind(dir.path("sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(SocketError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        other => panic!("expected WouldBlock, got {other:?}"),
    }
}

#[test]
fn endpoint_from_fd_adopts_a_connected_socket() {
    let (a, b) = UnixStream::pair().unwrap();
    let inherited = OwnedFd::from(a);
    clear_cloexec(inherited.as_fd());
    let endpoint = Endpoint::from_fd(inherited).unwrap();
    assert!(cloexec(endpoint.as_fd()));
    let peer = Endpoint::new(b);
    let header = Header::new(RequestCode(1), HeaderFlags::empty(), 2);
    peer.send_message(&header, b"hi", &[]).unwrap();
    assert_eq!(endpoint.recv_message().unwrap().body, b"hi");
}

#[test]
fn endpoint_from_fd_refuses_a_listening_socket() {
    let dir = TempDir::new();
    let inherited = OwnedFd::from(UnixListener::bind(dir.path("sock")).unwrap());
    assert!(matches!(
        Endpoint::from_fd(inherited),
        Err(SocketError::UnusableFd {
            problem: FdProblem::Listening,
            ..
        })
    ));
}

#[test]
#[allow(unsafe_code)] // socket(2): std has no unconnected stream socket.
fn endpoint_from_fd_refuses_an_unconnected_socket() {
    // SAFETY: socket() takes integers and touches no memory.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: `raw` was just returned by socket() and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    assert!(matches!(
        Endpoint::from_fd(fd),
        Err(SocketError::UnusableFd {
            problem: FdProblem::NotConnected,
            ..
        })
    ));
}

#[test]
fn endpoint_from_fd_refuses_a_file_that_is_not_a_socket() {
    let file = OwnedFd::from(fs::File::open("/dev/null").unwrap());
    assert!(matches!(
        Endpoint::from_fd(file),
        Err(SocketError::UnusableFd {
            problem: FdProblem::NotASocket,
            ..
        })
    ));
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn bound_path_is_the_only_name_left_and_accepts_at_once() {
    // The socket listens under a private name first and gets the path as a second name
    // (so the path never names a socket that refuses connections): that private name
    // must be gone, the path must accept, and drop must remove the path.
    let dir = TempDir::new();
    let path = dir.path("vu.sock");
    let listener = Listener::bind(&path).unwrap();
    assert_eq!(names_in(&dir.0), ["vu.sock"]);
    assert!(is_socket(&path));
    let _client = UnixStream::connect(&path).unwrap();
    let _endpoint = listener.accept().unwrap();
    drop(listener);
    assert!(names_in(&dir.0).is_empty());
}

#[test]
fn path_too_long_for_a_private_name_beside_it_still_binds() {
    // 100 bytes in all: the path fits in sun_path, a longer private name beside it
    // would not, so the listener binds the path itself.
    let dir = TempDir::new();
    let room = 100 - dir.0.as_os_str().len() - 1;
    let path = dir.path(&"s".repeat(room));
    assert_eq!(path.as_os_str().len(), 100);
    let listener = Listener::bind(&path).unwrap();
    assert_eq!(
        names_in(&dir.0),
        [path.file_name().unwrap().to_string_lossy()]
    );
    let _client = UnixStream::connect(&path).unwrap();
    drop(listener);
    assert!(names_in(&dir.0).is_empty());
}
