//! The block path against libvhost-user: the lean driver under the `linux-blk` driver model,
//! speaking virtio-blk requests (a 16-byte out header, the data, a 1-byte status: chains of
//! three descriptors), against
//!
//! - `vu_blk --null`, the vu framework's block example on a disk that holds nothing (a read
//!   writes zeroes into the guest's buffers, a write is completed without reading its data),
//!   served in the kick's pass (`--sync`) by one worker thread for every queue
//!   (`--threads 1`) and, for comparison, on its offload threads (the default), and
//! - `qemu-storage-daemon`'s `vhost-user-blk` export (QEMU's block layer on libvhost-user) of
//!   a `null-co` node with `read-zeroes=on` (the same work per request: zeroes into the
//!   guest's buffers for a read, nothing for a write), served in an iothread.
//!
//! Reads and writes of 4 KiB and 64 KiB, depth 1, 32 and 128 per queue, 1 and 2 queues (one
//! driver thread per queue, each on CPU 0; the backend on CPU 1). Each cell reports requests
//! per second, the backend's CPU time per request (all its threads: the process's CPU clock,
//! which is its utime + stime) and the interrupts (call eventfd writes) per request; then
//! instructions per request under callgrind, which a loaded machine does not disturb.

use std::sync::{Arc, Barrier};

use super::*;

/// The block backends, in the order of the table's columns: each side without polling,
/// each side polling up to [`POLL_US`] after a pass, and vu_blk on its offload threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blk {
    /// `vu_blk --null --sync --poll-us 0`: each request served in the kick's pass, the
    /// worker sleeps as soon as the queue is empty.
    VuSync,
    /// `qemu-storage-daemon`, null-co, the vhost-user-blk export in an iothread with
    /// `poll-max-ns=0` (no busy polling before it sleeps).
    Qsd,
    /// `vu_blk --null --sync --poll-us 32`.
    VuPoll,
    /// The iothread with QEMU's default `poll-max-ns` (32768): after each pass it spins up to
    /// 32 µs (adaptively) before it sleeps.
    QsdPoll,
    /// `vu_blk --null --poll-us 0`: requests on the offload threads (4), completed as they
    /// finish.
    VuThreads,
}

/// The polling budget of [`Blk::VuPoll`], QEMU's default `poll-max-ns` for an iothread.
const POLL_US: u64 = 32;

impl Blk {
    const ALL: [Blk; 5] = [
        Blk::VuSync,
        Blk::Qsd,
        Blk::VuPoll,
        Blk::QsdPoll,
        Blk::VuThreads,
    ];

    fn name(self) -> &'static str {
        match self {
            Blk::VuSync => "vu_blk",
            Blk::Qsd => "qsd",
            Blk::VuPoll => "vu_blk poll",
            Blk::QsdPoll => "qsd poll",
            Blk::VuThreads => "vu_blk threads",
        }
    }

    fn is_qsd(self) -> bool {
        matches!(self, Blk::Qsd | Blk::QsdPoll)
    }
}

/// One kind of request of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Op {
    write: bool,
    len: u32,
}

impl Op {
    const ALL: [Op; 4] = [
        Op {
            write: false,
            len: 4096,
        },
        Op {
            write: true,
            len: 4096,
        },
        Op {
            write: false,
            len: 65536,
        },
        Op {
            write: true,
            len: 65536,
        },
    ];

    fn name(self) -> String {
        format!(
            "{} KiB {}",
            self.len / 1024,
            if self.write { "write" } else { "read" }
        )
    }

    /// The chain of every request: header, data, status.
    fn chain(self) -> [Segment; 3] {
        [
            Segment {
                len: 16,
                writable: false,
            },
            Segment {
                len: self.len,
                writable: !self.write,
            },
            Segment {
                len: 1,
                writable: true,
            },
        ]
    }
}

/// One cell of the block matrix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlkCell {
    op: Op,
    depth: usize,
    queues: u16,
}

