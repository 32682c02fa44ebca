//! rust-vmm's `vhost::vhost_user::Frontend` sends the requests it can beyond the ring setup
//! (config space, memory slots, reset, back-end channel, device state, the feature words) to
//! our daemon; each test checks what the device saw, not only the answer. Where rust-vmm
//! numbers things differently (protocol bits from 20, SET_CONFIG flags), the tests show what
//! such a peer gets (docs/conformance.md, "What a rust-vmm-numbered peer sees").

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserProtocolFeatures, VhostUserSharedMsg, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{ByteValued, GuestMemoryBackend};
use vmm_sys_util::tempdir::TempDir;
use vu_backend::{
    BackendChannel, ConfigFlags, EventSet, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    ProtocolFeatures, SharedObject, ShmemConfig, TransferDirection, TransferPhase,
    VhostUserBackend, VhostUserDaemon, VirtioFeatures, VringMutex,
};
use vu_proto::listener::Listener;
use vu_proto::message::{encode_reply, BackendRequest};
use vu_proto::payload::{MAX_SHMEM_REGIONS, U64};
use vu_proto::socket::Endpoint;
use vu_tests::device::socket_path;
use vu_tests::virtqueue::DriverMemory;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// What the device saw.
#[derive(Debug, Default)]
struct Seen {
    config: Vec<u8>,
    config_flags: Vec<ConfigFlags>,
    regions: Vec<usize>,
    resets: usize,
    channel: Option<BackendChannel>,
    state: Option<(TransferDirection, TransferPhase, File)>,
    checked: usize,
    shared: Vec<[u8; 16]>,
}

/// A device offering every protocol feature the requests below need, plus INFLIGHT_SHMFD
/// (served) and HOST_NOTIFIER (masked by the framework). Not ACCESS_PLATFORM: the framework
/// serves it now, and these requests run without an IOMMU.
#[derive(Debug, Default)]
struct Device {
    seen: Mutex<Seen>,
}

