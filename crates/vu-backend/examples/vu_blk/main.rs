//! `vu_blk`: a vhost-user-blk device backend written on the vu framework.
//!
//! It serves a raw image file (`--blk-file`) or a disk held in memory (`--memory-size`), with
//! any number of queues, each served by its own worker thread. Requests: read, write, flush
//! and get-id; anything else is answered `VIRTIO_BLK_S_UNSUPP`. `--read-only` offers
//! `VIRTIO_BLK_F_RO` and fails writes. Each kick is served by the framework's
//! `process_queue_async` (descriptors read through a mapping of the table, one interrupt
//! decision per pass, `VIRTIO_RING_F_EVENT_IDX` when the driver takes it, indirect
//! descriptors), which hands each request of a split ring to a pool of threads
//! (`vu_daemon::Offload`, 4 by default, `--io-threads N`): many requests are in flight per
//! queue, each completed when its I/O is done, out of order. `--sync` serves each request in
//! the kick's pass instead, in order (and so do packed rings).
//!
//! It can be killed or restarted under a running guest: it offers
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, so a new process (started on the same socket path,
//! whose old file it replaces) serves again the requests the old one had taken and not
//! completed, and a SIGTERM (or any stop of a ring) completes the requests in flight before
//! the frontend sees the connection end (docs/inflight.md).
//!
//! It supports live migration: guest memory carries vu-mem's `LogBitmap`, so every byte the
//! device writes into the guest (data of read requests, the status byte, the used ring) is
//! marked in QEMU's dirty log while QEMU asks for it, and the device offers `VHOST_F_LOG_ALL`
//! and `LOG_SHMFD` (docs/migration.md). `--test-skip-logging N` breaks that on purpose for the
//! e2e test of the test: the data of every Nth read is copied into the guest without marking
//! the log.
//!
//! It carries its state across a migration with `SET_DEVICE_STATE_FD` (protocol feature
//! `DEVICE_STATE`; QEMU 7.2 does not send it): its geometry, which the destination checks
//! against its own, and its request counters.
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

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vu_backend::prelude::*;
use vu_backend::vm_memory::bitmap::Bitmap;
use vu_backend::vm_memory::{Address, GuestMemoryBackend, VolatileMemory, VolatileSlice};
use vu_backend::vu_daemon::device_state::StateTransfer;
use vu_backend::{LogBitmap, Offload, TransferDirection, TransferPhase};

use vu_backend::conventions::{self as common, Conventions, Socket};

mod segments;
mod storage;

use segments::SegmentList;
use storage::{Source, Storage};

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

/// Guest memory with dirty logging, and the vrings over it.
type Mem = GuestMemoryMmap<LogBitmap>;
type Ring = VringMutex<GuestMemoryAtomic<Mem>>;

/// The log's page size (`VHOST_LOG_PAGE`), for the count of pages written while logging.
const LOG_PAGE: u64 = 0x1000;

/// Byte offsets in `struct virtio_blk_config` (virtio spec 5.2.4).
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;
const CONFIG_NUM_QUEUES: usize = 34;
/// The config space size up to and including the write-zeroes fields (60 bytes in Linux and
/// QEMU 7.2); reads beyond what we fill are zeros.
const CONFIG_LEN: usize = 60;

/// The disk and what serving it counts: shared by the daemon's workers and the offload
/// threads.
#[derive(Debug)]
struct Disk {
    storage: Storage,
    /// In bytes, a multiple of 512.
    capacity: u64,
    read_only: bool,
    stats: Stats,
    /// Whether the frontend acknowledged `VHOST_F_LOG_ALL` (it is migrating the guest).
    logging: AtomicBool,
    /// Test only (`--test-skip-logging N`): the data of every Nth read bypasses the log.
    skip_logging: Option<u64>,
}

/// The device: the disk, its geometry and the negotiated ring options.
#[derive(Debug)]
struct BlkBackend {
    disk: Arc<Disk>,
    /// Offer packed virtqueues (`--packed`), without inflight tracking.
    packed: bool,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM` (`--iommu`): serve a guest behind a virtual IOMMU.
    iommu: bool,
    num_queues: u16,
    /// Worker threads serving the queues: queue `q` on thread `q % threads`.
    threads: u16,
    queue_size: u16,
    /// The device state transfer under way (`SET_DEVICE_STATE_FD`).
    transfer: StateTransfer,
    /// The threads split-ring requests run on, many in flight per queue and completed as
    /// they finish; `None` with `--sync` (each request served and completed in the kick's
    /// pass, in order). Packed rings complete in order: always served in the pass.
    offload: Option<Offload>,
}

/// The first bytes of vu_blk's device state, with its format version.
const STATE_MAGIC: &[u8; 8] = b"VUBLK\0\0\x01";

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
    /// Guest pages (4 KiB) the data of read requests touched while the frontend logged.
    logged_pages: AtomicU64,
    /// Reads whose data was copied without marking the log (`--test-skip-logging`).
    unlogged_reads: AtomicU64,
}

impl Stats {
    fn count(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The counters carried by the device state, in their order there.
    fn carried(&self) -> [&AtomicU64; 7] {
        [
            &self.reads,
            &self.read_bytes,
            &self.writes,
            &self.written_bytes,
            &self.flushes,
            &self.others,
            &self.errors,
        ]
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
             {flushes} flushes, {others} other, {errors} failed; {} pages of read data \
             written while logging, {} reads not logged",
            reads + writes + flushes + others + errors,
            get(&self.read_bytes),
            get(&self.written_bytes),
            get(&self.logged_pages),
            get(&self.unlogged_reads),
        )
    }
}

/// One request, located in guest memory: the readable and the writable segments of its chain.
struct Segments {
    readable: SegmentList,
    writable: SegmentList,
    /// Behind an IOMMU, the walk stopped at a buffer that did not translate: the segments
    /// are not the whole request.
    cut_short: bool,
}

impl Segments {
    fn of(chain: &Chain<'_, Mem>) -> Self {
        let mut segments = Segments {
            readable: SegmentList::new(),
            writable: SegmentList::new(),
            cut_short: false,
        };
        let mut walk = chain.clone();
        for desc in walk.by_ref() {
            let entry = (desc.addr(), desc.len() as usize);
            if desc.is_write_only() {
                segments.writable.push(entry);
            } else {
                segments.readable.push(entry);
            }
        }
        segments.cut_short = walk.is_cut_short();
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

/// The request header: copied from one slice of guest memory when the first readable segment
/// holds it whole (the usual request), else gathered across segments.
fn read_header(mem: &Mem, readable: &[(GuestAddress, usize)]) -> Result<[u8; HEADER_LEN], String> {
    let mut header = [0u8; HEADER_LEN];
    if let Some(&(addr, _)) = readable.first().filter(|&&(_, len)| len >= HEADER_LEN) {
        if let Ok(slice) = GuestMemoryBackend::get_slice(mem, addr, HEADER_LEN) {
            if slice.copy_to(&mut header[..]) == HEADER_LEN {
                return Ok(header);
            }
        }
    }
    gather(mem, readable, 0, &mut header)?;
    Ok(header)
}

/// How `scatter` writes guest memory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GuestWrite {
    /// Through `GuestMemory`, which marks the dirty log while the frontend logs.
    Logged,
    /// Test only: through a second view of the same bytes that has no bitmap.
    Unlogged,
}

/// Copies `data` to the start of the segments.
fn scatter(
    mem: &Mem,
    list: &[(GuestAddress, usize)],
    data: &[u8],
    how: GuestWrite,
) -> Result<(), String> {
    let mut done = 0;
    for &(addr, len) in list {
        if done == data.len() {
            break;
        }
        let take = len.min(data.len() - done);
        let chunk = &data[done..done + take];
        let written = match how {
            GuestWrite::Logged => mem.write_slice(chunk, addr).map_err(|err| err.to_string()),
            GuestWrite::Unlogged => write_unlogged(mem, chunk, addr),
        };
        written.map_err(|err| format!("writing guest memory at {addr:#x?}: {err}"))?;
        done += take;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err("writable part too short".to_owned())
    }
}

/// `--test-skip-logging`: copies `chunk` to `addr` without marking the dirty log, the bug a
/// device writing guest memory behind the framework's back would have. Broken on purpose, so
/// no safe API offers it: a `VolatileSlice` without the bitmap is built by hand.
#[allow(unsafe_code)]
fn write_unlogged(mem: &Mem, chunk: &[u8], addr: GuestAddress) -> Result<(), String> {
    let slice = mem
        .get_slice(addr, chunk.len())
        .map_err(|err| err.to_string())?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: `guard` keeps the mapping of `slice` alive, and `slice.len()` bytes from its
    // pointer are guest memory mapped read-write; the new slice (with no bitmap) lives only
    // for this copy.
    let unlogged = unsafe { VolatileSlice::new(guard.as_ptr(), slice.len()) };
    unlogged.copy_from(chunk);
    Ok(())
}

/// Writes `len` zero bytes at the start of the segments (a read of the null disk): a
/// `memset` of the guest's buffers, marking the dirty log unless `how` says not to.
#[allow(unsafe_code)]
fn zero(
    mem: &Mem,
    list: &[(GuestAddress, usize)],
    len: usize,
    how: GuestWrite,
) -> Result<(), String> {
    let mut left = len;
    for &(addr, seg) in list {
        if left == 0 {
            break;
        }
        let take = seg.min(left);
        for slice in GuestMemoryBackend::get_slices(mem, addr, take) {
            let slice =
                slice.map_err(|err| format!("writing guest memory at {addr:#x?}: {err}"))?;
            let guard = slice.ptr_guard_mut();
            // SAFETY: `guard` keeps the mapping of `slice` alive, and `slice.len()` bytes from
            // its pointer are guest memory mapped read-write, which the guest lent the device
            // for this request; u8 has no invalid values.
            unsafe { std::ptr::write_bytes(guard.as_ptr(), 0, slice.len()) };
            if how == GuestWrite::Logged {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
        left -= take;
    }
    if left == 0 {
        Ok(())
    } else {
        Err("writable part too short".to_owned())
    }
}

impl Disk {
    /// Executes one request and returns its status and how many data bytes it wrote into the
    /// writable segments (the status byte not included).
    fn execute(&self, mem: &Mem, segments: &Segments) -> Result<(u8, usize), String> {
        let header = read_header(mem, &segments.readable)?;
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
                if self.storage.is_null() {
                    // Zeroes straight into the guest's buffers, no copy in between.
                    let how = self.read_write_mode(&segments.writable, in_len);
                    zero(mem, &segments.writable, in_len, how)?;
                } else {
                    let mut data = vec![0u8; in_len];
                    if let Err(err) = self.storage.read_at(&mut data, start) {
                        log::warn!("read at sector {sector}: {err}");
                        return Ok((VIRTIO_BLK_S_IOERR, 0));
                    }
                    let how = self.read_write_mode(&segments.writable, in_len);
                    scatter(mem, &segments.writable, &data, how)?;
                }
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
                // The null disk drops the data unread.
                if !self.storage.is_null() {
                    let mut data = vec![0u8; out_len];
                    gather(mem, &segments.readable, HEADER_LEN, &mut data)?;
                    if let Err(err) = self.storage.write_at(&data, start) {
                        log::warn!("write at sector {sector}: {err}");
                        return Ok((VIRTIO_BLK_S_IOERR, 0));
                    }
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
                scatter(mem, &segments.writable, &id[..len], GuestWrite::Logged)?;
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

    /// How the data of a read goes into the guest, counting the pages it touches while the
    /// frontend logs.
    fn read_write_mode(&self, writable: &[(GuestAddress, usize)], len: usize) -> GuestWrite {
        if !self.logging.load(Ordering::Relaxed) {
            return GuestWrite::Logged;
        }
        let mut left = len as u64;
        let mut pages = 0;
        for &(addr, seg) in writable {
            let take = left.min(seg as u64);
            if take == 0 {
                break;
            }
            let first = addr.raw_value() / LOG_PAGE;
            let last = (addr.raw_value() + take - 1) / LOG_PAGE;
            pages += last - first + 1;
            left -= take;
        }
        Stats::count(&self.stats.logged_pages, pages as usize);
        let reads = self.stats.reads.load(Ordering::Relaxed);
        match self.skip_logging {
            Some(n) if reads % n == 0 => {
                Stats::count(&self.stats.unlogged_reads, 1);
                GuestWrite::Unlogged
            }
            _ => GuestWrite::Logged,
        }
    }

    /// Serves one chain and returns the used length to report for it.
    fn serve_chain(&self, chain: Chain<'_, Mem>) -> u32 {
        self.serve(chain.memory(), &Segments::of(&chain), chain.head_index())
    }

    /// Serves request chain `head` located by `segments` in `mem`: executes it and writes
    /// its status byte; returns the used length.
    fn serve(&self, mem: &Mem, segments: &Segments, head: u16) -> u32 {
        if segments.cut_short {
            // Its status byte may be among what did not translate: nothing is served or
            // written, as for a malformed chain.
            log::warn!("request chain {head} not served: cut short by the IOMMU");
            Stats::count(&self.stats.errors, 1);
            return 0;
        }
        if Segments::total(&segments.readable) < HEADER_LEN || segments.writable.is_empty() {
            log::warn!("malformed request chain {head}: no header or no status byte");
            Stats::count(&self.stats.errors, 1);
            return 0;
        }
        let (status, written) = match self.execute(mem, segments) {
            Ok(result) => result,
            Err(err) => {
                log::warn!("request chain {head}: {err}");
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
        // One byte through one slice: no copy loop (the dirty log is marked by the store).
        let stored = GuestMemoryBackend::get_slice(mem, status_at, 1)
            .map_err(|err| err.to_string())
            .and_then(|slice| {
                let byte = slice.get_ref::<u8>(0).map_err(|err| err.to_string())?;
                byte.store(status);
                Ok(())
            });
        if let Err(err) = stored {
            log::warn!("cannot write the status byte: {err}");
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }
}

impl BlkBackend {
    /// The device state: magic, capacity, read-only flag, queue count, then the counters,
    /// little-endian.
    fn save_state(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(STATE_MAGIC)?;
        out.write_all(&self.disk.capacity.to_le_bytes())?;
        out.write_all(&[u8::from(self.disk.read_only)])?;
        out.write_all(&self.num_queues.to_le_bytes())?;
        for counter in self.disk.stats.carried() {
            out.write_all(&counter.load(Ordering::Relaxed).to_le_bytes())?;
        }
        Ok(())
    }

    /// Restores what [`save_state`](Self::save_state) wrote, after checking that it comes
    /// from a device of the same geometry and that nothing follows it.
    fn load_state(&self, input: &mut dyn Read) -> io::Result<()> {
        fn u64_of(input: &mut dyn Read) -> io::Result<u64> {
            let mut bytes = [0u8; 8];
            input.read_exact(&mut bytes)?;
            Ok(u64::from_le_bytes(bytes))
        }
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != STATE_MAGIC {
            return Err(invalid(format!("not a vu_blk state: {magic:02x?}")));
        }
        let capacity = u64_of(input)?;
        let mut flag = [0u8; 1];
        input.read_exact(&mut flag)?;
        let mut queues = [0u8; 2];
        input.read_exact(&mut queues)?;
        let (read_only, num_queues) = (flag[0] != 0, u16::from_le_bytes(queues));
        if (capacity, read_only, num_queues)
            != (self.disk.capacity, self.disk.read_only, self.num_queues)
        {
            return Err(invalid(format!(
                "the source had {capacity} bytes, read-only {read_only}, {num_queues} queues; \
                 this device has {}, {}, {}",
                self.disk.capacity, self.disk.read_only, self.num_queues
            )));
        }
        let mut values = [0u64; 7];
        for value in &mut values {
            *value = u64_of(input)?;
        }
        if input.read(&mut [0u8; 1])? != 0 {
            return Err(invalid("trailing bytes after the device state".to_owned()));
        }
        for (counter, value) in self.disk.stats.carried().into_iter().zip(values) {
            counter.store(value, Ordering::Relaxed);
        }
        log::info!("device state loaded: {}", self.disk.stats.summary());
        Ok(())
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        let sectors = self.disk.capacity / SECTOR_SIZE;
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
    type Bitmap = LogBitmap;
    type Vring = Ring;

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
            | VirtioFeatures::PROTOCOL_FEATURES
            | VirtioFeatures::LOG_ALL)
            .bits()
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ;
        if self.disk.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        if self.packed {
            // The framework then stops offering INFLIGHT_SHMFD: tracking is split-only.
            features |= VirtioFeatures::RING_PACKED.bits();
        }
        if self.iommu {
            // Every access goes through `Chain`, which the framework translates.
            features |= VirtioFeatures::ACCESS_PLATFORM.bits();
        }
        features
    }

    fn acked_features(&self, features: u64) {
        log::debug!("acked features {features:#x}");
        let logging = features & VirtioFeatures::LOG_ALL.bits() != 0;
        if self.disk.logging.swap(logging, Ordering::Relaxed) != logging {
            log::info!("dirty logging {}", if logging { "on" } else { "off" });
        }
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        // QEMU's vhost-user-blk requires CONFIG (it reads the geometry through GET_CONFIG).
        // INFLIGHT_SHMFD: the framework records every chain process_queue pops in the
        // frontend's inflight area, so a restarted vu_blk serves again the requests a killed
        // one had popped and not completed (reads and writes are idempotent: the default
        // `resubmit_inflight` is right for a disk). QEMU migrates a guest only with LOG_SHMFD;
        // postcopy needs PAGEFAULT (and the framework's `postcopy` feature).
        let postcopy = if cfg!(feature = "postcopy") {
            ProtocolFeatures::PAGEFAULT
        } else {
            ProtocolFeatures::empty()
        };
        // Behind an IOMMU the framework asks QEMU for IOTLB misses over the backend channel
        // (QEMU requires BACKEND_REQ and REPLY_ACK for iommu_platform=on).
        let iommu = if self.iommu {
            ProtocolFeatures::BACKEND_REQ
        } else {
            ProtocolFeatures::empty()
        };
        ProtocolFeatures::MQ
            | ProtocolFeatures::REPLY_ACK
            | ProtocolFeatures::CONFIG
            | ProtocolFeatures::INFLIGHT_SHMFD
            | ProtocolFeatures::LOG_SHMFD
            | ProtocolFeatures::DEVICE_STATE
            | postcopy
            | iommu
    }

    fn set_event_idx(&self, enabled: bool) {
        // The vrings know; process_queue follows them.
        log::debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        vu_backend::config_read(&self.config_space(), offset, size)
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        // Each descriptor chain carries the memory it was read from; nothing to keep here.
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        direction: TransferDirection,
        _phase: TransferPhase,
        file: File,
    ) -> io::Result<Option<File>> {
        self.transfer
            .start(direction, file, |out| self.save_state(out))
    }

    fn check_device_state(&self) -> io::Result<()> {
        self.transfer.finish(|input| self.load_state(input))
    }

    /// Queue `q` on worker thread `q % threads`: by default one thread per queue, queues
    /// served in parallel; `--threads 1` serves every queue from one thread, in turn (as
    /// one iothread does in qemu-storage-daemon), which suits a backend given one CPU.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.threads)
            .map(|t| {
                (t..self.num_queues)
                    .step_by(usize::from(self.threads))
                    .fold(0u64, |mask, q| mask | 1u64 << q)
            })
            .collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Ring],
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
        // The framework's loop: every chain taken in one pass, one interrupt decision for
        // the pass, kicks re-armed with the EVENT_IDX re-check.
        let Some(offload) = &self.offload else {
            process_queue(vring, |chain| self.disk.serve_chain(chain));
            return Ok(());
        };
        // Each request to the pool, completed when its I/O is done, in whatever order.
        let memory = vring.get_ref().mem().clone();
        process_queue_async(vring, |chain| {
            if chain.is_packed() {
                return Completion::Now(self.disk.serve_chain(chain));
            }
            let head = chain.head_index();
            let segments = Segments::of(&chain);
            let (disk, ring, memory) = (Arc::clone(&self.disk), vring.clone(), memory.clone());
            offload.submit(device_event, move || {
                let len = disk.serve(&memory.memory(), &segments, head);
                let mut data = ring.get_mut();
                let completed = data
                    .complete_deferred([(head, len)])
                    .and_then(|_| data.signal_used_queue_if_needed());
                if let Err(err) = completed {
                    log::warn!("request chain {head} not completed: {err}");
                }
            });
            Completion::Later
        });
        Ok(())
    }

    fn stop_vring(&self, queue: u16) -> io::Result<()> {
        // Every request taken from the queue is completed before the frontend learns where
        // the ring stopped.
        if let Some(offload) = &self.offload {
            offload.drain(queue);
        }
        Ok(())
    }
}

/// The command line.
#[derive(Debug)]
struct Args {
    conventions: Conventions,
    /// The disk: `--blk-file`, `--memory-size` or `--null`.
    source: Option<Source>,
    read_only: bool,
    packed: bool,
    iommu: bool,
    num_queues: u16,
    /// `--threads N`: worker threads (default: one per queue).
    threads: Option<u16>,
    queue_size: u16,
    skip_logging: Option<u64>,
    /// Threads requests run on; 0: served in the kick's pass (`--sync`).
    io_threads: usize,
    /// `--poll-us N`: each queue's polling budget (the framework's default if not given).
    poll_us: Option<u64>,
}

/// Threads of the request pool by default: enough for many requests in flight on a few
/// queues, few enough for a small host.
const IO_THREADS: usize = 4;

const USAGE: &str = "\
usage: vu_blk (--socket-path PATH | --fd N) (--blk-file FILE | --memory-size MIB | --null MIB)
              [--read-only] [--packed] [--iommu] [--num-queues N] [--threads N]
              [--queue-size N] [--io-threads N | --sync] [--poll-us N]
              [--log-level LEVEL]
              [--test-skip-logging N]
       vu_blk --print-capabilities

  --blk-file FILE      the raw disk image (its size is the capacity, in 512-byte sectors)
  --memory-size MIB    an in-memory disk of this size instead
  --null MIB           a disk of this size that holds nothing, as qemu's null-co driver
                       with read-zeroes=on: a read writes zeroes into the guest's buffers,
                       a write is completed without reading its data (benchmarks)
  --read-only          offer VIRTIO_BLK_F_RO and refuse writes
  --packed             offer packed virtqueues (VIRTIO_F_RING_PACKED); inflight tracking,
                       which covers split rings only, is then not offered
  --iommu              offer VIRTIO_F_ACCESS_PLATFORM (and BACKEND_REQ for IOTLB misses):
                       serves a guest behind a virtual IOMMU (QEMU's iommu_platform=on)
  --num-queues N       request queues (default 1, at most 64)
  --threads N          worker threads serving the queues, queue q on thread q % N
                       (default: one per queue; 1: every queue on one thread, in turn)
  --queue-size N       largest queue size accepted (default 1024)
  --io-threads N       requests of split rings run on N threads shared by the queues, many
                       in flight per queue, completed as they finish (default 4)
  --sync               no threads: each request is served and completed in the kick's pass,
                       in order
  --poll-us N          after serving a queue, spin on it for up to N microseconds before
                       sleeping (0: never; default: the framework's)
  --test-skip-logging N  BROKEN ON PURPOSE, for tests: while migrating, copy the data of
                       every Nth read into the guest without marking the dirty log
";

/// The spec's capability document: a block device, with the options it takes.
const CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "read-only",
    "blk-file"
  ]
}"#;

const ONE_SOURCE: &str = "give exactly one of --blk-file, --memory-size and --null";

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        conventions: Conventions::default(),
        source: None,
        read_only: false,
        packed: false,
        iommu: false,
        num_queues: 1,
        threads: None,
        queue_size: 1024,
        skip_logging: None,
        io_threads: IO_THREADS,
        poll_us: None,
    };
    common::for_each_option(args, |name, value| {
        if parsed.conventions.take(name, value)? {
            return Ok(());
        }
        match name {
            "--blk-file" | "--memory-size" | "--null" => {
                if parsed.source.is_some() {
                    return Err(ONE_SOURCE.to_owned());
                }
                let value = value()?;
                parsed.source = Some(match name {
                    "--blk-file" => Source::File(PathBuf::from(value)),
                    "--memory-size" => Source::Memory(common::number(name, &value)?),
                    _ => Source::Null(common::number(name, &value)?),
                });
            }
            "--read-only" => parsed.read_only = true,
            "--packed" => parsed.packed = true,
            "--iommu" => parsed.iommu = true,
            "--num-queues" => parsed.num_queues = common::number_in(name, &value()?, 1..=64)?,
            "--threads" => parsed.threads = Some(common::number_in(name, &value()?, 1..=64)?),
            "--queue-size" => parsed.queue_size = common::queue_size(name, &value()?)?,
            "--io-threads" => parsed.io_threads = common::number_in(name, &value()?, 1..=64)?,
            "--sync" => parsed.io_threads = 0,
            "--poll-us" => parsed.poll_us = Some(common::number(name, &value()?)?),
            "--test-skip-logging" => {
                let n = common::number(name, &value()?)?;
                parsed.skip_logging = Some(n.max(1));
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
        Ok(())
    })?;
    if !parsed.conventions.print_capabilities && parsed.source.is_none() {
        return Err(ONE_SOURCE.to_owned());
    }
    Ok(parsed)
}

fn run(args: &Args, socket: &Socket) -> Result<(), String> {
    let Some(source) = &args.source else {
        return Err("no storage".to_owned());
    };
    let storage = Storage::open(source, args.read_only)?;
    let size = storage
        .len()
        .map_err(|err| format!("cannot size the disk: {err}"))?;
    let capacity = size - size % SECTOR_SIZE;
    let offload = (args.io_threads > 0)
        .then(|| Offload::new("vu_blk", args.io_threads))
        .transpose()
        .map_err(|err| format!("cannot start threads: {err}"))?;
    let backend = BlkBackend {
        disk: Arc::new(Disk {
            storage,
            capacity,
            read_only: args.read_only,
            stats: Stats::default(),
            logging: AtomicBool::new(false),
            skip_logging: args.skip_logging,
        }),
        packed: args.packed,
        iommu: args.iommu,
        num_queues: args.num_queues,
        threads: args.threads.unwrap_or(args.num_queues).min(args.num_queues),
        queue_size: args.queue_size,
        transfer: StateTransfer::new(),
        offload,
    };
    let mut daemon = VhostUserDaemon::new(
        "vu_blk".to_owned(),
        backend,
        GuestMemoryAtomic::new(Mem::new()),
    )
    .map_err(|err| format!("cannot create the daemon: {err}"))?;
    if let Some(us) = args.poll_us {
        for queue in 0..args.num_queues {
            daemon
                .set_polling(queue, std::time::Duration::from_micros(us))
                .map_err(|err| format!("cannot set polling: {err}"))?;
        }
    }
    match args.io_threads {
        0 => log::info!("requests served in the kick's pass, in order (--sync)"),
        n => log::info!("requests served on {n} threads, completed as they finish"),
    }
    if let Some(n) = args.skip_logging {
        log::warn!("--test-skip-logging {n}: the data of every {n}th read is NOT logged");
    }
    log::info!(
        "{} sectors, {} queue(s) of up to {} on {} worker thread(s), {}",
        capacity / SECTOR_SIZE,
        args.num_queues,
        args.queue_size,
        daemon.backend().threads,
        if args.read_only {
            "read-only"
        } else {
            "read-write"
        }
    );
    let result = common::serve(&mut daemon, socket);
    if let Err(err) = daemon.backend().disk.storage.flush() {
        log::error!("final flush failed: {err}");
    }
    log::info!("{}", daemon.backend().disk.stats.summary());
    if let Some(offload) = &daemon.backend().offload {
        let stats = offload.stats();
        log::info!(
            "{} requests on the offload threads, at most {} in flight at once, {} completed \
             before an older one",
            stats.jobs,
            stats.most_in_flight,
            stats.overtaking
        );
    }
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

#[cfg(test)]
mod tests {
    //! The device state round trip, driven by vu-proto's frontend over real sockets: a source
    //! and a destination vu_blk, each served by its own daemon.

    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use vu_backend::vu_proto::frontend::Frontend;
    use vu_backend::vu_proto::payload::DeviceStateTransfer;
    use vu_backend::vu_proto::socket::Endpoint;

    use super::*;

    fn device(capacity: u64) -> BlkBackend {
        BlkBackend {
            disk: Arc::new(Disk {
                storage: Storage::Null(capacity),
                capacity,
                read_only: false,
                stats: Stats::default(),
                logging: AtomicBool::new(false),
                skip_logging: None,
            }),
            packed: false,
            iommu: false,
            num_queues: 1,
            threads: 1,
            queue_size: 256,
            transfer: StateTransfer::new(),
            offload: None,
        }
    }

    /// A daemon serving `backend` on one end of a socket pair, and a frontend on the other
    /// that negotiated DEVICE_STATE.
    fn serve(backend: BlkBackend) -> (VhostUserDaemon<BlkBackend>, Frontend) {
        let mut daemon = VhostUserDaemon::new(
            "vu_blk-test".to_owned(),
            backend,
            GuestMemoryAtomic::new(Mem::new()),
        )
        .unwrap();
        let (ours, theirs) = Endpoint::pair().unwrap();
        daemon.start_connection(ours).unwrap();
        let mut frontend = Frontend::new(theirs);
        frontend.set_owner().unwrap();
        let offered = frontend.get_protocol_features().unwrap();
        assert!(offered.contains(ProtocolFeatures::DEVICE_STATE));
        frontend
            .set_protocol_features(ProtocolFeatures::DEVICE_STATE | ProtocolFeatures::REPLY_ACK)
            .unwrap();
        (daemon, frontend)
    }

    #[allow(unsafe_code)] // pipe2(2): std's pipe is newer than the workspace's rust-version.
    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    /// Saves the state of the source through its frontend, as QEMU would on the source side.
    fn save(frontend: &mut Frontend) -> Vec<u8> {
        let (mut read, write) = pipe();
        let transfer = DeviceStateTransfer {
            direction: TransferDirection::Save,
            phase: TransferPhase::Stopped,
        };
        let own = frontend
            .set_device_state_fd(transfer, write.as_fd())
            .unwrap();
        assert!(own.is_none());
        drop(write);
        let mut state = Vec::new();
        read.read_to_end(&mut state).unwrap();
        frontend.check_device_state().unwrap();
        state
    }

    /// Loads `state` into the destination; returns what CHECK_DEVICE_STATE said.
    fn load(frontend: &mut Frontend, state: &[u8]) -> bool {
        let (read, mut write) = pipe();
        let transfer = DeviceStateTransfer {
            direction: TransferDirection::Load,
            phase: TransferPhase::Stopped,
        };
        frontend
            .set_device_state_fd(transfer, read.as_fd())
            .unwrap();
        drop(read);
        write.write_all(state).unwrap();
        drop(write);
        frontend.check_device_state().is_ok()
    }

    /// Guest memory of 64 KiB at address 0, and a request in it: header at 0, data (`len`
    /// bytes at 0x1000, filled with 0xaa), status at 0x8000.
    fn request(kind: u32, len: usize) -> (Mem, Segments) {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&8u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0)).unwrap();
        mem.write_slice(&vec![0xaa; len], GuestAddress(0x1000))
            .unwrap();
        let data = (GuestAddress(0x1000), len);
        let status = (GuestAddress(0x8000), 1);
        let (readable, writable) = if kind == VIRTIO_BLK_T_IN {
            (vec![(GuestAddress(0), HEADER_LEN)], vec![data, status])
        } else {
            (vec![(GuestAddress(0), HEADER_LEN), data], vec![status])
        };
        let list = |entries: Vec<(GuestAddress, usize)>| {
            let mut list = SegmentList::new();
            entries.into_iter().for_each(|e| list.push(e));
            list
        };
        let segments = Segments {
            readable: list(readable),
            writable: list(writable),
            cut_short: false,
        };
        (mem, segments)
    }

    #[test]
    fn a_segment_list_holds_any_number_of_segments_in_order() {
        let mut list = SegmentList::new();
        let entries: Vec<(GuestAddress, usize)> = (0..7)
            .map(|i| (GuestAddress(i * 0x1000), i as usize + 1))
            .collect();
        for (k, &entry) in entries.iter().enumerate() {
            list.push(entry);
            assert_eq!(&*list, &entries[..=k]);
        }
        assert_eq!(Segments::total(&list), 28);
    }

    #[test]
    fn queues_go_round_the_worker_threads() {
        let mut backend = device(1 << 20);
        (backend.num_queues, backend.threads) = (5, 2);
        assert_eq!(backend.queues_per_thread(), [0b10101, 0b01010]);
        backend.threads = 1;
        assert_eq!(backend.queues_per_thread(), [0b11111]);
        backend.threads = 5;
        assert_eq!(
            backend.queues_per_thread(),
            [0b00001, 0b00010, 0b00100, 0b01000, 0b10000]
        );
    }

    #[test]
    fn the_null_disk_reads_zeroes_into_the_guest_and_drops_writes() {
        let disk = device(1 << 20).disk;
        let (mem, segments) = request(VIRTIO_BLK_T_IN, 4096);
        assert_eq!(disk.serve(&mem, &segments, 0), 4097);
        let mut data = vec![0xffu8; 4096];
        mem.read_slice(&mut data, GuestAddress(0x1000)).unwrap();
        assert!(data.iter().all(|&b| b == 0));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0);

        let (mem, segments) = request(VIRTIO_BLK_T_OUT, 4096);
        assert_eq!(disk.serve(&mem, &segments, 0), 1);
        mem.read_slice(&mut data, GuestAddress(0x1000)).unwrap();
        assert!(
            data.iter().all(|&b| b == 0xaa),
            "a write's data is left alone"
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0);
        assert_eq!(disk.stats.reads.load(Ordering::Relaxed), 1);
        assert_eq!(disk.stats.writes.load(Ordering::Relaxed), 1);

        // Beyond the end of the null disk: an I/O error, nothing zeroed.
        let (mem, segments) = request(VIRTIO_BLK_T_IN, 4096);
        let mut header = [0u8; HEADER_LEN];
        header[8..].copy_from_slice(&((1u64 << 20) / 512).to_le_bytes());
        mem.write_slice(&header, GuestAddress(0)).unwrap();
        assert_eq!(disk.serve(&mem, &segments, 0), 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(),
            VIRTIO_BLK_S_IOERR
        );
        mem.read_slice(&mut data, GuestAddress(0x1000)).unwrap();
        assert!(data.iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn the_device_state_round_trips_between_two_backends() {
        let source = device(1 << 20);
        source.disk.stats.reads.store(17, Ordering::Relaxed);
        source
            .disk
            .stats
            .written_bytes
            .store(4096, Ordering::Relaxed);
        source.disk.stats.errors.store(2, Ordering::Relaxed);
        let (_source_daemon, mut source_frontend) = serve(source);
        let state = save(&mut source_frontend);

        let (dest_daemon, mut dest_frontend) = serve(device(1 << 20));
        assert!(load(&mut dest_frontend, &state));
        let stats = &dest_daemon.backend().disk.stats;
        assert_eq!(stats.reads.load(Ordering::Relaxed), 17);
        assert_eq!(stats.written_bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_state_from_a_disk_of_another_size_is_refused() {
        let (_source_daemon, mut source_frontend) = serve(device(1 << 20));
        let state = save(&mut source_frontend);
        let (_dest_daemon, mut dest_frontend) = serve(device(2 << 20));
        assert!(!load(&mut dest_frontend, &state));
    }

    #[test]
    fn a_truncated_or_padded_state_is_refused() {
        let (_source_daemon, mut source_frontend) = serve(device(1 << 20));
        let state = save(&mut source_frontend);
        let (_dest_daemon, mut dest_frontend) = serve(device(1 << 20));
        assert!(!load(&mut dest_frontend, &state[..state.len() - 1]));
        let mut padded = state.clone();
        padded.push(0);
        assert!(!load(&mut dest_frontend, &padded));
        assert!(load(&mut dest_frontend, &state));
    }
}
