//! Worker threads: which thread serves which queue, the table of watched kick eventfds, the
//! dispatch of one epoll event to the backend, and the thread loop.
//!
//! # Kicks and ring states
//!
//! A queue's kick eventfd is in its worker's epoll set from `watch_kick` to `unwatch_kick`.
//! The worker keeps its own duplicate of the fd, so the registration stays valid (and can be
//! removed) even after the vring's own copy was replaced or closed.
//!
//! Kicks are watched *edge-triggered*: each write of the driver to the eventfd is reported
//! once, so the worker does not read the counter back (one system call less per kick than a
//! level-triggered watch, which must empty the counter or be woken again). The counter only
//! grows; an eventfd counter holds 2^64 - 2 kicks, which no driver reaches.
//!
//! When the kick fires and the ring is enabled, the worker calls `handle_event(queue, ..)`.
//! When the ring is disabled, it *parks* the fd (keeps it registered with no events, so epoll
//! stops reporting it). After every frontend message the runtime re-arms the parked fds of
//! rings that are now enabled ([`Worker::rearm`]); re-arming (`EPOLL_CTL_MOD`) looks at the fd
//! again, and its counter, never read, is non-zero, so the kick is reported at once. (A kick
//! that arrived while the ring was disabled is therefore never lost; re-arming may also report
//! a kick that was already served, which costs the device one look at an empty ring.)
//!
//! An enable that races with a park is never missed. The runtime looks at a worker's table
//! only when the worker's `parked` count says something is parked (so that a message does
//! not wait for a long `handle_event` on an unrelated worker). The two sides are the classic
//! store-buffering pattern, closed with sequentially consistent fences: the worker publishes
//! the count, fences, then reads the enabled flag again (and re-arms itself if the ring was
//! enabled meanwhile); the runtime, after the session stored the flag, fences, then reads the
//! count. At least one of them sees the other's write.
//!
//! # Exclusion
//!
//! The worker holds its table's mutex for the whole of each dispatch (`handle_event` included).
//! The runtime takes the same mutex to watch, unwatch and re-arm kicks, and `quiesce` is
//! nothing more than taking and releasing it: once it is acquired no dispatch is running on
//! that worker, and an unwatched queue can start none (the worker drops events of queues that
//! are no longer armed).
//!
//! # Adaptive polling
//!
//! Every queue has a *polling budget* ([`DEFAULT_QUEUE_POLLING`], or the device's, set with
//! [`Worker::set_polling`]). After the worker served
//! a kick of such a queue, it does not go back to sleep in `epoll_wait` at once: for up to
//! the budget it spins on the ring, comparing the available index with the device's next
//! one, and serves new chains as soon as the driver publishes them, without waiting for the
//! kick's wake-up. Each chain found this way restarts the budget; when the budget runs out
//! with nothing new, the worker sleeps in epoll as before, so a quiet guest costs no CPU.
//!
//! While a queue is polled, the worker holds the driver's kicks off (`hold_kicks`, under the
//! table's lock: with `VIRTIO_F_EVENT_IDX` `avail_event` is left where it is, without it the
//! used ring's `VRING_USED_F_NO_NOTIFY` flag is set, and the device's own re-enables in
//! `process_queue` leave them suppressed), so a driver publishing chains in a busy stream
//! does not pay a kick per burst, nor the worker a wake-up or a counter read. No kick is
//! lost: when a window closes the worker releases the hold (`release_kicks`: re-enable, fence,
//! re-check the available index, as a device does before it waits) and, if chains arrived
//! that no kick announced, dispatches the queue once more before it can sleep; a chain
//! published after that re-check comes with a kick. A kick that got through anyway (written
//! before the hold was seen) is reported by epoll like any other and finds the ring served.
//!
//! While spinning, and between polled dispatches, the worker looks at its epoll set only
//! every [`LOOK_EVERY`], so the stop event, other queues and the device's own fds wait at
//! most that long behind a busy polled queue, and a busy stream pays no system call per
//! burst. Busy polled queues are served in turn (the one just served goes last).
//!
//! The default budget backs off where polling does not pay ([`Backoff`]): after a window
//! that closed with nothing found, or in which the worker lost its CPU to another task (its
//! involuntary context switch count, read after each spin, moved: on a CPU shared with the
//! driver, spinning only delays the driver), the queue's next served kicks open no window,
//! 1, 2, 4, ... up to [`MAX_BACKOFF`]; a window that finds chains without losing the CPU
//! ends the backoff. A budget the device set polls after every kick, and is not judged: while
//! only such windows are open the count (a `getrusage` system call) is not read.

use std::any::Any;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::EventFd;
use vu_proto::fd::BorrowFd;
use vu_vring::MidPassInterrupt;

use crate::daemon::DEFAULT_QUEUE_POLLING;
use crate::daemon_error::DaemonError;
use crate::epoll::{eventfd_fd, new_eventfd, Poller, Token, VringEpollHandler, STOP_DATA};
use crate::sys;

/// What the dispatch of an event needs from the backend and the vrings. Kept apart from the
/// backend trait so that one implementation of kicks serves both runtimes and unit tests.
pub(crate) trait Dispatch {
    /// Whether a kick on queue `queue` is dispatched now: its ring is enabled, or disabled
    /// with a [`DisabledRing`](crate::backend::DisabledRing) policy that processes it. A kick
    /// that is not dispatched is parked until this becomes true.
    fn dispatches_kicks(&self, queue: u16) -> bool;
    /// Calls the backend's `handle_event`.
    fn handle_event(&self, device_event: u16, evset: EventSet, thread: usize) -> io::Result<()>;
    /// Whether queue `queue`'s ring is started and enabled and holds chains the device has
    /// not popped yet (read without consuming anything; used by adaptive polling).
    fn ring_has_work(&self, queue: u16) -> bool;
    /// Holds queue `queue`'s driver notifications off while the worker polls its ring.
    fn hold_kicks(&self, queue: u16);
    /// Ends [`hold_kicks`](Self::hold_kicks); returns whether chains are available that no
    /// kick will announce (the worker then dispatches the queue before it sleeps).
    fn release_kicks(&self, queue: u16) -> bool;
    /// Tells queue `queue`'s ring whether its driver is known to run concurrently with the
    /// worker (`VringData::set_driver_concurrent`: interrupt decisions per round of a pass),
    /// and the chains a pass uses between two of its round interrupts
    /// (`VringData::space_round_interrupts`, 0: none).
    fn set_driver_concurrent(&self, queue: u16, concurrent: bool, spacing: u16);
    /// What the driver did after a pass over queue `queue`'s ring interrupted it before the
    /// pass ended, since the last call (`VringData::take_mid_pass_interrupt`).
    fn take_mid_pass_interrupt(&self, queue: u16) -> MidPassInterrupt;
}

/// Assigns each queue to a worker thread from the backend's `queues_per_thread()` masks.
///
/// Bit `i` of mask `t` puts queue `i` on thread `t`. A mask of all ones (`u64::MAX`) claims
/// *every* queue, so that layout serves any number of queues, not only the first 64. Bits at or above `num_queues` are ignored. Returns, per thread, its queues in
/// increasing order.
pub(crate) fn assign_queues(
    masks: &[u64],
    num_queues: usize,
) -> Result<Vec<Vec<u16>>, DaemonError> {
    if masks.is_empty() {
        return Err(DaemonError::NoThreads);
    }
    let num = u16::try_from(num_queues).map_err(|_| DaemonError::TooManyQueues { num_queues })?;
    let mut owner: Vec<Option<usize>> = vec![None; num_queues];
    for (thread, &mask) in masks.iter().enumerate() {
        for queue in 0..num {
            let claimed = mask == u64::MAX || (queue < 64 && mask & (1u64 << queue) != 0);
            if !claimed {
                continue;
            }
            let slot = &mut owner[usize::from(queue)];
            if let Some(first) = *slot {
                return Err(DaemonError::QueueInSeveralThreads {
                    queue,
                    first,
                    second: thread,
                });
            }
            *slot = Some(thread);
        }
    }
    let mut threads = vec![Vec::new(); masks.len()];
    for (queue, thread) in (0..num).zip(owner) {
        match thread {
            Some(t) => threads[t].push(queue),
            None => return Err(DaemonError::QueueWithoutThread { queue }),
        }
    }
    Ok(threads)
}

#[derive(Debug)]
enum Watch {
    /// In the epoll set, waiting for kicks.
    Armed(File),
    /// In the epoll set with no events: a kick arrived while the ring was disabled.
    Parked(File),
}

/// The kick eventfds one epoll set watches, indexed by queue.
#[derive(Debug)]
pub(crate) struct KickTable {
    slots: Vec<Option<Watch>>,
    parked: usize,
}

