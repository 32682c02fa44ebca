//! The fuzz corpus on stable: every committed input of `tests/fuzz/corpus/<target>/` goes
//! through the same body the cargo-fuzz target calls, so a crash the fuzzer found (and whose
//! input was committed) stays fixed without nightly.
//!
//! The seeds are generated here from real message encodings, one per known class of attack
//! (docs/security.md). `every_seed_is_committed` checks that the committed corpus holds them;
//! after changing a seed, regenerate the files with
//! `VU_WRITE_FUZZ_SEEDS=1 cargo test -p vu-tests --test fuzz_corpus`.

use std::fs;
use std::path::PathBuf;

use vu_daemon::fuzzing::{
    iotlb, memory_table, session, session_guest_write, session_message, SESSION_DISCONNECT,
    SESSION_PROCESS,
};
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::fuzzing::{decode, decode_input};
use vu_proto::header::{Header, HeaderFlags};
use vu_proto::payload::{
    Inflight, Iotlb, IotlbPerm, IotlbType, Log, MemoryRegion, MemoryTable, Payload,
    SingleMemoryRegion, VringAddr, VringAddrFlags, VringEnable, VringState, U64,
};
use vu_proto::request::FrontendReq;
use vu_tests::fill_hostile::{fill_queue, fill_queue_input, Take, FILL_DATA};
use vu_tests::hostile::{
    blk_queue, blk_queue_input, descriptor, BLK_DATA_ADDR, DESC_INDIRECT, DESC_NEXT, DESC_WRITE,
};
use vu_tests::packed_hostile::{packed_descriptor, packed_queue, packed_queue_input, PACKED_DATA};
use vu_vring::fuzzing::inflight_region;

/// Where the frontend maps guest memory, in the session seeds.
const VMM: u64 = 0x7f00_0000_0000;
/// Guest layout of the session seeds (guest addresses).
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: u64 = 0x4000;
/// Pages of the session seeds' one region (512 KiB).
const PAGES: u8 = 128;
const REGION: u64 = PAGES as u64 * 4096;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn body<P: Payload>(payload: &P) -> Vec<u8> {
    let mut out = Vec::new();
    payload.encode(&mut out);
    out
}

fn region(gpa: u64, size: u64, vmm: u64) -> MemoryRegion {
    MemoryRegion {
        guest_phys_addr: gpa,
        memory_size: size,
        user_addr: vmm,
        mmap_offset: 0,
    }
}

/// A message of a session input.
fn msg(req: FrontendReq, payload: &[u8], fds: &[u8]) -> Vec<u8> {
    session_message(req.code().0, true, payload, fds)
}

fn table(regions: &[MemoryRegion]) -> Vec<u8> {
    body(&MemoryTable {
        regions: regions.to_vec(),
    })
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    body(&VringState { index, num })
}

/// Feature handshake and a one-region memory table.
fn handshake() -> Vec<u8> {
    let features = VirtioFeatures::VERSION_1
        | VirtioFeatures::PROTOCOL_FEATURES
        | VirtioFeatures::RING_INDIRECT_DESC
        | VirtioFeatures::LOG_ALL;
    let protocol = ProtocolFeatures::MQ
        | ProtocolFeatures::LOG_SHMFD
        | ProtocolFeatures::REPLY_ACK
        | ProtocolFeatures::INFLIGHT_SHMFD
        | ProtocolFeatures::CONFIGURE_MEM_SLOTS
        | ProtocolFeatures::CONFIG;
    let mut out = msg(FrontendReq::SetOwner, &[], &[]);
    out.extend(msg(FrontendReq::GetFeatures, &[], &[]));
    out.extend(msg(
        FrontendReq::SetProtocolFeatures,
        &body(&U64(protocol.bits())),
        &[],
    ));
    out.extend(msg(
        FrontendReq::SetFeatures,
        &body(&U64(features.bits())),
        &[],
    ));
    out.extend(msg(
        FrontendReq::SetMemTable,
        &table(&[region(0, REGION, VMM)]),
        &[PAGES],
    ));
    out
}

/// Handshake, then queue 0 of size 16 started and enabled.
fn running() -> Vec<u8> {
    let mut out = handshake();
    out.extend(msg(FrontendReq::SetVringNum, &vring_state(0, 16), &[]));
    let addr = VringAddr {
        index: 0,
        flags: VringAddrFlags::empty(),
        descriptor: VMM + DESC,
        used: VMM + USED,
        available: VMM + AVAIL,
        log: 0,
    };
    out.extend(msg(FrontendReq::SetVringAddr, &body(&addr), &[]));
    out.extend(msg(FrontendReq::SetVringBase, &vring_state(0, 0), &[]));
    out.extend(msg(FrontendReq::SetVringCall, &body(&U64(0)), &[0]));
    out.extend(msg(FrontendReq::SetVringKick, &body(&U64(0)), &[0]));
    let enable = VringEnable {
        index: 0,
        enable: true,
    };
    out.extend(msg(FrontendReq::SetVringEnable, &body(&enable), &[]));
    out
}

