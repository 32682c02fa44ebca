//! Cross-checks the codec's wire layouts and numbering against the reference
//! implementation (rust-vmm vhost 0.18): the same value must encode to the same bytes,
//! and the reference's bytes must decode to the same value.

use vhost::vhost_user::message as reference;
use vm_memory::ByteValued;
use vu_proto::payload::{
    Inflight, Log, ShmemMap, ShmemMapFlags, VringAddr, VringAddrFlags, VringState,
};
use vu_proto::{BackendReq, FrontendReq, Payload, ProtocolFeatures, RequestCode, VirtioFeatures};

fn same_bytes<T: Payload + PartialEq + std::fmt::Debug>(ours: &T, theirs: &[u8]) {
    assert_eq!(ours.to_vec(), theirs, "encoding of {ours:?}");
    assert_eq!(
        &T::decode_body(RequestCode(0), theirs).unwrap(),
        ours,
        "decoding the reference's bytes"
    );
}

#[test]
fn frontend_request_codes_match_the_reference() {
    for &req in FrontendReq::ALL {
        let theirs = reference::FrontendReq::try_from(req.code().0).unwrap();
        assert_eq!(u32::from(theirs), req.code().0, "{req}");
    }
    assert!(reference::FrontendReq::try_from(FrontendReq::ALL.len() as u32 + 1).is_err());
}

#[test]
fn backend_request_codes_match_the_reference() {
    for &req in BackendReq::ALL {
        let theirs = reference::BackendReq::try_from(req.code().0).unwrap();
        assert_eq!(u32::from(theirs), req.code().0, "{req}");
    }
    assert!(reference::BackendReq::try_from(BackendReq::ALL.len() as u32 + 1).is_err());
}

#[test]
fn protocol_feature_bits_0_to_19_match_the_reference() {
    let low = (1 << 20) - 1;
    assert_eq!(
        ProtocolFeatures::all().bits() & low,
        reference::VhostUserProtocolFeatures::all().bits() & low
    );
    assert_eq!(
        VirtioFeatures::PROTOCOL_FEATURES.bits(),
        reference::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    );
    assert_eq!(
        VirtioFeatures::LOG_ALL.bits(),
        reference::VhostUserVirtioFeatures::LOG_ALL.bits()
    );
}

/// Bits 20 and up: QEMU's spec numbers SHMEM 20; rust-vmm vhost 0.18 numbers it 22 and
/// uses 20 for GET_VRING_BASE_INFLIGHT. This is what a rust-vmm-numbered peer sees of our
/// words (docs/conformance.md).
#[test]
fn protocol_feature_bits_from_20_follow_qemu_not_the_reference() {
    use reference::VhostUserProtocolFeatures as Theirs;
    assert_eq!(ProtocolFeatures::SHMEM.bits(), 1 << 20);
    assert_eq!(
        Theirs::from_bits_retain(ProtocolFeatures::SHMEM.bits()),
        Theirs::GET_VRING_BASE_INFLIGHT
    );
    assert_eq!(
        ProtocolFeatures::GPA_ADDRESSES.bits(),
        Theirs::GPA_ADDRESSES.bits()
    );
    assert_eq!(
        ProtocolFeatures::from_bits(Theirs::SHMEM.bits()),
        None,
        "rust-vmm's SHMEM (22) is a bit this crate does not name"
    );
}

#[test]
fn vring_state_layout_matches() {
    let theirs = reference::VhostUserVringState::new(3, 256);
    same_bytes(&VringState { index: 3, num: 256 }, theirs.as_slice());
}

#[test]
fn vring_addr_layout_matches() {
    let theirs = reference::VhostUserVringAddr::new(
        1,
        reference::VhostUserVringAddrFlags::VHOST_VRING_F_LOG,
        0x1000,
        0x2000,
        0x3000,
        0x4000,
    );
    let ours = VringAddr {
        index: 1,
        flags: VringAddrFlags::LOG,
        descriptor: 0x1000,
        used: 0x2000,
        available: 0x3000,
        log: 0x4000,
    };
    same_bytes(&ours, theirs.as_slice());
}

#[cfg(not(feature = "xen"))]
#[test]
fn single_memory_region_layout_matches() {
    let theirs = reference::VhostUserSingleMemoryRegion::new(0x1000, 0x2000, 0x7000, 0x40);
    let ours = vu_proto::payload::SingleMemoryRegion {
        region: vu_proto::payload::MemoryRegion {
            guest_phys_addr: 0x1000,
            memory_size: 0x2000,
            user_addr: 0x7000,
            mmap_offset: 0x40,
        },
    };
    same_bytes(&ours, theirs.as_slice());
}

#[test]
fn log_layout_matches() {
    let theirs = reference::VhostUserLog::new(0x1000, 0x80);
    same_bytes(
        &Log {
            mmap_size: 0x1000,
            mmap_offset: 0x80,
        },
        theirs.as_slice(),
    );
}

#[test]
fn inflight_layout_matches_including_padding() {
    let theirs = reference::VhostUserInflight::new(0x2000, 0, 2, 256);
    assert_eq!(theirs.as_slice().len(), Inflight::SIZE);
    same_bytes(
        &Inflight {
            mmap_size: 0x2000,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 256,
        },
        theirs.as_slice(),
    );
}

#[test]
fn shmem_map_layout_matches() {
    let theirs = reference::VhostUserMMap {
        shmid: 2,
        padding: [0; 7],
        fd_offset: 0x10,
        shm_offset: 0x2000,
        len: 0x1000,
        flags: reference::VhostUserMMapFlags::WRITABLE.bits(),
    };
    same_bytes(
        &ShmemMap {
            shmid: 2,
            fd_offset: 0x10,
            shm_offset: 0x2000,
            len: 0x1000,
            flags: ShmemMapFlags::WRITABLE,
        },
        theirs.as_slice(),
    );
}
