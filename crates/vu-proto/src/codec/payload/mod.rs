//! Typed payloads, one module per message family.
//!
//! Every payload implements [`Payload`]: `read` parses it from a [`Reader`] and checks
//! sizes, ranges, alignment and overflow once, so code past the parser never sees an
//! unchecked value; `encode` appends its wire form to a buffer. [`Payload::decode_body`]
//! is the whole-body entry point: it checks the body length against the type's bounds,
//! parses, and refuses trailing bytes.
//!
//! All numbers are native endian, as the spec says: "All numbers are in the machine
//! native byte order."

use crate::request::RequestCode;
use crate::wire::{Reader, WireError};

pub mod config;
pub mod crypto;
pub mod inflight;
pub mod iotlb;
pub mod memory;
pub mod net;
pub mod shared;
pub mod shmem;
pub mod state;
pub mod vring;

pub use config::{ConfigFlags, ConfigReply, DeviceConfig, MAX_CONFIG_SIZE};
pub use crypto::CryptoSession;
pub use inflight::Inflight;
pub use iotlb::{Iotlb, IotlbPerm, IotlbType};
#[cfg(feature = "xen")]
pub use memory::XenMmapFlags;
pub use memory::{Log, MemoryRegion, MemoryTable, SingleMemoryRegion};
pub use net::MacAddr;
pub use shared::SharedObject;
pub use shmem::{ShmemConfig, ShmemMap, ShmemMapFlags, MAX_SHMEM_REGIONS};
pub use state::{DeviceStateFdReply, DeviceStateTransfer, TransferDirection, TransferPhase};
pub use vring::{
    VringAddr, VringAddrFlags, VringArea, VringEnable, VringEndian, VringFdIndex, VringState,
};

/// A message payload: parsed from and encoded to its wire form.
pub trait Payload: Sized {
    /// The shortest legal wire form, in bytes.
    const MIN_SIZE: usize;
    /// The longest legal wire form, in bytes.
    const MAX_SIZE: usize;

    /// Parses the payload, checking every field; leaves any bytes after it unread.
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError>;

    /// Appends the payload's wire form to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// How many fds must accompany this payload, when the payload itself says so (a
    /// memory table's region count, a vring fd index's no-fd bit); `None` when only the
    /// request's [`crate::request::FdRule`] applies.
    fn expected_fds(&self) -> Option<usize> {
        None
    }

    /// Parses a whole message body for `request`: checks its length against
    /// [`Payload::MIN_SIZE`]..=[`Payload::MAX_SIZE`], parses it and refuses trailing
    /// bytes.
    fn decode_body(request: RequestCode, body: &[u8]) -> Result<Self, WireError> {
        if !(Self::MIN_SIZE..=Self::MAX_SIZE).contains(&body.len()) {
            return Err(WireError::WrongSize {
                request,
                min: Self::MIN_SIZE,
                max: Self::MAX_SIZE,
                actual: body.len(),
            });
        }
        let mut r = Reader::new(body);
        let payload = Self::read(&mut r)?;
        r.finish()?;
        Ok(payload)
    }

    /// The payload's wire form as a new vector.
    fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::MIN_SIZE);
        self.encode(&mut out);
        out
    }
}

/// Implements [`Payload`] for a fixed-size type by delegating to its inherent `SIZE`,
/// `read` and `encode`.
macro_rules! fixed_payload {
    ($ty:ty) => {
        impl $crate::payload::Payload for $ty {
            const MIN_SIZE: usize = <$ty>::SIZE;
            const MAX_SIZE: usize = <$ty>::SIZE;
            fn read(r: &mut $crate::wire::Reader<'_>) -> Result<Self, $crate::wire::WireError> {
                <$ty>::read(r)
            }
            fn encode(&self, out: &mut Vec<u8>) {
                <$ty>::encode(self, out)
            }
        }
    };
}
pub(crate) use fixed_payload;

/// `base + len`, or [`WireError::Overflow`] naming `field`.
pub(crate) fn checked_end(field: &'static str, base: u64, len: u64) -> Result<u64, WireError> {
    base.checked_add(len)
        .ok_or(WireError::Overflow { field, base, len })
}

/// The empty payload of requests that carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Empty;

impl Empty {
    /// Zero bytes.
    pub const SIZE: usize = 0;

    /// Reads nothing.
    pub fn read(_r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Empty)
    }

    /// Appends nothing.
    pub fn encode(&self, _out: &mut Vec<u8>) {}
}
fixed_payload!(Empty);

/// A single 64-bit integer, the spec's "A single 64-bit integer" payload.
///
/// Used for counts (`GET_QUEUE_NUM`, `GET_MAX_MEM_SLOTS`), the device status, the MTU,
/// crypto session ids and the zero-or-non-zero status of REPLY_ACK replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct U64(pub u64);

impl U64 {
    /// Eight bytes.
    pub const SIZE: usize = 8;

