//! A hostile guest driver behind a real socket: descriptor tables written raw into shared
//! memory (unmapped addresses, ranges past a region's end or in a hole, indirect tables of a
//! bad length or crossing regions, loops, chains longer than the ring, zero lengths, a lying
//! available index) and memory tables changed while the queue runs. Each case asserts the
//! daemon survives, completes what it can, and serves a well-formed request afterwards; the
//! device ([`HostileBackend`]) completes a chain whose memory it cannot touch with length 0.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vu_proto::message::FrontendRequest;
use vu_proto::payload::{MemoryTable, VringState};
use vu_proto::request::FrontendReq;
use vu_tests::fdleak::{assert_no_new_fds, open_fds};
use vu_tests::hostile::{
    descriptor, Hostile, HostileDaemon, RawRing, DESC_INDIRECT, DESC_NEXT, DESC_WRITE,
    HOSTILE_TIMEOUT,
};
use vu_tests::proto_support::eventfd_fd;
use vu_tests::virtqueue::{DriverMemory, GPA_BASE};

type R<'a> = FrontendRequest<BorrowedFd<'a>>;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Guest memory of the tests: 1 MiB at [`GPA_BASE`].
const MEM: u64 = 1 << 20;
const SIZE: u16 = 16;

/// A daemon, a negotiated frontend, guest memory in its table and queue 0 running.
struct Setup {
    daemon: HostileDaemon,
    fe: Hostile,
    memory: DriverMemory,
    ring: RawRing,
}

impl Setup {
    fn new() -> Self {
        let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
        let fe = daemon.negotiated();
        let mut memory = DriverMemory::new(MEM);
        let req = R::SetMemTable {
            table: MemoryTable {
                regions: vec![memory.region()],
            },
            fds: vec![memory.fd()],
        };
        assert_eq!(fe.status(&req), 0);
        let ring = RawRing::new(&mut memory, SIZE);
        ring.start(&fe, &memory, 0);
        Setup {
            daemon,
            fe,
            memory,
            ring,
        }
    }

    fn mem(&self) -> &GuestMemoryMmap {
        self.memory.mem()
    }

    /// Offers the chain starting at descriptor `head` and waits for its completion; returns
    /// its used length.
    fn serve(&mut self, head: u16) -> u32 {
        let mem = self.memory.mem().clone();
        let idx = self.ring.used_idx(&mem).wrapping_add(1);
        self.ring.offer(&mem, head);
        self.ring.wait_used(&mem, idx);
        let (id, len) = self.ring.used_elem(&mem, idx.wrapping_sub(1));
        assert_eq!(id, u32::from(head));
        len
    }

    /// A well-formed echo request in descriptors 14 and 15: 16 bytes out, 16 bytes in.
    fn good_request_is_served(&mut self) {
        let data = self.ring.data;
        let payload = [0xa5u8; 16];
        self.mem().write_slice(&payload, data).unwrap();
        let out = data.0 + 0x100;
        self.ring
            .write_desc(self.mem(), 14, descriptor(data.0, 16, DESC_NEXT, 15));
        self.ring
            .write_desc(self.mem(), 15, descriptor(out, 16, DESC_WRITE, 0));
        assert_eq!(self.serve(14), 16);
        let mut echoed = [0u8; 16];
        self.mem()
            .read_slice(&mut echoed, GuestAddress(out))
            .unwrap();
        assert_eq!(echoed, payload);
    }

    /// `GET_VRING_BASE` of queue 0: stops the ring, as a frontend does before restarting it.
    fn stop_queue(&self) {
        self.fe
            .ask(&R::GetVringBase(VringState { index: 0, num: 0 }))
            .unwrap();
        self.fe.recv_u64(FrontendReq::GetVringBase);
    }

    fn refused(&self) -> u64 {
        self.daemon.backend.refused.load(Ordering::SeqCst)
    }

