//! One boot of the restart scenario: the guest keeps requests in flight; the harness waits
//! until the rings show one outstanding, freezes the backend (SIGSTOP) so that the guest
//! piles up more, sends the signal (SIGKILL, or SIGTERM then SIGCONT), starts a new backend
//! on the same socket and times the guest's next completion; then the stop word, the
//! guest's final checks and the host's check of the image.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use super::super::boot::{fresh_u64, kernel_command_line, Backend, Machine};
use super::super::migrate::{read_text, spawn_logged, stop};
use super::super::monitor::Qmp;
use super::image;
use super::rings::{self, Indices, Rings};

/// Guest RAM, in a file the harness reads the rings from.
const MEMORY: &str = "128M";
/// vCPUs and queues: worker `w` runs on vCPU `w % 2`, so both queues carry requests.
const CPUS: u32 = 2;
const QUEUES: u32 = 2;
/// The bound on the guest's boot until its workers run.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// The bound on the guest's final checks after the stop word.
const FINISH_DEADLINE: Duration = Duration::from_secs(60);
/// How long a backend may take to create its first socket.
const SOCKET_DEADLINE: Duration = Duration::from_secs(10);
/// How long the harness looks for an outstanding request before freezing the backend
/// anyway.
const SEARCH_BOUND: Duration = Duration::from_secs(2);
/// How long the backend stays frozen at most while the guest piles up requests.
const FREEZE_BOUND: Duration = Duration::from_secs(2);
/// How long a backend may take to exit after its signal.
const EXIT_BOUND: Duration = Duration::from_secs(10);
/// The bound on the guest's next completion after a new backend started (QEMU retries the
/// connection every second).
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// Between restarts the guest runs this long at least, plus up to the same again at random,
/// so that the signals fall at spread-out moments of its workload.
const SPREAD: Duration = Duration::from_millis(100);

/// The signal that ends a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Signal {
    /// SIGKILL: a crash at whatever instruction the backend was at.
    Kill,
    /// SIGTERM: a graceful stop; the backend must exit by itself, with status 0.
    Term,
}

impl Signal {
    pub(super) fn name(self) -> &'static str {
        match self {
            Signal::Kill => "KILL",
            Signal::Term => "TERM",
        }
    }
}

/// What a run of boots shares.
pub(super) struct Setup<'a> {
    pub(super) machine: &'a Machine,
    pub(super) backend: &'a Backend,
    pub(super) signal: Signal,
    pub(super) restarts: u32,
    pub(super) workers: u32,
    /// Keep the backend frozen until this many requests are outstanding on the rings
    /// together (or [`FREEZE_BOUND`] passes), then signal it.
    pub(super) min_outstanding: u32,
}

/// One backend ended and replaced.
#[derive(Debug, Clone, Default)]
pub(super) struct Restart {
    /// Requests outstanding on both rings when the harness froze the backend.
    pub(super) seen: u32,
    /// Requests outstanding on each ring when the signal was sent.
    pub(super) outstanding: Vec<u16>,
    /// How long the harness looked for an outstanding request before freezing the backend.
    pub(super) search_ms: u64,
    /// How long the backend was frozen before the signal.
    pub(super) freeze_ms: u64,
    /// From the signal to the backend's exit.
    pub(super) exit_ms: u64,
    /// From the new backend's start to the next request the device completed.
    pub(super) recovery_ms: u64,
}

impl Restart {
    pub(super) fn total_outstanding(&self) -> u32 {
        self.outstanding.iter().map(|&n| u32::from(n)).sum()
    }
}

/// How one boot went.
#[derive(Debug, Default)]
pub(super) struct Report {
    pub(super) failure: Option<String>,
    pub(super) restarts: Vec<Restart>,
    /// Rounds the guest's workers completed together.
    pub(super) rounds: u64,
    /// From QEMU's start to its exit.
    pub(super) seconds: f64,
}

/// QEMU and the current backend; both are ended when this is dropped.
struct Running {
    qemu: Child,
    backend: Child,
    backends: u32,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        stop(&mut self.backend);
    }
}

