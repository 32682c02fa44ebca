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

/// The smallest MTU a virtio-net device may have (virtio 1.2, 5.1.4.1: "The device MUST set
/// mtu to between 68 and 65535 inclusive").
pub(crate) const MIN_MTU: u16 = 68;

/// Bytes of a fake RARP frame: an Ethernet header and the 28-byte RARP packet, padded to
/// Ethernet's 60-byte minimum (without the frame check sequence, which the host adds).
pub(crate) const RARP_FRAME_LEN: usize = 60;

/// The fake RARP a back-end broadcasts for a migrated guest (`VHOST_USER_SEND_RARP`): a
/// reverse request (RFC 903, opcode 3) from `mac` asking for its own protocol address, sent
/// to the Ethernet broadcast address, so that switches learn on which port `mac` now is.
pub(crate) fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut frame = [0u8; RARP_FRAME_LEN];
    // Ethernet: to everyone, from the guest, EtherType RARP.
    frame[0..6].fill(0xff);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    // Hardware Ethernet (1), protocol IPv4 (0x0800), address lengths 6 and 4, opcode 3.
    frame[14..16].copy_from_slice(&1u16.to_be_bytes());
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&3u16.to_be_bytes());
    // Sender and target hardware addresses are the guest's; both protocol addresses are
    // unknown (zero), which is what a reverse request asks for.
    frame[22..28].copy_from_slice(&mac);
    frame[32..38].copy_from_slice(&mac);
    frame
}

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

    /// The frame as a packet capture shows it (Wireshark: "Reverse request Who is
    /// 52:54:00:12:34:56? Tell 52:54:00:12:34:56").
    #[test]
    fn rarp_frame_is_a_broadcast_reverse_request_from_the_guest() {
        let frame = rarp_frame([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let expected: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // source: the guest
            0x80, 0x35, // EtherType: RARP
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, // Ethernet / IPv4, lengths 6 and 4
            0x00, 0x03, // reverse request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // sender: MAC, 0.0.0.0
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // target: MAC, 0.0.0.0
        ];
        assert_eq!(frame[..42], expected);
        assert!(frame[42..].iter().all(|&b| b == 0), "padding");
    }
}
