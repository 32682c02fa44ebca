//! The data-path benchmark: one virtqueue driver (the `vu-tests` support driver over a shared
//! memfd, set up over a real UNIX socket with vu-proto's `Frontend`) drives, identically,
//!
//! - `vu`: the `vu_null` example of vu-backend (a null device on the vu framework), and
//! - `ref`: the same null device written on rust-vmm's vhost-user-backend 0.24, which this
//!   binary runs itself when started as `datapath --serve-ref <socket>`.
//!
//! Each backend runs in its own process, pinned with `taskset`; the driver pins itself to CPU
//! 0. "one CPU" puts the backend on CPU 0 too, "two CPUs" on CPU 1. For every cell (placement,
//! depth, chain length, EVENT_IDX) both backends are measured in turn, and the whole matrix is
//! repeated `--runs` times (interleaved, so that a noisy neighbour hurts both); the table shows
//! medians. It also reports the backend's CPU time per request (from the scheduler's per-thread
//! accounting, the process's CPU-time clock), the handshake time (connect to ring enabled,
//! REPLY_ACK on every message), idle RSS and threads, adaptive polling at depth 1 across CPUs,
//! and instructions per request under `valgrind --tool=callgrind` (repeatable where wall-clock
//! times are not).
//!
//! `cargo xtask bench` builds `vu_null` and runs this; see docs/performance.md. Options:
//! `--quick` (short runs), `--smoke` (one tiny run of each kind: checks the harness only),
//! `--runs N`, `--no-callgrind`, `--handshake-only`, `--polling-only` (the depth-1 polling table
//! alone), `--layouts-only` (only `vu_null` with split against packed rings, same driver model),
//! `--depth N` (only the cells of that depth, then only the throughput, floor, handshake and
//! layout tables), `--callgrind-only` (the instructions-per-request table alone: the
//! before/after check of a change, repeatable on a loaded machine; with `--layouts-only`, the
//! layouts' one), `--vu-null PATH`,
//! `--models` (only the driver-model tables of `datapath/models.rs`; `--model NAME`,
//! `--cpus 1|2` and `--descs N` narrow them; the full run prints them after the others),
//! `--svg DIR` (write the driver-model charts there, one SVG per model, and the block chart),
//! `--blk` (only the block tables of `datapath/blk.rs`: `vu_blk --null` against
//! qemu-storage-daemon's vhost-user-blk export of a `null-co` disk; `--request KIND`,
//! `--queues 1|2` and `--depth N` narrow them, `--callgrind-only` leaves only their
//! instruction counts; the full run prints them last), `--vu-blk PATH`, `--run-ms N` (the
//! length of each timed run).
//!
//! The last tables compare the two ring layouts on `vu_null` alone (the reference serves split
//! rings only): the same matrix and driver model, the driver [`LeanPacked`] for packed rings.
//!
//! The environment variable `VU_BENCH_BACKEND_PREFIX` puts a command in front of every backend
//! (its words, then `taskset ...`), for experiments such as a fixed scheduling order
//! (`chrt -f 1`) or profiling (`valgrind --tool=callgrind --trace-children=yes`).

// The harness measures and steers other processes (their CPU clocks, SIGTERM, inotify on
// their sockets), system calls std does not wrap: its `unsafe` blocks are allowed here.
#![allow(unsafe_code)]

#[path = "datapath/blk.rs"]
mod blk;
#[path = "datapath/models.rs"]
mod models;
#[path = "datapath/wake.rs"]
mod wake;

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vmm_sys_util::tempdir::TempDir;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_proto::frontend::Frontend;
use vu_tests::driver_models::{self, Model, Outcome, Until};
use vu_tests::lean_driver::floor::FloorDevice;
use vu_tests::lean_driver::{LeanDriver, LeanQueue, Segment};
use vu_tests::lean_packed::LeanPacked;
use vu_tests::proto_support::eventfd_fd;
use vu_tests::virtqueue::{wait_readable, DriverMemory};

/// Entries per queue: room for 128 chains of 3 descriptors.
const QUEUE_SIZE: u16 = 512;
/// Guest memory: the rings and one 4 KiB buffer per descriptor.
const MEMORY: u64 = 8 << 20;
/// How long a wait for the backend may take before the benchmark gives up.
const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The reference null device, on rust-vmm's vhost-user-backend.

mod reference {
    use std::io;
    use std::path::Path;
    use std::sync::Arc;

    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::Listener;
    use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;

    /// `VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_EVENT_IDX`, `VHOST_USER_F_PROTOCOL_FEATURES`.
    const FEATURES: u64 = (1 << 32) | (1 << 29) | (1 << 30);

    /// The null device: completes every chain with its writable length, one interrupt decision
    /// per pass, notifications suppressed while it works, all under one lock of the vring.
    pub(crate) struct RefNull {
        pub(crate) mem: GuestMemoryAtomic<GuestMemoryMmap>,
        /// The per-chain idiom: decide on (and send) the interrupt after every chain, as
        /// the vhost-device backends do, instead of once per pass.
        pub(crate) per_chain: bool,
    }

    impl VhostUserBackend for RefNull {
        type Bitmap = ();
        type Vring = VringRwLock;

        fn num_queues(&self) -> usize {
            1
        }

        fn max_queue_size(&self) -> usize {
            1024
        }

        fn features(&self) -> u64 {
            FEATURES
        }

        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
        }

        fn set_event_idx(&self, _enabled: bool) {}

        fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
            // The daemon updates the same atomic handle we hold.
            Ok(())
        }

        fn handle_event(
            &self,
            device_event: u16,
            _evset: EventSet,
            vrings: &[VringRwLock],
            _thread_id: usize,
        ) -> io::Result<()> {
            let Some(vring) = vrings.get(usize::from(device_event)) else {
                return Err(io::Error::other("unknown device event"));
            };
            let mem = self.mem.memory();
            let mut state = vring.get_mut();
            loop {
                state.disable_notification().map_err(io::Error::other)?;
                while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                    let head = chain.head_index();
                    let len = chain
                        .filter(|d| d.is_write_only())
                        .fold(0u32, |total, d| total.saturating_add(d.len()));
                    state.add_used(head, len).map_err(io::Error::other)?;
                    if self.per_chain && state.needs_notification().map_err(io::Error::other)? {
                        state.signal_used_queue()?;
                    }
                }
                if !self.per_chain && state.needs_notification().map_err(io::Error::other)? {
                    state.signal_used_queue()?;
                }
                if !state.enable_notification().map_err(io::Error::other)? {
                    return Ok(());
                }
            }
        }
    }

    /// Serves one frontend on `path`, then returns.
    pub(crate) fn serve(path: &Path, per_chain: bool) -> Result<(), String> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(RefNull {
            mem: mem.clone(),
            per_chain,
        });
        let mut daemon = VhostUserDaemon::new("ref-null".to_owned(), backend, mem)
            .map_err(|e| format!("daemon: {e}"))?;
        let mut listener = Listener::new(path, true).map_err(|e| format!("listen: {e}"))?;
        daemon
            .start(&mut listener)
            .map_err(|e| format!("start: {e}"))?;
        // The frontend's disconnect ends the daemon with an error; that is the normal end here.
        let _ = daemon.wait();
        // Dropping the daemon would join its worker threads, which only an exit event (that
        // this device does not have) stops: exit the process instead.
        std::process::exit(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Backend processes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Impl {
    Vu,
    Ref,
    /// The reference with the per-chain interrupt decision.
    RefChain,
    /// Not a backend: a process that echoes fixed-size messages, for the socket's own cost.
    Echo,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Vu => "vu",
            Impl::Ref => "ref",
            Impl::RefChain => "ref per chain",
            Impl::Echo => "echo",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Driver and backend on CPU 0.
    OneCpu,
    /// Driver on CPU 0, backend on CPU 1.
    TwoCpus,
}

impl Placement {
    fn backend_cpu(self) -> usize {
        match self {
            Placement::OneCpu => 0,
            Placement::TwoCpus => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Placement::OneCpu => "1 CPU",
            Placement::TwoCpus => "2 CPUs",
        }
    }
}

/// How the benchmark was asked to run.
#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    run_time: Duration,
    callgrind: bool,
    smoke: bool,
    handshake_only: bool,
    polling_only: bool,
    /// Only the instructions-per-request table (`--callgrind-only`).
    callgrind_only: bool,
    /// Only the split-against-packed tables (`--layouts-only`).
    layouts_only: bool,
    /// Only cells of this depth (`--depth N`).
    depth: Option<usize>,
    /// Only the driver-model tables (`--models`).
    models_only: bool,
    /// Which driver-model cells to run.
    model_filter: models::ModelFilter,
    /// Where to write the driver-model charts (`--svg DIR`).
    svg_dir: Option<PathBuf>,
    vu_null: PathBuf,
    /// Only the block tables (`--blk`).
    blk_only: bool,
    /// Which block cells to run.
    blk_filter: blk::BlkFilter,
    vu_blk: PathBuf,
}

/// A running backend process.
struct Backend {
    child: Child,
    which: Impl,
    path: PathBuf,
    _dir: TempDir,
}

impl Backend {
    fn spawn(opts: &Options, which: Impl, cpu: usize, extra: &[&str], cg: Option<&Path>) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/vu-bench-").expect("temp dir");
        let path = dir.as_path().join("s.sock");
        let watch = Watch::new(dir.as_path());
        let prefix = std::env::var("VU_BENCH_BACKEND_PREFIX").unwrap_or_default();
        let mut words = prefix.split_whitespace();
        let mut cmd = match words.next() {
            Some(first) => {
                let mut c = Command::new(first);
                c.args(words).arg("taskset");
                c
            }
            None => Command::new("taskset"),
        };
        cmd.arg("-c").arg(cpu.to_string());
        if let Some(out) = cg {
            cmd.args(["valgrind", "--tool=callgrind", "-q"]);
            cmd.arg(format!("--callgrind-out-file={}", out.display()));
        }
        match which {
            Impl::Vu => {
                cmd.arg(&opts.vu_null)
                    .arg("--socket-path")
                    .arg(&path)
                    .args(["--log-level", "warn"])
                    .args(extra);
            }
            Impl::Ref | Impl::RefChain | Impl::Echo => {
                let mode = match which {
                    Impl::Ref => "--serve-ref",
                    Impl::RefChain => "--serve-ref-chain",
                    _ => "--serve-echo",
                };
                cmd.arg(std::env::current_exe().expect("current exe"))
                    .arg(mode)
                    .arg(&path);
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {} backend: {e}", which.name()));
        wait_for_socket(&watch, &path, which.name());
        Backend {
            child,
            which,
            path,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time of all the backend's threads so far, in nanoseconds, from the process's CPU
    /// clock (exact to the call: the kernel adds the running slice of a thread on a CPU).
    fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.pid())
    }

    /// Resident memory (KiB) and thread count.
    fn rss_and_threads(&self) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("Threads:"))
    }

    /// Ends the backend: the references exit when their frontend leaves, vu_null on SIGTERM.
    fn finish(mut self) {
        if self.which == Impl::Vu {
            let pid = libc::pid_t::try_from(self.pid()).expect("pid");
            // SAFETY: kill(2) with a pid of our own child, which has not been waited for yet,
            // so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let status = self.child.wait().expect("wait for the backend");
        assert!(
            status.success(),
            "{} backend ended with {status}",
            self.which.name()
        );
    }
}

