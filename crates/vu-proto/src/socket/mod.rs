//! The socket endpoint: the one place where vhost-user bytes and file descriptors cross
//! the kernel boundary.
//!
//! vhost-user runs over an `AF_UNIX` `SOCK_STREAM` socket and passes file descriptors
//! (memory regions, eventfds, log and inflight areas) as `SCM_RIGHTS` ancillary data. Fd
//! passing is where backends leak descriptors, leak them into children, or desynchronise
//! the stream, so this module keeps the whole job small and in one place.
//!
//! # Invariants
//!
//! 1. `recvmsg` and `sendmsg` are called for this module by the crate's private `sys` module
//!    and nowhere else in the library crates (the test support's hostile frontend calls them
//!    on purpose, to send what no [`Endpoint`] would).
//! 2. Every received fd becomes an [`OwnedFd`] inside the function that called `recvmsg`,
//!    right after the call returns and before the byte count or the flags are looked at.
//!    From then on, every path out of the function either hands the fds to the caller or
//!    drops (closes) them; none can forget one.
//! 3. Fds are always received with `MSG_CMSG_CLOEXEC`, so no fd is ever open without
//!    close-on-exec, not even for the instant a concurrent `fork` + `exec` could see it.
//! 4. `MSG_CTRUNC`, more than [`MAX_FDS`] fds for one message, the peer closing
//!    mid-message, a stalled peer and any I/O error mid-message close every fd received
//!    for that message and are a typed [`SocketError`].
//! 5. One `recvmsg` per message where the peer allows it, with read-ahead
//!    ([`Endpoint::set_read_ahead`]). A stream socket has no message boundaries, so
//!    [`Endpoint::recv_message`] then reads into a buffer that holds a header and the
//!    largest payload, returns the first whole message from it and keeps the bytes that
//!    follow (the next messages, or part of one) for the next call. Without read-ahead (the
//!    default, for readers that wait for readiness before each message) reads are
//!    exact-length: the header, then the body, never past the message. No header is trusted
//!    before [`Header::read`] checked it, so a hostile size is refused before anything is
//!    allocated, and a bad header consumes only its own twelve bytes.
//!
//! # Which message an fd belongs to
//!
//! A read that runs past the end of the current message may also take fds, and they must
//! go to the right message. Linux's `unix_stream_read_generic` copies the queued skbs (one
//! per `sendmsg`, or several for a long one) into the buffer in order; an skb that carries
//! `SCM_RIGHTS` is copied even after earlier skbs were (nothing stops the read *before* it),
//! but the read stops right *after* it: its fds are detached with its first copied bytes,
//! and a read never goes on past an skb that had fds. So the fds of one `recvmsg` arrive
//! with the last skb it copied, and that skb holds the last byte of the read. The rule here
//! follows: **the fds of a read belong to the message that holds the read's last byte.**
//! A peer that sends each message's fds with the message (in the `sendmsg` of its first
//! byte, as every frontend does, or of a later piece of it) gets them attached exactly as
//! the exact-length reads of earlier versions did; only a peer that glues the end of one
//! message and the start of the next into one `sendmsg` with fds could tell the difference,
//! and such fds have no well-defined owner in any reading. The fds wait in the read-ahead
//! with the message they belong to until that message is returned.
//!
//! # Stalled peers
//!
//! A peer that sends half a message and then stops would block a reader forever. Set a
//! read timeout with [`Endpoint::set_read_timeout`]: when it expires before the first byte
//! of a message, the read fails with [`SocketError::Io`] of kind
//! [`std::io::ErrorKind::WouldBlock`] and nothing was consumed, so the caller may simply
//! wait again; when it expires mid-message, the read fails with [`SocketError::Stalled`],
//! the stream is out of sync and the connection must be closed. The same rules apply to a
//! non-blocking endpoint, which is therefore only useful together with readiness
//! notification (wait until readable, then read one message).

mod read_ahead;

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::header::{Header, MAX_FDS};
use crate::message::RawMessage;
use crate::sys::{self, ControlBuffer};
use crate::wire::WireError;
use read_ahead::{ReadAhead, READ_AHEAD_LEN};

