//! Message-level behaviour of `vu_proto::socket::Endpoint` over socket pairs: fd passing,
//! reassembly of messages the kernel delivers in pieces, and every way a read can fail.
//!
//! The misbehaving peer is played by raw writes and by vmm-sys-util's `ScmSocket` (an
//! independent `sendmsg`), so the tests do not trust the code they test to produce the
//! bad input. Fd leaks are detected precisely with a probe: a socket pair whose far end
//! is the fd being passed around; the near end reads end-of-file only once every copy of
//! the far end, in flight or received, is closed.

#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vu_proto::header::{Header, HeaderFlags, MAX_FDS, MAX_PAYLOAD_SIZE};
use vu_proto::request::RequestCode;
use vu_proto::socket::{Endpoint, SocketError};
use vu_proto::BorrowFd;

/// A header for request 1 with a `size`-byte body.
fn header(size: u32) -> Header {
    Header::new(RequestCode(1), HeaderFlags::empty(), size)
}

/// Sends `bytes` with `fds` in one raw `sendmsg`, as a foreign peer would.
fn raw_send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let sent = stream.send_with_fds(&[bytes], fds).unwrap();
    assert_eq!(sent, bytes.len());
}

/// Whether close-on-exec is set on `fd`.
// `fcntl` on a borrowed fd: this test file's one kind of `unsafe`.
#[allow(unsafe_code)]
fn cloexec(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GETFD takes no argument and touches no memory; `fd` is borrowed, open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    assert!(flags >= 0);
    flags & libc::FD_CLOEXEC != 0
}

/// A leak detector: pass [`Probe::fd`] around, then drop the probe's own copy with
/// [`Probe::all_copies_closed`].
struct Probe {
    near: UnixStream,
    far: UnixStream,
}

impl Probe {
    fn new() -> Self {
        let (near, far) = UnixStream::pair().unwrap();
        Probe { near, far }
    }

    fn fd(&self) -> RawFd {
        self.far.as_raw_fd()
    }

    /// Closes the probe's own copy and reports whether no other copy is open anywhere.
    fn all_copies_closed(self) -> bool {
        let Probe { mut near, far } = self;
        drop(far);
        near.set_nonblocking(true).unwrap();
        match near.read(&mut [0u8; 1]) {
            Ok(0) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            other => panic!("unexpected probe read: {other:?}"),
        }
    }
}

/// Checks that `fds` are live, close-on-exec and distinct from each other and from
/// the originals, and that each refers to the same eventfd as its original.
fn check_received_eventfds(received: &[std::os::fd::OwnedFd], originals: &[EventFd]) {
    assert_eq!(received.len(), originals.len());
    let mut numbers: Vec<RawFd> = received.iter().map(|fd| fd.as_raw_fd()).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), received.len());
    for (i, (fd, original)) in received.iter().zip(originals).enumerate() {
        assert!(cloexec(fd.as_fd()));
        assert_ne!(fd.as_raw_fd(), original.as_raw_fd());
        let value = (i as u64 + 1).to_ne_bytes();
        std::fs::File::from(fd.try_clone().unwrap())
            .write_all(&value)
            .unwrap();
        assert_eq!(original.read().unwrap(), i as u64 + 1);
    }
}

#[test]
fn probe_sees_a_received_copy_that_is_still_open() {
    let (a, b) = Endpoint::pair().unwrap();
    let probe = Probe::new();
    raw_send(a.stream(), &header(0).to_bytes(), &[probe.fd()]);
    let message = b.recv_message().unwrap();
    assert_eq!(message.fds.len(), 1);
    assert!(!probe.all_copies_closed());
}

#[test]
fn message_with_fds_round_trips_in_both_directions() {
    let (a, b) = Endpoint::pair().unwrap();
    let events: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let borrowed: Vec<BorrowedFd<'_>> = events.iter().map(|e| e.borrow_fd()).collect();
    for (from, to) in [(&a, &b), (&b, &a)] {
        from.send_message(&header(4), b"body", &borrowed).unwrap();
        let message = to.recv_message().unwrap();
        assert_eq!(message.header, header(4));
        assert_eq!(message.body, b"body");
        check_received_eventfds(&message.fds, &events);
    }
}

