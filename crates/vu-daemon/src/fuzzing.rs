//! Fuzz target bodies for the session and the memory table, shared by the cargo-fuzz harness
//! (`tests/fuzz`) and the stable replay of its committed corpus (`tests/tests/fuzz_corpus.rs`).
//!
//! Not part of the API: hidden from the documentation and free to change. A body must never
//! panic, hang or leak on any input; the fuzzer reports a panic, a timeout or an allocation
//! beyond its limit as a crash.
//!
//! # Input format of [`session`](crate::fuzzing::session)
//!
//! A sequence of operations until the input runs out:
//!
//! ```text
//! 0x00..=0xdf  a message: code (u8), flags (u8: bit 0 NEED_REPLY, bit 1 REPLY),
//!              body length (u16 LE, cut to what is left), the body, fd count (u8, low 3 bits),
//!              then one byte per fd: 0 = a fresh eventfd, k > 0 = a fresh memfd of k pages
//! 0xe0..=0xef  the guest writes its memory: guest address (u64 LE), length (u16 LE), bytes
//!              (descriptor tables, available rings, indirect tables)
//! 0xf0..=0xf7  process every queue as a device would (pop chains, read the readable
//!              descriptors, write the writable ones, complete them)
//! 0xf8..=0xff  the frontend disconnects
//! ```
//!
//! The fds are real, so a memory table maps real memory and the rings read real guest
//! memory: the session, vu-mem and vu-vring are fuzzed together, as a frontend drives them.
//!
//! # Input format of [`memory_table`](crate::fuzzing::memory_table)
//!
//! A sequence of operations on a [`GuestMemoryManager`](vu_mem::GuestMemoryManager): `0` set a
//! table of up to 4 regions, `1` add a region, `2` remove a region, `3` translate a VMM address,
//! `4` map a log, `5` access guest memory through the published table; a region is `gpa`, `size`,
//! `vmm`, `offset` (u64 LE each, the size cut to 16 pages) and a file length in pages (u8).
//!
//! # Input format of [`iotlb`](crate::fuzzing::iotlb)
//!
//! A sequence of 32-byte `struct vhost_iotlb_msg` bodies, decoded as `IOTLB_MSG` decodes them
//! (undecodable ones are skipped, as the session refuses them) and applied to an IOTLB of
//! [`IOTLB_FUZZ_ENTRIES`](crate::fuzzing::IOTLB_FUZZ_ENTRIES) entries: an update or an invalidation as the session applies it, a
//! miss or access-fail message as a device access of `size` bytes at `iova` with its
//! permissions. After each, the table's invariants are checked (a panic is a finding).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vu_mem::{GuestMemoryManager, IotlbFault, IotlbMapping, LogBitmap, Permissions, RegionSpec};
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::header::{Header, HeaderFlags};
use vu_proto::message::RawMessage;
use vu_proto::payload::{Iotlb as IotlbMsg, IotlbPerm, IotlbType, Payload};
use vu_proto::request::{FrontendReq, RequestCode};
use vu_vring::{VringMutex, VringT};

use crate::backend::VhostUserBackend;
use crate::control::RingControl;
use crate::session::Session;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<LogBitmap>>;
type Ring = VringMutex<Mem>;

/// Queues of the fuzzed device.
const NUM_QUEUES: usize = 2;
/// Largest ring the fuzzed device accepts.
const MAX_QUEUE_SIZE: u16 = 256;
/// Page size of the memfds the fuzzer asks for.
const PAGE: u64 = 4096;
/// The most bytes one descriptor is read or written for, so that a 4 GiB length costs
/// nothing but still reaches the memory checks at both of its ends.
const MAX_COPY: u64 = 64 * 1024;

/// First operation byte that means "the guest writes memory".
const OP_GUEST_WRITE: u8 = 0xe0;
/// First operation byte that means "process the queues".
const OP_PROCESS: u8 = 0xf0;
/// First operation byte that means "disconnect".
const OP_DISCONNECT: u8 = 0xf8;

/// A device offering everything the session serves, with a config space and no behaviour of
/// its own: what is fuzzed is the session and the memory it maps.
struct FuzzBackend;