/// CPU time of all the threads of process `pid` so far, in nanoseconds: its CPU-time clock,
/// which is the utime + stime of /proc/<pid>/stat at full precision (the kernel adds the
/// running slice of a thread on a CPU).
fn process_cpu_ns(pid: u32) -> u64 {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for one clockid_t; the pid is our unwaited child.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return 0;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id was just obtained.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Bytes of an echoed message: a vhost-user header and a `u64` body.
const ECHO_SIZE: usize = 20;
/// Round trips of the handshake with REPLY_ACK: GET_FEATURES, GET_PROTOCOL_FEATURES, then an
/// acknowledgement for SET_FEATURES, SET_MEM_TABLE and six ring messages.
const HANDSHAKE_ROUND_TRIPS: usize = 10;

/// `--serve-echo`: accepts one connection on `path` and sends back every message.
fn serve_echo(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind");
    let (mut conn, _) = listener.accept().expect("accept");
    let mut buf = [0u8; ECHO_SIZE];
    while conn.read_exact(&mut buf).is_ok() {
        if conn.write_all(&buf).is_err() {
            break;
        }
    }
}

/// The time of `HANDSHAKE_ROUND_TRIPS` bare socket round trips to an echo process: the floor
/// under any handshake with that many acknowledged messages.
fn echo_floor(opts: &Options, placement: Placement) -> Duration {
    let backend = Backend::spawn(opts, Impl::Echo, placement.backend_cpu(), &[], None);
    let deadline = Instant::now() + TIMEOUT;
    let mut conn = loop {
        match UnixStream::connect(&backend.path) {
            Ok(conn) => break conn,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect: {e}");
                std::thread::yield_now();
            }
        }
    };
    let mut buf = [0u8; ECHO_SIZE];
    let mut round_trip = |conn: &mut UnixStream| {
        conn.write_all(&buf).expect("echo write");
        conn.read_exact(&mut buf).expect("echo read");
    };
    round_trip(&mut conn);
    let start = Instant::now();
    for _ in 0..HANDSHAKE_ROUND_TRIPS {
        round_trip(&mut conn);
    }
    let elapsed = start.elapsed();
    drop(conn);
    backend.finish();
    elapsed
}

/// An inotify watch of file creations in a directory.
struct Watch(OwnedFd);

impl Watch {
    fn new(dir: &Path) -> Self {
        // SAFETY: inotify_init1 takes flags only; a negative result is checked below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        assert!(fd >= 0, "inotify_init1 failed");
        // SAFETY: fd is a new inotify fd, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cdir = CString::new(dir.as_os_str().as_bytes()).expect("directory path");
        // SAFETY: the fd is an open inotify fd and `cdir` a NUL-terminated path that outlives
        // the call.
        let rc = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cdir.as_ptr(), libc::IN_CREATE) };
        assert!(rc >= 0, "inotify_add_watch failed");
        Watch(fd)
    }
}

/// Waits (on inotify, not on a timer) until the backend created its socket.
fn wait_for_socket(watch: &Watch, path: &Path, name: &str) {
    let deadline = Instant::now() + TIMEOUT;
    let mut events = File::from(watch.0.try_clone().expect("dup inotify fd"));
    let mut buf = [0u8; 4096];
    while !path.exists() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the {name} backend never listened");
        if wait_readable(watch.0.as_raw_fd(), left) {
            let _ = events.read(&mut buf);
        }
    }
}

/// Pins the calling process to `cpu`.
fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity get a
    // pointer to it and its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "cannot pin the driver to CPU {cpu}");
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// One cell of the matrix.
#[derive(Debug, Clone, Copy)]
struct Cell {
    placement: Placement,
    depth: usize,
    descs: usize,
    event_idx: bool,
}

impl Cell {
    fn chain(&self) -> Vec<Segment> {
        let seg = |len, writable| Segment { len, writable };
        match self.descs {
            1 => vec![seg(64, true)],
            // A block-like request: header, data, status.
            _ => vec![seg(16, false), seg(64, true), seg(1, true)],
        }
    }
}

/// A device set up over the socket, driven by a lean driver of either ring layout.
struct Driven<Q> {
    /// Kept open for the length of the run: closing it ends the connection.
    _frontend: Frontend,
    /// The guest memory the rings live in.
    _memory: DriverMemory,
    queue: Q,
}

/// Connects and sets the device up as QEMU does (REPLY_ACK on every message); returns the
/// device and the time from `SET_OWNER` to the enabled ring. Before the clock starts, the
/// driver's memory and queue layout are prepared (a VMM has them before it connects) and one
/// `GET_FEATURES` round trip makes sure the backend process is up and has accepted.
fn handshake<Q: LeanDriver>(
    path: &Path,
    event_idx: bool,
    chain: &[Segment],
) -> (Driven<Q>, Duration) {
    let mut memory = DriverMemory::new(MEMORY);
    let mut queue = Q::create(&mut memory, 0, QUEUE_SIZE, chain);
    let deadline = Instant::now() + TIMEOUT;
    let mut fe = loop {
        match Frontend::connect(path) {
            Ok(fe) => break fe,
            Err(e) => {
                // The socket exists; the backend is between bind(2) and listen(2).
                assert!(Instant::now() < deadline, "cannot connect: {e}");
                std::thread::yield_now();
            }
        }
    };
    fe.set_reply_timeout(Some(TIMEOUT)).expect("reply timeout");
    // A first request, untimed, that waits until the backend accepted the connection: its
    // process start-up is not the handshake.
    fe.get_features().expect("GET_FEATURES (ready?)");
    let start = Instant::now();
    fe.set_owner().expect("SET_OWNER");
    let offered = fe.get_features().expect("GET_FEATURES");
    let mut wanted =
        VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES | Q::layout_features();
    if event_idx {
        wanted |= VirtioFeatures::RING_EVENT_IDX;
    }
    let features = offered & wanted;
    assert!(
        features.contains(Q::layout_features()),
        "the backend does not offer {} rings",
        Q::LAYOUT
    );
    let protocol = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(protocol & (ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK))
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_features(features).expect("SET_FEATURES");
    fe.set_mem_table(&[memory.region()], &[memory.fd()])
        .expect("SET_MEM_TABLE");
    queue.set_event_idx(features.contains(VirtioFeatures::RING_EVENT_IDX));
    fe.set_vring_num(0, u32::from(QUEUE_SIZE))
        .expect("SET_VRING_NUM");
    fe.set_vring_addr(&queue.vring_addr())
        .expect("SET_VRING_ADDR");
    fe.set_vring_base(0, Q::initial_base())
        .expect("SET_VRING_BASE");
    fe.set_vring_call(0, Some(eventfd_fd(queue.call())))
        .expect("SET_VRING_CALL");
    fe.set_vring_kick(0, Some(eventfd_fd(queue.kick())))
        .expect("SET_VRING_KICK");
    fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
    let elapsed = start.elapsed();
    let device = Driven {
        _frontend: fe,
        _memory: memory,
        queue,
    };
    (device, elapsed)
}

