//! Dirty-page logging for live migration.
//!
//! The spec (vhost-user.rst, "Migration") describes the log as one bit per
//! `VHOST_LOG_PAGE` (0x1000) bytes of guest physical memory, "from address 0 to the maximum of
//! guest regions", set with atomic operations "as the log may be concurrently manipulated":
//!
//! ```text
//! page = addr / VHOST_LOG_PAGE
//! log[page / 8] |= 1 << page % 8
//! ```
//!
//! [`DirtyLog`] is the shared state every region's [`LogBitmap`] points at: the LOG_ALL switch,
//! the current log mapping (replaced by each `SET_LOG_BASE`), and the `SET_LOG_FD` eventfd.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::GuestAddress;

use crate::error::MemError;
use crate::sys::SharedBytes;

/// Bytes of guest memory covered by one bit of the log (`VHOST_LOG_PAGE` in the spec).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// Guest pages covered by one byte of the log.
const PAGES_PER_LOG_BYTE: u64 = 8;

/// The log size in bytes that covers guest addresses `0..end`: one bit per started 4 KiB page.
pub fn log_size_for(end: u64) -> u64 {
    end.div_ceil(LOG_PAGE_SIZE).div_ceil(PAGES_PER_LOG_BYTE)
}

fn page_size() -> u64 {
    crate::sys::page_size().unwrap_or(LOG_PAGE_SIZE)
}

/// One mapping of the frontend's log fd.
struct LogArea {
    /// The mapping, from the log offset rounded down to a page.
    bytes: SharedBytes,
    /// Offset of the log's first byte inside the mapping.
    delta: usize,
    /// Length of the log in bytes, as the frontend sent it.
    len: u64,
}

impl LogArea {
    /// Maps `size` bytes of `fd` from `offset`, MAP_SHARED, read-write.
    fn map(fd: impl AsFd, size: u64, offset: u64) -> Result<Self, MemError> {
        if size == 0 {
            return Err(MemError::EmptyLog);
        }
        let overflow = MemError::LogOverflow { size, offset };
        let end = offset.checked_add(size).ok_or(overflow)?;
        crate::region::check_file_covers(fd.as_fd(), offset, size)?;
        // mmap wants a page-aligned file offset; the spec does not promise one, so map from the
        // page below and step over the difference.
        let aligned = offset & !(page_size() - 1);
        let map_len =
            usize::try_from(end - aligned).map_err(|_| MemError::LogOverflow { size, offset })?;
        let file_offset =
            libc::off_t::try_from(aligned).map_err(|_| MemError::LogOverflow { size, offset })?;
        let delta = usize::try_from(offset - aligned)
            .map_err(|_| MemError::LogOverflow { size, offset })?;
        let bytes = SharedBytes::map(fd, file_offset, map_len).map_err(MemError::LogMmap)?;
        Ok(LogArea {
            bytes,
            delta,
            len: size,
        })
    }

    /// The log byte at `index`; `None` past the end of the log.
    fn cell(&self, index: u64) -> Option<&AtomicU8> {
        if index >= self.len {
            return None;
        }
        // `delta + len` is the mapping's length, which fits in usize.
        self.bytes.byte(self.delta + index as usize)
    }

    /// Sets the bits of pages `first..=last`, clipped to the log; true if any bit was clear.
    fn mark_pages(&self, first: u64, last: u64) -> bool {
        let first_byte = first / PAGES_PER_LOG_BYTE;
        let last_byte = last / PAGES_PER_LOG_BYTE;
        let mut changed = false;
        for index in first_byte..=last_byte.min(self.len.saturating_sub(1)) {
            let lo = if index == first_byte { first % 8 } else { 0 };
            let hi = if index == last_byte { last % 8 } else { 7 };
            let mask = (((1u16 << (hi - lo + 1)) - 1) << lo) as u8;
            // Release: the guest-memory writes this bit reports happened before it, so a
            // frontend that sees the bit and copies the page sees the data too. The bit is set
            // even when it looks set already: the frontend may be clearing it right now.
            if let Some(cell) = self.cell(index) {
                let old = cell.fetch_or(mask, Ordering::Release);
                changed |= old & mask != mask;
            }
        }
        changed
    }

    fn page_dirty(&self, page: u64) -> bool {
        let index = page / PAGES_PER_LOG_BYTE;
        self.cell(index)
            .is_some_and(|cell| cell.load(Ordering::Acquire) & (1 << (page % 8)) != 0)
    }
}

struct LogState {
    /// The LOG_ALL switch: bits are set only while it is on.
    active: AtomicBool,
    /// The current log; replaced or dropped under the write lock so no marker uses a stale one.
    area: RwLock<Option<LogArea>>,
    /// A bit went from 0 to 1 since the last `notify_changed`.
    changed: AtomicBool,
    /// The eventfd from `SET_LOG_FD`.
    notify: Mutex<Option<File>>,
}

