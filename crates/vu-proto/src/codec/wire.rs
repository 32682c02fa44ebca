//! The byte-level primitives of the codec: [`WireError`], the one error every parser
//! returns, and [`Reader`], a cursor over a message body that never panics.
//!
//! The spec says of every number on the wire that it is "in the machine native byte
//! order", so [`Reader`] and the `encode` methods of the payload types use native endian
//! throughout.

use crate::request::RequestCode;

/// Why a header, a body or a set of fds is not a well-formed vhost-user message.
///
/// Every variant carries the culprit: the offending value, the request it came with, or
/// the sizes that did not match.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum WireError {
    /// The version field (bits 0 and 1 of the header flags) is not 1.
    #[error("unsupported protocol version in header flags {flags:#x} (only version 1 exists)")]
    BadVersion {
        /// The flags word as received.
        flags: u32,
    },
    /// A reserved bit of the header flags is set.
    #[error("reserved bits set in header flags {flags:#x}")]
    ReservedFlags {
        /// The flags word as received.
        flags: u32,
    },
    /// The header announces a payload larger than any legal message.
    #[error("payload size {size} exceeds the largest legal payload ({max} bytes)")]
    PayloadTooLarge {
        /// The size announced by the header.
        size: u32,
        /// The largest legal payload, [`crate::header::MAX_PAYLOAD_SIZE`].
        max: u32,
    },
    /// The body's length is outside what this request allows.
    #[error("{request}: payload of {actual} bytes, expected {min}..={max}")]
    WrongSize {
        /// The request the body came with.
        request: RequestCode,
        /// The smallest legal body length.
        min: usize,
        /// The largest legal body length.
        max: usize,
        /// The body length received.
        actual: usize,
    },
    /// The body has bytes left over after its payload was parsed.
    #[error("{remaining} trailing bytes after the payload")]
    TrailingBytes {
        /// How many bytes were left unread.
        remaining: usize,
    },
    /// The body ended before the payload did.
    #[error("payload truncated: needed {needed} more bytes, {remaining} left")]
    Truncated {
        /// How many bytes the parser asked for.
        needed: usize,
        /// How many bytes were left.
        remaining: usize,
    },
    /// The message carries a number of fds this request does not allow.
    #[error("{request}: {actual} fds attached, expected {min}..={max}")]
    WrongFdCount {
        /// The request the fds came with.
        request: RequestCode,
        /// The fewest fds allowed.
        min: usize,
        /// The most fds allowed.
        max: usize,
        /// The number of fds received.
        actual: usize,
    },
    /// A memory table announces a region count outside `1..=max`.
    #[error("memory table with {count} regions, expected 1..={max}")]
    TooManyRegions {
        /// The region count announced.
        count: u32,
        /// The most regions one message may carry.
        max: u32,
    },
    /// A field holds a value the spec does not define or the codec cannot accept.
    #[error("invalid value {value:#x} for {field}")]
    InvalidValue {
        /// The field's name.
        field: &'static str,
        /// The value received.
        value: u64,
    },
    /// A size field that must be non-zero is zero.
    #[error("{field} must not be zero")]
    ZeroSize {
        /// The field's name.
        field: &'static str,
    },
    /// A base plus a length does not fit in the address space of the field.
    #[error("{field}: {base:#x} + {len:#x} overflows")]
    Overflow {
        /// The field's name.
        field: &'static str,
        /// The start address or offset.
        base: u64,
        /// The length added to it.
        len: u64,
    },
    /// A value lies outside the range the spec allows.
    #[error("{field} = {value} is outside {min}..={max}")]
    OutOfRange {
        /// The field's name.
        field: &'static str,
        /// The value received.
        value: u64,
        /// The smallest legal value.
        min: u64,
        /// The largest legal value.
        max: u64,
    },
    /// The peer acknowledged feature bits that were never offered.
    #[error("acknowledged features {extra:#x} were not offered")]
    UnofferedFeatures {
        /// The acknowledged bits that were not in the offer.
        extra: u64,
    },
    /// A message expected to be a reply lacks the REPLY flag.
    #[error("{request}: expected a reply, got a message without the REPLY flag")]
    NotAReply {
        /// The request code of the message received.
        request: RequestCode,
    },
    /// A reply answers a different request from the one sent.
    #[error("reply to {actual} while waiting for the reply to {expected}")]
    ReplyMismatch {
        /// The request whose reply was awaited.
        expected: RequestCode,
        /// The request code of the reply received.
        actual: RequestCode,
    },
}

/// A cursor over a message body that hands out native-endian numbers and byte runs.
///
/// Every method is bounds-checked and returns [`WireError::Truncated`] instead of
/// panicking; [`Reader::finish`] refuses a body with bytes left over.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading at the first byte of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// How many bytes are left to read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        match self.rest.split_at_checked(n) {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(head)
            }
            None => Err(WireError::Truncated {
                needed: n,
                remaining: self.rest.len(),
            }),
        }
    }

    /// Takes the next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    /// Skips `n` bytes of padding, whatever their value.
    pub fn skip(&mut self, n: usize) -> Result<(), WireError> {
        self.bytes(n).map(|_| ())
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(u8::from_ne_bytes(self.array()?))
    }

    /// Reads a native-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_ne_bytes(self.array()?))
    }

    /// Reads a native-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_ne_bytes(self.array()?))
    }

    /// Reads a native-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_ne_bytes(self.array()?))
    }

    /// Reads a native-endian `i64`.
    pub fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_ne_bytes(self.array()?))
    }

    /// Takes everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Ends the parse: fails with [`WireError::TrailingBytes`] if any byte is left.
    pub fn finish(self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                remaining: self.rest.len(),
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_native_endian_numbers_in_order() {
        let mut bytes = Vec::new();
        bytes.push(7u8);
        bytes.extend_from_slice(&0x1234u16.to_ne_bytes());
        bytes.extend_from_slice(&0xdead_beefu32.to_ne_bytes());
        bytes.extend_from_slice(&0x0102_0304_0506_0708u64.to_ne_bytes());
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(r.u32().unwrap(), 0xdead_beef);
        assert_eq!(r.u64().unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(r.remaining(), 0);
        r.finish().unwrap();
    }

    #[test]
    fn reader_short_read_is_truncated_not_a_panic() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(
            r.u32(),
            Err(WireError::Truncated {
                needed: 4,
                remaining: 3
            })
        );
        assert_eq!(r.remaining(), 3, "a failed read consumes nothing");
    }

    #[test]
    fn reader_huge_length_is_truncated() {
        let mut r = Reader::new(&[0; 4]);
        assert!(matches!(
            r.bytes(usize::MAX),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn finish_refuses_trailing_bytes() {
        let mut r = Reader::new(&[0; 5]);
        r.u32().unwrap();
        assert_eq!(r.finish(), Err(WireError::TrailingBytes { remaining: 1 }));
    }

    #[test]
    fn array_and_skip_advance_the_cursor() {
        let mut r = Reader::new(&[1, 2, 3, 4, 5]);
        r.skip(1).unwrap();
        assert_eq!(r.array::<3>().unwrap(), [2, 3, 4]);
        assert_eq!(r.rest(), &[5]);
        r.finish().unwrap();
    }
}
