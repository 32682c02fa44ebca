//! Restarting a backend under a live driver, below QEMU: a stop while a request is mid-flight
//! completes it before the frontend can see the connection end; a new daemon resumes from a
//! restart point that agrees with the used ring; and with inflight I/O tracking, a chain the
//! old daemon popped and never completed is served again by the new one, once.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vu_backend::{
    process_queue, process_queue_async, Completion, VhostUserBackend, VhostUserDaemon, VringMutex,
    VringT,
};
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::message::FrontendRequest;
use vu_proto::payload::{Inflight, Payload, VringAddr, VringAddrFlags, VringEnable, VringState};
use vu_tests::daemon_support::within;
use vu_tests::device::{socket_path, DEVICE_TIMEOUT};
use vu_tests::hostile::{descriptor, Hostile, RawRing, DESC_WRITE};
use vu_tests::virtqueue::DriverMemory;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Ring size of these tests.
const SIZE: u16 = 64;

/// What the device does with the next kick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Serve every chain.
    Serve,
    /// Serve, but stop inside each chain until the test releases it.
    Gate,
    /// Pop one chain and lose it, as a process killed after popping would.
    LoseOne,
    /// Take every chain for later (`Completion::Later`); the test completes some, and the
    /// ring's stop (`stop_vring`) completes the rest.
    Defer,
    /// As `Defer`, but the stop completes nothing, as a process killed with requests in
    /// flight would.
    DeferAndLose,
}

/// A device that writes one byte (0x5a) into each chain's first writable descriptor.
#[derive(Debug)]
struct Device {
    mode: Mutex<Mode>,
    /// Tells the test which chain the device is in (in [`Mode::Gate`]).
    entered: Mutex<Sender<u16>>,
    /// Releases the chain the device is in.
    release: Mutex<Receiver<()>>,
    /// The heads served, in order.
    served: Mutex<Vec<u16>>,
    /// The chains taken for later and not completed, oldest first, and their vring.
    taken: Mutex<(Vec<u16>, Option<VringMutex<Mem>>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Device {
    fn new(mode: Mode) -> (Arc<Self>, Receiver<u16>, Sender<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let device = Device {
            mode: Mutex::new(mode),
            entered: Mutex::new(entered_tx),
            release: Mutex::new(release_rx),
            served: Mutex::new(Vec::new()),
            taken: Mutex::new((Vec::new(), None)),
        };
        (Arc::new(device), entered, release)
    }

    /// Completes the chain taken for later `head` (used length 1), as a device's I/O thread
    /// would, from the calling thread.
    fn complete(&self, head: u16) {
        let mut taken = lock(&self.taken);
        let vring = taken.1.clone().expect("a vring");
        taken.0.retain(|&h| h != head);
        drop(taken);
        let mut data = vring.get_mut();
        assert_eq!(data.complete_deferred([(head, 1)]).unwrap(), 1);
        data.signal_used_queue_if_needed().unwrap();
    }

    fn served(&self) -> Vec<u16> {
        lock(&self.served).clone()
    }
}

impl VhostUserBackend for Device {
    type Bitmap = ();
    type Vring = VringMutex<Mem>;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        usize::from(SIZE)
    }
    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES).bits()
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::REPLY_ACK | ProtocolFeatures::INFLIGHT_SHMFD
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn update_memory(&self, _mem: Mem) -> std::io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[VringMutex<Mem>],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let vring = &vrings[0];
        if !vring.read_kick()? {
            return Ok(());
        }
        let mut mode = *lock(&self.mode);
        if matches!(mode, Mode::Defer | Mode::DeferAndLose) {
            lock(&self.taken).1 = Some(vring.clone());
            process_queue_async(vring, |chain| {
                let head = chain.head_index();
                lock(&self.taken).0.push(head);
                let _ = lock(&self.entered).send(head);
                Completion::Later
            });
            return Ok(());
        }
        if mode == Mode::LoseOne && vring.pop_descriptor_chain().is_some() {
            mode = Mode::Serve;
            *lock(&self.mode) = mode;
        }
        process_queue(vring, |chain| {
            let head = chain.head_index();
            if mode == Mode::Gate {
                let _ = lock(&self.entered).send(head);
                let _ = lock(&self.release).recv_timeout(DEVICE_TIMEOUT);
            }
            lock(&self.served).push(head);
            let mem = chain.memory();
            match chain.writable().next() {
                Some(d) if mem.write_obj(0x5au8, d.addr()).is_ok() => 1,
                _ => 0,
            }
        });
        Ok(())
    }

    fn stop_vring(&self, _queue: u16) -> std::io::Result<()> {
        if *lock(&self.mode) == Mode::Defer {
            // Newest first: out of order.
            let taken: Vec<u16> = lock(&self.taken).0.clone();
            for &head in taken.iter().rev() {
                self.complete(head);
            }
        }
        Ok(())
    }
}

