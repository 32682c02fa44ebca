//! Wire compatibility of vu-proto with an implementation we did not write, rust-vmm
//! `vhost` 0.18, over real sockets:
//! - our `Frontend` against rust-vmm's back-end request handler;
//! - rust-vmm's `Frontend` against a back-end built on our codec (`CodecBackend`);
//! - our `BackendChannel` against rust-vmm's `FrontendReqHandler`, and rust-vmm's
//!   back-end channel sender against our `handle_backend_request`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserInflight, VhostUserLog, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as RvBackendSender, BackendReqHandler as RvBackendReqHandler, Error as RvError,
    Frontend as RvFrontend, FrontendReqHandler as RvFrontendReqHandler, GpuBackend, HandlerResult,
    VhostUserBackendReqHandlerMut, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserFrontendReqHandlerMut,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use vu_proto::backend::{BackendChannel, ChannelError};
use vu_proto::frontend::{
    handle_backend_request, BackendReqHandler, Frontend, FrontendError, Refusal,
};
use vu_proto::payload::{SharedObject, VringAddr, VringAddrFlags};
use vu_proto::socket::Endpoint;
use vu_proto::{BackendReq, FrontendReq, ProtocolFeatures, VirtioFeatures};
use vu_tests::proto_support::{
    endpoint_pair, eventfd, eventfd_count, eventfd_fd, eventfd_signal, memfd, region, CodecBackend,
    TEST_TIMEOUT,
};

/// The virtio features both test back-ends offer.
const FEATURES: u64 = (1 << 32) | (1 << 30);
/// The vring index whose enable request the rust-vmm test back-end refuses.
const REFUSED_VRING: u32 = 5;

/// What the rust-vmm-driven back-end saw.
#[derive(Default)]
struct RvState {
    owner: bool,
    features: u64,
    protocol: u64,
    /// Each region with the first byte read through its fd.
    regions: Vec<(VhostUserMemoryRegion, u8)>,
    vring_num: Option<(u32, u32)>,
    vring_addr: Option<(u32, u32, u64, u64, u64)>,
    vring_base: Option<(u32, u32)>,
    kick: Option<File>,
    /// The kick count read when `GET_VRING_BASE` arrived.
    kicks_at_get_base: Option<u64>,
}

/// A back-end for rust-vmm's request handler: records what arrives, signals the call
/// eventfd as soon as it gets it, and refuses `SET_VRING_ENABLE` of [`REFUSED_VRING`].
struct RvBackend(RvState);

fn unsupported<T>() -> vhost::vhost_user::Result<T> {
    Err(RvError::InvalidOperation("not used by the interop tests"))
}

