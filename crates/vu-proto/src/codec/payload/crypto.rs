//! The crypto session payload of `CREATE_CRYPTO_SESSION`, kept opaque.

use super::Payload;
use crate::header::MAX_PAYLOAD_SIZE;
use crate::wire::{Reader, WireError};

/// The spec's "crypto session description", as raw bytes.
///
/// The spec does not lay this payload out; QEMU's `VhostUserCryptoSession` changed
/// shape between releases (symmetric-only, then an operation code with symmetric and
/// asymmetric variants), so the codec passes it through for the crypto device to
/// interpret. It must not be empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CryptoSession(pub Vec<u8>);

impl Payload for CryptoSession {
    const MIN_SIZE: usize = 1;
    // MAX_PAYLOAD_SIZE is a small u32 constant.
    const MAX_SIZE: usize = MAX_PAYLOAD_SIZE as usize;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(CryptoSession(r.rest().to_vec()))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::request::RequestCode;

    #[test]
    fn passes_bytes_through() {
        assert_round_trip(&CryptoSession(vec![1, 2, 3]));
    }

    #[test]
    fn empty_is_refused() {
        assert!(matches!(
            CryptoSession::decode_body(RequestCode(26), &[]),
            Err(WireError::WrongSize { .. })
        ));
    }
}
