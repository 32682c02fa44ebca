//! Vring payloads: state (index and number), addresses, the fd index of
//! `SET_VRING_KICK`/`CALL`/`ERR`, and the host notifier area.

use bitflags::bitflags;

use super::{checked_end, fixed_payload, Payload};
use crate::wire::{Reader, WireError};

/// The spec's "vring state description": a 32-bit vring index and a 32-bit number.
///
/// The number's meaning depends on the request: the queue size for `SET_VRING_NUM`,
/// the descriptor index or indices for `SET_VRING_BASE` and the reply to
/// `GET_VRING_BASE`, reserved ("currently reserved and must be set to 0") for
/// `GET_VRING_BASE`, `VRING_KICK`, `BACKEND_VRING_CALL` and `BACKEND_VRING_ERR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct VringState {
    /// The vring index.
    pub index: u32,
    /// The request-specific number.
    pub num: u32,
}

impl VringState {
    /// Two `u32`.
    pub const SIZE: usize = 8;

    /// Reads index then number.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(VringState {
            index: r.u32()?,
            num: r.u32()?,
        })
    }

    /// Appends index then number.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_ne_bytes());
        out.extend_from_slice(&self.num.to_ne_bytes());
    }
}
fixed_payload!(VringState);

/// Reads a vring state whose number must be 0 or 1, as a boolean.
fn read_bool_state(r: &mut Reader<'_>, field: &'static str) -> Result<(u32, bool), WireError> {
    let state = VringState::read(r)?;
    match state.num {
        0 => Ok((state.index, false)),
        1 => Ok((state.index, true)),
        other => Err(WireError::InvalidValue {
            field,
            value: u64::from(other),
        }),
    }
}

/// The payload of `SET_VRING_ENABLE`: a vring state whose number is 1 to enable the
/// vring and 0 to disable it; any other number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VringEnable {
    /// The vring index.
    pub index: u32,
    /// Whether the vring is to be enabled.
    pub enable: bool,
}

impl VringEnable {
    /// Same as [`VringState::SIZE`].
    pub const SIZE: usize = VringState::SIZE;

    /// Reads the vring state and checks the number is 0 or 1.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (index, enable) = read_bool_state(r, "vring enable")?;
        Ok(VringEnable { index, enable })
    }

    /// Appends the vring state.
    pub fn encode(&self, out: &mut Vec<u8>) {
        VringState {
            index: self.index,
            num: u32::from(self.enable),
        }
        .encode(out)
    }
}
fixed_payload!(VringEnable);

/// The payload of `SET_VRING_ENDIAN`.
///
/// The spec: "Little-endian is indicated with state.num set to 0 and big-endian is
/// indicated with state.num set to 1. Other values are invalid."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VringEndian {
    /// The vring index.
    pub index: u32,
    /// Whether the legacy vring is big-endian.
    pub big_endian: bool,
}

impl VringEndian {
    /// Same as [`VringState::SIZE`].
    pub const SIZE: usize = VringState::SIZE;

    /// Reads the vring state and checks the number is 0 or 1.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (index, big_endian) = read_bool_state(r, "vring endianness")?;
        Ok(VringEndian { index, big_endian })
    }

    /// Appends the vring state.
    pub fn encode(&self, out: &mut Vec<u8>) {
        VringState {
            index: self.index,
            num: u32::from(self.big_endian),
        }
        .encode(out)
    }
}
fixed_payload!(VringEndian);

bitflags! {
    /// The flags of a vring address description.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct VringAddrFlags: u32 {
        /// `VHOST_VRING_F_LOG` (bit 0): "Modifications to "used" vring should be marked
        /// if `VHOST_VRING_F_LOG` is part of ring's flags."
        const LOG = 1 << 0;
    }
}

