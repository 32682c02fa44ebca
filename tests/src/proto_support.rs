//! Support for the vu-proto socket tests: endpoints with bounded reads, memfds and
//! eventfds, and [`CodecBackend`], a small back-end built only on vu-proto's codec and
//! endpoint, used to check front-ends (ours and rust-vmm's) against it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vu_proto::message::{encode_reply, FrontendRequest};
use vu_proto::payload::{MemoryRegion, VringAddr, VringState, U64};
use vu_proto::socket::{Endpoint, SocketError};
use vu_proto::{BorrowFd, Header, Payload, ProtocolFeatures, RequestCode, VirtioFeatures};

/// How long a test waits for a message before failing instead of hanging.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected pair of endpoints whose reads time out after [`TEST_TIMEOUT`].
pub fn endpoint_pair() -> (Endpoint, Endpoint) {
    let (a, b) = Endpoint::pair().expect("socketpair");
    for end in [&a, &b] {
        end.set_read_timeout(Some(TEST_TIMEOUT))
            .expect("read timeout");
    }
    (a, b)
}

/// An anonymous memory file of `len` bytes (close-on-exec).
pub fn memfd(len: u64) -> File {
    // `SharedMemory`'s memfd (its mapping here is dropped at once); it maps at least one
    // byte, and some tests want an empty file.
    let file = vu_mem::SharedMemory::new(vm_memory::GuestAddress(0), len.max(1))
        .expect("memfd")
        .file()
        .try_clone()
        .expect("dup");
    file.set_len(len).expect("memfd size");
    file
}

/// A non-blocking eventfd.
pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// The fd of an [`EventFd`], borrowed for passing with a message.
pub fn eventfd_fd(event: &EventFd) -> BorrowedFd<'_> {
    event.borrow_fd()
}