    /// Reads the integer.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(U64(r.u64()?))
    }

    /// Appends the integer.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_ne_bytes());
    }

    /// The REPLY_ACK status for success: "The payload should be set to zero on success
    /// or non-zero on failure".
    pub const ACK_SUCCESS: U64 = U64(0);
}
fixed_payload!(U64);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// Encodes `p` after a non-empty prefix and checks the prefix is kept and the tail
    /// decodes back to `p`.
    pub(crate) fn assert_round_trip<T: Payload + PartialEq + std::fmt::Debug>(p: &T) {
        let prefix = [0xa5u8; 3];
        let mut out = prefix.to_vec();
        p.encode(&mut out);
        assert_eq!(&out[..3], &prefix, "encode appends");
        let body = &out[3..];
        assert!((T::MIN_SIZE..=T::MAX_SIZE).contains(&body.len()));
        assert_eq!(&T::decode_body(RequestCode(0), body).unwrap(), p);
    }

    #[test]
    fn u64_decodes_known_bytes() {
        let body = 0x1122_3344_5566_7788u64.to_ne_bytes();
        assert_eq!(
            U64::decode_body(RequestCode(1), &body),
            Ok(U64(0x1122_3344_5566_7788))
        );
    }

    #[test]
    fn u64_round_trips() {
        assert_round_trip(&U64(42));
    }

    #[test]
    fn u64_wrong_size_is_refused() {
        assert_eq!(
            U64::decode_body(RequestCode(2), &[0; 7]),
            Err(WireError::WrongSize {
                request: RequestCode(2),
                min: 8,
                max: 8,
                actual: 7
            })
        );
        assert!(U64::decode_body(RequestCode(2), &[0; 9]).is_err());
    }

    #[test]
    fn empty_refuses_any_byte() {
        assert!(Empty::decode_body(RequestCode(3), &[]).is_ok());
        assert!(matches!(
            Empty::decode_body(RequestCode(3), &[0]),
            Err(WireError::WrongSize { .. })
        ));
    }

    /// Feeds random bodies of every length up to the largest payload, and mutations of
    /// a valid body, to every payload parser: each returns `Ok` or `Err`, never panics.
    #[test]
    fn every_payload_survives_random_bodies() {
        fn hammer<T: Payload>(seed: &[u8], rng: &mut u64) -> usize {
            let mut next = || {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                *rng
            };
            let mut ok = 0;
            for _ in 0..300 {
                let mut body = seed.to_vec();
                let len = usize::try_from(next() % (T::MAX_SIZE as u64 + 9)).unwrap();
                if next() % 2 == 0 {
                    body.resize(len, 0);
                    for _ in 0..4 {
                        if let Some(b) = body.get_mut(usize::try_from(next() % 64).unwrap()) {
                            *b = next() as u8;
                        }
                    }
                } else {
                    body = (0..len.min(600)).map(|_| next() as u8).collect();
                }
                ok += usize::from(T::decode_body(RequestCode(0), &body).is_ok());
            }
            ok
        }
        let mut rng = 0x243f_6a88_85a3_08d3u64;
        let empty: &[u8] = &[];
        let mut ok = 0;
        ok += hammer::<Empty>(empty, &mut rng);
        ok += hammer::<U64>(&[0; 8], &mut rng);
        ok += hammer::<VringState>(&[0; 8], &mut rng);
        ok += hammer::<VringEnable>(&[0; 8], &mut rng);
        ok += hammer::<VringEndian>(&[0; 8], &mut rng);
        ok += hammer::<VringAddr>(&[0; 40], &mut rng);
        ok += hammer::<VringFdIndex>(&[0; 8], &mut rng);
        ok += hammer::<VringArea>(&[0; 24], &mut rng);
        ok += hammer::<MemoryRegion>(&[], &mut rng);
        ok += hammer::<MemoryTable>(&[], &mut rng);
        ok += hammer::<SingleMemoryRegion>(&[], &mut rng);
        ok += hammer::<Log>(&[], &mut rng);
        ok += hammer::<Iotlb>(&[], &mut rng);
        ok += hammer::<DeviceConfig>(&[], &mut rng);
        ok += hammer::<ConfigReply>(&[], &mut rng);
        ok += hammer::<CryptoSession>(&[], &mut rng);
        ok += hammer::<Inflight>(&[], &mut rng);
        ok += hammer::<SharedObject>(&[], &mut rng);
        ok += hammer::<DeviceStateTransfer>(&[], &mut rng);
        ok += hammer::<DeviceStateFdReply>(&[], &mut rng);
        ok += hammer::<ShmemConfig>(&[], &mut rng);
        ok += hammer::<ShmemMap>(&[], &mut rng);
        ok += hammer::<MacAddr>(&[], &mut rng);
        ok += hammer::<crate::features::VirtioFeatures>(&[], &mut rng);
        ok += hammer::<crate::features::ProtocolFeatures>(&[], &mut rng);
        assert!(ok > 0);
    }

    #[test]
    fn checked_end_reports_overflow() {
        assert_eq!(checked_end("x", 1, 2), Ok(3));
        assert_eq!(
            checked_end("x", u64::MAX, 1),
            Err(WireError::Overflow {
                field: "x",
                base: u64::MAX,
                len: 1
            })
        );
    }
}
