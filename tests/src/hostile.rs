//! A hostile frontend: raw messages over a real socket (wrong sizes, wrong fd counts, half
//! headers, stalls), memory and fd accounting, and the body of the `blk_queue` fuzz target
//! (a block device's request processing under a descriptor table the guest wrote).
//!
//! The block request parser here stands in for `vu-backend`'s `vu_blk` example, which is a
//! binary and cannot be called from a fuzz harness: it reads the same virtio-blk header
//! (type, reserved, sector) from the readable descriptors, moves data between the chain and a
//! small in-memory disk, and writes the status byte into the last writable descriptor, through
//! the same vu-vring / virtio-queue calls the example makes.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap,
};
use vu_proto::header::{Header, HeaderFlags};
use vu_proto::message::{FrontendRequest, RawMessage};
use vu_proto::payload::U64;
use vu_proto::request::FrontendReq;
use vu_proto::socket::{Endpoint, SocketError};
use vu_vring::{VringMutex, VringT};

use crate::device::DEVICE_TIMEOUT;

/// A frontend connection that sends whatever it is told to.
#[derive(Debug)]
pub struct Hostile {
    /// The socket endpoint.
    pub endpoint: Endpoint,
}

impl Hostile {
    /// Connects to the daemon at `path`, with read and write timeouts of [`DEVICE_TIMEOUT`].
    pub fn connect(path: &Path) -> Self {
        let endpoint = Endpoint::connect(path).expect("connect");
        endpoint
            .set_read_timeout(Some(DEVICE_TIMEOUT))
            .expect("read timeout");
        endpoint
            .set_write_timeout(Some(DEVICE_TIMEOUT))
            .expect("write timeout");
        Hostile { endpoint }
    }