/// The guest offers chains with these heads over this descriptor table, then the device
/// processes the queue.
fn offer(descs: &[[u8; 16]], heads: &[u16]) -> Vec<u8> {
    let mut out = session_guest_write(DESC, &descs.concat());
    let mut avail = vec![0, 0];
    avail.extend_from_slice(&u16::try_from(heads.len()).unwrap().to_le_bytes());
    for h in heads {
        avail.extend_from_slice(&h.to_le_bytes());
    }
    out.extend(session_guest_write(AVAIL, &avail));
    out.push(SESSION_PROCESS);
    out
}

/// A well-formed three-descriptor request at `DATA`.
fn good_chain() -> Vec<[u8; 16]> {
    vec![
        descriptor(DATA, 16, DESC_NEXT, 1),
        descriptor(DATA + 0x1000, 512, DESC_WRITE | DESC_NEXT, 2),
        descriptor(DATA + 0x2000, 1, DESC_WRITE, 0),
    ]
}

fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |parts: &[Vec<u8>]| parts.concat();
    let get_base = msg(FrontendReq::GetVringBase, &vring_state(0, 0), &[]);
    let long_chain: Vec<[u8; 16]> = (0..16u16)
        .map(|i| descriptor(DATA, 8, DESC_NEXT, (i + 1) % 16))
        .collect();
    let two_regions = table(&[
        region(0, REGION, VMM),
        region(REGION, REGION, VMM + 0x1000_0000),
    ]);
    let mut seeds = vec![
        ("handshake", handshake()),
        (
            "running_queue",
            with(&[running(), offer(&good_chain(), &[0]), get_base.clone()]),
        ),
        (
            "descriptor_loop",
            with(&[
                running(),
                offer(&[descriptor(DATA, 16, DESC_NEXT, 0)], &[0]),
            ]),
        ),
        (
            "chain_longer_than_ring",
            with(&[running(), offer(&long_chain, &[0])]),
        ),
        (
            "unmapped_descriptor",
            with(&[
                running(),
                offer(&[descriptor(0xdead_0000_0000, 4096, 0, 0)], &[0]),
            ]),
        ),
        (
            "descriptor_crossing_region_end",
            with(&[
                running(),
                offer(&[descriptor(REGION - 8, 16, DESC_WRITE, 0)], &[0]),
            ]),
        ),
        (
            "zero_length_descriptors",
            with(&[
                running(),
                offer(
                    &[
                        descriptor(DATA, 0, DESC_NEXT, 1),
                        descriptor(DATA, 0, DESC_WRITE, 0),
                    ],
                    &[0],
                ),
            ]),
        ),
        (
            "indirect_length_not_multiple_of_16",
            with(&[
                running(),
                session_guest_write(DATA + 0x3000, &descriptor(DATA, 16, 0, 0)),
                offer(&[descriptor(DATA + 0x3000, 17, DESC_INDIRECT, 0)], &[0]),
            ]),
        ),
        (
            "indirect_table_crossing_regions",
            with(&[
                running(),
                msg(FrontendReq::SetMemTable, &two_regions, &[PAGES, PAGES]),
                offer(&[descriptor(REGION - 16, 32, DESC_INDIRECT, 0)], &[0]),
            ]),
        ),
        (
            "head_index_out_of_range",
            with(&[running(), offer(&good_chain(), &[16, 0xffff])]),
        ),
        (
            "mem_table_replaced_while_running",
            with(&[
                running(),
                offer(&good_chain(), &[0]),
                msg(
                    FrontendReq::SetMemTable,
                    &table(&[region(0, 0x1000, VMM)]),
                    &[1],
                ),
                vec![SESSION_PROCESS],
                get_base.clone(),
            ]),
        ),
        (
            "region_removed_while_running",
            with(&[
                running(),
                msg(
                    FrontendReq::RemMemReg,
                    &body(&SingleMemoryRegion {
                        region: region(0, REGION, VMM),
                    }),
                    &[],
                ),
                offer(&good_chain(), &[0]),
                get_base,
            ]),
        ),
        (
            "queue_index_after_narrowing",
            with(&[
                handshake(),
                msg(FrontendReq::SetVringNum, &vring_state(256, 16), &[]),
                msg(FrontendReq::SetVringNum, &vring_state(65536, 16), &[]),
                msg(FrontendReq::SetVringNum, &vring_state(2, 16), &[]),
                msg(FrontendReq::SetVringNum, &vring_state(u32::MAX, 16), &[]),
                msg(FrontendReq::GetVringBase, &vring_state(256, 0), &[]),
                msg(FrontendReq::SetVringCall, &body(&U64(2)), &[0]),
            ]),
        ),
        (
            "log_base_overflow",
            with(&[
                handshake(),
                msg(
                    FrontendReq::SetLogBase,
                    &body(&Log {
                        mmap_size: u64::MAX,
                        mmap_offset: 0x1000,
                    }),
                    &[1],
                ),
                msg(
                    FrontendReq::SetLogBase,
                    &body(&Log {
                        mmap_size: 0x1000,
                        mmap_offset: u64::MAX - 0xfff,
                    }),
                    &[1],
                ),
            ]),
        ),
        (
            "region_offset_overflow",
            with(&[
                handshake(),
                msg(
                    FrontendReq::SetMemTable,
                    &table(&[MemoryRegion {
                        mmap_offset: u64::MAX - 0xfff,
                        ..region(0, 0x2000, VMM)
                    }]),
                    &[2],
                ),
                msg(
                    FrontendReq::AddMemReg,
                    &body(&SingleMemoryRegion {
                        region: region(u64::MAX - 0xfff, 0x2000, VMM),
                    }),
                    &[2],
                ),
            ]),
        ),
        (
            "inflight_out_of_range",
            with(&[
                handshake(),
                msg(
                    FrontendReq::GetInflightFd,
                    &body(&Inflight {
                        mmap_size: 0,
                        mmap_offset: 0,
                        num_queues: u16::MAX,
                        queue_size: u16::MAX,
                    }),
                    &[],
                ),
                msg(
                    FrontendReq::GetInflightFd,
                    &body(&Inflight {
                        mmap_size: 0,
                        mmap_offset: 0,
                        num_queues: 0,
                        queue_size: 0,
                    }),
                    &[],
                ),
                msg(
                    FrontendReq::SetInflightFd,
                    &body(&Inflight {
                        mmap_size: 0x1000,
                        mmap_offset: u64::MAX,
                        num_queues: 2,
                        queue_size: 16,
                    }),
                    &[1],
                ),
            ]),
        ),
        (
            "wrong_sizes_and_fd_counts",
            with(&[
                handshake(),
                msg(FrontendReq::SetVringNum, &[0; 4], &[]),
                msg(FrontendReq::SetVringNum, &vring_state(0, 16), &[0, 0, 0]),
                msg(
                    FrontendReq::SetMemTable,
                    &table(&[region(0, 0x1000, VMM), region(0x1000, 0x1000, VMM + 0x1000)]),
                    &[1],
                ),
                msg(FrontendReq::SetFeatures, &[0; 12], &[]),
            ]),
        ),
        (
            "disconnect_and_again",
            with(&[
                running(),
                vec![SESSION_DISCONNECT],
                running(),
                offer(&good_chain(), &[0]),
            ]),
        ),
    ];
    // Repeated messages that must not accumulate state.
    let mut repeated = handshake();
    for _ in 0..8 {
        repeated.extend(msg(FrontendReq::SetVringNum, &vring_state(0, 16), &[]));
        repeated.extend(msg(FrontendReq::SetVringKick, &body(&U64(0)), &[0]));
        repeated.extend(msg(FrontendReq::SetVringCall, &body(&U64(0)), &[0]));
        repeated.extend(msg(
            FrontendReq::SetMemTable,
            &table(&[region(0, 0x1000, VMM)]),
            &[1],
        ));
    }
    seeds.push(("repeated_messages", repeated));
    seeds
}

