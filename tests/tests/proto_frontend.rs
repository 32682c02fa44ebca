//! vu-proto's `Frontend` against scripted back-ends built on vu-proto's own codec, over
//! a socket pair: the bytes each method sends, reply parsing, REPLY_ACK, typed errors
//! for wrong replies, and fd passing.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::thread::JoinHandle;

use vu_proto::frontend::{Frontend, FrontendError};
use vu_proto::message::{encode_reply, FrontendRequest, RawMessage};
use vu_proto::payload::{
    ConfigFlags, ConfigReply, DeviceConfig, DeviceStateFdReply, DeviceStateTransfer, Inflight,
    Iotlb, IotlbPerm, IotlbType, Log, MacAddr, SharedObject, TransferDirection, TransferPhase,
    VringAddr, VringAddrFlags, VringState, U64,
};
use vu_proto::socket::Endpoint;
use vu_proto::{FrontendReq, Header, HeaderFlags, Payload, ProtocolFeatures, VirtioFeatures};
use vu_tests::proto_support::{
    endpoint_pair, eventfd, eventfd_count, eventfd_fd, eventfd_signal, memfd, region, CodecBackend,
};

/// A front-end connected to a back-end thread running `script` on the other end.
fn with_backend<T: Send + 'static>(
    script: impl FnOnce(Endpoint) -> T + Send + 'static,
) -> (Frontend, JoinHandle<T>) {
    let (fe, be) = endpoint_pair();
    (Frontend::new(fe), std::thread::spawn(move || script(be)))
}

