//! The device config space payload of `GET_CONFIG` and `SET_CONFIG`.

use bitflags::bitflags;

use super::Payload;
use crate::wire::{Reader, WireError};

/// The largest config space access, in bytes.
///
/// The spec sets no bound; this is the reference implementation's, 4 KiB, far above any
/// virtio device's config space. Offset plus size must stay within it.
pub const MAX_CONFIG_SIZE: u32 = 0x1000;

/// Byte length of the offset, size and flags fields before the config bytes.
const CONFIG_PREFIX: usize = 12;

bitflags! {
    /// The flags word of a config space message.
    ///
    /// The spec: "0: Vhost front-end messages used for writable fields; 1: Vhost
    /// front-end messages used for live migration". rust-vmm vhost instead calls bit 0
    /// `WRITABLE` and bit 1 `LIVE_MIGRATION`; bit 1 is accepted so that its front-end
    /// interoperates. Other bits are refused.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ConfigFlags: u32 {
        /// Value 1 in the spec: the message is part of live migration, so read-only
        /// fields may be written ("back-ends MUST NOT accept SET_CONFIG for read-only
        /// configuration space fields unless the live migration bit is set").
        const LIVE_MIGRATION = 1 << 0;
        /// Bit 1, rust-vmm vhost's live migration flag.
        const LIVE_MIGRATION_RUST_VMM = 1 << 1;
    }
}

impl ConfigFlags {
    /// Whether the write is part of live migration, so read-only fields may be written:
    /// QEMU's value 1 or rust-vmm's bit 1. A rust-vmm front-end's ordinary write carries its
    /// `WRITABLE` flag, value 1, which QEMU's numbering (followed here) reads as live
    /// migration; a device that must protect read-only fields from such a front-end cannot
    /// tell the two apart.
    pub fn is_live_migration(self) -> bool {
        self.intersects(ConfigFlags::LIVE_MIGRATION | ConfigFlags::LIVE_MIGRATION_RUST_VMM)
    }
}

/// The spec's "virtio device config space": offset, size, flags and `size` bytes.
///
/// The parser refuses a zero size, a size or offset plus size beyond
/// [`MAX_CONFIG_SIZE`], unknown flags, and a body whose length is not 12 + size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceConfig {
    /// "a 32-bit offset of virtio device's configuration space".
    pub offset: u32,
    /// The message's flags.
    pub flags: ConfigFlags,
    /// The config bytes; their length is the spec's "size", 1..=[`MAX_CONFIG_SIZE`].
    pub data: Vec<u8>,
}

impl DeviceConfig {
    /// Reads and checks the payload.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let offset = r.u32()?;
        let size = r.u32()?;
        let raw_flags = r.u32()?;
        let flags = ConfigFlags::from_bits(raw_flags).ok_or(WireError::InvalidValue {
            field: "config flags",
            value: u64::from(raw_flags),
        })?;
        if size == 0 {
            return Err(WireError::ZeroSize {
                field: "config size",
            });
        }
        let end = offset.checked_add(size).ok_or(WireError::Overflow {
            field: "config offset",
            base: u64::from(offset),
            len: u64::from(size),
        })?;
        if end > MAX_CONFIG_SIZE {
            return Err(WireError::OutOfRange {
                field: "config offset + size",
                value: u64::from(end),
                min: 1,
                max: u64::from(MAX_CONFIG_SIZE),
            });
        }
        // size <= MAX_CONFIG_SIZE, so it fits in usize.
        let data = r.bytes(size as usize)?.to_vec();
        Ok(DeviceConfig {
            offset,
            flags,
            data,
        })
    }

    /// Appends offset, size, flags and the bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let size = u32::try_from(self.data.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&self.offset.to_ne_bytes());
        out.extend_from_slice(&size.to_ne_bytes());
        out.extend_from_slice(&self.flags.bits().to_ne_bytes());
        out.extend_from_slice(&self.data);
    }
}

impl Payload for DeviceConfig {
    const MIN_SIZE: usize = CONFIG_PREFIX + 1;
    const MAX_SIZE: usize = CONFIG_PREFIX + MAX_CONFIG_SIZE as usize;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        DeviceConfig::read(r)
    }
    fn encode(&self, out: &mut Vec<u8>) {
        DeviceConfig::encode(self, out)
    }
}

/// The reply to `GET_CONFIG`.
///
/// The spec: "vhost-user back-end uses zero length of payload to indicate an error to
/// the vhost-user front-end".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConfigReply {
    /// An empty payload: the back-end could not read the config space.
    Failed,
    /// The config space contents.
    Config(DeviceConfig),
}

impl Payload for ConfigReply {
    const MIN_SIZE: usize = 0;
    const MAX_SIZE: usize = DeviceConfig::MAX_SIZE;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        if r.remaining() == 0 {
            Ok(ConfigReply::Failed)
        } else {
            DeviceConfig::read(r).map(ConfigReply::Config)
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        if let ConfigReply::Config(config) = self {
            config.encode(out);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::request::RequestCode;

    const REQ: RequestCode = RequestCode(24);

    fn bytes(offset: u32, size: u32, flags: u32, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [offset, size, flags] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn decodes_known_bytes() {
        assert_eq!(
            DeviceConfig::decode_body(REQ, &bytes(4, 2, 1, &[9, 8])),
            Ok(DeviceConfig {
                offset: 4,
                flags: ConfigFlags::LIVE_MIGRATION,
                data: vec![9, 8],
            })
        );
    }

    #[test]
    fn live_migration_is_qemu_value_1_or_rust_vmm_bit_1() {
        assert!(!ConfigFlags::empty().is_live_migration());
        assert!(ConfigFlags::LIVE_MIGRATION.is_live_migration());
        assert!(ConfigFlags::LIVE_MIGRATION_RUST_VMM.is_live_migration());
    }

    #[test]
    fn round_trips() {
        assert_round_trip(&DeviceConfig {
            offset: 0,
            flags: ConfigFlags::empty(),
            data: vec![1; 60],
        });
    }

    #[test]
    fn size_must_match_the_body() {
        assert!(matches!(
            DeviceConfig::decode_body(REQ, &bytes(0, 3, 0, &[1, 2])),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            DeviceConfig::decode_body(REQ, &bytes(0, 1, 0, &[1, 2])),
            Err(WireError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn zero_size_and_out_of_bounds_are_refused() {
        assert!(matches!(
            DeviceConfig::decode_body(REQ, &bytes(0, 0, 0, &[0])),
            Err(WireError::ZeroSize { .. })
        ));
        assert!(matches!(
            DeviceConfig::decode_body(REQ, &bytes(MAX_CONFIG_SIZE, 1, 0, &[0])),
            Err(WireError::OutOfRange { .. })
        ));
        assert!(matches!(
            DeviceConfig::decode_body(REQ, &bytes(u32::MAX, 1, 0, &[0])),
            Err(WireError::Overflow { .. })
        ));
    }

    #[test]
    fn unknown_flags_are_refused() {
        assert!(matches!(
            DeviceConfig::decode_body(REQ, &bytes(0, 1, 4, &[0])),
            Err(WireError::InvalidValue { value: 4, .. })
        ));
    }

    #[test]
    fn empty_reply_means_failure() {
        assert_eq!(ConfigReply::decode_body(REQ, &[]), Ok(ConfigReply::Failed));
        assert_round_trip(&ConfigReply::Config(DeviceConfig {
            offset: 1,
            flags: ConfigFlags::empty(),
            data: vec![5],
        }));
    }
}