fn decode_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let frame = |req: FrontendReq, body: &[u8], nfds: u8| {
        let header = Header::new(
            req,
            HeaderFlags::NEED_REPLY,
            u32::try_from(body.len()).unwrap(),
        );
        decode_input(false, &header, body, nfds)
    };
    vec![
        ("get_features", frame(FrontendReq::GetFeatures, &[], 0)),
        (
            "set_features",
            frame(FrontendReq::SetFeatures, &body(&U64(1 << 32)), 0),
        ),
        (
            "set_mem_table",
            frame(
                FrontendReq::SetMemTable,
                &table(&[region(0, 0x1000, VMM), region(0x1000, 0x1000, VMM + 0x1000)]),
                2,
            ),
        ),
        (
            "set_mem_table_too_few_fds",
            frame(
                FrontendReq::SetMemTable,
                &table(&[region(0, 0x1000, VMM)]),
                0,
            ),
        ),
        (
            "set_vring_kick_extra_fds",
            frame(FrontendReq::SetVringKick, &body(&U64(0)), 9),
        ),
        (
            "set_vring_addr",
            frame(
                FrontendReq::SetVringAddr,
                &body(&VringAddr {
                    index: 1,
                    flags: VringAddrFlags::empty(),
                    descriptor: 1,
                    used: 2,
                    available: 3,
                    log: 4,
                }),
                0,
            ),
        ),
        (
            "set_vring_num_short",
            frame(FrontendReq::SetVringNum, &[1, 0, 0, 0], 0),
        ),
        (
            "set_log_base",
            frame(
                FrontendReq::SetLogBase,
                &body(&Log {
                    mmap_size: u64::MAX,
                    mmap_offset: 1,
                }),
                1,
            ),
        ),
        (
            "get_inflight_fd",
            frame(
                FrontendReq::GetInflightFd,
                &body(&Inflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: u16::MAX,
                    queue_size: u16::MAX,
                }),
                0,
            ),
        ),
        (
            "add_mem_reg",
            frame(
                FrontendReq::AddMemReg,
                &body(&SingleMemoryRegion {
                    region: region(0, 0x1000, VMM),
                }),
                1,
            ),
        ),
        (
            "get_config",
            frame(
                FrontendReq::GetConfig,
                &[0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                0,
            ),
        ),
        (
            "backend_config_change",
            decode_input(
                true,
                &Header::new(
                    vu_proto::request::BackendReq::ConfigChangeMsg,
                    HeaderFlags::empty(),
                    0,
                ),
                &[],
                0,
            ),
        ),
        (
            "unknown_code",
            decode_input(
                false,
                &Header::new(
                    vu_proto::request::RequestCode(0xdead),
                    HeaderFlags::empty(),
                    4,
                ),
                &[1, 2, 3, 4],
                1,
            ),
        ),
    ]
}

