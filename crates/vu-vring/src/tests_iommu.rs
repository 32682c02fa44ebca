//! Rings behind an IOMMU: ring parts and buffers given as IOVAs, translated through a table
//! that maps IOVA pages to guest pages out of order, with misses, refusals and invalidations.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, Permissions,
};

use crate::iommu::{Iommu, IommuError};
use crate::{Error, RingPart, VringMutex, VringT};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const SIZE: u16 = 16;
const PAGE: u64 = 0x1000;
/// The IOVAs of the descriptor table, available ring and used ring: one page each.
const RING_IOVA: u64 = 0x1_0000_0000;
const DESC_IOVA: u64 = RING_IOVA;
const AVAIL_IOVA: u64 = RING_IOVA + PAGE;
const USED_IOVA: u64 = RING_IOVA + 2 * PAGE;
/// Where they are in guest memory.
const DESC_GPA: u64 = 0x5000;
const AVAIL_GPA: u64 = 0x3000;
const USED_GPA: u64 = 0x8000;
/// Two buffer pages, contiguous in IOVA, in reverse order in guest memory.
const BUF_IOVA: u64 = 0x2_0000_0000;
const BUF_GPA: [u64; 2] = [0x20000, 0x10000];
const MEM_LEN: usize = 0x40000;

const WRITE: u16 = 2;
const NEXT: u16 = 1;
const INDIRECT: u16 = 4;

/// An IOMMU over a list of page mappings; a miss is answered at once (unmapped), or, once
/// [`asking`](Table::asking), asked: `translate_now` reports it, `translate` records the
/// IOVA and waits for a [`map`](Table::map) (at most ten seconds).
#[derive(Debug, Default)]
struct Table {
    maps: Mutex<Vec<(u64, u64, u64, Permissions)>>,
    generation: AtomicU64,
    translations: AtomicUsize,
    asking: AtomicBool,
    /// Asked misses are not answered.
    refusing: AtomicBool,
    /// The IOVAs `translate` asked for, in order.
    asked: Mutex<Vec<u64>>,
    /// Signalled on every map and every ask.
    changed: Condvar,
    /// The generations of the holds not released.
    holds: Mutex<Vec<u64>>,
}

impl Table {
    fn map(&self, iova: u64, gpa: u64, len: u64, perm: Permissions) {
        self.maps.lock().unwrap().push((iova, gpa, len, perm));
        self.changed.notify_all();
    }

    fn asking(&self) {
        self.asking.store(true, Ordering::Relaxed);
    }

    /// Waits until `translate` asked for `iova` (a bounded wait: the test fails after it).
    fn wait_asked(&self, iova: u64) {
        let asked = self.asked.lock().unwrap();
        let (asked, timeout) = self
            .changed
            .wait_timeout_while(asked, Duration::from_secs(10), |a| !a.contains(&iova))
            .unwrap();
        assert!(!timeout.timed_out(), "{iova:#x} never asked: {asked:x?}");
    }

    fn holds(&self) -> Vec<u64> {
        self.holds.lock().unwrap().clone()
    }

    fn invalidate(&self, iova: u64) {
        self.maps.lock().unwrap().retain(|m| m.0 != iova);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn find(&self, iova: u64) -> Option<(u64, u64, u64, Permissions)> {
        let maps = self.maps.lock().unwrap();
        maps.iter()
            .find(|m| m.0 <= iova && iova - m.0 < m.2)
            .copied()
    }
}

impl Iommu for Table {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(GuestAddress, u64), IommuError> {
        self.translations.fetch_add(1, Ordering::Relaxed);
        iova.checked_add(len)
            .ok_or(IommuError::Invalid { iova, len })?;
        let Some((start, gpa, size, perm)) = self.find(iova) else {
            if !self.asking.load(Ordering::Relaxed) {
                return Err(IommuError::Unmapped { iova });
            }
            self.asked.lock().unwrap().push(iova);
            self.changed.notify_all();
            let maps = self.maps.lock().unwrap();
            let wait = match self.refusing.load(Ordering::Relaxed) {
                true => Duration::ZERO,
                false => Duration::from_secs(10),
            };
            let (maps, timeout) = self
                .changed
                .wait_timeout_while(maps, wait, |m| {
                    !m.iter().any(|m| m.0 <= iova && iova - m.0 < m.2)
                })
                .unwrap();
            drop(maps);
            if timeout.timed_out() {
                return Err(IommuError::Unmapped { iova });
            }
            return self.translate(iova, len, access);
        };
        if !perm.allow(access) {
            return Err(IommuError::Denied { iova, access });
        }
        let first = gpa + (iova - start);
        let mut got = len.min(size - (iova - start));
        while got < len {
            match self.find(iova + got) {
                Some((s, g, n, p)) if p.allow(access) && g + (iova + got - s) == first + got => {
                    got += (len - got).min(n - (iova + got - s));
                }
                _ => break,
            }
        }
        Ok((GuestAddress(first), got))
    }

