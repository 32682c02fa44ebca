//! Inflight I/O tracking through the vring: recording, completion, a crash injected after
//! every store of the protocol, and the restart that follows.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::inflight::{area_size, crash, InflightArea};
use crate::testutil::memfd;
use crate::{Completion, VringData, VringMutex, VringT};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFERS: u64 = 0x8000;

/// Guest memory, an inflight area over a memfd, and the driver's view of one ring.
struct Guest {
    mem: Mem,
    area_file: std::fs::File,
    avail_idx: u16,
}

impl Guest {
    fn new() -> Self {
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        Guest {
            mem: GuestMemoryAtomic::new(mmap),
            area_file: memfd(area_size(1, SIZE, false)),
            avail_idx: 0,
        }
    }

    /// The area as a new backend process maps it.
    fn area(&self) -> InflightArea {
        let file = self.area_file.try_clone().unwrap();
        InflightArea::map(file, 0, area_size(1, SIZE, false), 1, SIZE).unwrap()
    }

    /// Offers one-descriptor chains with the given heads.
    fn offer(&mut self, heads: &[u16]) {
        let m = self.mem.memory();
        for &head in heads {
            let desc = virtio_queue::desc::split::Descriptor::new(
                BUFFERS + 0x100 * u64::from(head),
                0x100,
                2,
                0,
            );
            m.write_obj(desc, GuestAddress(DESC + 16 * u64::from(head)))
                .unwrap();
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE);
            m.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        m.store(
            self.avail_idx.to_le(),
            GuestAddress(AVAIL + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.memory().read_obj(GuestAddress(USED + 2)).unwrap())
    }

    /// The heads of the used ring's entries `0..used_idx` (no wrap in these tests).
    fn used_heads(&self) -> Vec<u16> {
        let m = self.mem.memory();
        (0..u64::from(self.used_idx()))
            .map(|i| {
                let id: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
                u16::try_from(u32::from_le(id)).unwrap()
            })
            .collect()
    }

    /// A backend's vring, configured as after a (re)connection: size, addresses, the next
    /// available index the frontend sends (`base`), started with the inflight region when
    /// `tracked`.
    fn vring(&self, base: u16, tracked: bool, resubmit: bool) -> VringMutex<Mem> {
        let vring = VringMutex::<Mem>::new(self.mem.clone(), 256).unwrap();
        vring.set_queue_size(SIZE).unwrap();
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_next_avail(base);
        let region = tracked.then(|| self.area().queue(0).unwrap());
        vring.get_mut().restart(region, resubmit).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }
}

/// Serves everything `vring` has through `serve_available`, returning the heads served.
fn serve_all(vring: &VringMutex<Mem>) -> Vec<u16> {
    let (served, result) = serve_all_result(vring);
    result.unwrap();
    served
}

/// [`serve_all`] for a process past an injected crash: its stores are dropped, so what it
/// read back from its own writes (the ring's indices after a restart) can be anything, and
/// what its calls return does not matter, only what reached memory before the crash.
fn serve_all_crashed(vring: &VringMutex<Mem>) {
    let _ = serve_all_result(vring);
}

fn serve_all_result(vring: &VringMutex<Mem>) -> (Vec<u16>, Result<usize, crate::Error>) {
    let mut served = Vec::new();
    let mut data = vring.get_mut();
    let snapshot = data.mem().memory();
    let result = data.serve_available(&snapshot, |chain| {
        served.push(chain.head_index());
        0
    });
    (served, result)
}

fn pop(vring: &VringMutex<Mem>) -> u16 {
    vring.pop_descriptor_chain().unwrap().head_index()
}

/// The backend's life before the crash: out-of-order completions through the pop/add_used
/// API and a pass of `serve_available`, leaving head 1 in flight.
fn workload(guest: &mut Guest, vring: &VringMutex<Mem>) {
    guest.offer(&[0, 1, 2, 3]);
    let popped: Vec<u16> = (0..4).map(|_| pop(vring)).collect();
    assert_eq!(popped, vec![0, 1, 2, 3]);
    vring.add_used_batch([(2, 0), (0, 0)]).unwrap();
    guest.offer(&[4, 5]);
    assert_eq!(serve_all(vring), vec![4, 5]);
    vring.add_used(3, 0).unwrap();
}

#[test]
fn without_a_crash_only_the_chain_left_in_flight_is_resubmitted() {
    let mut guest = Guest::new();
    let vring = guest.vring(0, true, true);
    workload(&mut guest, &vring);
    assert_eq!(guest.used_heads(), vec![2, 0, 4, 5, 3]);
    drop(vring);
    // QEMU restarts from the used index when the backend died.
    let again = guest.vring(guest.used_idx(), true, true);
    assert_eq!(again.get_ref().resubmit_pending(), 1);
    assert_eq!(again.queue_next_avail(), 6);
    assert_eq!(serve_all(&again), vec![1]);
    assert_eq!(guest.used_heads(), vec![2, 0, 4, 5, 3, 1]);
}

#[test]
fn a_crash_after_any_store_resubmits_exactly_the_unfinished_chains() {
    // Count the stores of the whole workload once, then crash after each of them.
    let stores = {
        let mut guest = Guest::new();
        let vring = guest.vring(0, true, true);
        crash::arm(None);
        workload(&mut guest, &vring);
        crash::asked()
    };
    assert!(stores > 20, "{stores} stores");
    for budget in 0..=stores {
        let mut guest = Guest::new();
        let vring = guest.vring(0, true, true);
        crash::arm(Some(budget));
        workload(&mut guest, &vring);
        crash::arm(None);
        drop(vring);
        let completed = guest.used_heads();
        let again = guest.vring(guest.used_idx(), true, true);
        let served = serve_all(&again);
        let all: BTreeSet<u16> = (0..6).collect();
        let unfinished: BTreeSet<u16> = all
            .difference(&completed.iter().copied().collect())
            .copied()
            .collect();
        let served_set: BTreeSet<u16> = served.iter().copied().collect();
        assert_eq!(served_set, unfinished, "crash after store {budget}");
        assert_eq!(served.len(), unfinished.len(), "crash after store {budget}");
        // Every chain the driver offered is now in the used ring exactly once.
        let mut used = guest.used_heads();
        used.sort_unstable();
        assert_eq!(
            used,
            (0..6).collect::<Vec<_>>(),
            "crash after store {budget}"
        );
    }
}

#[test]
fn a_second_crash_during_the_restart_or_the_resubmission_is_survived_too() {
    let stores = {
        let mut guest = Guest::new();
        let vring = guest.vring(0, true, true);
        crash::arm(None);
        workload(&mut guest, &vring);
        crash::asked()
    };
    for first in 0..=stores {
        // How many stores the restart (reconcile included) and its pass make after this
        // first crash.
        let second_stores = {
            let mut guest = Guest::new();
            let vring = guest.vring(0, true, true);
            crash::arm(Some(first));
            workload(&mut guest, &vring);
            drop(vring);
            crash::arm(None);
            let again = guest.vring(guest.used_idx(), true, true);
            serve_all(&again);
            crash::asked()
        };
        for second in 0..=second_stores {
            let mut guest = Guest::new();
            let vring = guest.vring(0, true, true);
            crash::arm(Some(first));
            workload(&mut guest, &vring);
            drop(vring);
            // The restart and its pass, killed after `second` stores.
            crash::arm(Some(second));
            let again = guest.vring(guest.used_idx(), true, true);
            serve_all_crashed(&again);
            drop(again);
            crash::arm(None);
            let last = guest.vring(guest.used_idx(), true, true);
            serve_all(&last);
            let mut used = guest.used_heads();
            used.sort_unstable();
            assert_eq!(
                used,
                (0..6).collect::<Vec<_>>(),
                "crashes after stores {first} and {second}"
            );
        }
    }
}

#[test]
fn resubmitted_chains_come_oldest_first_and_before_new_ones() {
    let mut guest = Guest::new();
    let vring = guest.vring(0, true, true);
    guest.offer(&[7, 3, 9]);
    for _ in 0..3 {
        pop(&vring);
    }
    vring.add_used(3, 0).unwrap();
    drop(vring);
    guest.offer(&[1]);
    let again = guest.vring(guest.used_idx(), true, true);
    assert_eq!(serve_all(&again), vec![7, 9, 1]);
}

#[test]
fn a_device_that_opts_out_returns_the_chains_unserved() {
    let mut guest = Guest::new();
    let vring = guest.vring(0, true, true);
    guest.offer(&[4, 5]);
    pop(&vring);
    pop(&vring);
    drop(vring);
    let again = guest.vring(guest.used_idx(), true, false);
    assert!(serve_all(&again).is_empty());
    assert_eq!(guest.used_heads(), vec![4, 5]);
    let len: u32 = guest.mem.memory().read_obj(GuestAddress(USED + 8)).unwrap();
    assert_eq!(len, 0);
}

#[test]
fn process_queue_resubmits_through_the_same_path() {
    let mut guest = Guest::new();
    let vring = guest.vring(0, true, true);
    guest.offer(&[2, 6]);
    pop(&vring);
    pop(&vring);
    drop(vring);
    let again = guest.vring(guest.used_idx(), true, true);
    assert_eq!(again.get_ref().pending_chains().unwrap(), 2);
    let mut served = Vec::new();
    crate::process_queue(&again, |chain| {
        served.push(chain.head_index());
        assert!(chain.descriptor_chain().is_none());
        chain.map(|d| d.len()).sum()
    });
    assert_eq!(served, vec![2, 6]);
    assert_eq!(again.get_ref().pending_chains().unwrap(), 0);
}

#[test]
fn without_tracking_a_used_index_ahead_of_the_base_is_the_restart_point() {
    // The frontend read the used index before the device's last completion landed, and
    // sends a base one behind it: serving slot 0 again would complete head 0 twice.
    let mut guest = Guest::new();
    let vring = guest.vring(0, false, true);
    guest.offer(&[0]);
    serve_all(&vring);
    drop(vring);
    guest.offer(&[1]);
    let again = guest.vring(0, false, true);
    assert_eq!(again.queue_next_avail(), 1);
    assert_eq!(serve_all(&again), vec![1]);
    assert_eq!(guest.used_heads(), vec![0, 1]);
}

#[test]
fn without_tracking_a_base_ahead_of_the_used_index_is_kept() {
    // GET_VRING_BASE succeeded: the frontend's index is the truth.
    let mut guest = Guest::new();
    guest.offer(&[0, 1]);
    let vring = guest.vring(2, false, true);
    assert_eq!(vring.queue_next_avail(), 2);
    assert_eq!(vring.queue_next_used(), 0);
}

#[test]
fn a_region_for_another_ring_size_is_refused() {
    let guest = Guest::new();
    let vring = VringMutex::<Mem>::new(guest.mem.clone(), 256).unwrap();
    vring.set_queue_size(SIZE * 2).unwrap();
    vring.set_queue_info(DESC, AVAIL, USED).unwrap();
    let region = guest.area().queue(0).unwrap();
    let err = vring.get_mut().restart(Some(region), true).unwrap_err();
    assert!(matches!(
        err,
        crate::Error::Inflight(crate::InflightError::RingSize { .. })
    ));
    assert!(!vring.get_ref().inflight_tracking());
}

#[test]
fn reset_ends_tracking() {
    let guest = Guest::new();
    let vring = guest.vring(0, true, true);
    assert!(vring.get_ref().inflight_tracking());
    vring.reset();
    assert!(!vring.get_ref().inflight_tracking());
}

/// `VringData` is what every vring dereferences to; the tracked paths are the same for all.
#[test]
fn vring_data_is_the_owner() {
    fn tracked(data: &VringData<Mem>) -> bool {
        data.inflight_tracking()
    }
    let guest = Guest::new();
    assert!(tracked(&guest.vring(0, true, true).get_ref()));
}

/// Serves everything `vring` has through `serve_available_async`, taking for later every
/// chain but those in `now`; returns the heads handed out.
fn serve_deferring(vring: &VringMutex<Mem>, now: &[u16]) -> Vec<u16> {
    let mut served = Vec::new();
    let mut data = vring.get_mut();
    let snapshot = data.mem().memory();
    data.serve_available_async(&snapshot, |chain| {
        let head = chain.head_index();
        served.push(head);
        if now.contains(&head) {
            Completion::Now(0)
        } else {
            Completion::Later
        }
    })
    .unwrap();
    served
}

/// A device completing out of order: 0..6 offered, 2 completed at once, the others taken for
/// later; then 4 and 0 completed, 5 later still, leaving 1 and 3 in flight.
fn deferred_workload(guest: &mut Guest, vring: &VringMutex<Mem>) {
    guest.offer(&[0, 1, 2, 3, 4, 5]);
    assert_eq!(serve_deferring(vring, &[2]), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(vring.get_ref().deferred(), 5);
    vring.get_mut().complete_deferred([(4, 0), (0, 0)]).unwrap();
    vring.get_mut().complete_deferred([(5, 0)]).unwrap();
    assert_eq!(vring.get_ref().deferred(), 2);
}

#[test]
fn chains_taken_for_later_complete_out_of_order_and_only_the_rest_is_resubmitted() {
    let mut guest = Guest::new();
    let vring = guest.vring(0, true, true);
    deferred_workload(&mut guest, &vring);
    assert_eq!(guest.used_heads(), vec![2, 4, 0, 5]);
    drop(vring);
    let again = guest.vring(guest.used_idx(), true, true);
    assert_eq!(again.get_ref().resubmit_pending(), 2);
    assert_eq!(again.queue_next_avail(), 6);
    // Served again oldest first, and taken for later once more: still tracked.
    assert_eq!(serve_deferring(&again, &[]), vec![1, 3]);
    assert_eq!(again.get_ref().deferred(), 2);
    again.get_mut().complete_deferred([(3, 0)]).unwrap();
    drop(again);
    let third = guest.vring(guest.used_idx(), true, true);
    assert_eq!(serve_all(&third), vec![1]);
    assert_eq!(guest.used_heads(), vec![2, 4, 0, 5, 3, 1]);
}

#[test]
fn a_crash_after_any_store_of_out_of_order_completions_resubmits_exactly_the_rest() {
    let stores = {
        let mut guest = Guest::new();
        let vring = guest.vring(0, true, true);
        crash::arm(None);
        deferred_workload(&mut guest, &vring);
        crash::asked()
    };
    assert!(stores > 15, "{stores} stores");
    for budget in 0..=stores {
        let mut guest = Guest::new();
        let vring = guest.vring(0, true, true);
        crash::arm(Some(budget));
        // Past the budget the stores are not made: the process is "dead", the calls return.
        guest.offer(&[0, 1, 2, 3, 4, 5]);
        serve_deferring(&vring, &[2]);
        let _ = vring.get_mut().complete_deferred([(4, 0), (0, 0)]);
        let _ = vring.get_mut().complete_deferred([(5, 0)]);
        crash::arm(None);
        drop(vring);
        let completed: BTreeSet<u16> = guest.used_heads().into_iter().collect();
        let again = guest.vring(guest.used_idx(), true, true);
        let served: Vec<u16> = serve_all(&again);
        let unfinished: Vec<u16> = (0..6).filter(|h| !completed.contains(h)).collect();
        let mut served_sorted = served.clone();
        served_sorted.sort_unstable();
        assert_eq!(served_sorted, unfinished, "crash after store {budget}");
        let mut used = guest.used_heads();
        used.sort_unstable();
        assert_eq!(
            used,
            (0..6).collect::<Vec<_>>(),
            "crash after store {budget}"
        );
    }
}

#[test]
fn process_queue_async_counts_chains_taken_for_later_and_keeps_serving() {
    let mut guest = Guest::new();
    let vring = guest.vring(0, true, true);
    guest.offer(&[0, 1, 2]);
    let mut taken = Vec::new();
    let handed = crate::process_queue_async(&vring, |chain| {
        taken.push(chain.head_index());
        Completion::Later
    });
    assert_eq!(handed, 3);
    guest.offer(&[3, 4]);
    let handed = crate::process_queue_async(&vring, |chain| {
        taken.push(chain.head_index());
        Completion::Later
    });
    assert_eq!(handed, 2);
    assert_eq!(guest.used_idx(), 0);
    let done = taken.iter().rev().map(|&head| (head, 0));
    assert_eq!(vring.get_mut().complete_deferred(done).unwrap(), 5);
    assert_eq!(vring.get_ref().deferred(), 0);
    assert_eq!(guest.used_heads(), vec![4, 3, 2, 1, 0]);
}