#[test]
fn message_without_body_or_fds_is_received() {
    let (a, b) = Endpoint::pair().unwrap();
    a.send_message(&header(0), &[], &[]).unwrap();
    let message = b.recv_message().unwrap();
    assert_eq!(message.header.size, 0);
    assert!(message.body.is_empty());
    assert!(message.fds.is_empty());
}

#[test]
fn largest_legal_body_is_received_whole() {
    let (a, b) = Endpoint::pair().unwrap();
    let body: Vec<u8> = (0..MAX_PAYLOAD_SIZE).map(|i| i as u8).collect();
    a.send_message(&header(MAX_PAYLOAD_SIZE), &body, &[])
        .unwrap();
    assert_eq!(b.recv_message().unwrap().body, body);
}

#[test]
fn consecutive_messages_keep_their_own_fds() {
    let (a, b) = Endpoint::pair().unwrap();
    let first = Probe::new();
    let second = Probe::new();
    raw_send(a.stream(), &header(2).to_bytes(), &[first.fd()]);
    a.stream().write_all(b"p1").unwrap();
    raw_send(
        a.stream(),
        &header(2).to_bytes(),
        &[second.fd(), second.fd()],
    );
    a.stream().write_all(b"p2").unwrap();
    let one = b.recv_message().unwrap();
    let two = b.recv_message().unwrap();
    assert_eq!((one.body.as_slice(), one.fds.len()), (&b"p1"[..], 1));
    assert_eq!((two.body.as_slice(), two.fds.len()), (&b"p2"[..], 2));
    drop(one);
    assert!(first.all_copies_closed());
    drop(two);
    assert!(second.all_copies_closed());
}

#[test]
fn message_split_into_pieces_is_reassembled() {
    let (a, b) = Endpoint::pair().unwrap();
    let events: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<RawFd> = events.iter().map(|e| e.as_raw_fd()).collect();
    let head = header(6).to_bytes();
    raw_send(a.stream(), &head[..5], &raw);
    a.stream().write_all(&head[5..]).unwrap();
    a.stream().write_all(b"abc").unwrap();
    a.stream().write_all(b"def").unwrap();
    let message = b.recv_message().unwrap();
    assert_eq!(message.header, header(6));
    assert_eq!(message.body, b"abcdef");
    check_received_eventfds(&message.fds, &events);
}

#[test]
fn fds_sent_with_the_body_are_collected() {
    let (a, b) = Endpoint::pair().unwrap();
    let event = EventFd::new(0).unwrap();
    a.stream().write_all(&header(3).to_bytes()).unwrap();
    raw_send(a.stream(), b"xyz", &[event.as_raw_fd()]);
    let message = b.recv_message().unwrap();
    assert_eq!(message.body, b"xyz");
    check_received_eventfds(&message.fds, std::slice::from_ref(&event));
}

#[test]
fn clean_close_between_messages_is_disconnected() {
    let (a, b) = Endpoint::pair().unwrap();
    drop(a);
    assert!(matches!(b.recv_message(), Err(SocketError::Disconnected)));
}

#[test]
fn close_mid_header_is_unexpected_eof_with_counts() {
    let (a, b) = Endpoint::pair().unwrap();
    a.stream().write_all(&header(0).to_bytes()[..5]).unwrap();
    drop(a);
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::UnexpectedEof {
            expected: 12,
            received: 5
        })
    ));
}

#[test]
fn close_mid_body_is_unexpected_eof_and_closes_the_fds() {
    let (a, b) = Endpoint::pair().unwrap();
    let probe = Probe::new();
    raw_send(a.stream(), &header(8).to_bytes(), &[probe.fd()]);
    a.stream().write_all(b"abc").unwrap();
    drop(a);
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::UnexpectedEof {
            expected: 20,
            received: 15
        })
    ));
    assert!(probe.all_copies_closed());
}

