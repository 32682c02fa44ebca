//! Session scenarios: scripted messages with real memfd and eventfd fds, a recording
//! [`RingControl`] and a small recording backend; no sockets, no threads.

#![allow(clippy::unwrap_used)]
// With `xen`, the tests that map memfd-backed guest memory are left out (regions are then
// Xen foreign or grant mappings, which need a Xen host); their helpers go unused.
#![cfg_attr(feature = "xen", allow(dead_code, unused_imports))]

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vu_mem::LogBitmap;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::header::{Header, HeaderFlags};
use vu_proto::message::{FrontendRequest, RawMessage};
use vu_proto::payload::{
    ConfigFlags, DeviceConfig, DeviceStateTransfer, Inflight, Iotlb, IotlbPerm, IotlbType, Log,
    MacAddr, MemoryRegion, MemoryTable, Payload, SharedObject, ShmemConfig, TransferDirection,
    TransferPhase, VringAddr, VringAddrFlags, VringEnable, VringEndian, VringState,
    MAX_SHMEM_REGIONS, U64,
};
use vu_proto::request::{FrontendReq, RequestCode};
use vu_vring::{RingState, VringMutex, VringT};

use super::memory::inflight_size;
use super::{new_eventfd, Outcome, Session};
use crate::backend::{BackendChannel, DisabledRing, VhostUserBackend, VhostUserBackendMut};
use crate::control::RingControl;

#[cfg(not(feature = "xen"))]
mod iommu;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<LogBitmap>>;
type Ring = VringMutex<Mem>;

const NUM_QUEUES: usize = 2;
const MAX_QUEUE_SIZE: usize = 256;
/// The test guest: 1 MiB at guest address 0, mapped at this address in the "frontend".
const MEM_SIZE: u64 = 0x10_0000;
const VMM_BASE: u64 = 0x7f00_0000_0000;
/// Ring parts inside the guest (guest addresses).
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// What the backend and the ring control saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Watch(u16),
    Unwatch(u16),
    Quiesce(u16),
    StopVring(u16),
    Dispatch(u16),
}

#[derive(Default)]
struct Record {
    events: Vec<Event>,
    acked: Option<u64>,
    event_idx: Option<bool>,
    resets: usize,
    memory_updates: usize,
    memory: Option<Mem>,
    channel: Option<BackendChannel>,
    config: Vec<u8>,
    config_flags: Vec<ConfigFlags>,
    statuses: Vec<u8>,
    polled: Vec<(u16, bool)>,
    gpu_socket: Option<OwnedFd>,
    rarps: Vec<[u8; 6]>,
    mtus: Vec<u16>,
    disabled_ring: Option<DisabledRing>,
    state_fd: Option<File>,
    fail: bool,
}

type Shared = Arc<Mutex<Record>>;

fn lock(rec: &Shared) -> MutexGuard<'_, Record> {
    rec.lock().unwrap()
}

fn failure() -> io::Error {
    io::Error::other("the test backend was told to fail")
}

/// A backend with interior mutability that records every call.
struct TestBackend {
    features: u64,
    protocol: ProtocolFeatures,
    rec: Shared,
}

impl VhostUserBackend for TestBackend {
    type Bitmap = LogBitmap;
    type Vring = Ring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }
    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn acked_features(&self, features: u64) {
        lock(&self.rec).acked = Some(features);
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        self.protocol
    }
    fn reset_device(&self) {
        lock(&self.rec).resets += 1;
    }
    fn set_event_idx(&self, enabled: bool) {
        lock(&self.rec).event_idx = Some(enabled);
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let rec = lock(&self.rec);
        let start = offset as usize;
        rec.config
            .get(start..start + size as usize)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
    fn set_config_with_flags(&self, offset: u32, buf: &[u8], flags: ConfigFlags) -> io::Result<()> {
        let mut rec = lock(&self.rec);
        rec.config_flags.push(flags);
        let start = offset as usize;
        let end = start + buf.len();
        if rec.config.len() < end {
            rec.config.resize(end, 0);
        }
        rec.config[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        let mut rec = lock(&self.rec);
        rec.memory_updates += 1;
        rec.memory = Some(mem);
        Ok(())
    }
    fn set_backend_req_fd(&self, channel: BackendChannel) {
        lock(&self.rec).channel = Some(channel);
    }
    fn get_shared_object(&self, _uuid: SharedObject) -> io::Result<File> {
        if lock(&self.rec).fail {
            return Err(failure());
        }
        File::open("/dev/null")
    }
    fn stop_vring(&self, queue: u16) -> io::Result<()> {
        lock(&self.rec).events.push(Event::StopVring(queue));
        Ok(())
    }
    fn set_status(&self, status: u8) -> io::Result<()> {
        let mut rec = lock(&self.rec);
        if rec.fail {
            return Err(failure());
        }
        rec.statuses.push(status);
        Ok(())
    }
    fn set_vring_polled(&self, queue: u16, polled: bool) -> io::Result<()> {
        let mut rec = lock(&self.rec);
        if rec.fail {
            return Err(failure());
        }
        rec.polled.push((queue, polled));
        Ok(())
    }
    fn set_gpu_socket(&self, socket: OwnedFd) -> io::Result<()> {
        let mut rec = lock(&self.rec);
        if rec.fail {
            return Err(failure());
        }
        rec.gpu_socket = Some(socket);
        Ok(())
    }
    fn send_rarp(&self, mac: [u8; 6]) -> io::Result<()> {
        let mut rec = lock(&self.rec);
        if rec.fail {
            return Err(failure());
        }
        rec.rarps.push(mac);
        Ok(())
    }
    fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let mut rec = lock(&self.rec);
        if rec.fail {
            return Err(failure());
        }
        rec.mtus.push(mtu);
        Ok(())
    }
    fn disabled_ring(&self, _queue: u16) -> DisabledRing {
        lock(&self.rec).disabled_ring.unwrap_or(DisabledRing::Hold)
    }
    fn handle_event(&self, _: u16, _: EventSet, _: &[Ring], _: usize) -> io::Result<()> {
        Ok(())
    }
    fn set_device_state_fd(
        &self,
        _direction: TransferDirection,
        _phase: TransferPhase,
        file: File,
    ) -> io::Result<Option<File>> {
        let mut rec = lock(&self.rec);
        if rec.fail {
            return Err(failure());
        }
        rec.state_fd = Some(file);
        Ok(None)
    }
    fn check_device_state(&self) -> io::Result<()> {
        if lock(&self.rec).fail {
            return Err(failure());
        }
        Ok(())
    }
    fn get_shmem_config(&self) -> io::Result<ShmemConfig> {
        let mut memory_sizes = Box::new([0; MAX_SHMEM_REGIONS]);
        memory_sizes[0] = 0x1000;
        Ok(ShmemConfig {
            nregions: 1,
            memory_sizes,
        })
    }
}

/// Records the runtime calls into the same log as the backend.
struct Recorder(Shared);

impl RingControl for Recorder {
    fn watch_kick(&mut self, queue: u16) -> io::Result<()> {
        lock(&self.0).events.push(Event::Watch(queue));
        Ok(())
    }
    fn unwatch_kick(&mut self, queue: u16) -> io::Result<()> {
        lock(&self.0).events.push(Event::Unwatch(queue));
        Ok(())
    }
    fn quiesce(&mut self, queue: u16) -> io::Result<()> {
        lock(&self.0).events.push(Event::Quiesce(queue));
        Ok(())
    }
    fn dispatch_now(&mut self, queue: u16) -> io::Result<()> {
        lock(&self.0).events.push(Event::Dispatch(queue));
        Ok(())
    }
}

const FEATURES: u64 = VirtioFeatures::VERSION_1.bits()
    | VirtioFeatures::PROTOCOL_FEATURES.bits()
    | VirtioFeatures::RING_EVENT_IDX.bits()
    | VirtioFeatures::LOG_ALL.bits();

fn protocol() -> ProtocolFeatures {
    ProtocolFeatures::MQ
        | ProtocolFeatures::LOG_SHMFD
        | ProtocolFeatures::REPLY_ACK
        | ProtocolFeatures::BACKEND_REQ
        | ProtocolFeatures::CONFIG
        | ProtocolFeatures::INFLIGHT_SHMFD
        | ProtocolFeatures::RESET_DEVICE
        | ProtocolFeatures::INBAND_NOTIFICATIONS
        | ProtocolFeatures::CONFIGURE_MEM_SLOTS
        | ProtocolFeatures::STATUS
        | ProtocolFeatures::SHARED_OBJECT
        | ProtocolFeatures::DEVICE_STATE
        | ProtocolFeatures::SHMEM
        | ProtocolFeatures::PAGEFAULT
}

struct Fixture {
    session: Session<TestBackend, Ring, LogBitmap>,
    ctl: Recorder,
    rec: Shared,
}

impl Fixture {
    fn with(features: u64, protocol: ProtocolFeatures) -> Self {
        let rec = Shared::default();
        let mem = Mem::new(GuestMemoryMmap::new());
        let vrings = (0..NUM_QUEUES)
            .map(|_| Ring::new(mem.clone(), MAX_QUEUE_SIZE as u16).unwrap())
            .collect();
        let backend = TestBackend {
            features,
            protocol,
            rec: rec.clone(),
        };
        Fixture {
            session: Session::new(backend, mem, vrings),
            ctl: Recorder(rec.clone()),
            rec,
        }
    }

    fn new() -> Self {
        Self::with(FEATURES, protocol())
    }

    /// A fixture after the feature handshake (all offered features acknowledged).
    fn negotiated() -> Self {
        let mut f = Self::new();
        f.negotiate(protocol());
        f
    }

    fn negotiate(&mut self, acked: ProtocolFeatures) {
        self.ok(FrontendRequest::SetOwner);
        self.ok(FrontendRequest::SetProtocolFeatures(
            acked & self.session.offered_protocol,
        ));
        self.ok(FrontendRequest::SetFeatures(
            VirtioFeatures::from_bits_retain(FEATURES),
        ));
    }

    /// Asserts the connection still serves requests (a harmless SET_VRING_BASE is accepted).
    fn alive(&mut self) {
        self.ok(FrontendRequest::SetVringBase(VringState {
            index: 0,
            num: 0,
        }));
    }

    /// Sends a request with NEED_REPLY.
    fn ask(&mut self, req: FrontendRequest) -> Outcome {
        self.send(req, HeaderFlags::NEED_REPLY)
    }

    fn send(&mut self, req: FrontendRequest, flags: HeaderFlags) -> Outcome {
        let (header, body) = req.encode(flags);
        let fds = req
            .fds()
            .into_iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        drop(req);
        self.raw(RawMessage { header, body, fds })
    }

    fn raw(&mut self, msg: RawMessage) -> Outcome {
        self.session.handle(msg, &mut self.ctl)
    }