    /// Sends a header with `code`, `flags` and `size`, then `body` (which may disagree with
    /// `size`), with `fds`.
    pub fn send_raw(
        &self,
        code: u32,
        flags: HeaderFlags,
        size: u32,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SocketError> {
        let header = Header::new(vu_proto::request::RequestCode(code), flags, size);
        let bytes = header.to_bytes();
        self.endpoint.send(&[&bytes, body], fds)
    }

    /// Sends a well-formed request with NEED_REPLY.
    pub fn ask<F: AsFd>(&self, req: &FrontendRequest<F>) -> Result<(), SocketError> {
        let (header, body) = req.encode(HeaderFlags::NEED_REPLY);
        self.endpoint.send_message(&header, &body, &req.fds())
    }

    /// Sends a well-formed request without NEED_REPLY.
    pub fn tell<F: AsFd>(&self, req: &FrontendRequest<F>) -> Result<(), SocketError> {
        let (header, body) = req.encode(HeaderFlags::empty());
        self.endpoint.send_message(&header, &body, &req.fds())
    }

    /// Receives the next message.
    pub fn recv(&self) -> Result<RawMessage, SocketError> {
        self.endpoint.recv_message()
    }

    /// Receives a `u64` reply (REPLY_ACK status or a request's own answer) to `request`.
    pub fn recv_u64(&self, request: FrontendReq) -> u64 {
        let msg = self.recv().expect("a reply");
        assert!(msg.header.is_reply(), "not a reply: {:?}", msg.header);
        assert_eq!(
            msg.header.request,
            request.into(),
            "reply to another request"
        );
        let reply: U64 = vu_proto::message::decode_reply(request, msg)
            .expect("u64 reply")
            .payload;
        reply.0
    }

    /// Receives the reply to `request` and asserts it has no payload (a reply whose spec
    /// payload is "N/A", such as `SET_LOG_BASE` with `LOG_SHMFD`).
    pub fn recv_empty(&self, request: FrontendReq) {
        let msg = self.recv().expect("a reply");
        assert!(msg.header.is_reply(), "not a reply: {:?}", msg.header);
        assert_eq!(
            msg.header.request,
            request.into(),
            "reply to another request"
        );
        assert!(
            msg.body.is_empty() && msg.fds.is_empty(),
            "a payload of {} bytes and {} fds",
            msg.body.len(),
            msg.fds.len()
        );
    }

    /// The REPLY_ACK status of a request sent with [`ask`](Self::ask): 0 is success.
    pub fn ack(&self, request: FrontendReq) -> u64 {
        self.recv_u64(request)
    }

    /// `GET_FEATURES` (a request that always has an answer): proves the daemon still serves
    /// this connection.
    pub fn get_features(&self) -> u64 {
        self.ask(&FrontendRequest::<std::os::fd::OwnedFd>::GetFeatures)
            .expect("send GET_FEATURES");
        self.recv_u64(FrontendReq::GetFeatures)
    }

    /// Whether the daemon closed this connection: the next read sees end-of-file (or a reset)
    /// within [`DEVICE_TIMEOUT`].
    pub fn is_closed_by_peer(&self) -> bool {
        let stream: &UnixStream = self.endpoint.stream();
        let mut byte = [0u8; 1];
        match (&*stream).read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// Whether the daemon has closed this connection, without waiting and without consuming
    /// anything (a peek).
    pub fn is_closed_by_peer_now(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut byte = 0u8;
        // SAFETY: a one-byte buffer that lives across the call; MSG_PEEK leaves it unread.
        let n = unsafe {
            libc::recv(
                self.endpoint.stream().as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
            || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
    }

    /// Writes raw bytes on the socket (half headers, torn bodies).
    pub fn write_bytes(&self, bytes: &[u8]) {
        let mut stream: &UnixStream = self.endpoint.stream();
        stream.write_all(bytes).expect("write");
    }
}

/// This process's resident set size in bytes, from `/proc/self/status` (`VmRSS`).
pub fn rss_bytes() -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// How much the resident set may grow over a repeated-message test: far more than noise
/// (allocator caches, thread stacks touched once), far less than a leak of thousands of
/// messages' worth of mappings or buffers.
pub const RSS_BOUND: u64 = 16 << 20;

/// How long a hostile test waits for anything before failing.
pub const HOSTILE_TIMEOUT: Duration = DEVICE_TIMEOUT;

type BlkMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The guest of the `blk_queue` target: three regions with a gap, so that ranges can cross
/// a region boundary (0x10000), fall in a hole (0x20000..0x30000) or past the end.
const BLK_REGIONS: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x10000), (0x30000, 0x10000)];
/// Ring parts of the `blk_queue` target, in guest addresses.
const BLK_DESC: u64 = 0x0;
const BLK_AVAIL: u64 = 0x1000;
const BLK_USED: u64 = 0x2000;
/// Where the rest of the input is written: request headers and data.
const BLK_DATA: u64 = 0x4000;
/// The virtio-blk request header: type (u32), reserved (u32), sector (u64).
const BLK_HEADER_LEN: usize = 16;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_GET_ID: u32 = 8;
const BLK_S_OK: u8 = 0;
const BLK_S_IOERR: u8 = 1;
/// The disk: 64 sectors.
const BLK_DISK_LEN: usize = 64 * 512;
/// The most bytes one descriptor moves, so a 4 GiB length is cheap but still checked.
const BLK_MAX_COPY: usize = 64 * 1024;

/// Serves one chain like a block device; returns the used length (0 for a malformed chain).
fn blk_request<M>(chain: &virtio_queue::DescriptorChain<M>, disk: &mut [u8]) -> u32
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let mem = chain.memory();
    let descs: Vec<_> = chain.clone().collect();
    let readable: Vec<_> = descs.iter().filter(|d| !d.is_write_only()).collect();
    let writable: Vec<_> = descs.iter().filter(|d| d.is_write_only()).collect();
    let Some(first) = readable.first() else {
        return 0;
    };
    let Some(status) = writable.last() else {
        return 0;
    };
    if (first.len() as usize) < BLK_HEADER_LEN || status.len() == 0 {
        return 0;
    }
    let mut header = [0u8; BLK_HEADER_LEN];
    if mem.read_slice(&mut header, first.addr()).is_err() {
        return 0;
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    let offset = u64::from_le_bytes(sector).checked_mul(512);
    let mut written = 0usize;
    let mut result = BLK_S_OK;
    let mut at = offset.and_then(|o| usize::try_from(o).ok());
    match kind {
        BLK_T_IN | BLK_T_GET_ID => {
            for d in &writable[..writable.len() - 1] {
                let len = (d.len() as usize).min(BLK_MAX_COPY);
                let src = at.and_then(|a| disk.get(a..a.checked_add(len)?));
                match src {
                    Some(src) if mem.write_slice(src, d.addr()).is_ok() => {
                        written += len;
                        at = at.map(|a| a + len);
                    }
                    _ => {
                        result = BLK_S_IOERR;
                        break;
                    }
                }
            }
        }
        BLK_T_OUT => {
            let mut buf = vec![0u8; BLK_MAX_COPY];
            for d in readable.iter().skip(1) {
                let len = (d.len() as usize).min(BLK_MAX_COPY);
                let dst = at.and_then(|a| disk.get_mut(a..a.checked_add(len)?));
                match dst {
                    Some(dst) if mem.read_slice(&mut buf[..len], d.addr()).is_ok() => {
                        dst.copy_from_slice(&buf[..len]);
                        at = at.map(|a| a + len);
                    }
                    _ => {
                        result = BLK_S_IOERR;
                        break;
                    }
                }
            }
        }
        _ => result = BLK_S_IOERR,
    }
    let Some(status_at) = status.addr().checked_add(u64::from(status.len()) - 1) else {
        return 0;
    };
    if mem.write_obj(result, status_at).is_err() {
        return 0;
    }
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// The body of the `blk_queue` fuzz target: the input becomes the guest's descriptor table,
/// available ring and buffers, and a block device serves whatever chains it finds.
///
/// Byte 0 picks the queue size (a power of two up to 256) and whether EVENT_IDX is on; then come
/// `16 * size` bytes of descriptor table, the available index (u16), `size` ring entries (u16
/// each), and the rest is written from guest address 0x4000 on ([`BLK_DATA_ADDR`]) (request
/// headers, data, indirect tables).
pub fn blk_queue(data: &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let size = 1u16 << (control % 9);
    let ranges: Vec<(GuestAddress, usize)> = BLK_REGIONS
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len))
        .collect();
    let Ok(mmap) = GuestMemoryMmap::<()>::from_ranges(&ranges) else {
        return;
    };
    let mem: BlkMem = GuestMemoryAtomic::new(mmap);
    let guest = mem.memory();
    let table_len = 16 * usize::from(size);
    let (table, rest) = rest.split_at(table_len.min(rest.len()));
    let _ = guest.write_slice(table, GuestAddress(BLK_DESC));
    let (avail, rest) = rest.split_at((2 + 2 * usize::from(size)).min(rest.len()));
    let _ = guest.write_slice(avail, GuestAddress(BLK_AVAIL + 2));
    let _ = guest.write_slice(&rest[..rest.len().min(0xc000)], GuestAddress(BLK_DATA));
    drop(guest);

    let Ok(vring) = VringMutex::<BlkMem>::new(mem.clone(), 256) else {
        return;
    };
    if vring.set_queue_size(size).is_err()
        || vring.set_queue_info(BLK_DESC, BLK_AVAIL, BLK_USED).is_err()
    {
        return;
    }
    vring.set_queue_event_idx(control & 0x80 != 0);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let mut disk = vec![0u8; BLK_DISK_LEN];
    // A ring's worth of chains at most per pass, and two passes (the second sees what the
    // first completed): a hostile available index cannot keep the device busy forever.
    for _ in 0..2 {
        for _ in 0..size {
            let Some(chain) = vring.pop_descriptor_chain() else {
                break;
            };
            let len = blk_request(&chain, &mut disk);
            if vring.add_used(chain.head_index(), len).is_err() {
                return;
            }
        }
        let _ = vring.signal_used_queue_if_needed();
    }
    // What the device wrote is still inside the guest, which it can read back.
    let used: Result<u16, _> = mem.memory().read_obj(GuestAddress(BLK_USED + 2));
    assert!(used.is_ok(), "the used ring is inside guest memory");
}

/// A descriptor of a split virtqueue, as the guest writes it.
pub fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&addr.to_le_bytes());
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out[12..14].copy_from_slice(&flags.to_le_bytes());
    out[14..].copy_from_slice(&next.to_le_bytes());
    out
}

