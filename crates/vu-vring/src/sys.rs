//! The crate's raw system calls and raw memory, behind safe types: the only module allowed to
//! use `unsafe` (the workspace denies `unsafe_code`; lib.rs allows it here alone).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::VolatileSlice;

/// The system's page size (4096 if it will not say).
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system and touches no memory.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// A shared, read-write mapping of `len` bytes of a file from some offset, read and written
/// only through [`VolatileSlice`]s borrowed from it ([`slice`](Self::slice)); unmapped on
/// drop.
///
/// vm-memory's `MmapRegion` cannot map a file when vm-memory is built for Xen, so the
/// inflight area is mapped here, the way vu-mem maps the dirty log.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    /// What mmap returned (the offset rounded down to a page).
    base: *mut libc::c_void,
    /// Its length.
    map_len: usize,
    /// The first byte of the area inside it.
    start: *mut u8,
    /// The area's length.
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only accessed through
// `VolatileSlice`s borrowed from `&self`, and unmapped only on drop.
unsafe impl Send for SharedMapping {}
// SAFETY: as above; every shared access is a volatile or atomic access through a slice.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` (> 0) bytes of `file` from `offset`; the caller checked that the file
    /// holds them.
    pub(crate) fn map(file: &File, offset: u64, len: u64) -> io::Result<Self> {
        let too_big = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("area of {len} bytes at {offset}"),
            )
        };
        let end = offset.checked_add(len).ok_or_else(too_big)?;
        // mmap wants a page-aligned file offset: map from the page below and step over.
        let aligned = offset - offset % page_size();
        let map_len = usize::try_from(end - aligned).map_err(|_| too_big())?;
        let delta = usize::try_from(offset - aligned).map_err(|_| too_big())?;
        let len = usize::try_from(len).map_err(|_| too_big())?;
        let file_offset = libc::off_t::try_from(aligned).map_err(|_| too_big())?;
        if len == 0 {
            return Err(too_big());
        }
        // SAFETY: a fresh shared mapping (no MAP_FIXED) of a borrowed, open fd; it replaces no
        // memory of ours, and MAP_FAILED is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // `delta + len == map_len`: the area lies inside the mapping.
        let start = base.cast::<u8>().wrapping_add(delta);
        Ok(SharedMapping {
            base,
            map_len,
            start,
            len,
        })
    }

    /// The `len` bytes at `offset` of the area, or `None` past its end.
    pub(crate) fn slice(&self, offset: usize, len: usize) -> Option<VolatileSlice<'_, ()>> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: `offset + len <= self.len` bytes from `start` are inside this live mapping,
        // which the returned slice cannot outlive (it borrows `self`); the area is shared
        // with the frontend, and this process touches it only through the slice's volatile
        // and atomic accesses.
        Some(unsafe { VolatileSlice::new(self.start.wrapping_add(offset), len) })
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are what mmap returned, and no slice borrowed from `self`
        // outlives it.
        unsafe {
            libc::munmap(self.base, self.map_len);
        }
    }
}

/// The memory of `slice` as a slice of atomic integers `T` (as many whole ones as it holds),
/// or `None` when it is not aligned for `T`. The rings' hot paths load and store their
/// words through it with one bounds check, where `VolatileSlice::load`/`store` make a
/// subslice and check its alignment on every access (docs/performance.md).
///
/// Stores through the view do not mark the slice's dirty bitmap: a caller that stores marks
/// it itself (`slice.bitmap().mark_dirty(..)`), as `VolatileSlice::store` does. With
/// vm-memory's Xen mappings, whose memory is reached through a mapping made per access
/// (`ptr_guard`), there is no view: `None`.
#[cfg(not(feature = "xen"))]
pub(crate) fn atomic_view<'a, T, B>(slice: &VolatileSlice<'a, B>) -> Option<&'a [T]>
where
    T: vm_memory::AtomicInteger,
    B: vm_memory::bitmap::BitmapSlice,
{
    // Without Xen the guard is the slice's own pointer and length, and unmaps nothing.
    let ptr = slice.ptr_guard().as_ptr();
    if ptr.align_offset(std::mem::align_of::<T>()) != 0 {
        return None;
    }
    let len = slice.len() / std::mem::size_of::<T>();
    // SAFETY: a `VolatileSlice<'a>` is valid memory of `slice.len()` bytes for `'a` (its
    // constructors' invariant, on which vm-memory's own `get_atomic_ref` relies the same way);
    // the view covers no byte past it and is aligned for `T`. `T` is an atomic integer, so
    // the driver writing the same memory concurrently is not a data race in Rust's sense, and
    // every access through the view is an atomic load or store, as vm-memory's are.
    Some(unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), len) })
}

/// With vm-memory's Xen mappings: no view (see the other `atomic_view`).
#[cfg(feature = "xen")]
pub(crate) fn atomic_view<'a, T, B>(_slice: &VolatileSlice<'a, B>) -> Option<&'a [T]>
where
    T: vm_memory::AtomicInteger,
    B: vm_memory::bitmap::BitmapSlice,
{
    None
}

/// A memfd of `len` zero bytes, close-on-exec (for the unit tests).
#[cfg(test)]
pub(crate) fn memfd(len: u64) -> io::Result<File> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: the name is a valid NUL-terminated string that memfd_create does not keep.
    let fd = unsafe { libc::memfd_create(c"vu-vring-test".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len)?;
    Ok(file)
}

/// A non-blocking, close-on-exec eventfd (for the unit tests).
#[cfg(test)]
pub(crate) fn eventfd() -> io::Result<File> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: eventfd takes no pointers; the flags are valid constants.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}
