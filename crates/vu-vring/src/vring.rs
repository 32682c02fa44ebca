//! The [`VringT`] trait and its three implementations.

use std::cell::{Ref, RefCell, RefMut};
use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::error::Error;
use crate::iommu::Iommu;
use crate::ring_state::{InbandNotifier, RingState};
use crate::state::VringData;

/// The memory handle the vring types default to, as in the reference implementation, so
/// that `&VringMutex` names `VringMutex<GuestMemoryAtomic<GuestMemoryMmap>>`.
pub type DefaultMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Names the shared guard type a [`VringT`] returns from [`get_ref`](VringT::get_ref).
///
/// A separate trait with a lifetime parameter lets each implementation choose a guard that
/// borrows from it (a `Ref`, a `MutexGuard`, a read guard).
pub trait VringStateGuard<'a, M: GuestAddressSpace> {
    /// The shared guard; it dereferences to the vring's [`VringData`].
    type G: Deref<Target = VringData<M>>;
}

/// Names the exclusive guard type a [`VringT`] returns from [`get_mut`](VringT::get_mut).
pub trait VringStateMutGuard<'a, M: GuestAddressSpace> {
    /// The exclusive guard; it dereferences mutably to the vring's [`VringData`].
    type G: DerefMut<Target = VringData<M>>;
}

/// Access to one vring through `&self`, whatever the synchronisation.
///
/// Every method takes `&self` and locks (or borrows) for the duration of that one call, so
/// never call a method of the same vring while holding one of its guards: [`VringMutex`] and
/// [`VringRwLock`] deadlock, [`VringState`] panics. In particular the temporaries of a
/// `while let` condition live until the end of the loop body, so pop the chain in a `let`
/// (or use [`pop_descriptor_chain`](Self::pop_descriptor_chain)) before completing it.
///
/// The trait has no `Send`/`Sync` supertraits; see the crate documentation.
pub trait VringT<M: GuestAddressSpace>:
    for<'a> VringStateGuard<'a, M> + for<'a> VringStateMutGuard<'a, M>
{
    /// Creates a stopped, disabled vring of size `max_queue_size` over `mem`.
    fn new(mem: M, max_queue_size: u16) -> Result<Self, Error>
    where
        Self: Sized;

    /// Shared access to the state (a read lock for [`VringRwLock`]).
    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G;

    /// Exclusive access to the state.
    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G;

    /// Pops the next available descriptor chain; see [`VringData::pop_descriptor_chain`].
    fn pop_descriptor_chain(&self) -> Option<DescriptorChain<M::T>> {
        self.get_mut().pop_descriptor_chain()
    }

    /// Puts one completed chain into the used ring; see [`VringData::add_used`].
    fn add_used(&self, head: u16, len: u32) -> Result<(), Error> {
        self.get_mut().add_used(head, len)
    }

    /// Puts many completed chains into the used ring under one lock; see
    /// [`VringData::add_used_batch`].
    fn add_used_batch<I>(&self, used: I) -> Result<usize, Error>
    where
        I: IntoIterator<Item = (u16, u32)>,
    {
        self.get_mut().add_used_batch(used)
    }

    /// Writes the call eventfd unconditionally; see [`VringData::signal_used_queue`].
    fn signal_used_queue(&self) -> io::Result<()> {
        self.get_ref().signal_used_queue()
    }

    /// Signals once if the entries added since the last decision need it; see
    /// [`VringData::signal_used_queue_if_needed`].
    fn signal_used_queue_if_needed(&self) -> Result<bool, Error> {
        self.get_mut().signal_used_queue_if_needed()
    }

    /// Re-enables driver notifications, returning whether chains arrived meanwhile; see
    /// [`VringData::enable_notification`].
    fn enable_notification(&self) -> Result<bool, Error> {
        self.get_mut().enable_notification()
    }

    /// Suppresses driver notifications; see [`VringData::disable_notification`].
    fn disable_notification(&self) -> Result<(), Error> {
        self.get_mut().disable_notification()
    }

    /// Whether the driver wants a notification; see [`VringData::needs_notification`].
    fn needs_notification(&self) -> Result<bool, Error> {
        self.get_mut().needs_notification()
    }

    /// Whether the ring is enabled.
    fn is_enabled(&self) -> bool {
        self.get_ref().is_enabled()
    }

    /// Sets the enabled flag (`SET_VRING_ENABLE`).
    fn set_enabled(&self, enabled: bool) {
        self.get_mut().set_enabled(enabled);
    }

    /// Whether the ring is started.
    fn ready(&self) -> bool {
        self.get_ref().ready()
    }

    /// Marks the ring started or stopped.
    fn set_queue_ready(&self, ready: bool) {
        self.get_mut().set_queue_ready(ready);
    }

    /// The spec's ring state; see [`RingState`].
    fn ring_state(&self) -> RingState {
        self.get_ref().ring_state()
    }

    /// Sets the ring guest addresses; see [`VringData::set_queue_info`].
    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), Error> {
        self.get_mut().set_queue_info(desc, avail, used)
    }

    /// The ring guest addresses `(desc, avail, used)`.
    fn queue_info(&self) -> (u64, u64, u64) {
        self.get_ref().queue_info()
    }

    /// Sets the queue size; see [`VringData::set_queue_size`].
    fn set_queue_size(&self, size: u16) -> Result<(), Error> {
        self.get_mut().set_queue_size(size)
    }

    /// The current queue size.
    fn queue_size(&self) -> u16 {
        self.get_ref().queue_size()
    }

    /// Turns `VIRTIO_F_RING_EVENT_IDX` handling on or off.
    fn set_queue_event_idx(&self, enabled: bool) {
        self.get_mut().set_queue_event_idx(enabled);
    }

    /// Whether `VIRTIO_F_RING_EVENT_IDX` handling is on.
    fn event_idx(&self) -> bool {
        self.get_ref().event_idx()
    }

    /// Chooses the split or packed layout from the acked features; see
    /// [`VringData::set_queue_packed`].
    fn set_queue_packed(&self, packed: bool) {
        self.get_mut().set_queue_packed(packed);
    }

    /// Whether the ring is a packed ring.
    fn queue_packed(&self) -> bool {
        self.get_ref().queue_packed()
    }

    /// The `GET_VRING_BASE` word for either layout; see [`VringData::vring_base`].
    fn vring_base(&self) -> u32 {
        self.get_ref().vring_base()
    }

    /// Sets the ring state from the `SET_VRING_BASE` word; see [`VringData::set_vring_base`].
    fn set_vring_base(&self, num: u32) -> Result<(), Error> {
        self.get_mut().set_vring_base(num)
    }

    /// Whether chains are available that the device has not taken; see
    /// [`VringData::has_available`].
    fn has_available(&self) -> Result<bool, Error> {
        self.get_ref().has_available()
    }

    /// The next available index (`GET_VRING_BASE`).
    fn queue_next_avail(&self) -> u16 {
        self.get_ref().queue_next_avail()
    }

    /// Sets the next available index (`SET_VRING_BASE`).
    fn set_queue_next_avail(&self, idx: u16) {
        self.get_mut().set_queue_next_avail(idx);
    }

    /// The next used index.
    fn queue_next_used(&self) -> u16 {
        self.get_ref().queue_next_used()
    }

    /// Sets the next used index; see [`VringData::set_queue_next_used`].
    fn set_queue_next_used(&self, idx: u16) {
        self.get_mut().set_queue_next_used(idx);
    }

    /// Reads the used ring's `idx` from guest memory.
    fn queue_used_idx(&self) -> Result<u16, Error> {
        self.get_ref().queue_used_idx()
    }

    /// Sets or clears the kick eventfd.
    fn set_kick(&self, fd: Option<File>) {
        self.get_mut().set_kick(fd);
    }

    /// Sets or clears the call eventfd.
    fn set_call(&self, fd: Option<File>) {
        self.get_mut().set_call(fd);
    }

    /// Sets or clears the error eventfd.
    fn set_err(&self, fd: Option<File>) {
        self.get_mut().set_err(fd);
    }

    /// Puts the ring behind an IOMMU or takes it out; see [`VringData::set_iommu`].
    fn set_iommu(&self, iommu: Option<Arc<dyn Iommu>>) {
        self.get_mut().set_iommu(iommu);
    }

    /// Installs or removes the in-band notifier; see [`VringData::set_inband`].
    fn set_inband(&self, notifier: Option<Arc<dyn InbandNotifier>>) {
        self.get_mut().set_inband(notifier);
    }

    /// Consumes the kick counter and returns whether the ring is enabled; see
    /// [`VringData::read_kick`].
    fn read_kick(&self) -> io::Result<bool> {
        self.get_ref().read_kick()
    }

    /// Delivers an in-band kick through the kick eventfd; see [`VringData::deliver_kick`].
    fn deliver_kick(&self) -> io::Result<bool> {
        self.get_ref().deliver_kick()
    }

    /// Writes the error eventfd; see [`VringData::signal_error`].
    fn signal_error(&self) -> io::Result<()> {
        self.get_ref().signal_error()
    }

    /// Sets the used-ring log address; see [`VringData::set_log_guest_addr`].
    fn set_log_guest_addr(&self, log_guest_addr: Option<u64>) {
        self.get_mut().set_log_guest_addr(log_guest_addr);
    }

    /// The log range of the used ring, when logging is on; see [`VringData::log_used`].
    fn log_used(&self) -> Option<std::ops::Range<u64>> {
        self.get_ref().log_used()
    }

    /// Returns the vring to its state at creation; see [`VringData::reset`].
    fn reset(&self) {
        self.get_mut().reset();
    }
}