#[test]
fn more_fds_than_the_control_buffer_is_truncation_and_closes_them_all() {
    let (a, b) = Endpoint::pair().unwrap();
    let probe = Probe::new();
    raw_send(
        a.stream(),
        &header(0).to_bytes(),
        &[probe.fd(); MAX_FDS + 1],
    );
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::ControlTruncated)
    ));
    assert!(probe.all_copies_closed());
}

#[test]
fn the_kernel_limit_of_253_fds_is_truncation_and_closes_them_all() {
    let (a, b) = Endpoint::pair().unwrap();
    let probe = Probe::new();
    raw_send(a.stream(), &header(0).to_bytes(), &[probe.fd(); 253]);
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::ControlTruncated)
    ));
    assert!(probe.all_copies_closed());
}

#[test]
fn too_many_fds_across_pieces_is_refused_and_closes_them_all() {
    let (a, b) = Endpoint::pair().unwrap();
    let probe = Probe::new();
    raw_send(a.stream(), &header(1).to_bytes(), &[probe.fd(); MAX_FDS]);
    raw_send(a.stream(), b"x", &[probe.fd()]);
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::TooManyFds { max: MAX_FDS, received }) if received == MAX_FDS + 1
    ));
    assert!(probe.all_copies_closed());
}

#[test]
fn oversized_header_is_a_wire_error_before_the_body_is_read() {
    let (a, b) = Endpoint::pair().unwrap();
    let probe = Probe::new();
    raw_send(
        a.stream(),
        &header(MAX_PAYLOAD_SIZE + 1).to_bytes(),
        &[probe.fd()],
    );
    a.stream().write_all(b"next").unwrap();
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::Wire(
            vu_proto::wire::WireError::PayloadTooLarge { .. }
        ))
    ));
    assert!(probe.all_copies_closed());
    // Nothing past the header was consumed.
    let mut rest = [0u8; 4];
    b.recv_exact(&mut rest, &mut Vec::new()).unwrap();
    assert_eq!(&rest, b"next");
}

#[test]
fn read_timeout_before_a_message_is_would_block_and_consumes_nothing() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    match b.recv_message() {
        Err(SocketError::Io(e)) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
        other => panic!("expected a timeout, got {other:?}"),
    }
    a.send_message(&header(2), b"ok", &[]).unwrap();
    assert_eq!(b.recv_message().unwrap().body, b"ok");
}

#[test]
fn read_timeout_mid_message_is_stalled_and_closes_the_fds() {
    let (a, b) = Endpoint::pair().unwrap();
    let probe = Probe::new();
    raw_send(a.stream(), &header(4).to_bytes(), &[probe.fd()]);
    a.stream().write_all(b"ab").unwrap();
    b.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::Stalled {
            expected: 16,
            received: 14
        })
    ));
    assert!(probe.all_copies_closed());
}

#[test]
fn nonblocking_endpoint_without_data_is_would_block() {
    let (_a, b) = Endpoint::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    match b.recv_message() {
        Err(SocketError::Io(e)) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
        other => panic!("expected WouldBlock, got {other:?}"),
    }
}

#[test]
fn send_to_a_closed_peer_is_broken_pipe() {
    let (a, b) = Endpoint::pair().unwrap();
    drop(b);
    match a.send_message(&header(0), &[], &[]) {
        Err(SocketError::Io(e)) => assert_eq!(e.kind(), ErrorKind::BrokenPipe),
        other => panic!("expected a broken pipe, got {other:?}"),
    }
}

#[test]
fn recv_exact_fills_the_buffer_across_writes() {
    let (a, b) = Endpoint::pair().unwrap();
    a.stream().write_all(b"ab").unwrap();
    a.stream().write_all(b"cd").unwrap();
    let mut buf = [0u8; 4];
    let mut fds = Vec::new();
    b.recv_exact(&mut buf, &mut fds).unwrap();
    assert_eq!(&buf, b"abcd");
    assert!(fds.is_empty());
}