    fn finish(mut self) {
        self.good_request_is_served();
        assert_ne!(self.fe.get_features(), 0);
        drop(self.fe);
        let next = self.daemon.negotiated();
        assert_ne!(next.get_features(), 0);
        drop(next);
        self.daemon.stop();
    }
}

/// The end of guest memory.
const END: u64 = GPA_BASE + MEM;

#[test]
fn descriptor_at_an_unmapped_address_is_completed_empty() {
    let _serial = serial();
    let mut s = Setup::new();
    s.ring
        .write_desc(s.mem(), 0, descriptor(0xdead_0000_0000, 64, 0, 0));
    assert_eq!(s.serve(0), 0);
    assert_eq!(s.refused(), 1);
    s.finish();
}

#[test]
fn descriptor_crossing_the_end_of_guest_memory_is_completed_empty() {
    let _serial = serial();
    let mut s = Setup::new();
    s.ring
        .write_desc(s.mem(), 0, descriptor(END - 8, 16, DESC_WRITE, 0));
    assert_eq!(s.serve(0), 0);
    s.ring
        .write_desc(s.mem(), 1, descriptor(GPA_BASE - 8, 16, 0, 0));
    assert_eq!(s.serve(1), 0);
    assert_eq!(s.refused(), 2);
    s.finish();
}

#[test]
fn descriptor_whose_address_plus_length_overflows_is_completed_empty() {
    let _serial = serial();
    let mut s = Setup::new();
    s.ring
        .write_desc(s.mem(), 0, descriptor(u64::MAX - 8, u32::MAX, 0, 0));
    assert_eq!(s.serve(0), 0);
    s.finish();
}

#[test]
fn zero_length_descriptors_are_served() {
    let _serial = serial();
    let mut s = Setup::new();
    let data = s.ring.data.0;
    s.ring
        .write_desc(s.mem(), 0, descriptor(data, 0, DESC_NEXT, 1));
    s.ring
        .write_desc(s.mem(), 1, descriptor(data, 0, DESC_WRITE, 0));
    assert_eq!(s.serve(0), 0);
    s.finish();
}

#[test]
fn descriptor_loop_ends_and_the_queue_goes_on() {
    let _serial = serial();
    let mut s = Setup::new();
    let data = s.ring.data.0;
    // 0 -> 1 -> 0 -> ...
    s.ring
        .write_desc(s.mem(), 0, descriptor(data, 8, DESC_NEXT, 1));
    s.ring
        .write_desc(s.mem(), 1, descriptor(data, 8, DESC_NEXT, 0));
    assert_eq!(
        s.serve(0),
        0,
        "a chain the walk cannot finish moves no bytes"
    );
    s.finish();
}

#[test]
fn chain_longer_than_the_ring_ends_and_the_queue_goes_on() {
    let _serial = serial();
    let mut s = Setup::new();
    let data = s.ring.data.0;
    for i in 0..SIZE {
        s.ring
            .write_desc(s.mem(), i, descriptor(data, 8, DESC_NEXT, (i + 1) % SIZE));
    }
    assert_eq!(
        s.serve(0),
        0,
        "a chain the walk cannot finish moves no bytes"
    );
    // The table was all one chain; lay out the good request again.
    s.finish();
}

#[test]
fn next_index_past_the_table_ends_the_chain() {
    let _serial = serial();
    let mut s = Setup::new();
    let data = s.ring.data.0;
    s.ring
        .write_desc(s.mem(), 0, descriptor(data, 8, DESC_NEXT, 0xffff));
    assert_eq!(
        s.serve(0),
        0,
        "a chain the walk cannot finish moves no bytes"
    );
    s.finish();
}

#[test]
fn indirect_table_whose_length_is_not_a_multiple_of_16_is_not_walked() {
    let _serial = serial();
    let mut s = Setup::new();
    let data = s.ring.data.0;
    let table = data + 0x1000;
    // A valid-looking table, announced with a length one byte too long.
    s.mem()
        .write_slice(&descriptor(data, 16, DESC_WRITE, 0), GuestAddress(table))
        .unwrap();
    s.ring
        .write_desc(s.mem(), 0, descriptor(table, 17, DESC_INDIRECT, 0));
    assert_eq!(s.serve(0), 0);
    s.finish();
}

