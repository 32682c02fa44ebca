//! Dirty logging of the used rings at the address the frontend gave for them.
//!
//! The spec ("Migration"): "Modifications to "used" vring should be marked if
//! `VHOST_VRING_F_LOG` is part of ring's flags", and "`log_guest_addr` should be used to
//! calculate the log offset: the write to first byte of the used ring is logged at this
//! offset from log start". QEMU sends the used ring's guest-physical address there
//! (hw/virtio/vhost.c, `vhost_virtqueue_set_addr`), which may lie outside the memory table.
//! vu-mem's `LogBitmap` already logs every used-ring write at the guest address the ring was
//! translated to; this marks the whole used ring at `log_guest_addr` as well, so the log is
//! right for any address the frontend chose and for any bitmap.
//!
//! Two places call it: the dispatch after each `handle_event` while logging is on (so the
//! frontend's iterations see the ring dirty), and `GET_VRING_BASE` once the ring is stopped
//! (so its final contents are in the log QEMU syncs after stopping the device, whichever
//! thread wrote them). Marking a whole ring is coarser than per entry but misses nothing: a
//! split used ring of 256 entries is two 4 KiB pages.
//!
//! Each call then signals the `SET_LOG_FD` eventfd if a log bit went from 0 to 1 ("it may be
//! used to inform the front-end that the log has been modified"). QEMU 7.2 never sends
//! `SET_LOG_FD`; it reads the log when it syncs.

use vm_memory::{GuestAddress, GuestAddressSpace};
use vu_mem::{DirtyLog, MemError};
use vu_vring::VringT;

/// Marks the used ring of `vring` dirty at its `log_guest_addr`, if `VHOST_VRING_F_LOG` was
/// set for it and logging is on.
pub(crate) fn mark_used_ring<M, V>(vring: &V, log: &DirtyLog) -> Result<(), MemError>
where
    M: GuestAddressSpace,
    V: VringT<M> + ?Sized,
{
    if !log.is_logging() {
        return Ok(());
    }
    let Some(range) = vring.get_ref().log_used() else {
        return Ok(());
    };
    log.mark_dirty(GuestAddress(range.start), range.end - range.start)
}

/// After a dispatch: marks the used ring of every vring that logs, then signals the log
/// eventfd if the log changed. Costs one atomic load while logging is off. Failures are
/// logged at debug level (a frontend that shrank the log below a ring was told at
/// `SET_VRING_ADDR`; this runs after every event).
pub(crate) fn mark_used_rings<M, V>(vrings: &[V], log: &DirtyLog)
where
    M: GuestAddressSpace,
    V: VringT<M>,
{
    if !log.is_logging() {
        return;
    }
    for (queue, vring) in vrings.iter().enumerate() {
        if let Err(err) = mark_used_ring(vring, log) {
            log::debug!("queue {queue}: used ring not logged: {err}");
        }
    }
    if let Err(err) = log.notify_changed() {
        log::debug!("{err}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs::File;
    use std::io::Read;
    use std::os::unix::fs::FileExt;

    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
    use vu_mem::{GuestMemoryManager, LogBitmap, RegionSpec, LOG_PAGE_SIZE};
    use vu_vring::VringMutex;

    use super::*;

    type Mem = GuestMemoryAtomic<GuestMemoryMmap<LogBitmap>>;

    fn memfd(size: u64) -> File {
        crate::sys::memfd(c"vu-used-log", size, false).unwrap()
    }

    fn eventfd() -> File {
        crate::sys::eventfd(true).unwrap()
    }

    /// 1 MiB of guest memory, a 64-byte log (512 pages), logging on, a 16-entry ring whose
    /// used ring is at 0x3000 and logged at `log_addr`.
    fn setup(log_addr: Option<u64>) -> (GuestMemoryManager, VringMutex<Mem>, File) {
        let mut m = GuestMemoryManager::<LogBitmap>::new(Mem::new(GuestMemoryMmap::new()));
        m.set_table(vec![RegionSpec::new(
            0,
            1 << 20,
            0x7f00_0000_0000,
            0,
            memfd(1 << 20),
        )])
        .unwrap();
        let log = memfd(64);
        m.set_log_base(&log, 64, 0).unwrap();
        m.set_logging(true).unwrap();
        let vring = VringMutex::<Mem>::new(m.memory().clone(), 16).unwrap();
        vring.set_queue_size(16).unwrap();
        vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        vring.set_log_guest_addr(log_addr);
        (m, vring, log)
    }

    fn dirty_pages(log: &File) -> Vec<u64> {
        let mut bytes = [0u8; 64];
        log.read_exact_at(&mut bytes, 0).unwrap();
        (0..512)
            .filter(|page| bytes[*page as usize / 8] & (1 << (page % 8)) != 0)
            .collect()
    }

    #[test]
    fn a_logged_ring_marks_its_used_ring_at_the_log_address() {
        // Beyond guest RAM (1 MiB = page 256) but inside the log: the spec allows it.
        let (m, vring, log) = setup(Some(300 * LOG_PAGE_SIZE));
        mark_used_rings(std::slice::from_ref(&vring), m.dirty_log());
        // 4 + 16 * 8 + 2 bytes: one page.
        assert_eq!(dirty_pages(&log), vec![300]);
    }

    #[test]
    fn a_ring_without_the_log_flag_marks_nothing() {
        let (m, vring, log) = setup(None);
        mark_used_rings(std::slice::from_ref(&vring), m.dirty_log());
        assert!(dirty_pages(&log).is_empty());
    }

    #[test]
    fn nothing_is_marked_while_logging_is_off() {
        let (m, vring, log) = setup(Some(0x3000));
        m.set_logging(false).unwrap();
        mark_used_rings(std::slice::from_ref(&vring), m.dirty_log());
        assert!(dirty_pages(&log).is_empty());
    }

    #[test]
    fn a_new_bit_signals_the_log_eventfd_once() {
        let (mut m, vring, _log) = setup(Some(0x3000));
        let notify = eventfd();
        m.set_log_fd(Some(notify.try_clone().unwrap()));
        mark_used_rings(std::slice::from_ref(&vring), m.dirty_log());
        mark_used_rings(std::slice::from_ref(&vring), m.dirty_log());
        let mut counter = [0u8; 8];
        (&notify).read_exact(&mut counter).unwrap();
        // The second call set no new bit, so it did not signal again.
        assert_eq!(u64::from_ne_bytes(counter), 1);
    }

    #[test]
    fn a_ring_past_the_log_is_an_error_not_a_partial_mark() {
        let (m, vring, log) = setup(Some(511 * LOG_PAGE_SIZE + 0xff0));
        assert!(matches!(
            mark_used_ring(&vring, m.dirty_log()),
            Err(MemError::OutsideLog { .. })
        ));
        assert!(dirty_pages(&log).is_empty());
    }
}
