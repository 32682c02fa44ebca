//! A hostile frontend over a real socket, message by message: wrong payload sizes, wrong fd
//! counts, queue indexes past a narrowing cast, overflowing sizes and offsets, inflight
//! descriptions out of range. Each case asserts what the frontend sees (a refusal or a clean
//! close), that the daemon goes on serving (this connection or the next one), and that no fd
//! of the message stayed open in the process (the daemon runs in this process, so an fd it
//! kept would be listed in `/proc/self/fd`).
//!
//! The tests of this binary take a lock so that they run one at a time: fd counting sees
//! the whole process.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

use vmm_sys_util::eventfd::EventFd;
use vu_proto::features::ProtocolFeatures;
use vu_proto::header::{HeaderFlags, MAX_FDS};
use vu_proto::message::FrontendRequest;
use vu_proto::payload::{
    Inflight, Log, MemoryRegion, MemoryTable, VringAddr, VringAddrFlags, VringEnable, VringState,
};
use vu_proto::request::FrontendReq;
use vu_tests::fdleak::{assert_no_new_fds, open_fds};
use vu_tests::hostile::{send_with_fds, Hostile, HostileDaemon, HOSTILE_TIMEOUT};
use vu_tests::proto_support::{eventfd, eventfd_fd, memfd};

type R<'a> = FrontendRequest<BorrowedFd<'a>>;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

const VMM: u64 = 0x7f00_0000_0000;

fn region(gpa: u64, size: u64, vmm: u64, offset: u64) -> MemoryRegion {
    MemoryRegion {
        guest_phys_addr: gpa,
        memory_size: size,
        user_addr: vmm,
        mmap_offset: offset,
    }
}

/// A daemon and a negotiated connection to it.
fn negotiated() -> (HostileDaemon, Hostile) {
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    let fe = daemon.negotiated();
    (daemon, fe)
}

/// The frontend still gets answers on this connection, and a new connection is served too.
fn still_serving(daemon: &HostileDaemon, fe: &Hostile) {
    assert_ne!(fe.get_features(), 0);
    let other = daemon.connect();
    drop(fe.endpoint.stream().shutdown(std::net::Shutdown::Both));
    assert_ne!(other.get_features(), 0);
}

/// The daemon closed `fe`, and serves the next connection.
fn closed_then_next_served(daemon: &HostileDaemon, fe: Hostile) {
    assert!(fe.is_closed_by_peer(), "the daemon kept the connection");
    drop(fe);
    let next = daemon.negotiated();
    assert_ne!(next.get_features(), 0);
}