    /// Sends a request with NEED_REPLY and asserts the REPLY_ACK says success.
    fn ok(&mut self, req: FrontendRequest) {
        let code = req.code();
        let outcome = self.ask(req);
        assert_eq!(ack(&outcome), 0, "{code} was refused");
    }

    fn events(&self) -> Vec<Event> {
        lock(&self.rec).events.clone()
    }

    fn clear_events(&self) {
        lock(&self.rec).events.clear();
    }

    fn vring(&self, queue: usize) -> &Ring {
        &self.session.vrings()[queue]
    }

    #[cfg(not(feature = "xen"))]
    /// Memory table, ring size, addresses, base, call and kick for `queue`; returns the
    /// test's end of the kick eventfd.
    fn start_queue(&mut self, queue: u8) -> File {
        if self.session.mem.num_regions() == 0 {
            self.ok(mem_table(&[(0, MEM_SIZE)]));
        }
        let index = u32::from(queue);
        self.ok(FrontendRequest::SetVringNum(VringState { index, num: 256 }));
        self.ok(FrontendRequest::SetVringAddr(ring_addr(
            index,
            VringAddrFlags::empty(),
        )));
        self.ok(FrontendRequest::SetVringBase(VringState { index, num: 0 }));
        let call = new_eventfd().unwrap();
        self.ok(FrontendRequest::SetVringCall {
            index: queue,
            fd: Some(call.into()),
        });
        let kick = new_eventfd().unwrap();
        let ours = kick.try_clone().unwrap();
        self.ok(FrontendRequest::SetVringKick {
            index: queue,
            fd: Some(kick.into()),
        });
        ours
    }
}

/// The `u64` of a reply (REPLY_ACK or a request's own `u64`); the connection stays open.
fn ack(outcome: &Outcome) -> u64 {
    assert!(!outcome.close, "the connection was closed");
    let reply = outcome.reply.as_ref().expect("no reply");
    assert!(reply.header.is_reply());
    assert_eq!(reply.body.len(), 8, "not a u64 reply");
    u64::from_ne_bytes(reply.body[..8].try_into().unwrap())
}

/// Asserts a reply with no body ("reply payload: N/A") and an open connection.
fn assert_empty_reply(outcome: &Outcome) {
    assert!(!outcome.close, "the connection was closed");
    let reply = outcome.reply.as_ref().expect("no reply");
    assert!(reply.header.is_reply());
    assert_eq!(reply.header.size, 0, "a payload in a reply that has none");
    assert!(reply.body.is_empty() && reply.fds.is_empty());
}

/// Asserts a REPLY_ACK failure and an open connection.
fn assert_refused(outcome: &Outcome) {
    assert_ne!(ack(outcome), 0, "the request was accepted");
}

fn assert_closed(outcome: &Outcome) {
    assert!(outcome.close, "the connection stays open");
    assert!(outcome.reply.is_none());
}

fn memfd(size: u64) -> File {
    named_memfd(c"vu-session-test", size)
}

fn named_memfd(name: &CStr, size: u64) -> File {
    crate::sys::memfd(name, size, false).expect("memfd_create")
}

#[cfg(not(feature = "xen"))]
fn region(gpa: u64, size: u64) -> MemoryRegion {
    MemoryRegion {
        guest_phys_addr: gpa,
        memory_size: size,
        user_addr: VMM_BASE + gpa,
        mmap_offset: 0,
    }
}

#[cfg(not(feature = "xen"))]
/// A SET_MEM_TABLE of `(guest address, size)` regions, each backed by its own memfd.
fn mem_table(regions: &[(u64, u64)]) -> FrontendRequest {
    FrontendRequest::SetMemTable {
        table: MemoryTable {
            regions: regions
                .iter()
                .map(|&(gpa, size)| region(gpa, size))
                .collect(),
        },
        fds: regions
            .iter()
            .map(|&(_, size)| memfd(size).into())
            .collect(),
    }
}

#[cfg(not(feature = "xen"))]
fn ring_addr(index: u32, flags: VringAddrFlags) -> VringAddr {
    VringAddr {
        index,
        flags,
        descriptor: VMM_BASE + DESC,
        used: VMM_BASE + USED,
        available: VMM_BASE + AVAIL,
        log: 0x8000,
    }
}

#[cfg(not(feature = "xen"))]
/// Takes an eventfd's counter (0 when empty).
fn counter(fd: &File) -> u64 {
    let mut buf = [0u8; 8];
    match (&*fd).read(&mut buf) {
        Ok(_) => u64::from_ne_bytes(buf),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("reading the eventfd: {e}"),
    }
}

fn raw(code: u32, flags: HeaderFlags, body: Vec<u8>, fds: Vec<OwnedFd>) -> RawMessage {
    RawMessage {
        header: Header::new(RequestCode(code), flags, body.len() as u32),
        body,
        fds,
    }
}

// ---------------------------------------------------------------- handshake and features

#[cfg(not(feature = "xen"))]
#[test]
fn handshake_starts_and_enables_the_ring() {
    let mut f = Fixture::new();
    let features = ack(&f.ask(FrontendRequest::GetFeatures));
    assert_eq!(features, FEATURES);
    let offered = ack(&f.ask(FrontendRequest::GetProtocolFeatures));
    f.negotiate(ProtocolFeatures::from_bits_retain(offered));
    f.start_queue(0);
    assert_eq!(f.vring(0).ring_state(), RingState::Disabled);
    f.ok(FrontendRequest::SetVringEnable(VringEnable {
        index: 0,
        enable: true,
    }));
    assert_eq!(f.vring(0).ring_state(), RingState::Enabled);
    assert_eq!(f.vring(1).ring_state(), RingState::Stopped);
}

#[test]
fn get_features_without_need_reply_still_replies() {
    let mut f = Fixture::new();
    let outcome = f.send(FrontendRequest::GetFeatures, HeaderFlags::empty());
    assert_eq!(ack(&outcome), FEATURES);
}

#[test]
fn request_without_need_reply_gets_no_reply() {
    let mut f = Fixture::new();
    let outcome = f.send(FrontendRequest::SetOwner, HeaderFlags::empty());
    assert!(outcome.reply.is_none() && !outcome.close);
}

#[test]
fn protocol_features_the_session_cannot_serve_are_not_offered() {
    let mut f = Fixture::with(
        FEATURES,
        protocol() | ProtocolFeatures::CROSS_ENDIAN | ProtocolFeatures::CRYPTO_SESSION,
    );
    let offered =
        ProtocolFeatures::from_bits_retain(ack(&f.ask(FrontendRequest::GetProtocolFeatures)));
    assert!(!offered.intersects(ProtocolFeatures::CROSS_ENDIAN | ProtocolFeatures::CRYPTO_SESSION));
    assert!(offered.contains(ProtocolFeatures::REPLY_ACK | ProtocolFeatures::MQ));
    assert_eq!(
        offered.contains(ProtocolFeatures::PAGEFAULT),
        cfg!(feature = "postcopy")
    );
}

#[test]
fn set_protocol_features_with_unoffered_bits_is_refused() {
    let mut f = Fixture::new();
    let outcome = f.ask(FrontendRequest::SetProtocolFeatures(
        ProtocolFeatures::REPLY_ACK | ProtocolFeatures::RARP,
    ));
    assert_refused(&outcome);
    f.ok(FrontendRequest::SetProtocolFeatures(
        ProtocolFeatures::REPLY_ACK,
    ));
}

#[test]
fn get_protocol_features_without_offering_them_closes() {
    let mut f = Fixture::with(VirtioFeatures::VERSION_1.bits(), protocol());
    assert_closed(&f.ask(FrontendRequest::GetProtocolFeatures));
}

#[test]
fn inband_notifications_without_backend_req_closes() {
    let mut f = Fixture::new();
    let outcome = f.ask(FrontendRequest::SetProtocolFeatures(
        ProtocolFeatures::INBAND_NOTIFICATIONS | ProtocolFeatures::REPLY_ACK,
    ));
    assert_closed(&outcome);
}

/// Debian's QEMU 7.2 acknowledges VIRTIO_RING_F_INDIRECT_DESC and EVENT_IDX to a
/// vhost-user-rng backend that offered neither, shows them to the guest, and gives up if they
/// are refused: the ring features are honoured, other unoffered bits dropped.
#[test]
fn set_features_honours_unoffered_ring_features_and_drops_the_rest() {
    let offered = VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES;
    let mut f = Fixture::with(offered.bits(), protocol());
    let sent = offered
        | VirtioFeatures::RING_INDIRECT_DESC
        | VirtioFeatures::RING_EVENT_IDX
        | VirtioFeatures::RING_PACKED;
    f.ok(FrontendRequest::SetFeatures(sent));
    let in_force = offered | VirtioFeatures::RING_INDIRECT_DESC | VirtioFeatures::RING_EVENT_IDX;
    assert_eq!(lock(&f.rec).acked, Some(in_force.bits()));
    assert_eq!(lock(&f.rec).event_idx, Some(true));
    assert!(f.vring(0).event_idx() && f.vring(1).event_idx());
    assert_eq!(f.session.acked_features, in_force.bits());
}

/// RING_PACKED is offered as the backend offers it (the vrings serve packed rings; QEMU's
/// blk and rng guests run on them in the e2e gate), and acking it makes every vring packed.
#[test]
fn packed_ring_offer_follows_the_backend_and_the_ack_makes_the_vrings_packed() {
    let split = VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES;
    let mut f = Fixture::with(split.bits(), protocol());
    assert_eq!(ack(&f.ask(FrontendRequest::GetFeatures)), split.bits());
    let offered = split | VirtioFeatures::RING_PACKED;
    let mut f = Fixture::with(offered.bits(), protocol());
    assert_eq!(ack(&f.ask(FrontendRequest::GetFeatures)), offered.bits());
    f.ok(FrontendRequest::SetFeatures(offered));
    assert_eq!(lock(&f.rec).acked, Some(offered.bits()));
    assert!(f.vring(0).queue_packed() && f.vring(1).queue_packed());
    f.ok(FrontendRequest::SetFeatures(split));
    assert!(!f.vring(0).queue_packed() && !f.vring(1).queue_packed());
}

#[test]
fn set_features_drops_unoffered_device_bits() {
    let offered = VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES;
    let mut f = Fixture::with(offered.bits(), protocol());
    f.ok(FrontendRequest::SetFeatures(
        offered | VirtioFeatures::ACCESS_PLATFORM,
    ));
    assert_eq!(lock(&f.rec).acked, Some(offered.bits()));
    assert_eq!(lock(&f.rec).event_idx, Some(false));
    assert!(!f.vring(0).event_idx());
}

