//! What the framework can serve end to end: the ONE table that decides which of a backend's
//! offered features reach the frontend.
//!
//! A feature the framework cannot serve end to end (a message it refuses, a mechanism nothing
//! implements) is never offered, whatever the backend says, so a frontend never negotiates
//! something that will fail later. Each row names the feature and whether the framework
//! serves it; a masked row says why. Changing what the framework serves is a one-line change
//! here.

use log::warn;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};

/// Whether the framework serves a feature end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    /// Offered when the backend offers it.
    Served,
    /// Offered even when the backend does not offer it: the build cannot work without it.
    Forced,
    /// Never offered, for the reason given.
    Masked(&'static str),
}

/// Postcopy needs the `postcopy` cargo feature.
const PAGEFAULT: Service = if cfg!(feature = "postcopy") {
    Service::Served
} else {
    Service::Masked("built without the `postcopy` feature")
};

/// A `xen` build decodes every memory region with the Xen fields, which a frontend sends only
/// once XEN_MMAP is negotiated; without `xen` the Xen fields are not decoded.
const XEN_MMAP: Service = if cfg!(feature = "xen") {
    Service::Forced
} else {
    Service::Masked("built without the `xen` feature")
};

/// Every protocol feature bit `vu_proto` names, with what the framework does with it.
pub(crate) const PROTOCOL_SERVICE: &[(ProtocolFeatures, Service)] = &[
    (ProtocolFeatures::MQ, Service::Served),
    // Served only for a bitmap that logs writes: with `()`, the session masks LOG_SHMFD and
    // LOG_ALL by type (`without_unlogged_migration` in session.rs).
    (ProtocolFeatures::LOG_SHMFD, Service::Served),
    // Handed to the backend (`send_rarp`), offered when a network device offers it.
    (ProtocolFeatures::RARP, Service::Served),
    (ProtocolFeatures::REPLY_ACK, Service::Served),
    // Handed to the backend (`set_mtu`), offered when a network device offers it.
    (ProtocolFeatures::MTU, Service::Served),
    (ProtocolFeatures::BACKEND_REQ, Service::Served),
    (
        ProtocolFeatures::CROSS_ENDIAN,
        Service::Masked("SET_VRING_ENDIAN is refused: the vrings are little-endian only"),
    ),
    (
        ProtocolFeatures::CRYPTO_SESSION,
        Service::Masked("crypto sessions are refused: no crypto device hook"),
    ),
    (ProtocolFeatures::PAGEFAULT, PAGEFAULT),
    (ProtocolFeatures::CONFIG, Service::Served),
    (ProtocolFeatures::BACKEND_SEND_FD, Service::Served),
    (
        ProtocolFeatures::HOST_NOTIFIER,
        Service::Masked("the workers wait on kick eventfds; nothing polls a host notifier area"),
    ),
    // Served by vu-vring's inflight tracking (docs/inflight.md): the session maps the area,
    // each ring records into its region from its start and serves again what was in flight.
    (ProtocolFeatures::INFLIGHT_SHMFD, Service::Served),
    (ProtocolFeatures::RESET_DEVICE, Service::Served),
    (ProtocolFeatures::INBAND_NOTIFICATIONS, Service::Served),
    (ProtocolFeatures::CONFIGURE_MEM_SLOTS, Service::Served),
    (ProtocolFeatures::STATUS, Service::Served),
    (ProtocolFeatures::XEN_MMAP, XEN_MMAP),
    (ProtocolFeatures::SHARED_OBJECT, Service::Served),
    (ProtocolFeatures::DEVICE_STATE, Service::Served),
    (ProtocolFeatures::SHMEM, Service::Served),
    (ProtocolFeatures::GPA_ADDRESSES, Service::Served),
];

/// Virtio feature bits the framework itself has a say in; a bit not listed (device bits,
/// VERSION_1, ...) is the backend's business and offered as the backend says.
pub(crate) const VIRTIO_SERVICE: &[(VirtioFeatures, Service)] = &[
    (VirtioFeatures::RING_PACKED, Service::Served),
    // Served by vu-vring's IOMMU translation (rings and every `Chain` descriptor) with the
    // session's IOTLB and misses over the backend channel; proven with QEMU's intel-iommu by
    // the e2e run `blk-vu-q1-iommu`. A backend that reads chains through virtio-queue
    // (`pop_descriptor_chain`, `descriptor_chain()`) gets none behind an IOMMU and must not
    // offer it.
    (VirtioFeatures::ACCESS_PLATFORM, Service::Served),
];