/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const DESC_INDIRECT: u16 = 4;

/// Builds a `blk_queue` input: queue size `1 << size_log2`, the table, the available ring
/// (its index and entries) and the data written at 0x4000.
pub fn blk_queue_input(size_log2: u8, descs: &[[u8; 16]], heads: &[u16], data: &[u8]) -> Vec<u8> {
    let size = 1usize << size_log2;
    let mut out = vec![size_log2];
    let mut table = vec![0u8; 16 * size];
    for (i, d) in descs.iter().enumerate().take(size) {
        table[16 * i..16 * i + 16].copy_from_slice(d);
    }
    out.extend_from_slice(&table);
    let avail_idx = u16::try_from(heads.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&avail_idx.to_le_bytes());
    let mut ring = vec![0u8; 2 * size];
    for (i, h) in heads.iter().enumerate().take(size) {
        ring[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
    }
    out.extend_from_slice(&ring);
    out.extend_from_slice(data);
    out
}

/// The guest address where [`blk_queue_input`]'s data lands.
pub const BLK_DATA_ADDR: u64 = BLK_DATA;

/// The memory type of [`HostileBackend`]: with dirty-log bitmaps, so `SET_LOG_BASE` is real.
pub type LogMem = GuestMemoryAtomic<GuestMemoryMmap<vu_mem::LogBitmap>>;

/// Queues of [`HostileBackend`].
pub const HOSTILE_QUEUES: usize = 2;
/// Largest ring of [`HostileBackend`].
pub const HOSTILE_QUEUE_SIZE: usize = 256;

/// A device that offers every protocol feature the session serves (so that each request
/// reaches its checks rather than a "not negotiated" refusal) and serves its queues like a
/// careful device: a chain it cannot read or write is completed with length 0 and the
/// device carries on; it never copies more than 64 KiB for one descriptor, whatever its length.
#[derive(Debug, Default)]
pub struct HostileBackend {
    /// Chains completed, over all queues.
    pub completed: std::sync::atomic::AtomicU64,
    /// Chains completed with length 0 because guest memory refused them.
    pub refused: std::sync::atomic::AtomicU64,
    /// When set, the next `handle_event` panics (a device bug).
    pub panic: std::sync::atomic::AtomicBool,
    /// `handle_event` calls, over all queues.
    pub events: std::sync::atomic::AtomicU64,
}

/// Serves every available chain of `vring` with the framework's `process_queue` (so hostile
/// rings meet the descriptor walk devices get by default): copies the readable descriptors'
/// bytes into the writable ones (an echo), completing a chain whose memory is out of bounds
/// with 0 bytes.
pub fn serve_hostile_queue<V: VringT<LogMem>>(
    vring: &V,
    stats: &HostileBackend,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    vu_backend::process_queue(vring, |chain| {
        let mem = chain.memory();
        let mut data = Vec::new();
        let mut ok = true;
        let mut written = 0usize;
        let descs: Vec<_> = chain.collect();
        // A careful device checks every buffer against guest memory before using any.
        ok &= descs
            .iter()
            .all(|d| mem.check_range(d.addr(), d.len() as usize));
        for d in descs.iter().filter(|d| !d.is_write_only()) {
            let len = (d.len() as usize).min(BLK_MAX_COPY);
            let mut bytes = vec![0u8; len];
            ok &= mem.read_slice(&mut bytes, d.addr()).is_ok();
            data.extend_from_slice(&bytes);
        }
        for d in descs.iter().filter(|d| d.is_write_only()) {
            let take = (d.len() as usize).min(data.len() - written);
            if mem
                .write_slice(&data[written..written + take], d.addr())
                .is_err()
            {
                ok = false;
                break;
            }
            written += take;
        }
        stats.completed.fetch_add(1, Ordering::SeqCst);
        if ok {
            u32::try_from(written).unwrap_or(u32::MAX)
        } else {
            stats.refused.fetch_add(1, Ordering::SeqCst);
            0
        }
    });
    Ok(())
}

impl vu_backend::VhostUserBackend for HostileBackend {
    type Bitmap = vu_mem::LogBitmap;
    type Vring = VringMutex<LogMem>;

    fn num_queues(&self) -> usize {
        HOSTILE_QUEUES
    }
    fn max_queue_size(&self) -> usize {
        HOSTILE_QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        use vu_proto::features::VirtioFeatures;
        (VirtioFeatures::VERSION_1
            | VirtioFeatures::PROTOCOL_FEATURES
            | VirtioFeatures::RING_INDIRECT_DESC
            | VirtioFeatures::LOG_ALL)
            .bits()
    }
    fn protocol_features(&self) -> vu_proto::features::ProtocolFeatures {
        hostile_protocol()
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn update_memory(&self, _mem: LogMem) -> std::io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: vmm_sys_util::epoll::EventSet,
        vrings: &[VringMutex<LogMem>],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        self.events
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.panic.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("hostile backend told to panic on queue {device_event}");
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| std::io::Error::other(format!("no queue {device_event}")))?;
        serve_hostile_queue(vring, self)
    }
}

