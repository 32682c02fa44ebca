//! The fuzz target body for the receive path ([`fill_queue`]): a device filling hostile
//! chains through vu-vring's fill pass ([`VringData::fill_available`]), as vu_net's RX does.
//! Shared by the cargo-fuzz target `fill_queue` (`tests/fuzz`) and the stable replay of its
//! committed corpus (`tests/tests/fuzz_corpus.rs`); [`fill_queue_input`] builds inputs.
//!
//! The ring (split or packed) lies in guest memory made of three regions with a boundary and
//! a hole (the layout of [`blk_queue`](crate::hostile::blk_queue)); the input also says what
//! the device asks for: a list of takes, each with the bytes it wants, the most chains it
//! gathers and how much of the room it then writes and commits (or whether it drops the
//! room, giving the chains back). The body must never panic or hang, and checks what the
//! fill pass promises: a take's room is the sum of its chains' room, a commit completes at
//! most the chains taken, the used ring holds exactly the chains the passes completed (split),
//! a pass where every take was dropped completed only chains that could take nothing (used
//! length 0), and the device's positions stay inside the ring (packed).
//!
//! # Input format
//!
//! ```text
//! control   u8: bits 0-3 the queue size's log2 (mod 9), bit 6 packed, bit 7 EVENT_IDX
//! takes     u8 n, then n times 4 bytes: bytes wanted (u16 LE), most chains (u8),
//!           action (u8: 0 drops the room, otherwise commits room * action / 255 bytes)
//! table     16 * size bytes: the descriptor table (split) or ring (packed)
//! avail     split only: the available index (u16 LE) and `size` entries (u16 LE each)
//! data      the rest, written at 0x4000 (indirect tables; buffers point anywhere)
//! ```

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vu_vring::{VringData, VringMutex, VringT};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Guest memory: 0-64 KiB and 64-128 KiB (adjacent in the guest, separate in the host), a
/// hole, then 192-256 KiB.
const REGIONS: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x10000), (0x30000, 0x10000)];
/// The descriptor table (split) or ring (packed).
pub const FILL_DESC: u64 = 0x0;
/// The available ring (split) or driver area (packed).
pub const FILL_AVAIL: u64 = 0x1000;
/// The used ring (split) or device area (packed).
pub const FILL_USED: u64 = 0x2000;
/// Where the input's data lands.
pub const FILL_DATA: u64 = 0x4000;
/// Fill passes per input: the second sees the ring after the first completed or gave back.
const PASSES: usize = 2;

/// One take of the device: bytes wanted, most chains, and what it does with the room.
#[derive(Debug, Clone, Copy)]
pub struct Take {
    /// Bytes the device asks room for.
    pub bytes: u16,
    /// The most chains gathered.
    pub max_chains: u8,
    /// 0: drop the room (give the chains back); otherwise write and commit
    /// `room * action / 255` bytes.
    pub action: u8,
}

/// Runs `takes` in one fill pass; returns how many chains it completed and whether every
/// take dropped its room.
fn pass(data: &mut VringData<Mem>, takes: &[Take]) -> (usize, bool) {
    let mem = data.mem().memory();
    let mut all_dropped = true;
    let result = data.fill_available(&mem, |rx| {
        for take in takes {
            let Some(room) = rx.take(usize::from(take.bytes), usize::from(take.max_chains)) else {
                break;
            };
            let chains = room.chains();
            let sum: usize = (0..chains).map(|i| room.chain_capacity(i)).sum();
            assert_eq!(sum, room.capacity(), "room is not the sum of its chains");
            assert!(chains >= 1, "a take with no chain");
            if take.action == 0 {
                continue; // dropped: given back
            }
            all_dropped = false;
            let written = room.capacity() * usize::from(take.action) / 255;
            let pattern = vec![0x5a; written.min(0x10000)];
            let copied = room.write_at(0, &pattern);
            assert_eq!(copied, pattern.len(), "room that does not take its bytes");
            let used = room.commit(written);
            assert!((1..=chains).contains(&used), "{used} chains of {chains}");
        }
        rx.completed()
    });
    (result.unwrap_or(0), all_dropped)
}

