//! Device state transfer made easy: [`StateTransfer`] runs the pipe side of
//! `SET_DEVICE_STATE_FD` / `CHECK_DEVICE_STATE` so that a device only writes its state into a
//! writer and reads it back from a reader.
//!
//! The spec ("Migrating back-end state"): the channel "must generally behave like a pipe: The
//! writing end will write all the data it has into it, signalling the end of data by closing
//! its end. The reading end must read all of this data (until encountering the end of file)
//! and process it", and after the transfer the front-end sends `CHECK_DEVICE_STATE`, to
//! which "the back-end responds once it knows whether the transfer and processing was
//! successful or not". The only phase so far is "stopped": the device is suspended, so its
//! state does not change during the transfer.
//!
//! A device holds one `StateTransfer` and forwards the two backend methods to it:
//!
//! ```
//! use std::fs::File;
//! use std::io::{self, Read, Write};
//! use vu_daemon::device_state::StateTransfer;
//! use vu_proto::payload::{TransferDirection, TransferPhase};
//!
//! struct Device {
//!     counter: std::sync::atomic::AtomicU64,
//!     transfer: StateTransfer,
//! }
//!
//! impl Device {
//!     // In `impl VhostUserBackend for Device`:
//!     fn set_device_state_fd(
//!         &self,
//!         direction: TransferDirection,
//!         _phase: TransferPhase,
//!         file: File,
//!     ) -> io::Result<Option<File>> {
//!         self.transfer.start(direction, file, |out| {
//!             out.write_all(&self.counter.load(std::sync::atomic::Ordering::Relaxed).to_le_bytes())
//!         })
//!     }
//!
//!     fn check_device_state(&self) -> io::Result<()> {
//!         self.transfer.finish(|input| {
//!             let mut bytes = [0u8; 8];
//!             input.read_exact(&mut bytes)?;
//!             self.counter.store(u64::from_le_bytes(bytes), std::sync::atomic::Ordering::Relaxed);
//!             Ok(())
//!         })
//!     }
//! }
//! ```
//!
//! Saving serializes into memory at `SET_DEVICE_STATE_FD` (the device is suspended), and a
//! thread writes the bytes into the pipe and closes it, so the session never blocks on the
//! frontend reading. Loading reads the pipe to its end on a thread; `CHECK_DEVICE_STATE` waits
//! for that thread (the frontend sends it only after closing its end) and hands the bytes to
//! the device, whose error, if any, is the answer. The wait is bounded by
//! [`TRANSFER_TIMEOUT`]: a frontend that sends `CHECK_DEVICE_STATE` with its end still open
//! gets a failure instead of a hung connection (the thread ends when the fd closes).

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use vu_proto::payload::TransferDirection;

/// The transfer under way: where its thread sends its result.
#[derive(Debug)]
enum Pending {
    /// Saving: the thread writing the serialized state into the pipe.
    Save(Receiver<io::Result<()>>),
    /// Loading: the thread reading the pipe to its end.
    Load(Receiver<io::Result<Vec<u8>>>),
}

/// How long `CHECK_DEVICE_STATE` waits for the pipe to be done.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one device state transfer at a time; see the module documentation.
#[derive(Debug, Default)]
pub struct StateTransfer {
    pending: Mutex<Option<Pending>>,
}

/// The largest state a load accepts: a frontend that never closes its end, or sends far more
/// than any device state, does not make the backend grow without bound.
pub const MAX_STATE: u64 = 64 << 20;

impl StateTransfer {
    /// A transfer helper with nothing under way.
    pub fn new() -> Self {
        Self::default()
    }

