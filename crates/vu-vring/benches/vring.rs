//! Completing a batch of chains: one call signal per chain against one decision per batch,
//! for each vring implementation; and `serve_available` (descriptors read through a mapping
//! of the table, the used ring written through one slice), then one decision.
//!
//! The `inflight_*` groups run `serve_available` and the batched pop/complete path with and
//! without inflight I/O tracking (a memfd area, as a frontend hands over), on a `VringMutex`.
//! The `ring_layout_*` groups serve the same batches through a split and a packed ring
//! (`VIRTIO_F_RING_PACKED`), with a driver that writes every descriptor of every chain per
//! offer in both layouts (as a driver recycling its buffers does), so the two differ only in
//! the ring format.
//! The `iommu_*` groups serve the same batches with the ring and every buffer given as IOVAs
//! and translated through an IOTLB of one entry per 4 KiB page against the same ring without
//! an IOMMU. The IOTLB here does on a hit what vu-daemon's does (vu-mem's
//! `SharedIotlb::resolve`, not a dependency of this crate: a mutex, an ordered-map lookup
//! per entry, a vector of pieces, then the pieces contiguous in guest memory merged).
//!
//! Run with `cargo bench -p vu-vring --bench vring`. The call eventfd is a real eventfd, so
//! "per chain" pays one `write(2)` per chain, as a backend that signals after every
//! `add_used` does.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, Permissions,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vu_vring::inflight::area_size;
use vu_vring::{InflightArea, Iommu, IommuError, VringMutex, VringRwLock, VringState, VringT};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Queue size; the bench keeps `DEPTH` chains in flight.
const SIZE: u16 = 512;
const DEPTH: u16 = 128;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const BUFFERS: u64 = 0x10000;
const BUF_LEN: u32 = 512;
/// VIRTQ_DESC_F_NEXT.
const F_NEXT: u16 = 1;

/// Plays the driver: `DEPTH` chains of `chain_len` descriptors each, laid out once; each offer
/// publishes all of them again in the available ring.
struct Driver {
    mem: Mem,
    avail_idx: u16,
    chain_len: u16,
}

impl Driver {
    fn new(chain_len: u16) -> Self {
        let descs = u64::from(DEPTH) * u64::from(chain_len);
        let len = (BUFFERS + descs * u64::from(BUF_LEN)) as usize;
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        {
            let m = mem.memory();
            for i in 0..DEPTH * chain_len {
                let desc = DESC + 16 * u64::from(i);
                let buf = BUFFERS + u64::from(BUF_LEN) * u64::from(i);
                let last = (i + 1) % chain_len == 0;
                let flags = if last { 0 } else { F_NEXT };
                m.write_obj(buf.to_le(), GuestAddress(desc)).unwrap();
                m.write_obj(BUF_LEN.to_le(), GuestAddress(desc + 8))
                    .unwrap();
                m.write_obj(flags.to_le(), GuestAddress(desc + 12)).unwrap();
                m.write_obj((i + 1).to_le(), GuestAddress(desc + 14))
                    .unwrap();
            }
        }
        Driver {
            mem,
            avail_idx: 0,
            chain_len,
        }
    }

    fn offer(&mut self, n: u16) {
        let m = self.mem.memory();
        for i in 0..n {
            let head = (i % DEPTH) * self.chain_len;
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE);
            m.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        m.store(
            self.avail_idx.to_le(),
            GuestAddress(AVAIL + 2),
            Ordering::Release,
        )
        .unwrap();
    }
}

/// Packed descriptor flags: NEXT, and AVAIL (bit 7) / USED (bit 15).
const P_NEXT: u16 = 1;
const P_AVAIL: u16 = 1 << 7;
const P_USED: u16 = 1 << 15;

/// The driver of the `ring_layout_*` groups: `DEPTH` chains of `chain_len` descriptors per
/// offer, every descriptor written in full, in either layout.
struct LayoutDriver {
    mem: Mem,
    packed: bool,
    chain_len: u16,
    /// Split: the available index. Packed: the next position.
    next: u16,
    /// Packed: the avail wrap counter.
    wrap: bool,
}

impl LayoutDriver {
    fn new(packed: bool, chain_len: u16) -> Self {
        let descs = u64::from(SIZE);
        let len = (BUFFERS + descs * u64::from(BUF_LEN)) as usize;
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap();
        LayoutDriver {
            mem: GuestMemoryAtomic::new(mmap),
            packed,
            chain_len,
            next: 0,
            wrap: true,
        }
    }