/// A vring for one thread: a [`RefCell`] around [`VringData`], no lock, no atomics.
///
/// It is `Send` (when `M` is) but not `Sync`, so the compiler keeps it on the thread of a
/// single-threaded daemon. Holding a guard while calling another method of the same vring
/// panics ("already borrowed") instead of deadlocking.
#[derive(Debug)]
pub struct VringState<M: GuestAddressSpace = DefaultMem> {
    state: RefCell<VringData<M>>,
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for VringState<M> {
    type G = Ref<'a, VringData<M>>;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for VringState<M> {
    type G = RefMut<'a, VringData<M>>;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for VringState<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, Error> {
        Ok(VringState {
            state: RefCell::new(VringData::new(mem, max_queue_size)?),
        })
    }

    fn get_ref(&self) -> Ref<'_, VringData<M>> {
        self.state.borrow()
    }

    fn get_mut(&self) -> RefMut<'_, VringData<M>> {
        self.state.borrow_mut()
    }
}

/// A vring shared between threads behind an `Arc<Mutex<_>>`; clones share the same vring.
///
/// A poisoned lock (a thread panicked while holding it) is entered anyway: the state is plain
/// data whose every update is a single store, so there is no half-made invariant to protect,
/// and the daemon should keep serving the other rings.
#[derive(Debug)]
pub struct VringMutex<M: GuestAddressSpace = DefaultMem> {
    state: Arc<Mutex<VringData<M>>>,
}