#[test]
fn indirect_table_crossing_the_end_of_memory_is_not_walked() {
    let _serial = serial();
    let mut s = Setup::new();
    s.ring
        .write_desc(s.mem(), 0, descriptor(END - 16, 64, DESC_INDIRECT, 0));
    assert_eq!(s.serve(0), 0);
    s.ring.write_desc(
        s.mem(),
        1,
        descriptor(0xdead_0000_0000, 64, DESC_INDIRECT, 0),
    );
    assert_eq!(s.serve(1), 0);
    s.finish();
}

#[test]
fn indirect_table_pointing_at_itself_ends() {
    let _serial = serial();
    let mut s = Setup::new();
    let table = s.ring.data.0 + 0x1000;
    // Nested indirect descriptors are not allowed; a loop inside the table is bounded.
    s.mem()
        .write_slice(
            &descriptor(table, 32, DESC_INDIRECT, 0),
            GuestAddress(table),
        )
        .unwrap();
    s.mem()
        .write_slice(
            &descriptor(table, 16, DESC_NEXT, 0),
            GuestAddress(table + 16),
        )
        .unwrap();
    s.ring
        .write_desc(s.mem(), 0, descriptor(table, 32, DESC_INDIRECT, 0));
    assert_eq!(
        s.serve(0),
        0,
        "a chain the walk cannot finish moves no bytes"
    );
    s.finish();
}

#[test]
fn head_index_past_the_table_does_not_stop_the_device() {
    let _serial = serial();
    let mut s = Setup::new();
    let mem = s.mem().clone();
    s.ring.offer(&mem, SIZE + 3);
    // A head out of range is skipped by the ring; the daemon answers on.
    assert_ne!(s.fe.get_features(), 0);
    drop(s.fe);
    let next = s.daemon.negotiated();
    assert_ne!(next.get_features(), 0);
    drop(next);
    s.daemon.stop();
}

#[test]
fn available_index_far_ahead_does_not_stop_the_daemon() {
    let _serial = serial();
    let s = Setup::new();
    let mem = s.mem().clone();
    let Setup {
        daemon,
        fe,
        mut ring,
        memory,
    } = s;
    ring.publish_avail_idx(&mem, 0x8000);
    // GET_VRING_BASE stops the ring whatever its state and answers.
    fe.ask(&R::GetVringBase(VringState { index: 0, num: 0 }))
        .unwrap();
    let _base = fe.recv_u64(FrontendReq::GetVringBase);
    assert_ne!(fe.get_features(), 0);
    drop((fe, memory));
    let next = daemon.negotiated();
    assert_ne!(next.get_features(), 0);
    drop(next);
    daemon.stop();
}

#[test]
fn polled_queue_with_an_available_index_far_ahead_is_not_served_again_and_again() {
    let _serial = serial();
    let mut s = Setup::new();
    // A polling window far longer than the test, opened by the kick below.
    s.daemon
        .daemon
        .set_polling(0, std::time::Duration::from_secs(3600))
        .unwrap();
    let mem = s.mem().clone();
    let events = || s.daemon.backend.events.load(Ordering::SeqCst);
    let before = events();
    s.ring.publish_avail_idx(&mem, SIZE + 5);
    let deadline = std::time::Instant::now() + HOSTILE_TIMEOUT;
    while events() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the kick was not served"
        );
        std::thread::yield_now();
    }
    // Round trips take real time while the worker polls: a ring that counted as work would be
    // dispatched again and again meanwhile (each pass logging its warning).
    for _ in 0..20 {
        assert_ne!(s.fe.get_features(), 0);
    }
    assert_eq!(events(), before + 1);
    // The driver republishes a valid index: the queue works again.
    s.stop_queue();
    s.ring.start(&s.fe, &s.memory, 0);
    s.finish();
}