fn u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A region of a `memory_table` input.
fn mt_region(gpa: u64, size: u64, vmm: u64, offset: u64, pages: u8) -> Vec<u8> {
    let mut out = u64s(&[gpa, size, vmm, offset]);
    out.push(pages);
    out
}

fn memory_table_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let two = [
        vec![0, 2],
        mt_region(0, 0x4000, VMM, 0, 4),
        mt_region(0x4000, 0x4000, VMM + 0x10000, 0, 4),
    ]
    .concat();
    vec![
        (
            "set_add_remove_translate",
            [
                two.clone(),
                vec![1],
                mt_region(0x10000, 0x2000, VMM + 0x20000, 0x1000, 3),
                vec![3],
                u64s(&[VMM + 0x3ff8, 16]),
                vec![5],
                u64s(&[0x3ff8]),
                16u16.to_le_bytes().to_vec(),
                vec![2],
                u64s(&[0x4000, 0x4000, VMM + 0x10000]),
                vec![5],
                u64s(&[0x4000]),
                8u16.to_le_bytes().to_vec(),
            ]
            .concat(),
        ),
        (
            "overflowing_regions",
            [
                vec![0, 1],
                mt_region(u64::MAX - 0xfff, 0x2000, VMM, 0, 2),
                vec![1],
                mt_region(0, 0x2000, u64::MAX - 0xfff, 0, 2),
                vec![1],
                mt_region(0, 0x2000, VMM, u64::MAX - 0xfff, 2),
                vec![1],
                mt_region(0, 0x4000, VMM, 0, 1),
            ]
            .concat(),
        ),
        (
            "log_base_overflow",
            [
                two.clone(),
                vec![4, 1],
                u64s(&[u64::MAX, 0x1000]),
                vec![4, 2],
                u64s(&[0x1000, u64::MAX - 0xfff]),
                vec![4, 1],
                u64s(&[0x1000, 0]),
            ]
            .concat(),
        ),
        (
            "overlapping_regions",
            [
                vec![0, 2],
                mt_region(0, 0x4000, VMM, 0, 4),
                mt_region(0x2000, 0x4000, VMM + 0x10000, 0, 4),
                vec![1],
                mt_region(0x10000, 0x2000, VMM + 0x1000, 0, 2),
            ]
            .concat(),
        ),
    ]
}

