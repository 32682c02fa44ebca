//! Helpers shared by the unit tests.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::region::RegionSpec;

/// A memfd of `size` bytes, zero-filled.
pub(crate) fn memfd(size: u64) -> File {
    let file = crate::sys::memfd(c"vu-mem-test").expect("memfd_create");
    file.set_len(size).unwrap();
    file
}

/// A region backed by its own memfd, from offset 0.
pub(crate) fn region(gpa: u64, size: u64, vmm: u64) -> RegionSpec {
    RegionSpec::new(gpa, size, vmm, 0, memfd(size))
}

/// The log bit of guest page `page`, read through the fd rather than our mapping.
pub(crate) fn log_bit(log: &File, offset: u64, page: u64) -> bool {
    let mut byte = [0u8];
    log.read_exact_at(&mut byte, offset + page / 8).unwrap();
    byte[0] & (1 << (page % 8)) != 0
}

/// Every set bit of the log, as guest page numbers.
pub(crate) fn dirty_pages(log: &File, offset: u64, size: u64) -> Vec<u64> {
    let mut bytes = vec![0u8; size as usize];
    log.read_exact_at(&mut bytes, offset).unwrap();
    let mut pages = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.push(i as u64 * 8 + bit);
            }
        }
    }
    pages
}