/// The protocol features [`HostileBackend`] offers.
pub fn hostile_protocol() -> vu_proto::features::ProtocolFeatures {
    use vu_proto::features::ProtocolFeatures as P;
    P::MQ
        | P::LOG_SHMFD
        | P::REPLY_ACK
        | P::CONFIG
        | P::INFLIGHT_SHMFD
        | P::RESET_DEVICE
        | P::CONFIGURE_MEM_SLOTS
        | P::STATUS
}

/// A daemon serving a [`HostileBackend`] on a socket in a temporary directory, frontend
/// after frontend.
#[derive(Debug)]
pub struct HostileDaemon {
    /// The daemon.
    pub daemon: vu_backend::VhostUserDaemon<std::sync::Arc<HostileBackend>>,
    /// The backend, shared with the daemon.
    pub backend: std::sync::Arc<HostileBackend>,
    /// The socket path.
    pub path: std::path::PathBuf,
    _dir: vmm_sys_util::tempdir::TempDir,
}

impl HostileDaemon {
    /// Builds the daemon with `message_timeout` and starts serving.
    pub fn serving(message_timeout: Option<Duration>) -> Self {
        let (dir, path) = crate::device::socket_path();
        let backend = std::sync::Arc::new(HostileBackend::default());
        let mut daemon = vu_backend::VhostUserDaemon::new(
            "vu-hostile".to_owned(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .expect("daemon");
        daemon.set_message_timeout(message_timeout);
        let listener = vu_proto::listener::Listener::bind(&path).expect("bind");
        daemon.start_serving(listener).expect("start_serving");
        HostileDaemon {
            daemon,
            backend,
            path,
            _dir: dir,
        }
    }

    /// Connects a hostile frontend.
    pub fn connect(&self) -> Hostile {
        Hostile::connect(&self.path)
    }

    /// Connects and negotiates every offered feature (REPLY_ACK included), `SET_OWNER` first.
    pub fn negotiated(&self) -> Hostile {
        let fe = self.connect();
        fe.negotiate();
        fe
    }

    /// Stops the daemon and waits for it, within [`HOSTILE_TIMEOUT`].
    pub fn stop(self) {
        let HostileDaemon {
            mut daemon, _dir, ..
        } = self;
        crate::daemon_support::within(HOSTILE_TIMEOUT, "stopping the daemon", move || {
            daemon.request_shutdown();
            daemon.wait().expect("the daemon stopped cleanly");
        });
    }
}

impl Hostile {
    /// `SET_OWNER`, `GET_FEATURES`, `SET_PROTOCOL_FEATURES` (all offered),
    /// `SET_FEATURES` (all offered), each acknowledged.
    pub fn negotiate(&self) {
        use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
        type R = FrontendRequest<std::os::fd::OwnedFd>;
        self.tell(&R::SetOwner).expect("SET_OWNER");
        let features = self.get_features();
        self.ask(&R::GetProtocolFeatures)
            .expect("GET_PROTOCOL_FEATURES");
        let protocol = self.recv_u64(FrontendReq::GetProtocolFeatures);
        self.ask(&R::SetProtocolFeatures(ProtocolFeatures::from_bits_retain(
            protocol,
        )))
        .expect("SET_PROTOCOL_FEATURES");
        assert_eq!(self.ack(FrontendReq::SetProtocolFeatures), 0);
        self.ask(&R::SetFeatures(VirtioFeatures::from_bits_retain(features)))
            .expect("SET_FEATURES");
        assert_eq!(self.ack(FrontendReq::SetFeatures), 0);
    }

    /// Sends `req` with NEED_REPLY and returns its REPLY_ACK status (0 is success).
    pub fn status<F: AsFd>(&self, req: &FrontendRequest<F>) -> u64 {
        self.ask(req).expect("send");
        let code = FrontendReq::try_from(req.code()).expect("a known request");
        self.ack(code)
    }

    /// Guest memory (1 MiB) in the memory table and queue 0 started on a [`RawRing`] of
    /// `size` entries in it.
    pub fn start_ring(&self, size: u16) -> (crate::virtqueue::DriverMemory, RawRing) {
        let mut memory = crate::virtqueue::DriverMemory::new(1 << 20);
        let req = FrontendRequest::SetMemTable {
            table: vu_proto::payload::MemoryTable {
                regions: vec![memory.region()],
            },
            fds: vec![memory.fd()],
        };
        assert_eq!(self.status(&req), 0);
        let ring = RawRing::new(&mut memory, size);
        ring.start(self, &memory, 0);
        (memory, ring)
    }
}

/// A ring laid out by hand in driver memory, whose descriptors the test writes raw.
#[derive(Debug)]
pub struct RawRing {
    /// Queue size.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: GuestAddress,
    /// Guest address of the available ring.
    pub avail: GuestAddress,
    /// Guest address of the used ring.
    pub used: GuestAddress,
    /// Guest address of a data area of 64 KiB.
    pub data: GuestAddress,
    /// The kick eventfd.
    pub kick: vmm_sys_util::eventfd::EventFd,
    /// The call eventfd.
    pub call: vmm_sys_util::eventfd::EventFd,
    avail_idx: u16,
}

impl RawRing {
    /// Lays out a ring of `size` entries in `memory`.
    pub fn new(memory: &mut crate::virtqueue::DriverMemory, size: u16) -> Self {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let n = u64::from(size);
        RawRing {
            size,
            desc: memory.alloc(16 * n, 16),
            avail: memory.alloc(6 + 2 * n, 2),
            used: memory.alloc(6 + 8 * n, 4),
            data: memory.alloc(0x10000, 16),
            kick: EventFd::new(EFD_NONBLOCK).expect("kick"),
            call: EventFd::new(EFD_NONBLOCK).expect("call"),
            avail_idx: 0,
        }
    }

    /// `SET_VRING_NUM`, `_ADDR`, `_BASE`, `_CALL`, `_KICK` and `_ENABLE` for queue `index`
    /// (after `GET_VRING_BASE` when restarting a ring), from the driver's available index.
    pub fn start(&self, fe: &Hostile, memory: &crate::virtqueue::DriverMemory, index: u8) {
        use vu_proto::payload::{VringAddr, VringAddrFlags, VringEnable, VringState};
        type R<'a> = FrontendRequest<BorrowedFd<'a>>;
        let i = u32::from(index);
        let ok = |req: &R<'_>| assert_eq!(fe.status(req), 0, "{:?} refused", req.code());
        ok(&R::SetVringNum(VringState {
            index: i,
            num: u32::from(self.size),
        }));
        ok(&R::SetVringAddr(VringAddr {
            index: i,
            flags: VringAddrFlags::empty(),
            descriptor: memory.user_addr(self.desc),
            used: memory.user_addr(self.used),
            available: memory.user_addr(self.avail),
            log: 0,
        }));
        // The driver's available index: every chain offered before was served.
        ok(&R::SetVringBase(VringState {
            index: i,
            num: u32::from(self.avail_idx),
        }));
        ok(&R::SetVringCall {
            index,
            fd: Some(crate::proto_support::eventfd_fd(&self.call)),
        });
        ok(&R::SetVringKick {
            index,
            fd: Some(crate::proto_support::eventfd_fd(&self.kick)),
        });
        ok(&R::SetVringEnable(VringEnable {
            index: i,
            enable: true,
        }));
    }

    /// Writes descriptor `i` of the table, raw.
    pub fn write_desc(&self, mem: &GuestMemoryMmap, i: u16, desc: [u8; 16]) {
        mem.write_slice(&desc, self.desc.unchecked_add(16 * u64::from(i)))
            .expect("descriptor inside the table");
    }

    /// Offers `head` in the available ring, publishes the index and kicks.
    pub fn offer(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot))
            .expect("avail slot");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx.to_le(), self.avail.unchecked_add(2))
            .expect("avail idx");
        self.kick.write(1).expect("kick");
    }

    /// Sets the available index to `idx` without writing entries (a driver that lies), and
    /// kicks.
    pub fn publish_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx.to_le(), self.avail.unchecked_add(2))
            .expect("avail idx");
        self.kick.write(1).expect("kick");
    }

    /// The used index the device published.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(self.used.unchecked_add(2)).expect("used idx"))
    }

    /// Used entry `i`: (id, len).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
        let id: u32 = mem.read_obj(at).expect("used id");
        let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("used len");
        (u32::from_le(id), u32::from_le(len))
    }

    /// Waits (on the call eventfd, bounded by [`HOSTILE_TIMEOUT`]) until the used index
    /// reaches `idx`; panics on timeout.
    pub fn wait_used(&self, mem: &GuestMemoryMmap, idx: u16) {
        let deadline = std::time::Instant::now() + HOSTILE_TIMEOUT;
        while self.used_idx(mem) != idx {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "used index did not reach {idx}");
            use std::os::fd::AsRawFd;
            crate::virtqueue::wait_readable(
                self.call.as_raw_fd(),
                left.min(Duration::from_millis(100)),
            );
            let _ = self.call.read();
        }
    }
}

/// Sends `bytes` with `fds` in one `sendmsg`, with no limit on the fd count (the endpoint
/// refuses to send more than a message may carry; a hostile frontend is not so polite).
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    use std::os::fd::AsRawFd;
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at a control buffer of CMSG_SPACE(fd_bytes) bytes, so the first
    // header and its data (CMSG_LEN(fd_bytes) bytes) fit in it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast(), raw.len());
    }
    // SAFETY: every pointer in `msg` refers to a live buffer of the stated length.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "sendmsg: {}",
        std::io::Error::last_os_error()
    );
}