/// The fuzz body; see the module documentation for the input format. Returns how many
/// chains the passes completed (so that a test can tell a seed reaches the ring).
pub fn fill_queue(data: &[u8]) -> usize {
    let Some((&control, rest)) = data.split_first() else {
        return 0;
    };
    let size = 1u16 << ((control & 0xf) % 9);
    let packed = control & 0x40 != 0;
    let Some((&n, rest)) = rest.split_first() else {
        return 0;
    };
    let (ops, rest) = rest.split_at((4 * usize::from(n)).min(rest.len()));
    let takes: Vec<Take> = ops
        .chunks_exact(4)
        .map(|op| Take {
            bytes: u16::from_le_bytes([op[0], op[1]]),
            max_chains: op[2],
            action: op[3],
        })
        .collect();
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len))
        .collect();
    let Ok(mmap) = GuestMemoryMmap::<()>::from_ranges(&ranges) else {
        return 0;
    };
    let mem: Mem = GuestMemoryAtomic::new(mmap);
    let guest = mem.memory();
    let (table, rest) = rest.split_at((16 * usize::from(size)).min(rest.len()));
    let _ = guest.write_slice(table, GuestAddress(FILL_DESC));
    let rest = if packed {
        rest
    } else {
        let (avail, rest) = rest.split_at((2 + 2 * usize::from(size)).min(rest.len()));
        let _ = guest.write_slice(avail, GuestAddress(FILL_AVAIL + 2));
        rest
    };
    let _ = guest.write_slice(&rest[..rest.len().min(0xc000)], GuestAddress(FILL_DATA));
    drop(guest);

    let Ok(vring) = VringMutex::<Mem>::new(mem.clone(), 256) else {
        return 0;
    };
    vring.set_queue_packed(packed);
    if vring.set_queue_size(size).is_err()
        || vring
            .set_queue_info(FILL_DESC, FILL_AVAIL, FILL_USED)
            .is_err()
    {
        return 0;
    }
    vring.set_queue_event_idx(control & 0x80 != 0);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let mut completed = 0;
    for _ in 0..PASSES {
        let used_before = vring.queue_next_used();
        let (done, all_dropped) = pass(&mut vring.get_mut(), &takes);
        let _ = vring.signal_used_queue_if_needed();
        completed += done;
        // A pass completes at most a ring's worth of chains.
        assert!(
            done <= usize::from(size),
            "{done} chains from a ring of {size}"
        );
        if packed {
            let avail = vring.queue_next_avail() & 0x7fff;
            let used = vring.queue_next_used() & 0x7fff;
            assert!(avail < size && used < size, "positions left the ring");
            continue;
        }
        let m = mem.memory();
        let used_idx: u16 = m.read_obj(GuestAddress(FILL_USED + 2)).unwrap_or(0);
        let published = usize::from(used_idx.wrapping_sub(used_before));
        assert_eq!(published, done, "used entries are not the chains completed");
        if all_dropped {
            for i in 0..published {
                let slot = u64::from(used_before.wrapping_add(i as u16) % size);
                let len: u32 = m
                    .read_obj(GuestAddress(FILL_USED + 4 + 8 * slot + 4))
                    .unwrap_or(0);
                assert_eq!(len, 0, "a chain given back was completed with data");
            }
        }
    }
    completed
}

/// Builds a [`fill_queue`] input: queue size `1 << size_log2`, split or packed, the takes,
/// the table's first descriptors, the available heads (split) and the data at 0x4000.
pub fn fill_queue_input(
    size_log2: u8,
    packed: bool,
    takes: &[Take],
    descs: &[[u8; 16]],
    heads: &[u16],
    data: &[u8],
) -> Vec<u8> {
    let size = 1usize << size_log2;
    let mut out = vec![size_log2 | if packed { 0x40 } else { 0 }];
    out.push(u8::try_from(takes.len()).unwrap_or(u8::MAX));
    for take in takes.iter().take(255) {
        out.extend_from_slice(&take.bytes.to_le_bytes());
        out.push(take.max_chains);
        out.push(take.action);
    }
    let mut table = vec![0u8; 16 * size];
    for (i, d) in descs.iter().enumerate().take(size) {
        table[16 * i..16 * i + 16].copy_from_slice(d);
    }
    out.extend_from_slice(&table);
    if !packed {
        let avail_idx = u16::try_from(heads.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&avail_idx.to_le_bytes());
        let mut ring = vec![0u8; 2 * size];
        for (i, h) in heads.iter().enumerate().take(size) {
            ring[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
        }
        out.extend_from_slice(&ring);
    }
    out.extend_from_slice(data);
    out
}
