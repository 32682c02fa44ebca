//! The fuzz target body for the packed-ring path ([`packed_queue`]), shared by the cargo-fuzz
//! target `packed_queue` (`tests/fuzz`) and the stable replay of its committed corpus
//! (`tests/tests/fuzz_corpus.rs`), and its input builder ([`packed_queue_input`]).
//!
//! The body lays a hostile packed ring out in guest memory made of three regions with a
//! boundary and a hole (the same layout as [`blk_queue`](crate::hostile::blk_queue)'s), sets
//! the device's positions from a hostile `SET_VRING_BASE` word, and serves the ring as vu_blk
//! does, through vu-daemon's `process_queue` with the framework's [`Chain`]: read every
//! readable descriptor, write every writable one. It must never panic, hang, or touch memory
//! outside the guest's (vm-memory's checks would make such an access an error, so the
//! assertions check the device's positions stay inside the ring).
//!
//! # Input format
//!
//! ```text
//! control      u8: bits 0-3 the queue size's log2 (mod 9), bit 7 EVENT_IDX
//! base         u32 LE: the SET_VRING_BASE word (avail position | wrap << 15, used << 16)
//! driver area  4 bytes: off_wrap, flags
//! ring         16 * size bytes: the descriptors (addr u64, len u32, id u16, flags u16)
//! data         the rest, written at 0x4000 (buffers and indirect tables)
//! ```

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vu_daemon::process::process_queue;
use vu_vring::{Chain, VringMutex, VringT};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Guest memory: 0-64 KiB and 64-128 KiB (adjacent in the guest, separate in the host), a
/// hole, then 192-256 KiB.
const REGIONS: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x10000), (0x30000, 0x10000)];
/// The descriptor ring.
pub const PACKED_RING: u64 = 0x0;
/// The driver area (driver event suppression).
pub const PACKED_DRIVER: u64 = 0x1000;
/// The device area (device event suppression).
pub const PACKED_DEVICE: u64 = 0x2000;
/// Where the input's data lands.
pub const PACKED_DATA: u64 = 0x4000;
/// The most one descriptor is copied from or to.
const MAX_COPY: usize = 64 * 1024;
/// `process_queue` calls per input (each serves at most a ring's worth of descriptors per
/// pass; a second call sees the ring after the first wrote its used descriptors).
const CALLS: usize = 3;

/// Serves a chain as a careful device: reads the readable descriptors, fills the writable
/// ones with a byte pattern (at most [`MAX_COPY`] bytes each), and returns the bytes written.
fn serve(chain: Chain<'_, GuestMemoryMmap>) -> u32 {
    let mem = chain.memory();
    let mut written = 0u32;
    let mut buf = Vec::new();
    for desc in chain {
        let len = (desc.len() as usize).min(MAX_COPY);
        buf.resize(len, 0);
        if desc.is_write_only() {
            buf.fill(0xa5);
            if mem.write_slice(&buf, desc.addr()).is_ok() {
                written = written.saturating_add(len as u32);
            }
        } else {
            let _ = mem.read_slice(&mut buf, desc.addr());
        }
    }
    written
}

/// The fuzz body; see the module documentation for the input format. Returns how many
/// chains the device completed (so that a test can tell a seed reaches the ring).
pub fn packed_queue(data: &[u8]) -> usize {
    let Some((&control, rest)) = data.split_first() else {
        return 0;
    };
    let size = 1u16 << ((control & 0xf) % 9);
    let (base, rest) = rest.split_at(4.min(rest.len()));
    let mut word = [0u8; 4];
    word[..base.len()].copy_from_slice(base);
    let base = u32::from_le_bytes(word);
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len))
        .collect();
    let Ok(mmap) = GuestMemoryMmap::<()>::from_ranges(&ranges) else {
        return 0;
    };
    let mem: Mem = GuestMemoryAtomic::new(mmap);
    let guest = mem.memory();
    let (driver, rest) = rest.split_at(4.min(rest.len()));
    let _ = guest.write_slice(driver, GuestAddress(PACKED_DRIVER));
    let (ring, rest) = rest.split_at((16 * usize::from(size)).min(rest.len()));
    let _ = guest.write_slice(ring, GuestAddress(PACKED_RING));
    let _ = guest.write_slice(&rest[..rest.len().min(0xc000)], GuestAddress(PACKED_DATA));
    drop(guest);

    let Ok(vring) = VringMutex::<Mem>::new(mem.clone(), 256) else {
        return 0;
    };
    vring.set_queue_packed(true);
    if vring.set_queue_size(size).is_err()
        || vring
            .set_queue_info(PACKED_RING, PACKED_DRIVER, PACKED_DEVICE)
            .is_err()
        || vring.set_vring_base(base).is_err()
    {
        return 0;
    }
    vring.set_queue_event_idx(control & 0x80 != 0);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let mut completed = 0usize;
    for _ in 0..CALLS {
        completed += process_queue(&vring, serve);
        let _ = vring.needs_notification();
    }
    // Every chain is at least one descriptor, and every position is a chain's head in at most
    // one lap after which the device's used flags make it unavailable for good: the device
    // cannot have served more than a ring's worth of chains per position.
    assert!(
        completed <= CALLS * usize::from(size) * (usize::from(size) + 1),
        "{completed} chains from a ring of {size}"
    );
    let avail = vring.queue_next_avail() & 0x7fff;
    let used = vring.queue_next_used() & 0x7fff;
    if completed > 0 {
        assert!(avail < size && used < size, "positions left the ring");
    }
    completed
}

/// A packed descriptor as the guest writes it: `addr`, `len`, `id`, `flags`.
pub fn packed_descriptor(addr: u64, len: u32, id: u16, flags: u16) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&addr.to_le_bytes());
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out[12..14].copy_from_slice(&id.to_le_bytes());
    out[14..].copy_from_slice(&flags.to_le_bytes());
    out
}

/// Builds a [`packed_queue`] input: queue size `1 << size_log2`, EVENT_IDX, the
/// `SET_VRING_BASE` word, the driver area, the ring's first descriptors and the data.
pub fn packed_queue_input(
    size_log2: u8,
    event_idx: bool,
    base: u32,
    driver_area: [u8; 4],
    descs: &[[u8; 16]],
    data: &[u8],
) -> Vec<u8> {
    let size = 1usize << size_log2;
    let mut out = vec![size_log2 | if event_idx { 0x80 } else { 0 }];
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(&driver_area);
    let mut ring = vec![0u8; 16 * size];
    for (i, d) in descs.iter().enumerate().take(size) {
        ring[16 * i..16 * i + 16].copy_from_slice(d);
    }
    out.extend_from_slice(&ring);
    out.extend_from_slice(data);
    out
}