    fn write_desc(m: &GuestMemoryMmap, slot: u16, fields: (u16, u16)) {
        let desc = DESC + 16 * u64::from(slot);
        let buf = BUFFERS + u64::from(BUF_LEN) * u64::from(slot);
        m.write_obj(buf.to_le(), GuestAddress(desc)).unwrap();
        m.write_obj(BUF_LEN.to_le(), GuestAddress(desc + 8))
            .unwrap();
        m.write_obj(fields.0.to_le(), GuestAddress(desc + 12))
            .unwrap();
        m.store(fields.1.to_le(), GuestAddress(desc + 14), Ordering::Release)
            .unwrap();
    }

    fn offer(&mut self) {
        let m = self.mem.memory();
        for chain in 0..DEPTH {
            if self.packed {
                let head = (self.next, self.wrap);
                let mut head_flags = 0;
                for j in 0..self.chain_len {
                    let bits = if self.wrap { P_AVAIL } else { P_USED };
                    let next = if j + 1 < self.chain_len { P_NEXT } else { 0 };
                    if j == 0 {
                        head_flags = bits | next;
                        Self::write_desc(&m, self.next, (chain, 0));
                    } else {
                        Self::write_desc(&m, self.next, (chain, bits | next));
                    }
                    self.next += 1;
                    if self.next == SIZE {
                        self.next = 0;
                        self.wrap = !self.wrap;
                    }
                }
                let flags = GuestAddress(DESC + 16 * u64::from(head.0) + 14);
                m.store(head_flags.to_le(), flags, Ordering::Release)
                    .unwrap();
            } else {
                // Split: the chain in table slots from `chain * chain_len`, then its head
                // in the available ring.
                let first = chain * self.chain_len;
                for j in 0..self.chain_len {
                    let flags = if j + 1 < self.chain_len { F_NEXT } else { 0 };
                    Self::write_desc(&m, first + j, (flags, first + j + 1));
                }
                let slot = AVAIL + 4 + 2 * u64::from(self.next % SIZE);
                m.write_obj(first.to_le(), GuestAddress(slot)).unwrap();
                self.next = self.next.wrapping_add(1);
            }
        }
        if !self.packed {
            m.store(
                self.next.to_le(),
                GuestAddress(AVAIL + 2),
                Ordering::Release,
            )
            .unwrap();
        }
    }
}

// vmm-sys-util's `EventFd` gives up its fd only as a raw fd: adopting it is the bench's one
// `unsafe`.
#[allow(unsafe_code)]
fn call_eventfd() -> File {
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: `into_raw_fd` gives up the EventFd's ownership of a valid, open fd, so the File
    // becomes its only owner.
    unsafe { File::from_raw_fd(efd.into_raw_fd()) }
}

fn started<V: VringT<Mem>>(chain_len: u16) -> (V, Driver) {
    let driver = Driver::new(chain_len);
    let vring = V::new(driver.mem.clone(), SIZE).unwrap();
    vring.set_queue_info(DESC, AVAIL, USED).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring.set_call(Some(call_eventfd()));
    (vring, driver)
}

/// Walks a chain as a device would, returning the bytes it spans.
fn chain_len<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    chain: virtio_queue::DescriptorChain<M>,
) -> u32 {
    chain.map(|d| d.len()).sum()
}

/// Signals after every chain, whether the driver wants it or not.
fn signal_per_chain<V: VringT<Mem>>(vring: &V, driver: &mut Driver) {
    driver.offer(DEPTH);
    while let Some(chain) = vring.pop_descriptor_chain() {
        let head = chain.head_index();
        vring.add_used(head, chain_len(chain)).unwrap();
        vring.signal_used_queue().unwrap();
    }
}

/// Pop, add_used and a notification decision per request: the shape of a simple device.
fn decide_per_chain<V: VringT<Mem>>(vring: &V, driver: &mut Driver) {
    driver.offer(DEPTH);
    while let Some(chain) = vring.pop_descriptor_chain() {
        let head = chain.head_index();
        vring.add_used(head, chain_len(chain)).unwrap();
        vring.signal_used_queue_if_needed().unwrap();
    }
}

/// Completes the whole batch, then decides once.
fn batched<V: VringT<Mem>>(vring: &V, driver: &mut Driver, done: &mut Vec<(u16, u32)>) {
    driver.offer(DEPTH);
    done.clear();
    while let Some(chain) = vring.pop_descriptor_chain() {
        let head = chain.head_index();
        done.push((head, chain_len(chain)));
    }
    vring.add_used_batch(done.drain(..)).unwrap();
    vring.signal_used_queue_if_needed().unwrap();
}