#[test]
fn set_features_with_event_idx_turns_it_on_everywhere() {
    let f = Fixture::negotiated();
    assert_eq!(lock(&f.rec).event_idx, Some(true));
    assert!(f.vring(0).event_idx() && f.vring(1).event_idx());
}

#[cfg(not(feature = "xen"))]
#[test]
fn set_features_without_protocol_features_enables_all_rings() {
    let mut f = Fixture::new();
    f.start_queue(0);
    assert_eq!(f.vring(0).ring_state(), RingState::Enabled);
    f.ok(FrontendRequest::SetFeatures(VirtioFeatures::VERSION_1));
    assert!(f.vring(1).is_enabled());
}

#[cfg(not(feature = "xen"))]
#[test]
fn set_features_with_protocol_features_leaves_rings_disabled() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    assert_eq!(f.vring(0).ring_state(), RingState::Disabled);
}

#[test]
fn set_owner_is_accepted() {
    let mut f = Fixture::new();
    f.ok(FrontendRequest::SetOwner);
    assert!(f.session.owner);
}

/// "It marks the sender as the front-end that owns of the session": a second SET_OWNER on
/// the same connection (QEMU's multiqueue vhost-user-net sends one per queue pair) is
/// accepted and resets nothing.
#[cfg(not(feature = "xen"))]
#[test]
fn second_set_owner_is_accepted_and_changes_nothing() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    f.ok(FrontendRequest::SetOwner);
    assert!(f.session.owner);
    assert_eq!(lock(&f.rec).resets, 0);
    assert!(f.vring(0).ready(), "the started ring is untouched");
    assert_eq!(f.session.acked_features, FEATURES);
}

// ------------------------------------------------------------------ refusals

/// Sends SET_VRING_NUM for `index`, expects a refusal, then shows the session still works.
fn queue_index_is_refused(index: u32) {
    let mut f = Fixture::negotiated();
    assert_refused(&f.ask(FrontendRequest::SetVringNum(VringState { index, num: 64 })));
    f.ok(FrontendRequest::SetVringNum(VringState {
        index: 1,
        num: 64,
    }));
    assert_eq!(f.vring(1).queue_size(), 64);
    assert_eq!(f.vring(0).queue_size(), MAX_QUEUE_SIZE as u16);
}

#[test]
fn queue_index_equal_to_num_queues_is_refused() {
    queue_index_is_refused(NUM_QUEUES as u32);
}

#[test]
fn queue_index_256_is_refused() {
    queue_index_is_refused(256);
}

#[test]
fn queue_index_65536_is_refused() {
    queue_index_is_refused(65536);
}

#[test]
fn queue_index_u32_max_is_refused() {
    queue_index_is_refused(u32::MAX);
}

#[test]
fn queue_index_257_aliasing_queue_1_in_8_bits_is_refused_for_enable() {
    let mut f = Fixture::negotiated();
    let enable = VringEnable {
        index: 257,
        enable: true,
    };
    assert_refused(&f.ask(FrontendRequest::SetVringEnable(enable)));
    assert!(!f.vring(1).is_enabled());
}

#[test]
fn set_vring_kick_index_out_of_range_is_refused() {
    let mut f = Fixture::negotiated();
    let outcome = f.ask(FrontendRequest::SetVringKick {
        index: NUM_QUEUES as u8,
        fd: Some(new_eventfd().unwrap().into()),
    });
    assert_refused(&outcome);
    assert!(f.events().is_empty());
}

#[test]
fn get_vring_base_index_out_of_range_closes() {
    let mut f = Fixture::negotiated();
    let state = VringState {
        index: u32::MAX,
        num: 0,
    };
    assert_closed(&f.ask(FrontendRequest::GetVringBase(state)));
    assert!(f.events().is_empty());
}

#[test]
fn queue_size_not_a_power_of_two_is_refused() {
    let mut f = Fixture::negotiated();
    let state = VringState { index: 0, num: 100 };
    assert_refused(&f.ask(FrontendRequest::SetVringNum(state)));
    assert_eq!(f.vring(0).queue_size(), MAX_QUEUE_SIZE as u16);
    f.ok(FrontendRequest::SetVringNum(VringState {
        index: 0,
        num: 128,
    }));
}

#[test]
fn queue_size_above_16_bits_is_refused() {
    let mut f = Fixture::negotiated();
    let state = VringState {
        index: 0,
        num: 0x1_0100,
    };
    assert_refused(&f.ask(FrontendRequest::SetVringNum(state)));
    assert_eq!(f.vring(0).queue_size(), MAX_QUEUE_SIZE as u16);
}

#[test]
fn vring_base_above_16_bits_is_refused() {
    let mut f = Fixture::negotiated();
    let state = VringState {
        index: 0,
        num: 0x1_0000,
    };
    assert_refused(&f.ask(FrontendRequest::SetVringBase(state)));
    f.ok(FrontendRequest::SetVringBase(VringState {
        index: 0,
        num: 7,
    }));
    assert_eq!(f.vring(0).queue_next_avail(), 7);
}

#[test]
fn set_vring_enable_before_protocol_features_is_refused() {
    let mut f = Fixture::new();
    let enable = VringEnable {
        index: 0,
        enable: true,
    };
    assert_refused(&f.ask(FrontendRequest::SetVringEnable(enable)));
    assert!(!f.vring(0).is_enabled());
    f.negotiate(protocol());
    f.ok(FrontendRequest::SetVringEnable(enable));
    assert!(f.vring(0).is_enabled());
}

#[test]
fn get_config_before_config_is_negotiated_gets_an_empty_reply() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    let outcome = f.ask(FrontendRequest::GetConfig(DeviceConfig {
        offset: 0,
        flags: ConfigFlags::empty(),
        data: vec![0; 4],
    }));
    let reply = outcome.reply.unwrap();
    assert!(!outcome.close && reply.body.is_empty());
}

#[cfg(not(feature = "xen"))]
#[test]
fn add_mem_reg_before_configure_mem_slots_is_refused() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    let outcome = f.ask(FrontendRequest::AddMemReg {
        region: region(0, MEM_SIZE),
        fd: memfd(MEM_SIZE).into(),
    });
    assert_refused(&outcome);
    assert_eq!(f.session.mem.num_regions(), 0);
    f.ok(mem_table(&[(0, MEM_SIZE)]));
}

/// QEMU's SET_LOG_BASE without LOG_SHMFD: the log payload, no fd, no NEED_REPLY.
fn set_log_base_without_fd(flags: HeaderFlags) -> RawMessage {
    let mut body = 0x1000u64.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    raw(FrontendReq::SetLogBase.code().0, flags, body, Vec::new())
}

/// "Most of the requests don't require replies, except for ... `VHOST_USER_SET_LOG_BASE`
/// (if `VHOST_USER_PROTOCOL_F_LOG_SHMFD`)": QEMU reads a reply only then, so an unasked
/// failure value would be taken as the reply to its next request.
#[test]
fn set_log_base_without_log_shmfd_gets_no_reply() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    let outcome = f.raw(set_log_base_without_fd(HeaderFlags::empty()));
    assert!(outcome.reply.is_none() && !outcome.close);
    let outcome = f.send(
        FrontendRequest::SetLogBase {
            log: Log {
                mmap_size: 0x1000,
                mmap_offset: 0,
            },
            fd: memfd(0x1000).into(),
        },
        HeaderFlags::empty(),
    );
    assert!(outcome.reply.is_none() && !outcome.close);
}

#[test]
fn set_log_base_without_log_shmfd_with_need_reply_gets_an_ack_failure() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    assert_refused(&f.raw(set_log_base_without_fd(HeaderFlags::NEED_REPLY)));
}

#[test]
fn set_log_base_refused_with_log_shmfd_gets_a_failure_value() {
    let mut f = Fixture::negotiated();
    // No fd: the frontend negotiated LOG_SHMFD and waits for the reply all the same.
    assert_refused(&f.raw(set_log_base_without_fd(HeaderFlags::empty())));
}

/// "This request should be sent only when `VHOST_USER_PROTOCOL_F_MQ` is set in queried
/// protocol features by `VHOST_USER_GET_PROTOCOL_FEATURES`": offered is enough.
#[test]
fn get_queue_num_with_mq_offered_but_not_acknowledged_is_answered() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    assert_eq!(ack(&f.ask(FrontendRequest::GetQueueNum)), NUM_QUEUES as u64);
}

#[test]
fn get_queue_num_without_mq_offered_closes() {
    let mut f = Fixture::with(FEATURES, protocol() - ProtocolFeatures::MQ);
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    assert_closed(&f.ask(FrontendRequest::GetQueueNum));
}

#[test]
fn refused_request_without_need_reply_is_ignored() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    let outcome = f.send(FrontendRequest::SetStatus(U64(1)), HeaderFlags::empty());
    assert!(outcome.reply.is_none() && !outcome.close);
    assert_eq!(f.session.status, 0);
}

#[test]
fn unknown_request_code_with_need_reply_gets_an_ack_failure() {
    let mut f = Fixture::negotiated();
    assert_refused(&f.raw(raw(
        1000,
        HeaderFlags::NEED_REPLY,
        vec![1, 2, 3],
        Vec::new(),
    )));
    f.alive();
}

#[test]
fn unknown_request_code_without_need_reply_is_ignored() {
    let mut f = Fixture::negotiated();
    let fd: OwnedFd = new_eventfd().unwrap().into();
    let outcome = f.raw(raw(45, HeaderFlags::empty(), Vec::new(), vec![fd]));
    assert!(outcome.reply.is_none() && !outcome.close);
    f.alive();
}

#[test]
fn malformed_body_is_refused_without_closing() {
    let mut f = Fixture::negotiated();
    let code = FrontendReq::SetVringNum.code().0;
    assert_refused(&f.raw(raw(code, HeaderFlags::NEED_REPLY, vec![0; 5], Vec::new())));
    f.ok(FrontendRequest::SetVringNum(VringState {
        index: 0,
        num: 64,
    }));
}

#[test]
fn wrong_fd_count_is_refused_and_the_fds_are_closed() {
    let mut f = Fixture::negotiated();
    let code = FrontendReq::SetVringNum.code().0;
    let body = VringState { index: 0, num: 64 };
    let mut bytes = Vec::new();
    body.encode(&mut bytes);
    let fd = new_eventfd().unwrap();
    let theirs = fd.try_clone().unwrap();
    assert_refused(&f.raw(raw(code, HeaderFlags::NEED_REPLY, bytes, vec![fd.into()])));
    drop(theirs);
    assert_eq!(f.vring(0).queue_size(), MAX_QUEUE_SIZE as u16);
}

#[test]
fn message_with_reply_flag_closes_the_connection() {
    let mut f = Fixture::negotiated();
    let code = FrontendReq::GetFeatures.code().0;
    // A GET_FEATURES with the REPLY flag, with and without NEED_REPLY: the peer would wait
    // for an answer we cannot know it expects, so the connection is closed at once.
    for flags in [
        HeaderFlags::REPLY,
        HeaderFlags::REPLY | HeaderFlags::NEED_REPLY,
    ] {
        assert_closed(&f.raw(raw(code, flags, Vec::new(), Vec::new())));
    }
}