/// Why a socket operation failed.
///
/// Three send errors are refusals before anything is written and leave the stream
/// intact: [`SocketError::TooManyFdsToSend`], [`SocketError::FdsWithoutData`] and
/// [`SocketError::SizeMismatch`]; so does an [`SocketError::Io`] of kind `WouldBlock`
/// before the first byte of a message is read. After any other error the stream is out
/// of sync and the connection should be closed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The peer closed the connection cleanly, between two messages.
    #[error("the peer closed the connection")]
    Disconnected,
    /// The peer closed the connection in the middle of a message.
    #[error("the peer closed the connection mid-message: {received} of {expected} bytes received")]
    UnexpectedEof {
        /// The length of the whole message (or of the buffer given to
        /// [`Endpoint::recv_exact`]).
        expected: usize,
        /// How many of those bytes arrived before the end of the stream.
        received: usize,
    },
    /// The peer sent more fds than the control buffer holds (`MSG_CTRUNC`); the kernel
    /// closed the excess and every fd received for the message was closed too.
    #[error("ancillary data truncated (MSG_CTRUNC): the peer sent more than {max} fds", max = MAX_FDS)]
    ControlTruncated,
    /// The peer sent more fds for one message than any message may carry; every fd
    /// received for the message was closed.
    #[error("{received} fds received for one message, at most {max} allowed")]
    TooManyFds {
        /// The most fds one message may carry, [`MAX_FDS`].
        max: usize,
        /// How many fds arrived.
        received: usize,
    },
    /// The caller asked to send more fds than any message may carry.
    #[error("asked to send {given} fds, at most {max} allowed")]
    TooManyFdsToSend {
        /// The most fds one message may carry, [`MAX_FDS`].
        max: usize,
        /// How many fds the caller gave.
        given: usize,
    },
    /// The caller asked to send fds without any byte to carry them: a stream socket
    /// cannot deliver ancillary data on its own.
    #[error("asked to send {fds} fds with no data bytes")]
    FdsWithoutData {
        /// How many fds the caller gave.
        fds: usize,
    },
    /// The header given to [`Endpoint::send_message`] announces a size other than the
    /// body's length.
    #[error("header announces {header_size} payload bytes but the body has {body_len}")]
    SizeMismatch {
        /// The size field of the header.
        header_size: u32,
        /// The length of the body given.
        body_len: usize,
    },
    /// The read timeout expired, or a non-blocking endpoint ran out of data, in the
    /// middle of a message; every fd received for the message was closed.
    #[error("the peer stalled mid-message: {received} of {expected} bytes received")]
    Stalled {
        /// The length of the whole message (or of the buffer given to
        /// [`Endpoint::recv_exact`]).
        expected: usize,
        /// How many of those bytes arrived.
        received: usize,
    },
    /// A send failed after part of the data was written: the peer saw a partial
    /// message.
    #[error("send failed after {sent} of {expected} bytes")]
    SendIncomplete {
        /// How many bytes the caller asked to send.
        expected: usize,
        /// How many were written before the failure.
        sent: usize,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The received header is not a valid vhost-user header (the body was not read).
    #[error("invalid header: {0}")]
    Wire(#[from] WireError),
    /// Connecting to a socket path failed.
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        /// The path given.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Something already exists at the path a listener was asked to bind: a socket in
    /// use, a stale socket (see [`crate::listener::Listener::bind_replacing_stale`]) or
    /// another kind of file.
    #[error("cannot bind {}: the path already exists", path.display())]
    AddressInUse {
        /// The path given.
        path: PathBuf,
    },
    /// Binding a listener to a path failed for another reason.
    #[error("cannot bind {}: {source}", path.display())]
    Bind {
        /// The path given.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// An inherited fd is not the kind of socket it was adopted as: an `AF_UNIX`
    /// stream socket, listening for [`crate::listener::Listener::from_fd`], connected
    /// for [`Endpoint::from_fd`].
    #[error("inherited fd {fd} is unusable: {problem}")]
    UnusableFd {
        /// The fd number, for the log (the fd itself has been closed).
        fd: RawFd,
        /// What is wrong with it.
        problem: FdProblem,
    },
    /// Any other I/O error, including a read timeout or `WouldBlock` before the first
    /// byte of a message (nothing was consumed).
    #[error("socket I/O error: {0}")]
    Io(#[from] io::Error),
}

/// What is wrong with an inherited fd; see [`SocketError::UnusableFd`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FdProblem {
    /// The fd is not a socket.
    #[error("not a socket")]
    NotASocket,
    /// The socket is not in the `AF_UNIX` domain.
    #[error("socket domain {0}, expected AF_UNIX")]
    Domain(i32),
    /// The socket is not a `SOCK_STREAM` socket.
    #[error("socket type {0}, expected SOCK_STREAM")]
    Type(i32),
    /// A listener was expected, but `listen` was never called on the socket (a
    /// connected socket belongs in [`Endpoint::from_fd`]).
    #[error("not listening (a connected socket is adopted with Endpoint::from_fd)")]
    NotListening,
    /// A connected socket was expected, but the socket is listening (a listening socket
    /// belongs in [`crate::listener::Listener::from_fd`]).
    #[error("listening (a listening socket is adopted with Listener::from_fd)")]
    Listening,
    /// A connected socket was expected, but the socket has no peer.
    #[error("not connected")]
    NotConnected,
}

/// The kind of socket an inherited fd is adopted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A listening socket, for [`crate::listener::Listener::from_fd`].
    Listening,
    /// A connected socket, for [`Endpoint::from_fd`].
    Connected,
}

/// Checks that an inherited `fd` is an `AF_UNIX` `SOCK_STREAM` socket in `role`, and
/// sets close-on-exec on it so that it does not leak into programs this process starts.
pub(crate) fn adopt_inherited(fd: BorrowedFd<'_>, role: Role) -> Result<(), SocketError> {
    let refuse = |problem| SocketError::UnusableFd {
        fd: fd.as_raw_fd(),
        problem,
    };
    let domain = match sys::socket_option(fd, libc::SO_DOMAIN) {
        Ok(domain) => domain,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return Err(refuse(FdProblem::NotASocket))
        }
        Err(e) => return Err(SocketError::Io(e)),
    };
    if domain != libc::AF_UNIX {
        return Err(refuse(FdProblem::Domain(domain)));
    }
    let kind = sys::socket_option(fd, libc::SO_TYPE)?;
    if kind != libc::SOCK_STREAM {
        return Err(refuse(FdProblem::Type(kind)));
    }
    let listening = sys::socket_option(fd, libc::SO_ACCEPTCONN)? != 0;
    match (role, listening) {
        (Role::Listening, false) => return Err(refuse(FdProblem::NotListening)),
        (Role::Connected, true) => return Err(refuse(FdProblem::Listening)),
        (Role::Listening, true) => {}
        (Role::Connected, false) => match sys::check_peer(fd) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                return Err(refuse(FdProblem::NotConnected))
            }
            Err(e) => return Err(SocketError::Io(e)),
        },
    }
    sys::set_cloexec(fd)?;
    Ok(())
}

