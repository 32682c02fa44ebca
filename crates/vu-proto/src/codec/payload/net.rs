//! Net-specific payloads: the MAC address of `SEND_RARP`.

use super::fixed_payload;
use crate::wire::{Reader, WireError};

/// Bytes of the `u64` payload after the six MAC bytes.
const MAC_PADDING: usize = 2;

/// The payload of `SEND_RARP`: a `u64` of which "the first 6 bytes of the payload
/// contain the mac address of the guest"; the last two bytes are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The `u64` that carries the address.
    pub const SIZE: usize = 6 + MAC_PADDING;

    /// Reads the address and skips the rest of the `u64`.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let mac = r.array()?;
        r.skip(MAC_PADDING)?;
        Ok(MacAddr(mac))
    }

    /// Appends the address and two zero bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
        out.extend_from_slice(&[0; MAC_PADDING]);
    }
}
fixed_payload!(MacAddr);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::payload::Payload;
    use crate::request::RequestCode;

    #[test]
    fn decodes_known_bytes_and_round_trips() {
        let b = [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0xff, 0xff];
        let mac = MacAddr::decode_body(RequestCode(19), &b);
        assert_eq!(mac, Ok(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_round_trip(&MacAddr([1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn wrong_size_is_refused() {
        assert!(matches!(
            MacAddr::decode_body(RequestCode(19), &[0; 6]),
            Err(WireError::WrongSize { .. })
        ));
    }
}