/// A daemon serving `device` on a fresh socket, with a frontend connected and negotiated.
struct Served {
    daemon: VhostUserDaemon<Arc<Device>>,
    fe: Hostile,
    _dir: vmm_sys_util::tempdir::TempDir,
}

fn serve(device: &Arc<Device>) -> Served {
    let (dir, path) = socket_path();
    let mut daemon = VhostUserDaemon::new(
        "vu-restart".to_owned(),
        device.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .expect("daemon");
    let listener = vu_proto::listener::Listener::bind(&path).expect("bind");
    daemon.start(listener).expect("start");
    let fe = Hostile::connect(&path);
    fe.negotiate();
    Served {
        daemon,
        fe,
        _dir: dir,
    }
}

/// Sends `req` with NEED_REPLY and asserts it was accepted.
fn ok(fe: &Hostile, req: &FrontendRequest<BorrowedFd<'_>>) {
    assert_eq!(fe.status(req), 0, "{:?} refused", req.code());
}

/// The memory table, then queue 0 on `ring` from available index `base`, as QEMU starts a
/// ring (num, base, addr, kick, call, enable).
fn start_ring(fe: &Hostile, memory: &DriverMemory, ring: &RawRing, base: u16) {
    type R<'a> = FrontendRequest<BorrowedFd<'a>>;
    ok(
        fe,
        &R::SetMemTable {
            table: vu_proto::payload::MemoryTable {
                regions: vec![memory.region()],
            },
            fds: vec![memory.fd()],
        },
    );
    ok(
        fe,
        &R::SetVringNum(VringState {
            index: 0,
            num: u32::from(SIZE),
        }),
    );
    ok(
        fe,
        &R::SetVringBase(VringState {
            index: 0,
            num: u32::from(base),
        }),
    );
    ok(
        fe,
        &R::SetVringAddr(VringAddr {
            index: 0,
            flags: VringAddrFlags::empty(),
            descriptor: memory.user_addr(ring.desc),
            used: memory.user_addr(ring.used),
            available: memory.user_addr(ring.avail),
            log: 0,
        }),
    );
    ok(
        fe,
        &R::SetVringKick {
            index: 0,
            fd: Some(vu_tests::proto_support::eventfd_fd(&ring.kick)),
        },
    );
    ok(
        fe,
        &R::SetVringCall {
            index: 0,
            fd: Some(vu_tests::proto_support::eventfd_fd(&ring.call)),
        },
    );
    ok(
        fe,
        &R::SetVringEnable(VringEnable {
            index: 0,
            enable: true,
        }),
    );
}

/// A driver memory with a ring whose descriptors `0..SIZE` each point at one writable byte.
fn driver() -> (DriverMemory, RawRing) {
    let mut memory = DriverMemory::new(1 << 20);
    let ring = RawRing::new(&mut memory, SIZE);
    for i in 0..SIZE {
        let addr = ring.data.0 + 16 * u64::from(i);
        ring.write_desc(memory.mem(), i, descriptor(addr, 16, DESC_WRITE, 0));
    }
    (memory, ring)
}

/// `GET_INFLIGHT_FD` for one queue of [`SIZE`]: the area's description and fd.
fn get_inflight(fe: &Hostile) -> (Inflight, OwnedFd) {
    let req = FrontendRequest::<OwnedFd>::GetInflightFd(Inflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: SIZE,
    });
    fe.ask(&req).expect("GET_INFLIGHT_FD");
    let reply = fe.recv().expect("GET_INFLIGHT_FD reply");
    let desc = Inflight::decode_body(reply.header.request, &reply.body).expect("description");
    let fd = reply.fds.into_iter().next().expect("an fd");
    (desc, fd)
}

