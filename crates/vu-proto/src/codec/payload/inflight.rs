//! The inflight description of `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD`.

use super::{checked_end, fixed_payload};
use crate::wire::{Reader, WireError};

/// The largest virtqueue size virtio allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Padding after `queue_size`: QEMU's `VhostUserInflight` is not packed, so its size
/// is rounded up to its 8-byte alignment.
const TAIL_PADDING: usize = 4;

/// The spec's "inflight description": mmap size, mmap offset, number of queues and
/// queue size.
///
/// The parser requires at least one queue, a queue size in 1..=[`MAX_QUEUE_SIZE`], and
/// an offset plus size that does not overflow. The mmap fields are zero in the
/// `GET_INFLIGHT_FD` request and describe the buffer in its reply and in
/// `SET_INFLIGHT_FD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Inflight {
    /// "a 64-bit size of area to track inflight I/O".
    pub mmap_size: u64,
    /// "a 64-bit offset of this area from the start of the supplied file descriptor".
    pub mmap_offset: u64,
    /// "a 16-bit number of virtqueues".
    pub num_queues: u16,
    /// "a 16-bit size of virtqueues".
    pub queue_size: u16,
}

impl Inflight {
    /// Two `u64`, two `u16` and the padding.
    pub const SIZE: usize = 16 + 4 + TAIL_PADDING;

    /// Reads and checks the description.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let mmap_size = r.u64()?;
        let mmap_offset = r.u64()?;
        let num_queues = r.u16()?;
        let queue_size = r.u16()?;
        r.skip(TAIL_PADDING)?;
        if num_queues == 0 {
            return Err(WireError::ZeroSize {
                field: "inflight num_queues",
            });
        }
        if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
            return Err(WireError::OutOfRange {
                field: "inflight queue_size",
                value: u64::from(queue_size),
                min: 1,
                max: u64::from(MAX_QUEUE_SIZE),
            });
        }
        checked_end("inflight area", mmap_offset, mmap_size)?;
        Ok(Inflight {
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        })
    }

    /// Appends the description with zero padding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.mmap_size.to_ne_bytes());
        out.extend_from_slice(&self.mmap_offset.to_ne_bytes());
        out.extend_from_slice(&self.num_queues.to_ne_bytes());
        out.extend_from_slice(&self.queue_size.to_ne_bytes());
        out.extend_from_slice(&[0; TAIL_PADDING]);
    }
}
fixed_payload!(Inflight);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::payload::Payload;
    use crate::request::RequestCode;

    const REQ: RequestCode = RequestCode(31);

    fn bytes(size: u64, offset: u64, nq: u16, qs: u16) -> Vec<u8> {
        let mut b = size.to_ne_bytes().to_vec();
        b.extend_from_slice(&offset.to_ne_bytes());
        b.extend_from_slice(&nq.to_ne_bytes());
        b.extend_from_slice(&qs.to_ne_bytes());
        b.extend_from_slice(&[0; 4]);
        b
    }

    #[test]
    fn decodes_known_bytes() {
        assert_eq!(
            Inflight::decode_body(REQ, &bytes(0x1000, 0, 2, 256)),
            Ok(Inflight {
                mmap_size: 0x1000,
                mmap_offset: 0,
                num_queues: 2,
                queue_size: 256
            })
        );
    }

    #[test]
    fn round_trips() {
        assert_round_trip(&Inflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 1024,
        });
    }

    #[test]
    fn is_24_bytes_like_qemus_struct() {
        assert!(matches!(
            Inflight::decode_body(REQ, &bytes(0, 0, 1, 1)[..20]),
            Err(WireError::WrongSize { min: 24, .. })
        ));
    }

    #[test]
    fn out_of_range_queues_are_refused() {
        assert!(Inflight::decode_body(REQ, &bytes(0, 0, 0, 8)).is_err());
        assert!(Inflight::decode_body(REQ, &bytes(0, 0, 1, 0)).is_err());
        assert!(Inflight::decode_body(REQ, &bytes(0, 0, 1, 32769)).is_err());
        assert!(matches!(
            Inflight::decode_body(REQ, &bytes(2, u64::MAX, 1, 8)),
            Err(WireError::Overflow { .. })
        ));
    }
}