impl Device {
    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl VhostUserBackend for Device {
    type Bitmap = ();
    type Vring = VringMutex<Mem>;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES).bits()
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ
            | ProtocolFeatures::REPLY_ACK
            | ProtocolFeatures::CONFIG
            | ProtocolFeatures::CONFIGURE_MEM_SLOTS
            | ProtocolFeatures::RESET_DEVICE
            | ProtocolFeatures::BACKEND_REQ
            | ProtocolFeatures::DEVICE_STATE
            | ProtocolFeatures::SHARED_OBJECT
            | ProtocolFeatures::SHMEM
            | ProtocolFeatures::INFLIGHT_SHMFD
            | ProtocolFeatures::HOST_NOTIFIER
    }
    fn reset_device(&self) {
        self.seen().resets += 1;
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let seen = self.seen();
        let start = offset as usize;
        seen.config
            .get(start..start + size as usize)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
    fn set_config_with_flags(&self, offset: u32, buf: &[u8], flags: ConfigFlags) -> io::Result<()> {
        let mut seen = self.seen();
        let start = offset as usize;
        if seen.config.len() < start + buf.len() {
            seen.config.resize(start + buf.len(), 0);
        }
        seen.config[start..start + buf.len()].copy_from_slice(buf);
        seen.config_flags.push(flags);
        Ok(())
    }
    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.seen().regions.push(mem.memory().num_regions());
        Ok(())
    }
    fn set_backend_req_fd(&self, channel: BackendChannel) {
        self.seen().channel = Some(channel);
    }
    fn handle_event(&self, _: u16, _: EventSet, _: &[Self::Vring], _: usize) -> io::Result<()> {
        Ok(())
    }
    fn set_device_state_fd(
        &self,
        direction: TransferDirection,
        phase: TransferPhase,
        file: File,
    ) -> io::Result<Option<File>> {
        self.seen().state = Some((direction, phase, file));
        Ok(None)
    }
    fn check_device_state(&self) -> io::Result<()> {
        self.seen().checked += 1;
        Ok(())
    }
    fn get_shared_object(&self, uuid: SharedObject) -> io::Result<File> {
        self.seen().shared.push(uuid.uuid);
        File::open("/dev/null")
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

/// Waits until the daemon has handled every request sent before: GET_QUEUE_NUM is always
/// answered, and the daemon handles a connection's requests in order.
fn sync(fe: &mut Frontend) {
    assert_eq!(fe.get_queue_num().unwrap(), 2);
}

/// The daemon on a fresh socket, and rust-vmm's frontend after the feature handshake with
/// every protocol feature it was offered and knows.
struct Setup {
    device: Arc<Device>,
    fe: Frontend,
    offered: VhostUserProtocolFeatures,
    _daemon: VhostUserDaemon<Arc<Device>>,
    _dir: TempDir,
}

fn setup() -> Setup {
    let (dir, path) = socket_path();
    let device = Arc::new(Device::default());
    let mut daemon = VhostUserDaemon::new(
        "vu-rustvmm-requests".to_owned(),
        device.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    daemon
        .start_serving(Listener::bind(&path).unwrap())
        .unwrap();
    let mut fe = Frontend::connect(&path, 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let offered = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(offered).unwrap();
    Setup {
        device,
        fe,
        offered,
        _daemon: daemon,
        _dir: dir,
    }
}

#[test]
fn rust_vmm_frontend_sees_the_masked_features_missing() {
    let s = setup();
    let features = s.fe.get_features().unwrap();
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    // Served since inflight tracking exists, so offered as the device asks.
    assert!(s
        .offered
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    assert!(!s.offered.contains(VhostUserProtocolFeatures::HOST_NOTIFIER));
    assert!(s.offered.contains(VhostUserProtocolFeatures::CONFIG));
}

/// Our SHMEM is bit 20 (QEMU), which rust-vmm reads as its GET_VRING_BASE_INFLIGHT; its
/// SHMEM (22) is never offered, so its frontend cannot ask for the shared memory config.
#[test]
fn rust_vmm_frontend_reads_our_shmem_bit_as_get_vring_base_inflight() {
    let mut s = setup();
    assert!(s
        .offered
        .contains(VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT));
    assert!(!s.offered.contains(VhostUserProtocolFeatures::SHMEM));
    assert!(s.fe.get_shmem_config().is_err());
}

#[test]
fn rust_vmm_frontend_gets_the_queue_number() {
    let mut s = setup();
    assert_eq!(s.fe.get_queue_num().unwrap(), 2);
}

/// rust-vmm's `WRITABLE` (1) is QEMU's live-migration value and reaches the device as such;
/// its `LIVE_MIGRATION` (2) is read as live migration too.
#[test]
fn rust_vmm_frontend_config_writes_reach_the_device_with_their_flags() {
    let mut s = setup();
    s.fe.set_config(4, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
        .unwrap();
    s.fe.set_config(8, VhostUserConfigFlags::LIVE_MIGRATION, &[9])
        .unwrap();
    let (_, bytes) =
        s.fe.get_config(4, 5, VhostUserConfigFlags::WRITABLE, &[0; 5])
            .unwrap();
    assert_eq!(bytes, [1, 2, 3, 4, 9]);
    let seen = s.device.seen();
    assert_eq!(
        seen.config_flags,
        [
            ConfigFlags::LIVE_MIGRATION,
            ConfigFlags::LIVE_MIGRATION_RUST_VMM
        ]
    );
    assert!(seen.config_flags.iter().all(|f| f.is_live_migration()));
}

#[test]
fn rust_vmm_frontend_adds_and_removes_a_memory_slot() {
    let mut s = setup();
    assert!(s.fe.get_max_mem_slots().unwrap() >= 8);
    let memory = DriverMemory::new(1 << 20);
    let region = memory.region();
    let info = VhostUserMemoryRegionInfo {
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.memory_size,
        userspace_addr: region.user_addr,
        mmap_offset: 0,
        mmap_handle: memory.fd().as_raw_fd(),
    };
    s.fe.add_mem_region(&info).unwrap();
    s.fe.remove_mem_region(&info).unwrap();
    sync(&mut s.fe);
    assert_eq!(s.device.seen().regions, [1, 0]);
}

#[test]
fn rust_vmm_frontend_resets_the_device() {
    let mut s = setup();
    s.fe.reset_device().unwrap();
    // The connection goes on: the protocol features survive a reset.
    sync(&mut s.fe);
    assert_eq!(s.device.seen().resets, 1);
}

/// The device's channel reaches the other end of the socket rust-vmm handed over, with the
/// features rust-vmm acknowledged (REPLY_ACK: the request waits for the answer).
#[test]
fn rust_vmm_frontend_hands_over_the_backend_channel() {
    let mut s = setup();
    let (ours, theirs) = UnixStream::pair().unwrap();
    s.fe.set_backend_request_fd(&ours).unwrap();
    sync(&mut s.fe);
    let channel = s.device.seen().channel.take().unwrap();
    assert!(channel
        .acked()
        .contains(ProtocolFeatures::CONFIG | ProtocolFeatures::REPLY_ACK));
    let frontend = Endpoint::from_fd(OwnedFd::from(theirs)).unwrap();
    let answer = std::thread::spawn(move || {
        let raw = frontend.recv_message().unwrap();
        let header = raw.header;
        let request = BackendRequest::decode(raw).unwrap();
        let (h, b) = encode_reply(&header, &U64(0));
        frontend.send_message(&h, &b, &[]).unwrap();
        (header.needs_reply(), request)
    });
    channel.config_change_msg().unwrap();
    let (needed_reply, request) = answer.join().unwrap();
    assert!(needed_reply);
    assert!(matches!(request, BackendRequest::ConfigChangeMsg));
}

#[test]
fn rust_vmm_frontend_transfers_device_state() {
    let s = setup();
    let (read, _write) = pipe();
    let own =
        s.fe.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            read,
        )
        .unwrap();
    assert!(own.is_none());
    s.fe.check_device_state().unwrap();
    let seen = s.device.seen();
    let (direction, phase, _) = seen.state.as_ref().unwrap();
    assert_eq!(
        (*direction, *phase),
        (TransferDirection::Save, TransferPhase::Stopped)
    );
    assert_eq!(seen.checked, 1);
}

/// The UUID's bytes reach the device as sent, and the device's fd reaches rust-vmm.
#[test]
fn rust_vmm_frontend_gets_a_shared_object_from_the_device() {
    let mut s = setup();
    let bytes: [u8; 16] = std::array::from_fn(|i| i as u8);
    let msg = *VhostUserSharedMsg::from_slice(&bytes).unwrap();
    let file = s.fe.get_shared_object(&msg).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &file.metadata().unwrap().file_type()
    ));
    assert_eq!(s.device.seen().shared, [bytes]);
}

#[allow(unsafe_code)] // pipe2(2): std's pipe is newer than the workspace's rust-version.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut ends = [0; 2];
    // SAFETY: `ends` is a valid two-int out-pointer.
    let rc = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    // SAFETY: both fds were just returned by pipe2 and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) }
}
