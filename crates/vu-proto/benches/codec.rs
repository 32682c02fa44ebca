//! Codec throughput: decode and encode per message family, no I/O.
//!
//! Run with `cargo bench -p vu-proto --bench codec`. Decoding starts from bytes already
//! in memory and messages without fds, so the numbers are the parser's cost alone.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use vu_proto::payload::{
    ConfigFlags, DeviceConfig, Iotlb, IotlbPerm, IotlbType, MemoryRegion, MemoryTable, VringAddr,
    VringAddrFlags, VringState, U64,
};
use vu_proto::{
    FrontendReq, FrontendRequest, Header, HeaderFlags, Payload, RawMessage, RequestCode,
};

fn region(i: u64) -> MemoryRegion {
    MemoryRegion {
        guest_phys_addr: i << 30,
        memory_size: 1 << 30,
        user_addr: 0x7f00_0000_0000 + (i << 30),
        mmap_offset: 0,
        #[cfg(feature = "xen")]
        xen_mmap_flags: vu_proto::payload::XenMmapFlags::FOREIGN,
        #[cfg(feature = "xen")]
        xen_mmap_data: 0,
    }
}

/// Benchmarks `decode_body` and `encode` of one payload value.
fn family<T: Payload>(c: &mut Criterion, name: &str, value: &T) {
    let bytes = value.to_vec();
    let mut group = c.benchmark_group(name);
    group.bench_function("decode", |b| {
        b.iter(|| T::decode_body(RequestCode(0), black_box(&bytes)))
    });
    let mut out = Vec::with_capacity(bytes.len());
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(value).encode(&mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

fn header(c: &mut Criterion) {
    let bytes = Header::new(FrontendReq::SetVringNum, HeaderFlags::NEED_REPLY, 8).to_bytes();
    c.bench_function("header/read", |b| {
        b.iter(|| Header::read(black_box(&bytes)))
    });
    let h = Header::read(&bytes).unwrap();
    c.bench_function("header/to_bytes", |b| b.iter(|| black_box(h).to_bytes()));
}

fn families(c: &mut Criterion) {
    family(c, "u64", &U64(0x1_4000_0000));
    family(c, "vring_state", &VringState { index: 1, num: 256 });
    family(
        c,
        "vring_addr",
        &VringAddr {
            index: 1,
            flags: VringAddrFlags::empty(),
            descriptor: 0x1000,
            used: 0x2000,
            available: 0x3000,
            log: 0,
        },
    );
    family(
        c,
        "memory_table_8",
        &MemoryTable {
            regions: (0..8).map(region).collect(),
        },
    );
    family(
        c,
        "config_256",
        &DeviceConfig {
            offset: 0,
            flags: ConfigFlags::empty(),
            data: vec![0; 256],
        },
    );
    family(
        c,
        "iotlb",
        &Iotlb {
            iova: 0x1000,
            size: 0x1000,
            uaddr: 0x7000,
            perm: IotlbPerm::ReadWrite,
            kind: IotlbType::Update,
        },
    );
}

fn whole_message(c: &mut Criterion) {
    let (header, body) =
        FrontendRequest::<std::os::fd::OwnedFd>::SetVringNum(VringState { index: 0, num: 256 })
            .encode(HeaderFlags::empty());
    c.bench_function("message/decode_set_vring_num", |b| {
        b.iter_batched(
            || RawMessage {
                header,
                body: body.clone(),
                fds: Vec::new(),
            },
            FrontendRequest::decode,
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, header, families, whole_message);
criterion_main!(benches);