#[test]
fn payload_shorter_than_the_request_takes_is_refused() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let code = FrontendReq::SetVringNum.code().0;
    fe.send_raw(code, HeaderFlags::NEED_REPLY, 4, &[0; 4], &[])
        .unwrap();
    assert_ne!(fe.ack(FrontendReq::SetVringNum), 0);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn payload_longer_than_the_request_takes_is_refused() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let code = FrontendReq::SetFeatures.code().0;
    fe.send_raw(code, HeaderFlags::NEED_REPLY, 16, &[0; 16], &[])
        .unwrap();
    assert_ne!(fe.ack(FrontendReq::SetFeatures), 0);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn extra_fds_on_a_request_that_takes_none_are_closed_not_kept() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    {
        let fds: Vec<EventFd> = (0..3).map(|_| eventfd()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(eventfd_fd).collect();
        let body = [0u8; 8];
        fe.send_raw(
            FrontendReq::SetVringNum.code().0,
            HeaderFlags::NEED_REPLY,
            8,
            &body,
            &borrowed,
        )
        .unwrap();
        assert_ne!(fe.ack(FrontendReq::SetVringNum), 0);
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn extra_fds_on_a_request_that_takes_one_are_closed_not_kept() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    {
        let fds: Vec<EventFd> = (0..2).map(|_| eventfd()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(eventfd_fd).collect();
        fe.send_raw(
            FrontendReq::SetVringCall.code().0,
            HeaderFlags::NEED_REPLY,
            8,
            &0u64.to_le_bytes(),
            &borrowed,
        )
        .unwrap();
        assert_ne!(fe.ack(FrontendReq::SetVringCall), 0);
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn mem_table_with_more_fds_than_regions_is_refused_and_closes_them() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    {
        let files: Vec<_> = (0..3).map(|_| memfd(0x1000)).collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        let table = MemoryTable {
            regions: vec![region(0, 0x1000, VMM, 0)],
        };
        let req = R::SetMemTable { table, fds };
        assert_ne!(fe.status(&req), 0);
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn mem_table_with_fewer_fds_than_regions_is_refused_and_closes_them() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    {
        let file = memfd(0x1000);
        let table = MemoryTable {
            regions: vec![
                region(0, 0x1000, VMM, 0),
                region(0x1000, 0x1000, VMM + 0x1000, 0),
            ],
        };
        let req = R::SetMemTable {
            table,
            fds: vec![file.as_fd()],
        };
        assert_ne!(fe.status(&req), 0);
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn request_that_needs_an_fd_without_one_is_refused() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let log = Log {
        mmap_size: 0x1000,
        mmap_offset: 0,
    };
    let (header, body) = R::SetLogBase {
        log,
        fd: memfd(1).as_fd(),
    }
    .encode(HeaderFlags::NEED_REPLY);
    fe.endpoint.send_message(&header, &body, &[]).unwrap();
    assert_ne!(fe.recv_u64(FrontendReq::SetLogBase), 0);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn more_fds_than_a_message_may_carry_are_all_closed() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    {
        let fds: Vec<EventFd> = (0..MAX_FDS + 4).map(|_| eventfd()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(eventfd_fd).collect();
        let header =
            vu_proto::header::Header::new(FrontendReq::SetVringNum, HeaderFlags::NEED_REPLY, 8);
        let bytes = [&header.to_bytes()[..], &[0; 8]].concat();
        send_with_fds(fe.endpoint.stream(), &bytes, &borrowed);
        // Either refused on this connection or the connection is cut: both are clean.
        match fe.recv() {
            Ok(reply) => assert!(reply.header.is_reply()),
            Err(_) => assert!(fe.is_closed_by_peer()),
        }
    }
    drop(fe);
    let next = daemon.negotiated();
    assert_ne!(next.get_features(), 0);
    drop(next);
    daemon.stop();
    assert_no_new_fds(&before);
}

/// Indexes a 32-bit field can hold that a narrowing cast to u8 or u16 would wrap to a valid
/// queue (DPDK CVE-2020-10723), the first index past the queues, and the largest.
const BAD_INDEXES: [u32; 4] = [1 << 8, 1 << 16, 2, u32::MAX];

#[test]
fn queue_index_past_a_narrowing_cast_is_refused_by_every_ring_request() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    for index in BAD_INDEXES {
        let state = VringState { index, num: 16 };
        assert_ne!(
            fe.status(&R::SetVringNum(state)),
            0,
            "SET_VRING_NUM {index}"
        );
        assert_ne!(
            fe.status(&R::SetVringBase(state)),
            0,
            "SET_VRING_BASE {index}"
        );
        let addr = VringAddr {
            index,
            flags: VringAddrFlags::empty(),
            descriptor: VMM,
            used: VMM + 0x2000,
            available: VMM + 0x1000,
            log: 0,
        };
        assert_ne!(
            fe.status(&R::SetVringAddr(addr)),
            0,
            "SET_VRING_ADDR {index}"
        );
        let enable = VringEnable {
            index,
            enable: true,
        };
        assert_ne!(fe.status(&R::SetVringEnable(enable)), 0, "ENABLE {index}");
        assert_ne!(fe.status(&R::VringKick(state)), 0, "VRING_KICK {index}");
    }
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn vring_fd_request_for_a_queue_past_the_last_is_refused_and_closes_the_fd() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    for index in [2u8, 255] {
        let call = eventfd();
        let req = R::SetVringCall {
            index,
            fd: Some(eventfd_fd(&call)),
        };
        assert_ne!(fe.status(&req), 0, "SET_VRING_CALL {index}");
        let kick = eventfd();
        let req = R::SetVringKick {
            index,
            fd: Some(eventfd_fd(&kick)),
        };
        assert_ne!(fe.status(&req), 0, "SET_VRING_KICK {index}");
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn get_vring_base_past_the_last_queue_closes_the_connection() {
    let _serial = serial();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    for index in BAD_INDEXES {
        let fe = daemon.negotiated();
        // GET_VRING_BASE always has an answer and that answer cannot say "failed".
        fe.ask(&R::GetVringBase(VringState { index, num: 0 }))
            .unwrap();
        closed_then_next_served(&daemon, fe);
    }
    daemon.stop();
}

#[test]
fn set_log_base_whose_size_plus_offset_overflows_is_refused() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    for (mmap_size, mmap_offset) in [
        (u64::MAX, 0x1000),
        (0x1000, u64::MAX - 0xfff),
        (0x1000, i64::MAX as u64),
        (0, 0),
    ] {
        let file = memfd(0x1000);
        let req = R::SetLogBase {
            log: Log {
                mmap_size,
                mmap_offset,
            },
            fd: file.as_fd(),
        };
        fe.ask(&req).unwrap();
        assert_ne!(
            fe.recv_u64(FrontendReq::SetLogBase),
            0,
            "size {mmap_size:#x} offset {mmap_offset:#x}"
        );
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn memory_regions_whose_size_plus_offset_overflows_are_refused() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    let cases = [
        region(0, 0x2000, VMM, u64::MAX - 0xfff),
        region(u64::MAX - 0xfff, 0x2000, VMM, 0),
        region(0, 0x2000, u64::MAX - 0xfff, 0),
        region(0, u64::MAX, VMM, 0),
        region(0, 0, VMM, 0),
        // Larger than its file: touching the tail would raise SIGBUS.
        region(0, 0x10000, VMM, 0),
        region(0, 0x2000, VMM, 0x1000),
    ];
    for r in cases {
        let file = memfd(0x2000);
        let req = R::SetMemTable {
            table: MemoryTable { regions: vec![r] },
            fds: vec![file.as_fd()],
        };
        assert_ne!(fe.status(&req), 0, "SET_MEM_TABLE {r:?}");
        let req = R::AddMemReg {
            region: r,
            fd: file.as_fd(),
        };
        assert_ne!(fe.status(&req), 0, "ADD_MEM_REG {r:?}");
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn overlapping_regions_are_refused() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let a = memfd(0x2000);
    let b = memfd(0x2000);
    let req = R::SetMemTable {
        table: MemoryTable {
            regions: vec![
                region(0, 0x2000, VMM, 0),
                region(0x1000, 0x2000, VMM + 0x10000, 0),
            ],
        },
        fds: vec![a.as_fd(), b.as_fd()],
    };
    assert_ne!(fe.status(&req), 0);
    still_serving(&daemon, &fe);
    daemon.stop();
}

/// The reply to `GET_INFLIGHT_FD`: the area's size and its fd, if any.
fn get_inflight(fe: &Hostile, num_queues: u16, queue_size: u16) -> (u64, Option<OwnedFd>) {
    let req = R::GetInflightFd(Inflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues,
        queue_size,
    });
    fe.ask(&req).unwrap();
    let mut msg = fe.recv().unwrap();
    assert!(msg.header.is_reply());
    assert!(msg.fds.len() <= 1);
    // The failure form has no fd, which the typed reply decoder (rightly) refuses.
    let size = u64::from_le_bytes(msg.body[..8].try_into().unwrap());
    (size, msg.fds.pop())
}

#[test]
fn inflight_description_out_of_range_gets_no_area() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    for (num_queues, queue_size) in [(0, 256), (3, 256), (u16::MAX, 256), (2, 0), (2, u16::MAX)] {
        let (size, fd) = get_inflight(&fe, num_queues, queue_size);
        assert_eq!(size, 0, "{num_queues} queues of {queue_size}");
        assert!(fd.is_none(), "{num_queues} queues of {queue_size}");
    }
    // An in-range description gets an area while the framework offers INFLIGHT_SHMFD (the
    // offer table masks it until inflight tracking serves it); no area otherwise.
    fe.ask(&R::GetProtocolFeatures).unwrap();
    let offered = ProtocolFeatures::from_bits_retain(fe.recv_u64(FrontendReq::GetProtocolFeatures));
    let served = offered.contains(ProtocolFeatures::INFLIGHT_SHMFD);
    let (size, fd) = get_inflight(&fe, 2, 256);
    assert_eq!(
        size != 0,
        served,
        "an in-range description gets an area when served"
    );
    assert_eq!(fd.is_some(), served);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn set_inflight_fd_out_of_range_is_refused() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    for (mmap_size, mmap_offset, num_queues, queue_size) in [
        (0x1000, u64::MAX, 2, 256),
        (u64::MAX, 0, 2, 256),
        (0x100000, 0, u16::MAX, 256),
        (0x100000, 0, 2, u16::MAX),
        (0x10, 0, 2, 256),
    ] {
        let file = memfd(0x1000);
        let req = R::SetInflightFd {
            inflight: Inflight {
                mmap_size,
                mmap_offset,
                num_queues,
                queue_size,
            },
            fd: file.as_fd(),
        };
        assert_ne!(
            fe.status(&req),
            0,
            "{mmap_size:#x}@{mmap_offset:#x} {num_queues}x{queue_size}"
        );
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn unknown_request_code_is_refused() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    fe.send_raw(0xdead, HeaderFlags::NEED_REPLY, 4, &[1, 2, 3, 4], &[])
        .unwrap();
    let reply = fe.recv().unwrap();
    assert!(reply.header.is_reply());
    assert_ne!(reply.body, 0u64.to_le_bytes());
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
fn reply_flag_on_a_request_closes_the_connection() {
    let _serial = serial();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    // A GET_FEATURES sent as a reply: whatever such a peer waits for, it is told at once by
    // the close, with or without NEED_REPLY; the daemon serves the next frontend.
    for flags in [
        HeaderFlags::REPLY,
        HeaderFlags::NEED_REPLY | HeaderFlags::REPLY,
    ] {
        let fe = daemon.negotiated();
        let (header, body) = R::GetFeatures.encode(flags);
        fe.endpoint.send_message(&header, &body, &[]).unwrap();
        closed_then_next_served(&daemon, fe);
    }
    daemon.stop();
}

#[test]
fn header_with_a_bad_version_or_an_oversized_payload_closes_the_connection() {
    let _serial = serial();
    let daemon = HostileDaemon::serving(Some(HOSTILE_TIMEOUT));
    // Version 2.
    let fe = daemon.negotiated();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&1u32.to_ne_bytes());
    bytes.extend_from_slice(&2u32.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    fe.write_bytes(&bytes);
    closed_then_next_served(&daemon, fe);
    // A size past the largest payload.
    let fe = daemon.negotiated();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&5u32.to_ne_bytes());
    bytes.extend_from_slice(&1u32.to_ne_bytes());
    bytes.extend_from_slice(&u32::MAX.to_ne_bytes());
    fe.write_bytes(&bytes);
    closed_then_next_served(&daemon, fe);
    daemon.stop();
}

#[test]
fn kick_call_or_err_fd_that_is_not_an_eventfd_is_refused_and_closed() {
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let before = open_fds();
    {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = memfd(0x1000);
        for fd in [a.as_fd(), file.as_fd()] {
            let kick = R::SetVringKick {
                index: 0,
                fd: Some(fd),
            };
            assert_ne!(fe.status(&kick), 0, "kick {fd:?}");
            let call = R::SetVringCall {
                index: 0,
                fd: Some(fd),
            };
            assert_ne!(fe.status(&call), 0, "call {fd:?}");
            let err = R::SetVringErr {
                index: 1,
                fd: Some(fd),
            };
            assert_ne!(fe.status(&err), 0, "err {fd:?}");
        }
    }
    assert_no_new_fds(&before);
    still_serving(&daemon, &fe);
    daemon.stop();
}

#[test]
#[allow(unsafe_code)] // fcntl(F_GETFL) on our copy of the log eventfd.
fn blocking_log_eventfd_is_made_non_blocking() {
    use std::os::fd::AsRawFd;
    let _serial = serial();
    let (daemon, fe) = negotiated();
    let log = EventFd::new(0).unwrap();
    assert_eq!(
        fe.status(&R::SetLogFd {
            fd: eventfd_fd(&log)
        }),
        0
    );
    // The flag belongs to the open file description, which our copy shares.
    // SAFETY: F_GETFL on a live fd; no pointers.
    let flags = unsafe { libc::fcntl(log.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    still_serving(&daemon, &fe);
    daemon.stop();
}
