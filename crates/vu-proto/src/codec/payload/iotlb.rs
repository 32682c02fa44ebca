//! The IOTLB message of `IOTLB_MSG` and `BACKEND_IOTLB_MSG`: the kernel's
//! `struct vhost_iotlb_msg`.

use super::{checked_end, fixed_payload};
use crate::wire::{Reader, WireError};

/// The spec's "permissions flags: an 8-bit value".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IotlbPerm {
    /// "0: No access".
    None = 0,
    /// "1: Read access".
    Read = 1,
    /// "2: Write access".
    Write = 2,
    /// "3: Read/Write access".
    ReadWrite = 3,
}

/// The spec's "type: an 8-bit IOTLB message type".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IotlbType {
    /// "1: IOTLB miss" (back-end to front-end).
    Miss = 1,
    /// "2: IOTLB update" (front-end to back-end).
    Update = 2,
    /// "3: IOTLB invalidate" (front-end to back-end).
    Invalidate = 3,
    /// "4: IOTLB access fail" (back-end to front-end).
    AccessFail = 4,
}

/// Byte length of the three `u64` fields before `perm`.
const ADDRESS_FIELDS: usize = 24;
/// Trailing padding after `perm` and `type`: the C struct is aligned to 8 bytes.
const TAIL_PADDING: usize = 6;

/// The spec's "IOTLB message": iova, size, user address, permissions and type, laid out
/// as the kernel's `struct vhost_iotlb_msg` (32 bytes, six of them trailing padding).
///
/// Unknown permission and type values are refused, as are an iova or user address that
/// overflows when the size is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Iotlb {
    /// "a 64-bit I/O virtual address programmed by the guest".
    pub iova: u64,
    /// "a 64-bit size".
    pub size: u64,
    /// "a 64-bit user address".
    pub uaddr: u64,
    /// The access permissions.
    pub perm: IotlbPerm,
    /// The message type.
    pub kind: IotlbType,
}

impl Iotlb {
    /// Three `u64`, two `u8` and the padding.
    pub const SIZE: usize = ADDRESS_FIELDS + 2 + TAIL_PADDING;