// ------------------------------------------------------------------ rings

#[cfg(not(feature = "xen"))]
#[test]
fn set_vring_kick_starts_the_ring_and_watches_it() {
    let mut f = Fixture::negotiated();
    f.start_queue(1);
    assert_eq!(f.events(), vec![Event::Unwatch(1), Event::Watch(1)]);
    assert!(f.vring(1).ready());
}

#[test]
fn set_vring_kick_without_fd_installs_an_eventfd_and_watches_it() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetVringKick { index: 0, fd: None });
    assert!(f.vring(0).get_ref().get_kick().is_some());
    assert!(f.vring(0).ready());
    assert_eq!(f.events(), vec![Event::Unwatch(0), Event::Watch(0)]);
}

#[cfg(not(feature = "xen"))]
#[test]
fn get_vring_base_stops_in_order_and_returns_next_avail() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    f.ok(FrontendRequest::SetVringBase(VringState {
        index: 0,
        num: 42,
    }));
    f.clear_events();
    let outcome = f.send(
        FrontendRequest::GetVringBase(VringState { index: 0, num: 0 }),
        HeaderFlags::empty(),
    );
    assert!(!outcome.close);
    let reply = outcome.reply.unwrap();
    let mut expected = Vec::new();
    VringState { index: 0, num: 42 }.encode(&mut expected);
    assert_eq!(reply.body, expected);
    assert_eq!(
        f.events(),
        vec![Event::Unwatch(0), Event::Quiesce(0), Event::StopVring(0)]
    );
    assert_eq!(f.vring(0).ring_state(), RingState::Stopped);
    assert!(f.vring(0).get_ref().get_kick().is_none());
}

/// A started ring asks the driver to kick from its restart point on, whatever the ring's
/// previous owner left in guest memory: a back-end stopped or killed while its poller held
/// kicks off leaves `avail_event` behind, and a driver that finds it behind never kicks again
/// (a migrated guest hung on it). GET_VRING_BASE leaves the ring asking for kicks too.
#[cfg(not(feature = "xen"))]
#[test]
fn a_started_ring_asks_for_kicks_whatever_the_previous_owner_left() {
    use vm_memory::Bytes;
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    // avail_event, after the used ring's flags, index and 256 elements.
    let avail_event = GuestAddress(USED + 4 + 8 * 256);
    let mem = f.vring(0).get_ref().mem().memory();
    mem.write_obj(9u16, GuestAddress(AVAIL + 2)).unwrap();
    f.ok(FrontendRequest::SetVringBase(VringState {
        index: 0,
        num: 9,
    }));
    f.vring(0).get_mut().hold_kicks().unwrap();
    mem.write_obj(3u16, avail_event).unwrap();
    let outcome = f.send(
        FrontendRequest::GetVringBase(VringState { index: 0, num: 0 }),
        HeaderFlags::empty(),
    );
    assert!(!outcome.close);
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 9);
    // The next owner's view: a stale avail_event written while the ring was stopped.
    mem.write_obj(3u16, avail_event).unwrap();
    f.ok(FrontendRequest::SetVringBase(VringState {
        index: 0,
        num: 9,
    }));
    f.ok(FrontendRequest::SetVringKick {
        index: 0,
        fd: Some(new_eventfd().unwrap().into()),
    });
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 9);
}

/// A packed ring's base word carries the avail position and wrap counter in bits 0-15 and
/// the used ones in bits 16-31, in and out. (The fixture's backend does not offer
/// RING_PACKED, so the layout is chosen on the vring directly.)
#[cfg(not(feature = "xen"))]
#[test]
fn packed_vring_base_carries_both_positions_both_ways() {
    let mut f = Fixture::negotiated();
    f.vring(0).set_queue_packed(true);
    f.start_queue(0);
    f.ok(FrontendRequest::SetVringBase(VringState {
        index: 0,
        num: 0x8003_0005,
    }));
    assert_eq!(f.vring(0).queue_next_avail(), 5);
    assert_eq!(f.vring(0).queue_next_used(), 0x8003);
    let outcome = f.send(
        FrontendRequest::GetVringBase(VringState { index: 0, num: 0 }),
        HeaderFlags::empty(),
    );
    let mut expected = Vec::new();
    VringState {
        index: 0,
        num: 0x8003_0005,
    }
    .encode(&mut expected);
    assert_eq!(outcome.reply.unwrap().body, expected);
}

/// Enabling does not kick: the runtime re-arms parked kicks after every message instead.
#[cfg(not(feature = "xen"))]
#[test]
fn enabling_a_started_ring_writes_no_kick() {
    let mut f = Fixture::negotiated();
    let kick = f.start_queue(0);
    f.ok(FrontendRequest::SetVringEnable(VringEnable {
        index: 0,
        enable: true,
    }));
    assert_eq!(counter(&kick), 0);
    assert_eq!(f.vring(0).ring_state(), RingState::Enabled);
}

/// A kick that arrives while the ring is disabled stays in the counter across the enable
/// (the session neither reads nor adds to it), where the runtime's re-arm finds it.
#[cfg(not(feature = "xen"))]
#[test]
fn kick_while_disabled_is_still_pending_after_enable() {
    let mut f = Fixture::negotiated();
    let kick = f.start_queue(0);
    let enable = |enable| FrontendRequest::SetVringEnable(VringEnable { index: 0, enable });
    f.ok(enable(true));
    f.ok(enable(false));
    (&kick).write_all(&1u64.to_ne_bytes()).unwrap();
    f.ok(enable(true));
    assert_eq!(counter(&kick), 1);
    assert_eq!(f.vring(0).ring_state(), RingState::Enabled);
}

/// Chains a driver posted while the ring was off, with no kick the device could see, are
/// looked at when the ring is enabled.
#[cfg(not(feature = "xen"))]
#[test]
fn enabling_a_ring_with_available_chains_kicks_its_worker() {
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    let mut f = Fixture::negotiated();
    let kick = f.start_queue(0);
    let mem = f.vring(0).get_ref().mem().memory();
    // The available ring's idx (after its 2-byte flags): three chains posted.
    mem.write_obj(3u16, GuestAddress(AVAIL + 2)).unwrap();
    f.ok(FrontendRequest::SetVringEnable(VringEnable {
        index: 0,
        enable: true,
    }));
    assert_eq!(counter(&kick), 1);
}

#[cfg(not(feature = "xen"))]
#[test]
fn disabling_keeps_the_ring_started() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    let enable = |enable| FrontendRequest::SetVringEnable(VringEnable { index: 0, enable });
    f.ok(enable(true));
    f.ok(enable(false));
    assert_eq!(f.vring(0).ring_state(), RingState::Disabled);
}

#[test]
fn enable_is_remembered_while_stopped() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetVringEnable(VringEnable {
        index: 1,
        enable: true,
    }));
    assert_eq!(f.vring(1).ring_state(), RingState::Stopped);
    assert!(f.vring(1).is_enabled());
}

#[test]
fn inband_vring_kick_starts_and_kicks_the_ring() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::VringKick(VringState { index: 1, num: 0 }));
    assert!(f.vring(1).ready());
    // Started, watched, then served before the answer.
    assert_eq!(
        f.events(),
        vec![Event::Unwatch(1), Event::Watch(1), Event::Dispatch(1)]
    );
    f.vring(1).set_enabled(true);
    assert!(f.vring(1).read_kick().unwrap());
}

#[cfg(not(feature = "xen"))]
#[test]
fn inband_vring_kick_uses_the_existing_kick_fd() {
    let mut f = Fixture::negotiated();
    let kick = f.start_queue(0);
    f.clear_events();
    f.ok(FrontendRequest::VringKick(VringState { index: 0, num: 0 }));
    assert_eq!(counter(&kick), 1);
    assert_eq!(f.events(), vec![Event::Dispatch(0)]);
}

#[test]
fn inband_vring_kick_without_the_feature_is_refused() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    assert_refused(&f.ask(FrontendRequest::VringKick(VringState { index: 0, num: 0 })));
    assert!(!f.vring(0).ready());
}

#[test]
fn set_vring_call_and_err_store_and_clear_the_fds() {
    let mut f = Fixture::negotiated();
    let fd = || Some(new_eventfd().unwrap().into());
    f.ok(FrontendRequest::SetVringCall { index: 1, fd: fd() });
    f.ok(FrontendRequest::SetVringErr { index: 1, fd: fd() });
    assert!(f.vring(1).get_ref().get_call().is_some());
    assert!(f.vring(1).get_ref().get_err().is_some());
    f.ok(FrontendRequest::SetVringCall { index: 1, fd: None });
    f.ok(FrontendRequest::SetVringErr { index: 1, fd: None });
    assert!(f.vring(1).get_ref().get_call().is_none());
    assert!(f.vring(1).get_ref().get_err().is_none());
}

#[cfg(not(feature = "xen"))]
#[test]
fn set_vring_addr_translates_vmm_addresses_to_guest_addresses() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    assert_eq!(f.vring(0).queue_info(), (DESC, AVAIL, USED));
    assert!(f.vring(0).log_used().is_none());
}

#[cfg(not(feature = "xen"))]
#[test]
fn set_vring_addr_outside_guest_memory_is_refused() {
    let mut f = Fixture::negotiated();
    f.ok(mem_table(&[(0, MEM_SIZE)]));
    let mut addr = ring_addr(0, VringAddrFlags::empty());
    addr.used = VMM_BASE + MEM_SIZE;
    assert_refused(&f.ask(FrontendRequest::SetVringAddr(addr)));
    assert_eq!(f.vring(0).queue_info(), (0, 0, 0));
}

#[cfg(not(feature = "xen"))]
#[test]
fn set_vring_addr_with_log_flag_sets_the_used_ring_log() {
    let mut f = Fixture::negotiated();
    f.ok(mem_table(&[(0, MEM_SIZE)]));
    f.ok(FrontendRequest::SetVringAddr(ring_addr(
        0,
        VringAddrFlags::LOG,
    )));
    assert_eq!(f.vring(0).log_used().map(|r| r.start), Some(0x8000));
}

