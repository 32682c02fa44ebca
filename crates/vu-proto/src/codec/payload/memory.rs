//! Memory payloads: a memory region, the memory table of `SET_MEM_TABLE`, the single
//! region of `ADD_MEM_REG`/`REM_MEM_REG`, and the log description of `SET_LOG_BASE`.
//!
//! With the `xen` cargo feature every region carries the two extra 32-bit fields the
//! spec adds "when the `VHOST_USER_PROTOCOL_F_XEN_MMAP` protocol feature has been
//! successfully negotiated". The layout is chosen at compile time, as in the reference
//! implementation: a `xen` build speaks only to Xen front-ends.

#[cfg(feature = "xen")]
use bitflags::bitflags;

use super::{checked_end, fixed_payload, Payload};
use crate::header::MAX_FDS;
use crate::wire::{Reader, WireError};

#[cfg(feature = "xen")]
bitflags! {
    /// The spec's "xen mmap flags" of a memory region.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct XenMmapFlags: u32 {
        /// "Bit 0 is set for Xen foreign memory mapping."
        const FOREIGN = 1 << 0;
        /// "Bit 1 is set for Xen grant memory mapping."
        const GRANT = 1 << 1;
        /// "Bit 8 is set if the memory region can not be mapped in advance".
        const UNMAP_ON_DEMAND = 1 << 8;
    }
}

/// The spec's "memory region description".
///
/// The parser refuses a zero size and a region whose guest address, user address or
/// mmap offset plus size overflows 64 bits. With the `xen` feature it also refuses
/// unknown Xen flag bits and requires exactly one of foreign or grant mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryRegion {
    /// "a 64-bit guest address of the region".
    pub guest_phys_addr: u64,
    /// "a 64-bit size"; never zero.
    pub memory_size: u64,
    /// "a 64-bit user address" of the region in the front-end.
    pub user_addr: u64,
    /// "a 64-bit offset where region starts in the mapped memory".
    pub mmap_offset: u64,
    /// How Xen maps the region.
    #[cfg(feature = "xen")]
    pub xen_mmap_flags: XenMmapFlags,
    /// The spec's "domid": "a 32-bit Xen hypervisor specific domain id".
    #[cfg(feature = "xen")]
    pub xen_mmap_data: u32,
}

impl MemoryRegion {
    /// A region of `memory_size` bytes at guest address `guest_phys_addr`, mapped at
    /// `user_addr` in the front-end, starting `mmap_offset` bytes into the fd sent with it.
    ///
    /// Builds with and without feature `xen` (which adds two fields, here empty flags and
    /// domain 0; a Xen front-end sets them with `with_xen`, present with `xen`), so front-end
    /// code does not break when a dependency turns `xen` on.
    pub fn new(guest_phys_addr: u64, memory_size: u64, user_addr: u64, mmap_offset: u64) -> Self {
        MemoryRegion {
            guest_phys_addr,
            memory_size,
            user_addr,
            mmap_offset,
            #[cfg(feature = "xen")]
            xen_mmap_flags: XenMmapFlags::empty(),
            #[cfg(feature = "xen")]
            xen_mmap_data: 0,
        }
    }

    /// The region with Xen mapping `flags` and domain id `domid`.
    #[cfg(feature = "xen")]
    pub fn with_xen(self, flags: XenMmapFlags, domid: u32) -> Self {
        MemoryRegion {
            xen_mmap_flags: flags,
            xen_mmap_data: domid,
            ..self
        }
    }

    /// Four `u64`, and with `xen` two more `u32`.
    #[cfg(not(feature = "xen"))]
    pub const SIZE: usize = 32;
    /// Four `u64`, and with `xen` two more `u32`.
    #[cfg(feature = "xen")]
    pub const SIZE: usize = 40;

    /// Reads the region and checks size and overflow.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let guest_phys_addr = r.u64()?;
        let memory_size = r.u64()?;
        let user_addr = r.u64()?;
        let mmap_offset = r.u64()?;
        if memory_size == 0 {
            return Err(WireError::ZeroSize {
                field: "memory region size",
            });
        }
        checked_end("memory region guest address", guest_phys_addr, memory_size)?;
        checked_end("memory region user address", user_addr, memory_size)?;
        checked_end("memory region mmap offset", mmap_offset, memory_size)?;
        #[cfg(feature = "xen")]
        let (xen_mmap_flags, xen_mmap_data) = {
            let raw = r.u32()?;
            let data = r.u32()?;
            let flags = XenMmapFlags::from_bits(raw).ok_or(WireError::InvalidValue {
                field: "xen mmap flags",
                value: u64::from(raw),
            })?;
            let kinds = flags & (XenMmapFlags::FOREIGN | XenMmapFlags::GRANT);
            if kinds != XenMmapFlags::FOREIGN && kinds != XenMmapFlags::GRANT {
                return Err(WireError::InvalidValue {
                    field: "xen mmap flags (exactly one of foreign or grant)",
                    value: u64::from(raw),
                });
            }
            (flags, data)
        };
        Ok(MemoryRegion {
            guest_phys_addr,
            memory_size,
            user_addr,
            mmap_offset,
            #[cfg(feature = "xen")]
            xen_mmap_flags,
            #[cfg(feature = "xen")]
            xen_mmap_data,
        })
    }

    /// Appends the region.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.guest_phys_addr,
            self.memory_size,
            self.user_addr,
            self.mmap_offset,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        #[cfg(feature = "xen")]
        {
            out.extend_from_slice(&self.xen_mmap_flags.bits().to_ne_bytes());
            out.extend_from_slice(&self.xen_mmap_data.to_ne_bytes());
        }
    }
}
fixed_payload!(MemoryRegion);