/// Required alignment of the descriptor table (16 for split and packed rings).
const DESC_ALIGN: u64 = 16;
/// Required alignment of the used ring (4) or the device event suppression area (4).
const USED_ALIGN: u64 = 4;
/// Required alignment of the available ring (2) or the driver event suppression area
/// (4, so 2 is the bound that holds for both layouts).
const AVAIL_ALIGN: u64 = 2;

/// The spec's "vring address description", the payload of `SET_VRING_ADDR`.
///
/// "Note that a ring address is an IOVA if `VIRTIO_F_IOMMU_PLATFORM` has been
/// negotiated. Otherwise it is a user address." The parser refuses unknown flag bits
/// and ring addresses that break the virtio alignment rules (descriptor table 16,
/// used ring 4, available ring 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VringAddr {
    /// The vring index.
    pub index: u32,
    /// The vring flags.
    pub flags: VringAddrFlags,
    /// Address of the descriptor table.
    pub descriptor: u64,
    /// Address of the used ring.
    pub used: u64,
    /// Address of the available ring.
    pub available: u64,
    /// Guest address used for logging writes to the used ring.
    pub log: u64,
}

impl VringAddr {
    /// Two `u32` and four `u64`.
    pub const SIZE: usize = 40;

    /// Reads the description and checks flags and alignment.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let index = r.u32()?;
        let raw_flags = r.u32()?;
        let flags = VringAddrFlags::from_bits(raw_flags).ok_or(WireError::InvalidValue {
            field: "vring address flags",
            value: u64::from(raw_flags),
        })?;
        let descriptor = r.u64()?;
        let used = r.u64()?;
        let available = r.u64()?;
        let log = r.u64()?;
        for (field, addr, align) in [
            ("vring descriptor address", descriptor, DESC_ALIGN),
            ("vring used address", used, USED_ALIGN),
            ("vring available address", available, AVAIL_ALIGN),
        ] {
            if addr % align != 0 {
                return Err(WireError::InvalidValue { field, value: addr });
            }
        }
        Ok(VringAddr {
            index,
            flags,
            descriptor,
            used,
            available,
            log,
        })
    }

    /// Appends the description.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_ne_bytes());
        out.extend_from_slice(&self.flags.bits().to_ne_bytes());
        for addr in [self.descriptor, self.used, self.available, self.log] {
            out.extend_from_slice(&addr.to_ne_bytes());
        }
    }
}
fixed_payload!(VringAddr);

/// Bits 0-7 of a vring fd index: the vring index.
const FD_INDEX_MASK: u64 = 0xff;
/// Bit 8 of a vring fd index: the invalid-fd flag.
const NO_FD_BIT: u64 = 1 << 8;

/// The `u64` payload of `SET_VRING_KICK`, `SET_VRING_CALL` and `SET_VRING_ERR`, also the
/// first field of a vring area description.
///
/// The spec: "Bits (0-7) of the payload contain the vring index. Bit 8 is the invalid
/// FD flag. This flag is set when there is no file descriptor in the ancillary data."
/// Any other bit is refused, and [`Payload::expected_fds`] makes the fd count agree with
/// the flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VringFdIndex {
    /// The vring index.
    pub index: u8,
    /// The invalid-fd flag: no fd accompanies the message.
    pub no_fd: bool,
}

impl VringFdIndex {
    /// One `u64`.
    pub const SIZE: usize = 8;

    /// Reads the word and refuses bits other than the index and the no-fd flag.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Self::from_u64(r.u64()?)
    }

    /// Parses the word.
    pub fn from_u64(word: u64) -> Result<Self, WireError> {
        if word & !(FD_INDEX_MASK | NO_FD_BIT) != 0 {
            return Err(WireError::InvalidValue {
                field: "vring fd index",
                value: word,
            });
        }
        Ok(VringFdIndex {
            // The mask keeps the value below 256.
            index: (word & FD_INDEX_MASK) as u8,
            no_fd: word & NO_FD_BIT != 0,
        })
    }

    /// The wire word.
    pub fn to_u64(self) -> u64 {
        let flag = if self.no_fd { NO_FD_BIT } else { 0 };
        u64::from(self.index) | flag
    }

    /// Appends the word.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_u64().to_ne_bytes());
    }
}