/// A handle to the dirty log that regions, rings and the daemon share.
///
/// Cheap to clone (an `Arc`). All methods take `&self` and may be called from any thread.
#[derive(Clone)]
pub struct DirtyLog {
    state: Arc<LogState>,
}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("logging", &self.is_logging())
            .field("log_size", &self.log_size())
            .finish()
    }
}

impl Default for DirtyLog {
    fn default() -> Self {
        Self::new()
    }
}

impl DirtyLog {
    /// A log with no mapping and logging off.
    pub fn new() -> Self {
        DirtyLog {
            state: Arc::new(LogState {
                active: AtomicBool::new(false),
                area: RwLock::new(None),
                changed: AtomicBool::new(false),
                notify: Mutex::new(None),
            }),
        }
    }

    /// Turns logging on or off (the manager checks the log covers the table first).
    pub(crate) fn set_logging(&self, on: bool) {
        self.state.active.store(on, Ordering::Release);
    }

    /// Whether logging is on.
    pub fn is_logging(&self) -> bool {
        self.state.active.load(Ordering::Acquire)
    }

    /// The size in bytes of the current log, if one is mapped.
    pub fn log_size(&self) -> Option<u64> {
        self.read_area().as_ref().map(|area| area.len)
    }

    /// Marks the pages of guest range `gpa..gpa+len` dirty, if logging is on and a log is set.
    ///
    /// For writes that bypass guest memory, and for used-ring writes of a ring whose
    /// `VHOST_VRING_F_LOG` flag is set (pass the ring's `log_guest_addr` plus the offset of
    /// the write). The spec lets `log_guest_addr` lie outside guest RAM but not outside the
    /// log, so a range reaching past the log is refused whole with [`MemError::OutsideLog`].
    pub fn mark_dirty(&self, gpa: GuestAddress, len: u64) -> Result<(), MemError> {
        if len == 0 || !self.state.active.load(Ordering::Relaxed) {
            return Ok(());
        }
        let outside = MemError::OutsideLog { addr: gpa.0, len };
        let last = gpa.0.checked_add(len - 1).ok_or(outside)?;
        let area = self.read_area();
        let Some(area) = area.as_ref() else {
            return Ok(());
        };
        if last / LOG_PAGE_SIZE / PAGES_PER_LOG_BYTE >= area.len {
            return Err(MemError::OutsideLog { addr: gpa.0, len });
        }
        self.note_change(area.mark_pages(gpa.0 / LOG_PAGE_SIZE, last / LOG_PAGE_SIZE));
        Ok(())
    }

    /// Whether the log bit of the page holding `gpa` is set (false without a log).
    pub fn is_dirty(&self, gpa: GuestAddress) -> bool {
        self.read_area()
            .as_ref()
            .is_some_and(|area| area.page_dirty(gpa.0 / LOG_PAGE_SIZE))
    }

    /// Signals the `SET_LOG_FD` eventfd if a log bit was set since the last call.
    ///
    /// The spec: the eventfd "may be used to inform the front-end that the log has been
    /// modified". Signalling on every bit would cost a syscall per write, so the daemon calls
    /// this once per batch (after publishing used entries). Returns whether it signalled.
    pub fn notify_changed(&self) -> Result<bool, MemError> {
        if !self.state.changed.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let notify = self
            .state
            .notify
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(mut fd) = notify.as_ref() else {
            return Ok(false);
        };
        match fd.write(&1u64.to_ne_bytes()) {
            Ok(_) => Ok(true),
            // A full counter is already a pending signal.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(MemError::LogFd(e)),
        }
    }

    /// Bitmap path: marks `gpa..gpa+len`, clipped to the log; never fails.
    fn mark_clipped(&self, gpa: u64, len: usize) {
        let Some(last) = gpa.checked_add(len as u64 - 1) else {
            return;
        };
        if let Some(area) = self.read_area().as_ref() {
            self.note_change(area.mark_pages(gpa / LOG_PAGE_SIZE, last / LOG_PAGE_SIZE));
        }
    }

    fn note_change(&self, changed: bool) {
        // Load first so that writers hitting already-dirty pages do not bounce the line.
        if changed && !self.state.changed.load(Ordering::Relaxed) {
            self.state.changed.store(true, Ordering::Release);
        }
    }

