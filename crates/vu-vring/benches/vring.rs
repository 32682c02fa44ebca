//! Completing a batch of chains: one call signal per chain against one decision per batch,
//! for each vring implementation.
//!
//! Run with `cargo bench -p vu-vring --bench vring`. The call eventfd is a real eventfd, so
//! "per chain" pays one `write(2)` per chain, as a backend that signals after every
//! `add_used` does.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vu_vring::{VringMutex, VringRwLock, VringState, VringT};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Queue size; the bench keeps `DEPTH` chains in flight.
const SIZE: u16 = 256;
const DEPTH: u16 = 128;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const BUFFERS: u64 = 0x10000;
const BUF_LEN: u32 = 512;

/// Plays the driver: one-descriptor chains whose head is their avail slot.
struct Driver {
    mem: Mem,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Self {
        let len = (BUFFERS + u64::from(SIZE) * u64::from(BUF_LEN)) as usize;
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        {
            let m = mem.memory();
            for head in 0..SIZE {
                let desc = DESC + 16 * u64::from(head);
                let buf = BUFFERS + u64::from(BUF_LEN) * u64::from(head);
                m.write_obj(buf.to_le(), GuestAddress(desc)).unwrap();
                m.write_obj(BUF_LEN.to_le(), GuestAddress(desc + 8))
                    .unwrap();
            }
        }
        Driver { mem, avail_idx: 0 }
    }

    fn offer(&mut self, n: u16) {
        let m = self.mem.memory();
        for _ in 0..n {
            let head = self.avail_idx % SIZE;
            let slot = AVAIL + 4 + 2 * u64::from(head);
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

fn call_eventfd() -> File {
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: `into_raw_fd` gives up the EventFd's ownership of a valid, open fd, so the File
    // becomes its only owner.
    unsafe { File::from_raw_fd(efd.into_raw_fd()) }
}

fn started<V: VringT<Mem>>() -> (V, Driver) {
    let driver = Driver::new();
    let vring = V::new(driver.mem.clone(), SIZE).unwrap();
    vring.set_queue_info(DESC, AVAIL, USED).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring.set_call(Some(call_eventfd()));
    (vring, driver)
}

fn per_chain<V: VringT<Mem>>(vring: &V, driver: &mut Driver) {
    driver.offer(DEPTH);
    while let Some(chain) = vring.pop_descriptor_chain() {
        vring.add_used(chain.head_index(), BUF_LEN).unwrap();
        vring.signal_used_queue().unwrap();
    }
}

fn batched<V: VringT<Mem>>(vring: &V, driver: &mut Driver, done: &mut Vec<(u16, u32)>) {
    driver.offer(DEPTH);
    done.clear();
    while let Some(chain) = vring.pop_descriptor_chain() {
        done.push((chain.head_index(), BUF_LEN));
    }
    vring.add_used_batch(done.drain(..)).unwrap();
    vring.signal_used_queue_if_needed().unwrap();
}

fn bench_impl<V: VringT<Mem>>(c: &mut Criterion, name: &str) {
    let mut group = c.benchmark_group(format!("complete_{DEPTH}_chains"));
    group
        .throughput(Throughput::Elements(u64::from(DEPTH)))
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);

    let (vring, mut driver) = started::<V>();
    group.bench_function(BenchmarkId::new("signal_per_chain", name), |b| {
        b.iter(|| per_chain(&vring, &mut driver))
    });

    let (vring, mut driver) = started::<V>();
    let mut done = Vec::with_capacity(usize::from(DEPTH));
    group.bench_function(BenchmarkId::new("batched", name), |b| {
        b.iter(|| batched(&vring, &mut driver, &mut done))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_impl::<VringState<Mem>>(c, "VringState");
    bench_impl::<VringMutex<Mem>>(c, "VringMutex");
    bench_impl::<VringRwLock<Mem>>(c, "VringRwLock");
}

// Written out instead of `criterion_group!`/`criterion_main!`, whose generated `pub fn` has no
// documentation and trips the workspace's `missing_docs` lint.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