fn set_inflight(fe: &Hostile, desc: Inflight, fd: &OwnedFd) {
    ok(
        fe,
        &FrontendRequest::SetInflightFd {
            inflight: desc,
            fd: fd.as_fd(),
        },
    );
}

/// Waits until the used index reaches `idx`.
fn wait_used(memory: &DriverMemory, ring: &RawRing, idx: u16) {
    let deadline = std::time::Instant::now() + DEVICE_TIMEOUT;
    while ring.used_idx(memory.mem()) != idx {
        assert!(std::time::Instant::now() < deadline, "used index not {idx}");
        vu_tests::virtqueue::wait_readable(
            std::os::fd::AsRawFd::as_raw_fd(&ring.call),
            std::time::Duration::from_millis(100),
        );
        let _ = ring.call.read();
    }
}

fn stop(served: Served) {
    let Served { mut daemon, .. } = served;
    within(DEVICE_TIMEOUT, "stopping the daemon", move || {
        daemon.request_shutdown();
        daemon.wait().expect("the daemon stopped cleanly");
    });
}

#[test]
fn a_stop_mid_request_completes_it_before_the_frontend_sees_the_end() {
    let (device, entered, release) = Device::new(Mode::Gate);
    let served = serve(&device);
    let (memory, mut ring) = driver();
    start_ring(&served.fe, &memory, &ring, 0);
    ring.offer(memory.mem(), 0);
    assert_eq!(entered.recv_timeout(DEVICE_TIMEOUT), Ok(0));

    // The device is inside the request: a stop must not let the frontend see the end yet,
    // or it would take the used index (0) as the restart point while the request completes.
    served.daemon.shutdown_handle().shutdown();
    assert!(!served.fe.is_closed_by_peer_now());
    assert_eq!(ring.used_idx(memory.mem()), 0);

    release.send(()).unwrap();
    assert!(served.fe.is_closed_by_peer());
    // By the time the frontend sees the end, the completion is in the used ring.
    assert_eq!(ring.used_idx(memory.mem()), 1);
    assert_eq!(ring.used_elem(memory.mem(), 0), (0, 1));
    stop(served);
}

#[test]
fn a_new_daemon_does_not_serve_again_a_chain_the_used_ring_shows_completed() {
    // The frontend read the used index before the old daemon's last completion landed and
    // sends a base one behind the used ring (the SIGTERM hang of issue 15).
    let (first, _entered, _release) = Device::new(Mode::Serve);
    let served = serve(&first);
    let (memory, mut ring) = driver();
    start_ring(&served.fe, &memory, &ring, 0);
    ring.offer(memory.mem(), 0);
    wait_used(&memory, &ring, 1);
    stop(served);

    let (second, _entered, _release) = Device::new(Mode::Serve);
    let served = serve(&second);
    start_ring(&served.fe, &memory, &ring, 0);
    ring.offer(memory.mem(), 1);
    wait_used(&memory, &ring, 2);
    assert_eq!(second.served(), vec![1]);
    assert_eq!(ring.used_elem(memory.mem(), 1), (1, 1));
    stop(served);
}

