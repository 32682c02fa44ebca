//! The packet path against every buffer shape a driver may post, on rings laid out by hand
//! in memory (so that indirect tables, zero-length descriptors and bad addresses can be
//! written as they are), and the device's loopback with its RX backlog.

use vu_backend::prelude::*;
use vu_backend::virtio_queue::desc::split::Descriptor;

use crate::io::Loopback;
use crate::packet::{deliver, read_tx, Counters, Delivery, Packet, RxMode};
use crate::virtio_net::{F_MRG_RXBUF, HDR_LEN};
use crate::NetBackend;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const MEM_SIZE: u64 = 0x10_0000;
const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Indirect tables are written here.
const INDIRECT: u64 = 0x4000;
/// Data buffers start here, 0x1000 apart.
const DATA: u64 = 0x1_0000;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT_F: u16 = 4;

/// A split ring driven by hand: descriptors are written where the test says.
struct Ring {
    mem: Mem,
    vring: VringMutex<Mem>,
    /// Where the ring's structures and tables start in `mem` (see [`Ring::in_memory`]).
    base: u64,
    avail: u16,
    used: u16,
}

/// Guest memory for one or more rings.
fn guest_memory() -> Mem {
    GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
    )
}

impl Ring {
    /// A ring in guest memory of its own.
    fn new() -> Ring {
        Ring::in_memory(guest_memory(), 0)
    }

    /// A ring in `mem` whose table, available and used rings (and the tables [`desc`]
    /// writes) are `base` bytes further than [`DESC`], [`AVAIL`], [`USED`] say: two rings in
    /// the same guest memory, as a device's queues are.
    ///
    /// [`desc`]: Ring::desc
    fn in_memory(mem: Mem, base: u64) -> Ring {
        let vring = VringMutex::<Mem>::new(mem.clone(), 256).unwrap();
        vring.set_queue_size(SIZE).unwrap();
        vring
            .set_queue_info(base + DESC, base + AVAIL, base + USED)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Ring {
            mem,
            vring,
            base,
            avail: 0,
            used: 0,
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut bytes, GuestAddress(addr))
            .unwrap();
        bytes
    }