    fn translate_now(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(GuestAddress, u64), IommuError> {
        let missing = self.find(iova).is_none();
        if missing && self.asking.load(Ordering::Relaxed) {
            return Err(IommuError::Miss { iova, access });
        }
        self.translate(iova, len, access)
    }

    fn hold(&self, generation: u64) {
        self.holds.lock().unwrap().push(generation);
    }

    fn release(&self, generation: u64) {
        let mut holds = self.holds.lock().unwrap();
        let at = holds.iter().position(|&g| g == generation).unwrap();
        holds.swap_remove(at);
    }
}

/// What the device saw of one chain: `(guest address, length, writable)` per descriptor.
type Seen = Vec<(u64, u32, bool)>;

/// Guest memory, the IOMMU, a split ring behind it, and the driver's available index.
struct Guest {
    mem: Mem,
    iommu: Arc<Table>,
    vring: VringMutex<Mem>,
    avail_idx: u16,
}

impl Guest {
    /// The ring's three pages and both buffer pages mapped read-write.
    fn new() -> Self {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap(),
        );
        let iommu = Arc::new(Table::default());
        let rw = Permissions::ReadWrite;
        iommu.map(DESC_IOVA, DESC_GPA, PAGE, Permissions::Read);
        iommu.map(AVAIL_IOVA, AVAIL_GPA, PAGE, Permissions::Read);
        iommu.map(USED_IOVA, USED_GPA, PAGE, rw);
        iommu.map(BUF_IOVA, BUF_GPA[0], PAGE, rw);
        iommu.map(BUF_IOVA + PAGE, BUF_GPA[1], PAGE, rw);
        let vring = VringMutex::<Mem>::new(mem.clone(), SIZE).unwrap();
        vring.set_iommu(Some(iommu.clone() as Arc<dyn Iommu>));
        vring.set_queue_size(SIZE).unwrap();
        vring
            .set_queue_info(DESC_IOVA, AVAIL_IOVA, USED_IOVA)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Guest {
            mem,
            iommu,
            vring,
            avail_idx: 0,
        }
    }

    /// Writes descriptor `index` of the table at guest address `table`.
    fn desc(&self, table: u64, index: u16, desc: (u64, u32, u16, u16)) {
        let (addr, len, flags, next) = desc;
        let at = GuestAddress(table + 16 * u64::from(index));
        let m = self.mem.memory();
        m.write_obj(Descriptor::new(addr, len, flags, next), at)
            .unwrap();
    }

    /// Makes the chain at `head` available.
    fn offer(&mut self, head: u16) {
        let m = self.mem.memory();
        let slot = AVAIL_GPA + 4 + 2 * u64::from(self.avail_idx % SIZE);
        m.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_GPA + 2))
            .unwrap();
    }

    /// Serves every available chain, recording what the device saw of each: `(guest
    /// address, length, writable)` per descriptor; each chain reports 1 byte written.
    fn serve(&self) -> Result<Vec<Seen>, Error> {
        Ok(self
            .serve_walks()?
            .into_iter()
            .map(|(seen, _)| seen)
            .collect())
    }

    /// [`serve`](Self::serve), with whether each chain's walk was cut short.
    fn serve_walks(&self) -> Result<Vec<(Seen, bool)>, Error> {
        let mut seen = Vec::new();
        let m = self.mem.memory();
        self.vring.get_mut().serve_available(&m, |chain| {
            assert!(chain.descriptor_chain().is_none());
            assert!(!chain.is_cut_short());
            let mut walk = chain;
            let descs = walk
                .by_ref()
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            seen.push((descs, walk.is_cut_short()));
            1
        })?;
        Ok(seen)
    }

    /// Used element `i` as `(id, len)`, read at `used` (a guest address).
    fn used_elem(&self, used: u64, i: u16) -> (u32, u32) {
        let m = self.mem.memory();
        let at = used + 4 + 8 * u64::from(i % SIZE);
        let id: u32 = m.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    fn used_idx(&self, used: u64) -> u16 {
        self.mem.memory().read_obj(GuestAddress(used + 2)).unwrap()
    }
}