/// The disk both backends serve: 1 GiB.
const DISK_MIB: u64 = 1024;
/// Entries per queue: room for 128 chains of 3 descriptors.
const BLK_QUEUE_SIZE: u16 = 512;
/// The CPU the backend runs on; every driver thread runs on CPU 0.
const BLK_CPU: usize = 1;
/// `VIRTIO_BLK_T_IN`, `VIRTIO_BLK_T_OUT`.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// A status byte no device writes: the driver's mark of a request never completed.
const NOT_DONE: u8 = 0xff;
/// The bytes of each read's data buffer the driver marks and checks the device zeroed.
const MARKED: usize = 64;

/// A running block backend.
struct BlkProcess {
    child: Child,
    which: Blk,
    path: PathBuf,
    _dir: TempDir,
}

impl BlkProcess {
    fn spawn(opts: &Options, which: Blk, queues: u16, cg: Option<&Path>) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/vu-bench-blk-").expect("temp dir");
        let path = dir.as_path().join("s.sock");
        let watch = Watch::new(dir.as_path());
        // As for the other backends: VU_BENCH_BACKEND_PREFIX's words go first.
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
        cmd.arg("-c").arg(BLK_CPU.to_string());
        if let Some(out) = cg {
            cmd.args(["valgrind", "--tool=callgrind", "-q"]);
            cmd.arg(format!("--callgrind-out-file={}", out.display()));
        }
        match which {
            Blk::VuSync | Blk::VuPoll | Blk::VuThreads => {
                let poll = if which == Blk::VuPoll { POLL_US } else { 0 };
                cmd.arg(&opts.vu_blk)
                    .arg("--socket-path")
                    .arg(&path)
                    .args(["--null", &DISK_MIB.to_string()])
                    .args(["--num-queues", &queues.to_string()])
                    // Every queue on one worker thread, as qsd serves every queue from its
                    // one iothread: the backend has one CPU either way.
                    .args(["--threads", "1"])
                    .args(["--poll-us", &poll.to_string()])
                    .args(["--log-level", "warn"]);
                if which != Blk::VuThreads {
                    cmd.arg("--sync");
                }
            }
            Blk::Qsd | Blk::QsdPoll => {
                let iothread = if which == Blk::Qsd {
                    "iothread,id=io0,poll-max-ns=0"
                } else {
                    "iothread,id=io0"
                };
                cmd.arg("qemu-storage-daemon")
                    .args(["--object", iothread])
                    .arg("--blockdev")
                    .arg(format!(
                        "driver=null-co,node-name=n0,size={},read-zeroes=on",
                        DISK_MIB << 20
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},\
                         num-queues={queues},writable=on,iothread=io0",
                        path.display()
                    ));
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        if which.is_qsd() && cg.is_some() {
            // valgrind's notes on the system calls it does not know (userfaultfd).
            cmd.stderr(Stdio::null());
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", which.name()));
        wait_for_socket(&watch, &path, which.name());
        BlkProcess {
            child,
            which,
            path,
            _dir: dir,
        }
    }

    fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.child.id())
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) with a pid of our own child, which has not been waited for yet, so
        // the pid cannot have been reused.
        unsafe { libc::kill(pid, signal) };
    }

    /// Ends the backend, once its client is gone, with SIGTERM: vu_blk must exit cleanly on
    /// it. qemu-storage-daemon 7.2 does not exit on SIGTERM while a client is connected, nor
    /// (about one stop in 150, under load) when the signal comes before it has handled the
    /// client's disconnection: it is signalled once the guest memory is unmapped (the end of
    /// that handling), and after [`QSD_EXIT`] it is killed, with a note on stderr.
    fn finish(mut self) {
        let pid = self.child.id();
        let deadline = Instant::now() + QSD_EXIT;
        while maps_guest_memory(pid) && Instant::now() < deadline {
            // A timed wait (1 ms) that also ends if the process does.
            if exits_within(pid, Duration::from_millis(1)) {
                break;
            }
        }
        self.signal(libc::SIGTERM);
        if self.which.is_qsd() && !exits_within(self.child.id(), QSD_EXIT) {
            eprintln!("qemu-storage-daemon did not exit on SIGTERM: killed");
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
            return;
        }
        let status = self.child.wait().expect("wait for the backend");
        assert!(
            status.success(),
            "{} ended with {status}",
            self.which.name()
        );
    }
}

