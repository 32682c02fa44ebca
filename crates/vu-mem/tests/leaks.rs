//! No fd or mapping outlives the regions and logs that use it.
//!
//! A test binary of its own, because counting `/proc/self/fd` and `/proc/self/maps` is only
//! meaningful while no other test opens or maps anything; the tests here also take a lock.

use std::fs::{self, File};
use std::sync::{Mutex, PoisonError};

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vu_mem::{GuestMemoryManager, RegionSpec};

static SERIAL: Mutex<()> = Mutex::new(());

const MIB: u64 = 1 << 20;

fn memfd(size: u64) -> File {
    // A memfd of `size` zero bytes: `SharedMemory`'s (its mapping here is dropped at once).
    let shared = vu_mem::SharedMemory::new(GuestAddress(0), size).expect("memfd");
    shared.file().try_clone().expect("dup")
}

fn region(gpa: u64, size: u64, vmm: u64) -> RegionSpec {
    RegionSpec::new(gpa, size, vmm, 0, memfd(size))
}

/// (open fds, mapping lines) of this process that refer to this binary's memfds (all made by
/// `SharedMemory`, named `vu-shared-memory`).
///
/// Only those: test threads come and go with their stacks, which would make a count of all
/// mappings flaky.
fn counts() -> (usize, usize) {
    let ours = |s: &str| s.contains("memfd:vu-shared-memory");
    let fds = fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|target| ours(&target.to_string_lossy()))
        .count();
    let maps = fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| ours(line))
        .count();
    (fds, maps)
}

fn manager() -> GuestMemoryManager {
    GuestMemoryManager::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()))
}

#[test]
fn replaced_table_leaves_no_fd_or_mapping() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut m = manager();
    let before = counts();
    for round in 0..4u64 {
        let table = (0..8)
            .map(|i| region(i * MIB, MIB, (round * 8 + i + 1) * 0x1000_0000))
            .collect();
        m.set_table(table).unwrap();
        m.memory()
            .memory()
            .write_obj(round, GuestAddress(0))
            .unwrap();
    }
    m.set_table(Vec::new()).unwrap();
    assert_eq!(counts(), before);
}

#[test]
fn removed_regions_leave_no_fd_or_mapping() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut m = manager();
    let before = counts();
    for i in 0..8 {
        m.add_region(region(i * MIB, MIB, (i + 1) * 0x1000_0000))
            .unwrap();
    }
    for i in 0..8 {
        m.remove_region(i * MIB, MIB, (i + 1) * 0x1000_0000)
            .unwrap();
    }
    assert_eq!(counts(), before);
}

#[test]
fn a_region_stays_mapped_while_an_old_snapshot_holds_it() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut m = manager();
    let before = counts();
    m.add_region(region(0, MIB, 0x1000_0000)).unwrap();
    let snapshot = m.memory().memory();
    m.remove_region(0, MIB, 0x1000_0000).unwrap();
    snapshot.write_obj(1u32, GuestAddress(0x10)).unwrap();
    assert_eq!(counts(), (before.0 + 1, before.1 + 1));
    drop(snapshot);
    assert_eq!(counts(), before);
}

#[test]
fn replaced_and_cleared_logs_leave_no_fd_or_mapping() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut m = manager();
    let before = counts();
    m.set_table(vec![region(0, MIB, 0x1000_0000)]).unwrap();
    for _ in 0..4 {
        // The log fd is only borrowed: it closes here, the mapping stays until replaced.
        m.set_log_base(memfd(4096), 4096, 0).unwrap();
    }
    m.set_logging(true).unwrap();
    m.memory().memory().write_obj(1u8, GuestAddress(0)).unwrap();
    m.clear_log();
    m.set_log_fd(Some(memfd(8)));
    m.reset();
    assert_eq!(counts(), before);
}
