//! The virtio-net device's numbers (virtio 1.2, section 5.1; Linux `include/uapi/linux/virtio_net.h`
//! has the same values): feature bits, the configuration space layout and the header that
//! precedes every packet on both queues.

/// The device handles packets with partial checksum (the driver may send `NEEDS_CSUM`).
pub(crate) const F_CSUM: u64 = 1 << 0;
/// The driver handles packets with partial checksum (the device may send `NEEDS_CSUM`
/// and `DATA_VALID`).
pub(crate) const F_GUEST_CSUM: u64 = 1 << 1;
/// The `mtu` field of the configuration space is valid.
pub(crate) const F_MTU: u64 = 1 << 3;
/// The device has the MAC address in the configuration space.
pub(crate) const F_MAC: u64 = 1 << 5;
/// The driver can receive TCPv4 segmentation (large) packets.
pub(crate) const F_GUEST_TSO4: u64 = 1 << 7;
/// The driver can receive TCPv6 segmentation packets.
pub(crate) const F_GUEST_TSO6: u64 = 1 << 8;
/// The driver can receive TSO packets with ECN.
pub(crate) const F_GUEST_ECN: u64 = 1 << 9;
/// The device can receive TCPv4 segmentation packets from the driver.
pub(crate) const F_HOST_TSO4: u64 = 1 << 11;
/// The device can receive TCPv6 segmentation packets.
pub(crate) const F_HOST_TSO6: u64 = 1 << 12;
/// The device can receive TSO packets with ECN.
pub(crate) const F_HOST_ECN: u64 = 1 << 13;
/// The driver can merge receive buffers: one packet may span several RX chains, and the
/// header's `num_buffers` says how many.
pub(crate) const F_MRG_RXBUF: u64 = 1 << 15;
/// The `status` field of the configuration space is valid.
pub(crate) const F_STATUS: u64 = 1 << 16;
/// More than one queue pair (`max_virtqueue_pairs` in the configuration space).
pub(crate) const F_MQ: u64 = 1 << 22;

/// The offloads a tap device with a vnet header carries in both directions.
pub(crate) const TAP_OFFLOADS: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN;

/// `VIRTIO_NET_S_LINK_UP` in the configuration space's `status`.
pub(crate) const S_LINK_UP: u16 = 1;

/// Byte offsets in `struct virtio_net_config`.
pub(crate) const CONFIG_MAC: usize = 0;
pub(crate) const CONFIG_STATUS: usize = 6;
pub(crate) const CONFIG_MAX_PAIRS: usize = 8;
pub(crate) const CONFIG_MTU: usize = 10;
/// The configuration space up to and including `mtu`; reads beyond it are zeros.
pub(crate) const CONFIG_LEN: usize = 12;

/// The header with `num_buffers`: what a device uses when `VIRTIO_F_VERSION_1` or
/// `VIRTIO_NET_F_MRG_RXBUF` is negotiated (`struct virtio_net_hdr_mrg_rxbuf`).
pub(crate) const HDR_LEN: usize = 12;
/// The legacy header without `num_buffers` (neither feature negotiated).
pub(crate) const HDR_LEN_LEGACY: usize = 10;
/// Offset of `flags: u8` in the header.
pub(crate) const HDR_FLAGS: usize = 0;
/// Offset of `num_buffers: le16` in the header.
pub(crate) const HDR_NUM_BUFFERS: usize = 10;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum is known good (needs `GUEST_CSUM`).
pub(crate) const HDR_F_DATA_VALID: u8 = 2;

/// The largest frame the device passes (an IPv4/IPv6 packet of 64 KiB with its Ethernet
/// and VLAN header, the most a TSO packet can be).
pub(crate) const MAX_FRAME: usize = 65535 + 14 + 4;

/// The header length the driver and the device use, given the negotiated features.
pub(crate) fn header_len(features: u64) -> usize {
    let version_1 = features & (1 << 32) != 0;
    if version_1 || features & F_MRG_RXBUF != 0 {
        HDR_LEN
    } else {
        HDR_LEN_LEGACY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_has_num_buffers_with_version_1_or_mergeable_buffers() {
        assert_eq!(header_len(1 << 32), HDR_LEN);
        assert_eq!(header_len(F_MRG_RXBUF), HDR_LEN);
        assert_eq!(header_len(F_CSUM), HDR_LEN_LEGACY);
    }
}
