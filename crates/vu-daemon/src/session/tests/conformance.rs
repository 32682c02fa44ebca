//! Each test sends the exact message and checks its effect on the backend, the rings or the
//! back-end channel, not only the reply. docs/conformance.md names these tests.

use std::time::Duration;

use vu_proto::backend::ChannelError;
use vu_proto::message::{encode_reply, BackendRequest};
use vu_proto::socket::Endpoint;

use super::*;

/// How long a test waits for something that should happen at once.
const WAIT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ SET_CONFIG flags

#[test]
fn set_config_flags_reach_the_backend() {
    let mut f = Fixture::negotiated();
    let write = |flags| {
        FrontendRequest::SetConfig(DeviceConfig {
            offset: 0,
            flags,
            data: vec![1],
        })
    };
    // QEMU's 0 (front-end write) and 1 (live migration), rust-vmm's bit 1 (live migration).
    f.ok(write(ConfigFlags::empty()));
    f.ok(write(ConfigFlags::LIVE_MIGRATION));
    f.ok(write(ConfigFlags::LIVE_MIGRATION_RUST_VMM));
    let seen = lock(&f.rec).config_flags.clone();
    assert_eq!(
        seen,
        [
            ConfigFlags::empty(),
            ConfigFlags::LIVE_MIGRATION,
            ConfigFlags::LIVE_MIGRATION_RUST_VMM
        ]
    );
    let migration: Vec<bool> = seen.iter().map(|f| f.is_live_migration()).collect();
    assert_eq!(migration, [false, true, true]);
}

#[test]
fn set_config_with_unknown_flags_is_refused_before_the_backend() {
    let mut f = Fixture::negotiated();
    let mut body = Vec::new();
    DeviceConfig {
        offset: 0,
        flags: ConfigFlags::empty(),
        data: vec![1],
    }
    .encode(&mut body);
    // The flags word follows offset and size.
    body[8..12].copy_from_slice(&4u32.to_ne_bytes());
    let code = FrontendReq::SetConfig.code().0;
    assert_refused(&f.raw(raw(code, HeaderFlags::NEED_REPLY, body, Vec::new())));
    assert!(lock(&f.rec).config_flags.is_empty());
}

// ------------------------------------------------------------------ SET_STATUS / GET_STATUS

/// ACKNOWLEDGE | DRIVER | FEATURES_OK, then DRIVER_OK, FAILED and 0, as a driver's life goes.
#[test]
fn set_status_reaches_the_backend_and_get_status_returns_it() {
    let mut f = Fixture::negotiated();
    for status in [0x0b, 0x0f, 0x8f, 0] {
        f.ok(FrontendRequest::SetStatus(U64(status)));
        assert_eq!(ack(&f.ask(FrontendRequest::GetStatus)), status);
    }
    assert_eq!(lock(&f.rec).statuses, [0x0b, 0x0f, 0x8f, 0]);
    // Status 0 told the backend, but it is not a reset (QEMU sends it before GET_VRING_BASE).
    assert_eq!(lock(&f.rec).resets, 0);
}

#[test]
fn set_status_wider_than_a_byte_is_refused() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetStatus(U64(0x0f)));
    assert_refused(&f.ask(FrontendRequest::SetStatus(U64(0x10f))));
    assert_eq!(ack(&f.ask(FrontendRequest::GetStatus)), 0x0f);
    assert_eq!(lock(&f.rec).statuses, [0x0f]);
}

#[test]
fn set_status_refused_by_the_backend_keeps_the_old_status() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetStatus(U64(0x03)));
    lock(&f.rec).fail = true;
    assert_refused(&f.ask(FrontendRequest::SetStatus(U64(0x0b))));
    assert_eq!(ack(&f.ask(FrontendRequest::GetStatus)), 0x03);
}

// ------------------------------------------------------------------ SET_VRING_KICK, no fd

/// Waits until `fd` is readable, at most [`WAIT`].
fn readable(fd: &File) -> bool {
    crate::sys::readable_within(fd.as_fd(), WAIT)
}

#[test]
fn set_vring_kick_without_fd_polls_the_ring_and_tells_the_backend() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetVringKick { index: 1, fd: None });
    assert_eq!(lock(&f.rec).polled, [(1, true)]);
    assert_eq!(f.events(), vec![Event::Unwatch(1), Event::Watch(1)]);
    // The watched kick fires by itself: it is a timer, so the worker looks at the ring
    // every POLL_PERIOD with no kick from the driver.
    let kick = f
        .vring(1)
        .get_ref()
        .get_kick()
        .unwrap()
        .try_clone()
        .unwrap();
    assert!(readable(&kick), "the polled ring's kick never fired");
    let mut ticks = [0u8; 8];
    (&kick).read_exact(&mut ticks).unwrap();
    assert!(u64::from_ne_bytes(ticks) >= 1);
    assert!(readable(&kick), "the timer fired only once");
    // A kick fd ends the polling, and the backend hears of it.
    f.ok(FrontendRequest::SetVringKick {
        index: 1,
        fd: Some(new_eventfd().unwrap().into()),
    });
    assert_eq!(lock(&f.rec).polled, [(1, true), (1, false)]);
}