impl Drop for BlkProcess {
    /// A backend left behind by a failed measurement is killed, not orphaned.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Whether process `pid` still maps a memfd (the driver's guest memory).
fn maps_guest_memory(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| maps.contains("/memfd:"))
}

/// How long qemu-storage-daemon gets to exit after SIGTERM.
const QSD_EXIT: Duration = Duration::from_secs(5);

/// Whether process `pid` (our child) ends within `timeout`: waits on its pidfd, without
/// reaping it.
fn exits_within(pid: u32, timeout: Duration) -> bool {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: pidfd_open takes a pid and flags; the result is checked below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return false;
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new pidfd, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    wait_readable(fd.as_raw_fd(), timeout)
}

/// A block device set up over the socket, with one lean driver queue per request queue.
struct BlkDevice {
    /// Kept open for the length of the run: closing it ends the connection.
    _frontend: Frontend,
    _memory: DriverMemory,
    queues: Vec<LeanQueue>,
}

/// Connects, sets up `cell.queues` queues as QEMU does, and writes every chain slot's header
/// (type, sector), status mark and read-data mark.
fn blk_handshake(path: &Path, cell: BlkCell) -> BlkDevice {
    let chain = cell.op.chain();
    // Rings, then room for the buffers of every slot (at most 256 per queue) of each queue.
    let per_queue = 256 * (u64::from(cell.op.len) + 256) + (1 << 20);
    let mut memory =
        DriverMemory::new((u64::from(cell.queues) * per_queue).next_multiple_of(2 << 20));
    let mut queues: Vec<LeanQueue> = (0..cell.queues)
        .map(|q| LeanQueue::new(&mut memory, q, BLK_QUEUE_SIZE, &chain))
        .collect();
    let deadline = Instant::now() + TIMEOUT;
    let mut fe = loop {
        match Frontend::connect(path) {
            Ok(fe) => break fe,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect: {e}");
                std::thread::yield_now();
            }
        }
    };
    fe.set_reply_timeout(Some(TIMEOUT)).expect("reply timeout");
    fe.set_owner().expect("SET_OWNER");
    let wanted = VirtioFeatures::VERSION_1
        | VirtioFeatures::PROTOCOL_FEATURES
        | VirtioFeatures::RING_EVENT_IDX;
    let features = fe.get_features().expect("GET_FEATURES") & wanted;
    assert!(features.contains(VirtioFeatures::RING_EVENT_IDX));
    let protocol = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(protocol & (ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK))
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_features(features).expect("SET_FEATURES");
    fe.set_mem_table(&[memory.region()], &[memory.fd()])
        .expect("SET_MEM_TABLE");
    for queue in &mut queues {
        let q = u32::from(queue.index());
        queue.set_event_idx(true);
        fe.set_vring_num(q, u32::from(BLK_QUEUE_SIZE))
            .expect("SET_VRING_NUM");
        fe.set_vring_addr(&queue.vring_addr())
            .expect("SET_VRING_ADDR");
        fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
        fe.set_vring_call(q, Some(eventfd_fd(&queue.call)))
            .expect("SET_VRING_CALL");
        fe.set_vring_kick(q, Some(eventfd_fd(&queue.kick)))
            .expect("SET_VRING_KICK");
        fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
        mark(queue, cell.op);
    }
    BlkDevice {
        _frontend: fe,
        _memory: memory,
        queues,
    }
}