/// QEMU turns dirty logging on for a running device by re-sending `SET_VRING_ADDR` with
/// `VHOST_VRING_F_LOG` to started rings (hw/virtio/vhost.c `vhost_dev_set_log`), with
/// NEED_REPLY: "the back-end must support changing some configuration aspects on the fly".
#[cfg(not(feature = "xen"))]
#[test]
fn set_vring_addr_with_log_flag_on_a_started_ring_keeps_it_started() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    f.ok(FrontendRequest::SetVringEnable(VringEnable {
        index: 0,
        enable: true,
    }));
    f.ok(FrontendRequest::SetVringAddr(ring_addr(
        0,
        VringAddrFlags::LOG,
    )));
    assert_eq!(f.vring(0).log_used().map(|r| r.start), Some(0x8000));
    assert_eq!(f.vring(0).ring_state(), RingState::Enabled);
    assert!(f.vring(0).get_ref().get_kick().is_some());
}

/// NEED_REPLY is answered whether or not REPLY_ACK was negotiated: QEMU sets it on
/// `POSTCOPY_LISTEN` unconditionally.
#[test]
fn need_reply_is_answered_without_reply_ack_negotiated() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::empty());
    f.alive();
}

#[test]
fn get_queue_num_replies_the_number_of_queues() {
    let mut f = Fixture::negotiated();
    assert_eq!(ack(&f.ask(FrontendRequest::GetQueueNum)), NUM_QUEUES as u64);
}

// ------------------------------------------------------------------ resets

#[cfg(not(feature = "xen"))]
#[test]
fn reset_owner_stops_and_resets_rings_and_features() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    f.clear_events();
    f.ok(FrontendRequest::ResetOwner);
    assert_eq!(f.vring(0).ring_state(), RingState::Stopped);
    assert_eq!(f.vring(0).queue_info(), (0, 0, 0));
    assert!(f.events().contains(&Event::Unwatch(0)));
    assert!(f.events().contains(&Event::Quiesce(1)));
    assert_eq!(lock(&f.rec).resets, 1);
    assert_eq!(f.session.acked_features, 0);
    // Protocol features (and so REPLY_ACK) survive.
    f.ok(FrontendRequest::SetOwner);
    assert!(f
        .session
        .acked_protocol
        .contains(ProtocolFeatures::REPLY_ACK));
}

#[cfg(not(feature = "xen"))]
#[test]
fn reset_device_resets_rings_and_device() {
    let mut f = Fixture::negotiated();
    f.start_queue(1);
    f.ok(FrontendRequest::ResetDevice);
    assert_eq!(f.vring(1).ring_state(), RingState::Stopped);
    assert_eq!(lock(&f.rec).resets, 1);
    assert!(f.session.owner);
}

/// "Only valid if the `VHOST_USER_PROTOCOL_F_RESET_DEVICE` protocol feature is set by the
/// back-end": offered is enough.
#[test]
fn reset_device_offered_but_not_acknowledged_is_accepted() {
    let mut f = Fixture::new();
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    f.ok(FrontendRequest::ResetDevice);
    assert_eq!(lock(&f.rec).resets, 1);
}

#[test]
fn reset_device_without_the_feature_offered_is_refused() {
    let mut f = Fixture::with(FEATURES, protocol() - ProtocolFeatures::RESET_DEVICE);
    f.negotiate(ProtocolFeatures::REPLY_ACK);
    assert_refused(&f.ask(FrontendRequest::ResetDevice));
    assert_eq!(lock(&f.rec).resets, 0);
}

#[cfg(not(feature = "xen"))]
#[test]
fn disconnect_forgets_the_connection() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    f.clear_events();
    f.session.disconnect(&mut f.ctl);
    assert_eq!(f.vring(0).ring_state(), RingState::Stopped);
    assert!(f.events().contains(&Event::Unwatch(0)));
    assert!(f.events().contains(&Event::Unwatch(1)));
    assert_eq!(f.session.mem.num_regions(), 0);
    assert_eq!(f.session.acked_features, 0);
    assert!(f.session.acked_protocol.is_empty());
    assert_eq!(lock(&f.rec).resets, 1);
    // The next connection negotiates from scratch.
    let enable = VringEnable {
        index: 0,
        enable: true,
    };
    assert_refused(&f.ask(FrontendRequest::SetVringEnable(enable)));
}

// ------------------------------------------------------------------ memory and log

#[cfg(not(feature = "xen"))]
#[test]
fn set_mem_table_reaches_backend_and_vrings() {
    let mut f = Fixture::negotiated();
    f.ok(mem_table(&[(0, MEM_SIZE)]));
    let rec = lock(&f.rec);
    assert_eq!(rec.memory_updates, 1);
    let mem = rec.memory.as_ref().unwrap().memory();
    assert!(mem.address_in_range(GuestAddress(MEM_SIZE - 1)));
    drop(rec);
    let vring_mem = f.vring(0).get_ref().mem().memory();
    assert!(vring_mem.address_in_range(GuestAddress(0)));
}

#[cfg(not(feature = "xen"))]
#[test]
fn set_mem_table_with_overlapping_regions_is_refused() {
    let mut f = Fixture::negotiated();
    assert_refused(&f.ask(mem_table(&[(0, MEM_SIZE), (MEM_SIZE / 2, MEM_SIZE)])));
    assert_eq!(lock(&f.rec).memory_updates, 0);
    f.ok(mem_table(&[(0, MEM_SIZE)]));
}

#[cfg(not(feature = "xen"))]
/// The name of the memfds whose fds the leak test counts.
const LEAK_NAME: &CStr = c"vu-leak-table";

#[cfg(not(feature = "xen"))]
/// How many of this process's fds are memfds named [`LEAK_NAME`]. Other tests running
/// meanwhile open other fds, so the count is by name, not a total.
fn leak_table_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("vu-leak-table"))
        .count()
}

#[cfg(not(feature = "xen"))]
/// A SET_MEM_TABLE of `regions` equal slices of the test guest, each backed by a memfd
/// named [`LEAK_NAME`].
fn leak_table(regions: u64) -> FrontendRequest {
    let size = MEM_SIZE / regions;
    FrontendRequest::SetMemTable {
        table: MemoryTable {
            regions: (0..regions).map(|i| region(i * size, size)).collect(),
        },
        fds: (0..regions)
            .map(|_| named_memfd(LEAK_NAME, size).into())
            .collect(),
    }
}

#[cfg(not(feature = "xen"))]
/// Serializes the tests that count this process's fds.
static FD_COUNT: Mutex<()> = Mutex::new(());

#[cfg(not(feature = "xen"))]
#[test]
fn set_mem_table_replaced_repeatedly_does_not_leak_fds() {
    let _serial = FD_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = Fixture::negotiated();
    f.ok(leak_table(1));
    // The backend's snapshot would keep the replaced regions (and their fds) alive.
    lock(&f.rec).memory = None;
    assert_eq!(leak_table_fds(), 1);
    for _ in 0..20 {
        f.ok(leak_table(2));
        f.ok(leak_table(1));
    }
    lock(&f.rec).memory = None;
    assert_eq!(leak_table_fds(), 1);
    f.session.disconnect(&mut f.ctl);
    assert_eq!(leak_table_fds(), 0);
}

#[cfg(not(feature = "xen"))]
#[test]
fn add_and_remove_mem_reg_change_the_table() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::AddMemReg {
        region: region(0, MEM_SIZE),
        fd: memfd(MEM_SIZE).into(),
    });
    f.ok(FrontendRequest::AddMemReg {
        region: region(MEM_SIZE, MEM_SIZE),
        fd: memfd(MEM_SIZE).into(),
    });
    assert_eq!(f.session.mem.num_regions(), 2);
    f.ok(FrontendRequest::RemMemReg(region(0, MEM_SIZE)));
    assert_eq!(f.session.mem.num_regions(), 1);
    assert_eq!(lock(&f.rec).memory_updates, 3);
}

#[cfg(not(feature = "xen"))]
#[test]
fn rem_mem_reg_of_an_unknown_region_is_refused() {
    let mut f = Fixture::negotiated();
    assert_refused(&f.ask(FrontendRequest::RemMemReg(region(0, MEM_SIZE))));
}

#[test]
fn get_max_mem_slots_replies_the_slot_limit() {
    let mut f = Fixture::negotiated();
    assert_eq!(ack(&f.ask(FrontendRequest::GetMaxMemSlots)), 509);
}

#[cfg(not(feature = "xen"))]
#[test]
/// "`VHOST_USER_SET_LOG_BASE` (if `VHOST_USER_PROTOCOL_F_LOG_SHMFD`)" requires a reply, whose
/// "reply payload" is "N/A".
fn set_log_base_maps_the_log_and_replies_with_no_payload() {
    let mut f = Fixture::negotiated();
    f.ok(mem_table(&[(0, MEM_SIZE)]));
    let outcome = f.send(
        FrontendRequest::SetLogBase {
            log: Log {
                mmap_size: 0x1000,
                mmap_offset: 0,
            },
            fd: memfd(0x1000).into(),
        },
        HeaderFlags::empty(),
    );
    assert_empty_reply(&outcome);
    assert_eq!(f.session.mem.dirty_log().log_size(), Some(0x1000));
}

#[test]
fn log_all_feature_turns_logging_on_and_off() {
    let mut f = Fixture::negotiated();
    let with_log = VirtioFeatures::from_bits_retain(FEATURES);
    f.ok(FrontendRequest::SetFeatures(with_log));
    assert!(f.session.mem.dirty_log().is_logging());
    f.ok(FrontendRequest::SetFeatures(
        with_log - VirtioFeatures::LOG_ALL,
    ));
    assert!(!f.session.mem.dirty_log().is_logging());
}

#[test]
fn set_log_fd_is_accepted() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetLogFd {
        fd: new_eventfd().unwrap().into(),
    });
}

// ------------------------------------------------------------------ inflight

fn inflight(num_queues: u16, queue_size: u16) -> Inflight {
    Inflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues,
        queue_size,
    }
}

#[test]
fn get_inflight_fd_returns_a_memfd_of_the_layout_size() {
    let mut f = Fixture::negotiated();
    let mut outcome = f.ask(FrontendRequest::GetInflightFd(inflight(2, 256)));
    assert!(!outcome.close);
    let reply = outcome.reply.take().unwrap();
    let desc = Inflight::decode_body(reply.header.request, &reply.body).unwrap();
    let size = inflight_size(2, 256, false);
    // Per queue: a 16-byte header and 256 16-byte descriptor states, 4112 bytes, rounded
    // up to 64.
    assert_eq!(size, 2 * 4160);
    assert_eq!((desc.mmap_size, desc.mmap_offset), (size, 0));
    assert_eq!(reply.fds.len(), 1);
    let file = File::from(reply.fds.into_iter().next().unwrap());
    assert_eq!(file.metadata().unwrap().len(), size);
    assert_eq!(f.session.inflight.as_ref().unwrap().desc(), desc);
}

#[test]
fn get_inflight_fd_for_more_queues_than_the_device_has_is_refused() {
    let mut f = Fixture::negotiated();
    let outcome = f.ask(FrontendRequest::GetInflightFd(inflight(3, 256)));
    let reply = outcome.reply.unwrap();
    assert!(!outcome.close && reply.fds.is_empty());
    assert!(reply.body.iter().all(|&b| b == 0));
    assert!(f.session.inflight.is_none());
}