/// How kicks are watched: readable, edge-triggered (see the module documentation).
const KICK_EVENTS: EventSet = EventSet::IN.union(EventSet::EDGE_TRIGGERED);

fn data_of(queue: u16) -> u64 {
    u64::from(queue)
}

impl KickTable {
    pub(crate) fn new(num_queues: usize) -> Self {
        KickTable {
            slots: (0..num_queues).map(|_| None).collect(),
            parked: 0,
        }
    }

    fn slot(&mut self, queue: u16) -> io::Result<&mut Option<Watch>> {
        self.slots.get_mut(usize::from(queue)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue {queue} does not exist"),
            )
        })
    }

    /// Whether `queue` is watched (armed or parked).
    #[cfg(test)]
    pub(crate) fn is_watched(&self, queue: u16) -> bool {
        matches!(self.slots.get(usize::from(queue)), Some(Some(_)))
    }

    /// Watches `kick` for `queue`, replacing any fd watched before.
    pub(crate) fn watch(&mut self, poller: &Poller, queue: u16, kick: File) -> io::Result<()> {
        self.unwatch(poller, queue)?;
        poller.add(kick.as_fd(), KICK_EVENTS, data_of(queue))?;
        *self.slot(queue)? = Some(Watch::Armed(kick));
        Ok(())
    }

    /// Stops watching `queue`; nothing happens if it is not watched.
    pub(crate) fn unwatch(&mut self, poller: &Poller, queue: u16) -> io::Result<()> {
        let old = self.slot(queue)?.take();
        let file = match old {
            None => return Ok(()),
            Some(Watch::Armed(f)) => f,
            Some(Watch::Parked(f)) => {
                self.parked -= 1;
                f
            }
        };
        poller.delete(file.as_fd())
    }

    /// Stops watching every queue.
    pub(crate) fn unwatch_all(&mut self, poller: &Poller) -> io::Result<()> {
        let mut result = Ok(());
        for queue in 0..self.slots.len() {
            if let Ok(q) = u16::try_from(queue) {
                if let Err(e) = self.unwatch(poller, q) {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Re-arms the parked kicks of rings that are now enabled.
    pub(crate) fn rearm(&mut self, poller: &Poller, d: &dyn Dispatch) -> io::Result<()> {
        if self.parked == 0 {
            return Ok(());
        }
        for (queue, slot) in self.slots.iter_mut().enumerate() {
            let Ok(q) = u16::try_from(queue) else { break };
            if !matches!(slot, Some(Watch::Parked(_))) || !d.dispatches_kicks(q) {
                continue;
            }
            if let Some(Watch::Parked(file)) = slot.take() {
                let armed = poller.modify(file.as_fd(), KICK_EVENTS, data_of(q));
                // Keep the fd either way: it is still registered and must be removable.
                *slot = Some(Watch::Armed(file));
                self.parked -= 1;
                armed?;
            }
        }
        Ok(())
    }

    fn park(&mut self, poller: &Poller, queue: u16) -> io::Result<()> {
        let slot = self.slot(queue)?;
        if let Some(Watch::Armed(file)) = slot.take() {
            let disarmed = poller.modify(file.as_fd(), EventSet::empty(), data_of(queue));
            *slot = Some(Watch::Parked(file));
            self.parked += 1;
            disarmed?;
        }
        Ok(())
    }

    /// Handles a readiness event of `queue`'s kick; returns whether the backend was called.
    pub(crate) fn kick(
        &mut self,
        poller: &Poller,
        queue: u16,
        evset: EventSet,
        d: &dyn Dispatch,
        thread: usize,
    ) -> Result<bool, DaemonError> {
        let kick_err = |source| DaemonError::Kick { queue, source };
        if !matches!(
            self.slots.get(usize::from(queue)),
            Some(Some(Watch::Armed(_)))
        ) {
            // An event read from epoll before the queue was unwatched or parked: drop it.
            return Ok(false);
        }
        if !d.dispatches_kicks(queue) {
            self.park(poller, queue).map_err(kick_err)?;
            return Ok(false);
        }
        call_backend(d, queue, evset, thread)?;
        Ok(true)
    }
}

/// Text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Calls the backend, turning an error or a panic into a [`DaemonError`].
pub(crate) fn call_backend(
    d: &dyn Dispatch,
    device_event: u16,
    evset: EventSet,
    thread: usize,
) -> Result<(), DaemonError> {
    match catch_unwind(AssertUnwindSafe(|| {
        d.handle_event(device_event, evset, thread)
    })) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(DaemonError::HandleEvent {
            thread,
            device_event,
            source,
        }),
        Err(payload) => Err(DaemonError::BackendPanicked {
            thread,
            device_event,
            message: panic_message(payload.as_ref()),
        }),
    }
}

/// `budget` in nanoseconds, below [`ADAPTIVE`].
fn budget_ns(budget: Duration) -> u64 {
    u64::try_from(budget.as_nanos()).map_or(ADAPTIVE - 1, |ns| ns.min(ADAPTIVE - 1))
}

/// How often a polling worker looks at its epoll set (stop event, other queues, device fds).
const LOOK_EVERY: Duration = Duration::from_micros(20);

/// The bit of a queue's polling budget that makes its polling back off ([`Backoff`]): the
/// default's; a budget set with [`Worker::set_polling`] polls whenever the queue is served.
const ADAPTIVE: u64 = 1 << 63;

/// The most served kicks a queue's polling waits out after windows that did not pay.
const MAX_BACKOFF: u32 = 1024;

/// Whether polling a queue has paid lately: windows that found nothing, or during which the
/// worker lost its CPU, make the queue's next served kicks open none, twice as many after
/// each such window up to [`MAX_BACKOFF`]; a window that found chains with the CPU to
/// itself ends the backoff.
///
/// The same judgement is the worker's evidence that the queue's driver runs on another CPU:
/// it published chains while the worker spun, and did not need the worker's CPU to do it.
/// From a window that pays to the next one that does not, the ring is told so
/// ([`Dispatch::set_driver_concurrent`]) and its passes decide on interrupts per round: the
/// driver is woken by the first completions, not the last. On a CPU shared with the driver
/// no window pays (the driver runs only by preempting the spinning worker), so there a pass
/// decides once, and an early interrupt never splits it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Backoff {
    /// Served kicks still to open no window.
    skip: u32,
    /// What `skip` becomes at the next window that does not pay.
    next: u32,
    /// Whether the queue's polling backs off at all, as of its last window.
    adaptive: bool,
    /// Whether the last judged window paid: the driver runs concurrently.
    concurrent: bool,
    /// What the ring was last told of [`cadence`](Self::cadence).
    told: Cadence,
    /// Evidence of a concurrent driver without polling: a pass interrupted the driver before
    /// it ended, the driver touched the ring after that (reaped or posted,
    /// `MidPassInterrupt::Answered`) and the worker kept its CPU. A driver sharing the
    /// worker's CPU can answer only by preempting the worker (or after the pass). Ends at a
    /// pass that interrupted the driver mid-pass and lost the CPU. Passes whose interrupt is
    /// not answered yet (the driver woke slower than that pass lasted) or that interrupt
    /// nothing mid-pass leave it: the interrupt came earlier, not more often.
    overlap: bool,
    /// The pass being served is a probe: its ring decides per round although nothing says
    /// the driver is concurrent, to see whether a driver woken mid-pass answers without
    /// costing the worker its CPU (without polling nothing else tells).
    probing: bool,
    /// Served kicks still to go before the next probe.
    probe_skip: u32,
    /// What `probe_skip` becomes after the next probe that fails.
    probe_next: u32,
}

impl Backoff {
    fn paid(&mut self) {
        self.skip = 0;
        self.next = 0;
        self.concurrent = true;
    }

    fn failed(&mut self) {
        self.next = (self.next * 2).clamp(1, MAX_BACKOFF);
        self.skip = self.next;
        self.concurrent = false;
    }

    /// How the ring's passes should decide: per round if polling found the driver
    /// concurrent; per round with mid-pass interrupts [`PROBED_INTERRUPT_SPACING`] apart if
    /// only probes say so (or the pass is a probe); else once per pass.
    fn cadence(&self) -> Cadence {
        if self.concurrent {
            Cadence::Rounds
        } else if self.overlap || self.probing {
            Cadence::ProbedRounds
        } else {
            Cadence::Pass
        }
    }

    /// Before a pass: whether it is a probe (nothing says the driver is concurrent and the
    /// probe's gap has run out).
    fn start_probe(&mut self) -> bool {
        if self.concurrent || self.overlap {
            return false;
        }
        if self.probe_skip > 0 {
            self.probe_skip -= 1;
            return false;
        }
        self.probing = true;
        true
    }

    /// Judges a pass that was a probe or served while `overlap` held: `interrupt` is what
    /// the driver did after the pass interrupted it mid-pass, `lost_cpu` whether the worker
    /// was preempted since before the pass. An answer with the CPU kept is the evidence. A
    /// mid-pass interrupt with the CPU lost (the driver, woken early, took the worker's CPU)
    /// refutes it. A probe needs the evidence: unanswered (a driver on the worker's CPU that
    /// did not preempt it, or one slower to wake than the pass), or with nothing interrupted
    /// mid-pass, it fails and waits its gap; a pass served while the evidence holds keeps it.
    fn judge_pass(&mut self, interrupt: MidPassInterrupt, lost_cpu: bool) {
        let probing = std::mem::take(&mut self.probing);
        match (interrupt, lost_cpu) {
            (MidPassInterrupt::Answered, false) => {
                self.overlap = true;
                self.probe_skip = 0;
                self.probe_next = 0;
            }
            (MidPassInterrupt::NotSent, _) | (MidPassInterrupt::Unanswered, false) if !probing => {}
            _ => self.probe_failed(),
        }
    }

    fn probe_failed(&mut self) {
        self.overlap = false;
        self.probe_next = (self.probe_next * 2).clamp(1, MAX_PROBE_GAP);
        self.probe_skip = self.probe_next;
    }
}

/// The most served kicks between two probes of a queue's driver ([`Backoff::overlap`]).
const MAX_PROBE_GAP: u32 = 256;

/// Chains a pass uses between two of its interrupts before it ends while only probes say
/// the driver is concurrent ([`Cadence::ProbedRounds`]). A driver that re-arms after each
/// reap is otherwise woken after every round of 8: a CPU-bound pass (64 KiB reads into
/// the guest's buffers at depth 128) sent ~10 interrupts a pass and lost a third of its
/// rate. A pass that is not CPU-bound is served faster than the driver reaps, so the
/// spacing seldom delays its interrupts; the rounds still publish the used index.
const PROBED_INTERRUPT_SPACING: u16 = 32;

/// How a ring's passes decide on interrupts ([`Dispatch::set_driver_concurrent`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Cadence {
    /// Once, at the end of the pass (nothing says the driver is concurrent).
    #[default]
    Pass,
    /// After every round: a polling window found the driver concurrent.
    Rounds,
    /// After rounds at least [`PROBED_INTERRUPT_SPACING`] chains apart: without
    /// polling, probes found the driver concurrent (or the pass is a probe).
    ProbedRounds,
}