/// `VringData::serve_available` under one lock and one memory snapshot, then one decision:
/// what `process_queue` does in a pass.
fn served<V: VringT<Mem>>(vring: &V, driver: &mut Driver) {
    driver.offer(DEPTH);
    let mut guard = vring.get_mut();
    let mem = guard.mem().memory();
    let served = guard
        .serve_available(&mem, |chain| chain.map(|d| d.len()).sum())
        .unwrap();
    assert_eq!(served, usize::from(DEPTH));
    guard.signal_used_queue_if_needed().unwrap();
}

fn bench_impl<V: VringT<Mem>>(c: &mut Criterion, name: &str) {
    for descs in [1u16, 3] {
        let mut group = c.benchmark_group(format!("complete_{DEPTH}_chains_of_{descs}"));
        group
            .throughput(Throughput::Elements(u64::from(DEPTH)))
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);

        let (vring, mut driver) = started::<V>(descs);
        group.bench_function(BenchmarkId::new("signal_per_chain", name), |b| {
            b.iter(|| signal_per_chain(&vring, &mut driver))
        });

        let (vring, mut driver) = started::<V>(descs);
        group.bench_function(BenchmarkId::new("decide_per_chain", name), |b| {
            b.iter(|| decide_per_chain(&vring, &mut driver))
        });

        let (vring, mut driver) = started::<V>(descs);
        let mut done = Vec::with_capacity(usize::from(DEPTH));
        group.bench_function(BenchmarkId::new("batched", name), |b| {
            b.iter(|| batched(&vring, &mut driver, &mut done))
        });

        let (vring, mut driver) = started::<V>(descs);
        group.bench_function(BenchmarkId::new("serve_available", name), |b| {
            b.iter(|| served(&vring, &mut driver))
        });
        group.finish();
    }
}