/// What one boot works with.
struct Boot<'a> {
    setup: &'a Setup<'a>,
    dir: &'a Path,
    socket: PathBuf,
    image: PathBuf,
    console: PathBuf,
    nonce: String,
}

/// One boot with `setup.restarts` restarts; the report says how it went. `Err` only when the
/// boot could not be set up.
pub(super) fn run_boot(setup: &Setup<'_>, dir: &Path) -> Result<Report, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let tag = format!("{:08x}", fresh_u64() as u32);
    let sockets = std::env::temp_dir().join(format!("vu-rs-{tag}"));
    std::fs::create_dir(&sockets)
        .map_err(|err| format!("cannot create {}: {err}", sockets.display()))?;
    // Guest RAM in tmpfs: QEMU creates the file, the harness reads the rings from it.
    let memory = PathBuf::from("/dev/shm").join(format!("vu-rs-{tag}.ram"));
    let nonce = format!("{:016x}", fresh_u64());
    let boot = Boot {
        setup,
        dir,
        socket: sockets.join("blk.sock"),
        image: dir.join("disk.img"),
        console: dir.join("console.log"),
        nonce,
    };
    let mut report = Report::default();
    let start = Instant::now();
    let result = image::prepare(&boot.image, &boot.nonce)
        .and_then(|()| boot.run(&sockets, &memory, &mut report));
    report.seconds = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&memory);
    let _ = std::fs::remove_dir_all(&sockets);
    match result {
        Ok(rounds) => report.rounds = rounds,
        Err(failure) => {
            let guest = guest_failure(&boot.console);
            report.failure = Some(guest.unwrap_or(failure));
        }
    }
    Ok(report)
}