#[test]
fn polled_ring_stopped_by_get_vring_base_is_no_longer_polled() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetVringKick { index: 0, fd: None });
    let _ = ack_state(&f.ask(FrontendRequest::GetVringBase(VringState {
        index: 0,
        num: 0,
    })));
    assert_eq!(lock(&f.rec).polled, [(0, true), (0, false)]);
    assert!(f.vring(0).get_ref().get_kick().is_none());
}

#[test]
fn polling_refused_by_the_backend_refuses_the_kick() {
    let mut f = Fixture::negotiated();
    lock(&f.rec).fail = true;
    assert_refused(&f.ask(FrontendRequest::SetVringKick { index: 0, fd: None }));
    assert!(!f.vring(0).ready());
    assert!(f.vring(0).get_ref().get_kick().is_none());
}

/// An in-band kick of a polled ring is acknowledged (the timer serves it within a period):
/// it cannot be written into a timer.
#[test]
fn in_band_kick_of_a_polled_ring_is_accepted() {
    let mut f = Fixture::negotiated();
    f.ok(FrontendRequest::SetVringKick { index: 0, fd: None });
    f.ok(FrontendRequest::VringKick(VringState { index: 0, num: 0 }));
}

fn ack_state(outcome: &Outcome) -> VringState {
    let reply = outcome.reply.as_ref().unwrap();
    VringState::decode_body(reply.header.request, &reply.body).unwrap()
}

// ------------------------------------------------------------------ in-band notifications

/// Hands the session a back-end channel; returns the frontend's end of it.
fn backend_channel(f: &mut Fixture) -> Endpoint {
    let (ours, theirs) = Endpoint::pair().unwrap();
    ours.set_read_timeout(Some(WAIT)).unwrap();
    f.ok(FrontendRequest::SetBackendReqFd {
        fd: OwnedFd::from(theirs.into_inner()),
    });
    ours
}

/// Receives one back-end request and acknowledges it (REPLY_ACK is negotiated).
fn answer(frontend: Endpoint) -> std::thread::JoinHandle<BackendRequest> {
    std::thread::spawn(move || {
        let raw = frontend.recv_message().unwrap();
        let header = raw.header;
        let request = BackendRequest::decode(raw).unwrap();
        assert!(
            header.needs_reply(),
            "in-band notifications wait for their ack"
        );
        let (h, b) = encode_reply(&header, &U64(0));
        frontend.send_message(&h, &b, &[]).unwrap();
        request
    })
}

#[test]
fn ring_without_call_fd_sends_vring_call_in_band() {
    let mut f = Fixture::negotiated();
    let frontend = backend_channel(&mut f);
    let peer = answer(frontend);
    f.vring(1).signal_used_queue().unwrap();
    match peer.join().unwrap() {
        BackendRequest::VringCall(VringState { index: 1, num: 0 }) => {}
        other => panic!("expected VRING_CALL of queue 1, got {other:?}"),
    }
}

#[test]
fn ring_without_err_fd_sends_vring_err_in_band() {
    let mut f = Fixture::negotiated();
    let frontend = backend_channel(&mut f);
    let peer = answer(frontend);
    f.vring(0).signal_error().unwrap();
    match peer.join().unwrap() {
        BackendRequest::VringErr(VringState { index: 0, num: 0 }) => {}
        other => panic!("expected VRING_ERR of queue 0, got {other:?}"),
    }
}

/// "it may however still be used to set an event file descriptor (which will be preferred
/// over the message)".
#[test]
fn call_fd_is_preferred_over_the_in_band_message() {
    let mut f = Fixture::negotiated();
    let frontend = backend_channel(&mut f);
    let call = new_eventfd().unwrap();
    f.ok(FrontendRequest::SetVringCall {
        index: 0,
        fd: Some(call.try_clone().unwrap().into()),
    });
    f.vring(0).signal_used_queue().unwrap();
    let mut buf = [0u8; 8];
    (&call).read_exact(&mut buf).unwrap();
    assert_eq!(u64::from_ne_bytes(buf), 1);
    frontend.set_nonblocking(true).unwrap();
    assert!(frontend.recv_message().is_err(), "a message was sent too");
}

#[test]
fn without_in_band_notifications_no_message_is_sent() {
    let mut f = Fixture::new();
    f.negotiate(protocol() - ProtocolFeatures::INBAND_NOTIFICATIONS);
    let frontend = backend_channel(&mut f);
    f.vring(0).signal_used_queue().unwrap();
    f.vring(0).signal_error().unwrap();
    frontend.set_nonblocking(true).unwrap();
    assert!(frontend.recv_message().is_err());
}

