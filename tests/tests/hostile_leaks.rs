//! Repeated messages must not accumulate: each request that carries or creates an fd or a
//! mapping is sent thousands of times over a real socket, and the process's open fds, its
//! mappings (`/proc/self/maps`) and its resident set stay flat. The daemon runs in this
//! process, so whatever it kept would show here.
//!
//! The tests of this binary take a lock so that they run one at a time.

use std::fs;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

use vu_proto::features::ProtocolFeatures;
use vu_proto::message::FrontendRequest;
use vu_proto::payload::{Inflight, Log, MemoryRegion, MemoryTable, VringState};
use vu_proto::request::FrontendReq;
use vu_tests::fdleak::{describe, open_fds};
use vu_tests::hostile::{rss_bytes, Hostile, HostileDaemon, HOSTILE_TIMEOUT, RSS_BOUND};
use vu_tests::proto_support::{eventfd, eventfd_fd, memfd};

type R<'a> = FrontendRequest<BorrowedFd<'a>>;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many times each message is sent.
const REPEAT: usize = 2000;
/// Sends before measuring, so that one-time allocations (buffers, the first mapping) are
/// already made.
const WARM_UP: usize = 50;
/// Mappings that may come and go for reasons of their own (a thread stack, an allocator
/// arena); a leak of one mapping per message would be thousands.
const MAPS_SLACK: usize = 8;

fn maps_count() -> usize {
    fs::read_to_string("/proc/self/maps")
        .expect("read /proc/self/maps")
        .lines()
        .count()
}

/// Runs `send` [`WARM_UP`] times, measures, runs it [`REPEAT`] times, and checks that fds,
/// mappings and RSS did not grow.
fn stays_flat(what: &str, send: impl FnMut(usize)) {
    stays_flat_settled(what, || (), send);
}

/// Like [`stays_flat`], measuring while the value `settle` returns is alive: `settle` waits
/// until the daemon has finished with everything `send` did (a connection that `send`
/// dropped is torn down before the daemon answers the next one).
fn stays_flat_settled<H>(what: &str, settle: impl Fn() -> H, mut send: impl FnMut(usize)) {
    for i in 0..WARM_UP {
        send(i);
    }
    let held = settle();
    let fds = open_fds();
    let maps = maps_count();
    let rss = rss_bytes();
    drop(held);
    for i in 0..REPEAT {
        send(i);
    }
    let held = settle();
    let fds_after = open_fds();
    let maps_after = maps_count();
    let rss_after = rss_bytes();
    drop(held);
    let new: std::collections::BTreeSet<i32> = fds_after.difference(&fds).copied().collect();
    assert!(
        fds_after.len() <= fds.len(),
        "{what}: {} fds open before, {} after; new: {:?}",
        fds.len(),
        fds_after.len(),
        describe(&new)
    );
    assert!(
        maps_after <= maps + MAPS_SLACK,
        "{what}: mappings grew from {maps} to {maps_after}"
    );
    assert!(
        rss_after < rss + RSS_BOUND,
        "{what}: resident set grew from {rss} to {rss_after} bytes"
    );
}

fn negotiated() -> (HostileDaemon, Hostile) {
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    let fe = daemon.negotiated();
    (daemon, fe)
}

#[test]
fn repeated_set_vring_num_stays_flat() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    stays_flat("SET_VRING_NUM", |i| {
        let num = 1 << (i % 8 + 1);
        let req = R::SetVringNum(VringState { index: 1, num });
        assert_eq!(fe.status(&req), 0);
    });
    daemon.stop();
}

#[test]
fn repeated_set_vring_kick_and_call_with_fresh_eventfds_stay_flat() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let (_memory, _ring) = fe.start_ring(16);
    stays_flat("SET_VRING_KICK/CALL", |_| {
        let kick = eventfd();
        let req = R::SetVringKick {
            index: 0,
            fd: Some(eventfd_fd(&kick)),
        };
        assert_eq!(fe.status(&req), 0);
        let call = eventfd();
        let req = R::SetVringCall {
            index: 0,
            fd: Some(eventfd_fd(&call)),
        };
        assert_eq!(fe.status(&req), 0);
    });
    daemon.stop();
}