#[test]
fn buffers_and_rings_are_translated_and_split_where_guest_memory_is_not_contiguous() {
    let mut g = Guest::new();
    // 0x200 readable bytes across the two buffer pages, then 0x10 writable ones.
    g.desc(DESC_GPA, 0, (BUF_IOVA + PAGE - 0x100, 0x200, NEXT, 1));
    g.desc(DESC_GPA, 1, (BUF_IOVA + PAGE + 0x100, 0x10, WRITE, 0));
    g.offer(0);
    let seen = g.serve().unwrap();
    assert_eq!(
        seen,
        vec![vec![
            (BUF_GPA[0] + PAGE - 0x100, 0x100, false),
            (BUF_GPA[1], 0x100, false),
            (BUF_GPA[1] + 0x100, 0x10, true),
        ]]
    );
    // Completed in the used ring's guest page.
    assert_eq!(g.used_idx(USED_GPA), 1);
    assert_eq!(g.used_elem(USED_GPA, 0), (0, 1));
    // The addresses stay the IOVAs the frontend gave; the log range is the guest one.
    assert_eq!(g.vring.queue_info(), (DESC_IOVA, AVAIL_IOVA, USED_IOVA));
    g.vring.set_log_guest_addr(Some(USED_IOVA));
    let logged = g.vring.get_ref().log_used().unwrap();
    assert_eq!(logged.start, USED_GPA);
}

#[test]
fn a_piece_split_off_keeps_next_so_the_chain_reads_as_one() {
    let mut g = Guest::new();
    // One writable buffer across both pages, alone in its chain.
    g.desc(DESC_GPA, 3, (BUF_IOVA + PAGE - 8, 16, WRITE, 0));
    g.offer(3);
    let m = g.mem.memory();
    let mut flags = Vec::new();
    g.vring
        .get_mut()
        .serve_available(&m, |chain| {
            flags.extend(chain.map(|d| (d.flags() & NEXT != 0, d.len())));
            0
        })
        .unwrap();
    assert_eq!(flags, vec![(true, 8), (false, 8)]);
}

#[test]
fn a_write_through_a_read_only_mapping_fails_that_chain_only() {
    let mut g = Guest::new();
    let ro = 0x3_0000_0000;
    g.iommu.map(ro, 0x30000, PAGE, Permissions::Read);
    // Chain 0: a header, then a "status" in the read-only page.
    g.desc(DESC_GPA, 0, (BUF_IOVA, 0x10, NEXT, 1));
    g.desc(DESC_GPA, 1, (ro, 1, WRITE, 0));
    // Chain 2: fine.
    g.desc(DESC_GPA, 2, (BUF_IOVA + 0x10, 1, WRITE, 0));
    g.offer(0);
    g.offer(2);
    let seen = g.serve_walks().unwrap();
    // Chain 0 looks like a well-formed one-descriptor chain: only `is_cut_short` tells.
    assert_eq!(
        seen,
        vec![
            (vec![(BUF_GPA[0], 0x10, false)], true),
            (vec![(BUF_GPA[0] + 0x10, 1, true)], false),
        ]
    );
    assert_eq!(g.used_idx(USED_GPA), 2);
}