/// The protocol features offered to the frontend for a backend offering `backend`, beside
/// the virtio features `virtio` the session offers: the served ones it offers plus the forced
/// ones. Logs once what was removed.
///
/// Inflight tracking is served for split rings only, and protocol features are settled
/// before the frontend picks the ring layout (QEMU sends `SET_PROTOCOL_FEATURES` at
/// connection, `SET_FEATURES` at start): a backend that offers `VIRTIO_F_RING_PACKED` does
/// not get `INFLIGHT_SHMFD` offered, so no frontend can count on tracking that a packed ring
/// would not do.
pub(crate) fn offered_protocol(backend: ProtocolFeatures, virtio: u64) -> ProtocolFeatures {
    let mut offered = backend;
    let mut removed = ProtocolFeatures::empty();
    if virtio & VirtioFeatures::RING_PACKED.bits() != 0 {
        removed |= backend & ProtocolFeatures::INFLIGHT_SHMFD;
        offered -= ProtocolFeatures::INFLIGHT_SHMFD;
    }
    for &(feature, service) in PROTOCOL_SERVICE {
        match service {
            Service::Served => {}
            Service::Forced => offered |= feature,
            Service::Masked(_) => {
                removed |= backend & feature;
                offered -= feature;
            }
        }
    }
    // Bits vu_proto does not name cannot be served either.
    let unnamed = ProtocolFeatures::from_bits_retain(backend.bits() & !named_protocol().bits());
    removed |= unnamed;
    offered -= unnamed;
    if !removed.is_empty() {
        warn!("the framework does not serve protocol features {removed:?}; not offering them");
    }
    offered
}

/// The virtio features offered to the frontend for a backend offering `backend`.
pub(crate) fn offered_virtio(backend: u64) -> u64 {
    VIRTIO_SERVICE
        .iter()
        .fold(backend, |offered, &(feature, service)| match service {
            Service::Masked(_) => offered & !feature.bits(),
            Service::Forced => offered | feature.bits(),
            Service::Served => offered,
        })
}

/// Every protocol feature the table names.
fn named_protocol() -> ProtocolFeatures {
    PROTOCOL_SERVICE
        .iter()
        .fold(ProtocolFeatures::empty(), |all, &(f, _)| all | f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_protocol_feature_once() {
        let mut seen = ProtocolFeatures::empty();
        for &(feature, _) in PROTOCOL_SERVICE {
            assert_eq!(feature.bits().count_ones(), 1, "{feature:?}");
            assert!(!seen.intersects(feature), "{feature:?} listed twice");
            seen |= feature;
        }
        assert_eq!(seen, ProtocolFeatures::all());
    }

    fn service(feature: ProtocolFeatures) -> Service {
        PROTOCOL_SERVICE
            .iter()
            .find(|(f, _)| *f == feature)
            .map(|&(_, s)| s)
            .unwrap_or(Service::Masked("not listed"))
    }

    #[test]
    fn inflight_shmfd_is_served_and_offered() {
        assert_eq!(service(ProtocolFeatures::INFLIGHT_SHMFD), Service::Served);
        let offered = offered_protocol(ProtocolFeatures::INFLIGHT_SHMFD | ProtocolFeatures::MQ, 0);
        assert_eq!(
            offered,
            ProtocolFeatures::INFLIGHT_SHMFD | ProtocolFeatures::MQ | forced()
        );
    }

    #[test]
    fn inflight_shmfd_is_not_offered_beside_packed_rings() {
        let backend = ProtocolFeatures::INFLIGHT_SHMFD | ProtocolFeatures::MQ;
        let packed = VirtioFeatures::RING_PACKED.bits();
        assert_eq!(
            offered_protocol(backend, packed),
            ProtocolFeatures::MQ | forced()
        );
        // Split rings only: offered.
        assert!(offered_protocol(backend, 0).contains(ProtocolFeatures::INFLIGHT_SHMFD));
    }

    #[test]
    fn host_notifier_is_masked() {
        let offered = offered_protocol(ProtocolFeatures::HOST_NOTIFIER | ProtocolFeatures::MQ, 0);
        assert_eq!(offered, ProtocolFeatures::MQ | forced());
    }

    #[test]
    fn access_platform_is_served_as_the_backend_offers_it_and_device_bits_pass() {
        let device_bit = 1 << 3;
        let without = VirtioFeatures::VERSION_1.bits() | device_bit;
        let with = VirtioFeatures::ACCESS_PLATFORM.bits() | without;
        assert_eq!(offered_virtio(with), with);
        // Never added to a backend that does not offer it.
        assert_eq!(offered_virtio(without), without);
    }

    #[test]
    fn unnamed_protocol_bits_are_not_offered() {
        let backend = ProtocolFeatures::from_bits_retain(1 << 40) | ProtocolFeatures::MQ;
        assert_eq!(
            offered_protocol(backend, 0),
            ProtocolFeatures::MQ | forced()
        );
    }

    #[cfg(feature = "xen")]
    #[test]
    fn xen_mmap_is_forced_into_the_offer() {
        assert!(offered_protocol(ProtocolFeatures::MQ, 0).contains(ProtocolFeatures::XEN_MMAP));
    }

    #[cfg(not(feature = "xen"))]
    #[test]
    fn xen_mmap_is_masked_without_xen() {
        assert!(
            !offered_protocol(ProtocolFeatures::XEN_MMAP, 0).contains(ProtocolFeatures::XEN_MMAP)
        );
    }

    /// The features a build forces into every offer.
    fn forced() -> ProtocolFeatures {
        PROTOCOL_SERVICE
            .iter()
            .filter(|(_, s)| *s == Service::Forced)
            .fold(ProtocolFeatures::empty(), |all, &(f, _)| all | f)
    }
}
