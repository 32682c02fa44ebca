//! Both runtimes read the frontend's socket ahead (one `recvmsg` for as many messages as
//! the socket holds): requests that arrive in one write are each handled and answered, fds
//! go to the message that ends the write that carried them, and a message split between
//! what was read ahead and what is still in the socket is completed.

use std::os::fd::BorrowedFd;
use std::path::Path;

use vu_proto::header::{Header, HeaderFlags};
use vu_proto::message::FrontendRequest;
use vu_proto::request::FrontendReq;
use vu_tests::backends::EchoBackend;
use vu_tests::daemon_support::{LocalRunning, Running};
use vu_tests::hostile::Hostile;
use vu_tests::proto_support::{eventfd, eventfd_fd};

type R<'a> = FrontendRequest<BorrowedFd<'a>>;

/// What the echo backend offers (see `EchoBackend::features`).
fn offered_features() -> u64 {
    use vu_proto::features::VirtioFeatures as F;
    (F::VERSION_1 | F::RING_EVENT_IDX | F::PROTOCOL_FEATURES).bits()
}

/// What the echo backend offers (see `EchoBackend::protocol_features`).
fn offered_protocol() -> u64 {
    use vu_proto::features::ProtocolFeatures as P;
    (P::MQ | P::REPLY_ACK).bits()
}

/// `req` with NEED_REPLY, header and body in one buffer.
fn encoded(req: &R<'_>) -> Vec<u8> {
    let (header, body) = req.encode(HeaderFlags::NEED_REPLY);
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(&body);
    bytes
}

/// A frontend on `path` that negotiated every offered feature, REPLY_ACK included.
fn negotiated(path: &Path) -> Hostile {
    let fe = Hostile::connect(path);
    fe.negotiate();
    fe
}

fn two_requests_in_one_write_are_both_answered(path: &Path) {
    let fe = negotiated(path);
    let mut bytes = encoded(&R::GetFeatures);
    bytes.extend(encoded(&R::GetProtocolFeatures));
    fe.endpoint.send(&[&bytes], &[]).unwrap();
    assert_eq!(fe.recv_u64(FrontendReq::GetFeatures), offered_features());
    assert_eq!(
        fe.recv_u64(FrontendReq::GetProtocolFeatures),
        offered_protocol()
    );
}

fn fds_of_one_write_go_to_the_message_that_ends_it(path: &Path) {
    let fe = negotiated(path);
    let call = eventfd();
    let call_fd = eventfd_fd(&call);
    let mut bytes = encoded(&R::GetFeatures);
    bytes.extend(encoded(&R::SetVringCall {
        index: 0,
        fd: Some(call_fd),
    }));
    // One sendmsg: both messages, and the call fd with their first byte.
    fe.endpoint.send(&[&bytes], &[call_fd]).unwrap();
    assert_eq!(fe.recv_u64(FrontendReq::GetFeatures), offered_features());
    assert_eq!(fe.ack(FrontendReq::SetVringCall), 0);
    assert_eq!(fe.get_features(), offered_features());
}

fn message_split_between_read_ahead_and_socket_is_completed(path: &Path) {
    let fe = negotiated(path);
    let first = encoded(&R::GetFeatures);
    let second = encoded(&R::GetProtocolFeatures);
    let (head, tail) = second.split_at(Header::SIZE / 2);
    fe.endpoint.send(&[&first, head], &[]).unwrap();
    // The first answer proves the daemon read the whole write, half of the second header
    // included, before the rest of it was sent.
    assert_eq!(fe.recv_u64(FrontendReq::GetFeatures), offered_features());
    fe.endpoint.send(&[tail], &[]).unwrap();
    assert_eq!(
        fe.recv_u64(FrontendReq::GetProtocolFeatures),
        offered_protocol()
    );
}

#[test]
fn threaded_daemon_answers_two_requests_sent_in_one_write() {
    let running = Running::serving(EchoBackend::new(1, 256));
    two_requests_in_one_write_are_both_answered(&running.path);
}

#[test]
fn threaded_daemon_gives_fds_of_one_write_to_the_message_that_ends_it() {
    let running = Running::serving(EchoBackend::new(1, 256));
    fds_of_one_write_go_to_the_message_that_ends_it(&running.path);
}

#[test]
fn threaded_daemon_completes_a_message_split_between_read_ahead_and_socket() {
    let running = Running::serving(EchoBackend::new(1, 256));
    message_split_between_read_ahead_and_socket_is_completed(&running.path);
}

#[test]
fn local_daemon_answers_two_requests_sent_in_one_write() {
    let running = LocalRunning::serving(EchoBackend::new(1, 256));
    two_requests_in_one_write_are_both_answered(&running.path);
}

#[test]
fn local_daemon_gives_fds_of_one_write_to_the_message_that_ends_it() {
    let running = LocalRunning::serving(EchoBackend::new(1, 256));
    fds_of_one_write_go_to_the_message_that_ends_it(&running.path);
}

#[test]
fn local_daemon_completes_a_message_split_between_read_ahead_and_socket() {
    let running = LocalRunning::serving(EchoBackend::new(1, 256));
    message_split_between_read_ahead_and_socket_is_completed(&running.path);
}