/// Writes the header of every chain slot of `queue` (each slot its own sectors, spread over
/// the disk), marks its status byte as not done and, for reads, the start of its data.
fn mark(queue: &LeanQueue, op: Op) {
    let sectors = u64::from(op.len / 512);
    let span = (DISK_MIB << 20) / 512 - sectors;
    for slot in 0..queue.slots() {
        let mut header = [0u8; 16];
        let kind = if op.write { T_OUT } else { T_IN };
        header[..4].copy_from_slice(&kind.to_le_bytes());
        let sector = (slot as u64 * 7919 * sectors + u64::from(queue.index()) * 104_729) % span;
        header[8..].copy_from_slice(&sector.to_le_bytes());
        queue.write_buffer(slot, 0, &header);
        queue.write_buffer(slot, 2, &[NOT_DONE]);
        if !op.write {
            queue.write_buffer(slot, 1, &[0xaa; MARKED]);
        }
    }
}

/// Checks the requests `queue` posted: every slot's status is OK or never written, at least
/// one is OK, and each completed read left zeroes in its data.
fn check(queue: &LeanQueue, op: Op, which: Blk) {
    let mut ok = 0;
    for slot in 0..queue.slots() {
        let mut status = [0u8];
        queue.read_buffer(slot, 2, &mut status);
        match status[0] {
            0 => ok += 1,
            NOT_DONE => continue,
            other => panic!("{}: request status {other}", which.name()),
        }
        if !op.write {
            let mut data = [0xffu8; MARKED];
            queue.read_buffer(slot, 1, &mut data);
            assert!(
                data.iter().all(|&b| b == 0),
                "{}: a read did not return zeroes",
                which.name()
            );
        }
    }
    assert!(ok > 0, "{}: no request completed OK", which.name());
}

/// One measurement of one backend in one cell.
#[derive(Debug, Clone, Copy)]
struct BlkSample {
    rate: f64,
    cpu_per_req: f64,
    irq_per_req: f64,
    /// The driver threads' CPU time over the run's wall time: the share of CPU 0 the driver
    /// used. Near 1 the driver's CPU is the bound, whichever backend serves it.
    driver_busy: f64,
    /// The driver threads' blocking waits (voluntary context switches) per request: each
    /// costs a wake-up of CPU 0 when the device's interrupt comes.
    driver_sleeps: f64,
}

/// CPU time and wall time of one measured run.
struct Spent {
    backend_ns: u64,
    driver_ns: u64,
    wall: Duration,
}

/// Drives every queue of `device` in its own thread (on CPU 0) with the `linux-blk` model: a
/// warm-up of 1000 requests, then `until` at once on all queues. Returns the queues and
/// their outcomes, and the backend's and the driver's CPU time of the measured part (the
/// driver's: this process's, whose other threads wait in the meantime).
fn drive_all(
    device: &mut BlkDevice,
    depth: usize,
    until: Until,
    cpu: &dyn Fn() -> u64,
) -> (Vec<Outcome>, Spent) {
    let start = Arc::new(Barrier::new(device.queues.len() + 1));
    let threads: Vec<_> = std::mem::take(&mut device.queues)
        .into_iter()
        .map(|mut queue| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                pin_self(0);
                let warm = Until::Requests(1000);
                driver_models::drive(&mut queue, Model::Blk, depth, warm, TIMEOUT);
                start.wait();
                let out = driver_models::drive(&mut queue, Model::Blk, depth, until, TIMEOUT);
                (queue, out)
            })
        })
        .collect();
    start.wait();
    let cpu0 = cpu();
    let driver0 = process_cpu_ns(std::process::id());
    let wall0 = Instant::now();
    let mut outcomes = Vec::new();
    for thread in threads {
        let (queue, out) = thread.join().expect("a driver thread panicked");
        device.queues.push(queue);
        outcomes.push(out);
    }
    let spent = Spent {
        backend_ns: cpu() - cpu0,
        driver_ns: process_cpu_ns(std::process::id()) - driver0,
        wall: wall0.elapsed(),
    };
    (outcomes, spent)
}