impl<M: GuestAddressSpace> Clone for VringMutex<M> {
    fn clone(&self) -> Self {
        VringMutex {
            state: Arc::clone(&self.state),
        }
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for VringMutex<M> {
    type G = MutexGuard<'a, VringData<M>>;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for VringMutex<M> {
    type G = MutexGuard<'a, VringData<M>>;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for VringMutex<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, Error> {
        Ok(VringMutex {
            state: Arc::new(Mutex::new(VringData::new(mem, max_queue_size)?)),
        })
    }

    fn get_ref(&self) -> MutexGuard<'_, VringData<M>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get_mut(&self) -> MutexGuard<'_, VringData<M>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A vring shared between threads behind an `Arc<RwLock<_>>`; clones share the same vring.
///
/// Read-only operations ([`read_kick`](VringT::read_kick),
/// [`signal_used_queue`](VringT::signal_used_queue), index reads) take the read lock, so a
/// kick can be consumed while another thread inspects the ring. Poisoning is handled as for
/// [`VringMutex`].
#[derive(Debug)]
pub struct VringRwLock<M: GuestAddressSpace = DefaultMem> {
    state: Arc<RwLock<VringData<M>>>,
}

impl<M: GuestAddressSpace> Clone for VringRwLock<M> {
    fn clone(&self) -> Self {
        VringRwLock {
            state: Arc::clone(&self.state),
        }
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for VringRwLock<M> {
    type G = RwLockReadGuard<'a, VringData<M>>;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for VringRwLock<M> {
    type G = RwLockWriteGuard<'a, VringData<M>>;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for VringRwLock<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, Error> {
        Ok(VringRwLock {
            state: Arc::new(RwLock::new(VringData::new(mem, max_queue_size)?)),
        })
    }

    fn get_ref(&self) -> RwLockReadGuard<'_, VringData<M>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn get_mut(&self) -> RwLockWriteGuard<'_, VringData<M>> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::ops::Deref;
    use std::sync::atomic::Ordering;

    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::ring_state::RingState;
    use crate::state::{MAX_QUEUE_SIZE, VRING_AVAIL_F_NO_INTERRUPT};
    use crate::RingPart;

    type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

    const MAX: u16 = 256;
    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUFFERS: u64 = 0x10000;
    const BUF_LEN: u32 = 0x100;
    const MEM_LEN: usize = 0x20000;

    /// Plays the driver: writes descriptors and the available ring by hand, reads the used
    /// ring back.
    struct Driver {
        mem: Mem,
        avail_idx: u16,
    }

    impl Driver {
        fn new() -> Self {
            let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap();
            Driver {
                mem: GuestMemoryAtomic::new(mmap),
                avail_idx: 0,
            }
        }

        /// Offers `n` one-descriptor chains; the head of each is its slot in the table.
        fn offer(&mut self, n: u16) {
            let m = self.mem.memory();
            for _ in 0..n {
                let head = self.avail_idx % SIZE;
                let desc = DESC + 16 * u64::from(head);
                let buf = BUFFERS + u64::from(BUF_LEN) * u64::from(head);
                m.write_obj(buf.to_le(), GuestAddress(desc)).unwrap();
                m.write_obj(BUF_LEN.to_le(), GuestAddress(desc + 8))
                    .unwrap();
                m.write_obj(0u16, GuestAddress(desc + 12)).unwrap();
                m.write_obj(0u16, GuestAddress(desc + 14)).unwrap();
                let slot = AVAIL + 4 + 2 * u64::from(head);
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

        fn set_avail_flags(&self, flags: u16) {
            let m = self.mem.memory();
            m.write_obj(flags.to_le(), GuestAddress(AVAIL)).unwrap();
        }

        fn set_used_event(&self, used_event: u16) {
            let m = self.mem.memory();
            let addr = AVAIL + 4 + 2 * u64::from(SIZE);
            m.write_obj(used_event.to_le(), GuestAddress(addr)).unwrap();
        }

        fn used_idx(&self) -> u16 {
            let m = self.mem.memory();
            u16::from_le(m.read_obj(GuestAddress(USED + 2)).unwrap())
        }

        fn used_flags(&self) -> u16 {
            let m = self.mem.memory();
            u16::from_le(m.read_obj(GuestAddress(USED)).unwrap())
        }

        fn avail_event(&self) -> u16 {
            let m = self.mem.memory();
            let addr = USED + 4 + 8 * u64::from(SIZE);
            u16::from_le(m.read_obj(GuestAddress(addr)).unwrap())
        }

        fn used_elem(&self, i: u16) -> (u32, u32) {
            let m = self.mem.memory();
            let addr = USED + 4 + 8 * u64::from(i % SIZE);
            let id: u32 = m.read_obj(GuestAddress(addr)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(addr + 4)).unwrap();
            (u32::from_le(id), u32::from_le(len))
        }
    }

    /// A non-blocking eventfd as two `File`s sharing one counter: one for the vring, one for
    /// the test to read.
    fn eventfd_pair() -> (File, File) {
        crate::testutil::eventfd_pair()
    }

    /// Takes the eventfd counter (0 when empty).
    fn counter(fd: &File) -> u64 {
        let mut buf = [0u8; 8];
        match (&*fd).read(&mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            other => panic!("unexpected eventfd read {other:?}"),
        }
    }

    /// A started, enabled vring of size `SIZE` over the driver's memory.
    fn started<V: VringT<Mem>>() -> (V, Driver) {
        let driver = Driver::new();
        let vring = V::new(driver.mem.clone(), MAX).unwrap();
        vring.set_queue_size(SIZE).unwrap();
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        (vring, driver)
    }

    /// Pops every offered chain and returns their heads.
    fn pop_all<V: VringT<Mem>>(vring: &V) -> Vec<u16> {
        let mut heads = Vec::new();
        while let Some(chain) = vring.pop_descriptor_chain() {
            heads.push(chain.head_index());
        }
        heads
    }

    #[test]
    fn available_head_past_the_table_is_skipped() {
        let (vring, mut driver) = started::<VringMutex<Mem>>();
        driver.offer(2);
        let m = driver.mem.memory();
        m.write_obj((SIZE + 3).to_le(), GuestAddress(AVAIL + 4))
            .unwrap();
        assert_eq!(pop_all(&vring), vec![1]);
    }

    /// One end of a socket pair as a `File`, and the other end: the second reads EOF once every
    /// copy of the first is closed, which shows whether a vring still holds the fd.
    #[test]
    fn serve_available_completes_every_chain_with_the_served_length() {
        let (vring, mut driver) = started::<VringMutex<Mem>>();
        driver.offer(3);
        let mem = driver.mem.memory();
        let mut served = Vec::new();
        let completed = vring
            .get_mut()
            .serve_available(&mem, |chain| {
                served.push(chain.head_index());
                7 + u32::from(chain.head_index())
            })
            .unwrap();
        assert_eq!(completed, 3);
        assert_eq!(served, vec![0, 1, 2]);
        for i in 0..3u16 {
            assert_eq!(driver.used_elem(i), (u32::from(i), 7 + u32::from(i)));
        }
        assert_eq!(driver.used_idx(), 3);
        assert_eq!(vring.queue_next_used(), 3);
    }

    #[test]
    fn serve_available_serves_more_chains_than_one_round_in_order() {
        // A queue of 256 with 200 chains offered: several rounds of the batch, and a head
        // past the table in the second one.
        const BIG: u16 = 256;
        let (t, a, u) = (0x4000u64, 0x5000u64, 0x6000u64);
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap(),
        );
        let vring = VringMutex::<Mem>::new(mem.clone(), BIG).unwrap();
        vring.set_queue_size(BIG).unwrap();
        vring.set_queue_info(t, a, u).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let m = mem.memory();
        for i in 0..200u16 {
            // Device-writable (VIRTQ_DESC_F_WRITE), no next.
            let desc = virtio_queue::desc::split::Descriptor::new(BUFFERS, u32::from(i) + 1, 2, 0);
            m.write_obj(desc, GuestAddress(t + 16 * u64::from(i)))
                .unwrap();
            let head = if i == 100 { BIG + 44 } else { i };
            m.write_obj(head.to_le(), GuestAddress(a + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        m.write_obj(200u16.to_le(), GuestAddress(a + 2)).unwrap();
        let completed = vring
            .get_mut()
            .serve_available(&m, |chain| chain.map(|d| d.len()).sum())
            .unwrap();
        assert_eq!(completed, 199);
        let used: Vec<(u32, u32)> = (0..199u64)
            .map(|k| {
                let at = u + 4 + 8 * k;
                let id: u32 = m.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap();
                (u32::from_le(id), u32::from_le(len))
            })
            .collect();
        let expected: Vec<(u32, u32)> = (0..200u32)
            .filter(|&i| i != 100)
            .map(|i| (i, i + 1))
            .collect();
        assert_eq!(used, expected);
        let used_idx: u16 = m.read_obj(GuestAddress(u + 2)).unwrap();
        assert_eq!(u16::from_le(used_idx), 199);
        assert_eq!(vring.queue_next_avail(), 200);
    }

    #[test]
    fn serve_available_wraps_around_the_used_ring() {
        let (vring, mut driver) = started::<VringMutex<Mem>>();
        let mem = driver.mem.memory();
        driver.offer(SIZE);
        vring.get_mut().serve_available(&mem, |_| 1).unwrap();
        driver.offer(5);
        let completed = vring
            .get_mut()
            .serve_available(&mem, |chain| 100 + u32::from(chain.head_index()))
            .unwrap();
        assert_eq!(completed, 5);
        for i in 0..5u16 {
            assert_eq!(
                driver.used_elem(SIZE + i),
                (u32::from(i), 100 + u32::from(i))
            );
        }
        assert_eq!(driver.used_elem(5), (5, 1));
        assert_eq!(driver.used_idx(), SIZE + 5);
    }

    #[test]
    fn serve_available_entries_count_for_the_notification_decision() {
        let (vring, mut driver) = started::<VringMutex<Mem>>();
        let (call, observer) = eventfd_pair();
        vring.set_call(Some(call));
        driver.offer(4);
        let mem = driver.mem.memory();
        vring.get_mut().serve_available(&mem, |_| 0).unwrap();
        assert!(vring.signal_used_queue_if_needed().unwrap());
        assert!(!vring.signal_used_queue_if_needed().unwrap());
        assert_eq!(counter(&observer), 1);
    }

    #[test]
    fn serve_available_skips_a_head_past_the_table() {
        let (vring, mut driver) = started::<VringMutex<Mem>>();
        driver.offer(3);
        let mem = driver.mem.memory();
        mem.write_obj((SIZE + 3).to_le(), GuestAddress(AVAIL + 6))
            .unwrap();
        let mut served = Vec::new();
        let completed = vring
            .get_mut()
            .serve_available(&mem, |chain| {
                served.push(chain.head_index());
                9
            })
            .unwrap();
        assert_eq!((completed, served), (2, vec![0, 2]));
        assert_eq!(driver.used_elem(0), (0, 9));
        assert_eq!(driver.used_elem(1), (2, 9));
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(vring.queue_next_avail(), 3);
    }

    #[test]
    fn used_ring_split_across_two_regions_is_written_entry_by_entry() {
        // The boundary falls inside the used ring's third element.
        let boundary = USED + 4 + 8 * 2 + 4;
        let mmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), boundary as usize),
            (GuestAddress(boundary), MEM_LEN - boundary as usize),
        ])
        .unwrap();
        let mut driver = Driver {
            mem: GuestMemoryAtomic::new(mmap),
            avail_idx: 0,
        };
        let vring = VringMutex::<Mem>::new(driver.mem.clone(), MAX).unwrap();
        vring.set_queue_size(SIZE).unwrap();
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        driver.offer(4);
        let mem = driver.mem.memory();
        let completed = vring
            .get_mut()
            .serve_available(&mem, |chain| 0x1000 + u32::from(chain.head_index()))
            .unwrap();
        assert_eq!(completed, 4);
        driver.offer(2);
        let heads = pop_all(&vring);
        vring
            .add_used_batch(heads.iter().map(|&h| (h, 0x2000 + u32::from(h))))
            .unwrap();
        for i in 0..4u16 {
            assert_eq!(driver.used_elem(i), (u32::from(i), 0x1000 + u32::from(i)));
        }
        for i in 4..6u16 {
            assert_eq!(driver.used_elem(i), (u32::from(i), 0x2000 + u32::from(i)));
        }
        assert_eq!(driver.used_idx(), 6);
    }

    #[test]
    fn available_index_more_than_the_queue_size_ahead_is_an_error() {
        let (vring, mut driver) = started::<VringMutex<Mem>>();
        driver.offer(2);
        let m = driver.mem.memory();
        m.write_obj((SIZE + 1).to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        let err = vring.get_mut().serve_available(&m, |_| 0).unwrap_err();
        assert!(matches!(err, Error::InvalidAvailIndex { next_avail: 0 }));
        assert_eq!((vring.queue_next_avail(), driver.used_idx()), (0, 0));
        // Exactly the queue size ahead is a full ring, served.
        m.write_obj(SIZE.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        let served = vring.get_mut().serve_available(&m, |_| 0).unwrap();
        assert_eq!(served, usize::from(SIZE));
    }

    #[test]
    fn used_ring_outside_guest_memory_is_an_error() {
        let (vring, mut driver) = started::<VringMutex<Mem>>();
        vring
            .set_queue_info(DESC, AVAIL, MEM_LEN as u64 - 8)
            .unwrap();
        driver.offer(1);
        let mem = driver.mem.memory();
        let err = vring.get_mut().serve_available(&mem, |_| 0).unwrap_err();
        assert!(matches!(err, Error::AddUsed { head: 0, .. }));
        assert_eq!(vring.queue_next_used(), 0);
        let err = vring.add_used_batch([(0, 0)]).unwrap_err();
        assert!(matches!(err, Error::AddUsed { head: 0, .. }));
    }

    fn closing_probe() -> (File, std::os::unix::net::UnixStream) {
        let (held, watch) = std::os::unix::net::UnixStream::pair().unwrap();
        watch.set_nonblocking(true).unwrap();
        (File::from(std::os::fd::OwnedFd::from(held)), watch)
    }

    /// Whether the peer of `watch` has been closed.
    fn peer_closed(watch: &std::os::unix::net::UnixStream) -> bool {
        let mut buf = [0u8; 1];
        match (&*watch).read(&mut buf) {
            Ok(0) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            other => panic!("unexpected probe read {other:?}"),
        }
    }

    fn pops_across_the_avail_index_wrap<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        driver.avail_idx = 65534;
        vring.set_queue_next_avail(65534);
        vring.set_queue_next_used(65534);
        driver.offer(4);
        let heads = pop_all(&vring);
        assert_eq!(heads, vec![14, 15, 0, 1]);
        assert_eq!(vring.queue_next_avail(), 2);
        vring.add_used_batch(heads.iter().map(|&h| (h, 0))).unwrap();
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(driver.used_elem(65535), (15, 0));
        assert_eq!(driver.used_elem(0), (0, 0));
    }

    fn replaced_eventfds_are_closed<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let setters: [fn(&V, Option<File>); 3] = [V::set_kick, V::set_call, V::set_err];
        for set in setters {
            let (first, first_watch) = closing_probe();
            set(&vring, Some(first));
            assert!(!peer_closed(&first_watch));
            // Replacing with a fresh fd many times keeps only the newest one.
            let mut watches = Vec::new();
            for _ in 0..100 {
                let (next, watch) = closing_probe();
                set(&vring, Some(next));
                watches.push(watch);
            }
            assert!(peer_closed(&first_watch));
            let (last, older) = watches.split_last().unwrap();
            assert!(older.iter().all(peer_closed));
            assert!(!peer_closed(last));
            set(&vring, None);
            assert!(peer_closed(last));
        }
    }

    fn reset_closes_the_eventfds<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let (kick, kick_watch) = closing_probe();
        let (call, call_watch) = closing_probe();
        let (err, err_watch) = closing_probe();
        vring.set_kick(Some(kick));
        vring.set_call(Some(call));
        vring.set_err(Some(err));
        vring.reset();
        assert!(peer_closed(&kick_watch));
        assert!(peer_closed(&call_watch));
        assert!(peer_closed(&err_watch));
    }

    fn new_refuses_bad_max_sizes<V: VringT<Mem>>() {
        let mem = Driver::new().mem;
        for max in [0, 3, 65535] {
            let err = V::new(mem.clone(), max).err().unwrap();
            assert!(matches!(err, Error::InvalidMaxQueueSize { max: m } if m == max));
        }
    }

    fn new_vring_is_stopped_disabled_and_at_max_size<V: VringT<Mem>>() {
        let vring = V::new(Driver::new().mem, MAX).unwrap();
        assert_eq!(vring.ring_state(), RingState::Stopped);
        assert!(!vring.is_enabled());
        assert_eq!(vring.queue_size(), MAX);
        assert!(!vring.event_idx());
    }

    fn largest_max_size_is_accepted<V: VringT<Mem>>() {
        let vring = V::new(Driver::new().mem, MAX_QUEUE_SIZE).unwrap();
        vring.set_queue_size(MAX_QUEUE_SIZE).unwrap();
        assert_eq!(vring.queue_size(), MAX_QUEUE_SIZE);
    }

    fn queue_size_zero_is_refused<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let err = vring.set_queue_size(0).unwrap_err();
        assert!(matches!(err, Error::InvalidQueueSize { size: 0, max: MAX }));
        assert_eq!(vring.queue_size(), SIZE);
    }

    fn queue_size_not_power_of_two_is_refused<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let err = vring.set_queue_size(3).unwrap_err();
        assert!(matches!(err, Error::InvalidQueueSize { size: 3, max: MAX }));
        assert_eq!(vring.queue_size(), SIZE);
    }

