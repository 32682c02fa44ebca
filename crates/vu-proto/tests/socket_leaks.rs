//! Fd-leak accounting for `vu_proto::socket::Endpoint`: counts the entries of
//! `/proc/self/fd` before and after each failure path.
//!
//! The count is process-wide, so this binary holds only these tests and each one takes
//! `SERIAL` for its whole run: no other test can open or close an fd meanwhile.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vu_proto::header::{Header, HeaderFlags, MAX_FDS, MAX_PAYLOAD_SIZE};
use vu_proto::request::RequestCode;
use vu_proto::socket::{Endpoint, SocketError};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn header(size: u32) -> [u8; Header::SIZE] {
    Header::new(RequestCode(1), HeaderFlags::empty(), size).to_bytes()
}

fn raw_send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    assert_eq!(stream.send_with_fds(&[bytes], fds).unwrap(), bytes.len());
}

/// Runs `scenario` with a fresh endpoint pair and an eventfd to pass, checks that its
/// receive failed, and that the fd count is back to where it started once the pair and
/// the eventfd are closed.
fn no_fd_leaked(scenario: impl FnOnce(&Endpoint, &Endpoint, RawFd) -> Result<(), SocketError>) {
    let _serial = serial();
    let before = open_fds();
    {
        let (a, b) = Endpoint::pair().unwrap();
        let event = EventFd::new(0).unwrap();
        assert!(scenario(&a, &b, event.as_raw_fd()).is_err());
    }
    assert_eq!(open_fds(), before);
}

#[test]
fn control_truncation_leaks_no_fd() {
    no_fd_leaked(|a, b, fd| {
        raw_send(a.stream(), &header(0), &[fd; MAX_FDS + 1]);
        b.recv_message().map(drop)
    });
}

#[test]
fn too_many_fds_across_pieces_leaks_no_fd() {
    no_fd_leaked(|a, b, fd| {
        raw_send(a.stream(), &header(1), &[fd; MAX_FDS]);
        raw_send(a.stream(), b"x", &[fd; 3]);
        b.recv_message().map(drop)
    });
}

#[test]
fn invalid_header_leaks_no_fd() {
    no_fd_leaked(|a, b, fd| {
        raw_send(a.stream(), &header(MAX_PAYLOAD_SIZE + 1), &[fd; 4]);
        b.recv_message().map(drop)
    });
}

#[test]
fn eof_mid_body_leaks_no_fd() {
    no_fd_leaked(|a, b, fd| {
        raw_send(a.stream(), &header(8), &[fd; 2]);
        a.stream().write_all(b"abc").unwrap();
        a.stream().shutdown(std::net::Shutdown::Write).unwrap();
        b.recv_message().map(drop)
    });
}

#[test]
fn received_message_closes_its_fds_when_dropped() {
    let _serial = serial();
    let before = open_fds();
    {
        let (a, b) = Endpoint::pair().unwrap();
        let event = EventFd::new(0).unwrap();
        raw_send(a.stream(), &header(0), &[event.as_raw_fd(); MAX_FDS]);
        let message = b.recv_message().unwrap();
        assert_eq!(message.fds.len(), MAX_FDS);
        assert_eq!(open_fds(), before + 3 + MAX_FDS);
    }
    assert_eq!(open_fds(), before);
}