#[test]
fn get_inflight_fd_for_larger_queues_than_the_device_has_is_refused() {
    let mut f = Fixture::negotiated();
    let outcome = f.ask(FrontendRequest::GetInflightFd(inflight(1, 512)));
    assert!(outcome.reply.unwrap().fds.is_empty());
}

#[test]
fn set_inflight_fd_keeps_the_area() {
    let mut f = Fixture::negotiated();
    let size = inflight_size(1, 64, false);
    let desc = Inflight {
        mmap_size: size,
        ..inflight(1, 64)
    };
    let file = memfd(size);
    f.ok(FrontendRequest::SetInflightFd {
        inflight: desc,
        fd: file.try_clone().unwrap().into(),
    });
    let area = f.session.inflight.as_ref().unwrap();
    assert_eq!(area.desc(), desc);
    // The session keeps the very file the frontend sent (same inode), not a new one.
    let kept = File::from(area.fd().try_clone_to_owned().unwrap());
    let (kept, sent) = (kept.metadata().unwrap(), file.metadata().unwrap());
    assert_eq!((kept.dev(), kept.ino()), (sent.dev(), sent.ino()));
}

#[test]
fn set_inflight_fd_smaller_than_its_layout_is_refused() {
    let mut f = Fixture::negotiated();
    let desc = Inflight {
        mmap_size: 64,
        ..inflight(1, 64)
    };
    let outcome = f.ask(FrontendRequest::SetInflightFd {
        inflight: desc,
        fd: memfd(64).into(),
    });
    assert_refused(&outcome);
    assert!(f.session.inflight.is_none());
}

#[test]
fn set_inflight_fd_with_an_unknown_region_version_is_refused() {
    let mut f = Fixture::negotiated();
    let size = inflight_size(1, 64, false);
    let file = memfd(size);
    std::os::unix::fs::FileExt::write_at(&file, &9u16.to_le_bytes(), 8).unwrap();
    let outcome = f.ask(FrontendRequest::SetInflightFd {
        inflight: Inflight {
            mmap_size: size,
            ..inflight(1, 64)
        },
        fd: file.into(),
    });
    assert_refused(&outcome);
    assert!(f.session.inflight.is_none());
}

#[cfg(not(feature = "xen"))]
#[test]
fn a_started_ring_initialises_and_records_into_its_region() {
    let mut f = Fixture::negotiated();
    // Offered because it is served: the rest of this test is the serving.
    let offered = ack(&f.ask(FrontendRequest::GetProtocolFeatures));
    assert!(ProtocolFeatures::from_bits_retain(offered).contains(ProtocolFeatures::INFLIGHT_SHMFD));
    let mut outcome = f.ask(FrontendRequest::GetInflightFd(inflight(2, 256)));
    let reply = outcome.reply.take().unwrap();
    let area = File::from(reply.fds.into_iter().next().unwrap());
    f.start_queue(0);
    assert!(f.vring(0).get_ref().inflight_tracking());
    assert!(!f.vring(1).get_ref().inflight_tracking());
    let mut version = [0u8; 2];
    std::os::unix::fs::FileExt::read_exact_at(&area, &mut version, 8).unwrap();
    assert_eq!(u16::from_le_bytes(version), 1);
}

#[cfg(not(feature = "xen"))]
#[test]
fn reset_device_forgets_the_inflight_area() {
    let mut f = Fixture::negotiated();
    f.ask(FrontendRequest::GetInflightFd(inflight(2, 256)));
    f.start_queue(0);
    assert!(f.vring(0).get_ref().inflight_tracking());
    f.ok(FrontendRequest::ResetDevice);
    assert!(f.session.inflight.is_none());
    f.start_queue(0);
    assert!(!f.vring(0).get_ref().inflight_tracking());
}

#[cfg(not(feature = "xen"))]
#[test]
fn a_call_fd_installed_on_a_tracked_ring_is_signalled_once() {
    let mut f = Fixture::negotiated();
    f.ask(FrontendRequest::GetInflightFd(inflight(2, 256)));
    f.start_queue(0);
    f.start_queue(1);
    // The area covers both queues, so both track; queue 1's new call fd is signalled, since
    // resubmitted chains may have completed before it was installed.
    let call = new_eventfd().unwrap();
    let ours = call.try_clone().unwrap();
    f.ok(FrontendRequest::SetVringCall {
        index: 1,
        fd: Some(call.into()),
    });
    assert_eq!(counter(&ours), 1);
}

#[cfg(not(feature = "xen"))]
#[test]
fn a_call_fd_installed_on_an_untracked_ring_is_not_signalled() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    let call = new_eventfd().unwrap();
    let ours = call.try_clone().unwrap();
    f.ok(FrontendRequest::SetVringCall {
        index: 0,
        fd: Some(call.into()),
    });
    assert_eq!(counter(&ours), 0);
}

#[cfg(not(feature = "xen"))]
#[test]
fn a_ring_whose_size_differs_from_its_region_is_not_started() {
    let mut f = Fixture::negotiated();
    f.ask(FrontendRequest::GetInflightFd(inflight(1, 128)));
    f.ok(mem_table(&[(0, MEM_SIZE)]));
    f.ok(FrontendRequest::SetVringNum(VringState {
        index: 0,
        num: 256,
    }));
    f.ok(FrontendRequest::SetVringAddr(ring_addr(
        0,
        VringAddrFlags::empty(),
    )));
    let outcome = f.ask(FrontendRequest::SetVringKick {
        index: 0,
        fd: Some(new_eventfd().unwrap().into()),
    });
    assert_refused(&outcome);
    assert_eq!(f.vring(0).ring_state(), RingState::Stopped);
}

// ------------------------------------------------------------------ device requests

#[test]
fn set_backend_req_fd_hands_the_channel_to_the_backend() {
    let mut f = Fixture::negotiated();
    let (ours, theirs) = UnixStream::pair().unwrap();
    f.ok(FrontendRequest::SetBackendReqFd {
        fd: OwnedFd::from(theirs),
    });
    assert!(lock(&f.rec).channel.is_some());
    drop(ours);
}

#[test]
fn set_backend_req_fd_with_a_non_socket_is_refused() {
    let mut f = Fixture::negotiated();
    let outcome = f.ask(FrontendRequest::SetBackendReqFd {
        fd: memfd(8).into(),
    });
    assert_refused(&outcome);
    assert!(lock(&f.rec).channel.is_none());
}

#[test]
fn set_config_then_get_config_round_trips_through_the_backend() {
    let mut f = Fixture::negotiated();
    let config = |data: Vec<u8>| DeviceConfig {
        offset: 4,
        flags: ConfigFlags::empty(),
        data,
    };
    f.ok(FrontendRequest::SetConfig(config(vec![1, 2, 3, 4])));
    let outcome = f.ask(FrontendRequest::GetConfig(config(vec![0; 4])));
    let mut expected = Vec::new();
    config(vec![1, 2, 3, 4]).encode(&mut expected);
    assert_eq!(outcome.reply.unwrap().body, expected);
}

#[test]
fn get_config_of_a_short_read_gets_an_empty_reply() {
    let mut f = Fixture::negotiated();
    let outcome = f.ask(FrontendRequest::GetConfig(DeviceConfig {
        offset: 0,
        flags: ConfigFlags::empty(),
        data: vec![0; 16],
    }));
    assert!(outcome.reply.unwrap().body.is_empty());
}

#[test]
fn set_status_then_get_status() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetStatus(U64(0xf)));
    assert_eq!(ack(&f.ask(FrontendRequest::GetStatus)), 0xf);
}

#[test]
fn get_shared_object_returns_the_backend_fd() {
    let mut f = Fixture::negotiated();
    let outcome = f.ask(FrontendRequest::GetSharedObject(SharedObject {
        uuid: [7; 16],
    }));
    assert_eq!(ack(&outcome), 0);
    assert_eq!(outcome.reply.unwrap().fds.len(), 1);
}

#[test]
fn get_shared_object_failure_replies_non_zero_without_fd() {
    let mut f = Fixture::negotiated();
    lock(&f.rec).fail = true;
    let outcome = f.ask(FrontendRequest::GetSharedObject(SharedObject {
        uuid: [7; 16],
    }));
    assert_refused(&outcome);
    assert!(outcome.reply.unwrap().fds.is_empty());
}

fn transfer() -> DeviceStateTransfer {
    DeviceStateTransfer {
        direction: TransferDirection::Save,
        phase: TransferPhase::Stopped,
    }
}

#[test]
fn set_device_state_fd_and_check_device_state_reach_the_backend() {
    let mut f = Fixture::negotiated();
    let outcome = f.ask(FrontendRequest::SetDeviceStateFd {
        transfer: transfer(),
        fd: memfd(8).into(),
    });
    // Success, no fd of the backend's own (bit 8).
    assert_eq!(ack(&outcome), 1 << 8);
    assert!(lock(&f.rec).state_fd.is_some());
    assert_eq!(ack(&f.ask(FrontendRequest::CheckDeviceState)), 0);
}

#[test]
fn device_state_failures_reply_error_values() {
    let mut f = Fixture::negotiated();
    lock(&f.rec).fail = true;
    let outcome = f.ask(FrontendRequest::SetDeviceStateFd {
        transfer: transfer(),
        fd: memfd(8).into(),
    });
    assert_eq!(ack(&outcome), 1 | 1 << 8);
    assert_refused(&f.ask(FrontendRequest::CheckDeviceState));
}

#[test]
fn get_shmem_config_replies_the_backend_config() {
    let mut f = Fixture::negotiated();
    let outcome = f.ask(FrontendRequest::GetShmemConfig);
    let reply = outcome.reply.unwrap();
    let config = ShmemConfig::decode_body(reply.header.request, &reply.body).unwrap();
    assert_eq!(config.nregions, 1);
    assert_eq!(config.memory_sizes[0], 0x1000);
}

#[test]
fn device_specific_requests_are_refused_cleanly() {
    let mut f = Fixture::negotiated();
    let requests = vec![
        FrontendRequest::SendRarp(MacAddr([1, 2, 3, 4, 5, 6])),
        FrontendRequest::NetSetMtu(U64(1500)),
        FrontendRequest::IotlbMsg(Iotlb {
            iova: 0,
            size: 0x1000,
            uaddr: VMM_BASE,
            perm: IotlbPerm::ReadWrite,
            kind: IotlbType::Update,
        }),
        FrontendRequest::SetVringEndian(VringEndian {
            index: 0,
            big_endian: false,
        }),
        FrontendRequest::CloseCryptoSession(U64(1)),
    ];
    for req in requests {
        assert_refused(&f.ask(req));
    }
    f.alive();
}