    fn read_area(&self) -> std::sync::RwLockReadGuard<'_, Option<LogArea>> {
        self.state
            .area
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps a new log and makes it current; the old one is unmapped after no marker uses it.
    pub(crate) fn map_log(&self, fd: impl AsFd, size: u64, offset: u64) -> Result<(), MemError> {
        let area = LogArea::map(fd, size, offset)?;
        self.replace_area(Some(area));
        Ok(())
    }

    /// Drops the current log (and unmaps it).
    pub(crate) fn clear_log(&self) {
        self.replace_area(None);
    }

    fn replace_area(&self, area: Option<LogArea>) {
        let mut guard = self
            .state
            .area
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let old = std::mem::replace(&mut *guard, area);
        drop(guard);
        drop(old);
    }

    /// Stores (or, with `None`, drops) the `SET_LOG_FD` eventfd.
    pub(crate) fn set_notify_fd(&self, fd: Option<File>) {
        let old = std::mem::replace(
            &mut *self
                .state
                .notify
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            fd,
        );
        drop(old);
    }
}

/// A region bitmap that the manager can point at the shared dirty log.
///
/// The manager calls [`bind`](RegionBitmap::bind) once for every region it maps, before the
/// region becomes visible, with the region's guest base address. vm-memory creates bitmaps
/// through [`NewBitmap::with_len`], which knows nothing of addresses or logs, hence this
/// second step. Implemented by [`LogBitmap`] (logging) and `()` (no logging); a device that
/// wants its own tracking as well can implement it and forward to [`DirtyLog::mark_dirty`].
pub trait RegionBitmap: NewBitmap + Send + Sync + 'static {
    /// Whether writes through guest memory with this bitmap set bits in the dirty log once
    /// it is bound.
    ///
    /// The daemon offers live migration (`VHOST_F_LOG_ALL`, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`)
    /// only for a bitmap that does: with one that does not, every page the device wrote during
    /// the migration would be stale on the destination, and nothing would fail until the
    /// guest read it. There is no default, so a new bitmap type has to say.
    const LOGS_WRITES: bool;

    /// Points this bitmap, belonging to the region at `guest_base`, at `log`.
    fn bind(&self, guest_base: GuestAddress, log: &DirtyLog);
}

/// No tracking: the device does not support live migration.
impl RegionBitmap for () {
    const LOGS_WRITES: bool = false;

    fn bind(&self, _guest_base: GuestAddress, _log: &DirtyLog) {}
}

#[derive(Debug)]
struct Binding {
    guest_base: u64,
    log: DirtyLog,
}

/// The bitmap each guest region carries: it sets bits in the shared migration log.
///
/// Every write device code makes through `GuestMemory` (`write_obj`, `write_slice`, `store`,
/// volatile slices) reaches [`Bitmap::mark_dirty`] with an offset in the region; this adds the
/// region's guest base and sets the log bits. With logging off that costs one atomic load.
#[derive(Debug, Default)]
pub struct LogBitmap {
    binding: OnceLock<Binding>,
}

impl RegionBitmap for LogBitmap {
    const LOGS_WRITES: bool = true;

    fn bind(&self, guest_base: GuestAddress, log: &DirtyLog) {
        // A second bind is ignored: a region never moves and the manager has one log.
        let _ = self.binding.set(Binding {
            guest_base: guest_base.0,
            log: log.clone(),
        });
    }
}

/// A view of a [`LogBitmap`] from an offset in its region (vm-memory's bitmap slice).
#[derive(Clone, Copy, Debug)]
pub struct LogSlice<'a> {
    binding: Option<&'a Binding>,
    offset: usize,
}

#[inline]
fn mark(binding: Option<&Binding>, offset: usize, len: usize) {
    let Some(binding) = binding else {
        return;
    };
    if len == 0 || !binding.log.state.active.load(Ordering::Relaxed) {
        return;
    }
    if let Some(gpa) = binding.guest_base.checked_add(offset as u64) {
        binding.log.mark_clipped(gpa, len);
    }
}

fn dirty_at(binding: Option<&Binding>, offset: usize) -> bool {
    binding.is_some_and(|b| {
        b.guest_base
            .checked_add(offset as u64)
            .is_some_and(|gpa| b.log.is_dirty(GuestAddress(gpa)))
    })
}

impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = LogSlice<'a>;
}