impl VhostUserBackendReqHandlerMut for RvBackend {
    fn set_owner(&mut self) -> vhost::vhost_user::Result<()> {
        self.0.owner = true;
        Ok(())
    }
    fn reset_owner(&mut self) -> vhost::vhost_user::Result<()> {
        unsupported()
    }
    fn reset_device(&mut self) -> vhost::vhost_user::Result<()> {
        unsupported()
    }
    fn get_features(&mut self) -> vhost::vhost_user::Result<u64> {
        Ok(FEATURES)
    }
    fn set_features(&mut self, features: u64) -> vhost::vhost_user::Result<()> {
        self.0.features = features;
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> vhost::vhost_user::Result<Option<Vec<u64>>> {
        for (region, file) in ctx.iter().zip(files) {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, region.mmap_offset)
                .map_err(RvError::ReqHandlerError)?;
            self.0.regions.push((*region, byte[0]));
        }
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> vhost::vhost_user::Result<()> {
        self.0.vring_num = Some((index, num));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> vhost::vhost_user::Result<()> {
        self.0.vring_addr = Some((index, flags.bits(), descriptor, used, available));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> vhost::vhost_user::Result<()> {
        self.0.vring_base = Some((index, base));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> vhost::vhost_user::Result<VhostUserVringState> {
        self.0.kicks_at_get_base = self.0.kick.as_ref().and_then(eventfd_count);
        let base = self.0.vring_base.map_or(0, |(_, b)| b);
        Ok(VhostUserVringState::new(index, base + 3))
    }
    fn set_vring_kick(&mut self, _index: u8, fd: Option<File>) -> vhost::vhost_user::Result<()> {
        self.0.kick = fd;
        Ok(())
    }
    fn set_vring_call(&mut self, _index: u8, fd: Option<File>) -> vhost::vhost_user::Result<()> {
        if let Some(call) = &fd {
            eventfd_signal(call);
        }
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> vhost::vhost_user::Result<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> vhost::vhost_user::Result<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG)
    }
    fn set_protocol_features(&mut self, features: u64) -> vhost::vhost_user::Result<()> {
        self.0.protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> vhost::vhost_user::Result<u64> {
        Ok(2)
    }
    fn set_vring_enable(&mut self, index: u32, _enable: bool) -> vhost::vhost_user::Result<()> {
        if index == REFUSED_VRING {
            return Err(RvError::InvalidParam);
        }
        Ok(())
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> vhost::vhost_user::Result<Vec<u8>> {
        Ok((offset..offset + size).map(|b| b as u8).collect())
    }
    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> vhost::vhost_user::Result<()> {
        unsupported()
    }
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> vhost::vhost_user::Result<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> vhost::vhost_user::Result<File> {
        unsupported()
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> vhost::vhost_user::Result<(VhostUserInflight, File)> {
        unsupported()
    }
    fn set_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
        _file: File,
    ) -> vhost::vhost_user::Result<()> {
        unsupported()
    }
    fn get_max_mem_slots(&mut self) -> vhost::vhost_user::Result<u64> {
        unsupported()
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> vhost::vhost_user::Result<Option<u64>> {
        unsupported()
    }
    fn remove_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
    ) -> vhost::vhost_user::Result<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> vhost::vhost_user::Result<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> vhost::vhost_user::Result<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> vhost::vhost_user::Result<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> vhost::vhost_user::Result<()> {
        unsupported()
    }
}

/// Serves rust-vmm's back-end request handler on `stream` until the front-end hangs
/// up; handler refusals (`InvalidParam`) keep the loop going. Returns the error that
/// ended it.
fn serve_rust_vmm(stream: UnixStream, backend: Arc<Mutex<RvBackend>>) -> JoinHandle<RvError> {
    stream.set_read_timeout(Some(TEST_TIMEOUT)).unwrap();
    let mut handler = RvBackendReqHandler::from_stream(stream, backend);
    std::thread::spawn(move || loop {
        match handler.handle_request() {
            Ok(()) | Err(RvError::InvalidParam) => {}
            Err(e) => return e,
        }
    })
}

/// Our front-end connected to rust-vmm's back-end handler over a socket pair.
fn ours_against_rust_vmm() -> (Frontend, Arc<Mutex<RvBackend>>, JoinHandle<RvError>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let backend = Arc::new(Mutex::new(RvBackend(RvState::default())));
    let server = serve_rust_vmm(theirs, Arc::clone(&backend));
    let fe = Frontend::new(Endpoint::new(ours));
    fe.set_reply_timeout(Some(TEST_TIMEOUT)).unwrap();
    (fe, backend, server)
}

/// Runs the handshake on our front-end and acknowledges `REPLY_ACK`.
fn handshake(fe: &mut Frontend) {
    let features = fe.get_features().unwrap();
    assert_eq!(features.bits(), FEATURES);
    fe.set_owner().unwrap();
    fe.set_features(features).unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    assert!(protocol.contains(ProtocolFeatures::REPLY_ACK | ProtocolFeatures::MQ));
    fe.set_protocol_features(ProtocolFeatures::REPLY_ACK | ProtocolFeatures::MQ)
        .unwrap();
}

#[test]
fn our_frontend_completes_the_handshake_with_rust_vmm() {
    let (mut fe, backend, server) = ours_against_rust_vmm();
    handshake(&mut fe);
    // REPLY_ACK is now on both sides: this request waits for rust-vmm's ack.
    assert!(fe.reply_ack());
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    drop(fe);
    assert!(matches!(server.join().unwrap(), RvError::Disconnected));
    let state = &backend.lock().unwrap().0;
    assert!(state.owner);
    assert_eq!(state.features, FEATURES);
    assert_eq!(
        state.protocol,
        (ProtocolFeatures::REPLY_ACK | ProtocolFeatures::MQ).bits()
    );
}

#[test]
fn our_frontend_memory_table_is_readable_by_rust_vmm() {
    let (mut fe, backend, server) = ours_against_rust_vmm();
    handshake(&mut fe);
    let guest = memfd(0x10000);
    guest.write_all_at(&[0x5a], 0x2000).unwrap();
    let mut r = region(0x4000_0000, 0x8000, 0x7f00_0000_0000);
    r.mmap_offset = 0x2000;
    fe.set_mem_table(&[r], &[guest.as_fd()]).unwrap();
    drop(fe);
    assert!(matches!(server.join().unwrap(), RvError::Disconnected));
    let state = &backend.lock().unwrap().0;
    let [(got, byte)] = state.regions.as_slice() else {
        panic!("{} regions", state.regions.len())
    };
    assert_eq!(
        (
            got.guest_phys_addr,
            got.memory_size,
            got.user_addr,
            got.mmap_offset
        ),
        (0x4000_0000, 0x8000, 0x7f00_0000_0000, 0x2000)
    );
    assert_eq!(*byte, 0x5a);
}

#[test]
fn our_frontend_vring_setup_reaches_rust_vmm_with_working_eventfds() {
    let (mut fe, backend, server) = ours_against_rust_vmm();
    handshake(&mut fe);
    let kick = eventfd();
    let call = eventfd();
    fe.set_vring_num(0, 256).unwrap();
    fe.set_vring_addr(&VringAddr {
        index: 0,
        flags: VringAddrFlags::empty(),
        descriptor: 0x1000,
        used: 0x3000,
        available: 0x2000,
        log: 0,
    })
    .unwrap();
    fe.set_vring_base(0, 4).unwrap();
    fe.set_vring_kick(0, Some(eventfd_fd(&kick))).unwrap();
    // With REPLY_ACK the call request returns once rust-vmm's handler ran, and the
    // handler signals the call eventfd it received.
    fe.set_vring_call(0, Some(eventfd_fd(&call))).unwrap();
    assert_eq!(call.read().unwrap(), 1);
    kick.write(1).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 7);
    drop(fe);
    assert!(matches!(server.join().unwrap(), RvError::Disconnected));
    let state = &backend.lock().unwrap().0;
    assert_eq!(state.vring_num, Some((0, 256)));
    assert_eq!(state.vring_addr, Some((0, 0, 0x1000, 0x3000, 0x2000)));
    assert_eq!(state.vring_base, Some((0, 4)));
    assert_eq!(state.kicks_at_get_base, Some(1));
}

#[test]
fn rust_vmm_refusal_under_reply_ack_is_a_typed_error() {
    let (mut fe, _backend, server) = ours_against_rust_vmm();
    handshake(&mut fe);
    fe.set_vring_enable(0, true).unwrap();
    let err = fe.set_vring_enable(REFUSED_VRING, true).unwrap_err();
    assert!(matches!(
        err,
        FrontendError::Refused {
            request: FrontendReq::SetVringEnable,
            code: 1
        }
    ));
    // The session is still in step after the refusal.
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    drop(fe);
    assert!(matches!(server.join().unwrap(), RvError::Disconnected));
}

#[test]
fn our_frontend_reads_config_space_from_rust_vmm() {
    let (mut fe, _backend, server) = ours_against_rust_vmm();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    fe.set_protocol_features(ProtocolFeatures::CONFIG).unwrap();
    let data = fe
        .get_config(4, 4, vu_proto::payload::ConfigFlags::empty())
        .unwrap();
    assert_eq!(data, [4, 5, 6, 7]);
    drop(fe);
    assert!(matches!(server.join().unwrap(), RvError::Disconnected));
}

#[test]
fn rust_vmm_frontend_sets_up_our_codec_backend() {
    let (theirs, ours) = endpoint_pair();
    let backend = CodecBackend {
        features: VirtioFeatures::from_bits_retain(FEATURES),
        protocol: ProtocolFeatures::REPLY_ACK | ProtocolFeatures::MQ,
        vring_base: None,
    }
    .spawn(ours);
    let stream = theirs.into_inner();
    let mut fe = RvFrontend::from_stream(stream, 1);
    let features = fe.get_features().unwrap();
    assert_eq!(features, FEATURES);
    fe.set_owner().unwrap();
    fe.set_features(features).unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    assert_eq!(
        protocol,
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ
    );
    fe.set_protocol_features(protocol).unwrap();
    // From here on rust-vmm asks for, and waits for, an ack of every request.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);

    let guest = memfd(0x10000);
    guest.write_all_at(&[0xa5], 0x1000).unwrap();
    let info = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 0x8000,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0x1000,
        mmap_handle: guest.as_raw_fd(),
    };
    fe.set_mem_table(&[info]).unwrap();

    fe.set_vring_num(0, 128).unwrap();
    let config = VringConfigData {
        queue_max_size: 256,
        queue_size: 128,
        flags: 0,
        desc_table_addr: 0x1000,
        used_ring_addr: 0x3000,
        avail_ring_addr: 0x2000,
        log_addr: None,
    };
    fe.set_vring_addr(0, &config).unwrap();
    fe.set_vring_base(0, 9).unwrap();
    let kick = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    // The codec back-end signals each call eventfd it receives.
    assert_eq!(call.read().unwrap(), 1);
    kick.write(1).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 9);
    drop(fe);

    let seen = backend.join().unwrap();
    assert_eq!(seen.error, None);
    assert!(seen.owner);
    assert_eq!(seen.features.map(|f| f.bits()), Some(FEATURES));
    assert_eq!(
        seen.protocol,
        Some(ProtocolFeatures::REPLY_ACK | ProtocolFeatures::MQ)
    );
    let [(r, byte)] = seen.regions.as_slice() else {
        panic!("{} regions", seen.regions.len())
    };
    assert_eq!(
        (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset),
        (0, 0x8000, 0x7f00_0000_0000, 0x1000)
    );
    assert_eq!(*byte, 0xa5);
    let num = seen.vring_num.unwrap();
    assert_eq!((num.index, num.num), (0, 128));
    let addr = seen.vring_addr.unwrap();
    assert_eq!(
        (addr.index, addr.descriptor, addr.used, addr.available),
        (0, 0x1000, 0x3000, 0x2000)
    );
    let base = seen.vring_base.unwrap();
    assert_eq!((base.index, base.num), (0, 9));
    let [(0, Some(kick_fd))] = seen.kicks.as_slice() else {
        panic!("kicks: {:?}", seen.kicks)
    };
    assert_eq!(eventfd_count(kick_fd), Some(1));
    assert_eq!(seen.calls.len(), 1);
    // Every request after NEED_REPLY was switched on and without a reply of its own:
    // mem table, vring num, addr, base, kick, call.
    assert_eq!(seen.acks, 6);
}

/// What rust-vmm's front-end side saw on the back-end channel.
#[derive(Default)]
struct RvFrontendState {
    config_changes: usize,
    shared_added: Vec<[u8; 16]>,
}

impl VhostUserFrontendReqHandlerMut for RvFrontendState {
    fn handle_config_change(&mut self) -> HandlerResult<u64> {
        self.config_changes += 1;
        Ok(0)
    }
    fn shared_object_add(&mut self, uuid: &VhostUserSharedMsg) -> HandlerResult<u64> {
        self.shared_added.push(*uuid.uuid.as_bytes());
        Ok(0)
    }
}

#[test]
#[allow(unsafe_code)] // rust-vmm's handler lends its channel end only as a raw fd.
fn our_backend_channel_is_served_by_rust_vmm() {
    let state = Arc::new(Mutex::new(RvFrontendState::default()));
    let mut handler = RvFrontendReqHandler::new(Arc::clone(&state)).unwrap();
    handler.set_reply_ack_flag(true);
    // SAFETY: the handler owns its end of the channel and outlives this borrow, which
    // is only used to duplicate the fd.
    let tx = unsafe { BorrowedFd::borrow_raw(handler.get_tx_raw_fd()) };
    let fd: OwnedFd = tx.try_clone_to_owned().unwrap();
    let channel = BackendChannel::from_fd(
        fd,
        ProtocolFeatures::REPLY_ACK | ProtocolFeatures::CONFIG | ProtocolFeatures::SHARED_OBJECT,
    )
    .unwrap();
    channel.set_reply_timeout(Some(TEST_TIMEOUT)).unwrap();
    let sender = std::thread::spawn(move || {
        channel.config_change_msg().unwrap();
        channel
            .shared_object_add(&SharedObject { uuid: [0x42; 16] })
            .unwrap();
        // rust-vmm refuses with the negated errno (ENOSYS) of its default method.
        channel.shared_object_remove(&SharedObject { uuid: [0x42; 16] })
    });
    assert_eq!(handler.handle_request().unwrap(), 0);
    assert_eq!(handler.handle_request().unwrap(), 0);
    assert!(handler.handle_request().is_err());
    let refused = sender.join().unwrap();
    assert!(matches!(
        refused,
        Err(ChannelError::Refused {
            request: BackendReq::SharedObjectRemove,
            status
        }) if status == (-(libc::ENOSYS as i64)) as u64
    ));
    let state = state.lock().unwrap();
    assert_eq!(state.config_changes, 1);
    assert_eq!(state.shared_added, [[0x42; 16]]);
}

/// What our front-end side saw on the back-end channel.
#[derive(Default)]
struct OurFrontendState {
    shared_added: Vec<[u8; 16]>,
}

impl BackendReqHandler for OurFrontendState {
    fn shared_object_add(&mut self, uuid: SharedObject) -> Result<(), Refusal> {
        self.shared_added.push(uuid.uuid);
        Ok(())
    }
}

#[test]
fn rust_vmm_backend_channel_is_served_by_ours() {
    let (ours, theirs) = endpoint_pair();
    let sender = RvBackendSender::from_stream(theirs.into_inner());
    sender.set_reply_ack_flag(true);
    sender.set_shared_object_flag(true);
    let uuid_bytes = [0x17u8; 16];
    let msg = *VhostUserSharedMsg::from_slice(&uuid_bytes).unwrap();
    let thread = std::thread::spawn(move || {
        let added = sender.shared_object_add(&msg).map_err(|e| e.to_string());
        let removed = sender.shared_object_remove(&msg).map_err(|e| e.to_string());
        (added, removed)
    });
    let mut state = OurFrontendState::default();
    let first = handle_backend_request(&ours, &mut state).unwrap();
    assert_eq!(first.request, BackendReq::SharedObjectAdd.code());
    assert!(first.replied);
    let second = handle_backend_request(&ours, &mut state).unwrap();
    assert_eq!(second.outcome, Err(Refusal::UNSUPPORTED));
    let (added, removed) = thread.join().unwrap();
    assert_eq!(added, Ok(0));
    assert!(removed.is_err(), "our refusal reaches rust-vmm as an error");
    assert_eq!(state.shared_added, [uuid_bytes]);
}

/// Our feature bit numbering agrees with rust-vmm's for bits 0 to 19 and bit 21; bit 20 is
/// QEMU's SHMEM where rust-vmm has GET_VRING_BASE_INFLIGHT, and rust-vmm's SHMEM (22) is a
/// bit we do not name (docs/conformance.md, "What a rust-vmm-numbered peer sees").
#[test]
fn protocol_features_bit_agrees_with_rust_vmm() {
    assert_eq!(
        VirtioFeatures::PROTOCOL_FEATURES.bits(),
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    );
    for bit in (0..20).chain([21]) {
        let ours = ProtocolFeatures::from_bits_retain(1 << bit);
        let theirs = VhostUserProtocolFeatures::from_bits(1 << bit);
        assert_eq!(theirs.map(|t| t.bits()), Some(ours.bits()), "bit {bit}");
    }
    assert_eq!(
        VhostUserProtocolFeatures::from_bits(ProtocolFeatures::SHMEM.bits()),
        Some(VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT)
    );
    assert_eq!(
        ProtocolFeatures::from_bits(VhostUserProtocolFeatures::SHMEM.bits()),
        None
    );
}