fn blk_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let d = BLK_DATA_ADDR;
    // A read of one sector at sector 1: header, data, status.
    let read_header = [0u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    let read_header = [read_header, 1u64.to_le_bytes().to_vec()].concat();
    let write_header = [1u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    let write_header = [write_header, 2u64.to_le_bytes().to_vec()].concat();
    let request = |header: &[u8], data_flags: u16| {
        (
            vec![
                descriptor(d, 16, DESC_NEXT, 1),
                descriptor(d + 0x100, 512, data_flags | DESC_NEXT, 2),
                descriptor(d + 0x400, 1, DESC_WRITE, 0),
            ],
            header.to_vec(),
        )
    };
    let (read_descs, read_data) = request(&read_header, DESC_WRITE);
    let (write_descs, write_data) = request(&write_header, 0);
    let indirect_table = [
        descriptor(d, 16, DESC_NEXT, 1),
        descriptor(d + 0x100, 512, DESC_WRITE | DESC_NEXT, 2),
        descriptor(d + 0x400, 1, DESC_WRITE, 0),
    ]
    .concat();
    let mut indirect_data = read_header.clone();
    indirect_data.resize(0x800, 0);
    indirect_data.extend_from_slice(&indirect_table);
    let long: Vec<[u8; 16]> = (0..16u16)
        .map(|i| descriptor(d, 16, DESC_NEXT, (i + 1) % 16))
        .collect();
    vec![
        ("read", blk_queue_input(4, &read_descs, &[0], &read_data)),
        ("write", blk_queue_input(4, &write_descs, &[0], &write_data)),
        (
            "indirect_read",
            blk_queue_input(
                4,
                &[descriptor(d + 0x800, 48, DESC_INDIRECT, 0)],
                &[0],
                &indirect_data,
            ),
        ),
        (
            "indirect_length_not_multiple_of_16",
            blk_queue_input(
                4,
                &[descriptor(d + 0x800, 47, DESC_INDIRECT, 0)],
                &[0],
                &indirect_data,
            ),
        ),
        (
            "indirect_table_crossing_regions",
            blk_queue_input(4, &[descriptor(0xfff0, 48, DESC_INDIRECT, 0)], &[0], &[]),
        ),
        (
            "indirect_table_in_a_hole",
            blk_queue_input(4, &[descriptor(0x20000, 48, DESC_INDIRECT, 0)], &[0], &[]),
        ),
        (
            "descriptor_loop",
            blk_queue_input(
                4,
                &[
                    descriptor(d, 16, DESC_NEXT, 1),
                    descriptor(d, 1, DESC_NEXT | DESC_WRITE, 0),
                ],
                &[0],
                &read_header,
            ),
        ),
        (
            "chain_longer_than_ring",
            blk_queue_input(4, &long, &[0], &read_header),
        ),
        (
            "unmapped_and_crossing_buffers",
            blk_queue_input(
                4,
                &[
                    descriptor(d, 16, DESC_NEXT, 1),
                    descriptor(0xfff8, 512, DESC_WRITE | DESC_NEXT, 2),
                    descriptor(0xdead_beef_0000, 1, DESC_WRITE, 0),
                ],
                &[0, 1, 2],
                &read_header,
            ),
        ),
        (
            "zero_length_and_huge_lengths",
            blk_queue_input(
                4,
                &[
                    descriptor(d, 0, DESC_NEXT, 1),
                    descriptor(d, u32::MAX, DESC_WRITE | DESC_NEXT, 2),
                    descriptor(d, 0, DESC_WRITE, 0),
                ],
                &[0],
                &read_header,
            ),
        ),
        (
            "avail_index_far_ahead",
            [
                blk_queue_input(4, &read_descs, &[0; 16], &[]),
                vec![0xff; 4],
            ]
            .concat(),
        ),
    ]
}

/// An `inflight` input: `desc_num`, the used ring's index, then the region's bytes.
fn inflight_input(desc_num: u16, used_idx: u16, region: &[u8]) -> Vec<u8> {
    [&desc_num.to_le_bytes()[..], &used_idx.to_le_bytes(), region].concat()
}

/// A version-1 region header of `desc_num` descriptors.
fn inflight_header(desc_num: u16, last_batch_head: u16, used_idx: u16) -> Vec<u8> {
    [
        &0u64.to_le_bytes()[..],
        &1u16.to_le_bytes(),
        &desc_num.to_le_bytes(),
        &last_batch_head.to_le_bytes(),
        &used_idx.to_le_bytes(),
    ]
    .concat()
}

/// One descriptor state: flag, padding, next, counter.
fn inflight_desc(inflight: u8, next: u16, counter: u64) -> Vec<u8> {
    [
        &[inflight, 0, 0, 0, 0, 0][..],
        &next.to_le_bytes(),
        &counter.to_le_bytes(),
    ]
    .concat()
}

fn inflight_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let descs = |states: &[(u8, u16, u64)]| -> Vec<u8> {
        states
            .iter()
            .flat_map(|&(f, n, c)| inflight_desc(f, n, c))
            .collect()
    };
    vec![
        ("uninitialised", inflight_input(8, 3, &[])),
        (
            "two_in_flight",
            inflight_input(
                4,
                0,
                &[
                    inflight_header(4, 0, 0),
                    descs(&[(1, 0, 7), (0, 0, 0), (1, 0, 5)]),
                ]
                .concat(),
            ),
        ),
        (
            "batch_partly_published",
            inflight_input(
                4,
                1,
                &[
                    inflight_header(4, 2, 0),
                    descs(&[(1, 0, 0), (0, 0, 0), (1, 0, 1), (1, 0, 2)]),
                ]
                .concat(),
            ),
        ),
        (
            "last_batch_head_past_ring",
            inflight_input(4, 1, &inflight_header(4, 9, 0)),
        ),
        (
            "batch_list_loop",
            inflight_input(
                4,
                4,
                &[inflight_header(4, 1, 0), descs(&[(1, 0, 0), (1, 1, 0)])].concat(),
            ),
        ),
        (
            "used_idx_far_behind",
            inflight_input(4, 0x8000, &inflight_header(4, 0, 0)),
        ),
        (
            "desc_num_mismatch",
            inflight_input(4, 0, &inflight_header(16, 0, 0)),
        ),
        (
            "bad_version",
            inflight_input(4, 0, &[&[0u8; 8][..], &9u16.to_le_bytes()].concat()),
        ),
        (
            "bad_flag",
            inflight_input(
                2,
                0,
                &[inflight_header(2, 0, 0), descs(&[(2, 0, 0)])].concat(),
            ),
        ),
        (
            "wrapping_counters",
            inflight_input(
                4,
                0,
                &[
                    inflight_header(4, 0, 0),
                    descs(&[(1, 0, u64::MAX), (1, 0, u64::MAX - 1), (1, 0, 0)]),
                ]
                .concat(),
            ),
        ),
    ]
}

/// One `IOTLB_MSG` body of an `iotlb` input.
fn iotlb_msg(kind: IotlbType, iova: u64, size: u64, uaddr: u64, perm: IotlbPerm) -> Vec<u8> {
    body(&Iotlb {
        iova,
        size,
        uaddr,
        perm,
        kind,
    })
}

