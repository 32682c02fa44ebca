//! The read-ahead buffer of an [`Endpoint`](super::Endpoint): bytes received from the
//! socket and not yet returned, with the fds that came with them (see the
//! [socket module docs](super#which-message-an-fd-belongs-to) for which message an fd
//! belongs to).

use std::os::fd::OwnedFd;

use super::SocketError;
use crate::header::{Header, MAX_FDS, MAX_PAYLOAD_SIZE};
use crate::wire::WireError;

/// Bytes of the read-ahead buffer: a header and the largest payload, so that one `recvmsg`
/// can take any whole message.
pub(super) const READ_AHEAD_LEN: usize = Header::SIZE + MAX_PAYLOAD_SIZE as usize;

/// Bytes received from the socket and not yet returned, with their fds.
#[derive(Default)]
pub(super) struct ReadAhead {
    /// [`READ_AHEAD_LEN`] bytes once the first message is read (empty before).
    pub(super) buf: Vec<u8>,
    /// The unread bytes are `buf[start..end]`; `start` is the first byte of a message.
    pub(super) start: usize,
    pub(super) end: usize,
    /// Fds received and not yet returned, each group with the buffer offset of the first
    /// byte of the message it belongs to; offsets increase.
    fds: Vec<(usize, Vec<OwnedFd>)>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("bytes", &self.held())
            .field("fds", &self.fds.iter().map(|(_, g)| g.len()).sum::<usize>())
            .finish()
    }
}

impl ReadAhead {
    /// How many unread bytes are buffered.
    pub(super) fn held(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Forgets every buffered byte and closes every buffered fd.
    pub(super) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.fds.clear();
    }

    /// Consumes `n` buffered bytes (at most what is held).
    pub(super) fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            // Every fd belongs to a buffered byte, so none is left either.
            self.start = 0;
            self.end = 0;
        }
    }

    /// Moves the unread bytes to the front of the buffer.
    pub(super) fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        for (owner, _) in &mut self.fds {
            *owner = owner.saturating_sub(self.start);
        }
        self.end -= self.start;
        self.start = 0;
    }

    /// The header of the message starting at buffer offset `at`, if its bytes are all
    /// buffered.
    pub(super) fn header_at(&self, at: usize) -> Option<Result<Header, WireError>> {
        let bytes = self.buf.get(at..at.checked_add(Header::SIZE)?)?;
        if at + Header::SIZE > self.end {
            return None;
        }
        let bytes: &[u8; Header::SIZE] = bytes.try_into().ok()?;
        Some(Header::read(bytes))
    }

    /// The buffer offset of the first byte of the message holding buffered byte `pos`, as
    /// far as the buffered headers tell (an incomplete or invalid header ends the walk).
    pub(super) fn message_holding(&self, pos: usize) -> usize {
        let mut at = self.start;
        while let Some(Ok(header)) = self.header_at(at) {
            let next = at
                .saturating_add(Header::SIZE)
                .saturating_add(header.size as usize);
            if next > pos {
                break;
            }
            at = next;
        }
        at
    }

    /// Gives `fds` to the message starting at `owner`; more than [`MAX_FDS`] for one
    /// message is an error.
    pub(super) fn attach(&mut self, owner: usize, fds: Vec<OwnedFd>) -> Result<(), SocketError> {
        let received = match self.fds.last_mut() {
            Some((last, group)) if *last == owner => {
                group.extend(fds);
                group.len()
            }
            _ => {
                let n = fds.len();
                self.fds.push((owner, fds));
                n
            }
        };
        if received > MAX_FDS {
            return Err(SocketError::TooManyFds {
                max: MAX_FDS,
                received,
            });
        }
        Ok(())
    }

    /// Takes the fds of the messages starting before buffer offset `before`.
    pub(super) fn take_fds(&mut self, before: usize, into: &mut Vec<OwnedFd>) {
        let n = self.fds.iter().take_while(|(o, _)| *o < before).count();
        for (_, group) in self.fds.drain(..n) {
            into.extend(group);
        }
    }
}