#[test]
fn with_inflight_tracking_a_lost_chain_is_served_again_once_and_first() {
    let (first, _entered, _release) = Device::new(Mode::LoseOne);
    let served = serve(&first);
    let (desc, area) = get_inflight(&served.fe);
    set_inflight(&served.fe, desc, &area);
    let (memory, mut ring) = driver();
    start_ring(&served.fe, &memory, &ring, 0);
    ring.offer(memory.mem(), 5);
    ring.offer(memory.mem(), 6);
    wait_used(&memory, &ring, 1);
    // Head 5 was popped and lost; head 6 was served.
    assert_eq!(first.served(), vec![6]);
    stop(served);

    // A new process: the frontend hands back the same area and, having lost the old
    // process, restarts the ring from the used index (1).
    let (second, _entered, _release) = Device::new(Mode::Serve);
    let served = serve(&second);
    set_inflight(&served.fe, desc, &area);
    start_ring(&served.fe, &memory, &ring, 1);
    wait_used(&memory, &ring, 2);
    ring.offer(memory.mem(), 7);
    wait_used(&memory, &ring, 3);
    assert_eq!(second.served(), vec![5, 7]);
    assert_eq!(ring.used_elem(memory.mem(), 1), (5, 1));
    let byte: u8 = memory
        .mem()
        .read_obj(vm_memory::GuestAddress(ring.data.0 + 16 * 5))
        .unwrap();
    assert_eq!(byte, 0x5a);
    stop(served);
}

#[test]
fn a_stop_completes_the_chains_taken_for_later_before_the_frontend_sees_the_end() {
    let (device, entered, _release) = Device::new(Mode::Defer);
    let served = serve(&device);
    let (memory, mut ring) = driver();
    start_ring(&served.fe, &memory, &ring, 0);
    for head in 0..3 {
        ring.offer(memory.mem(), head);
    }
    let mut taken: Vec<u16> = (0..3)
        .map(|_| entered.recv_timeout(DEVICE_TIMEOUT).unwrap())
        .collect();
    taken.sort_unstable();
    assert_eq!(taken, vec![0, 1, 2]);
    // Completed out of order, from another thread.
    device.complete(1);
    wait_used(&memory, &ring, 1);
    assert_eq!(ring.used_elem(memory.mem(), 0), (1, 1));

    served.daemon.shutdown_handle().shutdown();
    assert!(served.fe.is_closed_by_peer());
    // The ring's stop completed the other two before the frontend saw the end.
    assert_eq!(ring.used_idx(memory.mem()), 3);
    assert_eq!(ring.used_elem(memory.mem(), 1), (2, 1));
    assert_eq!(ring.used_elem(memory.mem(), 2), (0, 1));
    stop(served);
}

#[test]
fn with_inflight_tracking_chains_taken_for_later_and_lost_are_served_again() {
    let (first, entered, _release) = Device::new(Mode::DeferAndLose);
    let served = serve(&first);
    let (desc, area) = get_inflight(&served.fe);
    set_inflight(&served.fe, desc, &area);
    let (memory, mut ring) = driver();
    start_ring(&served.fe, &memory, &ring, 0);
    for head in [3, 4, 5, 6] {
        ring.offer(memory.mem(), head);
    }
    for _ in 0..4 {
        entered.recv_timeout(DEVICE_TIMEOUT).unwrap();
    }
    // 5 and 3 complete, out of order; 4 and 6 are in flight when the process "dies".
    first.complete(5);
    first.complete(3);
    wait_used(&memory, &ring, 2);
    stop(served);

    let (second, _entered, _release) = Device::new(Mode::Serve);
    let served = serve(&second);
    set_inflight(&served.fe, desc, &area);
    start_ring(&served.fe, &memory, &ring, 2);
    wait_used(&memory, &ring, 4);
    assert_eq!(second.served(), vec![4, 6]);
    let used: Vec<(u32, u32)> = (0..4).map(|i| ring.used_elem(memory.mem(), i)).collect();
    assert_eq!(used, vec![(5, 1), (3, 1), (4, 1), (6, 1)]);
    stop(served);
}
