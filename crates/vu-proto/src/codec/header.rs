//! The 12-byte header that starts every vhost-user message.
//!
//! The spec: "A vhost-user message consists of 3 header fields and a payload", the
//! fields being a 32-bit request code, 32-bit flags and a 32-bit payload size, "in the
//! machine native byte order".

use bitflags::bitflags;

use crate::request::RequestCode;
use crate::wire::{Reader, WireError};

bitflags! {
    /// The flags word of a header.
    ///
    /// The spec: "Lower 2 bits are the version (currently 0x01). Bit 2 is the reply flag
    /// [...] Bit 3 is the need_reply flag". Every other bit is reserved and refused by
    /// [`Header::read`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HeaderFlags: u32 {
        /// Protocol version 1, the only version; [`Header::new`] always sets it.
        const VERSION_1 = 0x1;
        /// The message is a reply.
        const REPLY = 0x4;
        /// The sender asks for a reply (only meaningful once `REPLY_ACK` is negotiated).
        const NEED_REPLY = 0x8;
    }
}

/// The bits of the flags word holding the version number.
const VERSION_MASK: u32 = 0x3;
/// The only protocol version.
const VERSION: u32 = 0x1;
/// Every flag bit the spec defines: the version field, REPLY and NEED_REPLY.
const DEFINED_FLAGS: u32 =
    VERSION_MASK | HeaderFlags::REPLY.bits() | HeaderFlags::NEED_REPLY.bits();

/// The header's fields in wire order: request code (bytes 0-3), flags (4-7), payload
/// size (8-11), each a native-endian `u32`.
const FIELD_SIZE: usize = 4;

/// The largest payload any legal message carries, in bytes.
///
/// The largest fixed payloads are the reply to `GET_SHMEM_CONFIG` (two `u32` and 256
/// `u64` region sizes: 2056 bytes), a memory table of [`MAX_FDS`] regions (264 bytes, 328
/// with Xen fields) and the crypto session (under 1 KiB); the device config messages are
/// bounded by the largest config space (4 KiB) plus their 12-byte prefix, which
/// is the largest of all. A header announcing more is refused before its body is read.
pub const MAX_PAYLOAD_SIZE: u32 = 4096 + 12;

/// The most fds any one message may carry: a `SET_MEM_TABLE` with 8 regions.
///
/// The spec: "The number of regions is limited to 8" for the memory table message, and
/// no other message carries more than one fd. This sizes the `recvmsg` control buffer.
pub const MAX_FDS: usize = 8;

/// A parsed message header.
///
/// A `Header` returned by [`Header::read`] always holds version 1, no reserved flag bits
/// and a `size` no larger than [`MAX_PAYLOAD_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The request code; see [`crate::request::FrontendReq`] and
    /// [`crate::request::BackendReq`].
    pub request: RequestCode,
    /// The flags, including [`HeaderFlags::VERSION_1`].
    pub flags: HeaderFlags,
    /// The length of the payload that follows, in bytes.
    pub size: u32,
}

impl Header {
    /// The length of a header on the wire.
    pub const SIZE: usize = 12;

    /// Builds a header; [`HeaderFlags::VERSION_1`] is always set.
    pub fn new(request: impl Into<RequestCode>, flags: HeaderFlags, size: u32) -> Self {
        Header {
            request: request.into(),
            flags: flags | HeaderFlags::VERSION_1,
            size,
        }
    }

    /// Parses a header, checking the version, the reserved bits and the size bound.
    pub fn read(bytes: &[u8; Header::SIZE]) -> Result<Header, WireError> {
        // Reading twelve bytes from a twelve-byte array cannot run short; `?` keeps even
        // that impossible case a typed error rather than a panic.
        let mut r = Reader::new(bytes);
        let request = r.u32()?;
        let flags = r.u32()?;
        let size = r.u32()?;
        if flags & VERSION_MASK != VERSION {
            return Err(WireError::BadVersion { flags });
        }
        if flags & !DEFINED_FLAGS != 0 {
            return Err(WireError::ReservedFlags { flags });
        }
        if size > MAX_PAYLOAD_SIZE {
            return Err(WireError::PayloadTooLarge {
                size,
                max: MAX_PAYLOAD_SIZE,
            });
        }
        Ok(Header {
            request: RequestCode(request),
            flags: HeaderFlags::from_bits_retain(flags),
            size,
        })
    }