impl VhostUserBackend for FuzzBackend {
    type Bitmap = LogBitmap;
    type Vring = Ring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }
    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }
    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1
            | VirtioFeatures::PROTOCOL_FEATURES
            | VirtioFeatures::RING_EVENT_IDX
            | VirtioFeatures::RING_INDIRECT_DESC
            | VirtioFeatures::LOG_ALL)
            .bits()
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ
            | ProtocolFeatures::LOG_SHMFD
            | ProtocolFeatures::REPLY_ACK
            | ProtocolFeatures::CONFIG
            | ProtocolFeatures::INFLIGHT_SHMFD
            | ProtocolFeatures::RESET_DEVICE
            | ProtocolFeatures::CONFIGURE_MEM_SLOTS
            | ProtocolFeatures::STATUS
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = [0x5au8; 64];
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
        config
            .get(start..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        Ok(())
    }
    fn handle_event(&self, _: u16, _: EventSet, _: &[Ring], _: usize) -> io::Result<()> {
        Ok(())
    }
}

/// The runtime seam with no threads behind it.
struct NoThreads;

impl RingControl for NoThreads {
    fn watch_kick(&mut self, _queue: u16) -> io::Result<()> {
        Ok(())
    }
    fn unwatch_kick(&mut self, _queue: u16) -> io::Result<()> {
        Ok(())
    }
    fn quiesce(&mut self, _queue: u16) -> io::Result<()> {
        Ok(())
    }
    fn dispatch_now(&mut self, _queue: u16) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the fuzzer's bytes front to back; running out ends the input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u64(&mut self) -> Option<u64> {
        let bytes = self.bytes(8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
    /// `n` bytes, or all that is left if fewer.
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.is_empty() && n > 0 {
            return None;
        }
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        Some(taken)
    }
}

/// A fresh memfd of `size` bytes (`None` if the kernel refuses one).
fn memfd(size: u64) -> Option<File> {
    crate::sys::memfd(c"vu-fuzz", size, false).ok()
}

/// The fds of one message, as described by its fd bytes.
fn message_fds(input: &mut Input<'_>) -> Option<Vec<OwnedFd>> {
    let count = input.u8()? & 0x07;
    let mut fds = Vec::new();
    for _ in 0..count {
        let kind = input.u8()?;
        let fd = if kind == 0 {
            OwnedFd::from(crate::sys::eventfd(true).ok()?)
        } else {
            OwnedFd::from(memfd(u64::from(kind) * PAGE)?)
        };
        fds.push(fd);
    }
    Some(fds)
}

/// One message of a [`session`] input.
fn message(input: &mut Input<'_>) -> Option<RawMessage> {
    let code = input.u8()?;
    let flag_bits = input.u8()?;
    let len = input.u16()?;
    let body = input.bytes(usize::from(len))?.to_vec();
    let fds = message_fds(input)?;
    let mut flags = HeaderFlags::empty();
    if flag_bits & 1 != 0 {
        flags |= HeaderFlags::NEED_REPLY;
    }
    if flag_bits & 2 != 0 {
        flags |= HeaderFlags::REPLY;
    }
    let size = u32::try_from(body.len()).ok()?;
    let header = Header::new(RequestCode(u32::from(code)), flags, size);
    Some(RawMessage { header, body, fds })
}

/// Serves every available chain of `vring` with the framework's
/// [`process_queue`](crate::process::process_queue), as a device does, copying up to
/// `MAX_COPY` bytes per descriptor. Returns how many chains it completed.
fn process_queue(vring: &Ring) -> u64 {
    let mut scratch = vec![0u8; MAX_COPY as usize];
    let served = crate::process::process_queue(vring, |chain| {
        let mem = chain.memory();
        let mut written = 0u32;
        for desc in chain {
            let len = u64::from(desc.len()).min(MAX_COPY);
            let buf = &mut scratch[..len as usize];
            if desc.is_write_only() {
                if mem.write_slice(buf, desc.addr()).is_ok() {
                    written = written.saturating_add(desc.len());
                }
            } else {
                let _ = mem.read_slice(buf, desc.addr());
            }
        }
        written
    });
    served as u64
}