#[test]
fn an_unmapped_buffer_ends_the_chain_and_the_ring_goes_on() {
    let mut g = Guest::new();
    g.desc(DESC_GPA, 0, (0x9_0000_0000, 0x10, 0, 0));
    g.desc(DESC_GPA, 1, (BUF_IOVA, 4, WRITE, 0));
    g.offer(0);
    g.offer(1);
    let seen = g.serve_walks().unwrap();
    assert_eq!(
        seen,
        vec![(vec![], true), (vec![(BUF_GPA[0], 4, true)], false)]
    );
}

#[test]
fn an_unmapped_ring_part_fails_the_pass_until_it_is_mapped() {
    let mut g = Guest::new();
    g.iommu.invalidate(USED_IOVA);
    g.desc(DESC_GPA, 0, (BUF_IOVA, 4, WRITE, 0));
    g.offer(0);
    match g.serve() {
        Err(Error::Iommu {
            part: RingPart::Used,
            source: IommuError::Unmapped { iova: USED_IOVA },
        }) => {}
        other => panic!("expected the used ring's miss, got {other:?}"),
    }
    // Neither the connection thread's reads: they do not translate.
    assert!(matches!(
        g.vring.get_ref().has_available(),
        Err(Error::RingNotTranslated)
    ));
    g.iommu
        .map(USED_IOVA, USED_GPA, PAGE, Permissions::ReadWrite);
    assert_eq!(g.serve().unwrap().len(), 1);
    assert_eq!(g.used_elem(USED_GPA, 0), (0, 1));
}

#[test]
fn a_ring_moved_by_an_invalidation_is_translated_again_before_the_next_access() {
    let mut g = Guest::new();
    g.desc(DESC_GPA, 0, (BUF_IOVA, 4, WRITE, 0));
    g.offer(0);
    g.serve().unwrap();
    assert_eq!(g.used_idx(USED_GPA), 1);
    // The guest moves the used ring: same IOVA, another guest page (holding its copy).
    let moved = 0x9000;
    let m = g.mem.memory();
    let mut page = vec![0u8; PAGE as usize];
    m.read_slice(&mut page, GuestAddress(USED_GPA)).unwrap();
    m.write_slice(&page, GuestAddress(moved)).unwrap();
    g.iommu.invalidate(USED_IOVA);
    g.iommu.map(USED_IOVA, moved, PAGE, Permissions::ReadWrite);
    g.desc(DESC_GPA, 1, (BUF_IOVA, 4, WRITE, 0));
    g.offer(1);
    g.serve().unwrap();
    assert_eq!(g.used_idx(moved), 2);
    assert_eq!(g.used_elem(moved, 1), (1, 1));
    // The old page saw nothing more.
    assert_eq!(g.used_idx(USED_GPA), 1);
}

#[test]
fn the_rings_are_translated_once_while_nothing_is_invalidated() {
    let mut g = Guest::new();
    g.desc(DESC_GPA, 0, (BUF_IOVA, 4, WRITE, 0));
    g.offer(0);
    g.serve().unwrap();
    let after_first = g.iommu.translations.load(Ordering::Relaxed);
    g.offer(0);
    g.serve().unwrap();
    // The second pass translated its one buffer, not the rings again.
    assert_eq!(
        g.iommu.translations.load(Ordering::Relaxed),
        after_first + 1
    );
}

#[test]
fn an_indirect_table_is_read_at_its_translated_address() {
    let mut g = Guest::new();
    let table_iova = BUF_IOVA + 0x800;
    let table_gpa = BUF_GPA[0] + 0x800;
    g.desc(table_gpa, 0, (BUF_IOVA + PAGE, 8, NEXT, 1));
    g.desc(table_gpa, 1, (BUF_IOVA + PAGE + 8, 1, WRITE, 0));
    g.desc(DESC_GPA, 0, (table_iova, 32, INDIRECT, 0));
    g.offer(0);
    let seen = g.serve().unwrap();
    assert_eq!(
        seen,
        vec![vec![(BUF_GPA[1], 8, false), (BUF_GPA[1] + 8, 1, true)]]
    );
}

#[test]
fn an_indirect_table_that_is_not_mapped_ends_the_chain() {
    let mut g = Guest::new();
    g.desc(DESC_GPA, 0, (0x7_0000_0000, 32, INDIRECT, 0));
    g.offer(0);
    assert_eq!(g.serve_walks().unwrap(), vec![(vec![], true)]);
}