    /// The header's wire form.
    pub fn to_bytes(&self) -> [u8; Header::SIZE] {
        let mut out = [0u8; Header::SIZE];
        let fields = [self.request.0, self.flags.bits(), self.size];
        for (chunk, value) in out.chunks_exact_mut(FIELD_SIZE).zip(fields) {
            chunk.copy_from_slice(&value.to_ne_bytes());
        }
        out
    }

    /// Whether the REPLY flag is set.
    pub fn is_reply(&self) -> bool {
        self.flags.contains(HeaderFlags::REPLY)
    }

    /// Whether the NEED_REPLY flag is set.
    pub fn needs_reply(&self) -> bool {
        self.flags.contains(HeaderFlags::NEED_REPLY)
    }

    /// The header of the reply to this request: same request code, REPLY set, the
    /// given payload size.
    pub fn reply(&self, size: u32) -> Header {
        Header::new(self.request, HeaderFlags::REPLY, size)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::request::FrontendReq;

    fn raw(request: u32, flags: u32, size: u32) -> [u8; Header::SIZE] {
        let mut b = [0u8; Header::SIZE];
        b[0..4].copy_from_slice(&request.to_ne_bytes());
        b[4..8].copy_from_slice(&flags.to_ne_bytes());
        b[8..12].copy_from_slice(&size.to_ne_bytes());
        b
    }

    #[test]
    fn decodes_known_bytes() {
        let h = Header::read(&raw(1, 0x9, 8)).unwrap();
        assert_eq!(h.request, RequestCode(1));
        assert_eq!(h.flags, HeaderFlags::VERSION_1 | HeaderFlags::NEED_REPLY);
        assert_eq!(h.size, 8);
        assert!(h.needs_reply());
        assert!(!h.is_reply());
    }

    #[test]
    fn encodes_known_bytes() {
        let h = Header::new(FrontendReq::SetVringNum, HeaderFlags::REPLY, 8);
        assert_eq!(h.to_bytes(), raw(8, 0x5, 8));
    }

    #[test]
    fn new_always_sets_version_1() {
        let h = Header::new(FrontendReq::GetFeatures, HeaderFlags::empty(), 0);
        assert!(h.flags.contains(HeaderFlags::VERSION_1));
    }

    #[test]
    fn round_trips() {
        let h = Header::new(RequestCode(1234), HeaderFlags::NEED_REPLY, 17);
        assert_eq!(Header::read(&h.to_bytes()), Ok(h));
    }

    #[test]
    fn version_other_than_1_is_refused() {
        for flags in [0x0, 0x2, 0x3] {
            assert_eq!(
                Header::read(&raw(1, flags, 0)),
                Err(WireError::BadVersion { flags })
            );
        }
    }

    #[test]
    fn reserved_flag_bits_are_refused() {
        for bit in 4..32 {
            let flags = 1 | (1u32 << bit);
            assert_eq!(
                Header::read(&raw(1, flags, 0)),
                Err(WireError::ReservedFlags { flags })
            );
        }
    }

    #[test]
    fn oversized_payload_is_refused() {
        assert_eq!(
            Header::read(&raw(1, 1, MAX_PAYLOAD_SIZE + 1)),
            Err(WireError::PayloadTooLarge {
                size: MAX_PAYLOAD_SIZE + 1,
                max: MAX_PAYLOAD_SIZE
            })
        );
        assert!(Header::read(&raw(1, 1, MAX_PAYLOAD_SIZE)).is_ok());
    }

    #[test]
    fn reply_header_keeps_the_request_and_sets_reply() {
        let h = Header::new(FrontendReq::GetFeatures, HeaderFlags::NEED_REPLY, 0);
        let r = h.reply(8);
        assert!(r.is_reply());
        assert!(!r.needs_reply());
        assert_eq!(r.request, h.request);
        assert_eq!(r.size, 8);
    }
}