/// Runs a [`session`] input and returns how many descriptor chains the queues completed
/// (so that seed tests can tell an input that reaches the rings from one that does not). See
/// the module documentation for the format.
pub fn session(data: &[u8]) -> u64 {
    let mut served = 0;
    let mem = Mem::new(GuestMemoryMmap::new());
    let vrings: Vec<Ring> = (0..NUM_QUEUES)
        .filter_map(|_| Ring::new(mem.clone(), MAX_QUEUE_SIZE).ok())
        .collect();
    // The guest's view: the session publishes every table it maps into this shared handle.
    let guest = mem.clone();
    let mut session = Session::new(FuzzBackend, mem, vrings);
    let mut ctl = NoThreads;
    let mut input = Input(data);
    while let Some(op) = input.u8() {
        match op {
            ..OP_GUEST_WRITE => {
                let Some(msg) = message(&mut input) else {
                    break;
                };
                // Whatever the reply, the runtime would send it and carry on or close.
                let outcome = session.handle(msg, &mut ctl);
                if outcome.close {
                    session.disconnect(&mut ctl);
                }
            }
            OP_GUEST_WRITE..OP_PROCESS => {
                let (Some(gpa), Some(len)) = (input.u64(), input.u16()) else {
                    break;
                };
                let Some(bytes) = input.bytes(usize::from(len)) else {
                    break;
                };
                let _ = guest.memory().write_slice(bytes, GuestAddress(gpa));
            }
            OP_PROCESS..OP_DISCONNECT => {
                served += session.vrings().iter().map(process_queue).sum::<u64>()
            }
            OP_DISCONNECT.. => session.disconnect(&mut ctl),
        }
    }
    session.disconnect(&mut ctl);
    served
}

/// Encodes one message operation of a [`session`] input (for writing seeds). `fds` holds one
/// byte per fd: 0 for an eventfd, k for a memfd of k pages.
pub fn session_message(code: u32, need_reply: bool, body: &[u8], fds: &[u8]) -> Vec<u8> {
    let mut out = vec![
        0,
        u8::try_from(code).unwrap_or(u8::MAX),
        u8::from(need_reply),
    ];
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(body);
    out.push(u8::try_from(fds.len()).unwrap_or(0) & 0x07);
    out.extend_from_slice(fds);
    out
}

