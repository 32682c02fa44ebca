//! `IOTLB_MSG` scenarios (`session/iommu.rs`).
//!
//! The offer table still masks `VIRTIO_F_ACCESS_PLATFORM` (the rings do not translate yet),
//! so no handshake can acknowledge it: [`negotiated_with_iommu`] sets it in the session's
//! acknowledged features after the handshake, to test the handler ahead of the offer.

use vm_memory::Permissions;
use vu_mem::IotlbFault;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::message::FrontendRequest;
use vu_proto::payload::{Iotlb, IotlbPerm, IotlbType};

use super::{ack, assert_refused, mem_table, protocol, Fixture, MEM_SIZE, VMM_BASE};

/// After the handshake with `acked` protocol features, a memory table, and ACCESS_PLATFORM
/// acknowledged.
fn negotiated_with_iommu(acked: ProtocolFeatures) -> Fixture {
    let mut f = Fixture::new();
    f.negotiate(acked);
    f.ok(mem_table(&[(0, MEM_SIZE)]));
    f.session.acked_features |= VirtioFeatures::ACCESS_PLATFORM.bits();
    f
}

fn msg(kind: IotlbType, iova: u64, size: u64, uaddr: u64, perm: IotlbPerm) -> FrontendRequest {
    FrontendRequest::IotlbMsg(Iotlb {
        iova,
        size,
        uaddr,
        perm,
        kind,
    })
}

fn update(iova: u64, size: u64, uaddr: u64, perm: IotlbPerm) -> FrontendRequest {
    msg(IotlbType::Update, iova, size, uaddr, perm)
}

fn invalidate(iova: u64, size: u64) -> FrontendRequest {
    msg(IotlbType::Invalidate, iova, size, 0, IotlbPerm::None)
}

fn lookup(f: &Fixture, iova: u64, access: Permissions) -> Result<u64, IotlbFault> {
    f.session
        .iotlb
        .lock()
        .lookup(iova, 1, access)
        .map(|m| m.uaddr)
}

#[test]
fn iotlb_update_is_acked_and_fills_the_iotlb() {
    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(
        0xfee0_0000,
        0x1000,
        VMM_BASE + 0x4000,
        IotlbPerm::Read,
    ));
    assert_eq!(
        lookup(&f, 0xfee0_0010, Permissions::Read),
        Ok(VMM_BASE + 0x4010)
    );
    assert!(matches!(
        lookup(&f, 0xfee0_0010, Permissions::Write),
        Err(IotlbFault::Denied { .. })
    ));
}

#[test]
fn iotlb_invalidate_takes_effect_before_the_next_lookup() {
    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x2000, VMM_BASE, IotlbPerm::ReadWrite));
    f.ok(invalidate(0x2000, 0x1000));
    assert_eq!(
        lookup(&f, 0x2000, Permissions::Read),
        Err(IotlbFault::Miss { iova: 0x2000 })
    );
    assert_eq!(lookup(&f, 0x1000, Permissions::Read), Ok(VMM_BASE));
}

#[test]
fn iotlb_update_outside_the_memory_table_is_refused() {
    let mut f = negotiated_with_iommu(protocol());
    // Starts inside the region, ends past it.
    assert_refused(&f.ask(update(
        0,
        0x2000,
        VMM_BASE + MEM_SIZE - 0x1000,
        IotlbPerm::Read,
    )));
    assert_refused(&f.ask(update(0, 0x1000, 0x1000, IotlbPerm::Read)));
    assert!(f.session.iotlb.lock().is_empty());
    f.alive();
}

#[test]
fn iotlb_zero_size_update_is_refused() {
    let mut f = negotiated_with_iommu(protocol());
    assert_refused(&f.ask(update(0x1000, 0, VMM_BASE, IotlbPerm::Read)));
    assert!(f.session.iotlb.lock().is_empty());
    f.alive();
}

#[test]
fn iotlb_miss_and_access_fail_from_the_frontend_are_refused() {
    let mut f = negotiated_with_iommu(protocol());
    for kind in [IotlbType::Miss, IotlbType::AccessFail] {
        assert_refused(&f.ask(msg(kind, 0x1000, 0, 0, IotlbPerm::Read)));
    }
    f.alive();
}

#[test]
fn iotlb_msg_without_reply_ack_is_refused() {
    let acked = protocol() - ProtocolFeatures::REPLY_ACK - ProtocolFeatures::INBAND_NOTIFICATIONS;
    let mut f = negotiated_with_iommu(acked);
    let outcome = f.ask(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read));
    assert_ne!(ack(&outcome), 0);
    assert!(f.session.iotlb.lock().is_empty());
}

#[test]
fn iotlb_msg_without_backend_req_is_refused() {
    let acked = protocol() - ProtocolFeatures::BACKEND_REQ - ProtocolFeatures::INBAND_NOTIFICATIONS;
    let mut f = negotiated_with_iommu(acked);
    assert_refused(&f.ask(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read)));
    assert!(f.session.iotlb.lock().is_empty());
}

#[test]
fn disconnect_and_reset_empty_the_iotlb() {
    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read));
    f.ok(FrontendRequest::ResetDevice);
    assert!(f.session.iotlb.lock().is_empty());

    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read));
    f.session.disconnect(&mut f.ctl);
    assert!(f.session.iotlb.lock().is_empty());
}

#[test]
fn iotlb_update_flood_stays_bounded_and_the_connection_serves() {
    let mut f = negotiated_with_iommu(protocol());
    for i in 0..5000u64 {
        f.ok(update(
            i * 0x1000,
            0x1000,
            VMM_BASE + (i % 256) * 0x1000,
            IotlbPerm::ReadWrite,
        ));
    }
    let tlb = f.session.iotlb.lock();
    assert!(tlb.len() <= tlb.limit());
    drop(tlb);
    f.alive();
}

/// QEMU invalidates the whole device IOTLB with `iova 0, size -1ULL`
/// (`vhost_backend_invalidate_device_iotlb(dev, 0, -1ULL)`).
#[test]
fn iotlb_whole_space_invalidation_as_qemu_sends_it_empties_the_iotlb() {
    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read));
    f.ok(update(
        0xffff_f000,
        0x1000,
        VMM_BASE + 0x2000,
        IotlbPerm::Write,
    ));
    f.ok(invalidate(0, u64::MAX));
    assert!(f.session.iotlb.lock().is_empty());
}
