//! The machine's wake-up latency: how long a thread blocked on an eventfd (as the driver
//! models sleep on the call eventfd) takes to run again after another thread writes it, on
//! another CPU and on the same one. A driver that sleeps between batches pays it once per
//! batch whatever the backend does, so it bounds every cell where the driver sleeps:
//! `depth / (wake-up + the driver's own work per batch)` requests per second at best.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::*;

/// Wake-ups measured per placement.
const SAMPLES: usize = 200;
/// How long the waker lets the sleeper settle into its wait before each write: long
/// enough for it to be blocked, as a driver is after its arm found nothing.
const SETTLE: Duration = Duration::from_micros(100);

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
    let sleeper = {
        let (call, written_at, waiting) = (call.clone(), written_at.clone(), waiting.clone());
        std::thread::spawn(move || {
            pin_self(0);
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
            // Sleep (not spin) while the sleeper blocks: on one CPU it must get to run.
            std::thread::sleep(SETTLE);
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