/// Encodes a guest memory write operation of a [`session`] input (for writing seeds).
pub fn session_guest_write(gpa: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![OP_GUEST_WRITE];
    out.extend_from_slice(&gpa.to_le_bytes());
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// The [`session`] operation that processes every queue.
pub const SESSION_PROCESS: u8 = OP_PROCESS;
/// The [`session`] operation that disconnects the frontend.
pub const SESSION_DISCONNECT: u8 = OP_DISCONNECT;

/// One region of a [`memory_table`] input.
fn region(input: &mut Input<'_>) -> Option<RegionSpec> {
    let gpa = input.u64()?;
    let size = input.u64()? % (16 * PAGE + 1);
    let vmm = input.u64()?;
    let offset = input.u64()?;
    let file = memfd(u64::from(input.u8()?) * PAGE)?;
    Some(RegionSpec::new(gpa, size, vmm, offset, file))
}

/// Runs a [`memory_table`] input. See the module documentation for the format.
pub fn memory_table(data: &[u8]) {
    let mem = Mem::new(GuestMemoryMmap::new());
    let mut manager = GuestMemoryManager::<LogBitmap>::new(mem.clone());
    let mut input = Input(data);
    while let Some(op) = input.u8() {
        match op % 6 {
            0 => {
                let count = input.u8().unwrap_or(0) % 5;
                let specs: Option<Vec<RegionSpec>> =
                    (0..count).map(|_| region(&mut input)).collect();
                let Some(specs) = specs else { break };
                let _ = manager.set_table(specs);
            }
            1 => {
                let Some(spec) = region(&mut input) else {
                    break;
                };
                let _ = manager.add_region(spec);
            }
            2 => {
                let (Some(gpa), Some(size), Some(vmm)) = (input.u64(), input.u64(), input.u64())
                else {
                    break;
                };
                let _ = manager.remove_region(gpa, size, vmm);
            }
            3 => {
                let (Some(vmm), Some(len)) = (input.u64(), input.u64()) else {
                    break;
                };
                let _ = manager.vmm_to_guest(vmm, len);
            }
            4 => {
                let (Some(pages), Some(size), Some(offset)) =
                    (input.u8(), input.u64(), input.u64())
                else {
                    break;
                };
                let Some(file) = memfd(u64::from(pages) * PAGE) else {
                    break;
                };
                let _ = manager.set_log_base(&file, size, offset);
                let _ = manager.set_logging(pages % 2 == 0);
            }
            _ => {
                let (Some(gpa), Some(len)) = (input.u64(), input.u16()) else {
                    break;
                };
                let mut buf = vec![0u8; usize::from(len)];
                let guest = mem.memory();
                if guest.read_slice(&mut buf, GuestAddress(gpa)).is_ok() {
                    let _ = guest.write_slice(&buf, GuestAddress(gpa));
                    let _ = manager.mark_dirty(GuestAddress(gpa), u64::from(len));
                }
            }
        }
    }
    manager.reset();
}

/// Entries the IOTLB of the [`iotlb`] body keeps: small, so floods reach eviction.
pub const IOTLB_FUZZ_ENTRIES: usize = 16;

/// Fuzz body: `IOTLB_MSG` payloads against the device IOTLB (see the module documentation
/// for the input format). Returns how many messages the IOTLB accepted.
pub fn iotlb(data: &[u8]) -> usize {
    let mut tlb = vu_mem::Iotlb::with_limit(IOTLB_FUZZ_ENTRIES);
    let code = FrontendReq::IotlbMsg.code();
    let mut accepted = 0;
    for raw in data.chunks(IotlbMsg::SIZE) {
        let Ok(msg) = IotlbMsg::decode_body(code, raw) else {
            continue;
        };
        let perm = match msg.perm {
            IotlbPerm::None => Permissions::No,
            IotlbPerm::Read => Permissions::Read,
            IotlbPerm::Write => Permissions::Write,
            IotlbPerm::ReadWrite => Permissions::ReadWrite,
        };
        match msg.kind {
            IotlbType::Update => {
                if tlb.update(msg.iova, msg.size, msg.uaddr, perm).is_ok() {
                    accepted += 1;
                    // The newest entry maps exactly what the update said.
                    assert_eq!(
                        tlb.lookup(msg.iova, msg.size, Permissions::No),
                        Ok(IotlbMapping {
                            iova: msg.iova,
                            addr: msg.uaddr,
                            len: msg.size,
                        })
                    );
                }
            }
            IotlbType::Invalidate => {
                if tlb.invalidate(msg.iova, msg.size).is_ok() {
                    accepted += 1;
                    assert_eq!(
                        tlb.lookup(msg.iova, 0, Permissions::No),
                        Err(IotlbFault::Miss { iova: msg.iova })
                    );
                }
            }
            IotlbType::Miss | IotlbType::AccessFail => {
                if let Ok(pieces) = tlb.translate(msg.iova, msg.size, perm) {
                    // Contiguous in IOVA, covering exactly the access.
                    let mut at = msg.iova;
                    let mut total = 0u64;
                    for piece in &pieces {
                        assert_eq!(piece.iova, at);
                        at = at.wrapping_add(piece.len);
                        total = total.wrapping_add(piece.len);
                    }
                    assert_eq!(total, msg.size);
                }
            }
        }
        assert!(tlb.len() <= IOTLB_FUZZ_ENTRIES);
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_survives_empty_and_truncated_inputs() {
        session(&[]);
        session(&[0]);
        session(&[0, 1, 1, 0xff, 0xff]);
        session(&[SESSION_PROCESS, SESSION_DISCONNECT]);
    }

    #[test]
    fn session_message_encodes_what_session_reads() {
        let op = session_message(3, true, &[], &[]);
        let mut input = Input(&op[1..]);
        let msg = message(&mut input).unwrap();
        assert_eq!(msg.header.request, RequestCode(3));
        assert!(msg.header.needs_reply());
        assert!(input.0.is_empty());
    }

    #[test]
    fn memory_table_survives_empty_and_truncated_inputs() {
        memory_table(&[]);
        memory_table(&[0, 1, 0]);
        memory_table(&[5; 40]);
    }
}
