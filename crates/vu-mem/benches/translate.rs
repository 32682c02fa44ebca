//! VMM-to-guest translation, IOTLB lookups and dirty-log marking.
//!
//! `cargo bench -p vu-mem --bench translate` (add `-- --quick` for a smoke run).

// criterion_group! generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]

use std::fs::File;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use vu_mem::{GuestMemoryManager, Iotlb, Permissions, RegionSpec, SharedIotlb};

const REGION: u64 = 0x10_0000;

fn memfd(size: u64) -> File {
    // A memfd of `size` zero bytes: `SharedMemory`'s (its mapping here is dropped at once).
    let shared = vu_mem::SharedMemory::new(GuestAddress(0), size).expect("memfd");
    shared.file().try_clone().expect("dup")
}

/// VMM address of region `i` of `n`: scattered, so VMM order differs from guest order.
fn vmm_of(i: u64, n: u64) -> u64 {
    0x7f00_0000_0000 + ((i * 263) % n) * 2 * REGION
}

fn table(n: u64) -> Vec<RegionSpec> {
    (0..n)
        .map(|i| RegionSpec::new(i * REGION, REGION, vmm_of(i, n), 0, memfd(REGION)))
        .collect()
}

fn manager(n: u64) -> GuestMemoryManager {
    let mut m = GuestMemoryManager::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()));
    m.set_table(table(n)).unwrap();
    m
}

fn translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("vmm_to_guest");
    for n in [1u64, 8, 64, 509] {
        let m = manager(n);
        // A ring-sized range in every region, visited in turn.
        let addrs: Vec<u64> = (0..n).map(|i| vmm_of(i, n) + 0x1000).collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &addrs, |b, addrs| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % addrs.len();
                black_box(m.vmm_to_guest(black_box(addrs[i]), 0x1000)).unwrap()
            })
        });
    }
    group.finish();
}

fn dirty_log(c: &mut Criterion) {
    let mut m = manager(8);
    let log = memfd(4096);
    m.set_log_base(&log, 4096, 0).unwrap();
    let mem = m.memory().memory();
    let mut group = c.benchmark_group("dirty_log");
    // Baseline: the same table and write with vm-memory's no-op bitmap.
    let mut plain = GuestMemoryManager::<()>::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()));
    plain.set_table(table(8)).unwrap();
    let plain_mem = plain.memory().memory();
    group.bench_function("write_obj_u64_no_bitmap", |b| {
        b.iter(|| {
            plain_mem
                .write_obj(black_box(1u64), GuestAddress(0x1_2340))
                .unwrap()
        })
    });
    m.set_logging(false).unwrap();
    group.bench_function("write_obj_u64_logging_off", |b| {
        b.iter(|| {
            mem.write_obj(black_box(1u64), GuestAddress(0x1_2340))
                .unwrap()
        })
    });
    m.set_logging(true).unwrap();
    group.bench_function("write_obj_u64_logging_on", |b| {
        b.iter(|| {
            mem.write_obj(black_box(1u64), GuestAddress(0x1_2340))
                .unwrap()
        })
    });
    let buf = vec![0u8; 64 * 1024];
    group.bench_function("write_slice_64k_logging_on", |b| {
        b.iter(|| {
            mem.write_slice(black_box(&buf), GuestAddress(0x2_0000))
                .unwrap()
        })
    });
    group.bench_function("mark_dirty_16_pages", |b| {
        b.iter(|| {
            m.mark_dirty(black_box(GuestAddress(0x3_0000)), 0x10000)
                .unwrap()
        })
    });
    group.finish();
}

/// The IOVA-to-guest cost an access behind an IOMMU adds: an IOTLB hit among `n` page-sized
/// entries, then the VMM-to-guest step, and the same through `SharedIotlb::resolve` (mutex,
/// result vector).
fn iotlb(c: &mut Criterion) {
    const PAGE: u64 = 0x1000;
    let m = manager(8);
    let mut group = c.benchmark_group("iotlb");
    for n in [16u64, 256, 2048] {
        let mut tlb = Iotlb::new();
        // IOVA page i maps to a scattered page of region 0's VMM range.
        for i in 0..n {
            let uaddr = vmm_of(0, 8) + ((i * 97) % (REGION / PAGE)) * PAGE;
            tlb.update(
                0x1_0000_0000 + i * PAGE,
                PAGE,
                uaddr,
                Permissions::ReadWrite,
            )
            .unwrap();
        }
        let iovas: Vec<u64> = (0..n).map(|i| 0x1_0000_0000 + i * PAGE + 0x100).collect();
        group.bench_with_input(BenchmarkId::new("lookup", n), &iovas, |b, iovas| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % iovas.len();
                black_box(tlb.lookup(black_box(iovas[i]), 512, Permissions::Read)).unwrap()
            })
        });
        group.bench_with_input(
            BenchmarkId::new("lookup_to_guest", n),
            &iovas,
            |b, iovas| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % iovas.len();
                    let hit = tlb
                        .lookup(black_box(iovas[i]), 512, Permissions::Read)
                        .unwrap();
                    black_box(m.vmm_to_guest(hit.addr, hit.len)).unwrap()
                })
            },
        );
        let shared = SharedIotlb::new(tlb);
        group.bench_with_input(BenchmarkId::new("shared_resolve", n), &iovas, |b, iovas| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % iovas.len();
                black_box(shared.resolve(
                    black_box(iovas[i]),
                    512,
                    Permissions::Read,
                    Duration::ZERO,
                    |_, _| false,
                ))
                .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, translate, iotlb, dirty_log);
criterion_main!(benches);