    /// Writes descriptor `index` of the table at `table`.
    fn desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = Descriptor::new(addr, len, flags, next);
        self.mem
            .memory()
            .write_obj(
                desc,
                GuestAddress(self.base + table + 16 * u64::from(index)),
            )
            .unwrap();
    }

    /// Makes the chain starting at descriptor `head` available.
    fn offer(&mut self, head: u16) {
        let m = self.mem.memory();
        let slot = u64::from(self.avail % SIZE);
        m.write_obj(head.to_le(), GuestAddress(self.base + AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        m.write_obj(self.avail.to_le(), GuestAddress(self.base + AVAIL + 2))
            .unwrap();
    }

    /// The used entries written since the last call: `(head, len)`.
    fn take_used(&mut self) -> Vec<(u16, u32)> {
        let m = self.mem.memory();
        let idx = u16::from_le(m.read_obj(GuestAddress(self.base + USED + 2)).unwrap());
        let mut out = Vec::new();
        while self.used != idx {
            let at = self.base + USED + 4 + 8 * u64::from(self.used % SIZE);
            let id = u32::from_le(m.read_obj(GuestAddress(at)).unwrap());
            let len = u32::from_le(m.read_obj(GuestAddress(at + 4)).unwrap());
            out.push((u16::try_from(id).unwrap(), len));
            self.used = self.used.wrapping_add(1);
        }
        out
    }

    fn next_avail(&self) -> u16 {
        self.vring.queue_next_avail()
    }
}

fn data(n: u64) -> u64 {
    DATA + 0x1000 * n
}

/// A frame of `len` bytes whose bytes say where they are.
fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// A header the driver might write (every byte distinct, `num_buffers` zero).
fn driver_header() -> [u8; HDR_LEN] {
    [1, 4, 0x36, 0, 0x5a, 0x05, 0x22, 0, 0x10, 0, 0, 0]
}

/// A packet as the device holds it: a zeroed header and the frame.
fn packet(frame: &[u8]) -> Packet {
    let mut packet = vec![0u8; HDR_LEN];
    packet.extend_from_slice(frame);
    packet
}

/// Serves every TX chain of `ring` and returns what each one gave.
fn serve_tx(ring: &Ring) -> Vec<Result<Packet, String>> {
    let mut out = Vec::new();
    process_queue(&ring.vring, |chain| {
        let mem = chain.memory();
        let mut packet = Vec::new();
        out.push(
            read_tx(chain, mem, HDR_LEN, &mut packet)
                .map(|()| packet)
                .map_err(|err| err.to_string()),
        );
        0
    });
    out
}

/// Delivers `packet` in a fill pass of its own (its completions published as the pass ends).
fn placed(ring: &Ring, packet: &mut Packet, mode: RxMode, counters: &Counters) -> Delivery {
    let mut guard = ring.vring.get_mut();
    let mem = guard.mem().memory();
    guard
        .fill_available(&mem, |rx| {
            let delivery = deliver(rx, packet, mode, SIZE, counters);
            Counters::add(&counters.rx_errors, rx.malformed() as u64);
            delivery
        })
        .unwrap()
}

const PLAIN: RxMode = RxMode {
    hdr_len: HDR_LEN,
    mergeable: false,
};
const MERGEABLE: RxMode = RxMode {
    hdr_len: HDR_LEN,
    mergeable: true,
};

#[test]
fn tx_header_split_across_descriptors_with_a_zero_length_one_is_reassembled() {
    let mut ring = Ring::new();
    let hdr = driver_header();
    let body = frame(300);
    // 5 header bytes | 7 header bytes and 3 frame bytes | nothing | the rest of the frame.
    ring.write(data(0), &hdr[..5]);
    let mut second = hdr[5..].to_vec();
    second.extend_from_slice(&body[..3]);
    ring.write(data(1), &second);
    ring.write(data(3), &body[3..]);
    ring.desc(DESC, 0, data(0), 5, NEXT, 1);
    ring.desc(DESC, 1, data(1), 10, NEXT, 2);
    ring.desc(DESC, 2, data(2), 0, NEXT, 3);
    ring.desc(DESC, 3, data(3), 297, 0, 0);
    ring.offer(0);
    let got = serve_tx(&ring);
    let mut want = hdr.to_vec();
    want.extend_from_slice(&body);
    assert_eq!(got, vec![Ok(want)]);
    assert_eq!(ring.take_used(), vec![(0, 0)]);
}

#[test]
fn tx_chain_in_an_indirect_table_is_read() {
    let mut ring = Ring::new();
    let hdr = driver_header();
    let body = frame(64);
    ring.write(data(0), &hdr);
    ring.write(data(1), &body);
    ring.desc(INDIRECT, 0, data(0), HDR_LEN as u32, NEXT, 1);
    ring.desc(INDIRECT, 1, data(1), 64, 0, 0);
    ring.desc(DESC, 0, INDIRECT, 32, INDIRECT_F, 0);
    ring.offer(0);
    let mut want = hdr.to_vec();
    want.extend_from_slice(&body);
    assert_eq!(serve_tx(&ring), vec![Ok(want)]);
}

#[test]
fn tx_writable_or_short_chain_fails_alone_and_the_queue_goes_on() {
    let mut ring = Ring::new();
    ring.write(data(0), &driver_header());
    // A writable descriptor in a TX chain.
    ring.desc(DESC, 0, data(0), HDR_LEN as u32, WRITE, 0);
    // Fewer bytes than the header.
    ring.desc(DESC, 1, data(0), 7, 0, 0);
    // A bad address.
    ring.desc(DESC, 2, MEM_SIZE + 0x1000, 100, 0, 0);
    // A good packet after them.
    ring.desc(DESC, 3, data(0), 20, 0, 0);
    for head in 0..4 {
        ring.offer(head);
    }
    let got = serve_tx(&ring);
    assert_eq!(got.len(), 4);
    assert!(got[0].as_ref().unwrap_err().contains("wrong direction"));
    assert!(got[1]
        .as_ref()
        .unwrap_err()
        .contains("shorter than the header"));
    assert!(got[2].as_ref().unwrap_err().contains("not in guest memory"));
    assert_eq!(got[3].as_ref().unwrap().len(), 20);
    // Every chain went back to the driver.
    assert_eq!(ring.take_used().len(), 4);
}

#[test]
fn rx_chain_longer_than_the_packet_gets_header_and_frame() {
    let mut ring = Ring::new();
    ring.desc(DESC, 0, data(0), 2048, WRITE, 0);
    ring.offer(0);
    let body = frame(100);
    let counters = Counters::default();
    let mut pkt = packet(&body);
    assert_eq!(
        placed(&ring, &mut pkt, PLAIN, &counters),
        Delivery::Placed(1)
    );
    assert_eq!(ring.take_used(), vec![(0, 112)]);
    let got = ring.read(data(0), 112);
    assert_eq!(&got[..10], &[0u8; 10]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes());
    assert_eq!(&got[12..], &body[..]);
    assert_eq!(Counters::get(&counters.rx_packets), 1);
}

#[test]
fn rx_header_split_across_descriptors_and_an_indirect_table() {
    let mut ring = Ring::new();
    // Indirect: 4 bytes | nothing | 8 bytes | 1000 bytes, all writable.
    ring.desc(INDIRECT, 0, data(0), 4, WRITE | NEXT, 1);
    ring.desc(INDIRECT, 1, data(1), 0, WRITE | NEXT, 2);
    ring.desc(INDIRECT, 2, data(2), 8, WRITE | NEXT, 3);
    ring.desc(INDIRECT, 3, data(3), 1000, WRITE, 0);
    ring.desc(DESC, 5, INDIRECT, 64, INDIRECT_F, 0);
    ring.offer(5);
    let body = frame(500);
    let mut pkt = packet(&body);
    let counters = Counters::default();
    assert_eq!(
        placed(&ring, &mut pkt, PLAIN, &counters),
        Delivery::Placed(1)
    );
    assert_eq!(ring.take_used(), vec![(5, 512)]);
    let mut header = ring.read(data(0), 4);
    header.extend(ring.read(data(2), 8));
    assert_eq!(&header[10..12], &1u16.to_le_bytes());
    assert_eq!(ring.read(data(3), 500), body);
}

#[test]
fn rx_mergeable_packet_spans_chains_and_says_how_many() {
    let mut ring = Ring::new();
    for i in 0..4u16 {
        ring.desc(DESC, i, data(u64::from(i)), 64, WRITE, 0);
        ring.offer(i);
    }
    let body = frame(150);
    let mut pkt = packet(&body);
    let counters = Counters::default();
    assert_eq!(
        placed(&ring, &mut pkt, MERGEABLE, &counters),
        Delivery::Placed(3)
    );
    // 162 bytes: 64 + 64 + 34, in consecutive used entries; the fourth chain stays.
    assert_eq!(ring.take_used(), vec![(0, 64), (1, 64), (2, 34)]);
    assert_eq!(ring.next_avail(), 3);
    let mut stream = ring.read(data(0), 64);
    stream.extend(ring.read(data(1), 64));
    stream.extend(ring.read(data(2), 34));
    assert_eq!(&stream[10..12], &3u16.to_le_bytes());
    assert_eq!(&stream[12..], &body[..]);
}

#[test]
fn rx_not_enough_buffers_consumes_nothing_and_is_retried() {
    let mut ring = Ring::new();
    ring.desc(DESC, 0, data(0), 64, WRITE, 0);
    ring.offer(0);
    let body = frame(150);
    let mut pkt = packet(&body);
    let counters = Counters::default();
    assert_eq!(
        placed(&ring, &mut pkt, MERGEABLE, &counters),
        Delivery::NoBuffers
    );
    assert_eq!(ring.next_avail(), 0);
    assert!(ring.take_used().is_empty());
    // More buffers: the same packet now goes in.
    for i in 1..3u16 {
        ring.desc(DESC, i, data(u64::from(i)), 64, WRITE, 0);
        ring.offer(i);
    }
    assert_eq!(
        placed(&ring, &mut pkt, MERGEABLE, &counters),
        Delivery::Placed(3)
    );
    assert_eq!(ring.take_used().len(), 3);
}

#[test]
fn rx_buffer_too_small_without_merging_drops_the_packet_and_keeps_the_buffer() {
    let mut ring = Ring::new();
    ring.desc(DESC, 0, data(0), 50, WRITE, 0);
    ring.offer(0);
    let counters = Counters::default();
    let mut big = packet(&frame(100));
    assert_eq!(placed(&ring, &mut big, PLAIN, &counters), Delivery::TooBig);
    assert_eq!(ring.next_avail(), 0);
    assert!(ring.take_used().is_empty());
    let mut small = packet(&frame(30));
    assert_eq!(
        placed(&ring, &mut small, PLAIN, &counters),
        Delivery::Placed(1)
    );
    assert_eq!(ring.take_used(), vec![(0, 42)]);
}

#[test]
fn rx_packet_larger_than_the_whole_ring_is_dropped() {
    let mut ring = Ring::new();
    for i in 0..SIZE {
        ring.desc(DESC, i, data(u64::from(i)), 16, WRITE, 0);
        ring.offer(i);
    }
    let counters = Counters::default();
    let mut pkt = packet(&frame(1000));
    assert_eq!(
        placed(&ring, &mut pkt, MERGEABLE, &counters),
        Delivery::TooBig
    );
    assert_eq!(ring.next_avail(), 0);
}

#[test]
fn rx_broken_chains_are_completed_empty_and_the_packet_takes_the_next() {
    let mut ring = Ring::new();
    // A readable descriptor in an RX chain; then a buffer too small for the header
    // (mergeable); then a good one.
    ring.desc(DESC, 0, data(0), 64, 0, 0);
    ring.desc(DESC, 1, data(1), 8, WRITE, 0);
    ring.desc(DESC, 2, data(2), 256, WRITE, 0);
    for head in 0..3 {
        ring.offer(head);
    }
    let counters = Counters::default();
    let mut pkt = packet(&frame(60));
    assert_eq!(
        placed(&ring, &mut pkt, MERGEABLE, &counters),
        Delivery::Placed(1)
    );
    // Both broken chains came before the packet's: they are completed before it.
    assert_eq!(ring.take_used(), vec![(0, 0), (1, 0), (2, 72)]);
    assert_eq!(Counters::get(&counters.rx_errors), 2);
}

#[test]
fn rx_broken_chain_among_a_packets_chains_is_completed_after_them() {
    let mut ring = Ring::new();
    ring.desc(DESC, 0, data(0), 64, WRITE, 0);
    ring.desc(DESC, 1, data(1), 64, 0, 0);
    ring.desc(DESC, 2, data(2), 64, WRITE, 0);
    for head in 0..3 {
        ring.offer(head);
    }
    let counters = Counters::default();
    let mut pkt = packet(&frame(100));
    assert_eq!(
        placed(&ring, &mut pkt, MERGEABLE, &counters),
        Delivery::Placed(2)
    );
    // The packet's chains stay consecutive (the driver reads num_buffers entries).
    assert_eq!(ring.take_used(), vec![(0, 64), (2, 48), (1, 0)]);
    assert_eq!(&ring.read(data(0), HDR_LEN)[10..12], &2u16.to_le_bytes());
}

#[test]
fn rx_buffer_outside_guest_memory_fails_that_chain_only() {
    let mut ring = Ring::new();
    ring.desc(DESC, 0, MEM_SIZE - 16, 256, WRITE, 0);
    ring.desc(DESC, 1, data(1), 256, WRITE, 0);
    ring.offer(0);
    ring.offer(1);
    let counters = Counters::default();
    let mut pkt = packet(&frame(60));
    assert_eq!(
        placed(&ring, &mut pkt, PLAIN, &counters),
        Delivery::Placed(1)
    );
    assert_eq!(ring.take_used(), vec![(0, 0), (1, 72)]);
    assert_eq!(Counters::get(&counters.rx_errors), 1);
}

/// Deterministic pseudo-random numbers (xorshift64*) for the randomised rings below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Fills the descriptor table and an indirect table with random entries: addresses inside
/// and outside memory, lengths from 0 to past the frame limit, any flags, links in and out of
/// the table; then offers `SIZE` random heads, some past the table.
fn random_ring(rng: &mut Rng) -> (Ring, usize) {
    let mut ring = Ring::new();
    for table in [DESC, INDIRECT] {
        for i in 0..SIZE {
            let addr = match rng.below(4) {
                0 => MEM_SIZE - rng.below(0x100),
                1 => INDIRECT,
                _ => data(rng.below(16)) + rng.below(0x800),
            };
            let len = match rng.below(5) {
                0 => 0,
                1 => rng.below(16) as u32,
                2 => u32::MAX - rng.below(4) as u32,
                _ => rng.below(0x1800) as u32,
            };
            let flags = rng.below(8) as u16;
            let next = rng.below(u64::from(SIZE) + 4) as u16;
            ring.desc(table, i, addr, len, flags, next);
        }
    }
    let mut valid = 0;
    for _ in 0..SIZE {
        let head = rng.below(u64::from(SIZE) + 2) as u16;
        if head < SIZE {
            valid += 1;
        }
        ring.offer(head);
    }
    (ring, valid)
}

#[test]
fn random_tx_rings_complete_every_chain_without_panicking() {
    let mut rng = Rng(0x5eed_0001);
    for _ in 0..300 {
        let (mut ring, valid) = random_ring(&mut rng);
        let got = serve_tx(&ring);
        // Every entry with a head inside the table was served and went back to the driver;
        // the others were skipped.
        assert_eq!(got.len(), valid);
        assert_eq!(ring.take_used().len(), valid);
        assert_eq!(ring.next_avail(), SIZE);
    }
}

#[test]
fn random_rx_rings_take_packets_or_refuse_them_without_panicking() {
    let mut rng = Rng(0x5eed_0002);
    for round in 0..300 {
        let (mut ring, _) = random_ring(&mut rng);
        let mode = if round % 2 == 0 { MERGEABLE } else { PLAIN };
        let counters = Counters::default();
        let mut completed = 0;
        for _ in 0..usize::from(SIZE) {
            let mut pkt = packet(&frame(rng.below(3000) as usize));
            let before = ring.next_avail();
            // A used ring outside memory is the one error a pass returns; these rings are
            // in memory.
            let delivery = placed(&ring, &mut pkt, mode, &counters);
            let used = ring.take_used();
            completed += used.len();
            for (head, len) in &used {
                assert!(*head < SIZE);
                assert!(*len as usize <= HDR_LEN + 3000);
            }
            if delivery == Delivery::NoBuffers {
                // No packet went in: only chains that cannot take one were consumed
                // (completed empty), and entries whose head is past the table (skipped).
                assert!(used.iter().all(|&(_, len)| len == 0));
                assert!(usize::from(ring.next_avail().wrapping_sub(before)) >= used.len());
                break;
            }
        }
        // Never more completions than chains offered.
        assert!(completed <= usize::from(SIZE));
    }
}

/// A loopback device of one pair whose queues are `rx` and `tx`.
fn loopback(backlog: usize) -> NetBackend {
    let backend = NetBackend::new(1, 256, backlog, Box::new(Loopback));
    backend.acked.store(
        F_MRG_RXBUF | (1 << 32),
        std::sync::atomic::Ordering::Relaxed,
    );
    backend
}

/// Offers TX chain `i` holding a header and `frame`.
fn offer_tx(ring: &mut Ring, i: u16, body: &[u8]) {
    let mut bytes = driver_header().to_vec();
    bytes.extend_from_slice(body);
    ring.write(data(u64::from(i)), &bytes);
    ring.desc(DESC, i, data(u64::from(i)), bytes.len() as u32, 0, 0);
    ring.offer(i);
}

#[test]
fn loopback_holds_packets_until_rx_buffers_come_then_delivers_them_in_order() {
    let backend = loopback(8);
    let mut rx = Ring::new();
    let mut tx = Ring::new();
    let vrings = [rx.vring.clone(), tx.vring.clone()];
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(60 + i)).collect();
    for (i, body) in frames.iter().enumerate() {
        offer_tx(&mut tx, i as u16, body);
    }
    // The TX kick: no RX buffer yet, so the packets wait.
    backend.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(tx.take_used().len(), 3);
    assert!(rx.take_used().is_empty());
    assert_eq!(backend.pair(0).backlog.len(), 3);
    // The RX kick after the driver posts buffers.
    for i in 0..3u16 {
        rx.desc(DESC, i, data(u64::from(i)), 1024, WRITE, 0);
        rx.offer(i);
    }
    backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    let used = rx.take_used();
    assert_eq!(used.len(), 3);
    for ((head, len), body) in used.iter().zip(&frames) {
        assert_eq!(*len as usize, HDR_LEN + body.len());
        let got = rx.read(data(u64::from(*head)), *len as usize);
        // The device's header: no offload, one buffer.
        assert_eq!(&got[..HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[HDR_LEN..], &body[..]);
    }
    assert_eq!(backend.pair(0).backlog.len(), 0);
    let counters = &backend.counters[0];
    assert_eq!(Counters::get(&counters.tx_packets), 3);
    assert_eq!(Counters::get(&counters.rx_packets), 3);
}

#[test]
fn loopback_copies_tx_chains_straight_into_rx_room_and_queues_the_rest_in_order() {
    let backend = loopback(8);
    let mut rx = Ring::new();
    let mut tx = Ring::new();
    let vrings = [rx.vring.clone(), tx.vring.clone()];
    // RX room for the first packet only: two 64-byte chains (mergeable).
    for i in 0..2u16 {
        rx.desc(DESC, i, data(u64::from(i)), 64, WRITE, 0);
        rx.offer(i);
    }
    // TX: a 100-byte frame whose header is split 5 / 0 / 7 across descriptors, then two
    // more frames.
    let first = frame(100);
    let mut bytes = driver_header().to_vec();
    bytes.extend_from_slice(&first);
    tx.write(data(10), &bytes);
    tx.desc(DESC, 0, data(10), 5, NEXT, 1);
    tx.desc(DESC, 1, data(10) + 5, 0, NEXT, 2);
    tx.desc(DESC, 2, data(10) + 5, bytes.len() as u32 - 5, 0, 0);
    tx.offer(0);
    let others: Vec<Vec<u8>> = (0..2).map(|i| frame(30 + i)).collect();
    for (i, body) in others.iter().enumerate() {
        offer_tx(&mut tx, 3 + i as u16, body);
    }
    backend.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(tx.take_used().len(), 3);
    // The first packet went straight into both RX chains: a zeroed header saying 2 buffers.
    assert_eq!(rx.take_used(), vec![(0, 64), (1, 48)]);
    let mut got = rx.read(data(0), 64);
    got.extend(rx.read(data(1), 48));
    assert_eq!(&got[..HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
    assert_eq!(&got[HDR_LEN..], &first[..]);
    // The other two found no room: they wait, in order, and go at the next RX kick.
    assert_eq!(backend.pair(0).backlog.len(), 2);
    for i in 2..4u16 {
        rx.desc(DESC, i, data(u64::from(i)), 1024, WRITE, 0);
        rx.offer(i);
    }
    backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    let used = rx.take_used();
    assert_eq!(used.len(), 2);
    for ((head, len), body) in used.iter().zip(&others) {
        let got = rx.read(data(u64::from(*head)), *len as usize);
        assert_eq!(&got[HDR_LEN..], &body[..]);
    }
    let counters = &backend.counters[0];
    assert_eq!(Counters::get(&counters.tx_packets), 3);
    assert_eq!(Counters::get(&counters.rx_packets), 3);
    assert_eq!(Counters::get(&counters.tx_bytes), 100 + 30 + 31);
}

#[test]
fn loopback_tx_chain_that_is_not_a_packet_fails_alone_with_rx_room_waiting() {
    let backend = loopback(8);
    let mut rx = Ring::new();
    let mut tx = Ring::new();
    let vrings = [rx.vring.clone(), tx.vring.clone()];
    rx.desc(DESC, 0, data(0), 1024, WRITE, 0);
    rx.offer(0);
    // A writable descriptor in a TX chain, one outside guest memory, then a good one.
    tx.desc(DESC, 0, data(1), 64, WRITE, 0);
    tx.offer(0);
    tx.desc(DESC, 1, MEM_SIZE - 16, 64, 0, 0);
    tx.offer(1);
    let body = frame(50);
    offer_tx(&mut tx, 2, &body);
    backend.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(tx.take_used(), vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(rx.take_used(), vec![(0, (HDR_LEN + 50) as u32)]);
    assert_eq!(&rx.read(data(0), HDR_LEN + 50)[HDR_LEN..], &body[..]);
    let counters = &backend.counters[0];
    assert_eq!(Counters::get(&counters.tx_errors), 2);
    assert_eq!(Counters::get(&counters.rx_packets), 1);
}

#[test]
fn loopback_counts_what_a_full_backlog_drops() {
    let backend = loopback(2);
    let rx = Ring::new();
    let mut tx = Ring::new();
    let vrings = [rx.vring.clone(), tx.vring.clone()];
    for i in 0..5u16 {
        offer_tx(&mut tx, i, &frame(40));
    }
    backend.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    assert_eq!(tx.take_used().len(), 5);
    let counters = &backend.counters[0];
    assert_eq!(Counters::get(&counters.tx_packets), 5);
    assert_eq!(Counters::get(&counters.tx_dropped), 3);
    assert_eq!(backend.pair(0).backlog.len(), 2);
}

#[test]
fn config_space_has_mac_status_pairs_and_mtu() {
    let backend = NetBackend::new(2, 256, 8, Box::new(Loopback));
    let config = backend.get_config(0, 12);
    assert_eq!(&config[..6], &[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    assert_eq!(&config[6..8], &1u16.to_le_bytes());
    assert_eq!(&config[8..10], &2u16.to_le_bytes());
    assert_eq!(&config[10..12], &1500u16.to_le_bytes());
    // Past the end: zeros, never a short read.
    assert_eq!(
        backend.get_config(10, 8),
        vec![0xdc, 0x05, 0, 0, 0, 0, 0, 0]
    );
}

/// Over a real socket, through the daemon, with the facade's test kit (feature `testing`).
#[cfg(feature = "testing")]
mod over_a_socket {
    use std::time::Duration;

    use vu_backend::testing::{socket_pair, Buf, DriverMemory, SplitQueue, TestDevice};

    use super::*;
    use crate::virtio_net::{rarp_frame, CONFIG_MTU, F_MQ, F_MTU};
    use vu_backend::vu_proto::payload::{ConfigFlags, MacAddr};

    const QUEUE_SIZE: u16 = 64;

    /// A loopback `vu_net` of `pairs` queue pairs served by the daemon, and a driver that
    /// negotiated mergeable buffers (and MQ with two pairs) and started every queue.
    fn device(pairs: u16) -> (VhostUserDaemon<NetBackend>, TestDevice) {
        device_on(pairs, pairs)
    }

    /// The same with the pairs served by `threads` worker threads (`--threads`).
    fn device_on(pairs: u16, threads: u16) -> (VhostUserDaemon<NetBackend>, TestDevice) {
        device_negotiating(pairs, threads, 0, ProtocolFeatures::empty())
    }

    /// The same, the driver also negotiating the virtio bits `virtio` and the protocol
    /// features `protocol` (each must be offered).
    fn device_negotiating(
        pairs: u16,
        threads: u16,
        virtio: u64,
        protocol: ProtocolFeatures,
    ) -> (VhostUserDaemon<NetBackend>, TestDevice) {
        let mut backend = NetBackend::new(pairs, 256, 64, Box::new(Loopback));
        backend.threads = threads;
        let mut daemon = VhostUserDaemon::new(
            "vu_net".to_owned(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        let (theirs, mut frontend) = socket_pair();
        daemon.start_connection(theirs).unwrap();
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let wanted = VirtioFeatures::VERSION_1
            | VirtioFeatures::PROTOCOL_FEATURES
            | VirtioFeatures::from_bits_retain(F_MRG_RXBUF | F_MQ | virtio);
        let features = offered & wanted;
        assert!(features.contains(VirtioFeatures::from_bits_retain(F_MRG_RXBUF | virtio)));
        let offered_protocol = frontend.get_protocol_features().unwrap();
        assert!(offered_protocol.contains(protocol));
        let wanted_protocol = ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK | protocol;
        frontend
            .set_protocol_features(offered_protocol & wanted_protocol)
            .unwrap();
        frontend.set_features(features).unwrap();
        assert_eq!(frontend.get_queue_num().unwrap(), u64::from(2 * pairs));
        let memory = DriverMemory::new(8 << 20);
        frontend
            .set_mem_table(&[memory.region()], &[memory.fd()])
            .unwrap();
        let mut device = TestDevice {
            frontend,
            memory,
            queues: Vec::new(),
            features,
            protocol_negotiated: true,
        };
        for q in 0..2 * pairs {
            let queue = SplitQueue::new(&mut device.memory, q, QUEUE_SIZE);
            device.queues.push(queue);
            device.start_queue(q, 0);
            device.enable_queue(q, true);
        }
        (daemon, device)
    }

    /// A frame of `len` bytes that says which pair and which packet it is.
    fn tagged(pair: u8, seq: u8, len: usize) -> Vec<u8> {
        let mut bytes = frame(len);
        bytes[0] = pair;
        bytes[1] = seq;
        bytes
    }

    fn with_header(body: &[u8]) -> Vec<u8> {
        let mut bytes = driver_header().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn each_pair_sends_back_on_its_own_rx_queue() {
        for (pairs, threads) in [(2, 2), (2, 1), (3, 2)] {
            each_pair_on_threads(pairs, threads);
        }
    }

    /// `pairs` pairs on `threads` worker threads: every pair's packets come back on its own
    /// RX queue, in order.
    fn each_pair_on_threads(pairs: u8, threads: u16) {
        let (mut daemon, mut device) = device_on(u16::from(pairs), threads);
        assert_eq!(daemon.get_epoll_handlers().len(), usize::from(threads));
        let mut sent = Vec::new();
        for pair in 0..pairs {
            let rx = u16::from(2 * pair);
            for _ in 0..4 {
                device.queue(rx).post(&[Buf::Writable(2048)]);
            }
            device.queue(rx).kick();
            let frames: Vec<Vec<u8>> = (0..4)
                .map(|seq| tagged(pair, seq, 100 + 300 * usize::from(seq)))
                .collect();
            for body in &frames {
                device
                    .queue(rx + 1)
                    .post_and_kick(&[Buf::Readable(with_header(body))]);
            }
            sent.push(frames);
        }
        for pair in 0..pairs {
            let rx = u16::from(2 * pair);
            assert_eq!(device.queue(rx + 1).wait_used(4, WAIT).len(), 4);
            let used = device.queue(rx).wait_used(4, WAIT);
            let got: Vec<Vec<u8>> = used
                .iter()
                .map(|u| {
                    let bytes = &u.written[0][..u.len as usize];
                    assert_eq!(&bytes[10..12], &1u16.to_le_bytes());
                    bytes[HDR_LEN..].to_vec()
                })
                .collect();
            assert_eq!(
                got,
                sent[usize::from(pair)],
                "pair {pair} of {pairs} on {threads}"
            );
        }
        daemon.request_shutdown();
        daemon.wait().unwrap();
    }

    /// `SEND_RARP` from the frontend: the fake RARP for the MAC it names goes out like a
    /// frame the guest sent, which the loopback brings back on the first RX queue.
    #[test]
    fn a_rarp_the_frontend_asks_for_goes_out_on_the_first_pair() {
        let (mut daemon, mut device) = device_negotiating(1, 1, 0, ProtocolFeatures::RARP);
        let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
        device.frontend.send_rarp(MacAddr(mac)).unwrap();
        device.queue(0).post_and_kick(&[Buf::Writable(2048)]);
        let used = device.queue(0).wait_used(1, WAIT);
        let bytes = &used[0].written[0][..used[0].len as usize];
        assert_eq!(&bytes[HDR_LEN..], &rarp_frame(mac)[..]);
        daemon.request_shutdown();
        daemon.wait().unwrap();
    }

    /// `NET_SET_MTU` with `VIRTIO_NET_F_MTU` negotiated: the configuration space's `mtu`
    /// becomes it; an MTU below virtio-net's minimum is refused and changes nothing.
    #[test]
    fn the_mtu_the_frontend_sets_is_the_one_the_config_space_shows() {
        let protocol = ProtocolFeatures::MTU | ProtocolFeatures::CONFIG;
        let (mut daemon, mut device) = device_negotiating(1, 1, F_MTU, protocol);
        let mtu = |device: &mut TestDevice| {
            let config = device
                .frontend
                .get_config(CONFIG_MTU as u32, 2, ConfigFlags::empty())
                .unwrap();
            u16::from_le_bytes([config[0], config[1]])
        };
        assert_eq!(mtu(&mut device), 1500);
        device.frontend.net_set_mtu(9000).unwrap();
        assert_eq!(mtu(&mut device), 9000);
        assert!(device.frontend.net_set_mtu(67).is_err());
        assert_eq!(mtu(&mut device), 9000);
        daemon.request_shutdown();
        daemon.wait().unwrap();
    }

    #[test]
    fn a_large_packet_spans_small_mergeable_buffers() {
        let (mut daemon, mut device) = device(1);
        for _ in 0..8 {
            device.queue(0).post(&[Buf::Writable(256)]);
        }
        device.queue(0).kick();
        let body = tagged(0, 9, 1400);
        // The header split from the frame, and the frame in two pieces.
        let packet = with_header(&body);
        device.queue(1).post_and_kick(&[
            Buf::Readable(packet[..7].to_vec()),
            Buf::Readable(packet[7..500].to_vec()),
            Buf::Readable(packet[500..].to_vec()),
        ]);
        assert_eq!(device.queue(1).wait_used(1, WAIT).len(), 1);
        // 12 + 1400 bytes in 256-byte buffers: six of them.
        let used = device.queue(0).wait_used(6, WAIT);
        assert_eq!(used.len(), 6);
        let mut stream = Vec::new();
        for u in &used {
            stream.extend_from_slice(&u.written[0][..u.len as usize]);
        }
        assert_eq!(&stream[10..12], &6u16.to_le_bytes());
        assert_eq!(&stream[HDR_LEN..], &body[..]);
        daemon.request_shutdown();
        daemon.wait().unwrap();
    }
}

/// Rounds of the burst tests below: 2, or `VU_NET_ROUNDS` (docs/performance.md counts
/// their instructions per packet with callgrind over many rounds).
fn burst_rounds() -> usize {
    std::env::var("VU_NET_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// A frame of `VU_NET_FRAME` bytes (64 unless set).
fn burst_frame() -> Vec<u8> {
    let len = std::env::var("VU_NET_FRAME")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    frame(len)
}

/// One burst of `SIZE` packets around the loopback; `rx_first` posts the RX buffers before
/// the TX kick (each packet copied straight across), else after it (the packets wait in
/// the backlog until the RX kick). Checks every packet came back whole.
fn burst(backend: &NetBackend, rx: &mut Ring, tx: &mut Ring, body: &[u8], rx_first: bool) {
    let vrings = [rx.vring.clone(), tx.vring.clone()];
    let post = |rx: &mut Ring| {
        for i in 0..SIZE {
            rx.desc(DESC, i, data(u64::from(16 + i)), 2048, WRITE, 0);
            rx.offer(i);
        }
    };
    for i in 0..SIZE {
        offer_tx(tx, i, body);
    }
    if rx_first {
        post(rx);
    }
    backend.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
    if !rx_first {
        post(rx);
        backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    }
    assert_eq!(tx.take_used().len(), usize::from(SIZE));
    let used = rx.take_used();
    assert_eq!(used.len(), usize::from(SIZE));
    let (head, len) = used[usize::from(SIZE) - 1];
    assert_eq!(len as usize, HDR_LEN + body.len());
    assert_eq!(
        &rx.read(data(u64::from(16 + head)) + HDR_LEN as u64, body.len())[..],
        body
    );
}

/// A pair's RX and TX rings in one guest memory, as a frontend lays them out: the RX ring's
/// structures after the TX ring's, below the data buffers.
fn ring_pair() -> (Ring, Ring) {
    let mem = guest_memory();
    (
        Ring::in_memory(mem.clone(), 0x8000),
        Ring::in_memory(mem, 0),
    )
}

#[test]
fn loopback_bursts_with_rx_room_come_straight_back() {
    let backend = loopback(64);
    let (mut rx, mut tx) = ring_pair();
    let body = burst_frame();
    for _ in 0..burst_rounds() {
        burst(&backend, &mut rx, &mut tx, &body, true);
    }
}

#[test]
fn loopback_bursts_without_rx_room_come_back_at_the_rx_kick() {
    let backend = loopback(64);
    let (mut rx, mut tx) = ring_pair();
    let body = burst_frame();
    for _ in 0..burst_rounds() {
        burst(&backend, &mut rx, &mut tx, &body, false);
    }
}