/// A memfd of `len` zero bytes, standing for the frontend's inflight area.
// memfd_create(2): vu-mem's `SharedMemory` would do it without `unsafe`, but a dev-dependency
// on vu-mem breaks `--features xen` (vm-memory's Xen build needs vu-mem's `xen` too).
#[allow(unsafe_code)]
fn area_memfd(len: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string that memfd_create does not keep.
    let fd = unsafe { libc::memfd_create(c"vu-bench-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// A started `VringMutex`, with inflight tracking when `tracked`.
fn started_tracking(chain_len: u16, tracked: bool) -> (VringMutex<Mem>, Driver) {
    let (vring, driver) = started::<VringMutex<Mem>>(chain_len);
    let region = tracked.then(|| {
        let size = area_size(1, SIZE, false);
        let area = InflightArea::map(area_memfd(size), 0, size, 1, SIZE).unwrap();
        area.queue(0).unwrap()
    });
    vring.get_mut().restart(region, true).unwrap();
    (vring, driver)
}

fn bench_inflight(c: &mut Criterion) {
    for descs in [1u16, 3] {
        let mut group = c.benchmark_group(format!("inflight_{DEPTH}_chains_of_{descs}"));
        group
            .throughput(Throughput::Elements(u64::from(DEPTH)))
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        for (name, tracked) in [("untracked", false), ("tracked", true)] {
            let (vring, mut driver) = started_tracking(descs, tracked);
            group.bench_function(BenchmarkId::new("serve_available", name), |b| {
                b.iter(|| served(&vring, &mut driver))
            });
            let (vring, mut driver) = started_tracking(descs, tracked);
            let mut done = Vec::with_capacity(usize::from(DEPTH));
            group.bench_function(BenchmarkId::new("batched", name), |b| {
                b.iter(|| batched(&vring, &mut driver, &mut done))
            });
        }
        group.finish();
    }
}

/// The same batches through a split and a packed ring: `serve_available`, then one decision.
fn bench_layouts(c: &mut Criterion) {
    for descs in [1u16, 3] {
        let mut group = c.benchmark_group(format!("ring_layout_{DEPTH}_chains_of_{descs}"));
        group
            .throughput(Throughput::Elements(u64::from(DEPTH)))
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        for (packed, name) in [(false, "split"), (true, "packed")] {
            let mut driver = LayoutDriver::new(packed, descs);
            let vring = VringMutex::<Mem>::new(driver.mem.clone(), SIZE).unwrap();
            vring.set_queue_packed(packed);
            vring.set_queue_info(DESC, AVAIL, USED).unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vring.set_call(Some(call_eventfd()));
            group.bench_function(BenchmarkId::new("serve_available", name), |b| {
                b.iter(|| {
                    driver.offer();
                    let mut guard = vring.get_mut();
                    let mem = guard.mem().memory();
                    let served = guard
                        .serve_available(&mem, |chain| chain.map(|d| d.len()).sum())
                        .unwrap();
                    assert_eq!(served, usize::from(DEPTH));
                    guard.signal_used_queue_if_needed().unwrap();
                })
            });
        }
        group.finish();
    }
}

/// Where IOVAs start: guest address `g` is IOVA `IOVA_BASE + g`.
const IOVA_BASE: u64 = 0x10_0000_0000;
/// The IOTLB's page.
const PAGE: u64 = 0x1000;

/// An IOTLB of page entries (first IOVA -> guest address), translating as vu-daemon's does on
/// a hit: the pieces of the access under the lock, then those contiguous in guest memory
/// merged into one run.
#[derive(Debug, Default)]
struct Tlb {
    pages: Mutex<BTreeMap<u64, u64>>,
}

impl Iommu for Tlb {
    fn generation(&self) -> u64 {
        0
    }

    fn translate(
        &self,
        iova: u64,
        len: u64,
        _access: Permissions,
    ) -> Result<(GuestAddress, u64), IommuError> {
        let pieces: Vec<(u64, u64)> = {
            let pages = self.pages.lock().unwrap();
            let mut pieces = Vec::new();
            let (mut at, end) = (iova, iova + len);
            while at < end || pieces.is_empty() {
                let (&first, &gpa) = pages
                    .range(..=at)
                    .next_back()
                    .filter(|(&first, _)| at - first < PAGE)
                    .ok_or(IommuError::Unmapped { iova: at })?;
                let piece = (end - at).min(first + PAGE - at);
                pieces.push((gpa + (at - first), piece));
                at += piece;
                if piece == 0 {
                    break;
                }
            }
            pieces
        };
        let (first, mut run) = pieces[0];
        for &(gpa, piece) in &pieces[1..] {
            if first + run != gpa {
                break;
            }
            run += piece;
        }
        Ok((GuestAddress(first), run))
    }
}

/// `serve_available` and one decision on a split ring without an IOMMU and behind one.
fn bench_iommu(c: &mut Criterion) {
    for descs in [1u16, 3] {
        let mut group = c.benchmark_group(format!("iommu_{DEPTH}_chains_of_{descs}"));
        group
            .throughput(Throughput::Elements(u64::from(DEPTH)))
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        for (on, name) in [(false, "off"), (true, "on")] {
            let (vring, mut driver) = started::<VringMutex<Mem>>(descs);
            if on {
                behind_iommu(&vring, &driver);
            }
            group.bench_function(BenchmarkId::new("serve_available", name), |b| {
                b.iter(|| served(&vring, &mut driver))
            });
        }
        group.finish();
    }
}

/// Puts `vring` behind an IOTLB mapping every page of the driver's memory at `IOVA_BASE`,
/// and rewrites the ring addresses and every descriptor's buffer address as IOVAs.
fn behind_iommu(vring: &VringMutex<Mem>, driver: &Driver) {
    let m = driver.mem.memory();
    let buffers = u64::from(DEPTH) * u64::from(driver.chain_len) * u64::from(BUF_LEN);
    let size = BUFFERS + buffers;
    let tlb = Tlb::default();
    for page in 0..size / PAGE {
        let gpa = page * PAGE;
        tlb.pages.lock().unwrap().insert(IOVA_BASE + gpa, gpa);
    }
    for i in 0..DEPTH * driver.chain_len {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        let addr: u64 = m.read_obj(at).unwrap();
        m.write_obj(IOVA_BASE + addr, at).unwrap();
    }
    vring.set_iommu(Some(Arc::new(tlb)));
    vring
        .set_queue_info(IOVA_BASE + DESC, IOVA_BASE + AVAIL, IOVA_BASE + USED)
        .unwrap();
}

fn benches(c: &mut Criterion) {
    bench_iommu(c);
    bench_layouts(c);
    bench_impl::<VringState<Mem>>(c, "VringState");
    bench_impl::<VringMutex<Mem>>(c, "VringMutex");
    bench_impl::<VringRwLock<Mem>>(c, "VringRwLock");
    bench_inflight(c);
}

// Written out instead of `criterion_group!`/`criterion_main!`, whose generated `pub fn` has no
// documentation and trips the workspace's `missing_docs` lint.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
