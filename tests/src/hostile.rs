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
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
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
/// Byte 0 picks the queue size (a power of two up to 256) and whether EVENT_IDX is on; then
/// come `16 * size` bytes of descriptor table, the available index (u16), `size` ring entries
/// (u16 each), and the rest is written from [`BLK_DATA`] on (request headers, data, indirect
/// tables).
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
