//! `vu_net`: a vhost-user-net device backend written on the vu framework.
//!
//! A virtio-net device with one or more RX/TX queue pairs (`VIRTIO_NET_F_MQ`), mergeable
//! receive buffers (`VIRTIO_NET_F_MRG_RXBUF`), a MAC address, the link status and an MTU in
//! the configuration space. Queue `2k` is pair `k`'s receive queue, `2k + 1` its transmit
//! queue; the control queue belongs to the frontend (QEMU and DPDK's virtio-user handle it
//! and turn its multiqueue command into `SET_VRING_ENABLE`). Packets go to one of two host
//! sides:
//!
//! - `--loopback`: what the driver sends on TX queue `k` comes back on RX queue `k`, for
//!   tests and benchmarks. No offload is offered.
//! - `--tap NAME`: a Linux tap device (created, or attached) with `IFF_VNET_HDR`, one tap
//!   queue per queue pair (`IFF_MULTI_QUEUE` with several). The virtio-net header goes to the tap with each packet, so the checksum and TSO
//!   offloads (`CSUM`, `GUEST_CSUM`, `HOST_TSO4/6`, `GUEST_TSO4/6`, `HOST_ECN`, `GUEST_ECN`)
//!   are offered and carried both ways; the guest offloads the driver takes are set on the
//!   tap with `TUNSETOFFLOAD`.
//!
//! Each TX kick is served by the framework's `process_queue`. RX goes through the framework's
//! fill pass (`VringData::fill_available`): a packet takes chains until their room covers it
//! (several with mergeable buffers) and is written straight into their guest memory; the
//! pass publishes its completions and decides on the interrupt once. In loopback the TX queue
//! is served inside a fill pass of the RX queue, each packet copied from its TX chain
//! straight into RX room. Packets for which the driver has posted no RX buffer wait in a
//! bounded backlog per pair and go out at the next RX kick; when the backlog is full the
//! loopback drops them (counted as TX drops) and the tap is left unread until there is room. Malformed chains
//! are completed with length 0, logged and counted (`packet.rs`).
//! The `RARP` and `NET_MTU` protocol features are offered: `SEND_RARP` (which QEMU sends
//! after a migration, or on the monitor's `announce-self`, for a guest without
//! `VIRTIO_NET_F_GUEST_ANNOUNCE`, which is not offered) puts a fake RARP from the guest's MAC
//! address out on the first pair, as if the guest had sent it; `NET_SET_MTU` sets the
//! configuration space's `mtu` (68 or more).
//!
//! It follows the vhost-user spec's "Backend program conventions": `--socket-path PATH`
//! (listen) or `--fd N` (an inherited connected socket), `--print-capabilities` (JSON on
//! stdout), no daemonizing, a clean exit on SIGTERM or SIGINT, logs on stderr.
//!
//! ```text
//! cargo run --release -p vu-backend --example vu_net -- --socket-path /tmp/net.sock --loopback --queue-pairs 2
//! dpdk-testpmd -l 0,1 --no-pci --in-memory \
//!     --vdev net_virtio_user0,path=/tmp/net.sock,queues=2,cq=1,packed_vq=0 -- -i --rxq=2 --txq=2
//! ```
//!
//! `cargo xtask dpdk` drives it with DPDK's testpmd and compares what came back
//! (docs/TESTING.md); `cargo xtask e2e --device net` boots a Linux guest on `vu_net --tap`
//! with 1 and 2 queue pairs, which pings the host and moves data over TCP both ways
//! (docs/e2e.md#net).

mod io;
mod packet;
#[cfg(test)]
mod tests;
mod virtio_net;

use std::io as stdio;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vu_backend::prelude::*;
use vu_backend::virtio_queue::desc::split::Descriptor;
use vu_backend::vu_vring::{Chain, RingState, VringData};

use vu_backend::conventions::{self as common, Conventions, Socket};

use io::{Loopback, PacketIo, Tap};
use packet::{
    deliver, read_tx, reflect, segment_descriptors, tx_segments, Backlog, Counters, Delivery,
    RxMode,
};
use virtio_net::{
    header_len, rarp_frame, CONFIG_LEN, CONFIG_MAC, CONFIG_MAX_PAIRS, CONFIG_MTU, CONFIG_STATUS,
    F_MAC, F_MQ, F_MRG_RXBUF, F_MTU, F_STATUS, HDR_LEN, MIN_MTU, S_LINK_UP,
};

