//! Moving packets between virtqueues and the host: reading a frame out of a TX chain, and
//! placing one into RX chains (one, or several with `VIRTIO_NET_F_MRG_RXBUF`).
//!
//! Every buffer shape a driver may post is taken: the header split anywhere across
//! descriptors, zero-length descriptors, chains longer than the packet, indirect tables (the
//! chain walks follow them). A chain that cannot be a packet (a TX chain with a writable
//! descriptor or shorter than the header, an RX chain with a readable descriptor, an address
//! outside guest memory) is an error on that chain alone: it is completed with length 0 and
//! counted, and the queue goes on.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use vu_backend::prelude::*;
use vu_backend::virtio_queue::desc::split::Descriptor;
use vu_backend::vm_memory::Address;
use vu_backend::vu_vring::{Buffers, Chain, Filler};

use crate::virtio_net::{HDR_LEN, HDR_NUM_BUFFERS, MAX_FRAME};

/// Why a chain is not a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// A TX chain holds a device-writable descriptor, or an RX chain a device-readable one.
    WrongDirection,
    /// A TX chain is shorter than the virtio-net header.
    ShortHeader { len: usize },
    /// A TX chain's frame is larger than any frame the device passes.
    TooLong { len: usize },
    /// An RX buffer cannot hold the header that must start it (mergeable buffers).
    NoRoomForHeader { room: usize },
    /// A descriptor points outside guest memory.
    BadAddress { addr: u64 },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::WrongDirection => write!(f, "descriptor of the wrong direction"),
            ChainError::ShortHeader { len } => write!(f, "{len} bytes, shorter than the header"),
            ChainError::TooLong { len } => write!(f, "frame of {len} bytes is too long"),
            ChainError::NoRoomForHeader { room } => {
                write!(f, "buffer of {room} bytes cannot hold the header")
            }
            ChainError::BadAddress { addr } => write!(f, "address {addr:#x} not in guest memory"),
        }
    }
}

/// What one queue pair has done, for the log line written when the device stops and for
/// tests. Counters only grow, and only the thread holding the pair's lock writes them
/// ([`Counters::add`]); any thread may read them.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Frames the driver sent, and their bytes (without the header).
    pub(crate) tx_packets: AtomicU64,
    pub(crate) tx_bytes: AtomicU64,
    /// TX chains that were not packets.
    pub(crate) tx_errors: AtomicU64,
    /// Frames the host side refused (a full tap, or a full RX backlog in loopback).
    pub(crate) tx_dropped: AtomicU64,
    /// Frames placed in RX buffers, and their bytes.
    pub(crate) rx_packets: AtomicU64,
    pub(crate) rx_bytes: AtomicU64,
    /// RX chains that could not take a packet.
    pub(crate) rx_errors: AtomicU64,
    /// Frames dropped because no buffer (set) the driver posts can hold them.
    pub(crate) rx_too_big: AtomicU64,
}

impl Counters {
    /// Adds `n` to `counter`. Only the thread holding the pair's lock writes its counters,
    /// so this is a plain load and store: a locked add per packet (four of them) made the
    /// CPU wait at each for the packet's stores into guest memory to complete.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// One line: `tx P packets (B bytes, E errors, D dropped), rx ...`.
    pub(crate) fn summary(&self) -> String {
        let get = Self::get;
        format!(
            "tx {} packets ({} bytes, {} bad chains, {} dropped), rx {} packets ({} bytes, \
             {} bad chains, {} too big)",
            get(&self.tx_packets),
            get(&self.tx_bytes),
            get(&self.tx_errors),
            get(&self.tx_dropped),
            get(&self.rx_packets),
            get(&self.rx_bytes),
            get(&self.rx_errors),
            get(&self.rx_too_big),
        )
    }
}

/// A packet on its way: a [`HDR_LEN`]-byte virtio-net header followed by the frame.
pub(crate) type Packet = Vec<u8>;

