//! virtio-queue's used-ring writes through a manager's guest memory are logged.
//!
//! The device never calls the log: `Queue::add_used` writes the used element and index
//! through `GuestMemory`, and the regions' `LogBitmap` sets the bits.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vu_mem::{GuestMemoryManager, RegionSpec, LOG_PAGE_SIZE};

const MIB: u64 = 1 << 20;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x2_0000;
const USED: u64 = 0x3_0000;

fn memfd(size: u64) -> File {
    // A memfd of `size` zero bytes: `SharedMemory`'s (its mapping here is dropped at once).
    let shared = vu_mem::SharedMemory::new(GuestAddress(0), size).expect("memfd");
    shared.file().try_clone().expect("dup")
}

/// One 1 MiB region at guest 0, VMM 0x7f00_0000_0000.
fn manager() -> GuestMemoryManager {
    let mut m = GuestMemoryManager::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()));
    let region = RegionSpec::new(0, MIB, 0x7f00_0000_0000, 0, memfd(MIB));
    m.set_table(vec![region]).unwrap();
    m
}

fn queue() -> Queue {
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q
}

fn log_byte(log: &File, page: u64) -> u8 {
    let mut b = [0u8];
    log.read_exact_at(&mut b, page / 8).unwrap();
    b[0]
}

#[test]
fn add_used_sets_the_used_ring_page_bit() {
    let mut m = manager();
    let log = memfd(64);
    m.set_log_base(&log, 64, 0).unwrap();
    m.set_logging(true).unwrap();
    let mut q = queue();
    q.add_used(&*m.memory().memory(), 0, 512).unwrap();
    let page = USED / LOG_PAGE_SIZE;
    assert_eq!(log_byte(&log, page), 1 << (page % 8));
    assert!(m.notify_log_changed().is_ok());
}

#[test]
fn add_used_with_logging_off_sets_no_bit() {
    let mut m = manager();
    let log = memfd(64);
    m.set_log_base(&log, 64, 0).unwrap();
    let mut q = queue();
    q.add_used(&*m.memory().memory(), 0, 512).unwrap();
    assert_eq!(log_byte(&log, USED / LOG_PAGE_SIZE), 0);
}

#[test]
fn used_ring_translated_from_its_vmm_address_is_the_ring_the_queue_writes() {
    let m = manager();
    // A 16-entry split used ring: 4 bytes of header, 8 per element, 2 of avail_event.
    let len = 4 + 8 * 16 + 2;
    assert_eq!(
        m.vmm_to_guest(0x7f00_0000_0000 + USED, len).unwrap(),
        GuestAddress(USED)
    );
}
