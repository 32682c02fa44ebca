//! Where vu_blk's disk lives: a raw image file, a disk held in memory, or no disk at all
//! (`--null`: reads return zeroes, writes are dropped).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

/// What the command line asked the disk to be.
#[derive(Debug)]
pub(crate) enum Source {
    /// `--blk-file FILE`.
    File(PathBuf),
    /// `--memory-size MIB`.
    Memory(u64),
    /// `--null MIB`.
    Null(u64),
}

/// Where the disk's bytes live.
#[derive(Debug)]
pub(crate) enum Storage {
    File(File),
    Memory(Mutex<Vec<u8>>),
    /// A disk of this many bytes that holds nothing, as QEMU's `null-co` block driver with
    /// `read-zeroes=on`: a read gives zeroes, a write is dropped. The device writes the zeroes
    /// of a read straight into the guest's buffers and never reads the data of a write.
    Null(u64),
}

impl Storage {
    /// Opens (or allocates) the disk `source` names.
    pub(crate) fn open(source: &Source, read_only: bool) -> Result<Storage, String> {
        let bytes_of = |mib: u64, option: &str| {
            mib.checked_mul(1 << 20)
                .ok_or_else(|| format!("{option} too large"))
        };
        match source {
            Source::File(path) => OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(path)
                .map(Storage::File)
                .map_err(|err| format!("cannot open {}: {err}", path.display())),
            Source::Memory(mib) => {
                let bytes = usize::try_from(bytes_of(*mib, "--memory-size")?)
                    .map_err(|_| "--memory-size too large".to_owned())?;
                Ok(Storage::Memory(Mutex::new(vec![0u8; bytes])))
            }
            Source::Null(mib) => Ok(Storage::Null(bytes_of(*mib, "--null")?)),
        }
    }

    /// Whether this is the `--null` disk (nothing to read or write).
    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Storage::Null(_))
    }

    pub(crate) fn len(&self) -> io::Result<u64> {
        match self {
            Storage::File(file) => Ok(file.metadata()?.len()),
            Storage::Memory(bytes) => Ok(lock(bytes).len() as u64),
            Storage::Null(len) => Ok(*len),
        }
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Storage::File(file) => file.read_exact_at(buf, offset),
            Storage::Memory(bytes) => {
                let bytes = lock(bytes);
                let range = byte_range(offset, buf.len(), bytes.len())?;
                buf.copy_from_slice(&bytes[range]);
                Ok(())
            }
            Storage::Null(len) => {
                byte_range(
                    offset,
                    buf.len(),
                    usize::try_from(*len).unwrap_or(usize::MAX),
                )?;
                buf.fill(0);
                Ok(())
            }
        }
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Storage::File(file) => file.write_all_at(buf, offset),
            Storage::Memory(bytes) => {
                let mut bytes = lock(bytes);
                let range = byte_range(offset, buf.len(), bytes.len())?;
                bytes[range].copy_from_slice(buf);
                Ok(())
            }
            Storage::Null(len) => {
                byte_range(
                    offset,
                    buf.len(),
                    usize::try_from(*len).unwrap_or(usize::MAX),
                )?;
                Ok(())
            }
        }
    }

    pub(crate) fn flush(&self) -> io::Result<()> {
        match self {
            Storage::File(file) => file.sync_data(),
            Storage::Memory(_) | Storage::Null(_) => Ok(()),
        }
    }
}

/// A poisoned lock only means another worker panicked mid-copy; the bytes are still bytes.
fn lock(bytes: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    bytes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn byte_range(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let end = start.checked_add(len).ok_or_else(out_of_range)?;
    if end > size {
        return Err(out_of_range());
    }
    Ok(start..end)
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "request beyond the end of the disk",
    )
}