/// Replies to `request` with `payload` and `fds`.
fn reply<T: Payload>(be: &Endpoint, request: &Header, payload: &T, fds: &[BorrowedFd<'_>]) {
    let (h, b) = encode_reply(request, payload);
    be.send_message(&h, &b, fds).unwrap();
}

/// Receives one request, returning its header, decoded form and fd count.
fn recv(be: &Endpoint) -> (Header, FrontendRequest) {
    let raw = be.recv_message().unwrap();
    let header = raw.header;
    (header, FrontendRequest::decode(raw).unwrap())
}

/// Sends a REPLY_ACK status for `request`.
fn ack(be: &Endpoint, request: &Header, status: u64) {
    reply(be, request, &U64(status), &[]);
}

/// A front-end that has negotiated REPLY_ACK with `be` (the back-end side consumes
/// the SET_PROTOCOL_FEATURES, which is not itself acknowledged).
fn negotiated_reply_ack() -> (Frontend, Endpoint) {
    let (fe, be) = endpoint_pair();
    let mut fe = Frontend::new(fe);
    fe.set_protocol_features(ProtocolFeatures::REPLY_ACK)
        .unwrap();
    let (header, req) = recv(&be);
    assert!(!header.needs_reply());
    assert!(
        matches!(req, FrontendRequest::SetProtocolFeatures(p) if p == ProtocolFeatures::REPLY_ACK)
    );
    assert!(fe.reply_ack());
    (fe, be)
}

#[test]
fn handshake_sends_each_request_and_parses_the_feature_replies() {
    let offered = VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES;
    let (mut fe, backend) = with_backend(move |be| {
        let mut got = Vec::new();
        for _ in 0..5 {
            let (header, req) = recv(&be);
            assert!(!header.is_reply());
            match &req {
                FrontendRequest::GetFeatures => reply(&be, &header, &offered, &[]),
                FrontendRequest::GetProtocolFeatures => {
                    reply(&be, &header, &ProtocolFeatures::MQ, &[])
                }
                _ => {}
            }
            got.push(req);
        }
        got
    });
    assert_eq!(fe.get_features().unwrap(), offered);
    fe.set_owner().unwrap();
    fe.set_features(offered).unwrap();
    assert_eq!(fe.get_protocol_features().unwrap(), ProtocolFeatures::MQ);
    fe.set_protocol_features(ProtocolFeatures::MQ).unwrap();
    let got = backend.join().unwrap();
    assert!(matches!(got[0], FrontendRequest::GetFeatures));
    assert!(matches!(got[1], FrontendRequest::SetOwner));
    assert!(matches!(got[2], FrontendRequest::SetFeatures(f) if f == offered));
    assert!(matches!(got[3], FrontendRequest::GetProtocolFeatures));
    assert!(matches!(got[4], FrontendRequest::SetProtocolFeatures(p) if p == ProtocolFeatures::MQ));
    assert!(!fe.reply_ack());
}

#[test]
fn every_command_sends_the_bytes_of_its_request() {
    let (fe_end, be) = endpoint_pair();
    let mut fe = Frontend::new(fe_end);
    let null = std::fs::File::open("/dev/null").unwrap();
    let fd = null.as_fd();
    let addr = VringAddr {
        index: 1,
        flags: VringAddrFlags::LOG,
        descriptor: 0x1000,
        used: 0x2000,
        available: 0x3000,
        log: 0x4000,
    };
    let iotlb = Iotlb {
        iova: 0x1000,
        size: 0x1000,
        uaddr: 0x7000_0000,
        perm: IotlbPerm::ReadWrite,
        kind: IotlbType::Update,
    };
    let inflight = Inflight {
        mmap_size: 0x1000,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 256,
    };
    let r = region(0x10_0000, 0x1000, 0x7f00_0000);
    type R<'a> = FrontendRequest<BorrowedFd<'a>>;
    let expected: Vec<R<'_>> = vec![
        R::SetFeatures(VirtioFeatures::VERSION_1),
        R::SetOwner,
        R::ResetOwner,
        R::SetMemTable {
            table: vu_proto::payload::MemoryTable { regions: vec![r] },
            fds: vec![fd],
        },
        R::SetLogFd { fd },
        R::SetVringNum(VringState { index: 1, num: 256 }),
        R::SetVringAddr(addr),
        R::SetVringBase(VringState { index: 1, num: 7 }),
        R::SetVringKick {
            index: 1,
            fd: Some(fd),
        },
        R::SetVringCall { index: 1, fd: None },
        R::SetVringErr {
            index: 2,
            fd: Some(fd),
        },
        R::SetProtocolFeatures(ProtocolFeatures::MQ),
        R::SetVringEnable(vu_proto::payload::VringEnable {
            index: 1,
            enable: true,
        }),
        R::SendRarp(MacAddr([0x52, 0x54, 0, 0, 0, 1])),
        R::NetSetMtu(U64(1500)),
        R::SetBackendReqFd { fd },
        R::IotlbMsg(iotlb),
        R::SetVringEndian(vu_proto::payload::VringEndian {
            index: 0,
            big_endian: true,
        }),
        R::SetConfig(DeviceConfig {
            offset: 4,
            flags: ConfigFlags::empty(),
            data: vec![1, 2, 3],
        }),
        R::CloseCryptoSession(U64(9)),
        R::PostcopyListen,
        R::SetInflightFd { inflight, fd },
        R::GpuSetSocket { fd },
        R::ResetDevice,
        R::VringKick(VringState { index: 3, num: 0 }),
        R::AddMemReg { region: r, fd },
        R::RemMemReg(r),
        R::SetStatus(U64(0xf)),
    ];
    fe.set_features(VirtioFeatures::VERSION_1).unwrap();
    fe.set_owner().unwrap();
    fe.reset_owner().unwrap();
    fe.set_mem_table(&[r], &[fd]).unwrap();
    fe.set_log_fd(fd).unwrap();
    fe.set_vring_num(1, 256).unwrap();
    fe.set_vring_addr(&addr).unwrap();
    fe.set_vring_base(1, 7).unwrap();
    fe.set_vring_kick(1, Some(fd)).unwrap();
    fe.set_vring_call(1, None).unwrap();
    fe.set_vring_err(2, Some(fd)).unwrap();
    fe.set_protocol_features(ProtocolFeatures::MQ).unwrap();
    fe.set_vring_enable(1, true).unwrap();
    fe.send_rarp(MacAddr([0x52, 0x54, 0, 0, 0, 1])).unwrap();
    fe.net_set_mtu(1500).unwrap();
    fe.set_backend_req_fd(fd).unwrap();
    fe.iotlb_msg(&iotlb).unwrap();
    fe.set_vring_endian(0, true).unwrap();
    fe.set_config(4, ConfigFlags::empty(), &[1, 2, 3]).unwrap();
    fe.close_crypto_session(9).unwrap();
    fe.postcopy_listen().unwrap();
    // postcopy_listen switched memory requests to their postcopy form; the plain
    // ones are refused before sending.
    assert!(matches!(
        fe.add_mem_reg(&r, fd),
        Err(FrontendError::InvalidArgument { .. })
    ));
    fe.set_inflight_fd(&inflight, fd).unwrap();
    fe.gpu_set_socket(fd).unwrap();
    fe.reset_device().unwrap();
    fe.vring_kick(3).unwrap();
    let mut fe2 = Frontend::new(fe.into_endpoint());
    fe2.add_mem_reg(&r, fd).unwrap();
    fe2.rem_mem_reg(&r).unwrap();
    fe2.set_status(0xf).unwrap();
    for want in &expected {
        let raw: RawMessage = be.recv_message().unwrap();
        let (header, body) = want.encode(HeaderFlags::empty());
        assert_eq!(raw.header, header, "{}", want.code());
        assert_eq!(raw.body, body, "{}", want.code());
        assert_eq!(raw.fds.len(), want.fds().len(), "{}", want.code());
        FrontendRequest::decode(raw).unwrap();
    }
}