fn measure_blk(opts: &Options, which: Blk, cell: BlkCell) -> BlkSample {
    let backend = BlkProcess::spawn(opts, which, cell.queues, None);
    let mut device = blk_handshake(&backend.path, cell);
    let (outs, spent) = drive_all(&mut device, cell.depth, Until::Time(opts.run_time), &|| {
        backend.cpu_ns()
    });
    for queue in &device.queues {
        check(queue, cell.op, which);
    }
    drop(device);
    backend.finish();
    let done: u64 = outs.iter().map(|o| o.done).sum();
    let irqs: u64 = outs.iter().map(|o| o.interrupts).sum();
    BlkSample {
        rate: outs.iter().map(Outcome::rate).sum(),
        cpu_per_req: spent.backend_ns as f64 / done as f64,
        irq_per_req: irqs as f64 / done as f64,
        driver_busy: spent.driver_ns as f64 / spent.wall.as_nanos() as f64,
        driver_sleeps: outs.iter().map(|o| o.sleeps).sum::<u64>() as f64 / done as f64,
    }
}

/// Which block cells to run (`--request`, `--queues` and `--depth` narrow the matrix).
#[derive(Debug, Clone, Default)]
pub(crate) struct BlkFilter {
    pub(crate) requests: Vec<Op>,
    pub(crate) queues: Option<u16>,
}

impl Op {
    /// The request kind called `name` (`4k-read`, `4k-write`, `64k-read`, `64k-write`).
    pub(crate) fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.short_name() == name)
    }

    fn short_name(self) -> String {
        format!(
            "{}k-{}",
            self.len / 1024,
            if self.write { "write" } else { "read" }
        )
    }
}

fn blk_cells(opts: &Options) -> Vec<BlkCell> {
    let f = &opts.blk_filter;
    let depths: &[usize] = if opts.smoke { &[1, 32] } else { &[1, 32, 128] };
    let ops: Vec<Op> = if !f.requests.is_empty() {
        f.requests.clone()
    } else if opts.smoke {
        vec![Op::ALL[0], Op::ALL[3]]
    } else {
        Op::ALL.to_vec()
    };
    let mut cells = Vec::new();
    for queues in [1, 2]
        .into_iter()
        .filter(|q| f.queues.is_none_or(|o| o == *q))
    {
        for &op in &ops {
            for &depth in depths
                .iter()
                .filter(|&&d| opts.depth.is_none_or(|o| o == d))
            {
                cells.push(BlkCell { op, depth, queues });
            }
        }
    }
    cells
}

/// The medians of one cell, per backend of [`Blk::ALL`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlkRow {
    cell: BlkCell,
    rate: [f64; 5],
    cpu: [f64; 5],
    irqs: [f64; 5],
    driver: [f64; 5],
    sleeps: [f64; 5],
}

