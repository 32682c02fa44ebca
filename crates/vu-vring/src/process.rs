//! Serving a queue the fast way by default: [`process_queue`] pops every available chain,
//! completes each with the length the device returns, decides once per pass whether the
//! driver needs an interrupt, and re-arms driver notifications (with the `VIRTIO_RING_F_EVENT_IDX`
//! re-check), all under one lock of the vring.
//!
//! A device's `handle_event` for a kick then reads:
//!
//! ```
//! use std::io;
//! use vu_vring::{process_queue, VringMutex};
//!
//! fn on_kick(vring: &VringMutex) -> io::Result<()> {
//!     // A null device: every chain is "done", reporting nothing written.
//!     process_queue(vring, |_chain| 0);
//!     Ok(())
//! }
//! ```
//!
//! Measured against a device that signals after every chain, one decision per pass is what
//! takes a queue from one interrupt per request to one per batch (see docs/performance.md).

use vm_memory::GuestAddressSpace;

use crate::{Chain, Error, VringData, VringT};

/// Serves every chain available in `vring` with `serve`, which returns the number of bytes it
/// wrote into the chain (the used length); returns how many chains were completed. The
/// chains borrow one snapshot of guest memory taken for the call.
///
/// The loop is the one the virtio specification asks of a device that suppresses
/// notifications while it works:
///
/// 1. ask the driver not to kick (`VRING_USED_F_NO_NOTIFY`; with EVENT_IDX nothing to do);
/// 2. pop each available chain, call `serve`, put it in the used ring
///    ([`VringData::serve_available`]);
/// 3. decide once whether the driver wants an interrupt for the entries of this pass
///    ([`VringData::signal_used_queue_if_needed`])
///    and write the call eventfd at most once (while the driver is known to run on another
///    CPU, [`VringData::set_driver_concurrent`], also after every round of 8 chains, so
///    that it reaps the first ones while the rest are served);
/// 4. re-enable kicks (with EVENT_IDX: publish `avail_event`) and look at the ring again: a
///    chain made available meanwhile, whose kick the driver may have skipped, starts another
///    pass.
///
/// The vring is locked once for the whole call, so `serve` must not call methods of the same
/// vring (it would deadlock, or panic for [`VringState`](crate::VringState)); it may use
/// the chain's memory freely.
///
/// A ring the driver broke is the driver's problem, not a reason to stop the device: when a
/// part of the ring is not in guest memory, or its available index is more than the queue
/// size ahead of the device's (nothing can be popped, and looping would spin), the call logs
/// one warning with the typed [`Error`], writes the ring's error eventfd
/// (`VHOST_USER_SET_VRING_ERR`, if the frontend gave one), and returns; chains completed
/// before stay completed, and the ring is looked at again at its next kick. An available
/// entry whose head index is past the descriptor table is skipped with a warning.
///
/// Behind an IOMMU, a translation missing from the IOTLB is asked for with the vring
/// unlocked: the chain that needs it is put back, the lock released, the frontend asked and
/// its answer waited for (bounded, [`Iommu::translate`](crate::Iommu::translate)), then the
/// ring is served again; a miss the frontend does not answer in time fails the chain that
/// needs it.
///
/// With inflight I/O tracking on for the ring (see [`VringData::restart`]), the chains found
/// in flight at the restart are served first, oldest first, and every chain is recorded in
/// the inflight area before `serve` sees it and cleared after its used element is
/// published; the device writes nothing for it.
///
/// # Example
///
/// A device that fills every writable buffer with zeros, called from its `handle_event`:
///
/// ```
/// use vu_vring::vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};
/// use vu_vring::{process_queue, VringMutex, VringT};
///
/// fn serve_zeroes(vring: &VringMutex) -> usize {
///     process_queue(vring, |chain| {
///         let mut written = 0;
///         for desc in chain.clone().writable() {
///             let zeroes = vec![0u8; desc.len() as usize];
///             // An address outside guest memory is an error to report, never a crash.
///             if chain.memory().write_slice(&zeroes, desc.addr()).is_err() {
///                 break;
///             }
///             written += desc.len();
///         }
///         written // the used length the driver reads
///     })
/// }
///
/// let vring = VringMutex::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 256).unwrap();
/// // A ring the frontend has not started has nothing to serve.
/// assert_eq!(serve_zeroes(&vring), 0);
/// ```
///
/// `vu_backend::testing` drives such a device with real chains, without QEMU.
pub fn process_queue<M, V, F>(vring: &V, mut serve: F) -> usize
where
    M: GuestAddressSpace,
    V: VringT<M> + ?Sized,
    F: FnMut(Chain<'_, M::M>) -> u32,
{
    // The device's closure itself, not one that wraps it: each chain moves once.
    serve_queue(vring, &mut serve)
}

/// What a device did with a chain [`process_queue_async`] (or
/// [`VringData::serve_available_async`]) handed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Served: the chain goes into the used ring now, with this used length (the bytes the
    /// device wrote into it).
    Now(u32),
    /// Taken: the device has copied out what it needs (the chain's descriptors, its head
    /// index) and completes it later, from any thread and in any order, with
    /// [`VringData::complete_deferred`] under the vring's lock, then
    /// [`VringData::signal_used_queue_if_needed`].
    Later,
}