    fn queue_size_65535_is_refused<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let err = vring.set_queue_size(65535).unwrap_err();
        assert!(matches!(err, Error::InvalidQueueSize { size: 65535, .. }));
        assert_eq!(vring.queue_size(), SIZE);
    }

    fn queue_size_above_max_is_refused<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let err = vring.set_queue_size(2 * MAX).unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidQueueSize {
                size: 512,
                max: MAX
            }
        ));
        assert_eq!(vring.queue_size(), SIZE);
    }

    fn queue_info_is_stored<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        assert_eq!(vring.queue_info(), (DESC, AVAIL, USED));
        assert_eq!(vring.get_ref().get_queue().used_ring(), USED);
    }

    fn misaligned_used_ring_is_refused_and_nothing_changes<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let err = vring.set_queue_info(0x8000, 0x9000, 0xa002).unwrap_err();
        assert!(matches!(
            err,
            Error::MisalignedRing {
                part: RingPart::Used,
                addr: 0xa002
            }
        ));
        assert_eq!(vring.queue_info(), (DESC, AVAIL, USED));
    }

    fn pops_offered_chains_in_order<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        driver.offer(3);
        assert_eq!(pop_all(&vring), vec![0, 1, 2]);
        assert_eq!(vring.queue_next_avail(), 3);
    }

    fn add_used_writes_used_ring_and_index<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        driver.offer(1);
        let head = pop_all(&vring)[0];
        vring.add_used(head, 42).unwrap();
        assert_eq!(driver.used_elem(0), (u32::from(head), 42));
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(vring.queue_next_used(), 1);
        assert_eq!(vring.queue_used_idx().unwrap(), 1);
    }

    fn add_used_out_of_range_head_is_refused<V: VringT<Mem>>() {
        let (vring, driver) = started::<V>();
        let err = vring.add_used(SIZE, 1).unwrap_err();
        assert!(matches!(err, Error::AddUsed { head: SIZE, .. }));
        assert_eq!(driver.used_idx(), 0);
    }

    fn batch_without_event_idx_signals_once<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        let (call, observer) = eventfd_pair();
        vring.set_call(Some(call));
        driver.offer(8);
        let heads = pop_all(&vring);
        let added = vring
            .add_used_batch(heads.iter().map(|&h| (h, BUF_LEN)))
            .unwrap();
        assert_eq!(added, 8);
        assert!(vring.signal_used_queue_if_needed().unwrap());
        assert_eq!(driver.used_idx(), 8);
        assert_eq!(counter(&observer), 1);
    }

    fn second_decision_without_new_entries_does_not_signal<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        let (call, observer) = eventfd_pair();
        vring.set_call(Some(call));
        driver.offer(2);
        let heads = pop_all(&vring);
        vring.add_used_batch(heads.iter().map(|&h| (h, 0))).unwrap();
        assert!(vring.signal_used_queue_if_needed().unwrap());
        assert!(!vring.signal_used_queue_if_needed().unwrap());
        assert_eq!(counter(&observer), 1);
    }

    fn no_interrupt_flag_suppresses_the_signal<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        let (call, observer) = eventfd_pair();
        vring.set_call(Some(call));
        driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
        driver.offer(4);
        let heads = pop_all(&vring);
        vring.add_used_batch(heads.iter().map(|&h| (h, 0))).unwrap();
        assert!(!vring.signal_used_queue_if_needed().unwrap());
        assert_eq!(counter(&observer), 0);
    }

    fn event_idx_used_event_inside_batch_signals_once<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.set_queue_event_idx(true);
        let (call, observer) = eventfd_pair();
        vring.set_call(Some(call));
        // The driver wants an interrupt once entry 5 is used; the batch covers 0..8.
        driver.set_used_event(5);
        driver.offer(8);
        let heads = pop_all(&vring);
        vring.add_used_batch(heads.iter().map(|&h| (h, 0))).unwrap();
        assert!(vring.signal_used_queue_if_needed().unwrap());
        assert_eq!(counter(&observer), 1);
    }

    fn event_idx_used_event_at_batch_end_is_not_yet_crossed<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.set_queue_event_idx(true);
        // Entries 0..4 are used (new used idx 4); used_event 4 is crossed only when entry 4
        // is used.
        driver.set_used_event(4);
        driver.offer(4);
        let heads = pop_all(&vring);
        vring.add_used_batch(heads.iter().map(|&h| (h, 0))).unwrap();
        assert!(!vring.needs_notification().unwrap());
    }

    fn event_idx_used_event_before_batch_does_not_signal<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.set_queue_event_idx(true);
        let (call, observer) = eventfd_pair();
        vring.set_call(Some(call));
        driver.set_used_event(0);
        driver.offer(2);
        let first = pop_all(&vring);
        vring.add_used_batch(first.iter().map(|&h| (h, 0))).unwrap();
        // used_event 0 was crossed by the first batch, which was signalled.
        assert!(vring.signal_used_queue_if_needed().unwrap());
        driver.offer(3);
        let second = pop_all(&vring);
        vring
            .add_used_batch(second.iter().map(|&h| (h, 0)))
            .unwrap();
        // The driver did not move used_event: the second batch (2..5) does not cross it.
        assert!(!vring.signal_used_queue_if_needed().unwrap());
        assert_eq!(counter(&observer), 1);
    }

    fn event_idx_ignores_no_interrupt_flag<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.set_queue_event_idx(true);
        driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
        driver.set_used_event(0);
        driver.offer(1);
        let heads = pop_all(&vring);
        vring.add_used(heads[0], 0).unwrap();
        assert!(vring.needs_notification().unwrap());
    }

    fn event_idx_window_across_index_wrap_signals<V: VringT<Mem>>() {
        let (vring, driver) = started::<V>();
        vring.set_queue_event_idx(true);
        vring.set_queue_next_used(65534);
        // The batch takes the used index from 65534 to 2 (wrapping); used_event 0 is inside.
        driver.set_used_event(0);
        vring.add_used_batch((0..4).map(|h| (h, 0))).unwrap();
        assert_eq!(vring.queue_next_used(), 2);
        assert!(vring.needs_notification().unwrap());
    }

    fn event_idx_window_across_index_wrap_excludes_later_used_event<V: VringT<Mem>>() {
        let (vring, driver) = started::<V>();
        vring.set_queue_event_idx(true);
        vring.set_queue_next_used(65534);
        driver.set_used_event(2);
        vring.add_used_batch((0..4).map(|h| (h, 0))).unwrap();
        assert!(!vring.needs_notification().unwrap());
    }

    fn unreadable_avail_ring_is_an_error_and_keeps_the_window<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let outside = MEM_LEN as u64;
        vring.set_queue_info(DESC, outside, USED).unwrap();
        vring.add_used(0, 0).unwrap();
        let err = vring.needs_notification().unwrap_err();
        assert!(matches!(err, Error::GuestMemory { addr, .. } if addr == outside));
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        assert!(vring.needs_notification().unwrap());
    }

    fn nothing_added_needs_no_notification<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        assert!(!vring.needs_notification().unwrap());
    }

    fn entries_added_through_the_queue_count_for_notification<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        driver.offer(1);
        let head = pop_all(&vring)[0];
        let mem = driver.mem.memory();
        vring
            .get_mut()
            .get_queue_mut()
            .add_used(mem.deref(), head, 7)
            .unwrap();
        assert!(vring.needs_notification().unwrap());
    }

    fn set_queue_next_used_restarts_the_notification_window<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        vring.set_queue_next_used(9);
        assert_eq!(vring.queue_next_used(), 9);
        assert!(!vring.needs_notification().unwrap());
    }

    fn signal_without_call_fd_is_a_no_op<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        driver.offer(1);
        let head = pop_all(&vring)[0];
        vring.add_used(head, 0).unwrap();
        vring.signal_used_queue().unwrap();
        // Needed, but with no call fd the daemon sends the in-band call.
        assert!(vring.signal_used_queue_if_needed().unwrap());
    }

    fn signal_used_queue_always_writes_call<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let (call, observer) = eventfd_pair();
        vring.set_call(Some(call));
        vring.signal_used_queue().unwrap();
        vring.signal_used_queue().unwrap();
        assert_eq!(counter(&observer), 2);
    }

    fn disable_notification_sets_no_notify_without_event_idx<V: VringT<Mem>>() {
        let (vring, driver) = started::<V>();
        vring.disable_notification().unwrap();
        assert_eq!(driver.used_flags(), 1);
        assert!(!vring.enable_notification().unwrap());
        assert_eq!(driver.used_flags(), 0);
    }

    fn enable_notification_reports_chains_offered_meanwhile<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.disable_notification().unwrap();
        driver.offer(1);
        assert!(vring.enable_notification().unwrap());
    }

    fn enable_notification_with_event_idx_publishes_avail_event<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.set_queue_event_idx(true);
        driver.offer(3);
        pop_all(&vring);
        assert!(!vring.enable_notification().unwrap());
        assert_eq!(driver.avail_event(), 3);
    }

    fn held_kicks_stay_suppressed_until_released<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.get_mut().hold_kicks().unwrap();
        assert_eq!(driver.used_flags(), 1);
        // A device's own re-enable leaves them suppressed while the poller holds them.
        assert!(!vring.enable_notification().unwrap());
        assert_eq!(driver.used_flags(), 1);
        driver.offer(1);
        // The release re-enables and reports the chain no kick announced.
        assert!(vring.get_mut().release_kicks().unwrap());
        assert_eq!(driver.used_flags(), 0);
    }

    fn held_kicks_with_event_idx_leave_avail_event_behind<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.set_queue_event_idx(true);
        driver.offer(3);
        pop_all(&vring);
        assert!(!vring.enable_notification().unwrap());
        assert_eq!(driver.avail_event(), 3);
        vring.get_mut().hold_kicks().unwrap();
        driver.offer(2);
        pop_all(&vring);
        assert!(!vring.enable_notification().unwrap());
        assert_eq!(driver.avail_event(), 3);
        assert!(!vring.get_mut().release_kicks().unwrap());
        assert_eq!(driver.avail_event(), 5);
    }

    fn reset_ends_a_hold<V: VringT<Mem>>() {
        let (vring, driver) = started::<V>();
        vring.get_mut().hold_kicks().unwrap();
        vring.get_mut().reset();
        vring.set_queue_size(SIZE).unwrap();
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.disable_notification().unwrap();
        assert!(!vring.enable_notification().unwrap());
        assert_eq!(driver.used_flags(), 0);
    }

    fn event_idx_processing_loop_drains_the_queue<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        vring.set_queue_event_idx(true);
        driver.offer(5);
        let mut done = 0;
        loop {
            vring.disable_notification().unwrap();
            while let Some(chain) = vring.pop_descriptor_chain() {
                vring.add_used(chain.head_index(), 0).unwrap();
                done += 1;
            }
            if !vring.enable_notification().unwrap() {
                break;
            }
        }
        assert_eq!(done, 5);
        assert_eq!(driver.used_idx(), 5);
    }

    fn reference_shaped_guard_access_works<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        let (kick, _peer) = eventfd_pair();
        vring.set_kick(Some(kick));
        assert!(vring.get_ref().get_kick().is_some());
        driver.offer(2);
        let mem = driver.mem.memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem.clone())
            .unwrap()
            .collect();
        for chain in chains {
            vring
                .get_mut()
                .get_queue_mut()
                .add_used(mem.deref(), chain.head_index(), 1)
                .unwrap();
            vring.signal_used_queue().unwrap();
        }
        assert_eq!(vring.get_ref().get_queue().next_used(), 2);
    }

    fn read_kick_consumes_the_counter_and_reports_enabled<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let (kick, driver_side) = eventfd_pair();
        vring.set_kick(Some(kick));
        (&driver_side).write_all(&3u64.to_ne_bytes()).unwrap();
        assert!(vring.read_kick().unwrap());
        assert_eq!(counter(&driver_side), 0);
    }

    fn read_kick_on_disabled_ring_reports_disabled<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        vring.set_enabled(false);
        let (kick, driver_side) = eventfd_pair();
        vring.set_kick(Some(kick));
        (&driver_side).write_all(&1u64.to_ne_bytes()).unwrap();
        assert!(!vring.read_kick().unwrap());
    }

    fn read_kick_with_empty_counter_is_not_an_error<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let (kick, _driver_side) = eventfd_pair();
        vring.set_kick(Some(kick));
        assert!(vring.read_kick().unwrap());
    }

    fn deliver_kick_adds_to_the_kick_counter<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let (kick, observer) = eventfd_pair();
        vring.set_kick(Some(kick));
        assert!(vring.deliver_kick().unwrap());
        assert_eq!(counter(&observer), 1);
    }

    fn deliver_kick_without_kick_fd_reports_false<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        assert!(!vring.deliver_kick().unwrap());
    }

    fn signal_error_writes_err_fd<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        let (err, observer) = eventfd_pair();
        vring.set_err(Some(err));
        vring.signal_error().unwrap();
        assert_eq!(counter(&observer), 1);
        assert!(vring.get_ref().get_err().is_some());
    }

    fn ring_state_follows_ready_and_enabled<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        assert_eq!(vring.ring_state(), RingState::Enabled);
        vring.set_enabled(false);
        assert_eq!(vring.ring_state(), RingState::Disabled);
        vring.set_queue_ready(false);
        assert!(!vring.ready());
        assert_eq!(vring.ring_state(), RingState::Stopped);
    }

    fn vring_base_round_trips<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        vring.set_queue_next_avail(77);
        assert_eq!(vring.queue_next_avail(), 77);
    }

    fn log_used_covers_the_whole_used_ring<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        assert_eq!(vring.log_used(), None);
        vring.set_log_guest_addr(Some(0x4000));
        assert_eq!(vring.get_ref().log_guest_addr(), Some(0x4000));
        assert_eq!(vring.log_used(), Some(0x4000..0x4000 + 4 + 8 * 16 + 2));
    }

    fn log_used_overflow_is_none<V: VringT<Mem>>() {
        let (vring, _driver) = started::<V>();
        vring.set_log_guest_addr(Some(u64::MAX - 8));
        assert_eq!(vring.log_used(), None);
    }

    fn reset_returns_to_the_initial_state<V: VringT<Mem>>() {
        let (vring, mut driver) = started::<V>();
        let (kick, _k) = eventfd_pair();
        let (call, _c) = eventfd_pair();
        vring.set_kick(Some(kick));
        vring.set_call(Some(call));
        vring.set_queue_event_idx(true);
        vring.set_log_guest_addr(Some(0x4000));
        driver.offer(2);
        let heads = pop_all(&vring);
        vring.add_used(heads[0], 0).unwrap();

        vring.reset();

        let fresh = V::new(driver.mem.clone(), MAX).unwrap();
        assert_eq!(vring.ring_state(), RingState::Stopped);
        assert!(!vring.is_enabled());
        assert_eq!(vring.queue_size(), MAX);
        assert_eq!(vring.queue_info(), fresh.queue_info());
        assert_eq!(vring.queue_next_avail(), 0);
        assert_eq!(vring.queue_next_used(), 0);
        assert!(!vring.event_idx());
        assert!(vring.get_ref().get_kick().is_none());
        assert!(vring.get_ref().get_call().is_none());
        assert_eq!(vring.log_used(), None);
        assert!(!vring.needs_notification().unwrap());
    }

    macro_rules! instantiate {
        ($module:ident, $vring:ty, [$($test:ident),* $(,)?]) => {
            mod $module {
                $(
                    #[test]
                    fn $test() {
                        super::$test::<$vring>();
                    }
                )*
            }
        };
    }

    macro_rules! for_each_vring {
        ($($test:ident),* $(,)?) => {
            instantiate!(state, super::VringState<super::Mem>, [$($test),*]);
            instantiate!(mutex, super::VringMutex<super::Mem>, [$($test),*]);
            instantiate!(rwlock, super::VringRwLock<super::Mem>, [$($test),*]);
        };
    }

    for_each_vring!(
        new_refuses_bad_max_sizes,
        new_vring_is_stopped_disabled_and_at_max_size,
        largest_max_size_is_accepted,
        queue_size_zero_is_refused,
        queue_size_not_power_of_two_is_refused,
        queue_size_65535_is_refused,
        queue_size_above_max_is_refused,
        queue_info_is_stored,
        misaligned_used_ring_is_refused_and_nothing_changes,
        pops_offered_chains_in_order,
        add_used_writes_used_ring_and_index,
        add_used_out_of_range_head_is_refused,
        batch_without_event_idx_signals_once,
        second_decision_without_new_entries_does_not_signal,
        no_interrupt_flag_suppresses_the_signal,
        event_idx_used_event_inside_batch_signals_once,
        event_idx_used_event_at_batch_end_is_not_yet_crossed,
        event_idx_used_event_before_batch_does_not_signal,
        event_idx_ignores_no_interrupt_flag,
        event_idx_window_across_index_wrap_signals,
        event_idx_window_across_index_wrap_excludes_later_used_event,
        unreadable_avail_ring_is_an_error_and_keeps_the_window,
        nothing_added_needs_no_notification,
        entries_added_through_the_queue_count_for_notification,
        set_queue_next_used_restarts_the_notification_window,
        signal_without_call_fd_is_a_no_op,
        signal_used_queue_always_writes_call,
        disable_notification_sets_no_notify_without_event_idx,
        enable_notification_reports_chains_offered_meanwhile,
        enable_notification_with_event_idx_publishes_avail_event,
        event_idx_processing_loop_drains_the_queue,
        held_kicks_stay_suppressed_until_released,
        held_kicks_with_event_idx_leave_avail_event_behind,
        reset_ends_a_hold,
        reference_shaped_guard_access_works,
        read_kick_consumes_the_counter_and_reports_enabled,
        read_kick_on_disabled_ring_reports_disabled,
        read_kick_with_empty_counter_is_not_an_error,
        deliver_kick_adds_to_the_kick_counter,
        deliver_kick_without_kick_fd_reports_false,
        signal_error_writes_err_fd,
        ring_state_follows_ready_and_enabled,
        vring_base_round_trips,
        log_used_covers_the_whole_used_ring,
        log_used_overflow_is_none,
        reset_returns_to_the_initial_state,
        pops_across_the_avail_index_wrap,
        replaced_eventfds_are_closed,
        reset_closes_the_eventfds,
    );

    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn vring_state_is_send() {
        assert_send::<VringState<Mem>>();
    }

    #[test]
    fn locked_vrings_are_send_and_sync() {
        assert_send_sync::<VringMutex<Mem>>();
        assert_send_sync::<VringRwLock<Mem>>();
    }

    #[test]
    fn vring_state_guard_held_across_a_call_panics_instead_of_deadlocking() {
        let (vring, _driver) = started::<VringState<Mem>>();
        let guard = vring.get_mut();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vring.ready()));
        drop(guard);
        assert!(result.is_err());
    }

    /// A backend written the way the reference implementation's users write one: a bare
    /// `&VringMutex` (default memory type), the queue reached through `get_mut()`, and the
    /// chain popped in its own statement so that no guard is held across `add_used`.
    fn reference_style_process_queue(mem: &Mem, vring: &VringMutex) -> Result<usize, Error> {
        let mem = mem.memory();
        let mut done = 0;
        loop {
            let next = vring.get_mut().get_queue_mut().iter(mem.clone())?.next();
            let Some(desc_chain) = next else { break };
            let head_index = desc_chain.head_index();
            vring
                .get_mut()
                .get_queue_mut()
                .add_used(mem.deref(), head_index, 0)?;
            vring.signal_used_queue()?;
            done += 1;
        }
        Ok(done)
    }

    #[test]
    fn reference_style_backend_runs_against_vring_mutex() {
        let (vring, mut driver) = started::<VringMutex>();
        let (call, observer) = eventfd_pair();
        vring.set_call(Some(call));
        driver.offer(3);
        loop {
            vring.disable_notification().unwrap();
            reference_style_process_queue(&driver.mem, &vring).unwrap();
            if !vring.enable_notification().unwrap() {
                break;
            }
        }
        assert_eq!(driver.used_idx(), 3);
        assert_eq!(counter(&observer), 3);
    }

    #[test]
    fn rwlock_vring_completes_chains_from_another_thread() {
        let (vring, mut driver) = started::<VringRwLock>();
        driver.offer(2);
        let heads = pop_all(&vring);
        let worker = vring.clone();
        std::thread::spawn(move || worker.add_used_batch(heads.into_iter().map(|h| (h, 0))))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(driver.used_idx(), 2);
    }

    #[test]
    fn mutex_clones_share_one_vring() {
        let (vring, _driver) = started::<VringMutex<Mem>>();
        let other = vring.clone();
        other.set_queue_next_avail(5);
        assert_eq!(vring.queue_next_avail(), 5);
    }
}