/// Keeps `depth` chains in flight until `until`, then drains; returns the requests completed
/// and the time taken before the drain.
///
/// The loop of an interrupt-driven guest driver: post a batch, publish it with one index
/// store, decide once whether to kick; then take every used chain (asking for the next
/// interrupt with `used_event`), and sleep on the call eventfd only when nothing was used.
fn drive<Q: LeanDriver>(queue: &mut Q, depth: usize, until: Until) -> (u64, Duration) {
    assert!(
        depth <= queue.capacity(),
        "depth above the queue's capacity"
    );
    queue.post(depth);
    if queue.kick_prepare() {
        queue.notify();
    }
    let start = Instant::now();
    let mut done = 0u64;
    let mut posted = depth as u64;
    loop {
        let used = queue.take_used();
        if used == 0 {
            queue.wait_interrupt(TIMEOUT);
            continue;
        }
        done += used as u64;
        let more = match until {
            Until::Time(t) => start.elapsed() < t,
            Until::Requests(n) => posted < n,
        };
        if !more {
            break;
        }
        posted += queue.post(used) as u64;
        if queue.kick_prepare() {
            queue.notify();
        }
    }
    let elapsed = start.elapsed();
    while queue.in_flight() > 0 {
        let used = queue.take_used();
        if used == 0 {
            queue.wait_interrupt(TIMEOUT);
        }
        done += used as u64;
    }
    (done, elapsed)
}

/// The in-memory floor: the same driver and virtio-queue's `Queue` as the device, in one
/// thread, no eventfds (kick and interrupt decisions are made, nothing is written). Returns
/// requests per second.
fn floor_rate(cell: Cell, t: Duration) -> f64 {
    let mut memory = DriverMemory::new(MEMORY);
    let mut queue = LeanQueue::new(&mut memory, 0, QUEUE_SIZE, &cell.chain());
    queue.set_event_idx(cell.event_idx);
    let mut device = FloorDevice::new(&memory, &queue, cell.event_idx);
    let mut kicks = 0u64;
    let mut run = |queue: &mut LeanQueue, until: Until| {
        queue.post(cell.depth);
        let start = Instant::now();
        let mut done = 0u64;
        loop {
            if queue.kick_prepare() {
                kicks += 1;
            }
            device.process();
            let used = queue.take_used();
            done += used as u64;
            let more = match until {
                Until::Time(t) => start.elapsed() < t,
                Until::Requests(n) => done < n,
            };
            if !more {
                break;
            }
            queue.post(used);
        }
        let elapsed = start.elapsed();
        device.process();
        done += queue.take_used() as u64;
        (done, elapsed)
    };
    run(&mut queue, Until::Requests(10_000));
    let (done, elapsed) = run(&mut queue, Until::Time(t));
    assert!(kicks > 0 && device.interrupts > 0);
    drop(memory);
    done as f64 / elapsed.as_secs_f64()
}

/// One measurement of one backend in one cell.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Requests per second.
    rate: f64,
    /// Backend CPU nanoseconds per request.
    cpu_per_req: f64,
    /// Backend CPU use over the run, in CPUs (1.0 = one CPU busy).
    cpu_use: f64,
    /// Backend CPU use in the 100 ms after the run (idle).
    idle_use: f64,
    handshake: Duration,
}

fn measure(opts: &Options, which: Impl, cell: Cell, extra: &[&str], t: Duration) -> Sample {
    measure_on::<LeanQueue>(opts, which, cell, extra, t)
}

