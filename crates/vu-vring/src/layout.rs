//! The byte layout of a virtqueue's rings in guest memory (virtio 1.x, "Split Virtqueues"
//! and "Packed Virtqueues"), in one place: this crate reads and writes rings with it,
//! vu-daemon checks ring addresses against it (`SET_VRING_ADDR`), and the test kit's drivers
//! lay rings out with it.
//!
//! A split ring is three areas: the descriptor table (`size` descriptors), the available
//! ring (`flags: u16`, `idx: u16`, `ring: [u16; size]`, `used_event: u16`) and the used ring
//! (`flags: u16`, `idx: u16`, `ring: [{id: u32, len: u32}; size]`, `avail_event: u16`). A
//! packed ring is its descriptor ring (`size` descriptors of the same 16 bytes) and two event
//! suppression structures (`off_wrap: u16`, `flags: u16`).

/// Bytes of one descriptor, in both layouts: split `addr: u64`, `len: u32`, `flags: u16`,
/// `next: u16`; packed `addr: u64`, `len: u32`, `id: u16`, `flags: u16`.
pub const DESC_SIZE: u64 = crate::chain::DESC_SIZE as u64;
/// Bytes before the available ring's entries: `flags: u16`, `idx: u16`.
pub const AVAIL_HEADER: u64 = 4;
/// Offset of the available ring's `idx: u16`, after `flags: u16`.
pub const AVAIL_IDX: u64 = 2;
/// Bytes of one available ring entry (a head descriptor index).
pub const AVAIL_ELEM: u64 = 2;
/// Bytes before the used ring's entries: `flags: u16`, `idx: u16`.
pub const USED_HEADER: u64 = 4;
/// Offset of the used ring's `idx: u16`, after `flags: u16`.
pub const USED_IDX: u64 = 2;
/// Bytes of one used element: `id: u32`, `len: u32`.
pub const USED_ELEM: u64 = 8;
/// Bytes of the event index after a split ring's entries: `used_event` in the available
/// ring, `avail_event` in the used ring.
pub const EVENT_IDX: u64 = 2;
/// Bytes of a packed ring's driver or device area (an event suppression structure:
/// `off_wrap: u16`, `flags: u16`).
pub const EVENT_SUPPRESSION: u64 = 4;

/// Bytes of the descriptor table (split) or descriptor ring (packed) of `size` entries.
pub const fn desc_table_size(size: u64) -> u64 {
    DESC_SIZE * size
}

/// Bytes of a split available ring of `size` entries, `used_event` included.
pub const fn avail_ring_size(size: u64) -> u64 {
    AVAIL_HEADER + AVAIL_ELEM * size + EVENT_IDX
}

/// Bytes of a split used ring of `size` entries, `avail_event` included.
pub const fn used_ring_size(size: u64) -> u64 {
    USED_HEADER + USED_ELEM * size + EVENT_IDX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_follow_the_virtio_layout() {
        // virtio 1.x, "Virtqueue Alignment": 16 * size, 6 + 2 * size, 6 + 8 * size.
        assert_eq!(desc_table_size(256), 4096);
        assert_eq!(avail_ring_size(256), 6 + 2 * 256);
        assert_eq!(used_ring_size(256), 6 + 8 * 256);
    }
}