impl Bitmap for LogBitmap {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        mark(self.binding.get(), offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        dirty_at(self.binding.get(), offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> LogSlice<'_> {
        LogSlice {
            binding: self.binding.get(),
            offset,
        }
    }
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl<'a> WithBitmapSlice<'_> for LogSlice<'a> {
    type S = LogSlice<'a>;
}

impl BitmapSlice for LogSlice<'_> {}

impl Bitmap for LogSlice<'_> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        mark(self.binding, self.offset.saturating_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        dirty_at(self.binding, self.offset.saturating_add(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        LogSlice {
            binding: self.binding,
            offset: self.offset.saturating_add(offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{dirty_pages, memfd};

    fn logging(size: u64) -> (DirtyLog, File) {
        let file = memfd(size);
        let log = DirtyLog::new();
        log.map_log(&file, size, 0).unwrap();
        log.set_logging(true);
        (log, file)
    }

    #[test]
    fn log_size_is_one_bit_per_started_page() {
        assert_eq!(log_size_for(0), 0);
        assert_eq!(log_size_for(1), 1);
        assert_eq!(log_size_for(8 * LOG_PAGE_SIZE), 1);
        assert_eq!(log_size_for(8 * LOG_PAGE_SIZE + 1), 2);
        assert_eq!(log_size_for(u64::MAX), 1 << 49);
    }

    #[test]
    fn bits_within_one_byte_set_only_that_run() {
        let (log, file) = logging(4);
        log.mark_dirty(GuestAddress(2 * LOG_PAGE_SIZE), 3 * LOG_PAGE_SIZE)
            .unwrap();
        assert_eq!(dirty_pages(&file, 0, 4), vec![2, 3, 4]);
    }

    #[test]
    fn a_range_over_several_bytes_sets_every_bit_between() {
        let (log, file) = logging(4);
        log.mark_dirty(GuestAddress(6 * LOG_PAGE_SIZE), 20 * LOG_PAGE_SIZE)
            .unwrap();
        assert_eq!(dirty_pages(&file, 0, 4), (6..26).collect::<Vec<_>>());
    }

    #[test]
    fn the_last_page_of_the_log_can_be_marked() {
        let (log, file) = logging(4);
        log.mark_dirty(GuestAddress(31 * LOG_PAGE_SIZE + 5), 1)
            .unwrap();
        assert_eq!(dirty_pages(&file, 0, 4), vec![31]);
        assert!(log.is_dirty(GuestAddress(31 * LOG_PAGE_SIZE)));
    }

    #[test]
    fn bits_the_frontend_set_are_kept() {
        let (log, file) = logging(1);
        std::os::unix::fs::FileExt::write_all_at(&file, &[0b1000_0001], 0).unwrap();
        log.mark_dirty(GuestAddress(LOG_PAGE_SIZE), 1).unwrap();
        assert_eq!(dirty_pages(&file, 0, 1), vec![0, 1, 7]);
    }

    #[test]
    fn an_unbound_bitmap_marks_nothing() {
        let bitmap = LogBitmap::with_len(4096);
        bitmap.mark_dirty(0, 4096);
        assert!(!bitmap.dirty_at(0));
    }

    #[test]
    fn a_bitmap_slice_adds_its_offset_and_the_region_base() {
        let (log, file) = logging(4);
        let bitmap = LogBitmap::with_len(0x10000);
        bitmap.bind(GuestAddress(4 * LOG_PAGE_SIZE), &log);
        let slice = bitmap
            .slice_at(LOG_PAGE_SIZE as usize)
            .slice_at(LOG_PAGE_SIZE as usize);
        slice.mark_dirty(LOG_PAGE_SIZE as usize, 1);
        assert_eq!(dirty_pages(&file, 0, 4), vec![7]);
        assert!(bitmap.dirty_at(3 * LOG_PAGE_SIZE as usize));
        assert!(slice.dirty_at(LOG_PAGE_SIZE as usize));
    }

    #[test]
    fn a_write_with_no_log_mapped_is_a_no_op() {
        let log = DirtyLog::new();
        log.set_logging(true);
        log.mark_dirty(GuestAddress(0), 1).unwrap();
        assert!(!log.is_dirty(GuestAddress(0)));
    }

    #[test]
    fn a_zero_length_mark_is_a_no_op() {
        let (log, file) = logging(1);
        log.mark_dirty(GuestAddress(u64::MAX), 0).unwrap();
        assert!(dirty_pages(&file, 0, 1).is_empty());
    }

    #[test]
    fn cleared_log_stops_marking() {
        let (log, file) = logging(1);
        log.clear_log();
        log.mark_dirty(GuestAddress(0), 1).unwrap();
        assert_eq!(log.log_size(), None);
        assert!(dirty_pages(&file, 0, 1).is_empty());
    }

    #[test]
    fn notify_without_a_log_fd_reports_no_signal() {
        let (log, _file) = logging(1);
        log.mark_dirty(GuestAddress(0), 1).unwrap();
        assert!(!log.notify_changed().unwrap());
    }

    #[test]
    fn log_handles_and_bitmaps_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<DirtyLog>();
        send_sync::<LogBitmap>();
        send_sync::<LogSlice<'static>>();
    }
}