/// The raw bytes of a message the codec refuses (wrapping or unknown values), to check they
/// are skipped.
fn raw_iotlb(iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) -> Vec<u8> {
    let mut out = u64s(&[iova, size, uaddr]);
    out.extend_from_slice(&[perm, kind, 0, 0, 0, 0, 0, 0]);
    out
}

fn iotlb_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use IotlbPerm::{Read, ReadWrite};
    use IotlbType::{AccessFail, Invalidate, Miss, Update};
    let flood: Vec<u8> = (0..40u64)
        .flat_map(|i| iotlb_msg(Update, i * 0x1000, 0x1000, VMM + i * 0x1000, ReadWrite))
        .collect();
    vec![
        (
            "update_lookup_invalidate",
            [
                iotlb_msg(Update, 0x1000, 0x3000, VMM, ReadWrite),
                iotlb_msg(Miss, 0x1ff0, 0x20, VMM, Read),
                iotlb_msg(Invalidate, 0x2000, 0x1000, 0, Read),
                iotlb_msg(Miss, 0x1ff0, 0x20, VMM, Read),
            ]
            .concat(),
        ),
        (
            "overlapping_updates",
            [
                iotlb_msg(Update, 0, 0x4000, VMM, ReadWrite),
                iotlb_msg(Update, 0x1000, 0x1000, VMM + 0x10000, Read),
                iotlb_msg(Update, 0x800, 0x3000, VMM + 0x20000, ReadWrite),
                iotlb_msg(AccessFail, 0, 0x4000, 0, ReadWrite),
            ]
            .concat(),
        ),
        (
            "zero_size_and_wrapping",
            [
                iotlb_msg(Update, 0x1000, 0, VMM, Read),
                raw_iotlb(u64::MAX - 0xfff, 0x2000, VMM, 3, 2),
                raw_iotlb(0, 0x2000, u64::MAX, 3, 2),
                raw_iotlb(0, 0x1000, VMM, 9, 2),
                raw_iotlb(0, 0x1000, VMM, 3, 9),
                iotlb_msg(Update, u64::MAX - 0x1fff, 0x1000, VMM, Read),
                iotlb_msg(Miss, u64::MAX - 0x1fff, 0x1000, 0, Read),
                iotlb_msg(Invalidate, 0, 0, 0, Read),
            ]
            .concat(),
        ),
        ("update_flood", flood),
    ]
}

/// Packed descriptor flags of the `packed_queue` seeds.
const P_NEXT: u16 = 1;
const P_WRITE: u16 = 2;
const P_INDIRECT: u16 = 4;
const P_AVAIL: u16 = 1 << 7;
const P_USED: u16 = 1 << 15;
/// A fresh packed ring's `SET_VRING_BASE` word: avail 0 and used 0, both wrap counters 1.
const P_FRESH: u32 = 0x8000_8000;

fn packed_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let d = PACKED_DATA;
    let enabled = [0, 0, 0, 0];
    let request = [
        packed_descriptor(d, 16, 0, P_AVAIL | P_NEXT),
        packed_descriptor(d + 0x100, 512, 0, P_AVAIL | P_WRITE | P_NEXT),
        packed_descriptor(d + 0x400, 1, 5, P_AVAIL | P_WRITE),
    ];
    let indirect_table = [
        packed_descriptor(d, 16, 0, 0),
        packed_descriptor(d + 0x100, 512, 0, P_WRITE | P_NEXT),
        packed_descriptor(d + 0x400, 1, 0, P_WRITE),
    ]
    .concat();
    let mut indirect_data = vec![0u8; 0x800];
    indirect_data.extend_from_slice(&indirect_table);
    let indirect = |addr: u64, len: u32| [packed_descriptor(addr, len, 9, P_AVAIL | P_INDIRECT)];
    // Avail and used at position 15 of 16, wrap counters 1: a chain of two crosses the end,
    // its second descriptor (position 0) made available with wrap counter 0.
    let at_15 = 0x800f_800f;
    let mut wrapping = vec![[0u8; 16]; 16];
    wrapping[15] = packed_descriptor(d, 16, 0, P_AVAIL | P_NEXT);
    wrapping[0] = packed_descriptor(d + 0x100, 8, 4, P_USED | P_WRITE);
    let mut flipped = wrapping.clone();
    flipped[0] = packed_descriptor(d + 0x100, 8, 4, P_AVAIL | P_WRITE);
    let endless: Vec<[u8; 16]> = (0..16)
        .map(|_| packed_descriptor(d, 16, 1, P_AVAIL | P_NEXT))
        .collect();
    vec![
        (
            "request",
            packed_queue_input(4, false, P_FRESH, enabled, &request, &[]),
        ),
        (
            "request_event_idx_desc",
            packed_queue_input(4, true, P_FRESH, [1, 0x80, 2, 0], &request, &[]),
        ),
        (
            "indirect",
            packed_queue_input(
                4,
                false,
                P_FRESH,
                enabled,
                &indirect(d + 0x800, 48),
                &indirect_data,
            ),
        ),
        (
            "indirect_length_not_multiple_of_16",
            packed_queue_input(
                4,
                false,
                P_FRESH,
                enabled,
                &indirect(d + 0x800, 47),
                &indirect_data,
            ),
        ),
        (
            "indirect_table_crossing_regions",
            packed_queue_input(4, false, P_FRESH, enabled, &indirect(0xfff0, 48), &[]),
        ),
        (
            "indirect_table_in_a_hole",
            packed_queue_input(4, false, P_FRESH, enabled, &indirect(0x20000, 48), &[]),
        ),
        (
            "chain_across_the_ring_end",
            packed_queue_input(4, false, at_15, enabled, &wrapping, &[]),
        ),
        (
            "flipped_wrap_counter_in_a_chain",
            packed_queue_input(4, false, at_15, enabled, &flipped, &[]),
        ),
        (
            "avail_and_used_both_set",
            packed_queue_input(
                4,
                false,
                P_FRESH,
                enabled,
                &[packed_descriptor(d, 16, 0, P_AVAIL | P_USED)],
                &[],
            ),
        ),
        (
            "endless_chain",
            packed_queue_input(4, false, P_FRESH, enabled, &endless, &[]),
        ),
        (
            "reused_buffer_ids",
            packed_queue_input(
                4,
                false,
                P_FRESH,
                enabled,
                &[
                    packed_descriptor(d, 16, 3, P_AVAIL),
                    packed_descriptor(d + 0x100, 16, 3, P_AVAIL | P_WRITE),
                ],
                &[],
            ),
        ),
        (
            "base_past_the_ring",
            packed_queue_input(4, false, P_FRESH | 40, enabled, &request, &[]),
        ),
        (
            "buffers_unmapped_and_crossing",
            packed_queue_input(
                4,
                false,
                P_FRESH,
                enabled,
                &[
                    packed_descriptor(0xfff8, 512, 0, P_AVAIL | P_WRITE | P_NEXT),
                    packed_descriptor(0xdead_beef_0000, 1, 0, P_AVAIL | P_WRITE | P_NEXT),
                    packed_descriptor(d, u32::MAX, 2, P_AVAIL | P_WRITE),
                ],
                &[],
            ),
        ),
    ]
}