/// How many slices [`Endpoint::send`] gathers without allocating.
const INLINE_IOV: usize = 4;

/// One end of a vhost-user connection.
///
/// Sends and receives whole messages with their fds; see the [module docs](self) for the
/// guarantees. All methods take `&self`: a reader and a writer thread may share an
/// endpoint, but two concurrent readers (or writers) would interleave messages.
///
/// Received bytes that belong to the next message are kept in the endpoint (see
/// [`recv_message`](Self::recv_message)); reading the [`stream`](Self::stream) directly, or
/// [`into_inner`](Self::into_inner), bypasses them.
#[derive(Debug)]
pub struct Endpoint {
    stream: UnixStream,
    read_ahead: Mutex<ReadAhead>,
    /// Whether [`recv_message`](Self::recv_message) may read past the current message.
    read_past: AtomicBool,
}

impl Endpoint {
    /// Wraps a connected `AF_UNIX` stream socket.
    pub fn new(stream: UnixStream) -> Self {
        Endpoint {
            stream,
            read_ahead: Mutex::new(ReadAhead::default()),
            read_past: AtomicBool::new(false),
        }
    }

    /// The read-ahead buffer. Only one reader at a time uses it (the lock is uncontended);
    /// a reader that panicked left it in an unknown state, so it is emptied.
    fn read_ahead(&self) -> MutexGuard<'_, ReadAhead> {
        self.read_ahead.lock().unwrap_or_else(|poisoned| {
            let mut guard = poisoned.into_inner();
            guard.clear();
            self.read_ahead.clear_poison();
            guard
        })
    }

    /// Connects to the socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, SocketError> {
        let path = path.as_ref();
        UnixStream::connect(path)
            .map(Endpoint::new)
            .map_err(|source| SocketError::Connect {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Adopts an inherited connected socket (the `--fd` convention, for a launcher that
    /// hands the backend one end of a connection rather than a listening socket).
    ///
    /// Checks that `fd` is a connected `AF_UNIX` `SOCK_STREAM` socket and sets
    /// close-on-exec on it; on failure the fd is closed and the error is
    /// [`SocketError::UnusableFd`].
    pub fn from_fd(fd: OwnedFd) -> Result<Self, SocketError> {
        adopt_inherited(fd.as_fd(), Role::Connected)?;
        Ok(Endpoint::new(UnixStream::from(fd)))
    }

    /// Two endpoints connected to each other (`socketpair`), both close-on-exec.
    pub fn pair() -> Result<(Self, Self), SocketError> {
        let (a, b) = UnixStream::pair()?;
        Ok((Endpoint::new(a), Endpoint::new(b)))
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Lets [`recv_message`](Self::recv_message) read ahead: one `recvmsg` of up to a header
    /// and the largest payload per call, keeping what belongs to the next messages (see the
    /// [module docs](self#which-message-an-fd-belongs-to)). Off by default: a reader that
    /// waits for readiness (epoll, poll) before each message must then also call
    /// `recv_message` again while [`has_buffered_bytes`](Self::has_buffered_bytes) says so,
    /// because a message already read ahead leaves nothing for the socket to report.
    /// Without it, reads stop at the end of the current message (a header, then its body).
    pub fn set_read_ahead(&self, on: bool) {
        self.read_past.store(on, Ordering::Relaxed);
    }

    /// Whether bytes of a message were read ahead and not yet returned.
    pub fn has_buffered_bytes(&self) -> bool {
        self.read_ahead().held() > 0
    }

    /// Unwraps the underlying stream; bytes and fds read ahead are dropped.
    pub fn into_inner(self) -> UnixStream {
        self.stream
    }

    /// Sets how long a read may wait for data; `None` waits forever. A zero duration is
    /// refused by the standard library with [`io::ErrorKind::InvalidInput`].
    ///
    /// See the [module docs](self#stalled-peers) for what a timeout means before and in
    /// the middle of a message.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), SocketError> {
        Ok(self.stream.set_read_timeout(timeout)?)
    }

    /// Sets how long a send may wait for buffer space; `None` waits forever. A send that
    /// times out after writing part of a message fails with
    /// [`SocketError::SendIncomplete`].
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), SocketError> {
        Ok(self.stream.set_write_timeout(timeout)?)
    }

    /// Puts the socket in or out of non-blocking mode; see the
    /// [module docs](self#stalled-peers).
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), SocketError> {
        Ok(self.stream.set_nonblocking(nonblocking)?)
    }

    /// Sends every byte of `iov`, in order, with `fds` attached to the first byte.
    ///
    /// The fds ride with the first `sendmsg` only; the kernel duplicates them, so the
    /// caller keeps its own. `MSG_NOSIGNAL` is set: a closed peer is an error
    /// (`EPIPE`), never a `SIGPIPE`. `EINTR` is retried.
    pub fn send(&self, iov: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<(), SocketError> {
        if fds.len() > MAX_FDS {
            return Err(SocketError::TooManyFdsToSend {
                max: MAX_FDS,
                given: fds.len(),
            });
        }
        let expected = iov
            .iter()
            .map(|s| s.len())
            .fold(0usize, usize::saturating_add);
        if expected == 0 {
            return if fds.is_empty() {
                Ok(())
            } else {
                Err(SocketError::FdsWithoutData { fds: fds.len() })
            };
        }

        let mut inline = [IoSlice::new(&[]); INLINE_IOV];
        let mut heap: Vec<IoSlice<'_>>;
        let mut slices: &mut [IoSlice<'_>] = if iov.len() <= INLINE_IOV {
            for (slot, bytes) in inline.iter_mut().zip(iov) {
                *slot = IoSlice::new(bytes);
            }
            &mut inline[..iov.len()]
        } else {
            heap = iov.iter().map(|bytes| IoSlice::new(bytes)).collect();
            &mut heap
        };
        // Drop leading empty slices so that every sendmsg below carries data.
        IoSlice::advance_slices(&mut slices, 0);

        let mut control = ControlBuffer::new();
        let mut control_len = 0;
        if !fds.is_empty() {
            control_len = sys::fill_rights(&mut control, fds);
        }

        let mut sent = 0usize;
        while !slices.is_empty() {
            match sys::sendmsg_once(self.stream.as_fd(), slices, &mut control, control_len) {
                Ok(0) => {
                    let source = io::Error::from(io::ErrorKind::WriteZero);
                    return Err(SocketError::SendIncomplete {
                        expected,
                        sent,
                        source,
                    });
                }
                Ok(n) => {
                    // The fds went with the bytes just written.
                    control_len = 0;
                    sent = sent.saturating_add(n);
                    IoSlice::advance_slices(&mut slices, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if sent == 0 => return Err(SocketError::Io(e)),
                Err(source) => {
                    return Err(SocketError::SendIncomplete {
                        expected,
                        sent,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Receives exactly `buf.len()` bytes, appending the fds that come with them to
    /// `fds`.
    ///
    /// Bytes (and their fds) that [`recv_message`](Self::recv_message) read ahead come
    /// first; the rest is read from the socket with exact-length reads. The bound of
    /// [`MAX_FDS`] applies to `fds.len()` as a whole, so a caller reading one message in
    /// several pieces passes the same vector each time. On error, every fd this call
    /// appended is closed (the vector is truncated back to its length on entry). End of
    /// stream before the first byte is [`SocketError::Disconnected`], after it
    /// [`SocketError::UnexpectedEof`]. `EINTR` is retried.
    pub fn recv_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), SocketError> {
        let expected = buf.len();
        let on_entry = fds.len();
        let mut ra = self.read_ahead();
        let buffered = ra.held().min(expected);
        if buffered > 0 {
            let from = ra.start;
            buf[..buffered].copy_from_slice(&ra.buf[from..from + buffered]);
            ra.take_fds(from + buffered, fds);
            ra.consume(buffered);
        }
        let rest = &mut buf[buffered..];
        if rest.is_empty() {
            if fds.len() > MAX_FDS {
                let received = fds.len();
                fds.truncate(on_entry);
                return Err(SocketError::TooManyFds {
                    max: MAX_FDS,
                    received,
                });
            }
            return Ok(());
        }
        let result = self.recv_part(rest, fds, buffered, expected);
        if result.is_err() {
            fds.truncate(on_entry);
        }
        result
    }

    /// Sends one message: `header`, then `body`, with `fds`, in a single `sendmsg` unless
    /// the socket buffer is full.
    ///
    /// The header's size must equal `body.len()`; anything else would desynchronise the
    /// stream, so it is refused with [`SocketError::SizeMismatch`] before anything is
    /// sent.
    pub fn send_message(
        &self,
        header: &Header,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SocketError> {
        if usize::try_from(header.size) != Ok(body.len()) {
            return Err(SocketError::SizeMismatch {
                header_size: header.size,
                body_len: body.len(),
            });
        }
        let head = header.to_bytes();
        self.send(&[&head, body], fds)
    }

    /// Receives one whole message with its fds.
    ///
    /// With [read-ahead](Self::set_read_ahead), reads as much as the socket holds, up to a
    /// header and the largest payload, in one `recvmsg`; without, exactly the header, then
    /// exactly the body. Checks the header with [`Header::read`] (a size above
    /// [`MAX_PAYLOAD_SIZE`](crate::header::MAX_PAYLOAD_SIZE) is refused before anything is allocated), reads again only if
    /// the message is not complete, and keeps what follows it for the next call; see the
    /// [module docs](self#which-message-an-fd-belongs-to) for how fds are attributed.
    /// After a [`SocketError::Wire`] error only the bad header was consumed (its fds are
    /// closed); the body is still to be read, so the connection must be closed. After any
    /// other error but a timeout before the first byte, every buffered byte and fd is
    /// dropped.
    pub fn recv_message(&self) -> Result<RawMessage, SocketError> {
        let mut ra = self.read_ahead();
        let result = self.next_message(&mut ra, false);
        if let Err(e) = &result {
            if !matches!(e, SocketError::Wire(_)) {
                // Closes every fd received for the message and any later one (invariant 4).
                ra.clear();
            }
        }
        result
    }

    /// As [`recv_message`](Self::recv_message), but `Ok(None)` at once when no byte of a
    /// message is buffered or waiting on the socket (a `recvmsg` with `MSG_DONTWAIT`, which
    /// is the read itself when a message is there). Once a message has begun, the rest of it
    /// is waited for as `recv_message` waits (the read timeout applies). For a reader that
    /// polls the socket for a while before it blocks.
    pub fn try_recv_message(&self) -> Result<Option<RawMessage>, SocketError> {
        let mut ra = self.read_ahead();
        match self.next_message(&mut ra, true) {
            Ok(msg) => Ok(Some(msg)),
            Err(SocketError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock && ra.held() == 0 => {
                Ok(None)
            }
            Err(e) => {
                if !matches!(e, SocketError::Wire(_)) {
                    // As in `recv_message`.
                    ra.clear();
                }
                Err(e)
            }
        }
    }

    /// The first whole message of the read-ahead, reading the socket until there is one;
    /// with `nowait`, a read that would wait for the first byte of the message fails with
    /// `WouldBlock` instead.
    fn next_message(&self, ra: &mut ReadAhead, nowait: bool) -> Result<RawMessage, SocketError> {
        loop {
            if let Some(header) = ra.header_at(ra.start) {
                let start = ra.start;
                let header = match header {
                    Ok(header) => header,
                    Err(e) => {
                        // Drop (close) the bad message's fds; keep what follows its header.
                        ra.take_fds(start + 1, &mut Vec::new());
                        ra.consume(Header::SIZE);
                        return Err(e.into());
                    }
                };
                let total = Header::SIZE + header.size as usize;
                if ra.held() >= total {
                    let body = ra.buf[start + Header::SIZE..start + total].to_vec();
                    let mut fds = Vec::new();
                    ra.take_fds(start + 1, &mut fds);
                    ra.consume(total);
                    return Ok(RawMessage { header, body, fds });
                }
            }
            self.read_more(ra, nowait)?;
        }
    }

    /// One `recvmsg` into the free end of the read-ahead, which holds less than a whole
    /// message; the fds received go to the message holding the last byte read.
    fn read_more(&self, ra: &mut ReadAhead, nowait: bool) -> Result<(), SocketError> {
        if ra.buf.is_empty() {
            ra.buf = vec![0; READ_AHEAD_LEN];
        }
        ra.compact();
        let received = ra.held();
        let expected = match ra.header_at(0) {
            Some(Ok(header)) => Header::SIZE + header.size as usize,
            _ => Header::SIZE,
        };
        // Without read-ahead, exactly what the current message (or its header) still lacks.
        let want = if self.read_past.load(Ordering::Relaxed) {
            usize::MAX
        } else {
            expected.saturating_sub(received).max(1)
        };
        loop {
            let mut fds = Vec::new();
            let end = ra.end;
            // A held message is shorter than the buffer, so there is room for one byte.
            let room = ra.buf.len().saturating_sub(end).min(want);
            let free = &mut ra.buf[end..end + room];
            // `recvmsg_once` has made every received fd an OwnedFd in `fds`, so every early
            // return below closes them.
            let flags = if nowait && received == 0 {
                libc::MSG_DONTWAIT
            } else {
                0
            };
            let (n, truncated) = match sys::recvmsg_once(self.stream.as_fd(), free, &mut fds, flags)
            {
                Ok(result) => result,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) && received == 0 => return Err(SocketError::Io(e)),
                Err(e) if is_timeout(&e) => {
                    return Err(SocketError::Stalled { expected, received })
                }
                Err(e) => return Err(SocketError::Io(e)),
            };
            if truncated {
                return Err(SocketError::ControlTruncated);
            }
            if n == 0 {
                return Err(if received == 0 {
                    SocketError::Disconnected
                } else {
                    SocketError::UnexpectedEof { expected, received }
                });
            }
            ra.end = end.saturating_add(n).min(ra.buf.len());
            if !fds.is_empty() {
                let owner = ra.message_holding(ra.end - 1);
                ra.attach(owner, fds)?;
            }
            return Ok(());
        }
    }

    /// Fills `buf` from the stream; `before` bytes of a message of `expected` bytes were
    /// received by earlier calls (for the error counts).
    fn recv_part(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        before: usize,
        expected: usize,
    ) -> Result<(), SocketError> {
        let fds_on_entry = fds.len();
        let result = self.fill(buf, fds, before, expected);
        if result.is_err() {
            // Close every fd received by this call (invariant 4).
            fds.truncate(fds_on_entry);
        }
        result
    }

    fn fill(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        before: usize,
        expected: usize,
    ) -> Result<(), SocketError> {
        let mut got = 0usize;
        while let Some(rest) = buf.get_mut(got..).filter(|rest| !rest.is_empty()) {
            // `recvmsg_once` has already made every received fd an OwnedFd in `fds`, so
            // every early return below closes them through the caller's truncate.
            let (n, truncated) = match sys::recvmsg_once(self.stream.as_fd(), rest, fds, 0) {
                Ok(result) => result,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) && before == 0 && got == 0 => {
                    return Err(SocketError::Io(e))
                }
                Err(e) if is_timeout(&e) => {
                    return Err(SocketError::Stalled {
                        expected,
                        received: before.saturating_add(got),
                    })
                }
                Err(e) => return Err(SocketError::Io(e)),
            };
            if truncated {
                return Err(SocketError::ControlTruncated);
            }
            if fds.len() > MAX_FDS {
                return Err(SocketError::TooManyFds {
                    max: MAX_FDS,
                    received: fds.len(),
                });
            }
            if n == 0 {
                let received = before.saturating_add(got);
                return Err(if received == 0 {
                    SocketError::Disconnected
                } else {
                    SocketError::UnexpectedEof { expected, received }
                });
            }
            got = got.saturating_add(n);
        }
        Ok(())
    }
}

impl From<UnixStream> for Endpoint {
    fn from(stream: UnixStream) -> Self {
        Endpoint::new(stream)
    }
}

impl AsFd for Endpoint {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl AsRawFd for Endpoint {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

/// Whether `e` is what a read timeout or an empty non-blocking socket reports.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::header::HeaderFlags;

    fn probe() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn send_and_recv_exact_round_trip_bytes_and_fds() {
        let (a, b) = Endpoint::pair().unwrap();
        let (x, _y) = probe();
        a.send(&[b"hel", b"", b"lo"], &[x.as_fd()]).unwrap();
        let mut buf = [0u8; 5];
        let mut fds = Vec::new();
        b.recv_exact(&mut buf, &mut fds).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn send_of_more_than_inline_slices_sends_all_bytes() {
        let (a, b) = Endpoint::pair().unwrap();
        let parts: Vec<&[u8]> = vec![b"a", b"b", b"c", b"d", b"e", b"f"];
        a.send(&parts, &[]).unwrap();
        let mut buf = [0u8; 6];
        b.recv_exact(&mut buf, &mut Vec::new()).unwrap();
        assert_eq!(&buf, b"abcdef");
    }

    #[test]
    fn send_refuses_more_than_max_fds() {
        let (a, _b) = Endpoint::pair().unwrap();
        let (x, _y) = probe();
        let fds = vec![x.as_fd(); MAX_FDS + 1];
        let err = a.send(&[b"x"], &fds).unwrap_err();
        assert!(matches!(
            err,
            SocketError::TooManyFdsToSend { max: MAX_FDS, given } if given == MAX_FDS + 1
        ));
    }

    #[test]
    fn send_refuses_fds_without_data() {
        let (a, _b) = Endpoint::pair().unwrap();
        let (x, _y) = probe();
        let err = a.send(&[b""], &[x.as_fd()]).unwrap_err();
        assert!(matches!(err, SocketError::FdsWithoutData { fds: 1 }));
    }

    #[test]
    fn send_message_refuses_size_mismatch() {
        let (a, _b) = Endpoint::pair().unwrap();
        let header = Header::new(crate::request::RequestCode(1), HeaderFlags::empty(), 4);
        let err = a.send_message(&header, &[0; 3], &[]).unwrap_err();
        assert!(matches!(
            err,
            SocketError::SizeMismatch {
                header_size: 4,
                body_len: 3
            }
        ));
    }

    #[test]
    fn recv_exact_failure_keeps_fds_received_earlier() {
        let (a, b) = Endpoint::pair().unwrap();
        let (x, _y) = probe();
        a.send(&[b"ab"], &[x.as_fd()]).unwrap();
        let mut fds = Vec::new();
        b.recv_exact(&mut [0u8; 2], &mut fds).unwrap();
        a.stream().write_all(b"c").unwrap();
        drop(a);
        let err = b.recv_exact(&mut [0u8; 2], &mut fds).unwrap_err();
        assert!(matches!(
            err,
            SocketError::UnexpectedEof {
                expected: 2,
                received: 1
            }
        ));
        assert_eq!(fds.len(), 1);
    }
}