#[test]
fn message_written_one_byte_at_a_time_is_reassembled() {
    let (a, b) = Endpoint::pair().unwrap();
    let body: Vec<u8> = (0..MAX_PAYLOAD_SIZE).map(|i| (i % 251) as u8).collect();
    let mut wire = header(MAX_PAYLOAD_SIZE).to_bytes().to_vec();
    wire.extend_from_slice(&body);
    let writer = std::thread::spawn(move || {
        for byte in wire {
            a.stream().write_all(&[byte]).unwrap();
        }
    });
    let message = b.recv_message().unwrap();
    writer.join().unwrap();
    assert_eq!(message.body, body);
}

#[test]
fn send_larger_than_the_socket_buffer_delivers_every_byte_and_the_fds_once() {
    let (a, b) = Endpoint::pair().unwrap();
    let probe = Probe::new();
    let far = probe.far.try_clone().unwrap();
    let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 253) as u8).collect();
    let expected = data.clone();
    let writer = std::thread::spawn(move || {
        let half = data.len() / 2;
        a.send(&[&data[..half], &data[half..]], &[far.as_fd()])
            .unwrap();
    });
    let mut received = vec![0u8; expected.len()];
    let mut fds = Vec::new();
    b.recv_exact(&mut received, &mut fds).unwrap();
    writer.join().unwrap();
    assert!(received == expected);
    assert_eq!(fds.len(), 1);
    drop(fds);
    assert!(probe.all_copies_closed());
}

/// The kernel behaviour the read-ahead relies on (see the socket module docs): a read copies
/// an skb carrying fds after bytes it already copied, and stops right after it.
#[test]
fn kernel_merges_an_fd_carrying_send_into_a_read_and_stops_after_it() {
    let (a, b) = UnixStream::pair().unwrap();
    let probe = Probe::new();
    raw_send(&a, b"ab", &[]);
    raw_send(&a, b"cd", &[probe.fd()]);
    raw_send(&a, b"ef", &[]);
    let mut buf = [0u8; 16];
    let (n, fd) = b.recv_with_fd(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"abcd");
    assert!(fd.is_some());
    drop(fd);
    let (n, fd) = b.recv_with_fd(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ef");
    assert!(fd.is_none());
    assert!(probe.all_copies_closed());
}

#[test]
fn two_messages_in_one_read_are_both_returned_in_order() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let mut bytes = header(2).to_bytes().to_vec();
    bytes.extend_from_slice(b"ab");
    bytes.extend_from_slice(&header(3).to_bytes());
    bytes.extend_from_slice(b"cde");
    a.stream().write_all(&bytes).unwrap();
    let first = b.recv_message().unwrap();
    assert_eq!(first.body, b"ab");
    // The second message is already buffered: the socket may be empty and closed.
    drop(a);
    let second = b.recv_message().unwrap();
    assert_eq!(second.body, b"cde");
    assert!(matches!(b.recv_message(), Err(SocketError::Disconnected)));
}

#[test]
fn message_followed_by_part_of_the_next_keeps_the_part_for_the_next_read() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let next = {
        let mut m = header(4).to_bytes().to_vec();
        m.extend_from_slice(b"wxyz");
        m
    };
    let mut bytes = header(1).to_bytes().to_vec();
    bytes.push(b'!');
    bytes.extend_from_slice(&next[..7]);
    a.stream().write_all(&bytes).unwrap();
    assert_eq!(b.recv_message().unwrap().body, b"!");
    a.stream().write_all(&next[7..]).unwrap();
    let second = b.recv_message().unwrap();
    assert_eq!(second.header.size, 4);
    assert_eq!(second.body, b"wxyz");
}

#[test]
fn part_of_a_buffered_message_then_eof_counts_the_buffered_bytes() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let mut bytes = header(0).to_bytes().to_vec();
    bytes.extend_from_slice(&header(4).to_bytes());
    bytes.extend_from_slice(b"ab");
    a.stream().write_all(&bytes).unwrap();
    drop(a);
    b.recv_message().unwrap();
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::UnexpectedEof {
            expected: 16,
            received: 14
        })
    ));
}

