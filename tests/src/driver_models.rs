//! Guest driver models for the data-path benchmark: the same [`LeanQueue`] driven the way
//! different real drivers drive a virtqueue, so that a device is measured against each
//! driver's notification behaviour, not tuned to one.
//!
//! Every model keeps `depth` chains posted for a while, then stops posting and drains. They
//! differ in when they reap used chains, when they repost, and what they ask of the device's
//! interrupts (`used_event` with `VIRTIO_RING_F_EVENT_IDX`):
//!
//! - [`Model::Idle`]: reaps all used chains, reposts as many at once and kicks if
//!   `avail_event` asks; only when nothing new was used does it arm (`used_event` = the last
//!   used index seen: an interrupt for the very next completion), look once more, and sleep on
//!   the call eventfd.
//! - [`Model::Eager`]: the same, but arms after every drain, as Linux's
//!   `virtqueue_get_buf` does while callbacks are enabled (the model the first data-path tables
//!   used).
//! - [`Model::Blk`]: Linux virtio-blk. The interrupt handler (`virtblk_done`) takes used
//!   chains one by one, each `virtqueue_get_buf` storing `used_event` with a full barrier,
//!   until `virtqueue_enable_cb` finds nothing more; the block layer reposts the completed
//!   requests from another context a little later ([`BLK_REPOST_DELAY`] of CPU work), with one
//!   kick decision for the batch.
//! - [`Model::Napi`]: a NAPI poll with a budget of [`NAPI_BUDGET`]: after an interrupt, poll
//!   rounds each take at most the budget and refill as many; a round under budget completes
//!   the poll with `virtqueue_enable_cb_delayed` (an interrupt once three quarters of the
//!   chains in flight are used).
//! - [`Model::Poll`]: a polling driver (DPDK's virtio PMD): interrupts suppressed, reaps and
//!   reposts in a loop, never sleeps.
//!
//! [`Outcome::interrupts`] counts the device's writes of the call eventfd over the run (the
//! eventfd counter values the driver read), whether the driver slept on them or not.

use std::time::{Duration, Instant};

use crate::lean_driver::LeanQueue;
use crate::virtqueue::voluntary_switches;

/// CPU time the block layer spends between a completion and the repost of its request in
/// [`Model::Blk`] (completion to the submitter, a new request built and queued).
pub const BLK_REPOST_DELAY: Duration = Duration::from_micros(2);

/// Used chains one NAPI poll round may take in [`Model::Napi`] (Linux's `NAPI_POLL_WEIGHT`).
pub const NAPI_BUDGET: usize = 64;

/// How a driver reaps, reposts and asks for interrupts; see the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Arms `used_event` only when nothing new was used, then sleeps.
    Idle,
    /// Arms `used_event` after every drain (Linux's `virtqueue_get_buf` loop).
    Eager,
    /// Linux virtio-blk: the interrupt handler reaps, the block layer reposts later.
    Blk,
    /// A NAPI poll with a budget and `virtqueue_enable_cb_delayed`.
    Napi,
    /// A polling driver: no interrupts, never sleeps.
    Poll,
}

impl Model {
    /// Every model, in the order the benchmark reports them.
    pub const ALL: [Model; 5] = [
        Model::Idle,
        Model::Eager,
        Model::Blk,
        Model::Napi,
        Model::Poll,
    ];

    /// A short name for tables and command lines.
    pub fn name(self) -> &'static str {
        match self {
            Model::Idle => "idle-arm",
            Model::Eager => "eager-arm",
            Model::Blk => "linux-blk",
            Model::Napi => "napi",
            Model::Poll => "polling",
        }
    }

    /// The model called `name`, if any.
    pub fn from_name(name: &str) -> Option<Model> {
        Model::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// When the driver stops posting.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// After this long.
    Time(Duration),
    /// Once this many requests were posted.
    Requests(u64),
}

/// What one run of a model did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Requests completed, the drain included.
    pub done: u64,
    /// Time from the first post to the end of posting (the drain excluded).
    pub elapsed: Duration,
    /// The device's call eventfd writes over the run, the drain included.
    pub interrupts: u64,
    /// The driver's blocking waits over the run, the drain included (its thread's voluntary
    /// context switches): each one a wake-up to pay when the interrupt comes.
    pub sleeps: u64,
}

impl Outcome {
    /// Requests per second while posting.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }

    /// Interrupts per completed request.
    pub fn interrupts_per_request(&self) -> f64 {
        self.interrupts as f64 / self.done.max(1) as f64
    }

    /// Blocking waits of the driver per completed request.
    pub fn sleeps_per_request(&self) -> f64 {
        self.sleeps as f64 / self.done.max(1) as f64
    }
}

/// The run's clock and request count.
struct Progress {
    start: Instant,
    until: Until,
    posted: u64,
    done: u64,
}