/// Packets one pair holds while the driver has posted no RX buffer for them.
const DEFAULT_BACKLOG: usize = 1024;

/// One queue pair's host-side state, used by the worker thread of that pair.
#[derive(Debug)]
struct Pair {
    backlog: Backlog,
    /// Scratch space of the loopback's TX-to-RX copy.
    segments: Vec<(GuestAddress, usize)>,
}

/// The device.
struct NetBackend {
    pairs: u16,
    /// Worker threads serving the pairs (pair `k` on thread `k % threads`).
    threads: u16,
    queue_size: u16,
    mac: [u8; 6],
    /// The configuration space's `mtu`: `--mtu`, or what the frontend set (`NET_SET_MTU`).
    mtu: AtomicU16,
    io: Box<dyn PacketIo>,
    state: Vec<Mutex<Pair>>,
    counters: Vec<Counters>,
    /// The features the driver acknowledged.
    acked: AtomicU64,
}

impl NetBackend {
    fn new(pairs: u16, queue_size: u16, backlog: usize, io: Box<dyn PacketIo>) -> Self {
        NetBackend {
            pairs,
            threads: pairs,
            queue_size,
            // A locally administered unicast address.
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: AtomicU16::new(1500),
            io,
            state: (0..pairs)
                .map(|_| {
                    Mutex::new(Pair {
                        backlog: Backlog::new(backlog),
                        segments: Vec::new(),
                    })
                })
                .collect(),
            counters: (0..pairs).map(|_| Counters::default()).collect(),
            acked: AtomicU64::new(0),
        }
    }

    fn pair(&self, pair: usize) -> MutexGuard<'_, Pair> {
        // A poisoned lock only means a panic mid-packet; the backlog is still a backlog.
        self.state[pair]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn rx_mode(&self) -> RxMode {
        let acked = self.acked.load(Ordering::Relaxed);
        RxMode {
            hdr_len: header_len(acked),
            mergeable: acked & F_MRG_RXBUF != 0,
        }
    }

    /// Serves pair `pair`'s TX queue: each chain's packet goes to the host side, then what
    /// waits for the RX queue (in loopback, those packets) goes out.
    fn transmit(&self, pair: usize, tx: &VringMutex, rx: &VringMutex) {
        let mut state = self.pair(pair);
        if !self.io.reflects() || !self.reflect(pair, &mut state, tx, rx) {
            let counters = &self.counters[pair];
            let hdr_len = self.rx_mode().hdr_len;
            let backlog = &mut state.backlog;
            process_queue(tx, |chain| {
                self.send(pair, chain, backlog, counters, hdr_len);
                // The device writes nothing into a TX chain.
                0
            });
        }
        self.flush(pair, &mut state, rx);
    }

    /// Hands TX chain `chain`'s packet to the host side (or the backlog, in loopback).
    fn send(
        &self,
        pair: usize,
        chain: Chain<'_, GuestMemoryMmap>,
        backlog: &mut Backlog,
        counters: &Counters,
        hdr_len: usize,
    ) {
        let mem = chain.memory();
        let head = chain.head_index();
        self.send_from(pair, head, chain, mem, backlog, counters, hdr_len);
    }

    /// Hands the packet in `descriptors` (of TX chain `head`) to the host side (or the
    /// backlog, in loopback).
    #[allow(clippy::too_many_arguments)]
    fn send_from(
        &self,
        pair: usize,
        head: u16,
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
        backlog: &mut Backlog,
        counters: &Counters,
        hdr_len: usize,
    ) {
        let mut packet = backlog.buffer();
        match read_tx(descriptors, mem, hdr_len, &mut packet) {
            Ok(()) => {
                Counters::add(&counters.tx_packets, 1);
                Counters::add(&counters.tx_bytes, (packet.len() - HDR_LEN) as u64);
                if let Err(packet) = self.io.transmit(pair, packet, backlog) {
                    Counters::add(&counters.tx_dropped, 1);
                    backlog.recycle(packet);
                }
            }
            Err(err) => {
                log::warn!("tx chain {head} of pair {pair}: {err}");
                Counters::add(&counters.tx_errors, 1);
                backlog.recycle(packet);
            }
        }
    }