#[test]
fn set_mem_table_passes_one_memfd_per_region() {
    let first = memfd(0x1000);
    let second = memfd(0x2000);
    first.write_all_at(&[0xaa], 0).unwrap();
    second.write_all_at(&[0xbb], 0x100).unwrap();
    let (mut fe, backend) = with_backend(|be| {
        let (_, req) = recv(&be);
        let FrontendRequest::SetMemTable { table, fds } = req else {
            panic!("{req:?}")
        };
        table
            .regions
            .iter()
            .zip(fds)
            .map(|(r, fd)| {
                let mut b = [0u8];
                std::fs::File::from(fd)
                    .read_exact_at(&mut b, r.mmap_offset)
                    .unwrap();
                b[0]
            })
            .collect::<Vec<u8>>()
    });
    let mut second_region = region(0x10_0000, 0x1000, 0x7f00_1000);
    second_region.mmap_offset = 0x100;
    fe.set_mem_table(
        &[region(0, 0x1000, 0x7f00_0000), second_region],
        &[first.as_fd(), second.as_fd()],
    )
    .unwrap();
    assert_eq!(backend.join().unwrap(), [0xaa, 0xbb]);
}

#[test]
fn kick_and_call_eventfds_reach_the_backend() {
    let kick = eventfd();
    let call = eventfd();
    let (mut fe, backend) = with_backend(|be| {
        let (_, kick) = recv(&be);
        let (_, call) = recv(&be);
        let (
            FrontendRequest::SetVringKick {
                index: 0,
                fd: Some(kick),
            },
            FrontendRequest::SetVringCall {
                index: 0,
                fd: Some(call),
            },
        ) = (kick, call)
        else {
            panic!("wrong requests")
        };
        eventfd_signal(&call);
        // Wait for the front-end's kick request to know it kicked.
        let (header, _) = recv(&be);
        reply(&be, &header, &U64(1), &[]);
        eventfd_count(&kick)
    });
    fe.set_vring_kick(0, Some(eventfd_fd(&kick))).unwrap();
    fe.set_vring_call(0, Some(eventfd_fd(&call))).unwrap();
    kick.write(1).unwrap();
    // Any request with a reply serves as a barrier: the back-end reads the kick
    // counter only after answering it.
    assert_eq!(fe.get_queue_num().unwrap(), 1);
    assert_eq!(backend.join().unwrap(), Some(1));
    assert_eq!(call.read().unwrap(), 1);
}

