//! Serving the back-end channel on the front-end side: the [`BackendReqHandler`] trait,
//! one method per back-end request, and [`handle_backend_request`], which reads one
//! request, dispatches it and replies when a reply is due.

use std::num::NonZeroU64;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::header::Header;
use crate::message::{encode_reply, BackendRequest, DecodeError};
use crate::payload::{Iotlb, SharedObject, ShmemMap, U64};
use crate::request::{BackendReq, ReplyRule, RequestCode};
use crate::socket::{Endpoint, SocketError};

/// A handler's refusal of a back-end request: the non-zero status sent back when the
/// back-end asked for a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("refused with status {0}")]
pub struct Refusal(pub NonZeroU64);

impl Refusal {
    /// Status 1: the request is not supported. What the default methods return.
    pub const UNSUPPORTED: Refusal = Refusal(NonZeroU64::MIN);

    /// The status word sent to the back-end.
    pub fn status(self) -> u64 {
        self.0.get()
    }
}

/// What a front-end does with each back-end request. Every method refuses by default
/// with [`Refusal::UNSUPPORTED`]; implement the ones the front-end supports.
///
/// Fds passed to a method are owned by it: dropping them closes them.
pub trait BackendReqHandler {
    /// `VHOST_USER_BACKEND_IOTLB_MSG`: an IOTLB miss or access failure.
    fn iotlb_msg(&mut self, msg: Iotlb) -> Result<(), Refusal> {
        let _ = msg;
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`: the device config space changed.
    fn config_change_msg(&mut self) -> Result<(), Refusal> {
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG`: vring `index`'s notifier area is
    /// `(fd, offset, size)`, or is withdrawn (`None`).
    fn vring_host_notifier_msg(
        &mut self,
        index: u8,
        area: Option<(OwnedFd, u64, u64)>,
    ) -> Result<(), Refusal> {
        let _ = (index, area);
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_VRING_CALL`: an in-band call of vring `index`.
    fn vring_call(&mut self, index: u32) -> Result<(), Refusal> {
        let _ = index;
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_VRING_ERR`: an in-band error of vring `index`.
    fn vring_err(&mut self, index: u32) -> Result<(), Refusal> {
        let _ = index;
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_SHARED_OBJECT_ADD`.
    fn shared_object_add(&mut self, uuid: SharedObject) -> Result<(), Refusal> {
        let _ = uuid;
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE`.
    fn shared_object_remove(&mut self, uuid: SharedObject) -> Result<(), Refusal> {
        let _ = uuid;
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP`: the fd of object `uuid`, if any.
    fn shared_object_lookup(&mut self, uuid: SharedObject) -> Result<Option<OwnedFd>, Refusal> {
        let _ = uuid;
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_SHMEM_MAP`: map part of `fd` as `map` says.
    fn shmem_map(&mut self, map: ShmemMap, fd: OwnedFd) -> Result<(), Refusal> {
        let _ = (map, fd);
        Err(Refusal::UNSUPPORTED)
    }

    /// `VHOST_USER_BACKEND_SHMEM_UNMAP`.
    fn shmem_unmap(&mut self, map: ShmemMap) -> Result<(), Refusal> {
        let _ = map;
        Err(Refusal::UNSUPPORTED)
    }
}

/// What [`handle_backend_request`] did with one request.
#[derive(Debug)]
pub struct Handled {
    /// The request code received.
    pub request: RequestCode,
    /// The handler's verdict (an unknown request is [`Refusal::UNSUPPORTED`]).
    pub outcome: Result<(), Refusal>,
    /// Whether a reply was sent.
    pub replied: bool,
}

/// Why [`handle_backend_request`] could not serve a request.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Receiving the request or sending the reply failed (including
    /// [`SocketError::Disconnected`] when the back-end closed the channel).
    #[error("back-end channel: {0}")]
    Socket(#[from] SocketError),
    /// The request was malformed; it was refused (with a failure status if the
    /// back-end asked for a reply) and its fds were closed.
    #[error("back-end channel: {0}")]
    Malformed(#[from] DecodeError),
}

/// Reads one back-end request from `endpoint`, hands it to `handler` and replies when
/// the back-end set NEED_REPLY or the request always has a reply
/// (`SHARED_OBJECT_LOOKUP`): a `u64` status, zero on success.
pub fn handle_backend_request<H: BackendReqHandler + ?Sized>(
    endpoint: &Endpoint,
    handler: &mut H,
) -> Result<Handled, HandleError> {
    let raw = endpoint.recv_message()?;
    let header = raw.header;
    let request = match BackendRequest::decode(raw) {
        Ok(request) => request,
        Err(e) => {
            if reply_due(&header) {
                reply(endpoint, &header, Err(Refusal::UNSUPPORTED), None)?;
            }
            return Err(HandleError::Malformed(e));
        }
    };
    let mut reply_fd = None;
    let outcome = match request {
        BackendRequest::IotlbMsg(msg) => handler.iotlb_msg(msg),
        BackendRequest::ConfigChangeMsg => handler.config_change_msg(),
        BackendRequest::VringHostNotifierMsg {
            index,
            size,
            offset,
            fd,
        } => handler.vring_host_notifier_msg(index, fd.map(|fd| (fd, offset, size))),
        BackendRequest::VringCall(state) => handler.vring_call(state.index),
        BackendRequest::VringErr(state) => handler.vring_err(state.index),
        BackendRequest::SharedObjectAdd(uuid) => handler.shared_object_add(uuid),
        BackendRequest::SharedObjectRemove(uuid) => handler.shared_object_remove(uuid),
        BackendRequest::SharedObjectLookup(uuid) => {
            handler.shared_object_lookup(uuid).map(|fd| reply_fd = fd)
        }
        BackendRequest::ShmemMap { map, fd } => handler.shmem_map(map, fd),
        BackendRequest::ShmemUnmap(map) => handler.shmem_unmap(map),
        // BackendRequest is non-exhaustive; anything this crate cannot decode is
        // refused.
        _ => Err(Refusal::UNSUPPORTED),
    };
    let replied = reply_due(&header);
    if replied {
        reply(
            endpoint,
            &header,
            outcome,
            reply_fd.as_ref().map(AsFd::as_fd),
        )?;
    }
    Ok(Handled {
        request: header.request,
        outcome,
        replied,
    })
}

/// Whether the request in `header` gets a reply.
fn reply_due(header: &Header) -> bool {
    let always =
        BackendReq::try_from(header.request).is_ok_and(|req| req.reply_rule() == ReplyRule::Always);
    always || header.needs_reply()
}

/// Sends the status reply for `outcome`, with `fd` if there is one.
fn reply(
    endpoint: &Endpoint,
    request: &Header,
    outcome: Result<(), Refusal>,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), SocketError> {
    let status = match outcome {
        Ok(()) => U64::ACK_SUCCESS,
        Err(refusal) => U64(refusal.status()),
    };
    let (header, body) = encode_reply(request, &status);
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    endpoint.send_message(&header, &body, &fds)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::{BackendChannel, ChannelError};
    use crate::features::ProtocolFeatures;

    #[derive(Default)]
    struct Recorder {
        calls: Vec<u32>,
        config_changes: usize,
    }

    impl BackendReqHandler for Recorder {
        fn vring_call(&mut self, index: u32) -> Result<(), Refusal> {
            self.calls.push(index);
            Ok(())
        }
        fn config_change_msg(&mut self) -> Result<(), Refusal> {
            self.config_changes += 1;
            Ok(())
        }
        fn shared_object_lookup(
            &mut self,
            _uuid: SharedObject,
        ) -> Result<Option<OwnedFd>, Refusal> {
            Ok(Some(std::fs::File::open("/dev/null").unwrap().into()))
        }
    }

    fn pair(acked: ProtocolFeatures) -> (BackendChannel, Endpoint) {
        let (a, b) = Endpoint::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let ch = BackendChannel::new(
            a,
            acked | (ProtocolFeatures::all() - ProtocolFeatures::REPLY_ACK),
        );
        ch.set_reply_timeout(Some(Duration::from_secs(10))).unwrap();
        (ch, b)
    }

    #[test]
    fn handled_request_is_acked_when_need_reply_is_set() {
        let (ch, fe) = pair(ProtocolFeatures::REPLY_ACK);
        let sender = std::thread::spawn(move || ch.vring_call(4).unwrap());
        let mut rec = Recorder::default();
        let handled = handle_backend_request(&fe, &mut rec).unwrap();
        assert!(handled.replied);
        assert_eq!(handled.outcome, Ok(()));
        assert_eq!(rec.calls, [4]);
        sender.join().unwrap();
    }

    #[test]
    fn default_method_refuses_and_the_sender_sees_the_status() {
        let (ch, fe) = pair(ProtocolFeatures::REPLY_ACK);
        let sender = std::thread::spawn(move || ch.vring_err(0));
        let handled = handle_backend_request(&fe, &mut Recorder::default()).unwrap();
        assert_eq!(handled.outcome, Err(Refusal::UNSUPPORTED));
        assert!(matches!(
            sender.join().unwrap(),
            Err(ChannelError::Refused { status: 1, .. })
        ));
    }

    #[test]
    fn without_need_reply_nothing_is_sent_back() {
        let (ch, fe) = pair(ProtocolFeatures::empty());
        ch.config_change_msg().unwrap();
        let mut rec = Recorder::default();
        let handled = handle_backend_request(&fe, &mut rec).unwrap();
        assert!(!handled.replied);
        assert_eq!(rec.config_changes, 1);
    }

    #[test]
    fn lookup_is_answered_with_the_fd() {
        let (ch, fe) = pair(ProtocolFeatures::empty());
        let sender =
            std::thread::spawn(move || ch.shared_object_lookup(&SharedObject { uuid: [3; 16] }));
        let handled = handle_backend_request(&fe, &mut Recorder::default()).unwrap();
        assert!(handled.replied);
        assert!(sender.join().unwrap().unwrap().is_some());
    }

    #[test]
    fn malformed_request_with_need_reply_is_refused() {
        let (ch_end, fe) = Endpoint::pair().unwrap();
        ch_end
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // A VRING_CALL with a 4-byte body: too short for a vring state.
        let header = Header::new(
            BackendReq::VringCall,
            crate::header::HeaderFlags::NEED_REPLY,
            4,
        );
        ch_end.send_message(&header, &[0; 4], &[]).unwrap();
        let err = handle_backend_request(&fe, &mut Recorder::default()).unwrap_err();
        assert!(matches!(err, HandleError::Malformed(_)));
        let reply = ch_end.recv_message().unwrap();
        assert!(reply.header.is_reply());
        assert_eq!(reply.body, 1u64.to_ne_bytes());
    }
}