/// "The back-end must return the session id, 0 or positive for success, negative for
/// failure": -1 where both of QEMU's layouts keep the id, the rest echoed, same size.
#[test]
fn create_crypto_session_gets_a_negative_session_id() {
    let mut f = Fixture::negotiated();
    let request = vec![7u8; 40];
    let req = FrontendRequest::CreateCryptoSession(vu_proto::payload::CryptoSession(request));
    let outcome = f.send(req, HeaderFlags::empty());
    assert!(!outcome.close);
    let reply = outcome.reply.unwrap();
    assert_eq!(
        reply.header.request,
        FrontendReq::CreateCryptoSession.code()
    );
    assert_eq!(reply.body.len(), 40);
    let id_at = |at: usize| i64::from_ne_bytes(reply.body[at..at + 8].try_into().unwrap());
    assert_eq!((id_at(0), id_at(8)), (-1, -1));
    assert!(reply.body[16..].iter().all(|&b| b == 7));
    f.alive();
}

/// A network device's requests: offered when the backend offers them, handed to it with the
/// payload decoded (the MAC address, the MTU).
#[test]
fn send_rarp_and_net_set_mtu_reach_a_backend_that_offers_them() {
    let net = ProtocolFeatures::RARP | ProtocolFeatures::MTU;
    let mut f = Fixture::with(FEATURES, protocol() | net);
    let offered =
        ProtocolFeatures::from_bits_retain(ack(&f.ask(FrontendRequest::GetProtocolFeatures)));
    assert!(offered.contains(net));
    f.negotiate(protocol() | net);
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    f.ok(FrontendRequest::SendRarp(MacAddr(mac)));
    f.ok(FrontendRequest::NetSetMtu(U64(9000)));
    // Wider than the config space's 16-bit `mtu`: refused before the backend sees it.
    assert_refused(&f.ask(FrontendRequest::NetSetMtu(U64(0x1_0000))));
    let rec = lock(&f.rec);
    assert_eq!(
        (rec.rarps.as_slice(), rec.mtus.as_slice()),
        (&[mac][..], &[9000][..])
    );
}

/// "The back-end must respond with zero in case the specified MTU is valid, or non-zero
/// otherwise": the backend's error is the failure reply, and the connection goes on.
#[test]
fn send_rarp_and_net_set_mtu_refused_by_the_backend_are_failure_replies() {
    let net = ProtocolFeatures::RARP | ProtocolFeatures::MTU;
    let mut f = Fixture::with(FEATURES, protocol() | net);
    f.negotiate(protocol() | net);
    lock(&f.rec).fail = true;
    assert_refused(&f.ask(FrontendRequest::SendRarp(MacAddr([2; 6]))));
    assert_refused(&f.ask(FrontendRequest::NetSetMtu(U64(1500))));
    lock(&f.rec).fail = false;
    f.alive();
}

#[test]
fn gpu_set_socket_is_handed_to_the_backend() {
    let mut f = Fixture::negotiated();
    let (ours, theirs) = UnixStream::pair().unwrap();
    f.ok(FrontendRequest::GpuSetSocket { fd: ours.into() });
    let socket = lock(&f.rec).gpu_socket.take().unwrap();
    // The backend's end is connected to the frontend's.
    let mut socket = UnixStream::from(socket);
    socket.write_all(b"gpu").unwrap();
    let mut buf = [0; 3];
    (&theirs).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"gpu");
}

#[test]
fn gpu_set_socket_refused_by_the_backend_is_a_failure_reply() {
    let mut f = Fixture::negotiated();
    lock(&f.rec).fail = true;
    let (ours, _theirs) = UnixStream::pair().unwrap();
    assert_refused(&f.ask(FrontendRequest::GpuSetSocket { fd: ours.into() }));
}

#[cfg(not(feature = "postcopy"))]
#[test]
fn postcopy_requests_without_the_feature_are_refused() {
    let mut f = Fixture::negotiated();
    assert_refused(&f.ask(FrontendRequest::PostcopyListen));
    assert_refused(&f.ask(FrontendRequest::PostcopyEnd));
    let outcome = f.ask(FrontendRequest::PostcopyAdvise);
    assert!(!outcome.close && outcome.reply.unwrap().fds.is_empty());
}

// ------------------------------------------------------------------ postcopy

#[cfg(feature = "postcopy")]
mod postcopy {
    use super::*;