#[test]
fn virtio_queue_chains_are_not_handed_out_behind_an_iommu() {
    let mut g = Guest::new();
    g.desc(DESC_GPA, 0, (BUF_IOVA, 4, WRITE, 0));
    g.offer(0);
    assert!(g.vring.pop_descriptor_chain().is_none());
}

#[test]
fn the_used_index_of_new_addresses_is_read_at_their_first_translation() {
    let mut g = Guest::new();
    // A rebooted driver left used idx 5 (and offers from 5 on).
    let m = g.mem.memory();
    m.write_obj(5u16.to_le(), GuestAddress(USED_GPA + 2))
        .unwrap();
    g.vring
        .set_queue_info(DESC_IOVA, AVAIL_IOVA, USED_IOVA)
        .unwrap();
    g.vring.set_queue_next_avail(5);
    g.avail_idx = 5;
    g.desc(DESC_GPA, 0, (BUF_IOVA, 4, WRITE, 0));
    g.offer(0);
    g.serve().unwrap();
    assert_eq!(g.used_idx(USED_GPA), 6);
    assert_eq!(g.used_elem(USED_GPA, 5), (0, 1));
}

#[test]
fn reinstalling_the_same_iommu_keeps_the_ring_and_none_takes_it_out() {
    let g = Guest::new();
    g.vring.set_iommu(Some(g.iommu.clone() as Arc<dyn Iommu>));
    assert_eq!(g.vring.queue_info(), (DESC_IOVA, AVAIL_IOVA, USED_IOVA));
    g.vring.set_iommu(None);
    assert!(!g.vring.get_ref().has_iommu());
}

#[test]
fn a_packed_ring_behind_an_iommu_is_served_through_its_translation() {
    const AVAIL_F: u16 = 1 << 7;
    const USED_F: u16 = 1 << 15;
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap(),
    );
    let iommu = Arc::new(Table::default());
    let rw = Permissions::ReadWrite;
    iommu.map(DESC_IOVA, DESC_GPA, PAGE, rw);
    iommu.map(AVAIL_IOVA, AVAIL_GPA, PAGE, Permissions::Read);
    iommu.map(USED_IOVA, USED_GPA, PAGE, rw);
    iommu.map(BUF_IOVA, BUF_GPA[0], PAGE, rw);
    iommu.map(BUF_IOVA + PAGE, BUF_GPA[1], PAGE, rw);
    let vring = VringMutex::<Mem>::new(mem.clone(), SIZE).unwrap();
    vring.set_iommu(Some(iommu.clone() as Arc<dyn Iommu>));
    vring.set_queue_packed(true);
    vring.set_queue_size(SIZE).unwrap();
    vring
        .set_queue_info(DESC_IOVA, AVAIL_IOVA, USED_IOVA)
        .unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    // One available descriptor (avail wrap counter 1): a writable buffer across both pages.
    let m = mem.memory();
    let at = |off: u64| GuestAddress(DESC_GPA + off);
    m.write_obj((BUF_IOVA + PAGE - 8).to_le(), at(0)).unwrap();
    m.write_obj(16u32.to_le(), at(8)).unwrap();
    m.write_obj(7u16.to_le(), at(12)).unwrap();
    m.write_obj((AVAIL_F | WRITE).to_le(), at(14)).unwrap();
    let mut seen = Vec::new();
    let served = vring
        .get_mut()
        .serve_available(&m, |chain| {
            assert!(chain.is_packed());
            seen.extend(chain.map(|d| (d.addr().0, d.len())));
            16
        })
        .unwrap();
    assert_eq!(served, 1);
    assert_eq!(seen, vec![(BUF_GPA[0] + PAGE - 8, 8), (BUF_GPA[1], 8)]);
    // The used descriptor went to the ring's guest page: id 7, length 16, AVAIL and USED set.
    let id: u16 = m.read_obj(at(12)).unwrap();
    let len: u32 = m.read_obj(at(8)).unwrap();
    let flags: u16 = m.read_obj(at(14)).unwrap();
    assert_eq!((id, len), (7, 16));
    assert_eq!(flags & (AVAIL_F | USED_F), AVAIL_F | USED_F);
}