#[test]
fn repeated_set_mem_table_with_fresh_memfds_stays_flat() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    stays_flat("SET_MEM_TABLE", |i| {
        let size = 0x10000;
        let file = memfd(size);
        let gpa = (i as u64 % 4) * size;
        let req = R::SetMemTable {
            table: MemoryTable {
                regions: vec![MemoryRegion {
                    guest_phys_addr: gpa,
                    memory_size: size,
                    user_addr: 0x7f00_0000_0000 + gpa,
                    mmap_offset: 0,
                }],
            },
            fds: vec![file.as_fd()],
        };
        assert_eq!(fe.status(&req), 0);
    });
    daemon.stop();
}

#[test]
fn repeated_add_and_rem_mem_reg_stay_flat() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    stays_flat("ADD_MEM_REG/REM_MEM_REG", |_| {
        let file = memfd(0x10000);
        let region = MemoryRegion {
            guest_phys_addr: 0x100000,
            memory_size: 0x10000,
            user_addr: 0x7f00_0010_0000,
            mmap_offset: 0,
        };
        let req = R::AddMemReg {
            region,
            fd: file.as_fd(),
        };
        assert_eq!(fe.status(&req), 0);
        assert_eq!(fe.status(&R::RemMemReg(region)), 0);
    });
    daemon.stop();
}

#[test]
fn repeated_set_log_base_stays_flat() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    stays_flat("SET_LOG_BASE", |_| {
        let file = memfd(0x1000);
        let req = R::SetLogBase {
            log: Log {
                mmap_size: 0x1000,
                mmap_offset: 0,
            },
            fd: file.as_fd(),
        };
        fe.ask(&req).unwrap();
        fe.recv_empty(FrontendReq::SetLogBase);
    });
    daemon.stop();
}

#[test]
fn repeated_get_inflight_fd_stays_flat() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    // The area comes with an fd only while the framework offers INFLIGHT_SHMFD (the offer
    // table masks it until inflight tracking serves it); both replies must stay flat.
    fe.ask(&R::GetProtocolFeatures).unwrap();
    let offered = ProtocolFeatures::from_bits_retain(fe.recv_u64(FrontendReq::GetProtocolFeatures));
    let fds = usize::from(offered.contains(ProtocolFeatures::INFLIGHT_SHMFD));
    // The daemon closes its copy of a reply's fd just after sending it; the answer to the
    // next request shows that it did.
    let settle = || assert_ne!(fe.get_features(), 0);
    stays_flat_settled("GET_INFLIGHT_FD", settle, |_| {
        let req = R::GetInflightFd(Inflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 256,
        });
        fe.ask(&req).unwrap();
        let reply = fe.recv().unwrap();
        assert!(reply.header.is_reply());
        assert_eq!(reply.fds.len(), fds, "an inflight area comes with its fd");
        // Dropping the reply closes our copy of the fd.
    });
    daemon.stop();
}

#[test]
fn repeated_refused_messages_with_fds_stay_flat() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    stays_flat("refused SET_MEM_TABLE", |_| {
        let a = memfd(0x1000);
        let b = memfd(0x1000);
        // One region, two fds: refused, both closed.
        let req = R::SetMemTable {
            table: MemoryTable {
                regions: vec![MemoryRegion {
                    guest_phys_addr: 0,
                    memory_size: 0x1000,
                    user_addr: 0x7f00_0000_0000,
                    mmap_offset: 0,
                }],
            },
            fds: vec![a.as_fd(), b.as_fd()],
        };
        assert_ne!(fe.status(&req), 0);
    });
    daemon.stop();
}

#[test]
fn repeated_connections_stay_flat() {
    let _serial = serial();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    let settle = || {
        let probe = daemon.connect();
        assert_ne!(probe.get_features(), 0);
        probe
    };
    stays_flat_settled("connect/negotiate/disconnect", settle, |_| {
        let fe = daemon.negotiated();
        let (_memory, _ring) = fe.start_ring(16);
        drop(fe);
    });
    daemon.stop();
}
