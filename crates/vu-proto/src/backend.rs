//! The back-end side of the back-end request channel: [`BackendChannel`], the typed
//! sender a back-end uses to send requests to its front-end.
//!
//! The spec: "the front-end sends the `VHOST_USER_SET_BACKEND_REQ_FD` message" with a
//! socket, "through which the back-end can send requests to the front-end". A back-end
//! wraps the received fd in an [`Endpoint`] (with [`Endpoint::from_fd`]) and builds a
//! [`BackendChannel`] around it, telling it which protocol features were negotiated.
//!
//! When `REPLY_ACK` was negotiated every request sets NEED_REPLY and the channel waits
//! for the front-end's `u64` status: zero is success, anything else is
//! [`ChannelError::Refused`]. Without it, only `SHARED_OBJECT_LOOKUP`, which always has
//! a reply, waits.
//!
//! Each request needs the protocol feature the spec gates it on (`CONFIG` for
//! `CONFIG_CHANGE_MSG`, `SHMEM` and `BACKEND_SEND_FD` for `SHMEM_MAP`, ...; see
//! [`required_features`]); without it nothing is sent and the request fails with
//! [`ChannelError::NotNegotiated`].
//!
//! The channel is `Send + Sync` and `Clone`: device threads share it (in an `Arc` or as
//! clones, which share one connection), and a mutex around the endpoint keeps each request
//! and its reply together. A socket error or a
//! malformed reply leaves the stream out of sync, so the channel then refuses every
//! further request with [`ChannelError::Broken`].

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::features::ProtocolFeatures;
use crate::header::{Header, HeaderFlags};
use crate::message::{decode_reply, BackendRequest, DecodeError};
use crate::payload::{Iotlb, IotlbPerm, IotlbType, SharedObject, ShmemMap, VringState, U64};
use crate::request::{BackendReq, ReplyRule};
use crate::socket::{Endpoint, SocketError};

/// Why a request on a [`BackendChannel`] failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Sending the request or receiving its reply failed; the channel is now broken.
    #[error("{request}: back-end channel socket error: {source}")]
    Socket {
        /// The request being sent.
        request: BackendReq,
        /// The socket failure.
        #[source]
        source: SocketError,
    },
    /// The front-end's reply is malformed, lacks the REPLY flag or answers another
    /// request; the channel is now broken.
    #[error("{request}: bad reply from the front-end: {source}")]
    BadReply {
        /// The request whose reply was awaited.
        request: BackendReq,
        /// What was wrong with the reply.
        #[source]
        source: DecodeError,
    },
    /// The front-end answered with a non-zero status.
    #[error("{request}: refused by the front-end with status {status:#x}")]
    Refused {
        /// The refused request.
        request: BackendReq,
        /// The non-zero status the front-end sent.
        status: u64,
    },
    /// The request needs protocol features that were not negotiated; nothing was sent.
    #[error("{request} needs protocol features {missing:?}, which were not negotiated")]
    NotNegotiated {
        /// The request that was not sent.
        request: BackendReq,
        /// The features it needs that are missing.
        missing: ProtocolFeatures,
    },
    /// An earlier socket error or bad reply left the stream out of sync; nothing was
    /// sent.
    #[error("{request}: the back-end channel is broken by an earlier error")]
    Broken {
        /// The request that was not sent.
        request: BackendReq,
    },
}

/// The endpoint and whether an earlier failure broke it.
#[derive(Debug)]
struct Inner {
    endpoint: Endpoint,
    broken: bool,
}