#[test]
fn room_behind_an_iommu_is_translated_and_split_where_guest_memory_is_not_contiguous() {
    let mut guest = Guest::new();
    // A writable buffer across both IOVA pages, which are in reverse order in the guest.
    guest.desc(DESC_GPA, 0, (BUF_IOVA + PAGE - 8, 16, WRITE, 0));
    guest.offer(0);
    let packet: Vec<u8> = (1..=16).collect();
    let m = guest.mem.memory();
    let slices = guest
        .vring
        .get_mut()
        .fill_available(&m, |rx| {
            let buffers = rx.take(16, 1).unwrap();
            let lens: Vec<usize> = buffers.slices().iter().map(|s| s.len()).collect();
            assert_eq!(buffers.write_at(0, &packet), 16);
            buffers.commit(16);
            lens
        })
        .unwrap();
    assert_eq!(slices, vec![8, 8]);
    let mut first = [0u8; 8];
    let mut second = [0u8; 8];
    m.read_slice(&mut first, GuestAddress(BUF_GPA[0] + PAGE - 8))
        .unwrap();
    m.read_slice(&mut second, GuestAddress(BUF_GPA[1])).unwrap();
    assert_eq!([first, second].concat(), packet);
    assert_eq!(guest.used_elem(USED_GPA, 0), (0, 16));
    assert_eq!(guest.used_idx(USED_GPA), 1);
}

#[test]
fn room_the_iommu_does_not_map_is_a_malformed_chain() {
    let mut guest = Guest::new();
    guest.desc(DESC_GPA, 0, (BUF_IOVA + 4 * PAGE, 16, WRITE, 0));
    guest.offer(0);
    let m = guest.mem.memory();
    let (taken, malformed) = guest
        .vring
        .get_mut()
        .fill_available(&m, |rx| {
            let taken = rx.take(16, 1).is_some();
            (taken, rx.malformed())
        })
        .unwrap();
    assert_eq!((taken, malformed), (false, 1));
    assert_eq!(guest.used_elem(USED_GPA, 0), (0, 0));
    assert_eq!(guest.used_idx(USED_GPA), 1);
}

/// An IOVA page nothing maps until a test does.
const LATE_IOVA: u64 = 0x4_0000_0000;
const LATE_GPA: u64 = 0x30000;

#[test]
fn a_miss_is_asked_without_the_ring_lock_and_its_chain_is_served_once_answered() {
    let mut g = Guest::new();
    g.iommu.asking();
    // Chain 0 is fine; chain 1 writes into a page the IOTLB does not have yet.
    g.desc(DESC_GPA, 0, (BUF_IOVA, 0x10, WRITE, 0));
    g.desc(DESC_GPA, 1, (LATE_IOVA + 0x20, 0x10, WRITE, 0));
    g.offer(0);
    g.offer(1);
    let vring = g.vring.clone();
    let worker = std::thread::spawn(move || {
        crate::process_queue(&vring, |chain| {
            assert!(!chain.is_cut_short());
            let written = chain.clone().map(|d| d.len()).sum();
            assert!(!chain.clone().any(|d| d.addr().0 == LATE_IOVA + 0x20));
            written
        })
    });
    g.iommu.wait_asked(LATE_IOVA + 0x20);
    {
        // The worker waits for the answer without the ring's lock; chain 1 was put back,
        // nothing of it served, chain 0 completed.
        let data = g.vring.get_mut();
        assert_eq!(data.queue_next_avail(), 1);
        assert_eq!(g.used_idx(USED_GPA), 1);
    }
    g.iommu
        .map(LATE_IOVA, LATE_GPA, PAGE, Permissions::ReadWrite);
    assert_eq!(worker.join().unwrap(), 2);
    assert_eq!(g.used_idx(USED_GPA), 2);
    assert_eq!(g.used_elem(USED_GPA, 1), (1, 0x10));
}