    /// Loopback: serves the TX queue inside one fill pass of the RX queue, each packet
    /// copied from its TX chain straight into RX room; a packet that finds no room waits in
    /// the backlog (and every packet after it, to keep their order). Returns `false`, having
    /// done nothing, when the RX queue cannot take packets now (not enabled, or packets
    /// already wait).
    fn reflect(&self, pair: usize, state: &mut Pair, tx: &VringMutex, rx: &VringMutex) -> bool {
        let mut guard = rx.get_mut();
        let data = &mut *guard;
        if data.ring_state() != RingState::Enabled || state.backlog.len() > 0 {
            return false;
        }
        let counters = &self.counters[pair];
        let mode = self.rx_mode();
        let size = data.queue_size();
        let Pair { backlog, segments } = state;
        let mem = data.mem().memory();
        let filled = data.fill_available(&mem, |rx| {
            process_queue(tx, |mut chain| {
                let head = chain.head_index();
                let mem = chain.memory();
                // The chain is walked once; its segments are copied into RX room, or into
                // the backlog when there is none (then every later packet waits too).
                let placed = tx_segments(&mut chain, mode.hdr_len, segments).and_then(|seen| {
                    if backlog.len() > 0 {
                        return Ok(false);
                    }
                    let delivery = reflect(mem, segments, seen, rx, mode, size, counters)?;
                    Ok(matches!(delivery, Delivery::Placed(_)))
                });
                match placed {
                    Ok(true) => {}
                    Ok(false) => {
                        let descriptors = segment_descriptors(segments);
                        self.send_from(
                            pair,
                            head,
                            descriptors,
                            mem,
                            backlog,
                            counters,
                            mode.hdr_len,
                        );
                    }
                    Err(err) => {
                        log::warn!("tx chain {head} of pair {pair}: {err}");
                        Counters::add(&counters.tx_errors, 1);
                    }
                }
                0
            });
            Counters::add(&counters.rx_errors, rx.malformed() as u64);
        });
        drop(mem);
        if let Err(err) = filled.and_then(|()| data.signal_used_queue_if_needed()) {
            log::warn!("rx ring of pair {pair} not served: {err}; left alone until its next kick");
            if let Err(e) = data.signal_error() {
                log::warn!("cannot write the ring's error eventfd: {e}");
            }
        }
        true
    }

    /// Takes what the host side has for pair `pair` and places it, and what already
    /// waited, into the RX queue, for as long as both have some.
    fn receive(&self, pair: usize, rx: &VringMutex) -> stdio::Result<()> {
        let mut state = self.pair(pair);
        loop {
            self.io.receive(pair, &mut state.backlog)?;
            let was_full = state.backlog.is_full();
            let before = state.backlog.len();
            self.flush(pair, &mut state, rx);
            // The host side is drained (or the driver took nothing): the next edge of its
            // fd, or the next RX kick, brings us back.
            if !was_full || state.backlog.len() == before {
                return Ok(());
            }
        }
    }

    /// Places waiting packets into RX queue `rx` while it has buffers, then decides once
    /// whether the driver needs an interrupt.
    fn flush(&self, pair: usize, state: &mut Pair, rx: &VringMutex) {
        let mut guard = rx.get_mut();
        let data = &mut *guard;
        if data.ring_state() != RingState::Enabled || state.backlog.len() == 0 {
            return;
        }
        if let Err(err) = self.flush_ring(pair, state, data) {
            log::warn!("rx ring of pair {pair} not served: {err}; left alone until its next kick");
            if let Err(e) = data.signal_error() {
                log::warn!("cannot write the ring's error eventfd: {e}");
            }
        }
    }

