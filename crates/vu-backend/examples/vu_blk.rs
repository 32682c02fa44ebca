//! `vu_blk`: a vhost-user-blk device backend written on the vu framework.
//!
//! It serves a raw image file (`--blk-file`) or a disk held in memory (`--memory-size`), with
//! any number of queues, each served by its own worker thread. Requests: read, write, flush
//! and get-id; anything else is answered `VIRTIO_BLK_S_UNSUPP`. `--read-only` offers
//! `VIRTIO_BLK_F_RO` and fails writes. Each kick is served by the framework's `process_queue`
//! (descriptors read through a mapping of the table, one interrupt decision per pass,
//! `VIRTIO_RING_F_EVENT_IDX` when the driver takes it, indirect descriptors).
//!
//! It can be killed or restarted under a running guest: it offers
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, so a new process (started on the same socket path,
//! whose old file it replaces) serves again the requests the old one had popped and not
//! completed, and a SIGTERM completes the request being served before the frontend sees the
//! connection end (docs/inflight.md).
//!
//! It follows the vhost-user spec's "Backend program conventions": `--socket-path PATH`
//! (listen) or `--fd N` (an inherited connected socket), `--print-capabilities` (JSON on
//! stdout), no daemonizing, a clean exit on SIGTERM or SIGINT, logs on stderr.
//!
//! ```text
//! cargo run -p vu-backend --example vu_blk -- --socket-path /tmp/blk.sock --blk-file disk.img
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
//!     -chardev socket,id=c0,path=/tmp/blk.sock -device vhost-user-blk-pci,chardev=c0,num-queues=2
//! ```
//!
//! `cargo xtask e2e` boots a Linux guest against it (docs/e2e.md).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vu_backend::prelude::*;
use vu_backend::vm_memory::Address;

use vu_backend::conventions::{self as common, Conventions, Socket};

/// virtio-blk feature bits (virtio spec 5.2.3).
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

/// Request types (virtio spec 5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status values.
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The request header: `le32 type; le32 reserved; le64 sector;`.
const HEADER_LEN: usize = 16;
/// "The sector number indicates the offset (multiplied by 512) where the read or write is to
/// occur", whatever the block size.
const SECTOR_SIZE: u64 = 512;
/// GET_ID writes at most 20 bytes of id string.
const ID_LEN: usize = 20;
/// The device id string returned by GET_ID.
const DEVICE_ID: &[u8] = b"vu-blk";

/// Byte offsets in `struct virtio_blk_config` (virtio spec 5.2.4).
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;
const CONFIG_NUM_QUEUES: usize = 34;
/// The config space size up to and including the write-zeroes fields (60 bytes in Linux and
/// QEMU 7.2); reads beyond what we fill are zeros.
const CONFIG_LEN: usize = 60;

/// Where the disk's bytes live.
#[derive(Debug)]
enum Storage {
    File(File),
    Memory(Mutex<Vec<u8>>),
}

impl Storage {
    fn len(&self) -> io::Result<u64> {
        match self {
            Storage::File(file) => Ok(file.metadata()?.len()),
            Storage::Memory(bytes) => Ok(lock(bytes).len() as u64),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Storage::File(file) => file.read_exact_at(buf, offset),
            Storage::Memory(bytes) => {
                let bytes = lock(bytes);
                let range = byte_range(offset, buf.len(), bytes.len())?;
                buf.copy_from_slice(&bytes[range]);
                Ok(())
            }
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Storage::File(file) => file.write_all_at(buf, offset),
            Storage::Memory(bytes) => {
                let mut bytes = lock(bytes);
                let range = byte_range(offset, buf.len(), bytes.len())?;
                bytes[range].copy_from_slice(buf);
                Ok(())
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self {
            Storage::File(file) => file.sync_data(),
            Storage::Memory(_) => Ok(()),
        }
    }
}

/// A poisoned lock only means another worker panicked mid-copy; the bytes are still bytes.
fn lock(bytes: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    bytes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn byte_range(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let end = start.checked_add(len).ok_or_else(out_of_range)?;
    if end > size {
        return Err(out_of_range());
    }
    Ok(start..end)
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "request beyond the end of the disk",
    )
}

/// The device: storage, geometry and the negotiated ring options.
#[derive(Debug)]
struct BlkBackend {
    storage: Storage,
    /// In bytes, a multiple of 512.
    capacity: u64,
    read_only: bool,
    num_queues: u16,
    queue_size: u16,
    stats: Stats,
}

/// What the device has served, for the log line it writes when it stops.
#[derive(Debug, Default)]
struct Stats {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    /// GET_ID and unsupported requests.
    others: AtomicU64,
    /// Requests answered with an error status.
    errors: AtomicU64,
}

impl Stats {
    fn count(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One line: `served N requests: R reads (B bytes), W writes (B bytes), F flushes, ...`.
    fn summary(&self) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let (reads, writes, flushes, others, errors) = (
            get(&self.reads),
            get(&self.writes),
            get(&self.flushes),
            get(&self.others),
            get(&self.errors),
        );
        format!(
            "served {} requests: {reads} reads ({} bytes), {writes} writes ({} bytes), \
             {flushes} flushes, {others} other, {errors} failed",
            reads + writes + flushes + others + errors,
            get(&self.read_bytes),
            get(&self.written_bytes),
        )
    }
}

/// One request, located in guest memory: the readable and the writable segments of its chain.
struct Segments {
    readable: Vec<(GuestAddress, usize)>,
    writable: Vec<(GuestAddress, usize)>,
}

impl Segments {
    fn of(chain: &Chain<'_, GuestMemoryMmap>) -> Self {
        let mut segments = Segments {
            readable: Vec::new(),
            writable: Vec::new(),
        };
        for desc in chain.clone() {
            let entry = (desc.addr(), desc.len() as usize);
            if desc.is_write_only() {
                segments.writable.push(entry);
            } else {
                segments.readable.push(entry);
            }
        }
        segments
    }

    fn total(list: &[(GuestAddress, usize)]) -> usize {
        list.iter().map(|&(_, len)| len).sum()
    }
}

/// Copies `out.len()` bytes starting `skip` bytes into the segments.
fn gather<G: GuestMemory + ?Sized>(
    mem: &G,
    list: &[(GuestAddress, usize)],
    mut skip: usize,
    out: &mut [u8],
) -> Result<(), String> {
    let mut done = 0;
    for &(addr, len) in list {
        if done == out.len() {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(out.len() - done);
        let at = addr
            .checked_add(skip as u64)
            .ok_or("descriptor address overflows")?;
        mem.read_slice(&mut out[done..done + take], at)
            .map_err(|err| format!("reading guest memory at {at:#x?}: {err}"))?;
        done += take;
        skip = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err("request shorter than its header says".to_owned())
    }
}

/// Copies `data` to the start of the segments.
fn scatter<G: GuestMemory + ?Sized>(
    mem: &G,
    list: &[(GuestAddress, usize)],
    data: &[u8],
) -> Result<(), String> {
    let mut done = 0;
    for &(addr, len) in list {
        if done == data.len() {
            break;
        }
        let take = len.min(data.len() - done);
        mem.write_slice(&data[done..done + take], addr)
            .map_err(|err| format!("writing guest memory at {addr:#x?}: {err}"))?;
        done += take;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err("writable part too short".to_owned())
    }
}

impl BlkBackend {
    /// Executes one request and returns its status and how many data bytes it wrote into the
    /// writable segments (the status byte not included).
    fn execute<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        segments: &Segments,
    ) -> Result<(u8, usize), String> {
        let mut header = [0u8; HEADER_LEN];
        gather(mem, &segments.readable, 0, &mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let in_len = Segments::total(&segments.writable)
            .checked_sub(1)
            .ok_or("no room for the status byte")?;
        let out_len = Segments::total(&segments.readable).saturating_sub(HEADER_LEN);
        let offset = sector.checked_mul(SECTOR_SIZE);
        let in_disk = |len: usize| {
            offset.filter(|&start| {
                start
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= self.capacity)
            })
        };
        match kind {
            VIRTIO_BLK_T_IN => {
                let Some(start) = in_disk(in_len) else {
                    log::warn!("read of {in_len} bytes at sector {sector} is beyond the disk");
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                };
                let mut data = vec![0u8; in_len];
                if let Err(err) = self.storage.read_at(&mut data, start) {
                    log::warn!("read at sector {sector}: {err}");
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                }
                scatter(mem, &segments.writable, &data)?;
                Stats::count(&self.stats.reads, 1);
                Stats::count(&self.stats.read_bytes, in_len);
                Ok((VIRTIO_BLK_S_OK, in_len))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                }
                let Some(start) = in_disk(out_len) else {
                    log::warn!("write of {out_len} bytes at sector {sector} is beyond the disk");
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                };
                let mut data = vec![0u8; out_len];
                gather(mem, &segments.readable, HEADER_LEN, &mut data)?;
                if let Err(err) = self.storage.write_at(&data, start) {
                    log::warn!("write at sector {sector}: {err}");
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                }
                Stats::count(&self.stats.writes, 1);
                Stats::count(&self.stats.written_bytes, out_len);
                Ok((VIRTIO_BLK_S_OK, 0))
            }
            VIRTIO_BLK_T_FLUSH => match self.storage.flush() {
                Ok(()) => {
                    Stats::count(&self.stats.flushes, 1);
                    Ok((VIRTIO_BLK_S_OK, 0))
                }
                Err(err) => {
                    log::warn!("flush: {err}");
                    Ok((VIRTIO_BLK_S_IOERR, 0))
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_LEN];
                id[..DEVICE_ID.len()].copy_from_slice(DEVICE_ID);
                let len = in_len.min(ID_LEN);
                scatter(mem, &segments.writable, &id[..len])?;
                Stats::count(&self.stats.others, 1);
                Ok((VIRTIO_BLK_S_OK, len))
            }
            other => {
                log::debug!("unsupported request type {other}");
                Stats::count(&self.stats.others, 1);
                Ok((VIRTIO_BLK_S_UNSUPP, 0))
            }
        }
    }

    /// Serves one chain and returns the used length to report for it.
    fn serve_chain(&self, chain: Chain<'_, GuestMemoryMmap>) -> u32 {
        let mem = chain.memory();
        let segments = Segments::of(&chain);
        if Segments::total(&segments.readable) < HEADER_LEN || segments.writable.is_empty() {
            log::warn!(
                "malformed request chain {}: no header or no status byte",
                chain.head_index()
            );
            Stats::count(&self.stats.errors, 1);
            return 0;
        }
        let (status, written) = match self.execute(mem, &segments) {
            Ok(result) => result,
            Err(err) => {
                log::warn!("request chain {}: {err}", chain.head_index());
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        // The status is the last byte of the writable part.
        let Some(&(addr, len)) = segments.writable.last() else {
            return 0;
        };
        let Some(status_at) = addr.checked_add(len as u64 - 1) else {
            return 0;
        };
        if status == VIRTIO_BLK_S_IOERR {
            Stats::count(&self.stats.errors, 1);
        }
        if let Err(err) = mem.write_obj(status, status_at) {
            log::warn!("cannot write the status byte: {err}");
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        let sectors = self.capacity / SECTOR_SIZE;
        config[CONFIG_CAPACITY..CONFIG_CAPACITY + 8].copy_from_slice(&sectors.to_le_bytes());
        // Two descriptors of each request carry the header and the status.
        let seg_max = u32::from(self.queue_size).saturating_sub(2).max(1);
        config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&seg_max.to_le_bytes());
        config[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4]
            .copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2]
            .copy_from_slice(&self.num_queues.to_le_bytes());
        config
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = (VirtioFeatures::VERSION_1
            | VirtioFeatures::RING_INDIRECT_DESC
            | VirtioFeatures::RING_EVENT_IDX
            | VirtioFeatures::RING_PACKED
            | VirtioFeatures::PROTOCOL_FEATURES)
            .bits()
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ;
        if self.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        log::debug!("acked features {features:#x}");
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        // QEMU's vhost-user-blk requires CONFIG (it reads the geometry through GET_CONFIG).
        // INFLIGHT_SHMFD: the framework records every chain process_queue pops in the
        // frontend's inflight area, so a restarted vu_blk serves again the requests a killed
        // one had popped and not completed (reads and writes are idempotent: the default
        // `resubmit_inflight` is right for a disk).
        ProtocolFeatures::MQ
            | ProtocolFeatures::REPLY_ACK
            | ProtocolFeatures::CONFIG
            | ProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        // The vrings know; process_queue follows them.
        log::debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        let mut out = vec![0u8; size as usize];
        if start < CONFIG_LEN {
            let avail = &config[start..end.min(CONFIG_LEN)];
            out[..avail.len()].copy_from_slice(avail);
        }
        out
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // Each descriptor chain carries the memory it was read from; nothing to keep here.
        Ok(())
    }

    /// One worker thread per queue, so that queues are served in parallel.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "unknown device event {device_event}"
            )));
        };
        // Every chain served and completed in one pass, one interrupt decision for the pass,
        // kicks re-armed with the EVENT_IDX re-check: the framework's loop.
        process_queue(vring, |chain| self.serve_chain(chain));
        Ok(())
    }
}