/// [`measure`] with the driver `Q`, so with its ring layout.
fn measure_on<Q: LeanDriver>(
    opts: &Options,
    which: Impl,
    cell: Cell,
    extra: &[&str],
    t: Duration,
) -> Sample {
    let backend = Backend::spawn(opts, which, cell.placement.backend_cpu(), extra, None);
    let (mut device, handshake) = handshake::<Q>(&backend.path, cell.event_idx, &cell.chain());
    // Warm up: page faults, caches, the first wake-ups.
    drive(&mut device.queue, cell.depth, Until::Requests(1000));
    let cpu0 = backend.cpu_ns();
    let wall = Instant::now();
    let (done, elapsed) = drive(&mut device.queue, cell.depth, Until::Time(t));
    let cpu = backend.cpu_ns() - cpu0;
    let wall = wall.elapsed();
    // Idle: the driver posts nothing for 100 ms (a late interrupt of the drain is taken).
    let idle_from = backend.cpu_ns();
    let idle_start = Instant::now();
    let window = Duration::from_millis(100);
    while let Some(left) = window.checked_sub(idle_start.elapsed()) {
        if wait_readable(device.queue.call().as_raw_fd(), left) {
            let _ = device.queue.call().read();
        }
    }
    let idle = idle_start.elapsed();
    let idle_cpu = backend.cpu_ns() - idle_from;
    drop(device);
    backend.finish();
    Sample {
        rate: done as f64 / elapsed.as_secs_f64(),
        cpu_per_req: cpu as f64 / done as f64,
        cpu_use: cpu as f64 / wall.as_nanos() as f64,
        idle_use: idle_cpu as f64 / idle.as_nanos() as f64,
        handshake,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else {
        format!("{:.1} k", r / 1e3)
    }
}

// ---------------------------------------------------------------------------------------------
// Callgrind.

/// Total instructions (`Ir`) of a callgrind output file.
fn callgrind_total(path: &Path) -> u64 {
    let text = fs::read_to_string(path).expect("read the callgrind output");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("callgrind totals line")
}

/// Instructions the backend executes per request at `depth`: the difference between two runs
/// of `n` and `5n` requests, so that start-up and handshake cancel out. `extra` goes to the
/// backend's command line.
fn instructions_per_request<Q: LeanDriver>(
    opts: &Options,
    (which, extra): (Impl, &[&str]),
    cell: Cell,
    n: u64,
) -> f64 {
    let dir = TempDir::new_with_prefix("/tmp/vu-cg-").expect("temp dir");
    let mut totals = Vec::new();
    let depth = cell.depth;
    for requests in [n, 5 * n] {
        let out = dir.as_path().join(format!("cg-{requests}.out"));
        let backend = Backend::spawn(opts, which, 1, extra, Some(&out));
        let (mut device, _) = handshake::<Q>(&backend.path, true, &cell.chain());
        drive(&mut device.queue, depth, Until::Requests(requests));
        drop(device);
        backend.finish();
        totals.push(callgrind_total(&out) as f64);
    }
    (totals[1] - totals[0]) / (4 * n) as f64
}

// ---------------------------------------------------------------------------------------------
// The report.

fn cells(opts: &Options) -> Vec<Cell> {
    let mut cells = Vec::new();
    let depths: &[usize] = if opts.smoke { &[1, 32] } else { &[1, 32, 128] };
    for placement in [Placement::OneCpu, Placement::TwoCpus] {
        for &depth in depths
            .iter()
            .filter(|&&d| opts.depth.is_none_or(|o| o == d))
        {
            for descs in [1, 3] {
                for event_idx in [true, false] {
                    cells.push(Cell {
                        placement,
                        depth,
                        descs,
                        event_idx,
                    });
                }
            }
        }
    }
    cells
}

fn run(opts: &Options) {
    pin_self(0);
    let cells = cells(opts);
    let t = opts.run_time;
    // samples[cell][impl]
    let mut samples: Vec<[Vec<Sample>; 2]> = (0..cells.len()).map(|_| [vec![], vec![]]).collect();
    for run in 0..opts.runs {
        eprintln!("run {} of {}", run + 1, opts.runs);
        for (i, &cell) in cells.iter().enumerate() {
            // Alternate which backend goes first.
            let order = if (run + i) % 2 == 0 {
                [Impl::Vu, Impl::Ref]
            } else {
                [Impl::Ref, Impl::Vu]
            };
            for which in order {
                let s = measure(opts, which, cell, &[], t);
                samples[i][which as usize].push(s);
            }
        }
    }

    println!(
        "\n### Throughput (requests/s, median of {} interleaved runs of {} ms)\n",
        opts.runs,
        t.as_millis()
    );
    println!("| placement | depth | descs | EVENT_IDX | vu | ref | vu/ref | vu CPU ns/req | ref CPU ns/req |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    for (cell, s) in cells.iter().zip(&samples) {
        let vu = med(&s[0], |x| x.rate);
        let rf = med(&s[1], |x| x.rate);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {:.0} |",
            cell.placement.name(),
            cell.depth,
            cell.descs,
            if cell.event_idx { "on" } else { "off" },
            fmt_rate(vu),
            fmt_rate(rf),
            vu / rf,
            med(&s[0], |x| x.cpu_per_req),
            med(&s[1], |x| x.cpu_per_req),
        );
    }
    floor_table(opts, &cells, &samples);
    polled_across_cpus(opts, &cells, &samples);
    handshakes(opts, &cells, &samples);
    if opts.depth.is_some() {
        // A partial matrix: the other tables are not asked for.
        layouts(opts);
        return;
    }
    polling(opts);
    footprint(opts);
    models::models(opts);
    if opts.callgrind {
        callgrind(opts);
    }
    layouts(opts);
    match blk_ready(opts) {
        Ok(()) => blk::blk(opts),
        Err(e) => println!("\n(block tables skipped: {e})"),
    }
}

/// Whether the block tables can run: vu_blk built and qemu-storage-daemon installed.
fn blk_ready(opts: &Options) -> Result<(), String> {
    if !opts.vu_blk.exists() {
        return Err(format!(
            "{} not found; build it with `cargo build --release -p vu-backend --example vu_blk` or pass --vu-blk",
            opts.vu_blk.display()
        ));
    }
    if !blk::qsd_available() {
        return Err("qemu-storage-daemon not found (cargo xtask deps installs it)".to_owned());
    }
    Ok(())
}

/// The two-CPU cells at depth 32 and above with EVENT_IDX, `vu_null` polling 50 µs after every
/// kick (a budget the device sets: no backoff), against the reference of the main table.
fn polled_across_cpus(opts: &Options, cells: &[Cell], samples: &[[Vec<Sample>; 2]]) {
    println!(
        "\n### Across CPUs polling after every kick (vu_null --poll-us 50; medians of {} runs)\n",
        opts.runs
    );
    println!("| depth | descs | vu polling | ref | vu/ref | vu CPU ns/req | vu CPU busy | vu idle CPU after |");
    println!("|---|---|---|---|---|---|---|---|");
    for (cell, s) in cells.iter().zip(samples) {
        if cell.placement != Placement::TwoCpus || cell.depth < 32 || !cell.event_idx {
            continue;
        }
        let polled: Vec<Sample> = (0..opts.runs)
            .map(|_| measure(opts, Impl::Vu, *cell, &["--poll-us", "50"], opts.run_time))
            .collect();
        let vu = median(polled.iter().map(|x| x.rate).collect());
        let rf = median(s[1].iter().map(|x| x.rate).collect());
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.0} | {:.0} % | {:.1} % |",
            cell.depth,
            cell.descs,
            fmt_rate(vu),
            fmt_rate(rf),
            vu / rf,
            median(polled.iter().map(|x| x.cpu_per_req).collect()),
            100.0 * median(polled.iter().map(|x| x.cpu_use).collect()),
            100.0 * median(polled.iter().map(|x| x.idle_use).collect()),
        );
    }
}

