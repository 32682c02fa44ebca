//! Whole messages: [`RawMessage`], what a socket receives, and the typed requests it
//! decodes into.

use std::os::fd::OwnedFd;

use crate::header::Header;

/// A message as received from a socket: a validated header, its body and the fds that
/// came with it. No field has been interpreted beyond the header.
#[derive(Debug)]
pub struct RawMessage {
    /// The header, already checked by [`Header::read`].
    pub header: Header,
    /// Exactly `header.size` bytes of payload.
    pub body: Vec<u8>,
    /// The fds received with the message, owned: dropping the message closes them.
    pub fds: Vec<OwnedFd>,
}