/// Whether `qemu-storage-daemon` can be run.
pub(crate) fn qsd_available() -> bool {
    Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The block tables: the matrix `opts.runs` times, the backends of each cell in a rotating
/// order; then the instruction counts and the chart.
pub(crate) fn blk(opts: &Options) {
    pin_self(0);
    if opts.callgrind_only {
        blk_callgrind(opts);
        return;
    }
    let cells = blk_cells(opts);
    let mut samples: Vec<[Vec<BlkSample>; 5]> = cells.iter().map(|_| Default::default()).collect();
    for run in 0..opts.runs {
        eprintln!("block: run {} of {}", run + 1, opts.runs);
        for (i, &cell) in cells.iter().enumerate() {
            for k in 0..Blk::ALL.len() {
                let b = (run + i + k) % Blk::ALL.len();
                samples[i][b].push(measure_blk(opts, Blk::ALL[b], cell));
            }
        }
    }
    let med = |s: &[BlkSample], f: fn(&BlkSample) -> f64| median(s.iter().map(f).collect());
    let rows: Vec<BlkRow> = cells
        .iter()
        .zip(&samples)
        .map(|(&cell, s)| BlkRow {
            cell,
            rate: [0, 1, 2, 3, 4].map(|b| med(&s[b], |x| x.rate)),
            cpu: [0, 1, 2, 3, 4].map(|b| med(&s[b], |x| x.cpu_per_req)),
            irqs: [0, 1, 2, 3, 4].map(|b| med(&s[b], |x| x.irq_per_req)),
            driver: [0, 1, 2, 3, 4].map(|b| med(&s[b], |x| x.driver_busy)),
            sleeps: [0, 1, 2, 3, 4].map(|b| med(&s[b], |x| x.driver_sleeps)),
        })
        .collect();
    print_blk_table(opts, &rows);
    if let Some(dir) = &opts.svg_dir {
        let file = dir.join("blk-vs-qsd.svg");
        match fs::create_dir_all(dir).and_then(|()| fs::write(&file, blk_chart(&rows))) {
            Ok(()) => println!("\nchart: {}", file.display()),
            Err(e) => eprintln!("datapath: cannot write {}: {e}", file.display()),
        }
    }
    if opts.callgrind {
        blk_callgrind(opts);
    }
}

fn print_blk_table(opts: &Options, rows: &[BlkRow]) {
    println!(
        "\n### vu_blk against qemu-storage-daemon (null disks, virtio-blk requests, linux-blk driver model; medians of {} interleaved runs of {} ms)\n",
        opts.runs,
        opts.run_time.as_millis()
    );
    println!("Requests/s, interrupts per request, backend CPU ns per request. Without polling: both sleep as soon as the queue is empty; with polling: both spin up to {POLL_US} µs first.\n");
    println!("| queues | request | depth | vu_blk | irq/req | CPU ns | qsd | irq/req | CPU ns | vu/qsd rate | vu/qsd CPU | vu_blk poll | irq/req | CPU ns | qsd poll | irq/req | CPU ns | vu/qsd rate | vu/qsd CPU | vu_blk threads | irq/req | CPU ns |");
    println!(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.0} | {} | {:.3} | {:.0} | {:.2} | {:.2} | {} | {:.3} | {:.0} | {} | {:.3} | {:.0} | {:.2} | {:.2} | {} | {:.3} | {:.0} |",
            r.cell.queues,
            r.cell.op.name(),
            r.cell.depth,
            fmt_rate(r.rate[0]),
            r.irqs[0],
            r.cpu[0],
            fmt_rate(r.rate[1]),
            r.irqs[1],
            r.cpu[1],
            r.rate[0] / r.rate[1],
            r.cpu[0] / r.cpu[1],
            fmt_rate(r.rate[2]),
            r.irqs[2],
            r.cpu[2],
            fmt_rate(r.rate[3]),
            r.irqs[3],
            r.cpu[3],
            r.rate[2] / r.rate[3],
            r.cpu[2] / r.cpu[3],
            fmt_rate(r.rate[4]),
            r.irqs[4],
            r.cpu[4],
        );
    }
    println!("\nThe driver behind each backend: the share of CPU 0 its threads used during the run (busy; near 1.00 the driver is the bound, whichever backend serves it) and its blocking waits per request (sleeps/req: each one a wake-up of CPU 0 to pay when the interrupt comes; the machine line above gives its cost).\n");
    print!("| queues | request | depth |");
    for b in Blk::ALL {
        print!(" {} busy | sleeps/req |", b.name());
    }
    println!("\n|---|---|---|{}", "---|---|".repeat(Blk::ALL.len()));
    for r in rows {
        print!(
            "| {} | {} | {} |",
            r.cell.queues,
            r.cell.op.name(),
            r.cell.depth
        );
        for (busy, sleeps) in r.driver.iter().zip(r.sleeps) {
            print!(" {busy:.2} | {sleeps:.3} |");
        }
        println!();
    }
    let at = |r: &BlkRow| {
        format!(
            "{} queue(s), {}, depth {}",
            r.cell.queues,
            r.cell.op.name(),
            r.cell.depth
        )
    };
    for (what, vu, qsd) in [("without polling", 0, 1), ("with polling", 2, 3)] {
        let ratio = |r: &&BlkRow| r.rate[vu] / r.rate[qsd];
        let cpu = |r: &&BlkRow| r.cpu[vu] / r.cpu[qsd];
        if let Some(worst) = rows.iter().min_by(|a, b| ratio(a).total_cmp(&ratio(b))) {
            println!(
                "\n{what}: lowest rate vu_blk/qsd {:.2} ({})",
                ratio(&worst),
                at(worst)
            );
        }
        if let Some(worst) = rows.iter().max_by(|a, b| cpu(a).total_cmp(&cpu(b))) {
            println!(
                "{what}: highest CPU per request vu_blk/qsd {:.2} ({})",
                cpu(&worst),
                at(worst)
            );
        }
    }
}