    fn flush_ring(
        &self,
        pair: usize,
        state: &mut Pair,
        data: &mut VringData<GuestMemoryAtomic<GuestMemoryMmap>>,
    ) -> Result<(), vu_backend::vu_vring::Error> {
        let counters = &self.counters[pair];
        let mode = self.rx_mode();
        let size = data.queue_size();
        let backlog = &mut state.backlog;
        let mut rechecks = 0;
        loop {
            // One pass: one snapshot, the completions published together at its end.
            let mem = data.mem().memory();
            let filled = data.fill_available(&mem, |rx| {
                let mut starved = false;
                while let Some(packet) = backlog.front_mut() {
                    match deliver(rx, packet, mode, size, counters) {
                        Delivery::NoBuffers => {
                            starved = true;
                            break;
                        }
                        Delivery::TooBig => {
                            log::debug!(
                                "pair {pair}: a {} byte packet fits no RX buffer",
                                packet.len()
                            );
                            Counters::add(&counters.rx_too_big, 1);
                        }
                        Delivery::Placed(_) | Delivery::Failed => {}
                    }
                    if let Some(packet) = backlog.pop_front() {
                        backlog.recycle(packet);
                    }
                }
                Counters::add(&counters.rx_errors, rx.malformed() as u64);
                starved
            });
            drop(mem);
            // Ask for a kick when the driver adds buffers: with EVENT_IDX at its next
            // available entry, not at ours (a packet that needs more chains than are
            // available leaves ours behind the driver's).
            match filled {
                Ok(true) if rechecks < 2 && rearm_rx(data)? => rechecks += 1,
                Ok(_) => break,
                Err(err) => {
                    // What was placed before the ring broke is in the used ring.
                    data.signal_used_queue_if_needed()?;
                    return Err(err);
                }
            }
        }
        data.signal_used_queue_if_needed()?;
        Ok(())
    }
}

/// Re-enables RX kicks so that the driver's next buffer brings one: with EVENT_IDX,
/// `avail_event` is set to the driver's current available index (the device's own may lag
/// behind it while a packet waits for more chains). Returns whether the driver added
/// buffers meanwhile.
fn rearm_rx(
    data: &mut VringData<GuestMemoryAtomic<GuestMemoryMmap>>,
) -> Result<bool, vu_backend::vu_vring::Error> {
    let next = data.queue_next_avail();
    let avail = {
        let mem = data.mem().memory();
        data.get_queue()
            .avail_idx(&*mem, Ordering::Acquire)
            .map(|idx| idx.0)
            .unwrap_or(next)
    };
    data.set_queue_next_avail(avail);
    let more = data.enable_notification();
    data.set_queue_next_avail(next);
    more
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.pairs)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = (VirtioFeatures::VERSION_1
            | VirtioFeatures::RING_INDIRECT_DESC
            | VirtioFeatures::RING_EVENT_IDX
            | VirtioFeatures::PROTOCOL_FEATURES)
            .bits()
            | F_MAC
            | F_STATUS
            | F_MTU
            | F_MRG_RXBUF
            | self.io.offloads();
        if self.pairs > 1 {
            features |= F_MQ;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        log::debug!("acked features {features:#x}");
        self.acked.store(features, Ordering::Relaxed);
        if let Err(err) = self.io.set_guest_features(features) {
            log::warn!("cannot set the tap's offloads: {err}");
        }
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ
            | ProtocolFeatures::REPLY_ACK
            | ProtocolFeatures::CONFIG
            | ProtocolFeatures::RARP
            | ProtocolFeatures::MTU
    }

    /// The fake RARP goes out on the first pair like a frame the guest sent: onto the tap,
    /// or, in loopback, back to the guest's own RX queue (a reflector's "network" is the
    /// guest), from the backlog at the RX queue's next pass.
    fn send_rarp(&self, mac: [u8; 6]) -> stdio::Result<()> {
        let mut packet = vec![0u8; HDR_LEN];
        packet.extend_from_slice(&rarp_frame(mac));
        let mut pair = self.pair(0);
        self.io
            .transmit(0, packet, &mut pair.backlog)
            .map_err(|_| stdio::Error::other("the host side did not take the RARP"))?;
        log::info!("broadcast a RARP for {}", mac_string(mac));
        Ok(())
    }

    /// Any MTU a virtio-net device may have. The spec sends it "only when VIRTIO_NET_F_MTU
    /// feature has been successfully negotiated", between the guest and the frontend: QEMU
    /// sends `NET_SET_MTU` when it starts the device, before the `SET_FEATURES` that tells
    /// this back-end the features, so the acknowledged features here cannot be checked.
    /// The packet path takes frames of any size up to `MAX_FRAME` either way, so the MTU is
    /// what the configuration space says.
    fn set_mtu(&self, mtu: u16) -> stdio::Result<()> {
        if mtu < MIN_MTU {
            return Err(stdio::Error::other(format!(
                "MTU {mtu} is below virtio-net's minimum of {MIN_MTU}"
            )));
        }
        self.mtu.store(mtu, Ordering::Relaxed);
        log::info!("MTU {mtu}");
        Ok(())
    }

    fn reset_device(&self) {
        for pair in 0..usize::from(self.pairs) {
            self.pair(pair).backlog.clear();
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings know; process_queue and the RX path follow them.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_MAC..CONFIG_MAC + 6].copy_from_slice(&self.mac);
        config[CONFIG_STATUS..CONFIG_STATUS + 2].copy_from_slice(&S_LINK_UP.to_le_bytes());
        config[CONFIG_MAX_PAIRS..CONFIG_MAX_PAIRS + 2].copy_from_slice(&self.pairs.to_le_bytes());
        config[CONFIG_MTU..CONFIG_MTU + 2]
            .copy_from_slice(&self.mtu.load(Ordering::Relaxed).to_le_bytes());
        vu_backend::config_read(&config, offset, size)
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> stdio::Result<()> {
        // The vrings hold the memory; chains carry the snapshot they were read from.
        Ok(())
    }

    /// A pair's RX and TX queues and its host side are served together by one worker
    /// thread; pair `k` on thread `k % threads` (by default one thread per pair, pairs in
    /// parallel; `--threads 1` serves every pair from one thread, in turn).
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.threads)
            .map(|t| {
                (t..self.pairs)
                    .step_by(usize::from(self.threads))
                    .fold(0u64, |mask, k| mask | 0b11u64 << (2 * k))
            })
            .collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> stdio::Result<()> {
        let queues = vrings.len();
        let event = usize::from(device_event);
        // Kicks are the queues' indices; the host side's fds come after them.
        let (pair, is_tx) = if event < queues {
            (event / 2, event % 2 == 1)
        } else {
            // Out of range (so refused below) if it is not one of ours.
            (event.checked_sub(queues + 1).unwrap_or(usize::MAX), false)
        };
        let rx_index = pair.saturating_mul(2);
        let (Some(rx), Some(tx)) = (vrings.get(rx_index), vrings.get(rx_index.saturating_add(1)))
        else {
            return Err(stdio::Error::other(format!(
                "unknown device event {device_event}"
            )));
        };
        if !evset.contains(EventSet::IN) {
            return Err(stdio::Error::other(format!("unexpected events {evset:?}")));
        }
        if is_tx {
            self.transmit(pair, tx, rx);
            Ok(())
        } else {
            self.receive(pair, rx)
        }
    }
}