/// Packets waiting for RX buffers, at most `capacity` of them, and spent packet buffers for
/// reuse (so that the steady state allocates nothing).
#[derive(Debug)]
pub(crate) struct Backlog {
    packets: VecDeque<Packet>,
    capacity: usize,
    spare: Vec<Packet>,
}

impl Backlog {
    /// An empty backlog holding at most `capacity` packets.
    pub(crate) fn new(capacity: usize) -> Self {
        Backlog {
            packets: VecDeque::with_capacity(capacity),
            capacity,
            spare: Vec::new(),
        }
    }

    /// Whether another packet would be refused.
    pub(crate) fn is_full(&self) -> bool {
        self.packets.len() >= self.capacity
    }

    /// How many packets wait.
    pub(crate) fn len(&self) -> usize {
        self.packets.len()
    }

    /// Queues `packet`; gives it back when the backlog is full.
    pub(crate) fn push(&mut self, packet: Packet) -> Result<(), Packet> {
        if self.is_full() {
            return Err(packet);
        }
        self.packets.push_back(packet);
        Ok(())
    }

    /// The oldest waiting packet.
    pub(crate) fn front_mut(&mut self) -> Option<&mut Packet> {
        self.packets.front_mut()
    }

    /// Takes the oldest waiting packet.
    pub(crate) fn pop_front(&mut self) -> Option<Packet> {
        self.packets.pop_front()
    }

    /// An empty packet buffer, reused if one is spare.
    pub(crate) fn buffer(&mut self) -> Packet {
        self.spare.pop().unwrap_or_default()
    }

    /// Keeps `packet`'s allocation for a later [`buffer`](Self::buffer).
    pub(crate) fn recycle(&mut self, mut packet: Packet) {
        if self.spare.len() < self.capacity {
            packet.clear();
            self.spare.push(packet);
        }
    }

    /// Drops every waiting packet (a device reset).
    pub(crate) fn clear(&mut self) {
        while let Some(packet) = self.packets.pop_front() {
            self.recycle(packet);
        }
    }
}

/// Reads the packet of TX chain `chain` into `packet` (emptied first): the `hdr_len`-byte
/// header the driver wrote becomes the first bytes of a [`HDR_LEN`]-byte header (the rest
/// zero), then the frame. The header may be split anywhere across descriptors, and
/// zero-length descriptors are skipped.
pub(crate) fn read_tx<G: GuestMemory>(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &G,
    hdr_len: usize,
    packet: &mut Packet,
) -> Result<(), ChainError> {
    packet.clear();
    packet.resize(HDR_LEN, 0);
    // Bytes of the chain seen so far; the first `hdr_len` are the header.
    let mut seen = 0usize;
    for desc in descriptors {
        if desc.is_write_only() {
            return Err(ChainError::WrongDirection);
        }
        let len = desc.len() as usize;
        let total = seen.saturating_add(len);
        if total > hdr_len + MAX_FRAME {
            return Err(ChainError::TooLong {
                len: total - hdr_len.min(total),
            });
        }
        // The part of this descriptor that belongs to the header, then to the frame.
        let in_header = hdr_len.saturating_sub(seen).min(len);
        let bad = |_| ChainError::BadAddress {
            addr: desc.addr().raw_value(),
        };
        if in_header > 0 {
            mem.read_slice(&mut packet[seen..seen + in_header], desc.addr())
                .map_err(bad)?;
        }
        let rest = len - in_header;
        if rest > 0 {
            let at = desc
                .addr()
                .checked_add(in_header as u64)
                .ok_or(ChainError::BadAddress {
                    addr: desc.addr().raw_value(),
                })?;
            let start = packet.len();
            packet.resize(start + rest, 0);
            mem.read_slice(&mut packet[start..], at).map_err(bad)?;
        }
        seen = total;
    }
    if seen < hdr_len {
        return Err(ChainError::ShortHeader { len: seen });
    }
    Ok(())
}