/// Instructions per request of `which` in `cell` (one queue): the difference between runs of
/// `n` and `5n` requests under callgrind, so that start-up and set-up cancel out.
fn blk_instructions(opts: &Options, which: Blk, cell: BlkCell, n: u64) -> f64 {
    let dir = TempDir::new_with_prefix("/tmp/vu-cg-blk-").expect("temp dir");
    let mut totals = Vec::new();
    for requests in [n, 5 * n] {
        let out = dir.as_path().join(format!("cg-{requests}.out"));
        let backend = BlkProcess::spawn(opts, which, cell.queues, Some(&out));
        let mut device = blk_handshake(&backend.path, cell);
        let queue = &mut device.queues[0];
        let until = Until::Requests(requests);
        driver_models::drive(queue, Model::Blk, cell.depth, until, TIMEOUT);
        check(queue, cell.op, which);
        drop(device);
        backend.finish();
        totals.push(callgrind_total(&out) as f64);
    }
    (totals[1] - totals[0]) / (4 * n) as f64
}

fn blk_callgrind(opts: &Options) {
    let n = if opts.smoke { 200 } else { 2000 };
    println!("\n### Block instructions per request in the backend (callgrind, all threads; 1 queue, linux-blk model)\n");
    println!("| request | depth | vu_blk | qsd | vu/qsd | vu_blk threads |");
    println!("|---|---|---|---|---|---|");
    let depths: &[usize] = if opts.smoke { &[32] } else { &[1, 32, 128] };
    let ops = if opts.blk_filter.requests.is_empty() {
        vec![Op::ALL[0], Op::ALL[1]]
    } else {
        opts.blk_filter.requests.clone()
    };
    for op in ops {
        for &depth in depths
            .iter()
            .filter(|&&d| opts.depth.is_none_or(|o| o == d))
        {
            let cell = BlkCell {
                op,
                depth,
                queues: 1,
            };
            let [vu, qsd, threads] =
                [Blk::VuSync, Blk::Qsd, Blk::VuThreads].map(|b| blk_instructions(opts, b, cell, n));
            println!(
                "| {} | {depth} | {vu:.0} | {qsd:.0} | {:.2} | {threads:.0} |",
                op.name(),
                vu / qsd
            );
        }
    }
}

/// Colours of the backends of [`Blk::ALL`] in the chart.
const BLK_COLOURS: [&str; 5] = ["#1b7837", "#2166ac", "#a6dba0", "#92c5de", "#8c6bb1"];