/// The command line.
#[derive(Debug)]
struct Args {
    conventions: Conventions,
    blk_file: Option<PathBuf>,
    memory_size_mib: Option<u64>,
    read_only: bool,
    num_queues: u16,
    queue_size: u16,
}

const USAGE: &str = "\
usage: vu_blk (--socket-path PATH | --fd N) (--blk-file FILE | --memory-size MIB)
              [--read-only] [--num-queues N] [--queue-size N] [--log-level LEVEL]
       vu_blk --print-capabilities

  --blk-file FILE      the raw disk image (its size is the capacity, in 512-byte sectors)
  --memory-size MIB    an in-memory disk of this size instead
  --read-only          offer VIRTIO_BLK_F_RO and refuse writes
  --num-queues N       request queues, one worker thread each (default 1, at most 64)
  --queue-size N       largest queue size accepted (default 1024)
";

/// The spec's capability document: a block device, with the options it takes.
const CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "read-only",
    "blk-file"
  ]
}"#;

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        conventions: Conventions::default(),
        blk_file: None,
        memory_size_mib: None,
        read_only: false,
        num_queues: 1,
        queue_size: 1024,
    };
    common::for_each_option(args, |name, value| {
        if parsed.conventions.take(name, value)? {
            return Ok(());
        }
        match name {
            "--blk-file" => parsed.blk_file = Some(PathBuf::from(value()?)),
            "--memory-size" => parsed.memory_size_mib = Some(common::number(name, &value()?)?),
            "--read-only" => parsed.read_only = true,
            "--num-queues" => {
                let n = common::number(name, &value()?)?;
                parsed.num_queues = u16::try_from(n)
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or("--num-queues: 1 to 64")?;
            }
            "--queue-size" => {
                let n = common::number(name, &value()?)?;
                parsed.queue_size = u16::try_from(n)
                    .ok()
                    .filter(|n| n.is_power_of_two() && *n <= 32768)
                    .ok_or("--queue-size: a power of two up to 32768")?;
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
        Ok(())
    })?;
    if !parsed.conventions.print_capabilities
        && parsed.blk_file.is_some() == parsed.memory_size_mib.is_some()
    {
        return Err("give exactly one of --blk-file and --memory-size".to_owned());
    }
    Ok(parsed)
}

fn open_storage(args: &Args) -> Result<Storage, String> {
    match (&args.blk_file, args.memory_size_mib) {
        (Some(path), _) => OpenOptions::new()
            .read(true)
            .write(!args.read_only)
            .open(path)
            .map(Storage::File)
            .map_err(|err| format!("cannot open {}: {err}", path.display())),
        (None, Some(mib)) => {
            let bytes = mib
                .checked_mul(1 << 20)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or("--memory-size too large")?;
            Ok(Storage::Memory(Mutex::new(vec![0u8; bytes])))
        }
        (None, None) => Err("no storage".to_owned()),
    }
}

fn run(args: &Args, socket: &Socket) -> Result<(), String> {
    let storage = open_storage(args)?;
    let size = storage
        .len()
        .map_err(|err| format!("cannot size the disk: {err}"))?;
    let capacity = size - size % SECTOR_SIZE;
    let backend = BlkBackend {
        storage,
        capacity,
        read_only: args.read_only,
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        stats: Stats::default(),
    };
    let mut daemon = VhostUserDaemon::new(
        "vu_blk".to_owned(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|err| format!("cannot create the daemon: {err}"))?;
    common::stop_on_signals(daemon.shutdown_handle())?;
    log::info!(
        "{} sectors, {} queue(s) of up to {}, {}",
        capacity / SECTOR_SIZE,
        args.num_queues,
        args.queue_size,
        if args.read_only {
            "read-only"
        } else {
            "read-write"
        }
    );
    common::start(&mut daemon, socket)?;
    let result = daemon.wait().map_err(|err| format!("daemon failed: {err}"));
    if let Err(err) = daemon.backend().storage.flush() {
        log::error!("final flush failed: {err}");
    }
    log::info!("{}", daemon.backend().stats.summary());
    result
}

fn main() -> ExitCode {
    common::main(
        "vu_blk",
        USAGE,
        CAPABILITIES,
        parse_args,
        |args| &args.conventions,
        run,
    )
}
