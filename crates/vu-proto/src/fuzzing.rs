//! Fuzz target bodies for the codec, shared by the cargo-fuzz harness (`tests/fuzz`) and the
//! stable replay of its committed corpus (`tests/tests/fuzz_corpus.rs`).
//!
//! Not part of the API: hidden from the documentation and free to change. Each body takes the
//! fuzzer's bytes, must never panic on any input, and panics only when a property the codec
//! promises is broken (invariant 1 of docs/ARCHITECTURE.md: no input makes the codec panic,
//! and what it decodes it encodes back to an equivalent message).
//!
//! # Input format of [`decode`](crate::fuzzing::decode)
//!
//! ```text
//! byte 0        fd count (low nibble, 0..=15: more than MAX_FDS is allowed on purpose)
//!               and direction (bit 4: 0 = front-end request, 1 = back-end request)
//! bytes 1..13   the 12-byte header, as on the wire
//! bytes 13..    the body; the header's size field is replaced by the body's length so that
//!               the bytes always reach the payload parsers (the socket layer guarantees
//!               that equality for received messages)
//! ```

use std::fs::File;
use std::os::fd::OwnedFd;

use crate::header::{Header, HeaderFlags, MAX_PAYLOAD_SIZE};
use crate::message::{BackendRequest, FrontendRequest, RawMessage};

/// Where the header starts in a [`decode`] input.
const HEADER_AT: usize = 1;
/// Where the body starts in a [`decode`] input.
const BODY_AT: usize = HEADER_AT + Header::SIZE;
/// Bit of byte 0 that selects back-end requests.
const BACKEND_BIT: u8 = 0x10;

/// Opens `n` fds to stand for the ones a peer passes. `/dev/null` is enough: the codec only
/// counts and keeps fds, it never looks at what they are.
fn fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .filter_map(|_| File::open("/dev/null").ok().map(OwnedFd::from))
        .collect()
}

/// Builds the [`RawMessage`] an input describes, or `None` if its header does not parse.
fn raw_message(data: &[u8]) -> Option<(bool, RawMessage)> {
    let control = *data.first()?;
    let header_bytes: [u8; Header::SIZE] = data.get(HEADER_AT..BODY_AT)?.try_into().ok()?;
    let body = data.get(BODY_AT..).unwrap_or_default();
    let body = &body[..body.len().min(MAX_PAYLOAD_SIZE as usize)];
    // Parse first so that version, reserved bits and size bound are still exercised.
    let parsed = Header::read(&header_bytes).ok()?;
    let size = u32::try_from(body.len()).ok()?;
    let header = Header { size, ..parsed };
    let msg = RawMessage {
        header,
        body: body.to_vec(),
        fds: fds(usize::from(control & 0x0f)),
    };
    Some((control & BACKEND_BIT != 0, msg))
}

/// The flags a request is re-encoded with: those of the header, minus what `encode` adds.
fn flags_of(header: &Header) -> HeaderFlags {
    header.flags - HeaderFlags::VERSION_1
}

/// Re-frames an encoded request as a received message, with copies of its fds.
fn reframe(header: Header, body: Vec<u8>, borrowed: &[std::os::fd::BorrowedFd<'_>]) -> RawMessage {
    let fds = borrowed
        .iter()
        .map(|fd| fd.try_clone_to_owned())
        .collect::<Result<Vec<_>, _>>()
        .expect("duplicating an fd of a decoded message");
    RawMessage { header, body, fds }
}

/// What [`decode_outcome`] did with its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Too short to frame a message.
    Unframed,
    /// Framed, and refused by the decoder (the common case for random bytes).
    Refused,
    /// Decoded, re-encoded, decoded again and re-encoded to the same bytes.
    RoundTripped,
}

/// Decodes one message; if it decodes, encodes it, decodes that and encodes again, and
/// checks that the two encodings agree (decode ∘ encode is the identity on what decode
/// accepts). See the module documentation for the input format.
pub fn decode(data: &[u8]) {
    decode_outcome(data);
}

/// [`decode`], saying how far the input got, so that a test can require a round trip
/// rather than pass when the decoder refused the message.
pub fn decode_outcome(data: &[u8]) -> Outcome {
    let Some((backend, msg)) = raw_message(data) else {
        return Outcome::Unframed;
    };
    let flags = flags_of(&msg.header);
    if backend {
        let Ok(req) = BackendRequest::decode(msg) else {
            return Outcome::Refused;
        };
        let (h1, b1) = req.encode(flags);
        let again = BackendRequest::decode(reframe(h1, b1.clone(), &req.fds()))
            .expect("a re-encoded back-end request decodes");
        let (h2, b2) = again.encode(flags);
        assert_eq!((h1, &b1), (h2, &b2), "back-end request round trip");
    } else {
        let Ok(req) = FrontendRequest::decode(msg) else {
            return Outcome::Refused;
        };
        let (h1, b1) = req.encode(flags);
        let again = FrontendRequest::decode(reframe(h1, b1.clone(), &req.fds()))
            .expect("a re-encoded front-end request decodes");
        let (h2, b2) = again.encode(flags);
        assert_eq!((h1, &b1), (h2, &b2), "front-end request round trip");
    }
    Outcome::RoundTripped
}

/// Builds a [`decode`] input from a message as a peer would send it.
pub fn decode_input(backend: bool, header: &Header, body: &[u8], nfds: u8) -> Vec<u8> {
    let mut out = vec![(nfds & 0x0f) | if backend { BACKEND_BIT } else { 0 }];
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::VringState;
    use crate::request::FrontendReq;

    #[test]
    fn decode_survives_empty_and_short_inputs() {
        for len in 0..BODY_AT {
            assert_eq!(decode_outcome(&vec![0xff; len]), Outcome::Unframed);
        }
    }

    #[test]
    fn decode_round_trips_a_valid_request() {
        let req = FrontendRequest::<OwnedFd>::SetVringNum(VringState { index: 1, num: 64 });
        let (header, body) = req.encode(HeaderFlags::NEED_REPLY);
        assert_eq!(
            decode_outcome(&decode_input(false, &header, &body, 0)),
            Outcome::RoundTripped
        );
        // The same bytes one short are refused, so the assertion above is not vacuous.
        let short = decode_input(false, &header, &body[..body.len() - 1], 0);
        assert_eq!(decode_outcome(&short), Outcome::Refused);
    }

    #[test]
    fn decode_survives_too_many_fds() {
        let header = Header::new(FrontendReq::SetVringKick, HeaderFlags::empty(), 8);
        let outcome = decode_outcome(&decode_input(false, &header, &[0; 8], 15));
        assert_eq!(outcome, Outcome::Refused);
    }
}
