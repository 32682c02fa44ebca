//! The shared object payload (`VhostUserShared`) of `GET_SHARED_OBJECT` and the
//! back-end's `SHARED_OBJECT_ADD`/`REMOVE`/`LOOKUP`.

use super::fixed_payload;
use crate::wire::{Reader, WireError};

/// The spec's `VhostUserShared`: "16 bytes UUID, whose first three components (a 32-bit
/// value, then two 16-bit values) are stored in big endian."
///
/// The bytes are kept as received, which is already the RFC 4122 byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedObject {
    /// The object's UUID in wire (big-endian) byte order.
    pub uuid: [u8; 16],
}

impl SharedObject {
    /// Sixteen bytes.
    pub const SIZE: usize = 16;

    /// Reads the UUID.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(SharedObject { uuid: r.array()? })
    }

    /// Appends the UUID.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.uuid);
    }
}
fixed_payload!(SharedObject);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::payload::Payload;
    use crate::request::RequestCode;

    #[test]
    fn decodes_known_bytes_and_round_trips() {
        let uuid: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            SharedObject::decode_body(RequestCode(41), &uuid),
            Ok(SharedObject { uuid })
        );
        assert_round_trip(&SharedObject { uuid });
    }

    #[test]
    fn wrong_size_is_refused() {
        assert!(matches!(
            SharedObject::decode_body(RequestCode(41), &[0; 15]),
            Err(WireError::WrongSize { .. })
        ));
    }
}
