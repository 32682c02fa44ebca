//! `IOTLB_MSG` scenarios (`session/iommu.rs`).
//!
//! The fixture's backend does not offer `VIRTIO_F_ACCESS_PLATFORM`: [`negotiated_with_iommu`]
//! sets it in the session's acknowledged features after the handshake, to test the handler on
//! its own (the offer is tested in conformance.rs).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, Permissions};
use vu_mem::IotlbFault;
use vu_proto::backend::BackendChannel;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::frontend::{handle_backend_request, BackendReqHandler, Refusal};
use vu_proto::message::FrontendRequest;
use vu_proto::payload::{Iotlb, IotlbPerm, IotlbType};
use vu_proto::socket::Endpoint;
use vu_vring::{Iommu, IommuError};

use super::{ack, assert_refused, mem_table, protocol, Fixture, MEM_SIZE, VMM_BASE};
use crate::session::iommu::SessionIommu;

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

/// The guest address `iova` maps to (the session stores guest addresses).
fn lookup(f: &Fixture, iova: u64, access: Permissions) -> Result<u64, IotlbFault> {
    f.session
        .iommu
        .iotlb
        .lock()
        .lookup(iova, 1, access)
        .map(|m| m.addr)
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
    assert_eq!(lookup(&f, 0xfee0_0010, Permissions::Read), Ok(0x4010));
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
    assert_eq!(lookup(&f, 0x1000, Permissions::Read), Ok(0));
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
    assert!(f.session.iommu.iotlb.lock().is_empty());
    f.alive();
}

#[test]
fn iotlb_zero_size_update_is_refused() {
    let mut f = negotiated_with_iommu(protocol());
    assert_refused(&f.ask(update(0x1000, 0, VMM_BASE, IotlbPerm::Read)));
    assert!(f.session.iommu.iotlb.lock().is_empty());
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
    assert!(f.session.iommu.iotlb.lock().is_empty());
}

#[test]
fn iotlb_msg_without_backend_req_is_refused() {
    let acked = protocol() - ProtocolFeatures::BACKEND_REQ - ProtocolFeatures::INBAND_NOTIFICATIONS;
    let mut f = negotiated_with_iommu(acked);
    assert_refused(&f.ask(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read)));
    assert!(f.session.iommu.iotlb.lock().is_empty());
}

#[test]
fn disconnect_and_reset_empty_the_iotlb() {
    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read));
    f.ok(FrontendRequest::ResetDevice);
    assert!(f.session.iommu.iotlb.lock().is_empty());

    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read));
    f.session.disconnect(&mut f.ctl);
    assert!(f.session.iommu.iotlb.lock().is_empty());
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
    let tlb = f.session.iommu.iotlb.lock();
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
    assert!(f.session.iommu.iotlb.lock().is_empty());
}

/// A frontend's backend-channel end that answers each miss the way QEMU does: the update
/// (here straight into the IOTLB, as the connection thread would apply it), then the ack.
fn answer_misses(
    theirs: Endpoint,
    iommu: Arc<SessionIommu>,
    map: impl Fn(u64) -> Option<(u64, u64, u64)> + Send + 'static,
) -> thread::JoinHandle<Vec<(u64, IotlbPerm)>> {
    struct Answer<F> {
        iommu: Arc<SessionIommu>,
        map: F,
        misses: Vec<(u64, IotlbPerm)>,
    }
    impl<F: Fn(u64) -> Option<(u64, u64, u64)>> BackendReqHandler for Answer<F> {
        fn iotlb_msg(&mut self, msg: Iotlb) -> Result<(), Refusal> {
            assert_eq!(msg.kind, IotlbType::Miss);
            self.misses.push((msg.iova, msg.perm));
            if let Some((iova, size, gpa)) = (self.map)(msg.iova) {
                self.iommu
                    .iotlb
                    .update(iova, size, gpa, Permissions::ReadWrite)
                    .unwrap();
            }
            Ok(())
        }
    }
    thread::spawn(move || {
        let mut answer = Answer {
            iommu,
            map,
            misses: Vec::new(),
        };
        while handle_backend_request(&theirs, &mut answer).is_ok() {}
        answer.misses
    })
}

/// An IOMMU whose misses go over a channel with REPLY_ACK (as QEMU negotiates it).
fn iommu_with_channel(timeout: Duration) -> (Arc<SessionIommu>, Endpoint) {
    let (ours, theirs) = Endpoint::pair().unwrap();
    let iommu = Arc::new(SessionIommu::new(timeout));
    let channel = BackendChannel::new(
        ours,
        ProtocolFeatures::BACKEND_REQ | ProtocolFeatures::REPLY_ACK,
    );
    iommu.set_channel(Some(channel));
    (iommu, theirs)
}