impl Payload for VringFdIndex {
    const MIN_SIZE: usize = Self::SIZE;
    const MAX_SIZE: usize = Self::SIZE;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        VringFdIndex::read(r)
    }
    fn encode(&self, out: &mut Vec<u8>) {
        VringFdIndex::encode(self, out)
    }
    fn expected_fds(&self) -> Option<usize> {
        Some(usize::from(!self.no_fd))
    }
}

/// The spec's "vring area description", the payload of
/// `BACKEND_VRING_HOST_NOTIFIER_MSG`.
///
/// "The queue index is contained in the `u64` field of the vring area description",
/// with the same invalid-fd flag as [`VringFdIndex`]; without an fd the notifier is
/// removed. With an fd, the area (`offset`, `size`) must be non-empty and must not
/// overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VringArea {
    /// The vring index and whether an fd accompanies the message.
    pub index: VringFdIndex,
    /// The size of the area to map.
    pub size: u64,
    /// The offset of the area in the fd.
    pub offset: u64,
}

impl VringArea {
    /// Three `u64`.
    pub const SIZE: usize = 24;

    /// Reads the description and checks the area.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let index = VringFdIndex::read(r)?;
        let size = r.u64()?;
        let offset = r.u64()?;
        if !index.no_fd {
            if size == 0 {
                return Err(WireError::ZeroSize {
                    field: "vring area size",
                });
            }
            checked_end("vring area", offset, size)?;
        }
        Ok(VringArea {
            index,
            size,
            offset,
        })
    }

    /// Appends the description.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.index.encode(out);
        out.extend_from_slice(&self.size.to_ne_bytes());
        out.extend_from_slice(&self.offset.to_ne_bytes());
    }
}