/// The in-memory floor of each one-CPU cell at depth 32 and above, against both backends.
fn floor_table(opts: &Options, cells: &[Cell], samples: &[[Vec<Sample>; 2]]) {
    println!(
        "\n### In-memory floor (virtio-queue and the same driver in one thread, no eventfds; medians)\n"
    );
    println!("| depth | descs | EVENT_IDX | floor | vu, 1 CPU | vu/floor | ref/floor |");
    println!("|---|---|---|---|---|---|---|");
    for (cell, s) in cells.iter().zip(samples) {
        if cell.placement != Placement::OneCpu || cell.depth < 32 {
            continue;
        }
        let floor = median(
            (0..opts.runs)
                .map(|_| floor_rate(*cell, opts.run_time))
                .collect(),
        );
        let vu = median(s[0].iter().map(|x| x.rate).collect());
        let rf = median(s[1].iter().map(|x| x.rate).collect());
        println!(
            "| {} | {} | {} | {} | {} | {:.0} % | {:.0} % |",
            cell.depth,
            cell.descs,
            if cell.event_idx { "on" } else { "off" },
            fmt_rate(floor),
            fmt_rate(vu),
            100.0 * vu / floor,
            100.0 * rf / floor,
        );
    }
}

/// The handshake times of every connection of the matrix, per placement, against the socket.
fn handshakes(opts: &Options, cells: &[Cell], samples: &[[Vec<Sample>; 2]]) {
    println!("\n### Handshake (SET_OWNER to ring enabled, REPLY_ACK on every message; medians)\n");
    println!("| placement | vu | ref | vu/ref | {HANDSHAKE_ROUND_TRIPS} bare socket round trips |");
    println!("|---|---|---|---|---|");
    for placement in [Placement::OneCpu, Placement::TwoCpus] {
        let mut times: [Vec<f64>; 2] = [vec![], vec![]];
        for (cell, s) in cells.iter().zip(samples) {
            if cell.placement == placement {
                for (k, t) in times.iter_mut().enumerate() {
                    t.extend(s[k].iter().map(|x| x.handshake.as_secs_f64() * 1e6));
                }
            }
        }
        let floor: Vec<f64> = (0..opts.runs.max(5))
            .map(|_| echo_floor(opts, placement).as_secs_f64() * 1e6)
            .collect();
        let [vu, rf] = times.map(median);
        println!(
            "| {} | {vu:.0} µs | {rf:.0} µs | {:.2} | {:.0} µs |",
            placement.name(),
            vu / rf,
            median(floor)
        );
    }
}

/// `--handshake-only`: the handshake table alone, from `5 * runs` interleaved connections
/// per backend and placement (no data path).
fn handshake_only(opts: &Options) {
    pin_self(0);
    println!("\n### Handshake (SET_OWNER to ring enabled, REPLY_ACK on every message; medians of {} connections)\n", 5 * opts.runs);
    println!("| placement | vu | ref | vu/ref | {HANDSHAKE_ROUND_TRIPS} bare socket round trips |");
    println!("|---|---|---|---|---|");
    let chain = [Segment {
        len: 64,
        writable: true,
    }];
    for placement in [Placement::OneCpu, Placement::TwoCpus] {
        let mut times: [Vec<f64>; 2] = [vec![], vec![]];
        let mut floor = Vec::new();
        for i in 0..5 * opts.runs {
            let order = if i % 2 == 0 {
                [Impl::Vu, Impl::Ref]
            } else {
                [Impl::Ref, Impl::Vu]
            };
            for which in order {
                let backend = Backend::spawn(opts, which, placement.backend_cpu(), &[], None);
                let (device, t) = handshake::<LeanQueue>(&backend.path, true, &chain);
                times[which as usize].push(t.as_secs_f64() * 1e6);
                drop(device);
                backend.finish();
            }
            floor.push(echo_floor(opts, placement).as_secs_f64() * 1e6);
        }
        let [vu, rf] = times.map(median);
        println!(
            "| {} | {vu:.0} µs | {rf:.0} µs | {:.2} | {:.0} µs |",
            placement.name(),
            vu / rf,
            median(floor)
        );
    }
}

/// Depth 1 with vu_null's polling (the adaptive default, none, and budgets set by the device),
/// against the reference, in both placements.
fn polling(opts: &Options) {
    let configs: [(&str, Impl, &[&str]); 5] = [
        ("ref", Impl::Ref, &[]),
        ("vu, no polling", Impl::Vu, &["--poll-us", "0"]),
        ("vu (adaptive polling, the default)", Impl::Vu, &[]),
        ("vu, polling 50 µs", Impl::Vu, &["--poll-us", "50"]),
        ("vu, polling 1000 µs", Impl::Vu, &["--poll-us", "1000"]),
    ];
    println!("\n### Depth-1 latency with polling (1 descriptor, EVENT_IDX; medians)\n");
    println!("| placement | backend | round trip | best run | requests/s | backend CPU ns/req | backend CPU busy | idle CPU after |");
    println!("|---|---|---|---|---|---|---|---|");
    for placement in [Placement::TwoCpus, Placement::OneCpu] {
        let cell = Cell {
            placement,
            depth: 1,
            descs: 1,
            event_idx: true,
        };
        let mut samples: Vec<Vec<Sample>> = vec![vec![]; configs.len()];
        for _ in 0..opts.runs {
            for (k, (_, which, extra)) in configs.iter().enumerate() {
                samples[k].push(measure(opts, *which, cell, extra, opts.run_time));
            }
        }
        for ((name, _, _), s) in configs.iter().zip(&samples) {
            let rate = median(s.iter().map(|x| x.rate).collect());
            let best = s.iter().map(|x| x.rate).fold(0.0, f64::max);
            println!(
                "| {} | {name} | {:.1} µs | {:.1} µs | {} | {:.0} | {:.0} % | {:.1} % |",
                placement.name(),
                1e6 / rate,
                1e6 / best,
                fmt_rate(rate),
                median(s.iter().map(|x| x.cpu_per_req).collect()),
                100.0 * median(s.iter().map(|x| x.cpu_use).collect()),
                100.0 * median(s.iter().map(|x| x.idle_use).collect()),
            );
        }
    }
}