impl Progress {
    fn more(&self) -> bool {
        match self.until {
            Until::Time(t) => self.start.elapsed() < t,
            Until::Requests(n) => self.posted < n,
        }
    }
}

/// Posts `n` chains and kicks if the device asks for it; returns how many were posted.
fn post_and_kick(queue: &mut LeanQueue, n: usize) -> usize {
    let posted = queue.post(n);
    if queue.kick_prepare() {
        queue.notify();
    }
    posted
}

/// Drives `queue` with `model`, keeping `depth` chains in flight until `until`, then drains.
/// Waits for an interrupt at most `timeout` (then panics: the device lost one).
pub fn drive(
    queue: &mut LeanQueue,
    model: Model,
    depth: usize,
    until: Until,
    timeout: Duration,
) -> Outcome {
    assert!(
        depth <= queue.capacity(),
        "depth above the queue's capacity"
    );
    queue.collect_interrupts();
    let interrupts_before = queue.interrupts();
    let sleeps_before = voluntary_switches();
    // Interrupts start enabled, as a driver's callbacks are after probe (a previous run's
    // drain may have left `used_event` behind).
    if model == Model::Poll {
        queue.suppress();
    } else {
        queue.arm();
    }
    let mut p = Progress {
        start: Instant::now(),
        until,
        posted: 0,
        done: 0,
    };
    p.posted += post_and_kick(queue, depth) as u64;
    match model {
        Model::Idle => idle(queue, &mut p, timeout),
        Model::Eager => eager(queue, &mut p, timeout),
        Model::Blk => blk(queue, &mut p, timeout),
        Model::Napi => napi(queue, &mut p, timeout),
        Model::Poll => poll(queue, &mut p, timeout),
    }
    let elapsed = p.start.elapsed();
    // The drain: nothing more is posted; every model waits the same way.
    while queue.in_flight() > 0 {
        let used = queue.reap(usize::MAX);
        if used == 0 && !queue.arm() {
            queue.wait_interrupt(timeout);
        }
        p.done += used as u64;
    }
    queue.collect_interrupts();
    Outcome {
        done: p.done,
        elapsed,
        interrupts: queue.interrupts() - interrupts_before,
        sleeps: voluntary_switches() - sleeps_before,
    }
}

fn idle(queue: &mut LeanQueue, p: &mut Progress, timeout: Duration) {
    loop {
        let used = queue.reap(usize::MAX);
        if used == 0 {
            if !queue.arm() {
                queue.wait_interrupt(timeout);
            }
            continue;
        }
        p.done += used as u64;
        if !p.more() {
            return;
        }
        p.posted += post_and_kick(queue, used) as u64;
    }
}

fn eager(queue: &mut LeanQueue, p: &mut Progress, timeout: Duration) {
    loop {
        let used = queue.take_used();
        if used == 0 {
            queue.wait_interrupt(timeout);
            continue;
        }
        p.done += used as u64;
        if !p.more() {
            return;
        }
        p.posted += post_and_kick(queue, used) as u64;
    }
}

fn blk(queue: &mut LeanQueue, p: &mut Progress, timeout: Duration) {
    loop {
        queue.wait_interrupt(timeout);
        // virtblk_done: get_buf until empty, then enable_cb; again while it finds more.
        let mut completed = 0;
        loop {
            while queue.get_buf() {
                completed += 1;
            }
            if !queue.arm() {
                break;
            }
        }
        p.done += completed as u64;
        if !p.more() {
            return;
        }
        // The block layer, later, in another context: the requests go back in one batch.
        let until = Instant::now() + BLK_REPOST_DELAY;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        p.posted += post_and_kick(queue, completed) as u64;
    }
}

fn napi(queue: &mut LeanQueue, p: &mut Progress, timeout: Duration) {
    loop {
        queue.wait_interrupt(timeout);
        // The poll rounds of one NAPI schedule.
        loop {
            let used = queue.reap(NAPI_BUDGET);
            p.done += used as u64;
            if !p.more() {
                return;
            }
            p.posted += post_and_kick(queue, used) as u64;
            if used == NAPI_BUDGET {
                continue;
            }
            if !queue.arm_delayed() {
                break;
            }
        }
    }
}

fn poll(queue: &mut LeanQueue, p: &mut Progress, timeout: Duration) {
    let mut last_progress = Instant::now();
    let mut idle_spins = 0u32;
    loop {
        let used = queue.reap(usize::MAX);
        if used == 0 {
            idle_spins += 1;
            if idle_spins % 4096 == 0 {
                assert!(
                    last_progress.elapsed() < timeout,
                    "queue {}: nothing used before the timeout ({})",
                    queue.index(),
                    queue.ring_state()
                );
            }
            std::hint::spin_loop();
            continue;
        }
        idle_spins = 0;
        last_progress = Instant::now();
        p.done += used as u64;
        if !p.more() {
            return;
        }
        p.posted += post_and_kick(queue, used) as u64;
    }
}
