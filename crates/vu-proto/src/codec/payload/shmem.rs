//! Shared memory payloads: the `GET_SHMEM_CONFIG` reply and the MMAP request of the
//! back-end's `SHMEM_MAP`/`SHMEM_UNMAP`.

use bitflags::bitflags;

use super::{checked_end, fixed_payload};
use crate::wire::{Reader, WireError};

/// The number of entries in the shared memory size array: shmids 0 to 255.
pub const MAX_SHMEM_REGIONS: usize = 256;

/// The spec's "VIRTIO Shared Memory Region configuration", the reply to
/// `GET_SHMEM_CONFIG`.
///
/// "`num regions` specifies the number of valid regions (non-zero size). The array
/// index corresponds to the shared memory ID (shmid)." The parser bounds the count by
/// [`MAX_SHMEM_REGIONS`]. Whether each size is a multiple of the page size is left to
/// the front-end, which knows its page size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShmemConfig {
    /// The number of regions in use.
    pub nregions: u32,
    /// The size of each region, indexed by shmid; 0 for an unused shmid.
    pub memory_sizes: Box<[u64; MAX_SHMEM_REGIONS]>,
}

impl ShmemConfig {
    /// Two `u32` and 256 `u64`.
    pub const SIZE: usize = 8 + 8 * MAX_SHMEM_REGIONS;

    /// Reads and checks the configuration.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let nregions = r.u32()?;
        r.skip(4)?;
        // 256 fits in u64 without loss.
        if u64::from(nregions) > MAX_SHMEM_REGIONS as u64 {
            return Err(WireError::OutOfRange {
                field: "shmem nregions",
                value: u64::from(nregions),
                min: 0,
                max: MAX_SHMEM_REGIONS as u64,
            });
        }
        let mut memory_sizes = Box::new([0u64; MAX_SHMEM_REGIONS]);
        for size in memory_sizes.iter_mut() {
            *size = r.u64()?;
        }
        Ok(ShmemConfig {
            nregions,
            memory_sizes,
        })
    }

    /// Appends the configuration with zero padding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nregions.to_ne_bytes());
        out.extend_from_slice(&[0; 4]);
        for size in self.memory_sizes.iter() {
            out.extend_from_slice(&size.to_ne_bytes());
        }
    }
}
fixed_payload!(ShmemConfig);

bitflags! {
    /// The spec's MMAP request flags: "0: Pages are mapped read-only; 1: Pages are
    /// mapped read-write". Other bits are refused.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ShmemMapFlags: u64 {
        /// The pages are mapped read-write.
        const WRITABLE = 1 << 0;
    }
}

/// Byte length of the padding after `shmid`.
const SHMID_PADDING: usize = 7;

/// The spec's "MMAP request", the payload of `BACKEND_SHMEM_MAP` and
/// `BACKEND_SHMEM_UNMAP` (which ignores `fd_offset`).
///
/// The parser refuses a zero length, unknown flags and an fd offset or region offset
/// that overflows when the length is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShmemMap {
    /// "a 8-bit shared memory region identifier".
    pub shmid: u8,
    /// "a 64-bit offset of this area from the start of the supplied file descriptor".
    pub fd_offset: u64,
    /// "a 64-bit offset from the start of the pointed shared memory region".
    pub shm_offset: u64,
    /// "a 64-bit size of the memory to map"; never zero.
    pub len: u64,
    /// How the pages are mapped.
    pub flags: ShmemMapFlags,
}

impl ShmemMap {
    /// One `u8`, seven bytes of padding and four `u64`.
    pub const SIZE: usize = 1 + SHMID_PADDING + 32;

    /// Reads and checks the request.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let shmid = r.u8()?;
        r.skip(SHMID_PADDING)?;
        let fd_offset = r.u64()?;
        let shm_offset = r.u64()?;
        let len = r.u64()?;
        let raw_flags = r.u64()?;
        let flags = ShmemMapFlags::from_bits(raw_flags).ok_or(WireError::InvalidValue {
            field: "shmem map flags",
            value: raw_flags,
        })?;
        if len == 0 {
            return Err(WireError::ZeroSize {
                field: "shmem map len",
            });
        }
        checked_end("shmem fd offset", fd_offset, len)?;
        checked_end("shmem region offset", shm_offset, len)?;
        Ok(ShmemMap {
            shmid,
            fd_offset,
            shm_offset,
            len,
            flags,
        })
    }

    /// Appends the request with zero padding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.shmid);
        out.extend_from_slice(&[0; SHMID_PADDING]);
        for v in [self.fd_offset, self.shm_offset, self.len, self.flags.bits()] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
    }
}
fixed_payload!(ShmemMap);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::payload::Payload;
    use crate::request::RequestCode;

    const REQ: RequestCode = RequestCode(9);

    fn map_bytes(shmid: u8, v: [u64; 4]) -> Vec<u8> {
        let mut b = vec![shmid, 0, 0, 0, 0, 0, 0, 0];
        for x in v {
            b.extend_from_slice(&x.to_ne_bytes());
        }
        b
    }

    #[test]
    fn config_decodes_known_bytes() {
        let mut b = 2u32.to_ne_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        for i in 0..MAX_SHMEM_REGIONS as u64 {
            b.extend_from_slice(&(if i < 2 { 0x1000 } else { 0u64 }).to_ne_bytes());
        }
        let c = ShmemConfig::decode_body(RequestCode(44), &b).unwrap();
        assert_eq!(c.nregions, 2);
        assert_eq!(c.memory_sizes[1], 0x1000);
        assert_eq!(c.memory_sizes[2], 0);
    }

    #[test]
    fn config_round_trips() {
        let mut memory_sizes = Box::new([0u64; MAX_SHMEM_REGIONS]);
        memory_sizes[3] = 0x20_0000;
        assert_round_trip(&ShmemConfig {
            nregions: 1,
            memory_sizes,
        });
    }

    #[test]
    fn config_too_many_regions_is_refused() {
        let mut b = 257u32.to_ne_bytes().to_vec();
        b.resize(ShmemConfig::SIZE, 0);
        assert!(matches!(
            ShmemConfig::decode_body(RequestCode(44), &b),
            Err(WireError::OutOfRange { value: 257, .. })
        ));
    }

    #[test]
    fn map_decodes_known_bytes() {
        assert_eq!(
            ShmemMap::decode_body(REQ, &map_bytes(3, [0x10, 0x2000, 0x1000, 1])),
            Ok(ShmemMap {
                shmid: 3,
                fd_offset: 0x10,
                shm_offset: 0x2000,
                len: 0x1000,
                flags: ShmemMapFlags::WRITABLE
            })
        );
    }

    #[test]
    fn map_round_trips() {
        assert_round_trip(&ShmemMap {
            shmid: 255,
            fd_offset: 0,
            shm_offset: 0,
            len: 1,
            flags: ShmemMapFlags::empty(),
        });
    }

    #[test]
    fn map_bad_fields_are_refused() {
        let bad = [
            [0, 0, 0, 0],
            [u64::MAX, 0, 2, 0],
            [0, u64::MAX, 2, 0],
            [0, 0, 1, 2],
        ];
        for v in bad {
            assert!(
                ShmemMap::decode_body(REQ, &map_bytes(0, v)).is_err(),
                "{v:?}"
            );
        }
    }
}