/// `event` borrowed as a `BorrowedFd`.
fn bfd(event: &EventFd) -> BorrowedFd<'_> {
    event.borrow_fd()
}

#[test]
fn fds_sent_with_the_second_of_two_coalesced_messages_stay_with_it() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let event = EventFd::new(0).unwrap();
    a.send_message(&header(2), b"p1", &[]).unwrap();
    a.send_message(&header(2), b"p2", &[bfd(&event)]).unwrap();
    let first = b.recv_message().unwrap();
    assert_eq!(first.body, b"p1");
    assert!(first.fds.is_empty());
    let second = b.recv_message().unwrap();
    assert_eq!(second.body, b"p2");
    check_received_eventfds(&second.fds, std::slice::from_ref(&event));
}

#[test]
fn fds_sent_with_the_first_of_two_messages_stay_with_it() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let event = EventFd::new(0).unwrap();
    a.send_message(&header(2), b"p1", &[bfd(&event)]).unwrap();
    a.send_message(&header(2), b"p2", &[]).unwrap();
    let first = b.recv_message().unwrap();
    check_received_eventfds(&first.fds, std::slice::from_ref(&event));
    let second = b.recv_message().unwrap();
    assert_eq!(second.body, b"p2");
    assert!(second.fds.is_empty());
}

#[test]
fn fds_of_three_queued_messages_each_stay_with_their_own() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let events = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    a.send_message(&header(1), b"a", &[bfd(&events[0])])
        .unwrap();
    a.send_message(&header(1), b"b", &[]).unwrap();
    a.send_message(&header(1), b"c", &[bfd(&events[1])])
        .unwrap();
    let got: Vec<_> = (0..3).map(|_| b.recv_message().unwrap()).collect();
    check_received_eventfds(&got[0].fds, &events[..1]);
    assert!(got[1].fds.is_empty());
    check_received_eventfds(&got[2].fds, &events[1..]);
}

#[test]
fn recv_exact_after_recv_message_takes_the_buffered_bytes_first() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let mut bytes = header(1).to_bytes().to_vec();
    bytes.extend_from_slice(b"xraw");
    a.stream().write_all(&bytes).unwrap();
    assert_eq!(b.recv_message().unwrap().body, b"x");
    a.stream().write_all(b"!").unwrap();
    let mut rest = [0u8; 4];
    b.recv_exact(&mut rest, &mut Vec::new()).unwrap();
    assert_eq!(&rest, b"raw!");
}

#[test]
fn without_read_ahead_nothing_past_the_message_is_read() {
    let (a, b) = Endpoint::pair().unwrap();
    let mut bytes = header(1).to_bytes().to_vec();
    bytes.extend_from_slice(b"xnext");
    a.stream().write_all(&bytes).unwrap();
    assert_eq!(b.recv_message().unwrap().body, b"x");
    assert!(!b.has_buffered_bytes());
    let mut rest = [0u8; 4];
    b.stream().read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"next");
}

#[test]
fn read_ahead_reports_the_buffered_next_message() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    a.send_message(&header(1), b"1", &[]).unwrap();
    a.send_message(&header(1), b"2", &[]).unwrap();
    b.recv_message().unwrap();
    assert!(b.has_buffered_bytes());
    b.recv_message().unwrap();
    assert!(!b.has_buffered_bytes());
}

#[test]
fn read_ahead_close_mid_body_is_unexpected_eof_and_closes_the_fds() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let probe = Probe::new();
    raw_send(a.stream(), &header(8).to_bytes(), &[probe.fd()]);
    a.stream().write_all(b"abc").unwrap();
    drop(a);
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::UnexpectedEof {
            expected: 20,
            received: 15
        })
    ));
    assert!(probe.all_copies_closed());
}