    /// Reads and checks the message.
    ///
    /// An invalidation carries only its range: QEMU (7.2, `vhost_backend_invalidate_device_
    /// iotlb`) leaves `perm` and `uaddr` of an invalidation uninitialised, so both are read as
    /// 0 (`IotlbPerm::None`) whatever the bytes hold, and only its IOVA range is checked; the
    /// range may end at the end of the address space (`iova + size` = 2^64, as QEMU's
    /// intel-iommu sends).
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let iova = r.u64()?;
        let size = r.u64()?;
        let raw_uaddr = r.u64()?;
        let raw_perm = r.u8()?;
        let kind = match r.u8()? {
            1 => IotlbType::Miss,
            2 => IotlbType::Update,
            3 => IotlbType::Invalidate,
            4 => IotlbType::AccessFail,
            other => {
                return Err(WireError::InvalidValue {
                    field: "iotlb message type",
                    value: u64::from(other),
                })
            }
        };
        r.skip(TAIL_PADDING)?;
        if kind == IotlbType::Invalidate {
            // QEMU invalidates "from iova to the end of the address space" with
            // iova + size = 2^64: the last byte, not the end, must not overflow.
            checked_end("iotlb iova", iova, size.saturating_sub(1))?;
            return Ok(Iotlb {
                iova,
                size,
                uaddr: 0,
                perm: IotlbPerm::None,
                kind,
            });
        }
        let perm = match raw_perm {
            0 => IotlbPerm::None,
            1 => IotlbPerm::Read,
            2 => IotlbPerm::Write,
            3 => IotlbPerm::ReadWrite,
            other => {
                return Err(WireError::InvalidValue {
                    field: "iotlb permissions",
                    value: u64::from(other),
                })
            }
        };
        checked_end("iotlb iova", iova, size)?;
        checked_end("iotlb user address", raw_uaddr, size)?;
        Ok(Iotlb {
            iova,
            size,
            uaddr: raw_uaddr,
            perm,
            kind,
        })
    }

    /// Appends the message with zero padding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.iova, self.size, self.uaddr] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        out.push(self.perm as u8);
        out.push(self.kind as u8);
        out.extend_from_slice(&[0; TAIL_PADDING]);
    }
}
fixed_payload!(Iotlb);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::payload::Payload;
    use crate::request::RequestCode;

    const REQ: RequestCode = RequestCode(22);

    fn bytes(iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [iova, size, uaddr] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&[perm, kind, 0, 0, 0, 0, 0, 0]);
        b
    }

    #[test]
    fn decodes_known_bytes() {
        assert_eq!(
            Iotlb::decode_body(REQ, &bytes(0x1000, 0x2000, 0x7000, 3, 2)),
            Ok(Iotlb {
                iova: 0x1000,
                size: 0x2000,
                uaddr: 0x7000,
                perm: IotlbPerm::ReadWrite,
                kind: IotlbType::Update,
            })
        );
    }

    #[test]
    fn round_trips() {
        assert_round_trip(&Iotlb {
            iova: 1,
            size: 2,
            uaddr: 3,
            perm: IotlbPerm::Read,
            kind: IotlbType::Miss,
        });
    }

    #[test]
    fn is_32_bytes_like_the_kernel_struct() {
        assert_eq!(Iotlb::SIZE, 32);
        assert!(matches!(
            Iotlb::decode_body(REQ, &bytes(0, 0, 0, 0, 1)[..26]),
            Err(WireError::WrongSize { .. })
        ));
    }

    #[test]
    fn unknown_perm_and_type_are_refused() {
        assert!(matches!(
            Iotlb::decode_body(REQ, &bytes(0, 0, 0, 4, 1)),
            Err(WireError::InvalidValue { value: 4, .. })
        ));
        for kind in [0u8, 5] {
            assert!(matches!(
                Iotlb::decode_body(REQ, &bytes(0, 0, 0, 0, kind)),
                Err(WireError::InvalidValue { .. })
            ));
        }
    }

    /// QEMU sends invalidations with `perm` and `uaddr` uninitialised (seen: 0x06 and 0xb2):
    /// they are ignored, only the IOVA range counts.
    #[test]
    fn an_invalidation_ignores_its_uninitialised_perm_and_user_address() {
        for perm in [0x06, 0xb2, 3] {
            assert_eq!(
                Iotlb::decode_body(REQ, &bytes(0x1000, 0x2000, u64::MAX, perm, 3)),
                Ok(Iotlb {
                    iova: 0x1000,
                    size: 0x2000,
                    uaddr: 0,
                    perm: IotlbPerm::None,
                    kind: IotlbType::Invalidate,
                })
            );
        }
        // A range to the end of the address space, as QEMU's intel-iommu sends it.
        let to_the_end = Iotlb::decode_body(
            REQ,
            &bytes(0xfef0_0000, 0u64.wrapping_sub(0xfef0_0000), 0, 0, 3),
        );
        assert_eq!(to_the_end.map(|m| m.size), Ok(0xffff_ffff_0110_0000));
        // Its IOVA range is still checked.
        assert!(matches!(
            Iotlb::decode_body(REQ, &bytes(u64::MAX, 2, 0, 0, 3)),
            Err(WireError::Overflow { .. })
        ));
        // An update's permissions are not ignored.
        assert!(matches!(
            Iotlb::decode_body(REQ, &bytes(0, 1, 0, 0x06, 2)),
            Err(WireError::InvalidValue { value: 6, .. })
        ));
    }

    #[test]
    fn overflowing_range_is_refused() {
        assert!(matches!(
            Iotlb::decode_body(REQ, &bytes(u64::MAX, 1, 0, 1, 2)),
            Err(WireError::Overflow { .. })
        ));
    }
}