/// The backend's copy of the channel refuses what was not negotiated (typed error).
#[test]
fn backend_channel_refuses_requests_whose_feature_was_not_negotiated() {
    let mut f = Fixture::new();
    f.negotiate(protocol() - ProtocolFeatures::SHMEM - ProtocolFeatures::CONFIG);
    let _frontend = backend_channel(&mut f);
    let channel = lock(&f.rec).channel.take().unwrap();
    assert!(matches!(
        channel.config_change_msg(),
        Err(ChannelError::NotNegotiated { missing, .. }) if missing == ProtocolFeatures::CONFIG
    ));
}

#[test]
fn disconnect_removes_the_in_band_notifiers() {
    let mut f = Fixture::negotiated();
    let frontend = backend_channel(&mut f);
    f.session.disconnect(&mut f.ctl);
    f.vring(0).signal_used_queue().unwrap();
    frontend.set_nonblocking(true).unwrap();
    assert!(frontend.recv_message().is_err());
}

// ------------------------------------------------------------------ the offer

#[test]
fn masked_features_are_not_offered_even_when_the_backend_offers_them() {
    let backend_protocol = protocol() | ProtocolFeatures::HOST_NOTIFIER;
    let mut f = Fixture::with(FEATURES, backend_protocol);
    let offered =
        ProtocolFeatures::from_bits_retain(ack(&f.ask(FrontendRequest::GetProtocolFeatures)));
    assert!(!offered.contains(ProtocolFeatures::HOST_NOTIFIER));
    // Acknowledging a masked bit is acknowledging an unoffered one.
    assert_refused(&f.ask(FrontendRequest::SetProtocolFeatures(
        ProtocolFeatures::HOST_NOTIFIER,
    )));
}

/// ACCESS_PLATFORM is served: offered when the backend offers it, and once acknowledged the
/// backend sees it in force.
#[test]
fn access_platform_is_offered_and_acknowledged_when_the_backend_offers_it() {
    let backend_virtio = FEATURES | VirtioFeatures::ACCESS_PLATFORM.bits();
    let mut f = Fixture::with(backend_virtio, protocol());
    assert_eq!(ack(&f.ask(FrontendRequest::GetFeatures)), backend_virtio);
    f.ok(FrontendRequest::SetFeatures(
        VirtioFeatures::from_bits_retain(backend_virtio),
    ));
    assert_eq!(lock(&f.rec).acked, Some(backend_virtio));
}

/// A frontend that acknowledges ACCESS_PLATFORM unoffered does not get it: the backend
/// sees the value in force, without the bit.
#[test]
fn access_platform_acknowledged_unoffered_is_dropped() {
    let mut f = Fixture::with(FEATURES, protocol());
    f.ok(FrontendRequest::SetFeatures(
        VirtioFeatures::from_bits_retain(FEATURES | VirtioFeatures::ACCESS_PLATFORM.bits()),
    ));
    assert_eq!(lock(&f.rec).acked, Some(FEATURES));
}

#[test]
fn shmem_is_protocol_bit_20_on_the_wire() {
    let mut f = Fixture::new();
    let offered = ack(&f.ask(FrontendRequest::GetProtocolFeatures));
    assert_ne!(offered & (1 << 20), 0, "SHMEM (bit 20) offered");
    assert_eq!(
        offered & (1 << 22),
        0,
        "rust-vmm's SHMEM bit (22) not offered"
    );
    f.ok(FrontendRequest::SetProtocolFeatures(
        ProtocolFeatures::from_bits_retain(1 << 20),
    ));
    let outcome = f.ask(FrontendRequest::GetShmemConfig);
    let reply = outcome.reply.unwrap();
    let config = ShmemConfig::decode_body(reply.header.request, &reply.body).unwrap();
    assert_eq!(config.nregions, 1);
}

#[cfg(feature = "xen")]
#[test]
fn xen_build_offers_xen_mmap_and_requires_it_for_memory_tables() {
    use vu_proto::payload::XenMmapFlags;
    let mut f = Fixture::new();
    let offered =
        ProtocolFeatures::from_bits_retain(ack(&f.ask(FrontendRequest::GetProtocolFeatures)));
    assert!(offered.contains(ProtocolFeatures::XEN_MMAP));
    f.negotiate(protocol());
    let table = FrontendRequest::SetMemTable {
        table: MemoryTable {
            regions: vec![MemoryRegion {
                guest_phys_addr: 0,
                memory_size: 0x1000,
                user_addr: VMM_BASE,
                mmap_offset: 0,
                xen_mmap_flags: XenMmapFlags::FOREIGN,
                xen_mmap_data: 1,
            }],
        },
        fds: vec![memfd(0x1000).into()],
    };
    assert_refused(&f.ask(table));
    assert_eq!(lock(&f.rec).memory_updates, 0);
}
