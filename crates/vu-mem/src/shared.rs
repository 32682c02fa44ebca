//! [`SharedMemory`]: guest memory as a frontend (or a test playing one) creates it, an
//! anonymous memory file mapped in this process, ready to be described in `SET_MEM_TABLE`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory backed by a memfd: one region of `size` bytes at a guest address, mapped
/// shared in this process, whose fd a frontend sends to the backend.
///
/// The frontend writes rings and buffers through [`memory`](Self::memory); the memory table
/// entry is [`guest_addr`](Self::guest_addr), [`size`](Self::size),
/// [`user_addr`](Self::user_addr) and offset 0, with [`fd`](Self::fd).
#[derive(Debug)]
pub struct SharedMemory {
    file: File,
    mem: GuestMemoryMmap,
    guest_addr: GuestAddress,
    size: u64,
}

impl SharedMemory {
    /// Creates a memfd of `size` bytes (close-on-exec) and maps it at `guest_addr`.
    ///
    /// `size` must be non-zero; it need not be a multiple of the page size.
    pub fn new(guest_addr: GuestAddress, size: u64) -> io::Result<Self> {
        let len = usize::try_from(size)
            .ok()
            .filter(|&len| len > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad memory size"))?;
        let file = crate::sys::memfd(c"vu-shared-memory")?;
        file.set_len(size)?;
        let offset = FileOffset::new(file.try_clone()?, 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(guest_addr, len, Some(offset))])
            .map_err(io::Error::other)?;
        Ok(SharedMemory {
            file,
            mem,
            guest_addr,
            size,
        })
    }

    /// The mapping, through which the frontend reads and writes guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd, to send with the memory table.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The memfd as a file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The guest address of the first byte.
    pub fn guest_addr(&self) -> GuestAddress {
        self.guest_addr
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where this process mapped the first byte: the region's "user address" in the memory
    /// table, the address space in which ring addresses are given.
    pub fn user_addr(&self) -> u64 {
        self.user_addr_of(self.guest_addr).unwrap_or(0)
    }

    /// The user address (see [`user_addr`](Self::user_addr)) of guest address `addr`, or
    /// `None` if `addr` is outside this memory.
    pub fn user_addr_of(&self, addr: GuestAddress) -> Option<u64> {
        self.mem.get_host_address(addr).ok().map(|ptr| ptr as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn writes_through_the_mapping_reach_the_file() {
        let shared = SharedMemory::new(GuestAddress(0x10_0000), 8192).unwrap();
        shared
            .memory()
            .write_slice(b"ring", GuestAddress(0x10_0100))
            .unwrap();
        let mut got = [0u8; 4];
        shared.file().read_exact_at(&mut got, 0x100).unwrap();
        assert_eq!(&got, b"ring");
    }

    #[test]
    fn user_addresses_follow_the_mapping() {
        let shared = SharedMemory::new(GuestAddress(0x10_0000), 4096).unwrap();
        assert_ne!(shared.user_addr(), 0);
        assert_eq!(
            shared.user_addr_of(GuestAddress(0x10_0010)),
            Some(shared.user_addr() + 0x10)
        );
        assert_eq!(shared.user_addr_of(GuestAddress(0x10_1000)), None);
        assert_eq!(shared.user_addr_of(GuestAddress(0)), None);
    }

    #[test]
    fn zero_size_is_refused() {
        assert!(SharedMemory::new(GuestAddress(0), 0).is_err());
    }
}
