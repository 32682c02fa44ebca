//! The machine's wake-up latency: how long a thread blocked on an eventfd (as the driver
//! models sleep on the call eventfd) takes to run again after another thread writes it, on
//! another CPU and on the same one. A driver that sleeps between batches pays it once per
//! batch whatever the backend does, so it bounds every cell where the driver sleeps:
//! `depth / (wake-up + the driver's own work per batch)` requests per second at best.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::*;

/// Wake-ups measured per placement.
const SAMPLES: usize = 200;

/// Median and 90th percentile of the wake-up latency, in microseconds.
pub(crate) struct Latency {
    pub(crate) median_us: f64,
    pub(crate) p90_us: f64,
}

/// Measures [`SAMPLES`] wake-ups of a thread on CPU 0 by a thread on `waker_cpu`.
pub(crate) fn wake_latency(waker_cpu: usize) -> Latency {
    let base = Instant::now();
    let call = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let written_at = Arc::new(AtomicU64::new(0));
    let waiting = Arc::new(AtomicBool::new(false));
    let tid = Arc::new(AtomicI32::new(0));
    let sleeper = {
        let (call, written_at, waiting) = (call.clone(), written_at.clone(), waiting.clone());
        let tid = tid.clone();
        std::thread::spawn(move || {
            pin_self(0);
            // SAFETY: gettid has no arguments and cannot fail.
            tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
            let mut us = Vec::with_capacity(SAMPLES);
            for _ in 0..SAMPLES {
                waiting.store(true, Ordering::SeqCst);
                assert!(
                    wait_readable(call.as_raw_fd(), TIMEOUT),
                    "wake-up latency: no write before the timeout"
                );
                let woke = base.elapsed().as_nanos() as u64;
                call.read().expect("eventfd read");
                let sent = written_at.load(Ordering::SeqCst);
                us.push(woke.saturating_sub(sent) as f64 / 1000.0);
            }
            us
        })
    };
    let waker = std::thread::spawn(move || {
        pin_self(waker_cpu);
        for _ in 0..SAMPLES {
            while !waiting.swap(false, Ordering::SeqCst) {
                std::thread::yield_now();
            }
            // The write goes to a sleeper blocked in its wait, as a driver is after its arm
            // found nothing (on one CPU, the waker gets to look only once it is).
            while !blocked(tid.load(Ordering::SeqCst)) {
                std::thread::yield_now();
            }
            written_at.store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
            call.write(1).expect("eventfd write");
        }
    });
    waker.join().expect("the waker panicked");
    let mut us = sleeper.join().expect("the sleeper panicked");
    us.sort_by(f64::total_cmp);
    Latency {
        median_us: us[SAMPLES / 2],
        p90_us: us[SAMPLES * 9 / 10],
    }
}

/// Whether thread `tid` of this process is blocked: state `S` in its `/proc` stat line.
fn blocked(tid: i32) -> bool {
    fs::read_to_string(format!("/proc/self/task/{tid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('S'))
    })
}