impl Payload for VringArea {
    const MIN_SIZE: usize = Self::SIZE;
    const MAX_SIZE: usize = Self::SIZE;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        VringArea::read(r)
    }
    fn encode(&self, out: &mut Vec<u8>) {
        VringArea::encode(self, out)
    }
    fn expected_fds(&self) -> Option<usize> {
        self.index.expected_fds()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::request::RequestCode;

    const REQ: RequestCode = RequestCode(9);

    fn words32(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn addr_bytes(index: u32, flags: u32, addrs: [u64; 4]) -> Vec<u8> {
        let mut b = words32(&[index, flags]);
        for a in addrs {
            b.extend_from_slice(&a.to_ne_bytes());
        }
        b
    }

    #[test]
    fn vring_state_decodes_known_bytes() {
        assert_eq!(
            VringState::decode_body(REQ, &words32(&[3, 256])),
            Ok(VringState { index: 3, num: 256 })
        );
    }

    #[test]
    fn vring_state_round_trips() {
        assert_round_trip(&VringState { index: 1, num: 2 });
    }

    #[test]
    fn vring_state_wrong_size_is_refused() {
        assert!(matches!(
            VringState::decode_body(REQ, &[0; 12]),
            Err(WireError::WrongSize { actual: 12, .. })
        ));
    }

    #[test]
    fn vring_enable_accepts_0_and_1_only() {
        assert_eq!(
            VringEnable::decode_body(REQ, &words32(&[2, 1])),
            Ok(VringEnable {
                index: 2,
                enable: true
            })
        );
        assert_round_trip(&VringEnable {
            index: 0,
            enable: false,
        });
        assert!(matches!(
            VringEnable::decode_body(REQ, &words32(&[2, 2])),
            Err(WireError::InvalidValue { value: 2, .. })
        ));
    }

    #[test]
    fn vring_endian_other_values_are_invalid() {
        assert_round_trip(&VringEndian {
            index: 1,
            big_endian: true,
        });
        assert!(matches!(
            VringEndian::decode_body(REQ, &words32(&[0, 7])),
            Err(WireError::InvalidValue { value: 7, .. })
        ));
    }

    #[test]
    fn vring_addr_decodes_known_bytes() {
        let b = addr_bytes(1, 1, [0x1000, 0x2000, 0x3000, 0x4000]);
        assert_eq!(
            VringAddr::decode_body(REQ, &b),
            Ok(VringAddr {
                index: 1,
                flags: VringAddrFlags::LOG,
                descriptor: 0x1000,
                used: 0x2000,
                available: 0x3000,
                log: 0x4000,
            })
        );
    }

    #[test]
    fn vring_addr_round_trips() {
        assert_round_trip(&VringAddr {
            index: 7,
            flags: VringAddrFlags::empty(),
            descriptor: 0x10,
            used: 0x4,
            available: 0x2,
            log: 0x1,
        });
    }

    #[test]
    fn vring_addr_unknown_flag_is_refused() {
        let b = addr_bytes(1, 2, [0; 4]);
        assert!(matches!(
            VringAddr::decode_body(REQ, &b),
            Err(WireError::InvalidValue { value: 2, .. })
        ));
    }

    #[test]
    fn vring_addr_misaligned_rings_are_refused() {
        for addrs in [[0x8, 0, 0, 0], [0, 0x2, 0, 0], [0, 0, 0x1, 0]] {
            let b = addr_bytes(0, 0, addrs);
            assert!(matches!(
                VringAddr::decode_body(REQ, &b),
                Err(WireError::InvalidValue { .. })
            ));
        }
    }

    #[test]
    fn fd_index_decodes_index_and_no_fd_bit() {
        let idx = VringFdIndex::decode_body(REQ, &0x105u64.to_ne_bytes()).unwrap();
        assert_eq!(
            idx,
            VringFdIndex {
                index: 5,
                no_fd: true
            }
        );
        assert_eq!(idx.expected_fds(), Some(0));
        let idx = VringFdIndex::decode_body(REQ, &3u64.to_ne_bytes()).unwrap();
        assert_eq!(idx.expected_fds(), Some(1));
    }

    #[test]
    fn fd_index_other_bits_are_invalid() {
        for word in [1u64 << 9, 1 << 63, 0x2ff] {
            assert_eq!(
                VringFdIndex::decode_body(REQ, &word.to_ne_bytes()),
                Err(WireError::InvalidValue {
                    field: "vring fd index",
                    value: word
                })
            );
        }
    }

    #[test]
    fn fd_index_round_trips() {
        assert_round_trip(&VringFdIndex {
            index: 255,
            no_fd: false,
        });
        assert_round_trip(&VringFdIndex {
            index: 0,
            no_fd: true,
        });
    }

    #[test]
    fn vring_area_round_trips() {
        assert_round_trip(&VringArea {
            index: VringFdIndex {
                index: 2,
                no_fd: false,
            },
            size: 0x1000,
            offset: 0x2000,
        });
    }

    #[test]
    fn vring_area_overflow_and_zero_size_are_refused() {
        let mut b = 1u64.to_ne_bytes().to_vec();
        b.extend_from_slice(&2u64.to_ne_bytes());
        b.extend_from_slice(&u64::MAX.to_ne_bytes());
        assert!(matches!(
            VringArea::decode_body(REQ, &b),
            Err(WireError::Overflow { .. })
        ));
        let mut b = 1u64.to_ne_bytes().to_vec();
        b.extend_from_slice(&[0; 16]);
        assert!(matches!(
            VringArea::decode_body(REQ, &b),
            Err(WireError::ZeroSize { .. })
        ));
    }

    #[test]
    fn vring_area_without_fd_ignores_the_area() {
        let mut b = 0x100u64.to_ne_bytes().to_vec();
        b.extend_from_slice(&[0; 16]);
        let area = VringArea::decode_body(REQ, &b).unwrap();
        assert_eq!(area.expected_fds(), Some(0));
    }
}