/// The protocol features back-end request `request` needs, as the spec words it ("when
/// `VHOST_USER_PROTOCOL_F_CONFIG` is negotiated", "should be sent only when
/// `VHOST_USER_PROTOCOL_F_HOST_NOTIFIER` ... has been successfully negotiated", ...), plus
/// `BACKEND_SEND_FD` when the message carries an fd: "If
/// `VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD` protocol feature is negotiated, back-end can send
/// file descriptors".
///
/// `IOTLB_MSG` needs the virtio feature `VIRTIO_F_IOMMU_PLATFORM`, which the channel does
/// not know; it needs no protocol feature here.
pub fn required_features(request: BackendReq, carries_fd: bool) -> ProtocolFeatures {
    let feature = match request {
        BackendReq::IotlbMsg => ProtocolFeatures::empty(),
        BackendReq::ConfigChangeMsg => ProtocolFeatures::CONFIG,
        BackendReq::VringHostNotifierMsg => ProtocolFeatures::HOST_NOTIFIER,
        BackendReq::VringCall | BackendReq::VringErr => ProtocolFeatures::INBAND_NOTIFICATIONS,
        BackendReq::SharedObjectAdd
        | BackendReq::SharedObjectRemove
        | BackendReq::SharedObjectLookup => ProtocolFeatures::SHARED_OBJECT,
        BackendReq::ShmemMap | BackendReq::ShmemUnmap => ProtocolFeatures::SHMEM,
    };
    if carries_fd {
        feature | ProtocolFeatures::BACKEND_SEND_FD
    } else {
        feature
    }
}

/// The typed sender of back-end requests.
///
/// Built from the endpoint made of `SET_BACKEND_REQ_FD`'s fd and the protocol features
/// the front-end acknowledged. One method per back-end request; each checks the features
/// the request needs ([`required_features`]), sends it and, when a reply is due, waits for
/// it under the channel's lock. Clones share the connection and its lock.
#[derive(Debug, Clone)]
pub struct BackendChannel {
    inner: Arc<Mutex<Inner>>,
    acked: ProtocolFeatures,
}

impl BackendChannel {
    /// Wraps `endpoint`; `acked` is the protocol feature word the front-end set with
    /// `SET_PROTOCOL_FEATURES`: `REPLY_ACK` makes every request wait for its answer, and
    /// each request needs its own feature ([`required_features`]).
    pub fn new(endpoint: Endpoint, acked: ProtocolFeatures) -> Self {
        BackendChannel {
            inner: Arc::new(Mutex::new(Inner {
                endpoint,
                broken: false,
            })),
            acked,
        }
    }

    /// Adopts the socket fd received with `SET_BACKEND_REQ_FD`; see [`Endpoint::from_fd`]
    /// for the checks made on it.
    pub fn from_fd(fd: OwnedFd, acked: ProtocolFeatures) -> Result<Self, SocketError> {
        Ok(Self::new(Endpoint::from_fd(fd)?, acked))
    }

    /// The protocol features the channel was told were negotiated.
    pub fn acked(&self) -> ProtocolFeatures {
        self.acked
    }

    /// Bounds how long the channel waits for a reply; `None` waits forever. A timeout
    /// shows as [`ChannelError::Socket`] and breaks the channel.
    pub fn set_reply_timeout(&self, timeout: Option<Duration>) -> Result<(), SocketError> {
        self.lock().endpoint.set_read_timeout(timeout)
    }

