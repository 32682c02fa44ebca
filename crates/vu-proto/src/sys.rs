//! The crate's raw system calls: `getsockopt`, `getpeername`, `fcntl`, and `sendmsg` /
//! `recvmsg` with `SCM_RIGHTS` ancillary data. This is the only module of `vu-proto` allowed
//! to use `unsafe` (the crate denies `unsafe_code` everywhere else, and the codec forbids it);
//! each function here is a safe wrapper whose contract the callers in [`crate::socket`] rely
//! on: a received fd is an [`OwnedFd`] before [`recvmsg_once`] returns.

use std::io::{self, IoSlice};
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use crate::header::MAX_FDS;

/// An integer `SOL_SOCKET` option of `fd`.
pub(crate) fn socket_option(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals valid for writes, and `len` holds the size
    // of `value`, so the kernel writes at most that many bytes; `fd` is borrowed, open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// `getpeername` on `fd`, for its error alone: `ENOTCONN` says a socket has no peer.
pub(crate) fn check_peer(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut address = [0u8; mem::size_of::<libc::sockaddr_un>()];
    let mut len = address.len() as libc::socklen_t;
    // SAFETY: `address` and `len` are live locals valid for writes, and `len` holds the size
    // of `address`, so the kernel writes at most that many bytes.
    let rc = unsafe { libc::getpeername(fd.as_raw_fd(), address.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `FD_CLOEXEC` on `fd`.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFD takes no argument and touches no memory; `fd` is borrowed, open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFD takes an integer argument and touches no memory; `fd` is open.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The size of one fd in `SCM_RIGHTS` data.
const FD_SIZE: usize = mem::size_of::<RawFd>();

/// `CMSG_SPACE(len)`: the control buffer bytes a message with `len` data bytes takes,
/// header and padding included.
pub(crate) const fn cmsg_space(len: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument and dereferences nothing;
    // every caller passes a length of at most MAX_FDS fds, far below c_uint::MAX.
    unsafe { libc::CMSG_SPACE(len as libc::c_uint) as usize }
}

/// `CMSG_LEN(len)`: the `cmsg_len` of a message with `len` data bytes (header included,
/// trailing padding not).
const fn cmsg_len(len: usize) -> usize {
    // SAFETY: as for `cmsg_space`: pure arithmetic on a small length.
    unsafe { libc::CMSG_LEN(len as libc::c_uint) as usize }
}

/// Offset of the data in a control message: the aligned header length.
const CMSG_DATA_OFFSET: usize = cmsg_len(0);

/// Control buffer length: room for one `SCM_RIGHTS` message of [`MAX_FDS`] fds.
const CONTROL_LEN: usize = cmsg_space(MAX_FDS * FD_SIZE);

// The control buffer holds a header and MAX_FDS fds; `take_rights` reads a whole
// cmsghdr from any offset that leaves CMSG_DATA_OFFSET bytes.
const _: () = assert!(CONTROL_LEN >= CMSG_DATA_OFFSET + MAX_FDS * FD_SIZE);
const _: () = assert!(CMSG_DATA_OFFSET >= mem::size_of::<libc::cmsghdr>());

/// A control buffer aligned for `cmsghdr` (whose strictest field is a `size_t`): the
/// kernel and the `CMSG_*` arithmetic assume this alignment.
#[repr(C, align(8))]
pub(crate) struct ControlBuffer([u8; CONTROL_LEN]);

impl ControlBuffer {
    /// An empty control buffer.
    pub(crate) fn new() -> Self {
        ControlBuffer([0; CONTROL_LEN])
    }
}

/// Writes one `SCM_RIGHTS` control message carrying `fds` (at most [`MAX_FDS`], checked
/// by the caller) into `control`; returns the control length to pass to `sendmsg`.
pub(crate) fn fill_rights(control: &mut ControlBuffer, fds: &[BorrowedFd<'_>]) -> usize {
    let data_len = fds.len() * FD_SIZE;
    // SAFETY: cmsghdr is a C struct of integers (and, on some targets, integer padding
    // fields), for which all-zero bytes are a valid value.
    let mut header: libc::cmsghdr = unsafe { mem::zeroed() };
    header.cmsg_len = cmsg_len(data_len) as _;
    header.cmsg_level = libc::SOL_SOCKET;
    header.cmsg_type = libc::SCM_RIGHTS;
    // SAFETY: CONTROL_LEN = CMSG_SPACE(MAX_FDS * FD_SIZE) is at least the size of a
    // cmsghdr, so the write stays inside `control`; write_unaligned has no alignment
    // requirement (the buffer is 8-aligned anyway).
    unsafe { ptr::write_unaligned(control.0.as_mut_ptr().cast::<libc::cmsghdr>(), header) };
    let data = &mut control.0[CMSG_DATA_OFFSET..CMSG_DATA_OFFSET + data_len];
    for (slot, fd) in data.chunks_exact_mut(FD_SIZE).zip(fds) {
        slot.copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
    }
    cmsg_space(data_len)
}

/// One `sendmsg(MSG_NOSIGNAL)` of `slices` with the first `control_len` bytes of
/// `control` as ancillary data; returns the number of bytes written.
pub(crate) fn sendmsg_once(
    socket: BorrowedFd<'_>,
    slices: &[IoSlice<'_>],
    control: &mut ControlBuffer,
    control_len: usize,
) -> io::Result<usize> {
    // SAFETY: msghdr is a C struct of integers and raw pointers (plus integer padding on
    // some targets), for which all-zero bytes (null pointers, zero lengths) are valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix. The kernel only reads
    // through msg_iov, so the const-to-mut cast is never used to write.
    msg.msg_iov = slices.as_ptr().cast::<libc::iovec>().cast_mut();
    msg.msg_iovlen = slices.len().min(libc::UIO_MAXIOV as usize) as _;
    if control_len > 0 {
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control_len.min(CONTROL_LEN) as _;
    }
    // SAFETY: every pointer in `msg` borrows memory that outlives the call: the iovecs
    // and the bytes they describe come from `slices` (lengths from the slices
    // themselves, count capped at slices.len()), and the control data is at most
    // CONTROL_LEN bytes of `control`. The fds in the control data are borrowed by the
    // caller and stay open for the call; the kernel duplicates them, so no ownership
    // moves.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One `recvmsg(MSG_CMSG_CLOEXEC | flags)` into `buf`; every fd received is appended to
/// `fds` as an [`OwnedFd`] before anything else is examined. Returns the byte count and
/// whether the control data was truncated (`MSG_CTRUNC`).
pub(crate) fn recvmsg_once(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: libc::c_int,
) -> io::Result<(usize, bool)> {
    let mut control = ControlBuffer::new();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a C struct of integers and raw pointers (plus integer padding on
    // some targets), for which all-zero bytes (null pointers, zero lengths) are valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN as _;
    // SAFETY: `iov` describes exactly `buf` (pointer and length taken from it), which is
    // exclusively borrowed for the call; the control pointer and length describe
    // `control`, CONTROL_LEN bytes aligned for cmsghdr. The kernel writes at most those
    // lengths. Fds it installs are taken into ownership just below, exactly once.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
    if n < 0 {
        // On failure the kernel installs no fd.
        return Err(io::Error::last_os_error());
    }
    let control_len = (msg.msg_controllen as usize).min(CONTROL_LEN);
    take_rights(&control.0[..control_len], fds);
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    Ok((n as usize, truncated))
}

/// Walks the control messages in `control` (as filled in by `recvmsg`) and takes
/// ownership of every fd of every `SCM_RIGHTS` message.
pub(crate) fn take_rights(control: &[u8], fds: &mut Vec<OwnedFd>) {
    let mut offset = 0usize;
    while let Some(rest) = control.get(offset..) {
        if rest.len() < CMSG_DATA_OFFSET {
            break;
        }
        // SAFETY: `rest` holds at least CMSG_DATA_OFFSET >= size_of::<cmsghdr>() bytes
        // (checked just above); read_unaligned needs no alignment, and cmsghdr is plain
        // integers, valid for any bit pattern.
        let header: libc::cmsghdr = unsafe { ptr::read_unaligned(rest.as_ptr().cast()) };
        let len = header.cmsg_len as usize;
        let Some(data) = rest.get(CMSG_DATA_OFFSET..len) else {
            // A length shorter than a header or past the buffer: the kernel never writes
            // one, and there is nothing sound to read after it.
            break;
        };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            for chunk in data.chunks_exact(FD_SIZE) {
                let mut bytes = [0u8; FD_SIZE];
                bytes.copy_from_slice(chunk);
                let raw = RawFd::from_ne_bytes(bytes);
                if raw < 0 {
                    continue;
                }
                // SAFETY: the kernel installed `raw` in our fd table for this recvmsg
                // (with close-on-exec), and nothing else knows its number yet; this loop
                // visits each fd slot once, so ownership is taken exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // The next header starts at CMSG_ALIGN(len) = CMSG_SPACE(data length).
        offset = offset.saturating_add(cmsg_space(data.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_rights_ignores_a_length_past_the_buffer() {
        let mut control = ControlBuffer::new();
        // SAFETY: as in fill_rights: all-zero is a valid cmsghdr.
        let mut header: libc::cmsghdr = unsafe { mem::zeroed() };
        header.cmsg_len = (CONTROL_LEN + 4) as _;
        header.cmsg_level = libc::SOL_SOCKET;
        header.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: the buffer holds at least one cmsghdr (the const assertions above).
        unsafe { ptr::write_unaligned(control.0.as_mut_ptr().cast::<libc::cmsghdr>(), header) };
        let mut fds = Vec::new();
        take_rights(&control.0, &mut fds);
        assert!(fds.is_empty());
    }
}
