//! Feature words: the virtio feature bits vhost-user itself defines or a back-end
//! commonly offers ([`VirtioFeatures`]), the protocol feature bits negotiated with
//! `GET_PROTOCOL_FEATURES`/`SET_PROTOCOL_FEATURES` ([`ProtocolFeatures`]), and the
//! explicit "acknowledged is a subset of offered" check ([`check_subset`]).
//!
//! Both words are read from the wire with `from_bits_retain`: bits this crate does not
//! name are kept, so that [`check_subset`] and the logs see exactly what the peer sent.

use bitflags::bitflags;

use crate::payload::Payload;
use crate::wire::{Reader, WireError};

bitflags! {
    /// Virtio feature bits exchanged with `GET_FEATURES`/`SET_FEATURES`.
    ///
    /// Only the bits the transport or vhost-user itself defines are named here; device
    /// specific bits (below 24) are the device's business and survive untouched through
    /// `from_bits_retain`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct VirtioFeatures: u64 {
        /// `VIRTIO_F_NOTIFY_ON_EMPTY` (bit 24, legacy).
        const NOTIFY_ON_EMPTY = 1 << 24;
        /// `VHOST_F_LOG_ALL` (bit 26): the front-end logs dirty pages during migration;
        /// the spec: "Once it complies to this logging, it may declare the
        /// `VHOST_F_LOG_ALL` vhost feature."
        const LOG_ALL = 1 << 26;
        /// `VIRTIO_F_ANY_LAYOUT` (bit 27, legacy).
        const ANY_LAYOUT = 1 << 27;
        /// `VIRTIO_F_RING_INDIRECT_DESC` (bit 28).
        const RING_INDIRECT_DESC = 1 << 28;
        /// `VIRTIO_F_RING_EVENT_IDX` (bit 29).
        const RING_EVENT_IDX = 1 << 29;
        /// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30): the spec's
        /// "#define VHOST_USER_F_PROTOCOL_FEATURES 30"; signals support for
        /// `GET_PROTOCOL_FEATURES` and `SET_PROTOCOL_FEATURES`.
        const PROTOCOL_FEATURES = 1 << 30;
        /// `VIRTIO_F_VERSION_1` (bit 32).
        const VERSION_1 = 1 << 32;
        /// `VIRTIO_F_ACCESS_PLATFORM` (bit 33, formerly `IOMMU_PLATFORM`).
        const ACCESS_PLATFORM = 1 << 33;
        /// `VIRTIO_F_RING_PACKED` (bit 34).
        const RING_PACKED = 1 << 34;
        /// `VIRTIO_F_IN_ORDER` (bit 35).
        const IN_ORDER = 1 << 35;
        /// `VIRTIO_F_ORDER_PLATFORM` (bit 36).
        const ORDER_PLATFORM = 1 << 36;
        /// `VIRTIO_F_SR_IOV` (bit 37).
        const SR_IOV = 1 << 37;
        /// `VIRTIO_F_NOTIFICATION_DATA` (bit 38).
        const NOTIFICATION_DATA = 1 << 38;
        /// `VIRTIO_F_RING_RESET` (bit 40).
        const RING_RESET = 1 << 40;
    }
}