/// Byte length of the table's prefix: the 32-bit region count and 32-bit padding.
const TABLE_PREFIX: usize = 8;
/// The most regions a memory table may carry, one fd each.
// MAX_FDS is 8, well within u32.
const MAX_REGIONS: u32 = MAX_FDS as u32;

/// The spec's "multiple memory regions description", the payload of
/// `SET_MEM_TABLE` (and of its postcopy reply).
///
/// "In the ancillary data there is an array of file descriptors for each memory mapped
/// region. The size and ordering of the fds matches the number and ordering of memory
/// regions." The parser requires 1 to 8 regions and a body holding exactly that many;
/// [`Payload::expected_fds`] is the region count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemoryTable {
    /// The regions, 1 to [`MAX_FDS`] of them, in the order of their fds.
    pub regions: Vec<MemoryRegion>,
}

impl MemoryTable {
    /// Reads the count, the padding and the regions.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let count = r.u32()?;
        r.skip(4)?;
        if count == 0 || count > MAX_REGIONS {
            return Err(WireError::TooManyRegions {
                count,
                max: MAX_REGIONS,
            });
        }
        let regions = (0..count)
            .map(|_| MemoryRegion::read(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MemoryTable { regions })
    }

    /// Appends the count, zero padding and the regions.
    pub fn encode(&self, out: &mut Vec<u8>) {
        // A table built by this crate's users could exceed u32 only by misuse; saturate
        // so the peer refuses it rather than seeing a wrapped count.
        let count = u32::try_from(self.regions.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_ne_bytes());
        out.extend_from_slice(&[0; 4]);
        for region in &self.regions {
            region.encode(out);
        }
    }
}

impl Payload for MemoryTable {
    const MIN_SIZE: usize = TABLE_PREFIX + MemoryRegion::SIZE;
    const MAX_SIZE: usize = TABLE_PREFIX + MAX_FDS * MemoryRegion::SIZE;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        MemoryTable::read(r)
    }
    fn encode(&self, out: &mut Vec<u8>) {
        MemoryTable::encode(self, out)
    }
    fn expected_fds(&self) -> Option<usize> {
        Some(self.regions.len())
    }
}

/// The spec's "single memory region description": 64 bits of padding and a region;
/// the payload of `ADD_MEM_REG`, `REM_MEM_REG` and the postcopy reply to `ADD_MEM_REG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SingleMemoryRegion {
    /// The region.
    pub region: MemoryRegion,
}

impl SingleMemoryRegion {
    /// The padding and one region.
    pub const SIZE: usize = 8 + MemoryRegion::SIZE;

    /// Skips the padding and reads the region.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.skip(8)?;
        Ok(SingleMemoryRegion {
            region: MemoryRegion::read(r)?,
        })
    }

    /// Appends zero padding and the region.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0; 8]);
        self.region.encode(out);
    }
}
fixed_payload!(SingleMemoryRegion);

/// The spec's "log description", the payload of `SET_LOG_BASE`.
///
/// "Log starts at the supplied offset in the supplied file descriptor." The parser
/// refuses a zero size and an offset plus size that overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Log {
    /// "a 64-bit size of area used for logging"; never zero.
    pub mmap_size: u64,
    /// "a 64-bit offset from start of supplied file descriptor where logging starts".
    pub mmap_offset: u64,
}

impl Log {
    /// Two `u64`.
    pub const SIZE: usize = 16;