/// How RX buffers are used, from the negotiated features.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RxMode {
    /// Bytes of header the driver expects before each frame (10 or 12).
    pub(crate) hdr_len: usize,
    /// `VIRTIO_NET_F_MRG_RXBUF`: a packet may span chains, counted in `num_buffers`.
    pub(crate) mergeable: bool,
}

/// What [`deliver`] (or [`reflect`]) did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The packet is in the fill pass's completions, in this many chains.
    Placed(usize),
    /// Not enough buffers are available now: nothing was consumed; try again after the
    /// driver's next RX kick.
    NoBuffers,
    /// No buffer (set) the driver posts can hold it: the packet is dropped, the buffers
    /// stay available.
    TooBig,
    /// The packet could not be copied (its TX chain points outside guest memory): the RX
    /// buffers stay available.
    Failed,
}

/// Takes RX room for a packet of `total` bytes (header included) from the fill pass `rx`
/// and has `write` fill it (given the room and its `num_buffers`; `false` when it could
/// not, which gives the room back); completes the chains the packet filled.
///
/// Without mergeable buffers one chain must hold the whole packet; a chain too small for it
/// stays available (for a smaller one) and the packet is dropped. With them, the packet
/// fills chains in order; a first chain that cannot hold the header is completed empty and
/// counted. When the available chains do not suffice, nothing is consumed. Chains that
/// cannot take data at all are completed empty by the framework (after the packet's, so
/// that a packet's chains stay consecutive in the used ring) and counted by the caller
/// ([`Filler::malformed`]).
fn place<M, W>(
    rx: &mut Filler<'_, '_, M>,
    total: usize,
    mode: RxMode,
    queue_size: u16,
    counters: &Counters,
    mut write: W,
) -> Delivery
where
    M: GuestAddressSpace,
    W: FnMut(&Buffers<'_, '_, '_, M>, u16) -> bool,
{
    let max_chains = if mode.mergeable {
        usize::from(queue_size)
    } else {
        1
    };
    loop {
        let Some(buffers) = rx.take(total, max_chains) else {
            return Delivery::NoBuffers;
        };
        if mode.mergeable && buffers.chain_capacity(0) < mode.hdr_len {
            // The header must start the first buffer.
            let room = buffers.chain_capacity(0);
            log::warn!("rx chain: {}", ChainError::NoRoomForHeader { room });
            Counters::add(&counters.rx_errors, 1);
            buffers.commit(0);
            continue;
        }
        if buffers.capacity() < total {
            // Dropping `buffers` gives the chains back.
            return if !mode.mergeable || buffers.chains() >= max_chains {
                Delivery::TooBig
            } else {
                Delivery::NoBuffers
            };
        }
        let chains = buffers.chains_for(total);
        if !write(&buffers, u16::try_from(chains).unwrap_or(u16::MAX)) {
            return Delivery::Failed;
        }
        buffers.commit(total);
        Counters::add(&counters.rx_packets, 1);
        Counters::add(&counters.rx_bytes, (total - mode.hdr_len) as u64);
        return Delivery::Placed(chains);
    }
}

/// Places `packet` (a [`HDR_LEN`]-byte header then the frame) into RX chains of the fill
/// pass `rx` (the framework's [`Filler`]), as [`place`] says: the header's first `hdr_len`
/// bytes (with `num_buffers` set), then the frame, written straight into the chains' guest
/// memory; the pass completes them when it ends, and the caller decides on the interrupt
/// once per pass.
pub(crate) fn deliver<M: GuestAddressSpace>(
    rx: &mut Filler<'_, '_, M>,
    packet: &mut Packet,
    mode: RxMode,
    queue_size: u16,
    counters: &Counters,
) -> Delivery {
    let total = mode.hdr_len + packet.len().saturating_sub(HDR_LEN);
    place(rx, total, mode, queue_size, counters, |room, chains| {
        if mode.hdr_len == HDR_LEN {
            packet[HDR_NUM_BUFFERS..HDR_LEN].copy_from_slice(&chains.to_le_bytes());
        }
        // The room covers `total`: both copies are whole.
        room.write_at(0, &packet[..mode.hdr_len]);
        room.write_at(mode.hdr_len, packet.get(HDR_LEN..).unwrap_or(&[]));
        true
    })
}

/// The buffers of TX chain `chain` (a header of `hdr_len` bytes, then the frame) as
/// `(address, length)` segments in `segments` (zero-length descriptors left out); returns
/// the chain's length. A chain that is not a packet is the error [`read_tx`] would give.
/// The chain is walked once: [`reflect`] copies from the segments, and a packet that finds no
/// RX room is read from them into the backlog ([`segment_descriptors`]).
pub(crate) fn tx_segments<G: GuestMemory>(
    chain: &mut Chain<'_, G>,
    hdr_len: usize,
    segments: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, ChainError> {
    segments.clear();
    let mut seen = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(ChainError::WrongDirection);
        }
        let len = desc.len() as usize;
        seen = seen.saturating_add(len);
        if seen > hdr_len + MAX_FRAME {
            return Err(ChainError::TooLong {
                len: seen - hdr_len,
            });
        }
        if len > 0 {
            segments.push((desc.addr(), len));
        }
    }
    if seen < hdr_len {
        return Err(ChainError::ShortHeader { len: seen });
    }
    Ok(seen)
}