/// Seeds of `fill_queue`: the device's takes and the chains it finds.
fn fill_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let d = FILL_DATA;
    let take = |bytes, max_chains, action| Take {
        bytes,
        max_chains,
        action,
    };
    // Four 64-byte writable chains.
    let four: Vec<[u8; 16]> = (0..4)
        .map(|i| descriptor(d + 0x100 * i, 64, DESC_WRITE, 0))
        .collect();
    let packed_four: Vec<[u8; 16]> = (0..4u16)
        .map(|i| packed_descriptor(d + 0x100 * u64::from(i), 64, i, P_AVAIL | P_WRITE))
        .collect();
    let heads = [0, 1, 2, 3];
    vec![
        (
            "one_chain_each",
            fill_queue_input(4, false, &[take(60, 1, 255); 4], &four, &heads, &[]),
        ),
        (
            "gathered_and_given_back",
            fill_queue_input(
                4,
                false,
                &[take(150, 64, 255), take(100, 64, 0), take(10, 64, 40)],
                &four,
                &heads,
                &[],
            ),
        ),
        (
            "split_header_and_empty_descriptor",
            fill_queue_input(
                4,
                false,
                &[take(12, 1, 255)],
                &[
                    descriptor(d, 5, DESC_WRITE | DESC_NEXT, 1),
                    descriptor(d + 0x10, 0, DESC_WRITE | DESC_NEXT, 2),
                    descriptor(d + 0x20, 100, DESC_WRITE, 0),
                ],
                &[0],
                &[],
            ),
        ),
        (
            "readable_outside_and_looping_chains",
            fill_queue_input(
                4,
                false,
                &[take(64, 64, 255)],
                &[
                    descriptor(d, 64, 0, 0),
                    descriptor(0x2_0000, 64, DESC_WRITE, 0),
                    descriptor(d, 8, DESC_WRITE | DESC_NEXT, 3),
                    descriptor(d, 8, DESC_WRITE | DESC_NEXT, 2),
                    descriptor(0xfff0, 64, DESC_WRITE, 0),
                ],
                &[0, 1, 2, 4, 9],
                &[],
            ),
        ),
        (
            "nested_indirect_table",
            fill_queue_input(
                4,
                false,
                &[take(64, 1, 255)],
                &[descriptor(d, 16, DESC_INDIRECT, 0)],
                &[0],
                &descriptor(d, 16, DESC_INDIRECT, 0),
            ),
        ),
        (
            "avail_index_far_ahead",
            fill_queue_input(4, false, &[take(64, 1, 255)], &four, &[0; 40], &[]),
        ),
        (
            "packed_gathered_and_given_back",
            fill_queue_input(
                4,
                true,
                &[take(100, 64, 255), take(100, 64, 0), take(20, 1, 255)],
                &packed_four,
                &[],
                &[],
            ),
        ),
    ]
}