#[test]
fn vring_fd_none_sets_the_invalid_fd_bit_and_sends_no_fd() {
    let (mut fe, backend) = with_backend(|be| be.recv_message().unwrap());
    fe.set_vring_call(5, None).unwrap();
    let raw = backend.join().unwrap();
    assert!(raw.fds.is_empty());
    assert_eq!(raw.body, (0x100u64 | 5).to_ne_bytes());
}

#[test]
fn with_reply_ack_a_command_waits_for_a_zero_status() {
    let (mut fe, be) = negotiated_reply_ack();
    let backend = std::thread::spawn(move || {
        let (header, req) = recv(&be);
        assert!(header.needs_reply());
        assert!(matches!(
            req,
            FrontendRequest::SetVringNum(VringState { index: 0, num: 64 })
        ));
        ack(&be, &header, 0);
    });
    fe.set_vring_num(0, 64).unwrap();
    backend.join().unwrap();
}

#[test]
fn with_reply_ack_a_non_zero_status_is_refused() {
    let (mut fe, be) = negotiated_reply_ack();
    let backend = std::thread::spawn(move || {
        let (header, _) = recv(&be);
        ack(&be, &header, 22);
    });
    let err = fe.set_owner().unwrap_err();
    assert!(matches!(
        err,
        FrontendError::Refused {
            request: FrontendReq::SetOwner,
            code: 22
        }
    ));
    backend.join().unwrap();
}

#[test]
fn with_reply_ack_requests_with_their_own_reply_do_not_set_need_reply() {
    let (mut fe, be) = negotiated_reply_ack();
    let backend = std::thread::spawn(move || {
        let (header, _) = recv(&be);
        assert!(!header.needs_reply());
        reply(&be, &header, &VirtioFeatures::VERSION_1, &[]);
    });
    assert_eq!(fe.get_features().unwrap(), VirtioFeatures::VERSION_1);
    backend.join().unwrap();
}

#[test]
fn reply_to_another_request_is_an_unexpected_reply() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, _) = recv(&be);
        let mut wrong = header;
        wrong.request = FrontendReq::GetProtocolFeatures.code();
        reply(&be, &wrong, &U64(1), &[]);
    });
    let err = fe.get_features().unwrap_err();
    match err {
        FrontendError::UnexpectedReply { request, header } => {
            assert_eq!(request, FrontendReq::GetFeatures);
            assert_eq!(header.request, FrontendReq::GetProtocolFeatures.code());
        }
        other => panic!("{other:?}"),
    }
    backend.join().unwrap();
}

#[test]
fn reply_without_the_reply_flag_is_an_unexpected_reply() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, _) = recv(&be);
        let h = Header::new(header.request, HeaderFlags::empty(), 8);
        be.send_message(&h, &1u64.to_ne_bytes(), &[]).unwrap();
    });
    assert!(matches!(
        fe.get_max_mem_slots(),
        Err(FrontendError::UnexpectedReply {
            request: FrontendReq::GetMaxMemSlots,
            ..
        })
    ));
    backend.join().unwrap();
}

#[test]
fn short_reply_payload_is_a_wire_error() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, _) = recv(&be);
        let h = header.reply(4);
        be.send_message(&h, &[0; 4], &[]).unwrap();
    });
    assert!(matches!(
        fe.get_features(),
        Err(FrontendError::Wire {
            request: FrontendReq::GetFeatures,
            source: vu_proto::WireError::WrongSize { actual: 4, .. }
        })
    ));
    backend.join().unwrap();
}