    /// `SET_DEVICE_STATE_FD`: starts a transfer over `file`. Saving calls `save` now, with a
    /// buffer to write the state into; loading keeps the state read from `file` until
    /// [`finish`](Self::finish). A transfer still under way is abandoned (its thread ends when
    /// the frontend closes its end). Returns `None`: the frontend's fd is used.
    pub fn start(
        &self,
        direction: TransferDirection,
        file: File,
        save: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<Option<File>> {
        let pending = match direction {
            TransferDirection::Save => {
                let mut state = Vec::new();
                save(&mut state)?;
                let mut file = file;
                Pending::Save(spawn("vu-state-save", move || file.write_all(&state))?)
            }
            TransferDirection::Load => Pending::Load(spawn("vu-state-load", move || {
                let mut state = Vec::new();
                file.take(MAX_STATE + 1).read_to_end(&mut state)?;
                if state.len() as u64 > MAX_STATE {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("device state larger than {MAX_STATE} bytes"),
                    ));
                }
                Ok(state)
            })?),
        };
        *self.lock() = Some(pending);
        Ok(None)
    }

    /// `CHECK_DEVICE_STATE`: waits for the transfer's thread; after a load, calls `load`
    /// with a reader over the state. `Err` when no transfer was started, when the pipe
    /// failed, or when `load` refused the state.
    pub fn finish(&self, load: impl FnOnce(&mut dyn Read) -> io::Result<()>) -> io::Result<()> {
        let pending = self.lock().take().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "CHECK_DEVICE_STATE without a transfer",
            )
        })?;
        match pending {
            Pending::Save(done) => wait(&done),
            Pending::Load(done) => {
                let state = wait(&done)?;
                load(&mut state.as_slice())
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs `f` on a thread of its own, which sends the result on the returned channel.
fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<Receiver<io::Result<T>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // The receiver is gone only if a newer transfer replaced this one.
            let _ = tx.send(f());
        })?;
    Ok(rx)
}

fn wait<T>(done: &Receiver<io::Result<T>>) -> io::Result<T> {
    match done.recv_timeout(TRANSFER_TIMEOUT) {
        Ok(result) => result,
        Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the device state pipe was not done (the frontend's end is still open)",
        )),
        Err(RecvTimeoutError::Disconnected) => {
            Err(io::Error::other("the state transfer thread panicked"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (File, File) {
        crate::sys::pipe().unwrap()
    }

    #[test]
    fn a_saved_state_loads_back() {
        let source = StateTransfer::new();
        let (mut read, write) = pipe();
        source
            .start(TransferDirection::Save, write, |out| {
                out.write_all(b"state 42")
            })
            .unwrap();
        let mut bytes = Vec::new();
        read.read_to_end(&mut bytes).unwrap();
        source
            .finish(|_| unreachable!("a save loads nothing"))
            .unwrap();
        assert_eq!(bytes, b"state 42");

        let dest = StateTransfer::new();
        let (read, mut write) = pipe();
        dest.start(TransferDirection::Load, read, |_| {
            unreachable!("a load saves nothing")
        })
        .unwrap();
        write.write_all(&bytes).unwrap();
        drop(write);
        let mut loaded = Vec::new();
        dest.finish(|input| input.read_to_end(&mut loaded).map(drop))
            .unwrap();
        assert_eq!(loaded, b"state 42");
    }

    #[test]
    fn a_refused_state_fails_the_check() {
        let dest = StateTransfer::new();
        let (read, write) = pipe();
        dest.start(TransferDirection::Load, read, |_| Ok(()))
            .unwrap();
        drop(write);
        let err = dest
            .finish(|_| Err(io::Error::new(io::ErrorKind::InvalidData, "wrong device")))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_check_without_a_transfer_fails() {
        assert!(StateTransfer::new().finish(|_| Ok(())).is_err());
    }

    #[test]
    fn a_save_whose_reader_went_away_fails_the_check() {
        let source = StateTransfer::new();
        let (read, write) = pipe();
        drop(read);
        source
            .start(TransferDirection::Save, write, |out| {
                out.write_all(&[0; 16])
            })
            .unwrap();
        assert!(source.finish(|_| Ok(())).is_err());
    }
}
