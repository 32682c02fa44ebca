//! [`Offload`]: a small pool of threads on which a device runs its requests, so that one
//! queue has many requests in flight and completes them as they finish, out of order.
//!
//! The device's `handle_event` takes chains with `vu_vring::process_queue_async`, copies out
//! what each request needs (its descriptors' addresses and lengths, its head index), submits
//! a job per request tagged with its queue, and returns `Completion::Later`; each job does the
//! I/O, then completes its chain under the vring's lock (`VringData::complete_deferred`, then
//! `signal_used_queue_if_needed`). The device's `VhostUserBackend::stop_vring` calls
//! [`Offload::drain`] for the queue, which the daemon calls before it tells the frontend where
//! a stopped ring stands, and before a reset or a disconnect: no chain is completed after
//! that. Inflight I/O tracking records each chain from the moment it is taken until its
//! completion, so a crash in between serves it again after a restart.
//!
//! Jobs run in submission order as threads become free; a job that panics is logged and
//! counted as done. Dropping the pool runs the jobs still queued, then joins its threads.
//! [`Offload::stats`] says how many jobs ran, the most in flight at once, and how many
//! finished before an older one.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

/// A job: one request of queue `queue`.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// What a pool has run so far ([`Offload::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadStats {
    /// Jobs submitted.
    pub jobs: u64,
    /// The most jobs queued or running at once.
    pub most_in_flight: usize,
    /// Jobs that finished while a job submitted before them had not: completions out of
    /// order.
    pub overtaking: u64,
}

/// What the pool's threads and its users share.
#[derive(Default)]
struct State {
    /// Jobs not started yet, oldest first, with their queue and submission number.
    jobs: VecDeque<(u16, u64, Job)>,
    /// Per queue index: jobs queued or running.
    pending: Vec<usize>,
    /// The submission numbers of the jobs queued or running.
    in_flight: BTreeSet<u64>,
    stats: OffloadStats,
    /// Set when the pool is dropped: the threads finish the queued jobs and exit.
    closing: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// A job was queued, or the pool is closing.
    work: Condvar,
    /// A job finished.
    done: Condvar,
}

impl Shared {
    /// The state; a job that panicked while the lock was held leaves it usable (the counts
    /// are only changed by the pool's own code, which does not panic).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A pool of threads that runs a device's requests; see the [module](self) documentation.
pub struct Offload {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl Offload {
    /// Starts `threads` threads (at least one) named `<name>-io<N>`.
    pub fn new(name: &str, threads: usize) -> io::Result<Offload> {
        let shared = Arc::new(Shared::default());
        let mut pool = Offload {
            shared,
            threads: Vec::new(),
        };
        for index in 0..threads.max(1) {
            let shared = Arc::clone(&pool.shared);
            let thread = thread::Builder::new()
                .name(format!("{name}-io{index}"))
                .spawn(move || run(&shared))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Queues `job`, a request of queue `queue`, to run on the first free thread.
    pub fn submit(&self, queue: u16, job: impl FnOnce() + Send + 'static) {
        let mut state = self.shared.lock();
        let index = usize::from(queue);
        if state.pending.len() <= index {
            state.pending.resize(index + 1, 0);
        }
        state.pending[index] += 1;
        let number = state.stats.jobs;
        state.stats.jobs += 1;
        state.in_flight.insert(number);
        state.stats.most_in_flight = state.stats.most_in_flight.max(state.in_flight.len());
        state.jobs.push_back((queue, number, Box::new(job)));
        drop(state);
        self.shared.work.notify_one();
    }

    /// What the pool has run so far.
    pub fn stats(&self) -> OffloadStats {
        self.shared.lock().stats
    }

    /// Jobs of queue `queue` queued or running now.
    pub fn pending(&self, queue: u16) -> usize {
        let state = self.shared.lock();
        state.pending.get(usize::from(queue)).copied().unwrap_or(0)
    }

    /// Returns once every job of queue `queue` submitted before the call has finished. Must
    /// not be called from a job (it would wait for itself).
    pub fn drain(&self, queue: u16) {
        let index = usize::from(queue);
        let mut state = self.shared.lock();
        while state.pending.get(index).is_some_and(|&n| n > 0) {
            state = self
                .shared
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("an offload thread panicked outside a job");
            }
        }
    }
}

/// A pool thread: runs jobs until the pool closes and none is left.
fn run(shared: &Shared) {
    loop {
        let mut state = shared.lock();
        let (queue, number, job) = loop {
            if let Some(next) = state.jobs.pop_front() {
                break next;
            }
            if state.closing {
                return;
            }
            state = shared
                .work
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        };
        drop(state);
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            log::error!("a request of queue {queue} panicked; counted as done");
        }
        let mut state = shared.lock();
        if let Some(n) = state.pending.get_mut(usize::from(queue)) {
            *n = n.saturating_sub(1);
        }
        if state
            .in_flight
            .first()
            .is_some_and(|&oldest| oldest < number)
        {
            state.stats.overtaking += 1;
        }
        state.in_flight.remove(&number);
        drop(state);
        shared.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_finish_out_of_order_and_drain_waits_for_its_queue_only() {
        let pool = Offload::new("test", 2).unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        // Job A (queue 0) blocks until released; job B (queue 1) finishes at once.
        let done = done_tx.clone();
        pool.submit(0, move || {
            release_rx.recv().unwrap();
            done.send("a").unwrap();
        });
        pool.submit(1, move || done_tx.send("b").unwrap());
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok("b"));
        pool.drain(1);
        // B overtook A.
        let stats = pool.stats();
        assert_eq!(
            (stats.jobs, stats.most_in_flight, stats.overtaking),
            (2, 2, 1)
        );
        assert_eq!(pool.pending(1), 0);
        assert_eq!(pool.pending(0), 1);
        release_tx.send(()).unwrap();
        pool.drain(0);
        assert_eq!(pool.pending(0), 0);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok("a"));
        // A queue that never had a job drains at once.
        pool.drain(7);
    }

    #[test]
    fn a_panicking_job_is_counted_as_done_and_the_pool_keeps_working() {
        let pool = Offload::new("test", 1).unwrap();
        pool.submit(3, || panic!("a device bug"));
        pool.drain(3);
        let (tx, rx) = mpsc::channel();
        pool.submit(3, move || tx.send(5).unwrap());
        pool.drain(3);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(5));
    }

    #[test]
    fn dropping_the_pool_runs_the_queued_jobs() {
        let (tx, rx) = mpsc::channel();
        {
            let pool = Offload::new("test", 1).unwrap();
            for i in 0..20 {
                let tx = tx.clone();
                pool.submit(0, move || tx.send(i).unwrap());
            }
        }
        let got: Vec<i32> = rx.try_iter().collect();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
    }
}