/// Which host side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Side {
    Loopback,
    Tap(String),
}

/// The command line.
#[derive(Debug)]
struct Args {
    conventions: Conventions,
    side: Option<Side>,
    pairs: u16,
    queue_size: u16,
    mac: Option<[u8; 6]>,
    mtu: u16,
    backlog: usize,
    poll_us: u64,
    threads: Option<u16>,
}

const USAGE: &str = "\
usage: vu_net (--socket-path PATH | --fd N) (--loopback | --tap NAME) [--queue-pairs N]
              [--queue-size N] [--mac XX:XX:XX:XX:XX:XX] [--mtu N] [--backlog N]
              [--poll-us N] [--threads N] [--log-level LEVEL]
       vu_net --print-capabilities

  --loopback           what the driver sends on TX queue k comes back on RX queue k
  --tap NAME           a Linux tap device with a virtio-net header (created if needed);
                       one tap queue per pair (a multi-queue tap with several pairs),
                       the checksum and TSO offloads passed through
  --queue-pairs N      RX/TX queue pairs (default 1, at most 32)
  --threads N          worker threads serving the pairs, pair k on thread k % N
                       (default: one per pair; 1: every pair on one thread, in turn)
  --queue-size N       largest queue size accepted (default 1024)
  --mac ADDR           the MAC address in the configuration space (default 52:54:00:12:34:56)
  --mtu N              the MTU in the configuration space (default 1500)
  --backlog N          packets a pair holds while the driver has no RX buffer (default 1024)
  --poll-us N          after serving a queue, poll it for up to N microseconds before
                       sleeping (default 0, off)
";

/// The spec's capability document: a network device.
const CAPABILITIES: &str = r#"{
  "type": "net",
  "features": []
}"#;