/// The guest's `VU-E2E-FAIL` line, if it printed one.
fn guest_failure(console: &Path) -> Option<String> {
    read_text(console)
        .lines()
        .find(|line| line.contains("VU-E2E-FAIL"))
        .map(|line| format!("guest: {}", line.trim()))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Boot<'_> {
    /// The boot proper; returns the guest's rounds once the image checked out.
    fn run(&self, sockets: &Path, memory: &Path, report: &mut Report) -> Result<u64, String> {
        let backend = self.start_backend(0)?;
        let start = Instant::now();
        let mut backend = backend;
        while !self.socket.exists() {
            if let Ok(Some(status)) = backend.try_wait() {
                return Err(format!("backend exited before listening: {status}"));
            }
            if start.elapsed() > SOCKET_DEADLINE {
                stop(&mut backend);
                return Err("the backend did not create its socket".to_owned());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let qmp_path = sockets.join("qmp.sock");
        let qemu = match spawn_logged(
            self.qemu_command(memory, &qmp_path),
            &self.dir.join("qemu.log"),
        ) {
            Ok(qemu) => qemu,
            Err(err) => {
                stop(&mut backend);
                return Err(err);
            }
        };
        let mut running = Running {
            qemu,
            backend,
            backends: 1,
        };
        let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(10))?;
        self.wait_for_line(
            &mut running,
            &format!("VU-RS-READY {} ", self.nonce),
            READY_DEADLINE,
        )?;
        let memory_file = File::open(memory)
            .map_err(|err| format!("cannot open the guest's RAM {}: {err}", memory.display()))?;
        let rings = Rings::locate(&mut qmp, memory_file)?;
        for index in 1..=self.setup.restarts {
            let restart = self
                .restart(&mut running, &rings)
                .map_err(|err| format!("restart {index}: {err}"))?;
            report.restarts.push(restart);
        }
        self.finish(running)
    }

    /// The backend's command line; `index` numbers the backends of the boot.
    fn start_backend(&self, index: u32) -> Result<Child, String> {
        let socket = self.socket.display();
        let mut command = match self.setup.backend {
            Backend::Vu(program) => {
                let mut command = Command::new(program);
                command.args([
                    "--socket-path".to_owned(),
                    socket.to_string(),
                    "--blk-file".to_owned(),
                    self.image.display().to_string(),
                    "--num-queues".to_owned(),
                    QUEUES.to_string(),
                ]);
                command
            }
            Backend::Qsd => {
                let mut command = Command::new("qemu-storage-daemon");
                command.args([
                    "--blockdev".to_owned(),
                    format!(
                        "driver=file,node-name=file0,filename={},locking=off",
                        self.image.display()
                    ),
                    "--export".to_owned(),
                    format!(
                        "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,\
                         addr.path={socket},writable=on,num-queues={QUEUES}"
                    ),
                ]);
                command
            }
            Backend::Builtin => return Err("restarts need a vhost-user backend".to_owned()),
        };
        command.env("RUST_LOG", "info");
        spawn_logged(command, &self.dir.join(format!("backend-{index}.log")))
    }

    fn qemu_command(&self, memory: &Path, qmp: &Path) -> Command {
        let extra = format!("e2e.workers={}", self.setup.workers);
        let mut command = Command::new(&self.setup.machine.qemu);
        command.args([
            "-nodefaults".to_owned(),
            "-no-user-config".to_owned(),
            "-machine".to_owned(),
            "q35,accel=tcg".to_owned(),
            "-cpu".to_owned(),
            "max".to_owned(),
            "-smp".to_owned(),
            CPUS.to_string(),
            "-m".to_owned(),
            MEMORY.to_owned(),
            "-object".to_owned(),
            format!(
                "memory-backend-file,id=mem,size={MEMORY},mem-path={},share=on",
                memory.display()
            ),
            "-numa".to_owned(),
            "node,memdev=mem".to_owned(),
            "-chardev".to_owned(),
            format!("socket,id=char0,path={},reconnect=1", self.socket.display()),
            "-device".to_owned(),
            format!("vhost-user-blk-pci,chardev=char0,num-queues={QUEUES}"),
            "-kernel".to_owned(),
            self.setup.machine.kernel.display().to_string(),
            "-initrd".to_owned(),
            self.setup.machine.initrd.display().to_string(),
            "-append".to_owned(),
            kernel_command_line("restart", &self.nonce, &extra),
            "-display".to_owned(),
            "none".to_owned(),
            "-serial".to_owned(),
            format!("file:{}", self.console.display()),
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-no-reboot".to_owned(),
        ]);
        command
    }

    /// Fails when the guest reported a failure or QEMU exited.
    fn check_alive(&self, running: &mut Running) -> Result<(), String> {
        if let Some(failure) = guest_failure(&self.console) {
            return Err(failure);
        }
        if let Ok(Some(status)) = running.qemu.try_wait() {
            return Err(format!("QEMU exited ({status})"));
        }
        Ok(())
    }

    /// Waits until the console holds a line containing `text`.
    fn wait_for_line(
        &self,
        running: &mut Running,
        text: &str,
        deadline: Duration,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if read_text(&self.console).contains(text) {
                return Ok(());
            }
            self.check_alive(running)
                .map_err(|err| format!("{err} before the guest printed `{text}`"))?;
            if start.elapsed() > deadline {
                return Err(format!(
                    "the guest did not print `{text}` within {} s",
                    deadline.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lets the guest run, freezes the backend once a request is outstanding, lets the guest
    /// pile up more, signals it, starts the next backend and waits for the guest's next
    /// completion.
    fn restart(&self, running: &mut Running, rings: &Rings) -> Result<Restart, String> {
        let spread = SPREAD + SPREAD.mul_f64((fresh_u64() % 1000) as f64 / 1000.0);
        let start = Instant::now();
        while start.elapsed() < spread {
            self.check_alive(running)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        let search = Instant::now();
        let seen = poll_until(rings, SEARCH_BOUND, |now| {
            rings::total_outstanding(now) >= 1
        })?;
        let search_ms = millis(search.elapsed());
        // Frozen, the backend completes nothing (it may be half way through a request); the
        // guest's workers keep submitting until each waits for its own requests.
        send_signal(&running.backend, "STOP")?;
        let frozen = Instant::now();
        let at_signal = poll_until(rings, FREEZE_BOUND, |now| {
            rings::total_outstanding(now) >= self.setup.min_outstanding
        })?;
        let freeze_ms = millis(frozen.elapsed());
        let signalled = Instant::now();
        send_signal(&running.backend, self.setup.signal.name())?;
        if self.setup.signal == Signal::Term {
            send_signal(&running.backend, "CONT")?;
        }
        let status = wait_exit(&mut running.backend, EXIT_BOUND).ok_or_else(|| {
            format!(
                "the backend did not exit within {} s of SIG{} (rings at the signal: {})",
                EXIT_BOUND.as_secs(),
                self.setup.signal.name(),
                rings::describe(&at_signal)
            )
        })?;
        let exit_ms = millis(signalled.elapsed());
        if self.setup.signal == Signal::Term && !status.success() {
            return Err(format!(
                "the backend exited with {status} after SIGTERM (see backend-{}.log)",
                running.backends - 1
            ));
        }
        let before = rings.read()?;
        running.backend = self.start_backend(running.backends)?;
        running.backends += 1;
        let recovery_ms = self.wait_for_completion(running, rings, &before)?;
        Ok(Restart {
            seen: rings::total_outstanding(&seen),
            outstanding: at_signal.iter().map(|ring| ring.outstanding()).collect(),
            search_ms,
            freeze_ms,
            exit_ms,
            recovery_ms,
        })
    }

    /// Waits until a ring's used index moves past `before`; returns the milliseconds it took.
    fn wait_for_completion(
        &self,
        running: &mut Running,
        rings: &Rings,
        before: &[Indices],
    ) -> Result<u64, String> {
        let started = Instant::now();
        loop {
            let now = rings.read()?;
            if rings::completed_since(before, &now) {
                return Ok(millis(started.elapsed()));
            }
            if started.elapsed() > RECOVERY_BOUND {
                return Err(format!(
                    "no request completed within {} s of starting backend {} (rings before its \
                     start: {}; now: {})",
                    RECOVERY_BOUND.as_secs(),
                    running.backends - 1,
                    rings::describe(before),
                    rings::describe(&now)
                ));
            }
            if let Ok(Some(status)) = running.backend.try_wait() {
                return Err(format!(
                    "backend {} exited ({status}) before serving a request",
                    running.backends - 1
                ));
            }
            self.check_alive(running)?;
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The stop word, the guest's verdict and power-off, the last backend's graceful stop,
    /// and the host's check of the image; returns the guest's rounds.
    fn finish(&self, mut running: Running) -> Result<u64, String> {
        image::write_stop_word(&self.image, &self.nonce)?;
        let pass = format!("VU-E2E-PASS restart {} ", self.nonce);
        self.wait_for_line(&mut running, &pass, FINISH_DEADLINE)?;
        if wait_exit(&mut running.qemu, Duration::from_secs(20)).is_none() {
            return Err("QEMU did not exit after the guest's power-off".to_owned());
        }
        send_signal(&running.backend, "TERM")?;
        match wait_exit(&mut running.backend, EXIT_BOUND) {
            Some(status) if status.success() => {}
            Some(status) => return Err(format!("the last backend exited with {status}")),
            None => return Err("the last backend did not exit after SIGTERM".to_owned()),
        }
        let console = read_text(&self.console);
        let queues = format!("queues={QUEUES} ");
        if !console
            .lines()
            .any(|l| l.contains(&pass) && l.contains(&queues))
        {
            return Err(format!("the guest's success line does not say `{queues}`"));
        }
        image::check(&self.image, &self.nonce, self.setup.workers)
    }
}

/// Reads the rings until `done` holds for them or `bound` passes; returns the last reading.
fn poll_until(
    rings: &Rings,
    bound: Duration,
    done: impl Fn(&[Indices]) -> bool,
) -> Result<Vec<Indices>, String> {
    let start = Instant::now();
    loop {
        let now = rings.read()?;
        if done(&now) || start.elapsed() > bound {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Sends signal `name` (`KILL`, `TERM`, `STOP`, `CONT`) to `child` by PID.
fn send_signal(child: &Child, name: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .map_err(|err| format!("cannot run kill: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{name} {} failed", child.id()))
    }
}

/// Waits at most `bound` for `child` to exit.
fn wait_exit(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > bound {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