#[test]
fn reply_with_an_unexpected_fd_is_a_wire_error() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, _) = recv(&be);
        let null = std::fs::File::open("/dev/null").unwrap();
        reply(&be, &header, &U64(2), &[null.as_fd()]);
    });
    assert!(matches!(
        fe.get_queue_num(),
        Err(FrontendError::Wire {
            source: vu_proto::WireError::WrongFdCount { actual: 1, .. },
            ..
        })
    ));
    backend.join().unwrap();
}

#[test]
fn get_vring_base_returns_the_base_of_the_asked_vring() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, req) = recv(&be);
        let FrontendRequest::GetVringBase(state) = req else {
            panic!("{req:?}")
        };
        reply(
            &be,
            &header,
            &VringState {
                index: state.index,
                num: 42,
            },
            &[],
        );
        let (header, _) = recv(&be);
        reply(&be, &header, &VringState { index: 9, num: 42 }, &[]);
    });
    assert_eq!(fe.get_vring_base(2).unwrap(), 42);
    assert!(matches!(
        fe.get_vring_base(2),
        Err(FrontendError::ReplyMismatch { .. })
    ));
    backend.join().unwrap();
}

#[test]
fn get_config_returns_the_bytes_and_an_empty_reply_is_unavailable() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, req) = recv(&be);
        let FrontendRequest::GetConfig(mut config) = req else {
            panic!("{req:?}")
        };
        config.data = vec![0xc0, 0xff, 0xee, 0x00];
        reply(&be, &header, &ConfigReply::Config(config), &[]);
        let (header, _) = recv(&be);
        reply(&be, &header, &ConfigReply::Failed, &[]);
    });
    assert_eq!(
        fe.get_config(8, 4, ConfigFlags::empty()).unwrap(),
        [0xc0, 0xff, 0xee, 0x00]
    );
    assert!(matches!(
        fe.get_config(8, 4, ConfigFlags::empty()),
        Err(FrontendError::ConfigUnavailable)
    ));
    backend.join().unwrap();
}

#[test]
fn get_inflight_fd_returns_the_description_and_the_fd() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, req) = recv(&be);
        let FrontendRequest::GetInflightFd(mut inflight) = req else {
            panic!("{req:?}")
        };
        inflight.mmap_size = 0x2000;
        let buffer = memfd(0x2000);
        reply(&be, &header, &inflight, &[buffer.as_fd()]);
    });
    let asked = Inflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: 128,
    };
    let (inflight, fd) = fe.get_inflight_fd(&asked).unwrap();
    assert_eq!(inflight.mmap_size, 0x2000);
    assert_eq!(std::fs::File::from(fd).metadata().unwrap().len(), 0x2000);
    backend.join().unwrap();
}

#[test]
fn set_device_state_fd_without_a_returned_fd_is_none() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, req) = recv(&be);
        assert!(matches!(req, FrontendRequest::SetDeviceStateFd { .. }));
        let payload = DeviceStateFdReply {
            error: 0,
            no_fd: true,
        };
        reply(&be, &header, &payload, &[]);
    });
    let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
    let transfer = DeviceStateTransfer {
        direction: TransferDirection::Save,
        phase: TransferPhase::Stopped,
    };
    assert!(fe
        .set_device_state_fd(transfer, pipe_r.as_fd())
        .unwrap()
        .is_none());
    backend.join().unwrap();
}

#[test]
fn get_shared_object_returns_the_fd_and_a_status_refuses() {
    let (mut fe, backend) = with_backend(|be| {
        let (header, _) = recv(&be);
        let object = memfd(16);
        reply(&be, &header, &U64(0), &[object.as_fd()]);
        let (header, _) = recv(&be);
        reply(&be, &header, &U64(3), &[]);
    });
    let uuid = SharedObject { uuid: [5; 16] };
    let fd: OwnedFd = fe.get_shared_object(&uuid).unwrap();
    assert_eq!(std::fs::File::from(fd).metadata().unwrap().len(), 16);
    assert!(matches!(
        fe.get_shared_object(&uuid),
        Err(FrontendError::Refused { code: 3, .. })
    ));
    backend.join().unwrap();
}