/// Idle RSS and threads of each backend with one connected, set-up device.
fn footprint(opts: &Options) {
    println!("\n### Idle footprint (one device, one queue, connected and set up)\n");
    println!("| backend | RSS | threads |\n|---|---|---|");
    for which in [Impl::Vu, Impl::Ref] {
        let backend = Backend::spawn(opts, which, 1, &[], None);
        let chain = [Segment {
            len: 64,
            writable: true,
        }];
        let (device, _) = handshake::<LeanQueue>(&backend.path, true, &chain);
        let (rss, threads) = backend.rss_and_threads();
        println!("| {} | {rss} KiB | {threads} |", which.name());
        drop(device);
        backend.finish();
    }
}

fn callgrind(opts: &Options) {
    let n = if opts.smoke { 200 } else { 5000 };
    println!("\n### Instructions per request in the backend (callgrind; EVENT_IDX, 2 CPUs)\n");
    // vu_null polls its queue after a kick by default (adaptive); the instructions of a poll
    // depend on timing, so the column without polling is the load-independent one.
    println!("| depth | descs | vu | vu, no polling | ref | vu/ref | vu no polling/ref |");
    println!("|---|---|---|---|---|---|---|");
    let cells: &[(usize, usize)] = if opts.smoke {
        &[(1, 1), (32, 1)]
    } else {
        &[(1, 1), (1, 3), (32, 1), (32, 3), (128, 1), (128, 3)]
    };
    for &(depth, descs) in cells {
        let cell = Cell {
            placement: Placement::TwoCpus,
            depth,
            descs,
            event_idx: true,
        };
        let vu = instructions_per_request::<LeanQueue>(opts, (Impl::Vu, &[]), cell, n);
        let no_poll = (Impl::Vu, &["--poll-us", "0"][..]);
        let quiet = instructions_per_request::<LeanQueue>(opts, no_poll, cell, n);
        let rf = instructions_per_request::<LeanQueue>(opts, (Impl::Ref, &[]), cell, n);
        println!(
            "| {depth} | {descs} | {vu:.0} | {quiet:.0} | {rf:.0} | {:.2} | {:.2} |",
            vu / rf,
            quiet / rf
        );
    }
}

/// `vu_null` with split rings against `vu_null` with packed rings: the same lean driver model
/// in both layouts ([`LeanQueue`], [`LeanPacked`]), every cell of the matrix, interleaved
/// runs (the layout that goes first alternates); then instructions per request for both.
fn layouts(opts: &Options) {
    if !opts.callgrind_only {
        layouts_throughput(opts);
    }
    if opts.callgrind {
        layouts_callgrind(opts);
    }
}

/// The wall-clock table of [`layouts`].
fn layouts_throughput(opts: &Options) {
    let cells = cells(opts);
    let t = opts.run_time;
    // samples[cell][0: split, 1: packed]
    let mut samples: Vec<[Vec<Sample>; 2]> = (0..cells.len()).map(|_| [vec![], vec![]]).collect();
    for run in 0..opts.runs {
        eprintln!("layouts: run {} of {}", run + 1, opts.runs);
        for (i, &cell) in cells.iter().enumerate() {
            for k in [(run + i) % 2, (run + i + 1) % 2] {
                let s = if k == 0 {
                    measure_on::<LeanQueue>(opts, Impl::Vu, cell, &[], t)
                } else {
                    measure_on::<LeanPacked>(opts, Impl::Vu, cell, &[], t)
                };
                samples[i][k].push(s);
            }
        }
    }
    println!(
        "\n### vu_null, split against packed rings (requests/s, median of {} interleaved runs of {} ms)\n",
        opts.runs,
        t.as_millis()
    );
    println!("| placement | depth | descs | EVENT_IDX | split | packed | packed/split | split CPU ns/req | packed CPU ns/req |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    for (cell, s) in cells.iter().zip(&samples) {
        let split = med(&s[0], |x| x.rate);
        let packed = med(&s[1], |x| x.rate);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {:.0} |",
            cell.placement.name(),
            cell.depth,
            cell.descs,
            if cell.event_idx { "on" } else { "off" },
            fmt_rate(split),
            fmt_rate(packed),
            packed / split,
            med(&s[0], |x| x.cpu_per_req),
            med(&s[1], |x| x.cpu_per_req),
        );
    }
}

/// Instructions per request in `vu_null` with split and with packed rings.
fn layouts_callgrind(opts: &Options) {
    let n = if opts.smoke { 200 } else { 5000 };
    println!("\n### vu_null instructions per request, split against packed (callgrind; EVENT_IDX, 2 CPUs)\n");
    println!("| depth | descs | split | packed | packed/split |\n|---|---|---|---|---|");
    let depths: &[usize] = if opts.smoke { &[1, 32] } else { &[1, 32, 128] };
    for &depth in depths
        .iter()
        .filter(|&&d| opts.depth.is_none_or(|o| o == d))
    {
        for descs in [1, 3] {
            let cell = Cell {
                placement: Placement::TwoCpus,
                depth,
                descs,
                event_idx: true,
            };
            let split = instructions_per_request::<LeanQueue>(opts, (Impl::Vu, &[]), cell, n);
            let packed = instructions_per_request::<LeanPacked>(opts, (Impl::Vu, &[]), cell, n);
            println!(
                "| {depth} | {descs} | {split:.0} | {packed:.0} | {:.2} |",
                packed / split
            );
        }
    }
}

fn default_vu_null() -> PathBuf {
    default_example("vu_null")
}