// The protocol feature numbering below is QEMU's (docs/interop/vhost-user.rst, "Protocol
// features": "#define VHOST_USER_PROTOCOL_F_SHMEM 20"), the specification this crate
// follows. rust-vmm vhost 0.18 and crosvm agree for bits 0 to 19 and then differ:
//
// | bit | QEMU spec (this crate) | rust-vmm vhost 0.18          |
// |-----|------------------------|------------------------------|
// | 20  | SHMEM                  | GET_VRING_BASE_INFLIGHT      |
// | 21  | (undefined)            | GPA_ADDRESSES (named here)   |
// | 22  | (undefined)            | SHMEM                        |
//
// This is the ONE table to edit if the numbering changes again; docs/conformance.md says
// what a rust-vmm-numbered peer sees.
bitflags! {
    /// Protocol feature bits exchanged with `GET_PROTOCOL_FEATURES` and
    /// `SET_PROTOCOL_FEATURES`.
    ///
    /// Bits 0 to 20 are numbered as in QEMU's spec (`SHMEM` is bit 20). Bit 21,
    /// `GPA_ADDRESSES`, is a rust-vmm vhost extension the QEMU spec does not define. A
    /// rust-vmm-numbered peer reads bit 20 as its `GET_VRING_BASE_INFLIGHT` and sends its
    /// `SHMEM` as bit 22, which this crate does not name.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ProtocolFeatures: u64 {
        /// `VHOST_USER_PROTOCOL_F_MQ` (0): multiple queues, `GET_QUEUE_NUM`.
        const MQ = 1 << 0;
        /// `VHOST_USER_PROTOCOL_F_LOG_SHMFD` (1): the dirty log is shared memory passed
        /// with `SET_LOG_BASE`.
        const LOG_SHMFD = 1 << 1;
        /// `VHOST_USER_PROTOCOL_F_RARP` (2): `SEND_RARP`.
        const RARP = 1 << 2;
        /// `VHOST_USER_PROTOCOL_F_REPLY_ACK` (3): the NEED_REPLY flag may be set on any
        /// request.
        const REPLY_ACK = 1 << 3;
        /// `VHOST_USER_PROTOCOL_F_MTU` (4): `NET_SET_MTU`.
        const MTU = 1 << 4;
        /// `VHOST_USER_PROTOCOL_F_BACKEND_REQ` (5): the back-end request channel.
        const BACKEND_REQ = 1 << 5;
        /// `VHOST_USER_PROTOCOL_F_CROSS_ENDIAN` (6): `SET_VRING_ENDIAN`.
        const CROSS_ENDIAN = 1 << 6;
        /// `VHOST_USER_PROTOCOL_F_CRYPTO_SESSION` (7): crypto session messages.
        const CRYPTO_SESSION = 1 << 7;
        /// `VHOST_USER_PROTOCOL_F_PAGEFAULT` (8): postcopy migration with userfaultfd.
        const PAGEFAULT = 1 << 8;
        /// `VHOST_USER_PROTOCOL_F_CONFIG` (9): `GET_CONFIG`/`SET_CONFIG`.
        const CONFIG = 1 << 9;
        /// `VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD` (10): the back-end may pass fds on its
        /// channel.
        const BACKEND_SEND_FD = 1 << 10;
        /// `VHOST_USER_PROTOCOL_F_HOST_NOTIFIER` (11): host notifier areas.
        const HOST_NOTIFIER = 1 << 11;
        /// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` (12): inflight I/O tracking buffer.
        const INFLIGHT_SHMFD = 1 << 12;
        /// `VHOST_USER_PROTOCOL_F_RESET_DEVICE` (13): `RESET_DEVICE`.
        const RESET_DEVICE = 1 << 13;
        /// `VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS` (14): kicks and calls as messages.
        const INBAND_NOTIFICATIONS = 1 << 14;
        /// `VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS` (15): `ADD_MEM_REG`/`REM_MEM_REG`.
        const CONFIGURE_MEM_SLOTS = 1 << 15;
        /// `VHOST_USER_PROTOCOL_F_STATUS` (16): `SET_STATUS`/`GET_STATUS`.
        const STATUS = 1 << 16;
        /// `VHOST_USER_PROTOCOL_F_XEN_MMAP` (17): memory regions carry Xen mapping fields.
        const XEN_MMAP = 1 << 17;
        /// `VHOST_USER_PROTOCOL_F_SHARED_OBJECT` (18): shared object messages.
        const SHARED_OBJECT = 1 << 18;
        /// `VHOST_USER_PROTOCOL_F_DEVICE_STATE` (19): device state transfer.
        const DEVICE_STATE = 1 << 19;
        /// `VHOST_USER_PROTOCOL_F_SHMEM` (20): VIRTIO shared memory regions,
        /// `GET_SHMEM_CONFIG` and `BACKEND_SHMEM_MAP`/`BACKEND_SHMEM_UNMAP` (bit 22 in
        /// rust-vmm vhost 0.18).
        const SHMEM = 1 << 20;
        /// Bit 21 in rust-vmm vhost 0.18: memory region messages carry guest physical
        /// addresses instead of front-end user addresses.
        const GPA_ADDRESSES = 1 << 21;
    }
}