#[test]
fn set_log_base_waits_for_the_reply() {
    let log = memfd(0x1000);
    let (mut fe, backend) = with_backend(|be| {
        let (header, req) = recv(&be);
        let FrontendRequest::SetLogBase { log, fd: _ } = req else {
            panic!("{req:?}")
        };
        reply(&be, &header, &log, &[]);
    });
    let desc = Log {
        mmap_size: 0x1000,
        mmap_offset: 0,
    };
    fe.set_log_base(desc, log.as_fd()).unwrap();
    backend.join().unwrap();
}

#[test]
fn backend_hanging_up_is_a_socket_error() {
    let (mut fe, backend) = with_backend(drop);
    backend.join().unwrap();
    // Depending on timing the send fails (EPIPE) or the reply read finds the end of
    // the stream; either is a socket error naming the request.
    assert!(matches!(
        fe.get_status(),
        Err(FrontendError::Socket {
            request: FrontendReq::GetStatus,
            ..
        })
    ));
}

#[test]
fn frontend_sets_up_a_codec_backend() {
    let (fe_end, be_end) = endpoint_pair();
    let backend = CodecBackend {
        features: VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES,
        protocol: ProtocolFeatures::REPLY_ACK | ProtocolFeatures::MQ,
        vring_base: Some(17),
    }
    .spawn(be_end);
    let mut fe = Frontend::new(fe_end);
    let features = fe.get_features().unwrap();
    fe.set_owner().unwrap();
    fe.set_features(features).unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(protocol).unwrap();
    fe.set_vring_num(0, 256).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 17);
    drop(fe);
    let seen = backend.join().unwrap();
    assert_eq!(seen.error, None);
    assert!(seen.owner);
    assert_eq!(seen.acks, 1, "only SET_VRING_NUM came after REPLY_ACK");
}

#[test]
fn postcopy_mem_table_returns_the_backend_bases_and_acks_them() {
    let guest = memfd(0x1000);
    let (mut fe, backend) = with_backend(|be| {
        let (header, req) = recv(&be);
        assert!(matches!(req, FrontendRequest::PostcopyAdvise));
        let uffd_stand_in = memfd(0);
        reply(&be, &header, &U64(0), &[uffd_stand_in.as_fd()]);
        let (_, req) = recv(&be);
        assert!(matches!(req, FrontendRequest::PostcopyListen));
        let (header, req) = recv(&be);
        let FrontendRequest::SetMemTable { mut table, fds: _ } = req else {
            panic!("{req:?}")
        };
        table.regions[0].user_addr = 0x5555_0000_0000;
        reply(&be, &header, &table, &[]);
        // The front-end's acknowledgement: same request, a u64 zero, not a reply.
        let ack = be.recv_message().unwrap();
        assert_eq!(ack.header.request, FrontendReq::SetMemTable.code());
        assert!(!ack.header.is_reply());
        assert_eq!(ack.body, 0u64.to_ne_bytes());
        let (header, req) = recv(&be);
        assert!(matches!(req, FrontendRequest::PostcopyEnd));
        reply(&be, &header, &U64(0), &[]);
    });
    let _uffd = fe.postcopy_advise().unwrap();
    fe.postcopy_listen().unwrap();
    let r = region(0, 0x1000, 0x7f00_0000_0000);
    assert!(matches!(
        fe.set_mem_table(&[r], &[guest.as_fd()]),
        Err(FrontendError::InvalidArgument { .. })
    ));
    let table = fe.set_mem_table_postcopy(&[r], &[guest.as_fd()]).unwrap();
    assert_eq!(table.regions[0].user_addr, 0x5555_0000_0000);
    fe.postcopy_end().unwrap();
    backend.join().unwrap();
}