    /// Reads and checks the description.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let mmap_size = r.u64()?;
        let mmap_offset = r.u64()?;
        if mmap_size == 0 {
            return Err(WireError::ZeroSize { field: "log size" });
        }
        checked_end("log area", mmap_offset, mmap_size)?;
        Ok(Log {
            mmap_size,
            mmap_offset,
        })
    }

    /// Appends the description.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.mmap_size.to_ne_bytes());
        out.extend_from_slice(&self.mmap_offset.to_ne_bytes());
    }
}
fixed_payload!(Log);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::request::RequestCode;

    const REQ: RequestCode = RequestCode(5);

    /// A valid region for tests, whatever the `xen` feature.
    pub(crate) fn region(gpa: u64, size: u64) -> MemoryRegion {
        let region = MemoryRegion::new(gpa, size, 0x7f00_0000_0000 + gpa, 0);
        #[cfg(feature = "xen")]
        let region = region.with_xen(XenMmapFlags::FOREIGN, 1);
        region
    }

    #[test]
    fn new_sets_the_four_fields() {
        let r = MemoryRegion::new(0x1000, 0x2000, 0x3000, 0x40);
        assert_eq!(
            (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset),
            (0x1000, 0x2000, 0x3000, 0x40)
        );
    }

    fn region_bytes(v: [u64; 4]) -> Vec<u8> {
        let mut b: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
        if cfg!(feature = "xen") {
            b.extend_from_slice(&1u32.to_ne_bytes());
            b.extend_from_slice(&7u32.to_ne_bytes());
        }
        b
    }

    #[test]
    fn region_decodes_known_bytes() {
        let b = region_bytes([0x1000, 0x2000, 0x3000, 0x40]);
        let r = MemoryRegion::decode_body(REQ, &b).unwrap();
        assert_eq!(r.guest_phys_addr, 0x1000);
        assert_eq!(r.memory_size, 0x2000);
        assert_eq!(r.user_addr, 0x3000);
        assert_eq!(r.mmap_offset, 0x40);
    }

    #[test]
    fn region_zero_size_is_refused() {
        let b = region_bytes([0x1000, 0, 0x3000, 0]);
        assert!(matches!(
            MemoryRegion::decode_body(REQ, &b),
            Err(WireError::ZeroSize { .. })
        ));
    }

    #[test]
    fn region_address_overflow_is_refused() {
        for v in [
            [u64::MAX, 2, 0, 0],
            [0, 2, u64::MAX - 1, 0],
            [0, 2, 0, u64::MAX],
        ] {
            assert!(matches!(
                MemoryRegion::decode_body(REQ, &region_bytes(v)),
                Err(WireError::Overflow { .. })
            ));
        }
    }

    #[cfg(feature = "xen")]
    #[test]
    fn region_xen_flags_need_exactly_one_mapping_kind() {
        for bad in [0u32, 3, 1 << 4] {
            let mut b = region_bytes([0, 0x1000, 0, 0]);
            let at = b.len() - 8;
            b[at..at + 4].copy_from_slice(&bad.to_ne_bytes());
            assert!(matches!(
                MemoryRegion::decode_body(REQ, &b),
                Err(WireError::InvalidValue { .. })
            ));
        }
    }

    #[test]
    fn table_round_trips() {
        assert_round_trip(&MemoryTable {
            regions: vec![region(0, 0x10_0000), region(0x10_0000, 0x1000)],
        });
    }

    #[test]
    fn table_decodes_known_bytes_ignoring_padding() {
        let mut b = 1u32.to_ne_bytes().to_vec();
        b.extend_from_slice(&0xffff_ffffu32.to_ne_bytes());
        b.extend_from_slice(&region_bytes([0, 0x1000, 0x5000, 0]));
        let t = MemoryTable::decode_body(REQ, &b).unwrap();
        assert_eq!(t.regions.len(), 1);
        assert_eq!(t.expected_fds(), Some(1));
    }

    #[test]
    fn table_region_count_outside_1_to_8_is_refused() {
        for count in [0u32, 9, u32::MAX] {
            let mut b = count.to_ne_bytes().to_vec();
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&region_bytes([0, 0x1000, 0, 0]));
            assert_eq!(
                MemoryTable::decode_body(REQ, &b),
                Err(WireError::TooManyRegions { count, max: 8 })
            );
        }
    }

    #[test]
    fn table_count_and_length_must_agree() {
        let mut b = 2u32.to_ne_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&region_bytes([0, 0x1000, 0, 0]));
        assert!(matches!(
            MemoryTable::decode_body(REQ, &b),
            Err(WireError::Truncated { .. })
        ));
        let mut b = 1u32.to_ne_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&region_bytes([0, 0x1000, 0, 0]));
        b.extend_from_slice(&region_bytes([0x1000, 0x1000, 0, 0]));
        assert!(matches!(
            MemoryTable::decode_body(REQ, &b),
            Err(WireError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn single_region_round_trips() {
        assert_round_trip(&SingleMemoryRegion {
            region: region(0x4000, 0x1000),
        });
    }

    #[test]
    fn single_region_wrong_size_is_refused() {
        assert!(matches!(
            SingleMemoryRegion::decode_body(REQ, &[0; 8]),
            Err(WireError::WrongSize { .. })
        ));
    }

    #[test]
    fn log_decodes_and_round_trips() {
        let mut b = 0x1000u64.to_ne_bytes().to_vec();
        b.extend_from_slice(&0x20u64.to_ne_bytes());
        let log = Log::decode_body(REQ, &b).unwrap();
        assert_eq!(
            log,
            Log {
                mmap_size: 0x1000,
                mmap_offset: 0x20
            }
        );
        assert_round_trip(&log);
    }

    #[test]
    fn log_zero_size_and_overflow_are_refused() {
        let b = [0u8; 16];
        assert!(matches!(
            Log::decode_body(REQ, &b),
            Err(WireError::ZeroSize { .. })
        ));
        let mut b = 2u64.to_ne_bytes().to_vec();
        b.extend_from_slice(&u64::MAX.to_ne_bytes());
        assert!(matches!(
            Log::decode_body(REQ, &b),
            Err(WireError::Overflow { .. })
        ));
    }
}
