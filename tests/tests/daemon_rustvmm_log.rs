//! What rust-vmm's `vhost::vhost_user::Frontend` sees when it sets a shared-memory dirty log
//! (`SET_LOG_BASE` with `LOG_SHMFD`) on our daemon.
//!
//! The spec requires a reply "if `VHOST_USER_PROTOCOL_F_LOG_SHMFD`" and gives it no payload
//! ("reply payload: N/A"); the daemon sends the header alone, which QEMU accepts (it checks
//! only the request code). rust-vmm's frontend instead waits for its own 16-byte log
//! description echoed back, as rust-vmm's backend does: it keeps reading after our header.
//! A relay between the two shows this without a timeout: it forwards every message, and once
//! it has forwarded the `SET_LOG_BASE` reply it closes the frontend's end, so the frontend's
//! read ends there (docs/conformance.md).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{VhostUserLog, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vu_backend::prelude::*;
use vu_backend::LogBitmap;
use vu_proto::listener::Listener;
use vu_proto::request::FrontendReq;
use vu_proto::socket::Endpoint;
use vu_tests::device::socket_path;
use vu_tests::proto_support::memfd;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<LogBitmap>>;
type Ring = VringMutex<Mem>;

/// A device that logs (so LOG_ALL and LOG_SHMFD are offered) and serves nothing.
struct Logging;

impl VhostUserBackend for Logging {
    type Bitmap = LogBitmap;
    type Vring = Ring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES | VirtioFeatures::LOG_ALL)
            .bits()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ | ProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        Ok(())
    }

    fn handle_event(&self, _: u16, _: EventSet, _: &[Ring], _: usize) -> io::Result<()> {
        Ok(())
    }
}

/// What the relay saw of the `SET_LOG_BASE` reply it forwarded.
#[derive(Debug)]
struct LogBaseReply {
    size: u32,
    fds: usize,
}

/// Forwards requests from `frontend` to `daemon`, and the replies back, until it has
/// forwarded the reply to `SET_LOG_BASE`; then closes the frontend's connection.
fn relay(frontend: &Endpoint, daemon: &Endpoint) -> LogBaseReply {
    let answered = [
        FrontendReq::GetFeatures,
        FrontendReq::GetProtocolFeatures,
        FrontendReq::GetQueueNum,
        FrontendReq::SetLogBase,
    ];
    loop {
        let request = frontend.recv_message().expect("a request from rust-vmm");
        let fds: Vec<BorrowedFd<'_>> = request.fds.iter().map(AsFd::as_fd).collect();
        daemon
            .send_message(&request.header, &request.body, &fds)
            .expect("forwarded to the daemon");
        let code = request.header.request;
        if !request.header.needs_reply() && !answered.iter().any(|&req| code == req.into()) {
            continue;
        }
        let reply = daemon.recv_message().expect("the daemon's reply");
        let fds: Vec<BorrowedFd<'_>> = reply.fds.iter().map(AsFd::as_fd).collect();
        frontend
            .send_message(&reply.header, &reply.body, &fds)
            .expect("forwarded to rust-vmm");
        if code == FrontendReq::SetLogBase.into() {
            frontend.stream().shutdown(Shutdown::Both).unwrap();
            return LogBaseReply {
                size: reply.header.size,
                fds: reply.fds.len(),
            };
        }
    }
}

#[test]
fn rust_vmm_frontend_waits_for_a_log_description_our_set_log_base_reply_does_not_carry() {
    let (_dir, path) = socket_path();
    let mut daemon = VhostUserDaemon::new(
        "rustvmm-log".to_owned(),
        Logging,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    daemon
        .start_serving(Listener::bind(&path).unwrap())
        .unwrap();
    let to_daemon = Endpoint::connect(&path).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let to_frontend = Endpoint::from(ours);

    let log = memfd(0x1000);
    let raw_log = log.as_raw_fd();
    let frontend = std::thread::spawn(move || {
        let mut fe = Frontend::from_stream(theirs, 1);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        fe.set_features(offered).unwrap();
        let protocol = fe.get_protocol_features().unwrap();
        assert!(protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        fe.set_protocol_features(VhostUserProtocolFeatures::LOG_SHMFD)
            .unwrap();
        fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: 0x1000,
                mmap_offset: 0,
                mmap_handle: raw_log,
            }),
        )
    });
    let reply = relay(&to_frontend, &to_daemon);
    let result = frontend.join().unwrap();
    drop(log);

    // Our reply: the header alone ("reply payload: N/A"), no fd.
    assert_eq!(reply.size, 0, "{reply:?}");
    assert_eq!(reply.fds, 0);
    // rust-vmm's frontend reads a 16-byte `VhostUserLog` after the header; the relay closed
    // the connection after our header, so it sees a partial message. Without the relay it
    // would wait for those bytes on a live connection.
    assert_eq!(std::mem::size_of::<VhostUserLog>(), 16);
    let err = result.expect_err("rust-vmm accepted a reply without its log description");
    assert!(
        err.to_string().contains("partial message"),
        "rust-vmm's error: {err}"
    );
    // The daemon took the log and still serves this connection.
    let probe = vu_proto::message::FrontendRequest::<std::os::fd::OwnedFd>::GetFeatures;
    let (header, body) = probe.encode(vu_proto::header::HeaderFlags::empty());
    to_daemon.send_message(&header, &body, &[]).unwrap();
    let features = to_daemon.recv_message().unwrap();
    assert!(features.header.is_reply());
    assert_eq!(features.header.request, FrontendReq::GetFeatures.into());
    daemon.stop().unwrap();
}