/// The SVG chart: one column per request kind; rows: requests/s (log), CPU ns per request
/// (log), interrupts per request, against depth; 1 queue solid, 2 queues dashed.
fn blk_chart(rows: &[BlkRow]) -> String {
    const W: f64 = 200.0;
    const H: f64 = 140.0;
    const LEFT: f64 = 55.0;
    const TOP: f64 = 40.0;
    const GAP: f64 = 40.0;
    let depths = [1usize, 32, 128];
    let log_range = |values: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = values
            .filter(|v| *v > 0.0 && v.is_finite())
            .fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let hi = hi.log10().ceil();
        (lo.log10().floor().min(hi - 1.0), hi)
    };
    let rates = log_range(&mut rows.iter().flat_map(|r| r.rate));
    let cpus = log_range(&mut rows.iter().flat_map(|r| r.cpu));
    let x = |col: usize, depth: usize| {
        let at = depths.iter().position(|&d| d == depth).unwrap_or(0) as f64;
        LEFT + col as f64 * (W + LEFT) + at * W / 2.0
    };
    let top = |row: usize| TOP + row as f64 * (H + GAP);
    let y_log = |row: usize, (lo, hi): (f64, f64), v: f64| {
        top(row) + H - (v.max(1e-9).log10() - lo) / (hi - lo) * H
    };
    let y_irq = |v: f64| top(2) + H - v.clamp(0.0, 1.0) * H;
    let width = 4.0 * (W + LEFT) + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        top(3) + 60.0
    );
    s += &format!("<text x=\"{LEFT}\" y=\"18\" font-size=\"13\">vu_blk against qemu-storage-daemon (null disks): requests/s, CPU ns per request (log) and interrupts per request against depth; 1 queue solid, 2 queues dashed</text>\n");
    for (col, op) in Op::ALL.iter().enumerate() {
        for (row, label) in ["requests/s", "CPU ns/request", "interrupts/request"]
            .iter()
            .enumerate()
        {
            let x0 = LEFT + col as f64 * (W + LEFT);
            s += &format!(
                "<rect x=\"{x0}\" y=\"{}\" width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#999\"/>\n<text x=\"{x0}\" y=\"{}\">{}: {label}</text>\n",
                top(row),
                top(row) - 5.0,
                op.name()
            );
            for d in depths {
                s += &format!(
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{d}</text>\n",
                    x(col, d),
                    top(row) + H + 12.0
                );
            }
        }
        for (row, range) in [(0, rates), (1, cpus)] {
            let mut decade = range.0;
            while decade <= range.1 {
                s += &format!(
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">1e{decade}</text>\n",
                    LEFT + col as f64 * (W + LEFT) - 3.0,
                    y_log(row, range, 10f64.powf(decade))
                );
                decade += 1.0;
            }
        }
        for queues in [1u16, 2] {
            let mut pts: Vec<&BlkRow> = rows
                .iter()
                .filter(|r| r.cell.op == *op && r.cell.queues == queues)
                .collect();
            pts.sort_by_key(|r| r.cell.depth);
            let dash = if queues == 1 {
                ""
            } else {
                " stroke-dasharray=\"5,3\""
            };
            for (b, colour) in BLK_COLOURS.iter().enumerate() {
                let line = |y: &dyn Fn(&BlkRow) -> f64| {
                    let p: Vec<String> = pts
                        .iter()
                        .map(|r| format!("{:.1},{:.1}", x(col, r.cell.depth), y(r)))
                        .collect();
                    format!("<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n", p.join(" "))
                };
                s += &line(&|r| y_log(0, rates, r.rate[b]));
                s += &line(&|r| y_log(1, cpus, r.cpu[b]));
                s += &line(&|r| y_irq(r.irqs[b]));
            }
        }
    }
    let mut legend_x = LEFT;
    for (b, which) in Blk::ALL.iter().enumerate() {
        let y = top(3) + 20.0;
        s += &format!(
            "<line x1=\"{legend_x}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            legend_x + 24.0,
            BLK_COLOURS[b],
            legend_x + 30.0,
            y + 4.0,
            which.name()
        );
        legend_x += 160.0;
    }
    s += "</svg>\n";
    s
}