impl From<u32> for Completion {
    /// A used length: the chain is served now ([`Completion::Now`]).
    fn from(len: u32) -> Self {
        Completion::Now(len)
    }
}

/// How many IOTLB misses one call of [`process_queue_async`] asks the frontend for before it
/// fails the chain that needs the next one (each is answered, then invalidated again before
/// the ring is served: a frontend that does this forever must not keep the worker here).
const MAX_MISSES: usize = 256;

/// [`process_queue`] for a device that completes chains later and out of order: `serve`
/// returns [`Completion::Now`] with the used length, or [`Completion::Later`] for a chain the
/// device keeps (a request handed to a thread pool, say). Returns how many chains were handed
/// to `serve`.
///
/// Inflight I/O tracking covers the chains taken for later: each is recorded before `serve`
/// sees it and cleared only when [`VringData::complete_deferred`] puts it in the used ring,
/// so after a crash exactly the chains not completed are served again, whatever order the
/// others were completed in. The device must complete every chain it took before the ring
/// stops: vu-daemon calls `VhostUserBackend::stop_vring` for that before it tells the
/// frontend where the ring stopped, and before a reset or a disconnect.
///
/// # Example
///
/// A device that completes every chain from another thread, after the kick's pass:
///
/// ```
/// use vu_vring::{process_queue_async, Completion, VringMutex, VringT};
///
/// fn on_kick(vring: &VringMutex) {
///     let mut taken = Vec::new();
///     process_queue_async(vring, |chain| {
///         taken.push(chain.head_index());
///         Completion::Later
///     });
///     let vring = vring.clone();
///     std::thread::spawn(move || {
///         // ... the requests are served here, then completed in any order ...
///         let mut data = vring.get_mut();
///         let done = taken.iter().rev().map(|&head| (head, 0));
///         if data.complete_deferred(done).is_ok() {
///             let _ = data.signal_used_queue_if_needed();
///         }
///     })
///     .join()
///     .unwrap();
/// }
/// # use vu_vring::vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
/// # on_kick(&VringMutex::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 256).unwrap());
/// ```
pub fn process_queue_async<M, V, F>(vring: &V, mut serve: F) -> usize
where
    M: GuestAddressSpace,
    V: VringT<M> + ?Sized,
    F: FnMut(Chain<'_, M::M>) -> Completion,
{
    serve_queue(vring, &mut serve)
}

/// [`process_queue_async`] for a `serve` returning anything that converts into a
/// [`Completion`] (a used length is [`Completion::Now`]).
fn serve_queue<M, V, F, R>(vring: &V, serve: &mut F) -> usize
where
    M: GuestAddressSpace,
    V: VringT<M> + ?Sized,
    F: FnMut(Chain<'_, M::M>) -> R,
    R: Into<Completion>,
{
    let mut completed = 0;
    // An IOVA the frontend did not answer in time: one more try, in which its miss fails
    // what needs it.
    let mut unanswered = None;
    // Misses asked for in this call: a bound, should invalidations keep undoing the answers.
    let mut asked = 0;
    loop {
        let mut guard = vring.get_mut();
        let data = &mut *guard;
        if asked > 0 && !data.ready() {
            // Stopped (GET_VRING_BASE) while the miss was asked: the chain it put back is
            // still available, after the index the frontend was given.
            return completed;
        }
        data.set_unanswered(unanswered);
        let result = serve_passes(data, serve, &mut completed);
        data.set_unanswered(None);
        let err = match result {
            Ok(()) => return completed,
            Err(err) => err,
        };
        // Behind an IOMMU, a miss put its chain back (or stopped before a ring access): the
        // frontend is asked and its answer waited for without the ring's lock, so that the
        // connection thread and the device's other threads can use the ring meanwhile.
        if let (Error::IommuMiss { iova, access }, Some(iommu)) = (&err, data.iommu()) {
            if unanswered != Some(*iova) {
                let (iova, access) = (*iova, *access);
                drop(guard);
                asked += 1;
                let answered = asked <= MAX_MISSES && iommu.translate(iova, 1, access).is_ok();
                unanswered = (!answered).then_some(iova);
                continue;
            }
        }
        log::warn!("ring not served: {err}; left alone until its next kick");
        if let Err(e) = data.signal_error() {
            log::warn!("cannot write the ring's error eventfd: {e}");
        }
        return completed;
    }
}

/// The passes of [`process_queue_async`], counting the chains handed out in `completed`.
fn serve_passes<M, F, R>(
    data: &mut VringData<M>,
    serve: &mut F,
    completed: &mut usize,
) -> Result<(), Error>
where
    M: GuestAddressSpace,
    F: FnMut(Chain<'_, M::M>) -> R,
    R: Into<Completion>,
{
    // One memory snapshot for the whole call: the chains borrow it, so popping and completing
    // a chain touches no reference count.
    let snapshot = data.mem().memory();
    let mem: &M::M = &snapshot;
    let mut empty_passes = 0;
    loop {
        data.disable_notification()?;
        let used_before = data.queue_next_used();
        // Entries added here count for the interrupt decision below too.
        let served = match data.serve_pass(mem, serve) {
            Ok(n) => n,
            Err(err) => {
                // The chains completed before the error are counted and signalled. A pass
                // completes at most a queue size of them, so the u16 difference is exact.
                *completed += usize::from(data.queue_next_used().wrapping_sub(used_before));
                data.signal_used_queue_if_needed()?;
                return Err(err);
            }
        };
        *completed += served;
        data.signal_used_queue_if_needed()?;
        if !data.enable_notification()? {
            return Ok(());
        }
        // The re-check saw chains. If they were published after this pass popped its last
        // one, the next pass serves them; if two passes in a row served nothing, the ring's
        // available index cannot be popped from: more than the queue size ahead of the
        // device's.
        empty_passes = if served == 0 { empty_passes + 1 } else { 0 };
        if empty_passes == 2 {
            return Err(Error::InvalidAvailIndex {
                next_avail: data.queue_next_avail(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use crate::{MidPassInterrupt, VringMutex};

    type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn started() -> (VringMutex<Mem>, Mem) {
        started_sized(SIZE)
    }

    fn started_sized(size: u16) -> (VringMutex<Mem>, Mem) {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let vring = VringMutex::<Mem>::new(mem.clone(), 256).unwrap();
        vring.set_queue_size(size).unwrap();
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        (vring, mem)
    }

    /// Offers chains `0..n` of one 8-byte writable descriptor each.
    fn offer(mem: &Mem, n: u16) {
        let m = mem.memory();
        for i in 0..n {
            let desc = Descriptor::new(0x8000 + 8 * u64::from(i), 8, 2, 0);
            m.write_obj(desc, GuestAddress(DESC + 16 * u64::from(i)))
                .unwrap();
            m.write_obj(i.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        m.write_obj(n.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    }

    /// Runs `process_queue` on another thread and waits for it at most ten seconds.
    fn process_bounded(vring: VringMutex<Mem>) -> (VringMutex<Mem>, usize) {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let result = process_queue(&vring, |chain| chain.map(|d| d.len()).sum());
            let _ = tx.send((vring, result));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("process_queue did not return")
    }

    /// Chains per round while the driver runs concurrently.
    const ROUND: usize = crate::state::CONCURRENT_ROUND;

    /// Interrupt cadence: a ring of 64 entries with EVENT_IDX and a call eventfd, 40 chains
    /// offered, the driver's `used_event` at `used_event`.
    fn cadence_ring(concurrent: bool, used_event: u16) -> (VringMutex<Mem>, Mem, std::fs::File) {
        const CADENCE_SIZE: u16 = 64;
        let (vring, mem) = started_sized(CADENCE_SIZE);
        vring.set_queue_event_idx(true);
        let (call, observer) = crate::testutil::eventfd_pair();
        vring.set_call(Some(call));
        vring.get_mut().set_driver_concurrent(concurrent);
        let used_event_at = AVAIL + 4 + 2 * u64::from(CADENCE_SIZE);
        mem.memory()
            .write_obj(used_event.to_le(), GuestAddress(used_event_at))
            .unwrap();
        offer(&mem, 40);
        (vring, mem, observer)
    }

    /// The call eventfd's count since the last look (0 when not written).
    fn calls(observer: &std::fs::File) -> u64 {
        let mut buf = [0u8; 8];
        match std::io::Read::read(&mut &*observer, &mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            _ => 0,
        }
    }

    /// Serves the cadence ring, recording for each chain (head index) the used index the
    /// driver could see and the calls written so far while it was served.
    fn serve_recording(
        vring: &VringMutex<Mem>,
        mem: &Mem,
        observer: &std::fs::File,
    ) -> Vec<(u16, u64)> {
        let mut seen = Vec::new();
        let mut signalled = 0;
        let served = process_queue(vring, |_chain| {
            let used: u16 = mem.memory().read_obj(GuestAddress(USED + 2)).unwrap();
            signalled += calls(observer);
            seen.push((u16::from_le(used), signalled));
            0
        });
        assert_eq!(served, 40);
        seen
    }

    #[test]
    fn a_concurrent_driver_is_interrupted_after_the_first_round_of_a_pass() {
        // The driver sleeps waiting for the very next completion (used_event 0).
        let (vring, mem, observer) = cadence_ring(true, 0);
        let seen = serve_recording(&vring, &mem, &observer);
        // While the second round is served the first is published and the driver was
        // interrupted once; it is not interrupted again for the rest of the pass (its
        // used_event stays behind).
        assert_eq!(seen[ROUND - 1], (0, 0));
        assert_eq!(seen[ROUND], (ROUND as u16, 1));
        assert_eq!(seen[3 * ROUND], (3 * ROUND as u16, 1));
        assert_eq!(calls(&observer), 0, "one interrupt in all");
        assert_eq!(vring.queue_used_idx().unwrap(), 40);
    }

    #[test]
    fn a_driver_not_known_to_be_concurrent_is_interrupted_once_at_the_end_of_the_pass() {
        let (vring, mem, observer) = cadence_ring(false, 0);
        let seen = serve_recording(&vring, &mem, &observer);
        // One round: nothing published and no interrupt while the pass runs.
        assert!(seen.iter().all(|&s| s == (0, 0)), "{seen:?}");
        assert_eq!(calls(&observer), 1);
        assert_eq!(vring.queue_used_idx().unwrap(), 40);
    }

    #[test]
    fn a_concurrent_driver_that_asked_for_no_interrupt_gets_none_from_the_rounds() {
        // used_event ahead of this pass: the driver is busy and wants an interrupt later.
        let (vring, mem, observer) = cadence_ring(true, 100);
        let seen = serve_recording(&vring, &mem, &observer);
        assert!(seen.iter().all(|&(_, signalled)| signalled == 0));
        assert_eq!(calls(&observer), 0);
    }

    #[test]
    fn a_concurrent_driver_that_rearms_mid_pass_is_interrupted_for_the_next_round() {
        let (vring, mem, observer) = cadence_ring(true, 0);
        let used_event_at = AVAIL + 4 + 2 * 64;
        let mut signalled = 0;
        let mut at = Vec::new();
        process_queue(&vring, |chain| {
            signalled += calls(&observer);
            at.push(signalled);
            if usize::from(chain.head_index()) == ROUND + 1 {
                // The driver woke for the first round, reaped it and armed for the next
                // completion (Linux's virtqueue_enable_cb after its drain).
                mem.memory()
                    .write_obj((ROUND as u16).to_le(), GuestAddress(used_event_at))
                    .unwrap();
            }
            0
        });
        // Interrupted after round 1 and after round 2 (which crosses the new used_event).
        assert_eq!((at[ROUND], at[2 * ROUND]), (1, 2));
        assert_eq!(calls(&observer), 0);
    }

    #[test]
    fn a_mid_pass_interrupt_is_unanswered_while_the_driver_has_not_touched_the_ring() {
        // One CPU: the driver, woken by the first round, has not run by the end of the pass.
        let (vring, mem, observer) = cadence_ring(true, 0);
        serve_recording(&vring, &mem, &observer);
        assert_eq!(
            vring.get_mut().take_mid_pass_interrupt(),
            MidPassInterrupt::Unanswered
        );
        assert_eq!(
            vring.get_mut().take_mid_pass_interrupt(),
            MidPassInterrupt::NotSent,
            "cleared once read"
        );
    }

    #[test]
    fn a_mid_pass_interrupt_is_answered_once_the_driver_reaps_after_it() {
        let (vring, mem, observer) = cadence_ring(true, 0);
        let used_event_at = AVAIL + 4 + 2 * 64;
        process_queue(&vring, |chain| {
            if usize::from(chain.head_index()) == 2 * ROUND {
                // Another CPU: the driver woke for the first round and re-armed after it.
                mem.memory()
                    .write_obj((ROUND as u16).to_le(), GuestAddress(used_event_at))
                    .unwrap();
            }
            0
        });
        assert!(calls(&observer) > 0);
        assert_eq!(
            vring.get_mut().take_mid_pass_interrupt(),
            MidPassInterrupt::Answered
        );
    }

    #[test]
    fn a_mid_pass_interrupt_is_answered_by_chains_posted_after_it() {
        let (vring, mem, observer) = cadence_ring(true, 0);
        serve_recording(&vring, &mem, &observer);
        // The driver posts after the pass (and before the device looks).
        offer(&mem, 41);
        assert_eq!(
            vring.get_mut().take_mid_pass_interrupt(),
            MidPassInterrupt::Answered
        );
    }

    #[test]
    fn a_pass_that_interrupts_only_at_its_end_records_nothing() {
        // Not known concurrent: one decision, at the end.
        let (vring, mem, observer) = cadence_ring(false, 0);
        serve_recording(&vring, &mem, &observer);
        assert_eq!(
            vring.get_mut().take_mid_pass_interrupt(),
            MidPassInterrupt::NotSent
        );
        // Concurrent, but the driver asked for no interrupt during the pass.
        let (vring, mem, observer) = cadence_ring(true, 100);
        serve_recording(&vring, &mem, &observer);
        assert_eq!(
            vring.get_mut().take_mid_pass_interrupt(),
            MidPassInterrupt::NotSent
        );
    }

    #[test]
    fn spaced_round_interrupts_wait_for_the_spacing_after_each_one() {
        let (vring, mem, observer) = cadence_ring(true, 0);
        vring.get_mut().space_round_interrupts(2 * ROUND as u16);
        let used_event_at = AVAIL + 4 + 2 * 64;
        let mut signalled = 0;
        let mut at = Vec::new();
        process_queue(&vring, |chain| {
            signalled += calls(&observer);
            at.push(signalled);
            let head = usize::from(chain.head_index());
            if head % ROUND == 1 && head > ROUND {
                // A driver that re-arms after each reap: armed for the next completion.
                let next = (head - head % ROUND) as u16;
                mem.memory()
                    .write_obj(next.to_le(), GuestAddress(used_event_at))
                    .unwrap();
            }
            0
        });
        // Interrupted after round 1, then not after round 2 (one round since) but after
        // round 3; the rounds between still publish the used index.
        assert_eq!((at[ROUND], at[2 * ROUND], at[3 * ROUND]), (1, 1, 2));
        assert_eq!(calls(&observer), 1, "the end of the pass decides");
        assert_eq!(vring.queue_used_idx().unwrap(), 40);
    }

    /// The cadence ring polled (the poller holds the kicks), its tail wait set to `wait`.
    fn polled_ring(used_event: u16, wait: Duration) -> (VringMutex<Mem>, Mem, std::fs::File) {
        let (vring, mem, observer) = cadence_ring(true, used_event);
        vring.get_mut().hold_kicks().unwrap();
        vring.get_mut().set_tail_wait(wait);
        (vring, mem, observer)
    }

    /// Longer than any test: the tail wait never runs out.
    const NO_DEADLINE: Duration = Duration::from_secs(3600);

    #[test]
    fn a_polled_pass_leaves_its_last_round_until_the_driver_has_reaped_and_armed() {
        // The driver armed at 5 once (it moves used_event: it arms for interrupts).
        let (vring, mem, observer) = polled_ring(5, NO_DEADLINE);
        // Rounds until a round's worth is left: the driver has not reaped what they used.
        assert_eq!(process_queue(&vring, |_| 0), 40 - ROUND);
        assert_eq!(vring.queue_used_idx().unwrap(), (40 - ROUND) as u16);
        assert_eq!(calls(&observer), 1, "interrupted for the first round");
        // Found again by the poller while the driver still reaps: left again.
        assert_eq!(process_queue(&vring, |_| 0), 0);
        // The driver has reaped them and armed for the next completion: the tail is served,
        // and the driver interrupted for it.
        let used_event_at = AVAIL + 4 + 2 * 64;
        mem.memory()
            .write_obj(((40 - ROUND) as u16).to_le(), GuestAddress(used_event_at))
            .unwrap();
        assert_eq!(process_queue(&vring, |_| 0), ROUND);
        assert_eq!(vring.queue_used_idx().unwrap(), 40);
        assert_eq!(calls(&observer), 1);
    }

    #[test]
    fn a_pass_that_is_not_polled_serves_its_last_round_at_once() {
        let (vring, _mem, _observer) = cadence_ring(true, 5);
        vring.get_mut().set_tail_wait(NO_DEADLINE);
        assert_eq!(process_queue(&vring, |_| 0), 40);
    }

    #[test]
    fn a_driver_that_never_moves_used_event_is_not_waited_for() {
        // A polling driver leaves used_event where it is.
        let (vring, _mem, _observer) = polled_ring(0, NO_DEADLINE);
        assert_eq!(process_queue(&vring, |_| 0), 40);
    }

    #[test]
    fn a_driver_that_does_not_arm_in_time_gets_the_tail_and_is_not_waited_for_again() {
        let (vring, mem, _observer) = polled_ring(5, Duration::ZERO);
        assert_eq!(process_queue(&vring, |_| 0), 40 - ROUND);
        // The wait ran out: the tail is served without the driver having armed.
        assert_eq!(process_queue(&vring, |_| 0), ROUND);
        // Its used_event has not moved since: the next pass leaves nothing.
        offer(&mem, 48);
        assert_eq!(process_queue(&vring, |_| 0), ROUND);
        assert_eq!(vring.queue_used_idx().unwrap(), 48);
    }

    #[test]
    fn completes_every_offered_chain_with_the_served_length() {
        let (vring, mem) = started();
        offer(&mem, 5);
        let (vring, result) = process_bounded(vring);
        assert_eq!(result, 5);
        assert_eq!(vring.queue_next_used(), 5);
        let used_len: u32 = mem.memory().read_obj(GuestAddress(USED + 4 + 4)).unwrap();
        assert_eq!(u32::from_le(used_len), 8);
    }

    #[test]
    fn available_index_beyond_the_ring_returns_instead_of_spinning() {
        let (vring, mem) = started();
        // More than the queue size ahead of the device's next index: nothing can be popped,
        // yet the re-check after each pass sees "new" chains.
        mem.memory()
            .write_obj((SIZE + 1).to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        let (vring, result) = process_bounded(vring);
        assert_eq!(result, 0);
        assert_eq!(vring.queue_next_avail(), 0);
        // Once the driver republishes a valid index, the queue is served again.
        offer(&mem, 3);
        let (_, result) = process_bounded(vring);
        assert_eq!(result, 3);
    }

    #[test]
    fn ring_outside_guest_memory_is_reported_on_the_error_eventfd() {
        let (vring, mem) = started();
        offer(&mem, 2);
        // The used ring now lies past the end of guest memory.
        vring.set_queue_info(DESC, AVAIL, 0x2_0000).unwrap();
        let (err, observer) = crate::testutil::eventfd_pair();
        vring.set_err(Some(err));
        let (_vring, result) = process_bounded(vring);
        assert_eq!(result, 0);
        let mut buf = [0u8; 8];
        std::io::Read::read_exact(&mut &observer, &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1);
    }
}