    #[test]
    fn postcopy_advise_returns_a_userfaultfd() {
        let mut f = Fixture::negotiated();
        let outcome = f.ask(FrontendRequest::PostcopyAdvise);
        assert!(!outcome.close);
        let reply = outcome.reply.unwrap();
        // Creating a userfaultfd must work on the test machine (root, /dev/userfaultfd):
        // a failure here is a failure, not a reason to skip.
        assert_eq!(
            reply.fds.len(),
            1,
            "POSTCOPY_ADVISE returned no userfaultfd"
        );
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&reply.fds[0])
        ))
        .unwrap();
        assert!(link.to_string_lossy().contains("userfaultfd"), "{link:?}");
    }

    #[test]
    fn postcopy_listen_before_advise_is_refused() {
        let mut f = Fixture::negotiated();
        assert_refused(&f.ask(FrontendRequest::PostcopyListen));
    }

    /// LISTEN must leave guest memory registered with the userfaultfd, but a region mapped
    /// before it was never registered, and QEMU never learned its local base to resolve
    /// faults: refused, as libvhost-user refuses it, rather than let the device read pages
    /// that have not arrived yet.
    #[test]
    fn postcopy_listen_with_memory_already_mapped_is_refused() {
        let mut f = Fixture::negotiated();
        f.ok(mem_table(&[(0, MEM_SIZE)]));
        let _uffd = f.ask(FrontendRequest::PostcopyAdvise).reply.unwrap().fds;
        assert_refused(&f.ask(FrontendRequest::PostcopyListen));
        let outcome = f.send(mem_table(&[(0, MEM_SIZE)]), HeaderFlags::empty());
        assert!(outcome.reply.is_none() && !outcome.close);
    }

    /// Advise and listen; the test keeps the userfaultfd.
    fn listening() -> (Fixture, OwnedFd) {
        let mut f = Fixture::negotiated();
        let mut fds = f.ask(FrontendRequest::PostcopyAdvise).reply.unwrap().fds;
        assert_eq!(fds.len(), 1, "POSTCOPY_ADVISE returned no userfaultfd");
        f.ok(FrontendRequest::PostcopyListen);
        (f, fds.remove(0))
    }

    /// QEMU's acknowledgement of the table reply: SET_MEM_TABLE with a u64 0 and no fds.
    fn table_ack(flags: HeaderFlags) -> RawMessage {
        let code = FrontendReq::SetMemTable.code().0;
        raw(code, flags, 0u64.to_ne_bytes().to_vec(), Vec::new())
    }

    /// The VmFlags line of the mapping that contains `addr` in /proc/self/smaps.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) =
                        (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                    {
                        inside = (start..end).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.to_owned();
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    /// Spec: "The back-end must have mmap'd the regions but not yet accessed them", and only
    /// after QEMU's acknowledgement "may the guest start accessing the memory and generating
    /// faults". So the table is registered with the userfaultfd (VmFlags `um`), advised
    /// MADV_NOHUGEPAGE (`nh`), and answered, but reaches the device only with the
    /// acknowledgement.
    #[test]
    fn set_mem_table_while_listening_is_registered_before_it_is_published() {
        let (mut f, _uffd) = listening();
        let outcome = f.send(mem_table(&[(0, MEM_SIZE)]), HeaderFlags::empty());
        assert!(!outcome.close);
        let reply = outcome.reply.unwrap();
        let table = MemoryTable::decode_body(reply.header.request, &reply.body).unwrap();
        assert_eq!(table.regions[0].guest_phys_addr, 0);
        let local = table.regions[0].user_addr;
        let flags = vm_flags(local);
        assert!(
            flags.contains(" um"),
            "not registered for missing pages: {flags}"
        );
        assert!(
            flags.contains(" nh"),
            "not advised MADV_NOHUGEPAGE: {flags}"
        );
        assert_eq!(f.session.mem.num_regions(), 0, "published before the ack");
        assert_eq!(
            lock(&f.rec).memory_updates,
            0,
            "the device saw it before the ack"
        );
        let outcome = f.raw(table_ack(HeaderFlags::empty()));
        assert!(outcome.reply.is_none() && !outcome.close);
        assert_eq!(f.session.mem.num_regions(), 1);
        assert_eq!(lock(&f.rec).memory_updates, 1);
        let published = f
            .session
            .mem
            .memory()
            .memory()
            .get_host_address(GuestAddress(0))
            .unwrap();
        assert_eq!(published as u64, local);
        assert_eq!(ack(&f.ask(FrontendRequest::PostcopyEnd)), 0);
    }

    /// QEMU sends several ADD_MEM_REGs, reads each reply, and acknowledges them once.
    #[test]
    fn add_mem_regs_while_listening_are_published_together_on_the_ack() {
        let (mut f, _uffd) = listening();
        for gpa in [0, MEM_SIZE] {
            let outcome = f.send(
                FrontendRequest::AddMemReg {
                    region: region(gpa, MEM_SIZE),
                    fd: memfd(MEM_SIZE).into(),
                },
                HeaderFlags::empty(),
            );
            assert!(outcome.reply.is_some());
        }
        assert_eq!(f.session.mem.num_regions(), 0);
        let code = FrontendReq::AddMemReg.code().0;
        f.raw(raw(
            code,
            HeaderFlags::empty(),
            0u64.to_ne_bytes().to_vec(),
            Vec::new(),
        ));
        assert_eq!(f.session.mem.num_regions(), 2);
        assert_eq!(lock(&f.rec).memory_updates, 1);
    }

    /// QEMU sets no NEED_REPLY on the acknowledgement (hw/virtio/vhost-user.c,
    /// `vhost_user_set_mem_table_postcopy`), but a frontend that does gets a REPLY_ACK.
    #[test]
    fn postcopy_table_ack_with_need_reply_gets_a_reply_ack() {
        let (mut f, _uffd) = listening();
        let outcome = f.ask(mem_table(&[(0, MEM_SIZE)]));
        assert!(outcome.reply.unwrap().body.len() > 8);
        assert_eq!(ack(&f.raw(table_ack(HeaderFlags::NEED_REPLY))), 0);
    }

    /// With CONFIGURE_MEM_SLOTS QEMU sends the regions as ADD_MEM_REGs, reads each reply,
    /// then acknowledges the lot with an fd-less 8-byte message that keeps the last request
    /// code, ADD_MEM_REG (hw/virtio/vhost-user.c, `vhost_user_add_remove_regions`).
    #[test]
    fn postcopy_add_mem_reg_ack_is_consumed_not_refused() {
        let (mut f, _uffd) = listening();
        let outcome = f.send(
            FrontendRequest::AddMemReg {
                region: region(0, MEM_SIZE),
                fd: memfd(MEM_SIZE).into(),
            },
            HeaderFlags::empty(),
        );
        let reply = outcome.reply.unwrap();
        assert_eq!(reply.header.request, FrontendReq::AddMemReg.code());
        let code = FrontendReq::AddMemReg.code().0;
        let ack_msg = raw(
            code,
            HeaderFlags::empty(),
            0u64.to_ne_bytes().to_vec(),
            Vec::new(),
        );
        let outcome = f.raw(ack_msg);
        assert!(outcome.reply.is_none() && !outcome.close);
        assert_eq!(f.session.mem.num_regions(), 1);
        assert_eq!(ack(&f.ask(FrontendRequest::PostcopyEnd)), 0);
    }

    #[test]
    fn postcopy_end_unregisters_and_stops_listening() {
        let (mut f, _uffd) = listening();
        f.send(mem_table(&[(0, MEM_SIZE)]), HeaderFlags::empty());
        f.raw(table_ack(HeaderFlags::empty()));
        assert_eq!(ack(&f.ask(FrontendRequest::PostcopyEnd)), 0);
        // A new table is an ordinary one again: no reply of its own.
        let outcome = f.send(mem_table(&[(0, MEM_SIZE)]), HeaderFlags::empty());
        assert!(outcome.reply.is_none() && !outcome.close);
    }

    #[test]
    fn postcopy_end_before_advise_replies_a_failure() {
        let mut f = Fixture::negotiated();
        assert_refused(&f.ask(FrontendRequest::PostcopyEnd));
    }
}

// ------------------------------------------------------------------ backend shapes

/// A device written the way the reference's users write one: `&mut self`, no migration
/// bitmap, the default vring type, behind an `RwLock` in an `Arc`.
struct MutDevice {
    acked: u64,
}

impl VhostUserBackendMut for MutDevice {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        128
    }
    fn features(&self) -> u64 {
        VirtioFeatures::VERSION_1.bits()
    }
    fn acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::empty()
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn update_memory(&mut self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &mut self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn mut_backend_behind_arc_rwlock_is_served() {
    let device = Arc::new(RwLock::new(MutDevice { acked: 0 }));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let vrings = vec![VringMutex::new(mem.clone(), 128).unwrap()];
    let mut session = Session::new(device.clone(), mem, vrings);
    let mut ctl = Recorder(Shared::default());
    let (header, body) = FrontendRequest::<OwnedFd>::SetFeatures(VirtioFeatures::VERSION_1)
        .encode(HeaderFlags::NEED_REPLY);
    let outcome = session.handle(
        RawMessage {
            header,
            body,
            fds: Vec::new(),
        },
        &mut ctl,
    );
    assert_eq!(ack(&outcome), 0);
    assert_eq!(
        device.read().unwrap().acked,
        VirtioFeatures::VERSION_1.bits()
    );
    assert_eq!(session.backend().num_queues(), 1);
    // Without protocol features the ring is enabled at once.
    assert!(session.vrings()[0].is_enabled());
}

#[test]
fn mutex_backend_is_a_backend() {
    fn is_backend<T: VhostUserBackend>() {}
    is_backend::<Mutex<MutDevice>>();
    is_backend::<Arc<Mutex<MutDevice>>>();
}

#[test]
fn session_fds_are_close_on_exec() {
    let fd = new_eventfd().unwrap();
    assert!(crate::sys::is_cloexec(&fd).unwrap());
}

/// Scenarios of issue 13 (every request served as the spec says), kept together.
mod conformance;

// ------------------------------------------------------------ migration needs a logging bitmap

type PlainMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type PlainRing = VringMutex<PlainMem>;

/// A backend whose guest memory has no dirty tracking (`Bitmap = ()`) but offers the
/// logging features all the same.
struct UnloggedBackend;

impl VhostUserBackend for UnloggedBackend {
    type Bitmap = ();
    type Vring = PlainRing;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::LOG_SHMFD | ProtocolFeatures::REPLY_ACK
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn update_memory(&self, _mem: PlainMem) -> io::Result<()> {
        Ok(())
    }
    fn handle_event(&self, _: u16, _: EventSet, _: &[PlainRing], _: usize) -> io::Result<()> {
        Ok(())
    }
}

fn unlogged_session() -> Session<UnloggedBackend, PlainRing, ()> {
    let mem = PlainMem::new(GuestMemoryMmap::new());
    let vrings = vec![PlainRing::new(mem.clone(), MAX_QUEUE_SIZE as u16).unwrap()];
    Session::new(UnloggedBackend, mem, vrings)
}

fn ask_plain(
    session: &mut Session<UnloggedBackend, PlainRing, ()>,
    req: FrontendRequest,
) -> Outcome {
    let (header, body) = req.encode(HeaderFlags::NEED_REPLY);
    let fds = req
        .fds()
        .into_iter()
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect();
    session.handle(
        RawMessage { header, body, fds },
        &mut Recorder(Shared::default()),
    )
}

/// A `()` bitmap logs nothing, so a frontend must not be told it can migrate the guest: it
/// would lose every page the device wrote.
#[test]
fn a_backend_without_a_logging_bitmap_offers_no_migration() {
    let mut s = unlogged_session();
    let features = ack(&ask_plain(&mut s, FrontendRequest::GetFeatures));
    assert_eq!(features & VirtioFeatures::LOG_ALL.bits(), 0);
    assert_eq!(features, FEATURES & !VirtioFeatures::LOG_ALL.bits());
    let protocol = ack(&ask_plain(&mut s, FrontendRequest::GetProtocolFeatures));
    assert_eq!(protocol & ProtocolFeatures::LOG_SHMFD.bits(), 0);
    assert_ne!(protocol & ProtocolFeatures::REPLY_ACK.bits(), 0);
}

#[test]
fn a_backend_without_a_logging_bitmap_refuses_set_log_base_and_log_all() {
    let mut s = unlogged_session();
    // A frontend acknowledging LOG_SHMFD anyway is refused.
    assert_refused(&ask_plain(
        &mut s,
        FrontendRequest::SetProtocolFeatures(
            ProtocolFeatures::LOG_SHMFD | ProtocolFeatures::REPLY_ACK,
        ),
    ));
    assert_eq!(
        ack(&ask_plain(
            &mut s,
            FrontendRequest::SetProtocolFeatures(ProtocolFeatures::REPLY_ACK)
        )),
        0
    );
    let log = FrontendRequest::SetLogBase {
        log: Log {
            mmap_size: 0x1000,
            mmap_offset: 0,
        },
        fd: memfd(0x1000).into(),
    };
    assert_refused(&ask_plain(&mut s, log));
    assert_eq!(s.mem.dirty_log().log_size(), None);
    // LOG_ALL acknowledged unoffered is dropped: logging stays off.
    assert_eq!(
        ack(&ask_plain(
            &mut s,
            FrontendRequest::SetFeatures(VirtioFeatures::from_bits_retain(FEATURES))
        )),
        0
    );
    assert!(!s.mem.dirty_log().is_logging());
}

#[test]
fn a_backend_with_a_logging_bitmap_offers_migration() {
    let mut f = Fixture::new();
    let features = ack(&f.ask(FrontendRequest::GetFeatures));
    assert_ne!(features & VirtioFeatures::LOG_ALL.bits(), 0);
    let protocol = ack(&f.ask(FrontendRequest::GetProtocolFeatures));
    assert_ne!(protocol & ProtocolFeatures::LOG_SHMFD.bits(), 0);
}

// ------------------------------------------------------------ used ring logging, log eventfd

#[cfg(not(feature = "xen"))]
/// Maps a log of `size` bytes (logging is on: FEATURES has LOG_ALL) and a log eventfd;
/// returns both.
fn map_log(f: &mut Fixture, size: u64) -> (File, File) {
    let log = memfd(size);
    let outcome = f.send(
        FrontendRequest::SetLogBase {
            log: Log {
                mmap_size: size,
                mmap_offset: 0,
            },
            fd: log.try_clone().unwrap().into(),
        },
        HeaderFlags::empty(),
    );
    assert_empty_reply(&outcome);
    let notify = new_eventfd().unwrap();
    f.ok(FrontendRequest::SetLogFd {
        fd: notify.try_clone().unwrap().into(),
    });
    (log, notify)
}

#[cfg(not(feature = "xen"))]
fn log_bit(log: &File, page: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut byte = [0u8];
    log.read_exact_at(&mut byte, page / 8).unwrap();
    byte[0] & (1 << (page % 8)) != 0
}

/// "When logging modifications to the used ring (when `VHOST_VRING_F_LOG` is set for this
/// ring), `log_guest_addr` should be used to calculate the log offset": the used ring is at
/// guest 0x2000, the frontend asked for its writes to be logged at 0x8000 (page 8).
#[cfg(not(feature = "xen"))]
#[test]
fn stopping_a_logged_ring_marks_its_used_ring_at_log_guest_addr_and_signals_the_log_fd() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    let (log, notify) = map_log(&mut f, 0x1000);
    f.ok(FrontendRequest::SetVringAddr(ring_addr(
        0,
        VringAddrFlags::LOG,
    )));
    assert!(!log_bit(&log, 8));
    f.ask(FrontendRequest::GetVringBase(VringState {
        index: 0,
        num: 0,
    }));
    assert!(
        log_bit(&log, 8),
        "the used ring was not logged at log_guest_addr"
    );
    assert_eq!(counter(&notify), 1, "the log eventfd was not signalled");
}

#[cfg(not(feature = "xen"))]
#[test]
fn stopping_a_ring_without_the_log_flag_marks_nothing() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    let (log, notify) = map_log(&mut f, 0x1000);
    f.ask(FrontendRequest::GetVringBase(VringState {
        index: 0,
        num: 0,
    }));
    assert!(!log_bit(&log, 8));
    assert_eq!(counter(&notify), 0);
}

/// "The bit offset of the last byte of the ring must fall within the size supplied by
/// `VhostUserLog`."
#[cfg(not(feature = "xen"))]
#[test]
fn set_vring_addr_logging_the_used_ring_past_the_log_is_refused() {
    let mut f = Fixture::negotiated();
    f.start_queue(0);
    // 32 bytes of log cover guest 0..1 MiB; a ring logged at 1 MiB is past it.
    map_log(&mut f, 32);
    let mut addr = ring_addr(0, VringAddrFlags::LOG);
    addr.log = MEM_SIZE;
    assert_refused(&f.ask(FrontendRequest::SetVringAddr(addr)));
    assert_eq!(f.vring(0).log_used(), None);
    addr.log = MEM_SIZE - 0x1000;
    f.ok(FrontendRequest::SetVringAddr(addr));
}