/// Implements [`Payload`] for a feature word: a `u64` read with `from_bits_retain`.
macro_rules! feature_payload {
    ($ty:ty) => {
        impl Payload for $ty {
            const MIN_SIZE: usize = 8;
            const MAX_SIZE: usize = 8;
            fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
                Ok(<$ty>::from_bits_retain(r.u64()?))
            }
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.bits().to_ne_bytes());
            }
        }
    };
}
feature_payload!(VirtioFeatures);
feature_payload!(ProtocolFeatures);

/// Checks that every bit in `acked` was in `offered`.
///
/// The peer may acknowledge only what was offered; the unoffered bits are returned in
/// [`WireError::UnofferedFeatures`]. Works on raw words so that unnamed bits count too.
pub fn check_subset(offered: u64, acked: u64) -> Result<(), WireError> {
    let extra = acked & !offered;
    if extra == 0 {
        Ok(())
    } else {
        Err(WireError::UnofferedFeatures { extra })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn protocol_bits_follow_the_qemu_spec() {
        let table = [
            (ProtocolFeatures::MQ, 0),
            (ProtocolFeatures::LOG_SHMFD, 1),
            (ProtocolFeatures::RARP, 2),
            (ProtocolFeatures::REPLY_ACK, 3),
            (ProtocolFeatures::MTU, 4),
            (ProtocolFeatures::BACKEND_REQ, 5),
            (ProtocolFeatures::CROSS_ENDIAN, 6),
            (ProtocolFeatures::CRYPTO_SESSION, 7),
            (ProtocolFeatures::PAGEFAULT, 8),
            (ProtocolFeatures::CONFIG, 9),
            (ProtocolFeatures::BACKEND_SEND_FD, 10),
            (ProtocolFeatures::HOST_NOTIFIER, 11),
            (ProtocolFeatures::INFLIGHT_SHMFD, 12),
            (ProtocolFeatures::RESET_DEVICE, 13),
            (ProtocolFeatures::INBAND_NOTIFICATIONS, 14),
            (ProtocolFeatures::CONFIGURE_MEM_SLOTS, 15),
            (ProtocolFeatures::STATUS, 16),
            (ProtocolFeatures::XEN_MMAP, 17),
            (ProtocolFeatures::SHARED_OBJECT, 18),
            (ProtocolFeatures::DEVICE_STATE, 19),
            (ProtocolFeatures::SHMEM, 20),
            (ProtocolFeatures::GPA_ADDRESSES, 21),
        ];
        for (flag, bit) in table {
            assert_eq!(flag.bits(), 1 << bit, "{flag:?}");
        }
        assert_eq!(ProtocolFeatures::all().bits(), (1 << 22) - 1);
    }

    #[test]
    fn virtio_protocol_features_bit_is_30() {
        assert_eq!(VirtioFeatures::PROTOCOL_FEATURES.bits(), 0x4000_0000);
        assert_eq!(VirtioFeatures::LOG_ALL.bits(), 0x400_0000);
    }

    #[test]
    fn unknown_bits_survive_from_bits_retain() {
        let word = (1 << 63) | ProtocolFeatures::MQ.bits();
        assert_eq!(ProtocolFeatures::from_bits_retain(word).bits(), word);
    }

    #[test]
    fn feature_words_round_trip_with_unknown_bits() {
        let f = VirtioFeatures::from_bits_retain(VirtioFeatures::VERSION_1.bits() | 1);
        crate::payload::tests::assert_round_trip(&f);
        let p = ProtocolFeatures::from_bits_retain(1 << 40);
        crate::payload::tests::assert_round_trip(&p);
    }

    #[test]
    fn subset_is_accepted() {
        assert_eq!(check_subset(0b1011, 0b0011), Ok(()));
        assert_eq!(check_subset(0b1011, 0), Ok(()));
    }

    #[test]
    fn unoffered_bits_are_named_in_the_error() {
        assert_eq!(
            check_subset(0b0011, 0b1101),
            Err(WireError::UnofferedFeatures { extra: 0b1100 })
        );
    }
}
