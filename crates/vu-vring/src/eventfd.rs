//! The vrings' eventfds (kick, call, error), read and written 8 bytes at a time.

use std::fs::File;
use std::io::{self, Read, Write};

/// Adds one to an eventfd counter. A full counter (EAGAIN) already wakes the reader, so it
/// counts as delivered.
pub(crate) fn eventfd_add_one(fd: &File) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    loop {
        match (&*fd).write(&one) {
            Ok(n) if n == one.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short eventfd write of {n} bytes"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Reads (and so resets) an eventfd counter, returning it; 0 when a non-blocking eventfd was
/// empty.
pub(crate) fn eventfd_take(fd: &File) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    loop {
        match (&*fd).read(&mut buf) {
            Ok(n) if n == buf.len() => return Ok(u64::from_ne_bytes(buf)),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short eventfd read of {n} bytes"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}