/// The polling state of a worker's loop.
struct Polling {
    /// Queues in their polling window, with the time it closes, in serving order.
    windows: Vec<(u16, Instant)>,
    /// Queues whose window closed, to be released.
    closed: Vec<u16>,
    /// When the epoll set is looked at next while polling.
    look_at: Instant,
    /// Each queue's backoff.
    backoff: Vec<Backoff>,
    /// The worker's involuntary context switches when last looked at while polling.
    switches: u64,
    /// The same count as read before a probe or after a judged pass ([`Backoff::overlap`]):
    /// always read before the pass being judged began.
    pass_switches: u64,
}

impl Polling {
    fn new(num_queues: usize) -> Self {
        Polling {
            windows: Vec::new(),
            closed: Vec::new(),
            look_at: Instant::now(),
            backoff: vec![Backoff::default(); num_queues],
            switches: 0,
            pass_switches: 0,
        }
    }

    fn backoff(&mut self, queue: u16) -> Option<&mut Backoff> {
        self.backoff.get_mut(usize::from(queue))
    }

    /// Whether an open window backs off: only those are judged by the worker's context
    /// switches, so the count (a system call) is read only then.
    fn any_adaptive(&self) -> bool {
        self.windows
            .iter()
            .any(|&(q, _)| self.backoff.get(usize::from(q)).is_some_and(|b| b.adaptive))
    }

    /// Judges a pass over `queue` ([`Backoff::judge_pass`]); `signalled_at` is the worker's
    /// involuntary switch count read after a pass that interrupted the driver mid-pass,
    /// `None` if it did not.
    fn judge_pass(&mut self, queue: u16, interrupt: MidPassInterrupt, signalled_at: Option<u64>) {
        let lost_cpu = signalled_at.is_some_and(|s| s != self.pass_switches);
        if let Some(s) = signalled_at {
            self.pass_switches = s;
        }
        if let Some(b) = self.backoff(queue) {
            b.judge_pass(interrupt, lost_cpu);
        }
    }

    /// Judges the polling since the last look, after a spin that found `found` (or closed
    /// windows into `closed`), `switches` being the worker's involuntary context switches
    /// now. A switch means another task wanted the worker's CPU while it polled (the driver
    /// itself, when both share one): spinning there takes that task's time, so every
    /// window closes and backs off. Otherwise the queue found pays, and a window that
    /// closed empty does not.
    fn judge(&mut self, found: Option<u16>, switches: u64) {
        let lost_cpu = switches != self.switches;
        self.switches = switches;
        if lost_cpu {
            let backoff = &self.backoff;
            let adaptive = |q: u16| backoff.get(usize::from(q)).is_some_and(|b| b.adaptive);
            let closed = &mut self.closed;
            self.windows.retain(|&(q, _)| {
                if adaptive(q) {
                    closed.push(q);
                }
                !adaptive(q)
            });
        } else if let Some(b) = found.and_then(|q| self.backoff(q)) {
            b.paid();
        }
        for i in 0..self.closed.len() {
            let q = self.closed[i];
            if let Some(b) = self.backoff(q) {
                b.failed();
            }
        }
    }
}

/// Why a worker loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The daemon asked it to stop.
    Stopped,
    /// The backend wrote its exit event.
    ExitEvent,
}

/// The part of a worker shared between its thread and the runtime.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) index: usize,
    pub(crate) poller: Arc<Poller>,
    stop: EventFd,
    table: Mutex<KickTable>,
    /// How many kicks of the table are parked, readable without the lock.
    parked: AtomicUsize,
    /// The polling budget of each queue in nanoseconds, [`ADAPTIVE`] set when it backs off;
    /// 0 polls not at all.
    poll: Box<[AtomicU64]>,
    /// The backend's exit event for this thread, kept open while it is in the epoll set.
    _exit: Option<EventConsumer>,
}

impl Worker {
    /// Creates the epoll set of worker `index` with its stop event and, if the backend gave
    /// one, its exit event (tagged `num_queues`).
    pub(crate) fn new(
        index: usize,
        num_queues: usize,
        exit: Option<EventConsumer>,
    ) -> io::Result<Self> {
        let poller = Poller::new()?;
        let stop = new_eventfd()?;
        poller.add(eventfd_fd(&stop), EventSet::IN, STOP_DATA)?;
        if let Some(exit) = &exit {
            // Epoll keeps its own reference to the open file, not to the borrow.
            poller.add(exit.borrow_fd(), EventSet::IN, num_queues as u64)?;
        }
        Ok(Worker {
            index,
            poller: Arc::new(poller),
            stop,
            table: Mutex::new(KickTable::new(num_queues)),
            parked: AtomicUsize::new(0),
            poll: (0..num_queues)
                .map(|_| AtomicU64::new(budget_ns(DEFAULT_QUEUE_POLLING) | ADAPTIVE))
                .collect(),
            _exit: exit,
        })
    }

    /// The handle a backend uses to add its fds to this worker's epoll set.
    pub(crate) fn handler(
        &self,
        num_queues: usize,
        queues: Vec<u16>,
        exit: Option<EventNotifier>,
    ) -> VringEpollHandler {
        VringEpollHandler::new(self.poller.clone(), num_queues, self.index, queues, exit)
    }