fn all_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut all = Vec::new();
    for (target, seeds) in [
        ("decode", decode_seeds()),
        ("session", session_seeds()),
        ("memory_table", memory_table_seeds()),
        ("blk_queue", blk_seeds()),
        ("inflight", inflight_seeds()),
        ("iotlb", iotlb_seeds()),
        ("packed_queue", packed_seeds()),
        ("fill_queue", fill_seeds()),
    ] {
        all.extend(seeds.into_iter().map(|(name, bytes)| (target, name, bytes)));
    }
    all
}

#[test]
fn every_seed_is_committed() {
    let write = std::env::var_os("VU_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, bytes) in all_seeds() {
        let path = corpus_dir(target).join(format!("seed-{name}"));
        if write {
            fs::create_dir_all(corpus_dir(target)).unwrap();
            fs::write(&path, &bytes).unwrap();
        } else {
            let committed = fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; regenerate with VU_WRITE_FUZZ_SEEDS=1 cargo test -p vu-tests \
                     --test fuzz_corpus",
                    path.display()
                )
            });
            assert_eq!(committed, bytes, "{} is stale", path.display());
        }
    }
}

/// Runs every committed input of `target` through `body`; returns how many there were.
fn replay(target: &str, body: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut count = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = fs::read(&path).unwrap();
        body(&data);
        count += 1;
    }
    assert!(count > 0, "{} holds no input", dir.display());
    count
}

#[test]
fn decode_corpus_replays_without_panic() {
    replay("decode", decode);
}

fn session_body(data: &[u8]) {
    session(data);
}

#[test]
fn session_corpus_replays_without_panic() {
    replay("session", session_body);
}

/// The ring seeds really reach the rings: each serves at least one chain (a seed that dies
/// in the handshake would fuzz nothing past it).
#[test]
fn ring_seeds_serve_chains() {
    for (name, bytes) in session_seeds() {
        let reaches_rings = name == "running_queue"
            || name == "mem_table_replaced_while_running"
            || name == "disconnect_and_again"
            || name == "descriptor_loop"
            || name == "zero_length_descriptors";
        if reaches_rings {
            assert!(session(&bytes) >= 1, "{name} served no chain");
        }
    }
}

#[test]
fn memory_table_corpus_replays_without_panic() {
    replay("memory_table", memory_table);
}

fn iotlb_body(data: &[u8]) {
    iotlb(data);
}

#[test]
fn iotlb_corpus_replays_without_panic() {
    replay("iotlb", iotlb_body);
}

/// The IOTLB seeds reach the table: the valid updates and invalidations are accepted.
#[test]
fn iotlb_seeds_are_accepted() {
    for (name, bytes) in iotlb_seeds() {
        assert!(iotlb(&bytes) >= 2, "{name} applied almost nothing");
    }
}

#[test]
fn inflight_corpus_replays_without_panic() {
    replay("inflight", inflight_region);
}

#[test]
fn blk_queue_corpus_replays_without_panic() {
    replay("blk_queue", blk_queue);
}

fn packed_queue_body(data: &[u8]) {
    packed_queue(data);
}

fn fill_queue_body(data: &[u8]) {
    fill_queue(data);
}

#[test]
fn fill_queue_corpus_replays_without_panic() {
    replay("fill_queue", fill_queue_body);
}

/// The fill seeds reach the ring: each completes at least one chain (the far-ahead index
/// none: nothing can be taken from it).
#[test]
fn fill_seeds_complete_chains() {
    for (name, bytes) in fill_seeds() {
        let completed = fill_queue(&bytes);
        if name == "avail_index_far_ahead" {
            assert_eq!(completed, 0, "{name}");
        } else {
            assert!(completed >= 1, "{name} completed no chain");
        }
    }
}

#[test]
fn packed_queue_corpus_replays_without_panic() {
    replay("packed_queue", packed_queue_body);
}

/// The packed seeds that describe servable chains reach the device; the hostile ones that
/// must be refused serve nothing.
#[test]
fn packed_seeds_serve_what_they_should() {
    for (name, bytes) in packed_seeds() {
        let served = packed_queue(&bytes);
        let refused = matches!(
            name,
            "flipped_wrap_counter_in_a_chain"
                | "avail_and_used_both_set"
                | "endless_chain"
                | "base_past_the_ring"
        );
        if refused {
            assert_eq!(served, 0, "{name} served {served} chains");
        } else {
            assert!(served >= 1, "{name} served no chain");
        }
    }
}

/// The generated seeds themselves, whatever is committed: a seed that crashes fails here
/// with its name.
#[test]
fn generated_seeds_run_without_panic() {
    for (target, name, bytes) in all_seeds() {
        let body: fn(&[u8]) = match target {
            "decode" => decode,
            "session" => session_body,
            "memory_table" => memory_table,
            "inflight" => inflight_region,
            "iotlb" => iotlb_body,
            "packed_queue" => packed_queue_body,
            "fill_queue" => fill_queue_body,
            _ => blk_queue,
        };
        let result = std::panic::catch_unwind(|| body(&bytes));
        assert!(result.is_ok(), "{target}/{name} panicked");
    }
}