#[test]
fn a_miss_the_frontend_does_not_answer_fails_its_chain_and_the_ring_goes_on() {
    let mut g = Guest::new();
    g.iommu.asking();
    g.iommu.refusing.store(true, Ordering::Relaxed);
    g.desc(DESC_GPA, 0, (LATE_IOVA, 0x10, WRITE, 0));
    g.desc(DESC_GPA, 1, (BUF_IOVA, 0x10, WRITE, 0));
    g.offer(0);
    g.offer(1);
    // The miss is asked once, not answered: the chain is cut short at the second try.
    let mut cut = Vec::new();
    let vring = g.vring.clone();
    let served = std::thread::spawn(move || {
        let n = crate::process_queue(&vring, |chain| {
            let mut walk = chain;
            let len = walk.by_ref().map(|d| d.len()).sum();
            cut.push(walk.is_cut_short());
            len
        });
        (n, cut)
    });
    g.iommu.wait_asked(LATE_IOVA);
    let (n, cut) = served.join().unwrap();
    assert_eq!((n, cut), (2, vec![true, false]));
    assert_eq!(g.used_elem(USED_GPA, 0), (0, 0));
    assert_eq!(g.used_elem(USED_GPA, 1), (1, 0x10));
}

#[test]
fn a_chain_taken_for_later_holds_its_translations_until_it_is_completed() {
    let mut g = Guest::new();
    g.desc(DESC_GPA, 0, (BUF_IOVA, 0x10, WRITE, 0));
    g.desc(DESC_GPA, 1, (BUF_IOVA + 0x10, 0x10, WRITE, 0));
    g.offer(0);
    g.offer(1);
    let generation = g.iommu.generation();
    let m = g.mem.memory();
    let taken = g
        .vring
        .get_mut()
        .serve_available_async(&m, |chain| match chain.head_index() {
            0 => crate::Completion::Later,
            _ => crate::Completion::Now(0x10),
        })
        .unwrap();
    assert_eq!(taken, 2);
    // Chain 1, completed in its pass, holds nothing; chain 0 holds until completed.
    assert_eq!(g.iommu.holds(), vec![generation]);
    g.vring.get_mut().complete_deferred([(0, 4)]).unwrap();
    assert_eq!(g.iommu.holds(), Vec::<u64>::new());
    assert_eq!(g.used_elem(USED_GPA, 1), (0, 4));
    // A ring reset ends the holds of chains never completed.
    g.desc(DESC_GPA, 2, (BUF_IOVA, 0x10, WRITE, 0));
    g.offer(2);
    g.vring
        .get_mut()
        .serve_available_async(&m, |_| crate::Completion::Later)
        .unwrap();
    assert_eq!(g.iommu.holds().len(), 1);
    g.vring.get_mut().reset();
    assert_eq!(g.iommu.holds(), Vec::<u64>::new());
}

#[test]
fn a_completion_whose_used_ring_missed_is_published_by_the_workers_next_pass() {
    let mut g = Guest::new();
    g.iommu.asking();
    let (kick, kicked) = crate::testutil::eventfd_pair();
    g.vring.set_kick(Some(kick));
    g.desc(DESC_GPA, 0, (BUF_IOVA, 0x10, WRITE, 0));
    g.offer(0);
    crate::process_queue_async(&g.vring, |_| crate::Completion::Later);
    // The used ring is invalidated before the device completes the chain from its thread.
    g.iommu.invalidate(USED_IOVA);
    let vring = g.vring.clone();
    std::thread::spawn(move || {
        let mut data = vring.get_mut();
        assert_eq!(data.complete_deferred([(0, 7)]).unwrap(), 1);
        // The decision waits for the worker too.
        assert!(!data.signal_used_queue_if_needed().unwrap());
    })
    .join()
    .unwrap();
    assert_eq!(g.used_idx(USED_GPA), 0);
    // The worker was kicked; its pass asks for the used ring and publishes the completion.
    let mut buf = [0u8; 8];
    std::io::Read::read_exact(&mut &kicked, &mut buf).unwrap();
    assert!(u64::from_ne_bytes(buf) >= 1);
    let vring = g.vring.clone();
    let worker = std::thread::spawn(move || crate::process_queue(&vring, |_| 0));
    g.iommu.wait_asked(USED_IOVA);
    g.iommu
        .map(USED_IOVA, USED_GPA, PAGE, Permissions::ReadWrite);
    worker.join().unwrap();
    assert_eq!(g.used_idx(USED_GPA), 1);
    assert_eq!(g.used_elem(USED_GPA, 0), (0, 7));
}