    /// Locks the kick table; while the guard lives, this worker dispatches nothing.
    pub(crate) fn table(&self) -> MutexGuard<'_, KickTable> {
        // A panic while the table is locked leaves it consistent (every method restores its
        // invariants before any fallible call), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the locked table, then publishes its parked count.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut KickTable, &Poller) -> R) -> R {
        let mut table = self.table();
        let result = f(&mut table, &self.poller);
        self.parked.store(table.parked, Ordering::SeqCst);
        result
    }

    /// Re-arms the parked kicks of rings enabled since they were parked. Called by the runtime
    /// after each frontend message; takes the table only if something is parked.
    pub(crate) fn rearm(&self, d: &dyn Dispatch) -> io::Result<()> {
        // Pairs with the fence in `dispatch`: see the module documentation.
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        self.update(|table, poller| table.rearm(poller, d))
    }

    /// Sets how long the worker spins on queue `queue`'s ring after serving it before it
    /// sleeps again (see the module documentation); `Duration::ZERO` turns polling off.
    /// Takes effect at the queue's next kick.
    pub(crate) fn set_polling(&self, queue: u16, budget: Duration) -> io::Result<()> {
        let slot = self.poll.get(usize::from(queue)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue {queue} does not exist"),
            )
        })?;
        slot.store(budget_ns(budget), Ordering::Relaxed);
        Ok(())
    }

    /// The polling budget of `queue`, if it polls, and whether its polling backs off.
    fn poll_budget(&self, queue: u16) -> Option<(Duration, bool)> {
        let ns = self.poll.get(usize::from(queue))?.load(Ordering::Relaxed);
        let budget = ns & !ADAPTIVE;
        (budget > 0).then(|| (Duration::from_nanos(budget), ns & ADAPTIVE != 0))
    }

    /// Opens (or extends) the polling window of `queue` after the backend served it; a new
    /// window holds the queue's kicks off, an extended one goes last in the serving order.
    /// A queue backing off ([`Backoff`]) opens no new window.
    fn extend_polling(&self, p: &mut Polling, queue: u16, d: &dyn Dispatch) {
        let Some((budget, adaptive)) = self.poll_budget(queue) else {
            return;
        };
        let until = Instant::now() + budget;
        match p.windows.iter().position(|(q, _)| *q == queue) {
            Some(i) => {
                p.windows.remove(i);
            }
            None => {
                if let Some(b) = p.backoff(queue) {
                    b.adaptive = adaptive;
                    if adaptive && b.skip > 0 {
                        b.skip -= 1;
                        return;
                    }
                }
                if adaptive && !p.any_adaptive() {
                    // The count adaptive windows are judged from (read while one is open).
                    p.switches = sys::involuntary_switches();
                }
                let _table = self.table();
                d.hold_kicks(queue);
            }
        }
        p.windows.push((queue, until));
    }

    /// Ends the hold on `queue`'s kicks (its window closed or the loop ends); returns whether
    /// chains arrived that no kick announces.
    fn release(&self, p: &mut Polling, queue: u16, d: &dyn Dispatch) -> bool {
        self.tell_concurrent(p, queue, d);
        let _table = self.table();
        d.release_kicks(queue)
    }

    /// Tells `queue`'s ring what its last judged window says of its driver, if that changed.
    fn tell_concurrent(&self, p: &mut Polling, queue: u16, d: &dyn Dispatch) {
        let Some(b) = p.backoff(queue) else {
            return;
        };
        let cadence = b.cadence();
        if cadence != b.told {
            b.told = cadence;
            let (concurrent, limit) = match cadence {
                Cadence::Pass => (false, 0),
                Cadence::Rounds => (true, 0),
                Cadence::ProbedRounds => (true, PROBED_INTERRUPT_SPACING),
            };
            let _table = self.table();
            d.set_driver_concurrent(queue, concurrent, limit);
        }
    }

    /// Before the backend serves `queue`: if it does not poll, opens a probe if one is due
    /// ([`Backoff::probing`]), reading the switch count it is judged from and clearing the
    /// record of earlier passes.
    fn before_pass(&self, p: &mut Polling, queue: u16, d: &dyn Dispatch) {
        let polled = self.poll_budget(queue).is_some();
        let Some(b) = p.backoff(queue) else {
            return;
        };
        if polled {
            // Its polling windows judge the driver (`Backoff::concurrent`): no probes. An
            // early interrupt can also cost a driver that reposts in batches more than a
            // window gains; the windows' judgement is the one measured against that.
            if std::mem::take(&mut b.overlap) {
                self.tell_concurrent(p, queue, d);
            }
            return;
        }
        if !b.start_probe() {
            return;
        }
        p.pass_switches = sys::involuntary_switches();
        {
            let _table = self.table();
            d.take_mid_pass_interrupt(queue);
        }
        self.tell_concurrent(p, queue, d);
    }

    /// After the backend served `queue`: judges the pass if it was a probe or served while
    /// the evidence held ([`Backoff::judge_pass`]); the switch count is read only when the
    /// pass interrupted the driver mid-pass.
    fn after_pass(&self, p: &mut Polling, queue: u16, d: &dyn Dispatch) {
        if !p.backoff(queue).is_some_and(|b| b.overlap || b.probing) {
            return;
        }
        let interrupt = {
            let _table = self.table();
            d.take_mid_pass_interrupt(queue)
        };
        let switches = (interrupt != MidPassInterrupt::NotSent).then(sys::involuntary_switches);
        p.judge_pass(queue, interrupt, switches);
        self.tell_concurrent(p, queue, d);
    }

    /// Spins over the polled rings until one has work (returned), or returns `None` when
    /// windows closed (moved to `closed`), or an epoll event is pending (looked at every
    /// [`LOOK_EVERY`]).
    fn spin(&self, p: &mut Polling, d: &dyn Dispatch) -> Option<u16> {
        /// Ring checks between two looks at the clock (well under a microsecond each).
        const ROUNDS: u32 = 64;
        let mut round = 0u32;
        loop {
            if let Some(&(queue, _)) = p.windows.iter().find(|(q, _)| d.ring_has_work(*q)) {
                return Some(queue);
            }
            round += 1;
            if round == ROUNDS {
                round = 0;
                let now = Instant::now();
                let closed = &mut p.closed;
                p.windows.retain(|&(q, until)| {
                    let open = until > now;
                    if !open {
                        closed.push(q);
                    }
                    open
                });
                if !p.closed.is_empty() {
                    return None;
                }
                if now >= p.look_at {
                    p.look_at = now + LOOK_EVERY;
                    if self.poller.has_events() {
                        return None;
                    }
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Asks the thread to return; it does so before its next dispatch.
    pub(crate) fn request_stop(&self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot wake worker {} to stop it: {e}", self.index);
        }
    }

    /// The thread loop: waits for events and dispatches them until stopped, the backend's exit
    /// event fires, or dispatch fails. No hold on kicks outlives it.
    pub(crate) fn run(&self, num_queues: usize, d: &dyn Dispatch) -> Result<Ending, DaemonError> {
        let mut p = Polling::new(num_queues);
        let result = self.serve(num_queues, d, &mut p);
        let open: Vec<u16> = p.windows.drain(..).map(|(queue, _)| queue).collect();
        for queue in open {
            self.release(&mut p, queue, d);
        }
        // No ring keeps a judgement this loop can no longer revise.
        for queue in 0..p.backoff.len() {
            if let Ok(queue) = u16::try_from(queue) {
                if let Some(b) = p.backoff(queue) {
                    (b.concurrent, b.overlap, b.probing) = (false, false, false);
                }
                self.tell_concurrent(&mut p, queue, d);
            }
        }
        result
    }

    fn serve(
        &self,
        num_queues: usize,
        d: &dyn Dispatch,
        p: &mut Polling,
    ) -> Result<Ending, DaemonError> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            // Sleep until something is pending; while polling, only look at what is pending,
            // and not after every polled dispatch.
            let now = (!p.windows.is_empty()).then(Instant::now);
            if now.is_none_or(|now| now >= p.look_at) {
                let timeout = now.map(|_| Duration::ZERO);
                let n = self.poller.wait(&mut events, timeout).map_err(|source| {
                    DaemonError::Epoll {
                        thread: Some(self.index),
                        source,
                    }
                })?;
                if let Some(now) = now {
                    p.look_at = now + LOOK_EVERY;
                }
                for event in &events[..n] {
                    match Token::of(event.data(), num_queues) {
                        Token::Stop => return Ok(Ending::Stopped),
                        Token::Exit => return Ok(Ending::ExitEvent),
                        Token::Kick(queue) => {
                            self.before_pass(p, queue, d);
                            let served = self.dispatch(Token::Kick(queue), event.event_set(), d)?;
                            self.after_pass(p, queue, d);
                            if served {
                                self.extend_polling(p, queue, d);
                            }
                        }
                        token => {
                            self.dispatch(token, event.event_set(), d)?;
                        }
                    }
                }
                if n > 0 || p.windows.is_empty() {
                    continue;
                }
            }
            let found = self.spin(p, d);
            // A getrusage per polled burst only while a window that backs off is open (a
            // budget the device set never backs off).
            let switches = if p.any_adaptive() {
                sys::involuntary_switches()
            } else {
                p.switches
            };
            p.judge(found, switches);
            if let Some(queue) = found {
                // Before the dispatch: the judgement of this very find sets the pass's cadence.
                self.tell_concurrent(p, queue, d);
                self.before_pass(p, queue, d);
                let served = self.dispatch_polled(queue, d)?;
                self.after_pass(p, queue, d);
                if served {
                    self.extend_polling(p, queue, d);
                } else if let Some(i) = p.windows.iter().position(|&(q, _)| q == queue) {
                    // Not armed any more (unwatched or parked): stop polling it.
                    p.windows.remove(i);
                    self.release(p, queue, d);
                }
            }
            while let Some(queue) = p.closed.pop() {
                // The re-check before sleeping: chains published while kicks were held are
                // served now, as their kick would have had them served.
                if self.release(p, queue, d) {
                    self.dispatch_polled(queue, d)?;
                }
            }
        }
    }

    /// Serves chains that polling found in `queue`'s ring, as a kick would.
    fn dispatch_polled(&self, queue: u16, d: &dyn Dispatch) -> Result<bool, DaemonError> {
        let mut table = self.table();
        let parked_before = table.parked;
        let result = table.kick(&self.poller, queue, EventSet::IN, d, self.index);
        self.after_kick(&mut table, d, parked_before);
        result
    }

    /// After a kick was handled: if it parked the fd, publish that and re-check the ring.
    fn after_kick(&self, table: &mut KickTable, d: &dyn Dispatch, parked_before: usize) {
        if table.parked > parked_before {
            // Publish the park, then look at the enabled flag again: an enable the runtime
            // stored before reading a stale count is seen here.
            self.parked.store(table.parked, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Err(e) = table.rearm(&self.poller, d) {
                log::error!("worker {}: cannot re-arm a kick: {e}", self.index);
            }
            self.parked.store(table.parked, Ordering::SeqCst);
        }
    }

    /// Dispatches one event; returns whether it was a queue's kick served by the backend.
    fn dispatch(
        &self,
        token: Token,
        evset: EventSet,
        d: &dyn Dispatch,
    ) -> Result<bool, DaemonError> {
        let mut table = self.table();
        match token {
            Token::Kick(queue) => {
                let parked_before = table.parked;
                let result = table.kick(&self.poller, queue, evset, d, self.index);
                self.after_kick(&mut table, d, parked_before);
                result
            }
            Token::Device(device_event) => {
                call_backend(d, device_event, evset, self.index).map(|()| false)
            }
            other => {
                log::warn!("worker {}: ignoring epoll event {other:?}", self.index);
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, AtomicU32};
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn default_mask_puts_every_queue_on_one_thread() {
        let threads = assign_queues(&[u64::MAX], 3).unwrap();
        assert_eq!(threads, vec![vec![0, 1, 2]]);
    }

    #[test]
    fn default_mask_serves_more_than_64_queues() {
        let threads = assign_queues(&[u64::MAX], 100).unwrap();
        assert_eq!(threads[0].len(), 100);
        assert_eq!(threads[0][99], 99);
    }

    #[test]
    fn masks_split_queues_between_threads() {
        let threads = assign_queues(&[0b0101, 0b1010], 4).unwrap();
        assert_eq!(threads, vec![vec![0, 2], vec![1, 3]]);
    }

    #[test]
    fn bits_above_num_queues_are_ignored() {
        let threads = assign_queues(&[0xffff_ffff], 2).unwrap();
        assert_eq!(threads, vec![vec![0, 1]]);
    }

    #[test]
    fn queue_in_no_thread_is_refused() {
        let err = assign_queues(&[0xffff_ffff], 40).unwrap_err();
        assert!(matches!(err, DaemonError::QueueWithoutThread { queue: 32 }));
    }

    #[test]
    fn queue_in_two_threads_is_refused() {
        let err = assign_queues(&[0b11, 0b10], 2).unwrap_err();
        assert!(matches!(
            err,
            DaemonError::QueueInSeveralThreads {
                queue: 1,
                first: 0,
                second: 1
            }
        ));
    }

    #[test]
    fn no_mask_is_refused() {
        assert!(matches!(
            assign_queues(&[], 1).unwrap_err(),
            DaemonError::NoThreads
        ));
    }

    #[test]
    fn thread_without_queue_is_allowed() {
        let threads = assign_queues(&[0b1, 0], 1).unwrap();
        assert_eq!(threads, vec![vec![0], vec![]]);
    }

    /// A dispatch double: rings enabled per flag, records calls, fails or panics on demand.
    struct Recorder {
        enabled: Vec<Cell<bool>>,
        calls: RefCell<Vec<u16>>,
        fail: Cell<bool>,
        panic: Cell<bool>,
        /// What `ring_has_work` answers, per queue.
        work: Vec<bool>,
        /// Holds taken and released, in order: (queue, held).
        holds: RefCell<Vec<(u16, bool)>>,
        /// What the rings were told of their drivers, in order: (queue, concurrent).
        concurrent: RefCell<Vec<(u16, bool)>>,
        /// The spacings of round interrupts told with them, in the same order.
        spacings: RefCell<Vec<u16>>,
        /// What the next `take_mid_pass_interrupt` returns (then `NotSent`).
        interrupt: Cell<MidPassInterrupt>,
    }

    impl Recorder {
        fn new(n: usize) -> Self {
            Recorder {
                enabled: (0..n).map(|_| Cell::new(true)).collect(),
                calls: RefCell::new(Vec::new()),
                fail: Cell::new(false),
                panic: Cell::new(false),
                work: vec![false; n],
                holds: RefCell::new(Vec::new()),
                concurrent: RefCell::new(Vec::new()),
                spacings: RefCell::new(Vec::new()),
                interrupt: Cell::new(MidPassInterrupt::NotSent),
            }
        }
    }

    impl Dispatch for Recorder {
        fn dispatches_kicks(&self, queue: u16) -> bool {
            self.enabled[usize::from(queue)].get()
        }
        fn ring_has_work(&self, queue: u16) -> bool {
            self.work[usize::from(queue)]
        }
        fn hold_kicks(&self, queue: u16) {
            self.holds.borrow_mut().push((queue, true));
        }
        fn release_kicks(&self, queue: u16) -> bool {
            self.holds.borrow_mut().push((queue, false));
            false
        }
        fn set_driver_concurrent(&self, queue: u16, concurrent: bool, spacing: u16) {
            self.concurrent.borrow_mut().push((queue, concurrent));
            self.spacings.borrow_mut().push(spacing);
        }
        fn take_mid_pass_interrupt(&self, _: u16) -> MidPassInterrupt {
            self.interrupt.replace(MidPassInterrupt::NotSent)
        }
        fn handle_event(&self, device_event: u16, _: EventSet, _: usize) -> io::Result<()> {
            if self.panic.get() {
                panic!("backend bug");
            }
            self.calls.borrow_mut().push(device_event);
            if self.fail.get() {
                return Err(io::Error::other("device broke"));
            }
            Ok(())
        }
    }

    fn eventfd_file() -> (File, File) {
        let f = crate::sys::eventfd(true).unwrap();
        let dup = f.try_clone().unwrap();
        (f, dup)
    }

    fn write_kick(mut f: &File) {
        use std::io::Write;
        f.write_all(&1u64.to_ne_bytes()).unwrap();
    }

    /// Counter of an eventfd, consumed.
    fn counter(mut f: &File) -> u64 {
        let mut b = [0u8; 8];
        match f.read(&mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    /// Runs one round of epoll dispatch without blocking.
    fn pump(w: &Worker, d: &dyn Dispatch) -> Result<usize, DaemonError> {
        let mut events = vec![EpollEvent::default(); 8];
        let n = w.poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        for e in &events[..n] {
            w.dispatch(Token::of(e.data(), 2), e.event_set(), d)?;
        }
        Ok(n)
    }

    #[test]
    fn kick_on_enabled_ring_is_dispatched_without_reading_the_counter() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        let (kick, driver) = eventfd_file();
        w.table().watch(&w.poller, 1, kick).unwrap();
        write_kick(&driver);
        assert_eq!(pump(&w, &d).unwrap(), 1);
        assert_eq!(*d.calls.borrow(), vec![1]);
        // Edge-triggered: reported once, the counter left as the driver wrote it.
        assert_eq!(pump(&w, &d).unwrap(), 0);
        assert_eq!(counter(&driver), 1);
    }

    #[test]
    fn every_kick_is_reported_again_though_the_counter_is_never_read() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        let (kick, driver) = eventfd_file();
        w.table().watch(&w.poller, 0, kick).unwrap();
        for _ in 0..3 {
            write_kick(&driver);
            assert_eq!(pump(&w, &d).unwrap(), 1);
        }
        assert_eq!(*d.calls.borrow(), vec![0, 0, 0]);
    }

    #[test]
    fn polled_dispatch_leaves_the_counter_alone() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        let (kick, driver) = eventfd_file();
        w.table().watch(&w.poller, 0, kick).unwrap();
        assert!(w.dispatch_polled(0, &d).unwrap());
        assert_eq!(*d.calls.borrow(), vec![0]);
        // No read of the counter per polled dispatch: a kick that got through is reported.
        write_kick(&driver);
        assert_eq!(pump(&w, &d).unwrap(), 1);
    }

    #[test]
    fn polled_dispatch_of_an_unwatched_queue_calls_nothing() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        assert!(!w.dispatch_polled(1, &d).unwrap());
        assert!(d.calls.borrow().is_empty());
    }

    #[test]
    fn polling_budget_is_per_queue_and_zero_turns_it_off() {
        let w = Worker::new(0, 2, None).unwrap();
        w.set_polling(1, Duration::from_micros(70)).unwrap();
        assert_eq!(w.poll_budget(1), Some((Duration::from_micros(70), false)));
        assert_eq!(w.poll_budget(0), Some((DEFAULT_QUEUE_POLLING, true)));
        w.set_polling(1, Duration::ZERO).unwrap();
        assert_eq!(w.poll_budget(1), None);
        assert!(w.set_polling(2, Duration::from_micros(50)).is_err());
    }

    fn polling(windows: Vec<(u16, Instant)>) -> Polling {
        Polling {
            windows,
            ..Polling::new(2)
        }
    }

    #[test]
    fn spin_returns_the_queue_with_work() {
        let w = Worker::new(0, 2, None).unwrap();
        let mut d = Recorder::new(2);
        d.work = vec![false, true];
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(w.spin(&mut polling(vec![(0, far), (1, far)]), &d), Some(1));
    }

    #[test]
    fn spin_ends_when_a_window_closed() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        let far = Instant::now() + Duration::from_secs(3600);
        let mut p = polling(vec![(0, Instant::now()), (1, far)]);
        assert_eq!(w.spin(&mut p, &d), None);
        assert_eq!(p.closed, vec![0]);
        assert_eq!(p.windows.len(), 1);
    }

    #[test]
    fn spin_ends_when_an_epoll_event_is_pending() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        w.request_stop();
        let far = Instant::now() + Duration::from_secs(3600);
        let mut p = polling(vec![(0, far)]);
        assert_eq!(w.spin(&mut p, &d), None);
        assert_eq!(p.windows.len(), 1);
    }

    #[test]
    fn a_polled_queue_is_held_once_and_served_in_turn() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        w.set_polling(0, Duration::from_secs(3600)).unwrap();
        w.set_polling(1, Duration::from_secs(3600)).unwrap();
        let mut p = Polling::new(2);
        w.extend_polling(&mut p, 0, &d);
        w.extend_polling(&mut p, 1, &d);
        w.extend_polling(&mut p, 0, &d);
        assert_eq!(*d.holds.borrow(), vec![(0, true), (1, true)]);
        let order: Vec<u16> = p.windows.iter().map(|&(q, _)| q).collect();
        assert_eq!(order, vec![1, 0]);
    }

    /// Opens windows for `queue` at `n` served kicks; returns at which of them (0-based) one
    /// opened (and closes it again, empty, as a spin that found nothing would).
    fn windows_opened(w: &Worker, p: &mut Polling, d: &Recorder, queue: u16, n: u32) -> Vec<u32> {
        let mut opened = Vec::new();
        for kick in 0..n {
            w.extend_polling(p, queue, d);
            if let Some(i) = p.windows.iter().position(|&(q, _)| q == queue) {
                opened.push(kick);
                p.windows.remove(i);
                p.closed.push(queue);
                let switches = p.switches;
                p.judge(None, switches);
                p.closed.clear();
            }
        }
        opened
    }

    #[test]
    fn polling_is_on_by_default() {
        let w = Worker::new(0, 1, None).unwrap();
        assert_eq!(w.poll_budget(0), Some((DEFAULT_QUEUE_POLLING, true)));
    }

    #[test]
    fn windows_that_find_nothing_back_off_twice_as_long_each_time() {
        let w = Worker::new(0, 1, None).unwrap();
        let d = Recorder::new(1);
        let mut p = Polling::new(1);
        // Every window closes empty: open at kick 0, skip 1, open, skip 2, open, skip 4 ...
        let opened = windows_opened(&w, &mut p, &d, 0, 32);
        assert_eq!(opened, vec![0, 2, 5, 10, 19]);
        // A window that finds chains with the CPU to itself ends the backoff.
        p.backoff[0].skip = 0;
        w.extend_polling(&mut p, 0, &d);
        assert_eq!(p.windows.len(), 1);
        let switches = p.switches;
        p.judge(Some(0), switches);
        assert_eq!((p.backoff[0].skip, p.backoff[0].next), (0, 0));
        assert_eq!(p.windows.len(), 1, "a paying window stays open");
    }

    #[test]
    fn only_windows_that_back_off_read_the_switch_count() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        let mut p = Polling::new(2);
        // Queue 0 with a budget the device set: its window is not judged by switches, so
        // the worker does not read them (`serve` passes the stale count).
        w.set_polling(0, Duration::from_millis(1)).unwrap();
        p.switches = u64::MAX;
        w.extend_polling(&mut p, 0, &d);
        assert!(!p.any_adaptive());
        assert_eq!(p.switches, u64::MAX, "no baseline taken for a fixed budget");
        // Queue 1 polls by default (adaptive): its window takes the baseline as it opens.
        w.extend_polling(&mut p, 1, &d);
        assert!(p.any_adaptive());
        assert_ne!(p.switches, u64::MAX);
        p.windows.retain(|&(q, _)| q != 1);
        assert!(!p.any_adaptive());
    }

    #[test]
    fn backoff_is_bounded() {
        let mut b = Backoff::default();
        for _ in 0..40 {
            b.failed();
        }
        assert_eq!(b.skip, MAX_BACKOFF);
    }

    #[test]
    fn losing_the_cpu_while_polling_closes_every_window_and_backs_off() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        let mut p = Polling::new(2);
        w.extend_polling(&mut p, 0, &d);
        w.extend_polling(&mut p, 1, &d);
        let switches = p.switches + 1;
        // Even the queue the spin found is judged: the CPU was wanted by another task.
        p.judge(Some(1), switches);
        assert!(p.windows.is_empty());
        assert_eq!(p.closed, vec![0, 1]);
        assert!(p.backoff.iter().all(|b| b.skip == 1));
        // Both are released by the loop (here by hand), then the next kick opens none.
        p.closed.clear();
        w.extend_polling(&mut p, 1, &d);
        assert!(p.windows.is_empty());
        w.extend_polling(&mut p, 1, &d);
        assert_eq!(p.windows.len(), 1);
    }

    #[test]
    fn a_budget_set_by_the_device_polls_whatever_happens() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        w.set_polling(1, Duration::from_secs(3600)).unwrap();
        let mut p = Polling::new(2);
        w.extend_polling(&mut p, 0, &d);
        w.extend_polling(&mut p, 1, &d);
        let switches = p.switches + 1;
        p.judge(None, switches);
        // The default's window closed, the device's stays open.
        assert_eq!(p.closed, vec![0]);
        assert_eq!(p.windows.len(), 1);
        assert_eq!(p.windows[0].0, 1);
        let opened = windows_opened(&w, &mut p, &d, 1, 8);
        assert_eq!(opened.len(), 8, "a device's budget never backs off");
    }

    /// A worker whose queue 0 polling window found chains on its first spin, the worker
    /// having lost its CPU `lost` times meanwhile, and told the ring what it concluded;
    /// returns the involuntary switch count the spin was judged with.
    fn judged_window(lost: u64) -> (Worker, Recorder, Polling, u64) {
        let w = Worker::new(0, 1, None).unwrap();
        let d = Recorder::new(1);
        let mut p = Polling::new(1);
        w.extend_polling(&mut p, 0, &d);
        let switches = p.switches + lost;
        p.judge(Some(0), switches);
        w.tell_concurrent(&mut p, 0, &d);
        (w, d, p, switches)
    }

    #[test]
    fn a_window_that_pays_tells_the_ring_its_driver_runs_concurrently_until_one_does_not() {
        // The spin found chains with the CPU to itself: the driver runs on another CPU.
        let (w, d, mut p, switches) = judged_window(0);
        w.tell_concurrent(&mut p, 0, &d);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true)], "told once");
        assert_eq!(*d.spacings.borrow(), vec![0], "every round decides");
        // A later spin loses the CPU: the window closes, and its release tells the ring.
        p.judge(None, switches + 1);
        assert_eq!(p.closed, vec![0]);
        p.closed.clear();
        w.release(&mut p, 0, &d);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true), (0, false)]);
    }

    #[test]
    fn chains_found_after_losing_the_cpu_are_no_evidence_of_a_concurrent_driver() {
        // One CPU: the driver published only by preempting the spinning worker.
        let (w, d, mut p, _) = judged_window(1);
        p.closed.clear();
        w.release(&mut p, 0, &d);
        assert!(
            d.concurrent.borrow().is_empty(),
            "the ring keeps one decision per pass"
        );
    }

    #[test]
    fn a_window_that_closes_empty_ends_the_concurrent_cadence() {
        let (w, d, mut p, switches) = judged_window(0);
        // The window runs out with nothing found: the driver went quiet.
        p.windows.clear();
        p.closed.push(0);
        p.judge(None, switches);
        p.closed.clear();
        w.release(&mut p, 0, &d);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true), (0, false)]);
    }

    /// A worker, its recorder and polling state for queue 0 after its first served kick,
    /// which is a probe: the ring was told to decide per round, its interrupts
    /// [`PROBED_INTERRUPT_SPACING`] chains apart. The pass's switch count is set to
    /// 10 so that a judgement can be fed counts with or without a lost CPU.
    fn probed() -> (Worker, Recorder, Polling) {
        let w = Worker::new(0, 1, None).unwrap();
        w.set_polling(0, Duration::ZERO).unwrap();
        let d = Recorder::new(1);
        let mut p = Polling::new(1);
        // A record of an earlier pass: cleared by the probe.
        d.interrupt.set(MidPassInterrupt::Answered);
        w.before_pass(&mut p, 0, &d);
        assert_eq!(
            d.interrupt.get(),
            MidPassInterrupt::NotSent,
            "the probe starts from a clean record"
        );
        assert_eq!(
            *d.concurrent.borrow(),
            vec![(0, true)],
            "the probe decides per round"
        );
        assert_eq!(*d.spacings.borrow(), vec![PROBED_INTERRUPT_SPACING]);
        p.pass_switches = 10;
        (w, d, p)
    }

    /// Serves up to `kicks` more kicks of queue 0 that interrupt nothing mid-pass, until one is a
    /// probe (left to judge); returns its index among them.
    fn next_probe(w: &Worker, d: &Recorder, p: &mut Polling, kicks: u32) -> Option<u32> {
        (0..kicks).find(|_| {
            w.before_pass(p, 0, d);
            if p.backoff[0].probing {
                return true;
            }
            w.after_pass(p, 0, d);
            false
        })
    }

    #[test]
    fn a_probe_answered_with_the_cpu_kept_keeps_the_ring_deciding_per_round() {
        let (w, d, mut p) = probed();
        p.judge_pass(0, MidPassInterrupt::Answered, Some(10));
        w.tell_concurrent(&mut p, 0, &d);
        assert_eq!(
            *d.concurrent.borrow(),
            vec![(0, true)],
            "nothing more to tell"
        );
        assert!(p.backoff[0].overlap);
        // Later passes are no probes, and another answered pass renews the evidence.
        w.before_pass(&mut p, 0, &d);
        assert!(!p.backoff[0].probing);
        p.judge_pass(0, MidPassInterrupt::Answered, Some(10));
        assert!(p.backoff[0].overlap);
        assert_eq!(*d.spacings.borrow(), vec![PROBED_INTERRUPT_SPACING]);
    }

    #[test]
    fn a_probe_answered_after_losing_the_cpu_ends_and_backs_off() {
        // One CPU: the driver, woken by the probe's first round, preempted the worker.
        let (w, d, mut p) = probed();
        p.judge_pass(0, MidPassInterrupt::Answered, Some(11));
        w.tell_concurrent(&mut p, 0, &d);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true), (0, false)]);
        assert_eq!(*d.spacings.borrow(), vec![PROBED_INTERRUPT_SPACING, 0]);
        assert_eq!(
            p.pass_switches, 11,
            "the next pass is judged from the new count"
        );
        // The next probe waits a kick, the one after two.
        assert_eq!(next_probe(&w, &d, &mut p, 10), Some(1));
        p.judge_pass(0, MidPassInterrupt::Answered, Some(12));
        assert_eq!(next_probe(&w, &d, &mut p, 10), Some(2));
    }

    #[test]
    fn a_probe_left_unanswered_with_the_cpu_kept_ends_and_backs_off() {
        // One CPU: the driver, woken by the probe's first round, did not preempt the worker
        // and has not run since; or another CPU, a driver slower to wake than the pass.
        let (w, d, mut p) = probed();
        p.judge_pass(0, MidPassInterrupt::Unanswered, Some(10));
        w.tell_concurrent(&mut p, 0, &d);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true), (0, false)]);
        assert!(!p.backoff[0].overlap);
        assert_eq!(next_probe(&w, &d, &mut p, 10), Some(1));
    }

    #[test]
    fn a_probe_that_interrupts_nothing_mid_pass_backs_off_up_to_the_longest_gap() {
        let (w, d, mut p) = probed();
        p.judge_pass(0, MidPassInterrupt::NotSent, None);
        w.tell_concurrent(&mut p, 0, &d);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true), (0, false)]);
        let mut gaps = Vec::new();
        for _ in 0..10 {
            gaps.push(next_probe(&w, &d, &mut p, 2 * MAX_PROBE_GAP).unwrap());
            p.judge_pass(0, MidPassInterrupt::NotSent, None);
        }
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]);
        assert!(!p.backoff[0].overlap);
    }

    #[test]
    fn passes_that_interrupt_nothing_mid_pass_keep_the_evidence() {
        let (w, d, mut p) = probed();
        p.judge_pass(0, MidPassInterrupt::Answered, Some(10));
        for _ in 0..2 * MAX_PROBE_GAP {
            w.after_pass(&mut p, 0, &d);
        }
        assert!(p.backoff[0].overlap);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true)]);
    }

    #[test]
    fn a_mid_pass_interrupt_not_answered_yet_keeps_the_evidence() {
        // Another CPU: the driver, once known concurrent, woke slower than this pass lasted.
        let (w, d, mut p) = probed();
        p.judge_pass(0, MidPassInterrupt::Answered, Some(10));
        p.judge_pass(0, MidPassInterrupt::Unanswered, Some(10));
        w.tell_concurrent(&mut p, 0, &d);
        assert!(p.backoff[0].overlap);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true)]);
    }

    #[test]
    fn a_mid_pass_interrupt_with_the_cpu_lost_ends_the_evidence() {
        let (w, d, mut p) = probed();
        p.judge_pass(0, MidPassInterrupt::Answered, Some(10));
        p.judge_pass(0, MidPassInterrupt::Unanswered, Some(11));
        w.tell_concurrent(&mut p, 0, &d);
        assert!(!p.backoff[0].overlap);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true), (0, false)]);
    }

    #[test]
    fn a_polled_queue_is_never_probed() {
        // Polling on by default: its windows judge the driver.
        let w = Worker::new(0, 1, None).unwrap();
        let d = Recorder::new(1);
        let mut p = Polling::new(1);
        for _ in 0..2 * MAX_PROBE_GAP {
            w.before_pass(&mut p, 0, &d);
            assert!(!p.backoff[0].probing);
            w.after_pass(&mut p, 0, &d);
        }
        assert!(d.concurrent.borrow().is_empty());
    }

    #[test]
    fn polling_turned_on_ends_the_probes_evidence() {
        let (w, d, mut p) = probed();
        p.judge_pass(0, MidPassInterrupt::Answered, Some(10));
        w.set_polling(0, Duration::from_micros(50)).unwrap();
        w.before_pass(&mut p, 0, &d);
        assert!(!p.backoff[0].overlap);
        assert_eq!(*d.concurrent.borrow(), vec![(0, true), (0, false)]);
    }

    #[test]
    fn a_ring_known_concurrent_from_polling_is_not_probed() {
        let w = Worker::new(0, 1, None).unwrap();
        w.set_polling(0, Duration::ZERO).unwrap();
        let d = Recorder::new(1);
        let mut p = Polling::new(1);
        p.backoff[0].concurrent = true;
        w.before_pass(&mut p, 0, &d);
        assert!(!p.backoff[0].probing);
        assert!(d.concurrent.borrow().is_empty());
    }

    /// A ring as the worker sees it, shared with a driver thread: chains published and
    /// served, and the hold on kicks, with the driver's side of the notification protocol.
    struct SharedRing {
        published: AtomicU32,
        served: AtomicU32,
        held: AtomicBool,
    }

    impl SharedRing {
        /// The driver publishes a chain and kicks unless kicks are held off, as a driver
        /// reading `VRING_USED_F_NO_NOTIFY` after its index store does.
        fn publish(&self, kick: &File) {
            self.published.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.held.load(Ordering::SeqCst) {
                write_kick(kick);
            }
        }
    }

    impl Dispatch for SharedRing {
        fn dispatches_kicks(&self, _: u16) -> bool {
            true
        }
        fn handle_event(&self, _: u16, _: EventSet, _: usize) -> io::Result<()> {
            self.served
                .store(self.published.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok(())
        }
        fn ring_has_work(&self, _: u16) -> bool {
            self.published.load(Ordering::SeqCst) != self.served.load(Ordering::SeqCst)
        }
        fn hold_kicks(&self, _: u16) {
            self.held.store(true, Ordering::SeqCst);
        }
        fn release_kicks(&self, q: u16) -> bool {
            self.held.store(false, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            self.ring_has_work(q)
        }
        fn set_driver_concurrent(&self, _: u16, _: bool, _: u16) {}
        fn take_mid_pass_interrupt(&self, _: u16) -> MidPassInterrupt {
            MidPassInterrupt::NotSent
        }
    }

    #[test]
    fn a_chain_published_as_polling_ends_is_never_lost() {
        // Windows so short that each closes at the worker's first look at the clock: chains
        // are published before, during and after the hold is released, each only once the
        // previous one was served. A lost kick leaves one unserved and the worker asleep.
        let w = Arc::new(Worker::new(0, 1, None).unwrap());
        let ring = Arc::new(SharedRing {
            published: AtomicU32::new(0),
            served: AtomicU32::new(0),
            held: AtomicBool::new(false),
        });
        let (kick, driver) = eventfd_file();
        w.table().watch(&w.poller, 0, kick).unwrap();
        w.set_polling(0, Duration::from_nanos(1)).unwrap();
        let (w2, ring2) = (w.clone(), ring.clone());
        let worker = std::thread::spawn(move || w2.run(1, &*ring2));
        let (tx, rx) = std::sync::mpsc::channel();
        let (w3, ring3) = (w.clone(), ring.clone());
        std::thread::spawn(move || {
            for i in 1..=3000u32 {
                // Sweep the moment of publication across the window's end.
                for _ in 0..(i % 97) * 8 {
                    std::hint::spin_loop();
                }
                ring3.publish(&driver);
                let deadline = Instant::now() + Duration::from_secs(10);
                while ring3.served.load(Ordering::SeqCst) != i {
                    if Instant::now() > deadline {
                        let _ = tx.send(Err(i));
                        return;
                    }
                    std::thread::yield_now();
                }
            }
            w3.request_stop();
            let _ = tx.send(Ok(()));
        });
        let outcome = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(outcome, Ok(()), "a chain was never served");
        assert_eq!(worker.join().unwrap().unwrap(), Ending::Stopped);
        // No hold outlives the loop.
        assert!(!ring.held.load(Ordering::SeqCst));
    }

    #[test]
    fn kick_on_disabled_ring_is_kept_until_enabled() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        d.enabled[0].set(false);
        let (kick, driver) = eventfd_file();
        w.table().watch(&w.poller, 0, kick).unwrap();
        write_kick(&driver);
        pump(&w, &d).unwrap();
        assert!(d.calls.borrow().is_empty());
        // Parked: no more events, the counter untouched.
        assert_eq!(pump(&w, &d).unwrap(), 0);
        d.enabled[0].set(true);
        w.rearm(&d).unwrap();
        pump(&w, &d).unwrap();
        assert_eq!(*d.calls.borrow(), vec![0]);
    }

    #[test]
    fn rearm_leaves_disabled_rings_parked() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        d.enabled[0].set(false);
        let (kick, driver) = eventfd_file();
        w.table().watch(&w.poller, 0, kick).unwrap();
        write_kick(&driver);
        pump(&w, &d).unwrap();
        w.rearm(&d).unwrap();
        assert_eq!(pump(&w, &d).unwrap(), 0);
        assert_eq!(counter(&driver), 1);
    }

    #[test]
    fn rearm_does_not_wait_for_a_busy_worker_when_nothing_is_parked() {
        let w = Arc::new(Worker::new(0, 2, None).unwrap());
        // The table is held, as during a long handle_event.
        let busy = w.table();
        let (tx, rx) = std::sync::mpsc::channel();
        let w2 = w.clone();
        std::thread::spawn(move || {
            struct Enabled;
            impl Dispatch for Enabled {
                fn dispatches_kicks(&self, _: u16) -> bool {
                    true
                }
                fn handle_event(&self, _: u16, _: EventSet, _: usize) -> io::Result<()> {
                    Ok(())
                }
                fn ring_has_work(&self, _: u16) -> bool {
                    false
                }
                fn hold_kicks(&self, _: u16) {}
                fn release_kicks(&self, _: u16) -> bool {
                    false
                }
                fn set_driver_concurrent(&self, _: u16, _: bool, _: u16) {}
                fn take_mid_pass_interrupt(&self, _: u16) -> MidPassInterrupt {
                    MidPassInterrupt::NotSent
                }
            }
            tx.send(w2.rearm(&Enabled).is_ok()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        drop(busy);
    }

    #[test]
    fn parking_publishes_the_parked_count() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        d.enabled[1].set(false);
        let (kick, driver) = eventfd_file();
        w.update(|t, p| t.watch(p, 1, kick)).unwrap();
        write_kick(&driver);
        pump(&w, &d).unwrap();
        assert_eq!(w.parked.load(Ordering::SeqCst), 1);
        w.update(|t, p| t.unwatch(p, 1)).unwrap();
        assert_eq!(w.parked.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn unwatched_kick_is_not_dispatched() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        let (kick, driver) = eventfd_file();
        w.table().watch(&w.poller, 0, kick).unwrap();
        w.table().unwatch(&w.poller, 0).unwrap();
        write_kick(&driver);
        assert_eq!(pump(&w, &d).unwrap(), 0);
        assert!(!w.table().is_watched(0));
    }

    #[test]
    fn stale_event_after_unwatch_is_dropped() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        // An event read from epoll for a queue that is not (or no longer) watched.
        w.dispatch(Token::of(1, 2), EventSet::IN, &d).unwrap();
        assert!(d.calls.borrow().is_empty());
    }

    #[test]
    fn watching_again_replaces_the_old_fd() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        let (old, old_driver) = eventfd_file();
        let (new, new_driver) = eventfd_file();
        w.table().watch(&w.poller, 0, old).unwrap();
        w.table().watch(&w.poller, 0, new).unwrap();
        write_kick(&old_driver);
        assert_eq!(pump(&w, &d).unwrap(), 0);
        write_kick(&new_driver);
        assert_eq!(pump(&w, &d).unwrap(), 1);
    }

    #[test]
    fn device_event_reaches_the_backend() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        w.dispatch(Token::of(3, 2), EventSet::IN, &d).unwrap();
        assert_eq!(*d.calls.borrow(), vec![3]);
    }

    #[test]
    fn backend_error_is_reported_with_its_event() {
        let w = Worker::new(4, 2, None).unwrap();
        let d = Recorder::new(2);
        d.fail.set(true);
        let err = w.dispatch(Token::of(5, 2), EventSet::IN, &d).unwrap_err();
        assert!(matches!(
            err,
            DaemonError::HandleEvent {
                thread: 4,
                device_event: 5,
                ..
            }
        ));
    }

    #[test]
    fn backend_panic_is_caught_and_reported() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        d.panic.set(true);
        let err = w.dispatch(Token::of(3, 2), EventSet::IN, &d).unwrap_err();
        match err {
            DaemonError::BackendPanicked { message, .. } => assert_eq!(message, "backend bug"),
            other => panic!("unexpected {other:?}"),
        }
        // The table is still usable.
        assert!(!w.table().is_watched(0));
    }

    #[test]
    fn stop_event_ends_the_loop() {
        let w = Worker::new(0, 2, None).unwrap();
        let d = Recorder::new(2);
        w.request_stop();
        assert_eq!(w.run(2, &d).unwrap(), Ending::Stopped);
    }

    #[test]
    fn exit_event_ends_the_loop() {
        let (consumer, notifier) = vmm_sys_util::event::new_event_consumer_and_notifier(
            vmm_sys_util::event::EventFlag::NONBLOCK,
        )
        .unwrap();
        let w = Worker::new(0, 2, Some(consumer)).unwrap();
        let d = Recorder::new(2);
        notifier.notify().unwrap();
        assert_eq!(w.run(2, &d).unwrap(), Ending::ExitEvent);
    }
}