/// Where cargo puts the example `name` of this build.
fn default_example(name: &str) -> PathBuf {
    // target/<profile>/deps/datapath-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|p| p.join("examples").join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-echo") {
        let Some(path) = args.get(i + 1) else {
            eprintln!("--serve-echo needs a socket path");
            return ExitCode::from(2);
        };
        serve_echo(Path::new(path));
        return ExitCode::SUCCESS;
    }
    if let Some(i) = args
        .iter()
        .position(|a| a == "--serve-ref" || a == "--serve-ref-chain")
    {
        let Some(path) = args.get(i + 1) else {
            eprintln!("{} needs a socket path", args[i]);
            return ExitCode::from(2);
        };
        return match reference::serve(Path::new(path), args[i] == "--serve-ref-chain") {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("datapath --serve-ref: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut opts = Options {
        runs: 5,
        run_time: Duration::from_millis(250),
        callgrind: true,
        smoke: false,
        handshake_only: false,
        polling_only: false,
        callgrind_only: false,
        layouts_only: false,
        depth: None,
        models_only: false,
        model_filter: models::ModelFilter::default(),
        svg_dir: None,
        vu_null: default_vu_null(),
        blk_only: false,
        blk_filter: blk::BlkFilter::default(),
        vu_blk: default_example("vu_blk"),
    };
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--quick" => {
                opts.runs = 3;
                opts.run_time = Duration::from_millis(100);
            }
            "--smoke" => {
                opts.smoke = true;
                opts.runs = 1;
                opts.run_time = Duration::from_millis(20);
            }
            "--run-ms" => {
                opts.run_time = Duration::from_millis(
                    words
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .expect("--run-ms N"),
                );
            }
            "--runs" => {
                opts.runs = words
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--runs N");
            }
            "--no-callgrind" => opts.callgrind = false,
            "--handshake-only" => opts.handshake_only = true,
            "--polling-only" => opts.polling_only = true,
            "--callgrind-only" => opts.callgrind_only = true,
            "--layouts-only" => opts.layouts_only = true,
            "--depth" => {
                opts.depth = Some(
                    words
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .expect("--depth N"),
                );
            }
            "--models" => opts.models_only = true,
            "--svg" => opts.svg_dir = Some(PathBuf::from(words.next().expect("--svg DIR"))),
            "--model" => {
                let name = words.next().map(String::as_str).unwrap_or_default();
                let Some(model) = Model::from_name(name) else {
                    eprintln!(
                        "datapath: --model takes one of {:?}",
                        Model::ALL.map(Model::name)
                    );
                    return ExitCode::from(2);
                };
                opts.model_filter.models.push(model);
            }
            "--cpus" => {
                opts.model_filter.placement = match words.next().map(String::as_str) {
                    Some("1") => Some(Placement::OneCpu),
                    Some("2") => Some(Placement::TwoCpus),
                    _ => {
                        eprintln!("datapath: --cpus takes 1 or 2");
                        return ExitCode::from(2);
                    }
                };
            }
            "--descs" => {
                opts.model_filter.descs = words.next().and_then(|n| n.parse().ok());
            }
            "--vu-null" => opts.vu_null = PathBuf::from(words.next().expect("--vu-null PATH")),
            "--blk" => opts.blk_only = true,
            "--request" => {
                let name = words.next().map(String::as_str).unwrap_or_default();
                let Some(op) = blk::Op::from_name(name) else {
                    eprintln!("datapath: --request takes 4k-read, 4k-write, 64k-read or 64k-write");
                    return ExitCode::from(2);
                };
                opts.blk_filter.requests.push(op);
            }
            "--queues" => {
                opts.blk_filter.queues = match words.next().map(String::as_str) {
                    Some("1") => Some(1),
                    Some("2") => Some(2),
                    _ => {
                        eprintln!("datapath: --queues takes 1 or 2");
                        return ExitCode::from(2);
                    }
                };
            }
            "--vu-blk" => opts.vu_blk = PathBuf::from(words.next().expect("--vu-blk PATH")),
            // Passed by `cargo bench`.
            "--bench" => {}
            other => {
                eprintln!("datapath: unknown argument `{other}`");
                return ExitCode::from(2);
            }
        }
    }
    if opts.blk_only {
        print_machine();
        return match blk_ready(&opts) {
            Ok(()) => {
                blk::blk(&opts);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("datapath: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !opts.vu_null.exists() {
        eprintln!(
            "datapath: {} not found; build it with `cargo build --release -p vu-backend --example vu_null` or pass --vu-null",
            opts.vu_null.display()
        );
        return ExitCode::FAILURE;
    }
    if opts.callgrind && Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("datapath: valgrind not found; skipping the instruction counts");
        opts.callgrind = false;
    }
    print_machine();
    if opts.handshake_only {
        handshake_only(&opts);
        return ExitCode::SUCCESS;
    }
    if opts.models_only {
        models::models(&opts);
        return ExitCode::SUCCESS;
    }
    if opts.polling_only {
        pin_self(0);
        polling(&opts);
        return ExitCode::SUCCESS;
    }
    if opts.layouts_only {
        pin_self(0);
        layouts(&opts);
        return ExitCode::SUCCESS;
    }
    if opts.callgrind_only {
        if !opts.callgrind {
            eprintln!("datapath: --callgrind-only needs valgrind");
            return ExitCode::FAILURE;
        }
        pin_self(0);
        callgrind(&opts);
        return ExitCode::SUCCESS;
    }
    run(&opts);
    ExitCode::SUCCESS
}

/// The machine, for the record.
fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("machine: {cpus} CPUs, {model}, Linux {}", kernel.trim());
    let across = wake::wake_latency(1);
    let same = wake::wake_latency(0);
    println!(
        "wake-up of a thread blocked on an eventfd, on CPU 0: written from CPU 1 {:.1} µs \
         (median; 90th percentile {:.1} µs), from CPU 0 {:.1} µs ({:.1} µs)",
        across.median_us, across.p90_us, same.median_us, same.p90_us
    );
}