#[test]
fn read_ahead_too_many_fds_across_pieces_is_refused_and_closes_them_all() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let probe = Probe::new();
    raw_send(a.stream(), &header(1).to_bytes(), &[probe.fd(); MAX_FDS]);
    raw_send(a.stream(), b"x", &[probe.fd()]);
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::TooManyFds { max: MAX_FDS, received }) if received == MAX_FDS + 1
    ));
    assert!(probe.all_copies_closed());
}

#[test]
fn read_ahead_stall_mid_message_is_stalled_and_drops_the_buffered_fds() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    b.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let probe = Probe::new();
    raw_send(a.stream(), &header(4).to_bytes(), &[probe.fd()]);
    a.stream().write_all(b"ab").unwrap();
    assert!(matches!(
        b.recv_message(),
        Err(SocketError::Stalled {
            expected: 16,
            received: 14
        })
    ));
    assert!(!b.has_buffered_bytes());
    assert!(probe.all_copies_closed());
}

#[test]
fn read_ahead_bad_header_consumes_only_the_header() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let mut bytes = header(MAX_PAYLOAD_SIZE + 1).to_bytes().to_vec();
    bytes.extend_from_slice(b"next");
    a.stream().write_all(&bytes).unwrap();
    assert!(matches!(b.recv_message(), Err(SocketError::Wire(_))));
    let mut rest = [0u8; 4];
    b.recv_exact(&mut rest, &mut Vec::new()).unwrap();
    assert_eq!(&rest, b"next");
}

#[test]
fn try_recv_on_an_empty_socket_is_none_and_does_not_wait() {
    let (a, b) = Endpoint::pair().unwrap();
    // No read timeout: a blocking read here would hang the test.
    b.set_read_ahead(true);
    assert!(b.try_recv_message().unwrap().is_none());
    assert!(b.try_recv_message().unwrap().is_none());
    // Nothing was consumed: a message sent afterwards is read whole, by either call.
    a.send_message(&header(2), b"hi", &[]).unwrap();
    assert_eq!(b.try_recv_message().unwrap().unwrap().body, b"hi");
    a.send_message(&header(1), b"!", &[]).unwrap();
    assert_eq!(b.recv_message().unwrap().body, b"!");
}

#[test]
fn try_recv_returns_buffered_messages_and_their_fds() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    let probe = Probe::new();
    let fd = probe.far.as_fd();
    a.send_message(&header(1), b"1", &[fd]).unwrap();
    a.send_message(&header(1), b"2", &[]).unwrap();
    let first = b.try_recv_message().unwrap().unwrap();
    assert_eq!((first.body.as_slice(), first.fds.len()), (&b"1"[..], 1));
    assert!(cloexec(first.fds[0].as_fd()));
    let second = b.try_recv_message().unwrap().unwrap();
    assert_eq!((second.body.as_slice(), second.fds.len()), (&b"2"[..], 0));
    assert!(b.try_recv_message().unwrap().is_none());
    drop(first);
    assert!(probe.all_copies_closed());
}

#[test]
fn try_recv_waits_for_the_rest_of_a_begun_message() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    a.stream().write_all(&header(4).to_bytes()).unwrap();
    a.stream().write_all(b"ab").unwrap();
    // Whether the rest is written before or during the read, the read returns it whole.
    let writer = std::thread::spawn(move || {
        a.stream().write_all(b"cd").unwrap();
        a
    });
    let msg = b.try_recv_message().unwrap().unwrap();
    assert_eq!(msg.body, b"abcd");
    drop(writer.join().unwrap());
    assert!(matches!(
        b.try_recv_message(),
        Err(SocketError::Disconnected)
    ));
}

#[test]
fn try_recv_stall_mid_message_is_stalled() {
    let (a, b) = Endpoint::pair().unwrap();
    b.set_read_ahead(true);
    b.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    a.stream().write_all(&header(4).to_bytes()).unwrap();
    a.stream().write_all(b"ab").unwrap();
    assert!(matches!(
        b.try_recv_message(),
        Err(SocketError::Stalled {
            expected: 16,
            received: 14
        })
    ));
    assert!(!b.has_buffered_bytes());
}