    /// Whether an earlier failure broke the channel.
    pub fn is_broken(&self) -> bool {
        self.lock().broken
    }

    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`: tells the front-end the device's config
    /// space changed.
    pub fn config_change_msg(&self) -> Result<(), ChannelError> {
        self.send(
            BackendReq::ConfigChangeMsg,
            &BackendRequest::ConfigChangeMsg,
        )
        .map(drop)
    }

    /// `VHOST_USER_BACKEND_VRING_CALL`: an in-band call of vring `index` (with
    /// `INBAND_NOTIFICATIONS`).
    pub fn vring_call(&self, index: u32) -> Result<(), ChannelError> {
        let state = VringState { index, num: 0 };
        self.send(BackendReq::VringCall, &BackendRequest::VringCall(state))
            .map(drop)
    }

    /// `VHOST_USER_BACKEND_VRING_ERR`: an in-band error notification of vring `index`.
    pub fn vring_err(&self, index: u32) -> Result<(), ChannelError> {
        let state = VringState { index, num: 0 };
        self.send(BackendReq::VringErr, &BackendRequest::VringErr(state))
            .map(drop)
    }

    /// `VHOST_USER_BACKEND_IOTLB_MSG` of type miss: asks the front-end for a
    /// translation of `iova` with access `perm`.
    pub fn iotlb_miss(&self, iova: u64, perm: IotlbPerm) -> Result<(), ChannelError> {
        self.iotlb_msg(&Iotlb {
            iova,
            size: 0,
            uaddr: 0,
            perm,
            kind: IotlbType::Miss,
        })
    }

    /// `VHOST_USER_BACKEND_IOTLB_MSG` with any payload (a miss or an access failure).
    pub fn iotlb_msg(&self, msg: &Iotlb) -> Result<(), ChannelError> {
        self.send(BackendReq::IotlbMsg, &BackendRequest::IotlbMsg(*msg))
            .map(drop)
    }

    /// `VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG`: hands the front-end the notifier
    /// area `(fd, offset, size)` of vring `index`, or withdraws it with `None`.
    pub fn host_notifier(
        &self,
        index: u8,
        area: Option<(BorrowedFd<'_>, u64, u64)>,
    ) -> Result<(), ChannelError> {
        let (fd, offset, size) = match area {
            Some((fd, offset, size)) => (Some(fd), offset, size),
            None => (None, 0, 0),
        };
        let msg = BackendRequest::VringHostNotifierMsg {
            index,
            size,
            offset,
            fd,
        };
        self.send(BackendReq::VringHostNotifierMsg, &msg).map(drop)
    }

    /// `VHOST_USER_BACKEND_SHARED_OBJECT_ADD`: adds `uuid` to the front-end's table
    /// of shared objects exported by this back-end.
    pub fn shared_object_add(&self, uuid: &SharedObject) -> Result<(), ChannelError> {
        let msg = BackendRequest::SharedObjectAdd(*uuid);
        self.send(BackendReq::SharedObjectAdd, &msg).map(drop)
    }

    /// `VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE`: removes `uuid` from the table.
    pub fn shared_object_remove(&self, uuid: &SharedObject) -> Result<(), ChannelError> {
        let msg = BackendRequest::SharedObjectRemove(*uuid);
        self.send(BackendReq::SharedObjectRemove, &msg).map(drop)
    }

    /// `VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP`: asks the front-end for the fd of the
    /// shared object `uuid`. Always answered; `Ok(None)` when the front-end succeeded
    /// without an fd.
    pub fn shared_object_lookup(
        &self,
        uuid: &SharedObject,
    ) -> Result<Option<OwnedFd>, ChannelError> {
        let msg = BackendRequest::SharedObjectLookup(*uuid);
        self.send(BackendReq::SharedObjectLookup, &msg)
    }

    /// `VHOST_USER_BACKEND_SHMEM_MAP`: asks the front-end to map `map.len` bytes of
    /// `fd` from `map.fd_offset` at `map.shm_offset` in shared memory region
    /// `map.shmid`.
    pub fn shmem_map(&self, map: &ShmemMap, fd: BorrowedFd<'_>) -> Result<(), ChannelError> {
        let msg = BackendRequest::ShmemMap { map: *map, fd };
        self.send(BackendReq::ShmemMap, &msg).map(drop)
    }

    /// `VHOST_USER_BACKEND_SHMEM_UNMAP`: asks the front-end to unmap `map.len` bytes
    /// at `map.shm_offset` of region `map.shmid` (`map.fd_offset` is ignored).
    pub fn shmem_unmap(&self, map: &ShmemMap) -> Result<(), ChannelError> {
        let msg = BackendRequest::ShmemUnmap(*map);
        self.send(BackendReq::ShmemUnmap, &msg).map(drop)
    }

    /// Locks the endpoint. A thread that panicked while holding the lock did so
    /// between two calls into the endpoint (nothing in `send` panics), so the state
    /// is still usable.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `msg` (a `request`) and waits for its reply when one is due: always for
    /// requests that always have one, and for every request once `REPLY_ACK` is
    /// negotiated. Returns the fd carried by the reply.
    fn send(
        &self,
        request: BackendReq,
        msg: &BackendRequest<BorrowedFd<'_>>,
    ) -> Result<Option<OwnedFd>, ChannelError> {
        let missing = required_features(request, !msg.fds().is_empty()) - self.acked;
        if !missing.is_empty() {
            return Err(ChannelError::NotNegotiated { request, missing });
        }
        let reply_ack = self.acked.contains(ProtocolFeatures::REPLY_ACK);
        let always = request.reply_rule() == ReplyRule::Always;
        let flags = if reply_ack {
            HeaderFlags::NEED_REPLY
        } else {
            HeaderFlags::empty()
        };
        let mut inner = self.lock();
        if inner.broken {
            return Err(ChannelError::Broken { request });
        }
        let (header, body) = msg.encode(flags);
        let wait = reply_ack || always;
        let result = exchange(&inner.endpoint, request, &header, &body, &msg.fds(), wait);
        if let Err(ChannelError::Socket { .. } | ChannelError::BadReply { .. }) = &result {
            inner.broken = true;
        }
        result
    }
}

/// Sends one request and, if `wait`, receives and checks its `u64` status reply.
fn exchange(
    endpoint: &Endpoint,
    request: BackendReq,
    header: &Header,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
    wait: bool,
) -> Result<Option<OwnedFd>, ChannelError> {
    let socket = |source| ChannelError::Socket { request, source };
    endpoint.send_message(header, body, fds).map_err(socket)?;
    if !wait {
        return Ok(None);
    }
    let raw = endpoint.recv_message().map_err(socket)?;
    let reply = decode_reply::<U64>(request, raw)
        .map_err(|source| ChannelError::BadReply { request, source })?;
    match reply.payload {
        U64(0) => Ok(reply.fd),
        U64(status) => Err(ChannelError::Refused { request, status }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::message::encode_reply;
    use crate::wire::WireError;

    fn channel(acked: ProtocolFeatures) -> (BackendChannel, Endpoint) {
        let (ours, theirs) = Endpoint::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let ch = BackendChannel::new(ours, acked);
        ch.set_reply_timeout(Some(Duration::from_secs(10))).unwrap();
        (ch, theirs)
    }

    fn recv(theirs: &Endpoint) -> (Header, BackendRequest) {
        let raw = theirs.recv_message().unwrap();
        let header = raw.header;
        (header, BackendRequest::decode(raw).unwrap())
    }

    fn ack(theirs: &Endpoint, request: &Header, status: u64) {
        let (h, b) = encode_reply(request, &U64(status));
        theirs.send_message(&h, &b, &[]).unwrap();
    }

    /// Every feature but REPLY_ACK, so that only the waiting differs.
    fn without_reply_ack() -> ProtocolFeatures {
        ProtocolFeatures::all() - ProtocolFeatures::REPLY_ACK
    }

    /// A request of the channel, sent by a closure.
    type Sender = Box<dyn Fn(&BackendChannel) -> Result<(), ChannelError>>;

    #[test]
    fn a_request_without_its_feature_is_refused_unsent() {
        let (ch, theirs) = channel(ProtocolFeatures::REPLY_ACK);
        let cases: [(BackendReq, Sender); 5] = [
            (
                BackendReq::ConfigChangeMsg,
                Box::new(|c| c.config_change_msg()),
            ),
            (BackendReq::VringCall, Box::new(|c| c.vring_call(0))),
            (BackendReq::VringErr, Box::new(|c| c.vring_err(0))),
            (
                BackendReq::SharedObjectAdd,
                Box::new(|c| c.shared_object_add(&SharedObject { uuid: [1; 16] })),
            ),
            (
                BackendReq::ShmemUnmap,
                Box::new(|c| {
                    c.shmem_unmap(&ShmemMap {
                        shmid: 0,
                        fd_offset: 0,
                        shm_offset: 0,
                        len: 0x1000,
                        flags: crate::payload::ShmemMapFlags::empty(),
                    })
                }),
            ),
        ];
        for (request, send) in cases {
            match send(&ch) {
                Err(ChannelError::NotNegotiated {
                    request: r,
                    missing,
                }) => {
                    assert_eq!(r, request);
                    assert_eq!(missing, required_features(request, false));
                }
                other => panic!("{request}: {other:?}"),
            }
        }
        assert!(
            !ch.is_broken(),
            "a refusal before sending keeps the channel"
        );
        theirs.set_nonblocking(true).unwrap();
        assert!(
            theirs.recv_message().is_err(),
            "nothing reached the front-end"
        );
    }

    #[test]
    fn shmem_map_needs_backend_send_fd_too() {
        let (ch, _theirs) = channel(ProtocolFeatures::SHMEM);
        let file = std::fs::File::open("/dev/null").unwrap();
        let map = ShmemMap {
            shmid: 0,
            fd_offset: 0,
            shm_offset: 0,
            len: 0x1000,
            flags: crate::payload::ShmemMapFlags::empty(),
        };
        let err = ch.shmem_map(&map, std::os::fd::AsFd::as_fd(&file));
        assert!(matches!(
            err,
            Err(ChannelError::NotNegotiated { missing, .. })
                if missing == ProtocolFeatures::BACKEND_SEND_FD
        ));
    }

    #[test]
    fn host_notifier_with_an_area_needs_host_notifier_and_backend_send_fd() {
        assert_eq!(
            required_features(BackendReq::VringHostNotifierMsg, true),
            ProtocolFeatures::HOST_NOTIFIER | ProtocolFeatures::BACKEND_SEND_FD
        );
        assert_eq!(
            required_features(BackendReq::VringHostNotifierMsg, false),
            ProtocolFeatures::HOST_NOTIFIER
        );
    }

    #[test]
    fn iotlb_miss_is_sent_as_a_miss_of_the_address() {
        let (ch, theirs) = channel(without_reply_ack());
        ch.iotlb_miss(0x4000, IotlbPerm::Read).unwrap();
        match recv(&theirs).1 {
            BackendRequest::IotlbMsg(msg) => {
                assert_eq!(
                    (msg.iova, msg.kind, msg.perm),
                    (0x4000, IotlbType::Miss, IotlbPerm::Read)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shmem_unmap_and_shared_object_remove_are_sent_when_negotiated() {
        let (ch, theirs) = channel(without_reply_ack());
        let map = ShmemMap {
            shmid: 1,
            fd_offset: 0,
            shm_offset: 0x2000,
            len: 0x1000,
            flags: crate::payload::ShmemMapFlags::empty(),
        };
        ch.shmem_unmap(&map).unwrap();
        ch.shared_object_remove(&SharedObject { uuid: [9; 16] })
            .unwrap();
        match recv(&theirs).1 {
            BackendRequest::ShmemUnmap(got) => assert_eq!(got.shm_offset, 0x2000),
            other => panic!("{other:?}"),
        }
        match recv(&theirs).1 {
            BackendRequest::SharedObjectRemove(got) => assert_eq!(got.uuid, [9; 16]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clones_share_the_connection() {
        let (ch, theirs) = channel(without_reply_ack());
        let clone = ch.clone();
        clone.vring_call(2).unwrap();
        ch.vring_err(2).unwrap();
        assert!(matches!(recv(&theirs).1, BackendRequest::VringCall(_)));
        assert!(matches!(recv(&theirs).1, BackendRequest::VringErr(_)));
    }

    #[test]
    fn channel_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<BackendChannel>();
    }

    #[test]
    fn without_reply_ack_config_change_is_sent_without_need_reply() {
        let (ch, theirs) = channel(without_reply_ack());
        ch.config_change_msg().unwrap();
        let (header, req) = recv(&theirs);
        assert!(!header.needs_reply());
        assert!(matches!(req, BackendRequest::ConfigChangeMsg));
    }

    #[test]
    fn with_reply_ack_vring_call_waits_for_the_ack() {
        let (ch, theirs) = channel(ProtocolFeatures::all());
        let peer = std::thread::spawn(move || {
            let (header, req) = recv(&theirs);
            assert!(header.needs_reply());
            assert!(matches!(
                req,
                BackendRequest::VringCall(VringState { index: 3, num: 0 })
            ));
            ack(&theirs, &header, 0);
        });
        ch.vring_call(3).unwrap();
        peer.join().unwrap();
    }

    #[test]
    fn non_zero_ack_is_refused_with_the_status() {
        let (ch, theirs) = channel(ProtocolFeatures::all());
        let peer = std::thread::spawn(move || {
            let (header, _) = recv(&theirs);
            ack(&theirs, &header, 5);
        });
        let err = ch.shared_object_add(&SharedObject { uuid: [1; 16] });
        assert!(matches!(
            err,
            Err(ChannelError::Refused {
                request: BackendReq::SharedObjectAdd,
                status: 5
            })
        ));
        peer.join().unwrap();
        assert!(!ch.is_broken(), "a refusal keeps the stream in sync");
    }

    #[test]
    fn reply_to_another_request_breaks_the_channel() {
        let (ch, theirs) = channel(ProtocolFeatures::all());
        let peer = std::thread::spawn(move || {
            let (header, _) = recv(&theirs);
            let mut wrong = header;
            wrong.request = BackendReq::VringErr.code();
            ack(&theirs, &wrong, 0);
            theirs
        });
        let err = ch.vring_call(0).unwrap_err();
        match err {
            ChannelError::BadReply { request, source } => {
                assert_eq!(request, BackendReq::VringCall);
                assert!(matches!(source.error, WireError::ReplyMismatch { .. }));
            }
            other => panic!("{other:?}"),
        }
        assert!(ch.is_broken());
        assert!(matches!(
            ch.config_change_msg(),
            Err(ChannelError::Broken { .. })
        ));
        drop(peer.join().unwrap());
    }

    #[test]
    fn shmem_map_passes_its_fd() {
        let (ch, theirs) = channel(without_reply_ack());
        let file = std::fs::File::open("/dev/null").unwrap();
        let map = ShmemMap {
            shmid: 2,
            fd_offset: 0,
            shm_offset: 0x1000,
            len: 0x2000,
            flags: crate::payload::ShmemMapFlags::WRITABLE,
        };
        ch.shmem_map(&map, std::os::fd::AsFd::as_fd(&file)).unwrap();
        match recv(&theirs).1 {
            BackendRequest::ShmemMap { map: got, fd: _ } => assert_eq!(got, map),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_notifier_without_area_sets_the_no_fd_bit() {
        let (ch, theirs) = channel(without_reply_ack());
        ch.host_notifier(1, None).unwrap();
        match recv(&theirs).1 {
            BackendRequest::VringHostNotifierMsg {
                index: 1, fd: None, ..
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shared_object_lookup_always_waits_and_returns_the_fd() {
        let (ch, theirs) = channel(without_reply_ack());
        let peer = std::thread::spawn(move || {
            let (header, _) = recv(&theirs);
            let file = std::fs::File::open("/dev/null").unwrap();
            let (h, b) = encode_reply(&header, &U64(0));
            theirs
                .send_message(&h, &b, &[std::os::fd::AsFd::as_fd(&file)])
                .unwrap();
        });
        let fd = ch
            .shared_object_lookup(&SharedObject { uuid: [7; 16] })
            .unwrap();
        assert!(fd.is_some());
        peer.join().unwrap();
    }

    #[test]
    fn threads_share_one_channel() {
        // The peer refuses each request with a status naming it (request and queue), so a
        // reply that reached the wrong thread would surface as the wrong status.
        fn status(request: &BackendRequest) -> u64 {
            match request {
                BackendRequest::VringCall(state) => 100 + u64::from(state.index),
                BackendRequest::VringErr(state) => 200 + u64::from(state.index),
                other => panic!("unexpected {other:?}"),
            }
        }
        let (ch, theirs) = channel(ProtocolFeatures::all());
        let ch = Arc::new(ch);
        let peer = std::thread::spawn(move || {
            for _ in 0..8 {
                let (header, request) = recv(&theirs);
                ack(&theirs, &header, status(&request));
            }
        });
        let refused = |result: Result<(), ChannelError>| match result {
            Err(ChannelError::Refused { status, .. }) => status,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let workers: Vec<_> = (0..4u32)
            .map(|i| {
                let ch = Arc::clone(&ch);
                std::thread::spawn(move || {
                    assert_eq!(refused(ch.vring_call(i)), 100 + u64::from(i));
                    assert_eq!(refused(ch.vring_err(i)), 200 + u64::from(i));
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        peer.join().unwrap();
        assert!(!ch.is_broken());
    }
}
