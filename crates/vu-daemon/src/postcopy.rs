//! Postcopy live migration (feature `postcopy`): the userfaultfd the backend opens on
//! `POSTCOPY_ADVISE`, registers guest memory with once `POSTCOPY_LISTEN` arrived, and closes
//! on `POSTCOPY_END`.
//!
//! The frontend (QEMU) reads the faults from the userfaultfd and fills the missing pages; the
//! backend's threads simply block on a missing page until then. The userfaultfd is created
//! without `UFFD_USER_MODE_ONLY`, because device code also touches guest memory from system
//! calls (`read`/`write` into a buffer); that needs `CAP_SYS_PTRACE` or
//! `vm.unprivileged_userfaultfd = 1`, or access to `/dev/userfaultfd`.

use std::os::fd::{AsFd, OwnedFd};

use userfaultfd::{Uffd, UffdBuilder};

/// Why a postcopy step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostcopyError {
    /// The step does not fit the current state (for example LISTEN before ADVISE).
    #[error("{0}")]
    State(&'static str),
    /// Creating the userfaultfd failed.
    #[error("cannot create a userfaultfd: {0}")]
    Create(#[source] userfaultfd::Error),
    /// Duplicating the userfaultfd for the frontend failed.
    #[error("cannot duplicate the userfaultfd: {0}")]
    Dup(#[source] std::io::Error),
    /// `madvise(MADV_NOHUGEPAGE)` on a mapping failed.
    #[error("cannot madvise {len:#x} bytes at {addr:#x} MADV_NOHUGEPAGE: {source}")]
    Advise {
        /// The host address of the mapping.
        addr: usize,
        /// Its length.
        len: usize,
        /// What the kernel reported.
        #[source]
        source: std::io::Error,
    },
    /// Registering or unregistering a mapping failed.
    #[error("cannot (un)register {len:#x} bytes at {addr:#x} with the userfaultfd: {source}")]
    Register {
        /// The host address of the mapping.
        addr: usize,
        /// Its length.
        len: usize,
        /// What the kernel reported.
        #[source]
        source: userfaultfd::Error,
    },
}

/// The postcopy state of one connection.
#[derive(Debug, Default)]
pub(crate) struct Postcopy {
    /// The userfaultfd, from ADVISE until END.
    uffd: Option<Uffd>,
    /// LISTEN arrived: new memory tables are registered and answered with local addresses.
    listening: bool,
    /// A `SET_MEM_TABLE` or `ADD_MEM_REG` was answered with local addresses; QEMU
    /// acknowledges it with a message of the same code carrying a `u64` 0, which is not a
    /// new table or region.
    awaiting_ack: bool,
    /// Registered mappings (host address, length), unregistered on END.
    registered: Vec<(usize, usize)>,
}

impl Postcopy {
    /// `POSTCOPY_ADVISE`: opens the userfaultfd and returns a duplicate for the frontend.
    pub(crate) fn advise(&mut self) -> Result<OwnedFd, PostcopyError> {
        if self.uffd.is_some() {
            return Err(PostcopyError::State("POSTCOPY_ADVISE was already received"));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(PostcopyError::Create)?;
        let theirs = uffd
            .as_fd()
            .try_clone_to_owned()
            .map_err(PostcopyError::Dup)?;
        self.uffd = Some(uffd);
        Ok(theirs)
    }

    /// `POSTCOPY_LISTEN`: from now on memory tables are registered.
    pub(crate) fn listen(&mut self) -> Result<(), PostcopyError> {
        if self.uffd.is_none() {
            return Err(PostcopyError::State(
                "POSTCOPY_LISTEN before POSTCOPY_ADVISE",
            ));
        }
        self.listening = true;
        Ok(())
    }

    /// Whether LISTEN arrived and END did not.
    pub(crate) fn listening(&self) -> bool {
        self.listening
    }

    /// Registers the mapping at `addr` (host address) of `len` bytes for missing-page faults.
    pub(crate) fn register(&mut self, addr: *mut u8, len: usize) -> Result<(), PostcopyError> {
        let uffd = self.uffd.as_ref().ok_or(PostcopyError::State(
            "no userfaultfd to register memory with",
        ))?;
        // As QEMU and libvhost-user do for registered memory: missing pages are placed one
        // (source) page at a time with UFFDIO_COPY, which transparent huge pages would defeat.
        crate::sys::no_huge_pages(addr, len).map_err(|source| PostcopyError::Advise {
            addr: addr as usize,
            len,
            source,
        })?;
        uffd.register(addr.cast(), len)
            .map_err(|source| PostcopyError::Register {
                addr: addr as usize,
                len,
                source,
            })?;
        self.registered.push((addr as usize, len));
        Ok(())
    }

    /// Notes that the table reply was sent and QEMU's acknowledgement is due.
    pub(crate) fn expect_ack(&mut self) {
        self.awaiting_ack = true;
    }

    /// Consumes the expected acknowledgement; whether one was expected.
    pub(crate) fn take_ack(&mut self) -> bool {
        std::mem::take(&mut self.awaiting_ack)
    }

    /// `POSTCOPY_END`: unregisters every mapping still registered and closes the userfaultfd;
    /// returns how many mappings were registered.
    ///
    /// A mapping the table no longer holds was unmapped, which unregistered it already; the
    /// kernel's error for it is not a failure of the migration.
    pub(crate) fn end(&mut self) -> Result<usize, PostcopyError> {
        let Some(uffd) = self.uffd.take() else {
            return Err(PostcopyError::State("POSTCOPY_END before POSTCOPY_ADVISE"));
        };
        let mappings = self.registered.len();
        for (addr, len) in self.registered.drain(..) {
            if let Err(err) = uffd.unregister(addr as *mut libc::c_void, len) {
                log::debug!("postcopy end: {len:#x} bytes at {addr:#x} already gone: {err}");
            }
        }
        self.listening = false;
        self.awaiting_ack = false;
        Ok(mappings)
    }
}

#[cfg(test)]
mod tests;