#[test]
fn memory_table_replaced_while_the_queue_runs() {
    let _serial = serial();
    let before = open_fds();
    let mut s = Setup::new();
    s.good_request_is_served();
    // The frontend swaps in a table that no longer covers the rings, and kicks.
    let other = DriverMemory::new(0x10000);
    let req = R::SetMemTable {
        table: MemoryTable {
            regions: vec![other.region()],
        },
        fds: vec![other.fd()],
    };
    assert_eq!(s.fe.status(&req), 0);
    s.ring.kick.write(1).unwrap();
    assert_ne!(s.fe.get_features(), 0);
    // And back to the original table: the queue works again after a restart.
    let req = R::SetMemTable {
        table: MemoryTable {
            regions: vec![s.memory.region()],
        },
        fds: vec![s.memory.fd()],
    };
    assert_eq!(s.fe.status(&req), 0);
    s.stop_queue();
    s.ring.start(&s.fe, &s.memory, 0);
    s.good_request_is_served();
    drop(other);
    let Setup {
        daemon,
        fe,
        memory,
        ring,
    } = s;
    drop((fe, memory, ring));
    daemon.stop();
    assert_no_new_fds(&before);
}

#[test]
fn region_removed_while_the_queue_runs() {
    let _serial = serial();
    let mut s = Setup::new();
    s.good_request_is_served();
    let region = s.memory.region();
    let req = R::RemMemReg(region);
    assert_eq!(s.fe.status(&req), 0);
    // The rings are gone from the table: a kick must not touch unmapped memory.
    s.ring.kick.write(1).unwrap();
    assert_ne!(s.fe.get_features(), 0);
    let req = R::AddMemReg {
        region,
        fd: s.memory.fd(),
    };
    assert_eq!(s.fe.status(&req), 0);
    s.stop_queue();
    s.ring.start(&s.fe, &s.memory, 0);
    s.finish();
}

/// A ring whose call (and kick) fds are the ones given, not the ring's own.
fn start_with_fds(s: &Setup, kick: BorrowedFd<'_>, call: BorrowedFd<'_>) {
    s.ring.start(&s.fe, &s.memory, 0);
    assert_eq!(
        s.fe.status(&R::SetVringCall {
            index: 0,
            fd: Some(call)
        }),
        0
    );
    assert_eq!(
        s.fe.status(&R::SetVringKick {
            index: 0,
            fd: Some(kick)
        }),
        0
    );
}

#[test]
fn blocking_call_eventfd_at_its_maximum_does_not_hang_the_daemon() {
    let _serial = serial();
    let mut s = Setup::new();
    // A blocking eventfd one below its maximum: the next write would block forever.
    let call = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    call.write(u64::MAX - 1).unwrap();
    let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    start_with_fds(&s, eventfd_fd(&kick), eventfd_fd(&call));
    let data = s.ring.data.0;
    s.ring
        .write_desc(s.mem(), 0, descriptor(data, 16, DESC_NEXT, 1));
    s.ring
        .write_desc(s.mem(), 1, descriptor(data + 0x100, 16, DESC_WRITE, 0));
    let mem = s.mem().clone();
    let used = s.ring.used_idx(&mem);
    s.ring.offer(&mem, 0);
    kick.write(1).unwrap();
    // The device completes the chain (the used index is written before the call)...
    s.ring.wait_used(&mem, used.wrapping_add(1));
    // ...then must not block on the full call eventfd: GET_VRING_BASE waits until the worker
    // is out of `handle_event`, so it is answered only if the worker's write returned.
    let Setup {
        daemon,
        fe,
        memory,
        ring,
    } = s;
    let fe = vu_tests::daemon_support::within(HOSTILE_TIMEOUT, "GET_VRING_BASE", move || {
        fe.ask(&R::GetVringBase(VringState { index: 0, num: 0 }))
            .unwrap();
        fe.recv_u64(FrontendReq::GetVringBase);
        fe
    });
    drop((fe, memory, ring, call, kick));
    daemon.stop();
}