#[test]
fn a_miss_is_asked_over_the_backend_channel_and_the_access_waits_for_the_update() {
    let (iommu, theirs) = iommu_with_channel(Duration::from_secs(30));
    let answering = answer_misses(theirs, iommu.clone(), |iova| {
        Some((iova & !0xfff, 0x1000, 0x7000))
    });
    let got = iommu.translate(0x4_0010, 0x20, Permissions::Write);
    assert_eq!(got, Ok((GuestAddress(0x7010), 0x20)));
    // A hit asks nothing.
    assert_eq!(
        iommu.translate(0x4_0030, 0x10, Permissions::Read),
        Ok((GuestAddress(0x7030), 0x10))
    );
    iommu.set_channel(None);
    assert_eq!(
        answering.join().unwrap(),
        vec![(0x4_0010, IotlbPerm::Write)]
    );
}

#[test]
fn a_miss_never_answered_gives_up_after_the_bounded_wait() {
    let (iommu, theirs) = iommu_with_channel(Duration::from_millis(50));
    // The frontend acks the miss but never sends the update.
    let answering = answer_misses(theirs, iommu.clone(), |_| None);
    let started = Instant::now();
    assert_eq!(
        iommu.translate(0x9000, 8, Permissions::Read),
        Err(IommuError::Unmapped { iova: 0x9000 })
    );
    assert!(started.elapsed() >= Duration::from_millis(50));
    iommu.set_channel(None);
    assert_eq!(answering.join().unwrap().len(), 1);
}

#[test]
fn without_a_backend_channel_a_miss_fails_at_once() {
    let iommu = SessionIommu::new(Duration::from_secs(3600));
    assert_eq!(
        iommu.translate(0x9000, 8, Permissions::Read),
        Err(IommuError::Unmapped { iova: 0x9000 })
    );
}

#[test]
fn pieces_contiguous_in_guest_memory_make_one_run_and_a_gap_ends_it() {
    let iommu = SessionIommu::new(Duration::from_secs(3600));
    let rw = Permissions::ReadWrite;
    iommu.iotlb.update(0x1000, 0x1000, 0x20000, rw).unwrap();
    iommu.iotlb.update(0x2000, 0x1000, 0x21000, rw).unwrap();
    iommu.iotlb.update(0x3000, 0x1000, 0x50000, rw).unwrap();
    assert_eq!(
        iommu.translate(0x1800, 0x2000, Permissions::Read),
        Ok((GuestAddress(0x20800), 0x1800))
    );
    // A read-only mapping refuses a write: an access failure, not a miss.
    iommu
        .iotlb
        .update(0x8000, 0x1000, 0x8000, Permissions::Read)
        .unwrap();
    assert_eq!(
        iommu.translate(0x8000, 1, Permissions::Write),
        Err(IommuError::Denied {
            iova: 0x8000,
            access: Permissions::Write
        })
    );
}

#[test]
fn an_invalidation_changes_the_generation_the_rings_check() {
    let mut f = negotiated_with_iommu(protocol());
    let before = f.session.iommu.generation();
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read));
    f.ok(invalidate(0x1000, 0x1000));
    assert_ne!(f.session.iommu.generation(), before);
}

#[test]
fn a_new_memory_table_empties_the_iotlb() {
    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::Read));
    f.ok(mem_table(&[(0, MEM_SIZE)]));
    assert!(f.session.iommu.iotlb.lock().is_empty());
}

#[test]
fn an_invalidation_is_acked_only_once_the_chains_taken_before_it_are_completed() {
    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::ReadWrite));
    // A chain a device took for later (its I/O on another thread) with a translation of now.
    let iommu = f.session.iommu.clone();
    let generation = iommu.generation();
    iommu.hold(generation);
    let completed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let device = {
        let (iommu, completed) = (iommu.clone(), completed.clone());
        thread::spawn(move || {
            // The device completes the chain only once the acknowledgement waits for it.
            let waited = iommu.wait_for_a_waiter(Duration::from_secs(10));
            completed.store(true, std::sync::atomic::Ordering::SeqCst);
            iommu.release(generation);
            waited
        })
    };
    f.ok(invalidate(0x1000, 0x1000));
    assert!(completed.load(std::sync::atomic::Ordering::SeqCst));
    assert!(
        device.join().unwrap(),
        "the invalidation did not wait for the chain"
    );
}

#[test]
fn an_invalidation_waits_only_for_chains_translated_before_it() {
    let mut f = negotiated_with_iommu(protocol());
    f.ok(update(0x1000, 0x1000, VMM_BASE, IotlbPerm::ReadWrite));
    f.ok(invalidate(0x1000, 0x1000));
    // A chain taken for later after that invalidation: it has nothing to wait for.
    let iommu = f.session.iommu.clone();
    let generation = iommu.generation();
    iommu.hold(generation);
    assert_eq!(
        iommu.wait_for_holds_before(generation, Duration::ZERO),
        Ok(())
    );
    // A later change of the table (generation + 1) would wait for it.
    assert_eq!(
        iommu.wait_for_holds_before(generation + 1, Duration::ZERO),
        Err(1)
    );
    iommu.release(generation);
    assert_eq!(
        iommu.wait_for_holds_before(u64::MAX, Duration::ZERO),
        Ok(())
    );
    f.ok(invalidate(0x1000, 0x1000));
}