#[test]
fn a_packed_chain_that_misses_is_put_back_and_served_once_answered() {
    let g = Guest::new();
    g.iommu.asking();
    // The device writes used descriptors into a packed ring.
    g.iommu.invalidate(DESC_IOVA);
    g.iommu
        .map(DESC_IOVA, DESC_GPA, PAGE, Permissions::ReadWrite);
    let m = g.mem.memory();
    {
        let mut data = g.vring.get_mut();
        data.set_queue_packed(true);
        data.set_queue_info(DESC_IOVA, AVAIL_IOVA, USED_IOVA)
            .unwrap();
    }
    // One available packed descriptor (wrap counter 1: AVAIL set, USED clear) at a missing IOVA.
    let avail = 1u16 << 7;
    m.write_obj(LATE_IOVA, GuestAddress(DESC_GPA)).unwrap();
    m.write_obj(0x10u32, GuestAddress(DESC_GPA + 8)).unwrap();
    m.write_obj(9u16, GuestAddress(DESC_GPA + 12)).unwrap();
    m.write_obj(avail | WRITE, GuestAddress(DESC_GPA + 14))
        .unwrap();
    let err = g
        .vring
        .get_mut()
        .serve_available(&m, |_| unreachable!("a chain that missed is not served"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::IommuMiss {
                iova: LATE_IOVA,
                ..
            }
        ),
        "{err}"
    );
    g.iommu
        .map(LATE_IOVA, LATE_GPA, PAGE, Permissions::ReadWrite);
    let mut seen = Vec::new();
    g.vring
        .get_mut()
        .serve_available(&m, |chain| {
            seen.extend(chain.map(|d| d.addr().0));
            3
        })
        .unwrap();
    assert_eq!(seen, vec![LATE_GPA]);
    // The used descriptor: id 9, length 3.
    let id: u16 = m.read_obj(GuestAddress(DESC_GPA + 12)).unwrap();
    let len: u32 = m.read_obj(GuestAddress(DESC_GPA + 8)).unwrap();
    assert_eq!((id, len), (9, 3));
}

#[test]
fn a_ring_stopped_while_its_miss_is_asked_keeps_the_chain_available() {
    let mut g = Guest::new();
    g.iommu.asking();
    g.desc(DESC_GPA, 0, (BUF_IOVA, 0x10, WRITE, 0));
    g.desc(DESC_GPA, 1, (LATE_IOVA, 0x10, WRITE, 0));
    g.offer(0);
    g.offer(1);
    let vring = g.vring.clone();
    let worker = std::thread::spawn(move || crate::process_queue(&vring, |_| 1));
    g.iommu.wait_asked(LATE_IOVA);
    {
        // GET_VRING_BASE meanwhile: the ring stops where chain 1 is still available.
        let mut data = g.vring.get_mut();
        data.set_queue_ready(false);
        assert_eq!(data.vring_base(), 1);
    }
    g.iommu
        .map(LATE_IOVA, LATE_GPA, PAGE, Permissions::ReadWrite);
    assert_eq!(worker.join().unwrap(), 1);
    assert_eq!(g.used_idx(USED_GPA), 1);
    assert_eq!(g.vring.queue_next_avail(), 1);
}

#[test]
fn a_chain_longer_than_the_inline_list_is_yielded_whole_and_in_order() {
    let mut g = Guest::new();
    for i in 0..6u16 {
        let flags = if i < 5 { NEXT } else { WRITE };
        g.desc(
            DESC_GPA,
            i,
            (BUF_IOVA + 0x100 * u64::from(i), 0x10, flags, i + 1),
        );
    }
    g.offer(0);
    let seen = g.serve().unwrap();
    let expected: Seen = (0..6u64)
        .map(|i| (BUF_GPA[0] + 0x100 * i, 0x10, i == 5))
        .collect();
    assert_eq!(seen, vec![expected]);
}