/// `mac` as `XX:XX:XX:XX:XX:XX`, the form `--mac` takes.
fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or("--mac: six bytes, XX:XX:XX:XX:XX:XX")?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("--mac: bad byte `{part}`"))?;
    }
    if parts.next().is_some() {
        return Err("--mac: six bytes, XX:XX:XX:XX:XX:XX".to_owned());
    }
    Ok(mac)
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        conventions: Conventions::default(),
        side: None,
        pairs: 1,
        queue_size: 1024,
        mac: None,
        mtu: 1500,
        backlog: DEFAULT_BACKLOG,
        poll_us: 0,
        threads: None,
    };
    let mut sides = 0;
    common::for_each_option(args, |name, value| {
        if parsed.conventions.take(name, value)? {
            return Ok(());
        }
        match name {
            "--loopback" => {
                parsed.side = Some(Side::Loopback);
                sides += 1;
            }
            "--tap" => {
                parsed.side = Some(Side::Tap(value()?));
                sides += 1;
            }
            "--queue-pairs" => parsed.pairs = common::number_in(name, &value()?, 1..=32)?,
            "--queue-size" => parsed.queue_size = common::queue_size(name, &value()?)?,
            "--mac" => parsed.mac = Some(parse_mac(&value()?)?),
            "--mtu" => parsed.mtu = common::number_in(name, &value()?, MIN_MTU..=u16::MAX)?,
            "--backlog" => parsed.backlog = common::number_in(name, &value()?, 1..=65536)?,
            "--poll-us" => parsed.poll_us = common::number(name, &value()?)?,
            "--threads" => parsed.threads = Some(common::number_in(name, &value()?, 1..=32)?),
            other => return Err(format!("unexpected argument `{other}`")),
        }
        Ok(())
    })?;
    if !parsed.conventions.print_capabilities && sides != 1 {
        return Err("give exactly one of --loopback and --tap".to_owned());
    }
    Ok(parsed)
}

fn run(args: &Args, socket: &Socket) -> Result<(), String> {
    let io: Box<dyn PacketIo> = match &args.side {
        Some(Side::Tap(name)) => {
            let tap = Tap::open(name, args.pairs)
                .map_err(|err| format!("cannot open tap {name}: {err}"))?;
            log::info!("tap {}", tap.name());
            Box::new(tap)
        }
        _ => Box::new(Loopback),
    };
    let mut backend = NetBackend::new(args.pairs, args.queue_size, args.backlog, io);
    if let Some(mac) = args.mac {
        backend.mac = mac;
    }
    backend.mtu = AtomicU16::new(args.mtu);
    backend.threads = args.threads.unwrap_or(args.pairs).min(args.pairs);
    let mut daemon = VhostUserDaemon::new(
        "vu_net".to_owned(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|err| format!("cannot create the daemon: {err}"))?;
    // The host side's fd wakes the worker of its pair, after the queues' kicks.
    let queues = 2 * u64::from(args.pairs);
    let handlers = daemon.get_epoll_handlers();
    let threads = usize::from(daemon.backend().threads);
    for pair in 0..usize::from(args.pairs) {
        let Some(handler) = handlers.get(pair % threads) else {
            return Err(format!("no worker thread for pair {pair}"));
        };
        if let Some(fd) = daemon.backend().io.ready_fd(pair) {
            handler
                .register_listener(
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    queues + 1 + pair as u64,
                )
                .map_err(|err| format!("cannot watch the tap: {err}"))?;
        }
    }
    if args.poll_us > 0 {
        for queue in 0..2 * args.pairs {
            daemon
                .set_polling(queue, Duration::from_micros(args.poll_us))
                .map_err(|err| format!("cannot set polling: {err}"))?;
        }
    }
    log::info!(
        "{} queue pair(s) of up to {}, {}",
        args.pairs,
        args.queue_size,
        match &args.side {
            Some(Side::Tap(name)) => format!("tap {name}"),
            _ => "loopback".to_owned(),
        }
    );
    let result = common::serve(&mut daemon, socket);
    for (pair, counters) in daemon.backend().counters.iter().enumerate() {
        log::info!("pair {pair}: {}", counters.summary());
    }
    result
}

fn main() -> ExitCode {
    common::main(
        "vu_net",
        USAGE,
        CAPABILITIES,
        parse_args,
        |args| &args.conventions,
        run,
    )
}
