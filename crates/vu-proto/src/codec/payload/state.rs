//! Device state transfer: the parameters of `SET_DEVICE_STATE_FD` and its reply.

use super::{fixed_payload, Payload};
use crate::wire::{Reader, WireError};

/// The spec's "transfer direction: a 32-bit enum".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum TransferDirection {
    /// "0: Save: Transfer the state from the back-end to the front-end, which happens
    /// on the source side of migration".
    Save = 0,
    /// "1: Load: Transfer the state from the front-end to the back-end, which happens
    /// on the destination side of migration".
    Load = 1,
}

/// The spec's "migration phase: a 32-bit enum".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum TransferPhase {
    /// "0: Stopped [...]: The VM guest is stopped, and the vhost-user device is
    /// suspended". "In the future, additional phases might be added"; until then any
    /// other value is refused.
    Stopped = 0,
}

/// The spec's "device state transfer parameters"; unknown directions and phases are
/// refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceStateTransfer {
    /// Which way the state flows.
    pub direction: TransferDirection,
    /// When in the migration the transfer happens.
    pub phase: TransferPhase,
}

impl DeviceStateTransfer {
    /// Two `u32`.
    pub const SIZE: usize = 8;

    /// Reads and checks the parameters.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let direction = match r.u32()? {
            0 => TransferDirection::Save,
            1 => TransferDirection::Load,
            other => {
                return Err(WireError::InvalidValue {
                    field: "transfer direction",
                    value: u64::from(other),
                })
            }
        };
        let phase = match r.u32()? {
            0 => TransferPhase::Stopped,
            other => {
                return Err(WireError::InvalidValue {
                    field: "migration phase",
                    value: u64::from(other),
                })
            }
        };
        Ok(DeviceStateTransfer { direction, phase })
    }

    /// Appends the parameters.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.direction as u32).to_ne_bytes());
        out.extend_from_slice(&(self.phase as u32).to_ne_bytes());
    }
}
fixed_payload!(DeviceStateTransfer);

/// Bits 0-7 of the reply: the error code, zero on success.
const ERROR_MASK: u64 = 0xff;
/// Bit 8 of the reply: the invalid-fd flag.
const NO_FD_BIT: u64 = 1 << 8;

/// The `u64` reply to `SET_DEVICE_STATE_FD`.
///
/// The spec: "Bits 0–7 are 0 on success, and non-zero on error. Bit 8 is the invalid FD
/// flag; this flag is set when there is no file descriptor returned. [...] The back-end
/// must not both indicate an error and return a file descriptor." Other bits, and an
/// error with an fd, are refused; [`Payload::expected_fds`] makes the fd count agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceStateFdReply {
    /// The error code; 0 is success.
    pub error: u8,
    /// No fd accompanies the reply: the front-end keeps its own channel.
    pub no_fd: bool,
}

impl DeviceStateFdReply {
    /// One `u64`.
    pub const SIZE: usize = 8;

    /// Reads and checks the reply word.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let word = r.u64()?;
        if word & !(ERROR_MASK | NO_FD_BIT) != 0 {
            return Err(WireError::InvalidValue {
                field: "device state fd reply",
                value: word,
            });
        }
        // The mask keeps the value below 256.
        let error = (word & ERROR_MASK) as u8;
        let no_fd = word & NO_FD_BIT != 0;
        if error != 0 && !no_fd {
            return Err(WireError::InvalidValue {
                field: "device state fd reply (error with an fd)",
                value: word,
            });
        }
        Ok(DeviceStateFdReply { error, no_fd })
    }

    /// Appends the reply word.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let flag = if self.no_fd { NO_FD_BIT } else { 0 };
        out.extend_from_slice(&(u64::from(self.error) | flag).to_ne_bytes());
    }
}

impl Payload for DeviceStateFdReply {
    const MIN_SIZE: usize = Self::SIZE;
    const MAX_SIZE: usize = Self::SIZE;
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        DeviceStateFdReply::read(r)
    }
    fn encode(&self, out: &mut Vec<u8>) {
        DeviceStateFdReply::encode(self, out)
    }
    fn expected_fds(&self) -> Option<usize> {
        Some(usize::from(!self.no_fd))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payload::tests::assert_round_trip;
    use crate::request::RequestCode;

    const REQ: RequestCode = RequestCode(42);

    #[test]
    fn transfer_decodes_known_bytes() {
        let mut b = 1u32.to_ne_bytes().to_vec();
        b.extend_from_slice(&0u32.to_ne_bytes());
        assert_eq!(
            DeviceStateTransfer::decode_body(REQ, &b),
            Ok(DeviceStateTransfer {
                direction: TransferDirection::Load,
                phase: TransferPhase::Stopped
            })
        );
    }

    #[test]
    fn transfer_round_trips() {
        assert_round_trip(&DeviceStateTransfer {
            direction: TransferDirection::Save,
            phase: TransferPhase::Stopped,
        });
    }

    #[test]
    fn unknown_direction_and_phase_are_refused() {
        for (d, p) in [(2u32, 0u32), (0, 1)] {
            let mut b = d.to_ne_bytes().to_vec();
            b.extend_from_slice(&p.to_ne_bytes());
            assert!(matches!(
                DeviceStateTransfer::decode_body(REQ, &b),
                Err(WireError::InvalidValue { .. })
            ));
        }
    }

    #[test]
    fn fd_reply_decodes_and_round_trips() {
        let r = DeviceStateFdReply::decode_body(REQ, &0u64.to_ne_bytes()).unwrap();
        assert_eq!(r.expected_fds(), Some(1));
        let r = DeviceStateFdReply::decode_body(REQ, &0x105u64.to_ne_bytes()).unwrap();
        assert_eq!(
            r,
            DeviceStateFdReply {
                error: 5,
                no_fd: true
            }
        );
        assert_eq!(r.expected_fds(), Some(0));
        assert_round_trip(&r);
    }

    #[test]
    fn fd_reply_error_with_fd_is_refused() {
        assert!(matches!(
            DeviceStateFdReply::decode_body(REQ, &1u64.to_ne_bytes()),
            Err(WireError::InvalidValue { .. })
        ));
        assert!(matches!(
            DeviceStateFdReply::decode_body(REQ, &(1u64 << 9).to_ne_bytes()),
            Err(WireError::InvalidValue { .. })
        ));
    }
}