/// Reads the counter of an eventfd given as a plain fd, or `None` if it is zero.
pub fn eventfd_count(fd: impl AsFd) -> Option<u64> {
    let mut file = File::from(fd.as_fd().try_clone_to_owned().expect("dup eventfd"));
    let mut buf = [0u8; 8];
    match file.read(&mut buf) {
        Ok(8) => Some(u64::from_ne_bytes(buf)),
        Ok(n) => panic!("short eventfd read of {n} bytes"),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

/// Adds one to an eventfd given as a plain fd.
pub fn eventfd_signal(fd: impl AsFd) {
    let mut file = File::from(fd.as_fd().try_clone_to_owned().expect("dup eventfd"));
    file.write_all(&1u64.to_ne_bytes()).expect("eventfd write");
}

/// A memory region description (without Xen fields).
pub fn region(guest_phys_addr: u64, memory_size: u64, user_addr: u64) -> MemoryRegion {
    MemoryRegion {
        guest_phys_addr,
        memory_size,
        user_addr,
        mmap_offset: 0,
    }
}

/// What a [`CodecBackend`] saw during its session.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every request code received, in order.
    pub requests: Vec<RequestCode>,
    /// The virtio features set by `SET_FEATURES`.
    pub features: Option<VirtioFeatures>,
    /// The protocol features set by `SET_PROTOCOL_FEATURES`.
    pub protocol: Option<ProtocolFeatures>,
    /// Whether `SET_OWNER` arrived.
    pub owner: bool,
    /// The regions of the last memory table, with the first byte of each read through
    /// its fd at its mmap offset.
    pub regions: Vec<(MemoryRegion, u8)>,
    /// The last `SET_VRING_NUM`.
    pub vring_num: Option<VringState>,
    /// The last `SET_VRING_ADDR`.
    pub vring_addr: Option<VringAddr>,
    /// The last `SET_VRING_BASE`.
    pub vring_base: Option<VringState>,
    /// The kick fds received, by vring index.
    pub kicks: Vec<(u8, Option<OwnedFd>)>,
    /// The call fds received, by vring index.
    pub calls: Vec<(u8, Option<OwnedFd>)>,
    /// How many requests were acknowledged with NEED_REPLY.
    pub acks: usize,
    /// The session's end: `None` on a clean disconnect.
    pub error: Option<String>,
}

/// A minimal vhost-user back-end on vu-proto's codec and endpoint: it answers the
/// handshake, memory table and vring setup, honours REPLY_ACK, and records what it saw.
#[derive(Debug)]
pub struct CodecBackend {
    /// The virtio features offered.
    pub features: VirtioFeatures,
    /// The protocol features offered.
    pub protocol: ProtocolFeatures,
    /// The base returned by `GET_VRING_BASE` (otherwise the last base set).
    pub vring_base: Option<u32>,
}

impl CodecBackend {
    /// Serves `endpoint` on a new thread until the peer disconnects or a request
    /// fails; the thread returns what it saw. For every call fd received, the thread
    /// signals it once, so the front-end can check the fd arrived.
    pub fn spawn(self, endpoint: Endpoint) -> JoinHandle<Seen> {
        std::thread::spawn(move || {
            let mut seen = Seen::default();
            if let Err(e) = self.serve(&endpoint, &mut seen) {
                seen.error = Some(e);
            }
            seen
        })
    }

    fn serve(&self, endpoint: &Endpoint, seen: &mut Seen) -> Result<(), String> {
        loop {
            let raw = match endpoint.recv_message() {
                Ok(raw) => raw,
                Err(SocketError::Disconnected) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let header = raw.header;
            seen.requests.push(header.request);
            let req = FrontendRequest::decode(raw).map_err(|e| e.to_string())?;
            self.handle(endpoint, &header, req, seen)?;
        }
    }

    fn reply<T: Payload>(endpoint: &Endpoint, header: &Header, payload: &T) -> Result<(), String> {
        let (h, b) = encode_reply(header, payload);
        endpoint
            .send_message(&h, &b, &[])
            .map_err(|e| e.to_string())
    }

    fn handle(
        &self,
        endpoint: &Endpoint,
        header: &Header,
        req: FrontendRequest,
        seen: &mut Seen,
    ) -> Result<(), String> {
        use FrontendRequest as R;
        match req {
            R::GetFeatures => return Self::reply(endpoint, header, &self.features),
            R::GetProtocolFeatures => return Self::reply(endpoint, header, &self.protocol),
            R::GetQueueNum => return Self::reply(endpoint, header, &U64(1)),
            R::GetVringBase(state) => {
                let num = self
                    .vring_base
                    .or(seen.vring_base.map(|s| s.num))
                    .unwrap_or(0);
                let reply = VringState {
                    index: state.index,
                    num,
                };
                return Self::reply(endpoint, header, &reply);
            }
            R::SetFeatures(f) => seen.features = Some(f),
            R::SetProtocolFeatures(p) => seen.protocol = Some(p),
            R::SetOwner => seen.owner = true,
            R::SetMemTable { table, fds } => {
                seen.regions.clear();
                for (region, fd) in table.regions.into_iter().zip(fds) {
                    let mut byte = [0u8; 1];
                    File::from(fd)
                        .read_exact_at(&mut byte, region.mmap_offset)
                        .map_err(|e| e.to_string())?;
                    seen.regions.push((region, byte[0]));
                }
            }
            R::SetVringNum(s) => seen.vring_num = Some(s),
            R::SetVringAddr(a) => seen.vring_addr = Some(a),
            R::SetVringBase(s) => seen.vring_base = Some(s),
            R::SetVringKick { index, fd } => seen.kicks.push((index, fd)),
            R::SetVringCall { index, fd } => {
                if let Some(fd) = &fd {
                    eventfd_signal(fd);
                }
                seen.calls.push((index, fd));
            }
            R::SetVringEnable(_) => {}
            other => return Err(format!("CodecBackend: unexpected {other:?}")),
        }
        let reply_ack = seen
            .protocol
            .is_some_and(|p| p.contains(ProtocolFeatures::REPLY_ACK));
        if header.needs_reply() && reply_ack {
            seen.acks += 1;
            Self::reply(endpoint, header, &U64::ACK_SUCCESS)?;
        }
        Ok(())
    }
}