/// The segments [`tx_segments`] found, as the device-readable descriptors [`read_tx`] reads.
pub(crate) fn segment_descriptors(
    segments: &[(GuestAddress, usize)],
) -> impl Iterator<Item = Descriptor> + '_ {
    // A segment is one descriptor's buffer: its length came from a u32.
    segments
        .iter()
        .map(|&(addr, len)| Descriptor::new(addr.raw_value(), len as u32, 0, 0))
}

/// The loopback's TX-to-RX copy with nothing in between: the packet of `seen` bytes in
/// `segments` of guest memory `mem` (found by [`tx_segments`]; its first `hdr_len` bytes are
/// the driver's header) goes straight into RX room of `rx`, behind a zeroed header (no
/// offload is offered) with its `num_buffers`. A segment outside guest memory is
/// [`ChainError::BadAddress`]; [`Delivery::NoBuffers`] and [`Delivery::TooBig`] leave the
/// packet to the caller (to queue, or to drop as [`deliver`] would).
pub(crate) fn reflect<M: GuestAddressSpace>(
    mem: &M::M,
    segments: &[(GuestAddress, usize)],
    seen: usize,
    rx: &mut Filler<'_, '_, M>,
    mode: RxMode,
    queue_size: u16,
    counters: &Counters,
) -> Result<Delivery, ChainError> {
    let hdr_len = mode.hdr_len;
    let mut bad = None;
    let delivery = place(rx, seen, mode, queue_size, counters, |room, chains| {
        let mut header = [0u8; HDR_LEN];
        header[HDR_NUM_BUFFERS..].copy_from_slice(&chains.to_le_bytes());
        room.write_at(0, &header[..hdr_len]);
        // Offset in the chain's byte stream, and in the room (the same: equal headers).
        let mut at = 0usize;
        for &(addr, len) in segments.iter() {
            let skip = hdr_len.saturating_sub(at).min(len);
            at += skip;
            let Some(from) = addr.checked_add(skip as u64) else {
                bad = Some(addr);
                return false;
            };
            // Cut from the fill pass's region window when `mem` is its snapshot.
            match room.write_guest_at(at, mem, from, len - skip) {
                Ok(n) => at += n,
                Err(_) => {
                    bad = Some(from);
                    return false;
                }
            }
        }
        true
    });
    match (delivery, bad) {
        (Delivery::Failed, Some(addr)) => Err(ChainError::BadAddress {
            addr: addr.raw_value(),
        }),
        (Delivery::Placed(chains), _) => {
            Counters::add(&counters.tx_packets, 1);
            Counters::add(&counters.tx_bytes, (seen - hdr_len) as u64);
            Ok(Delivery::Placed(chains))
        }
        (delivery, _) => Ok(delivery),
    }
}
