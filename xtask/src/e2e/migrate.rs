//! `cargo xtask e2e --migrate`: live migration of a running guest between QEMU processes on
//! this host, each with its own vhost-user-blk backend on the same image file.
//!
//! One boot: the source QEMU boots the guest (tests/e2e/migrate.sh keeps the disk and its
//! page cache busy and checks every byte it reads); after the guest's first round, the host
//! starts a destination backend and a destination QEMU with `-incoming`, migrates from the
//! monitor (QMP `migrate`, precopy), waits for `completed`, quits the source, writes
//! `VU-MIG-MOVED <nonce> <k>` into the image's control block, waits for the guest to say it
//! hashed every region of its page cache on the destination, and migrates again, back and
//! forth ([`MIGRATIONS`] times: A to B, B to A, A to B). After the last one it writes the stop
//! word instead; the guest checks everything once more, writes its final marker and powers
//! off. A boot passes when the guest's success line with this boot's nonce is on the last
//! console, no console holds a failure line, and the image holds what the guest wrote.
//!
//! Guest RAM is preallocated on both sides (`prealloc=on`): under TCG, migrating a guest
//! whose RAM is not preallocated corrupts it now and then even with QEMU's own virtio-blk and
//! no vhost-user at all.
//!
//! `--skip-logging N` runs `vu_blk --test-skip-logging N` (the data of every Nth read during
//! a migration is not logged): the test of the test. `ci_step` requires every boot of that
//! run to fail with a data mismatch found by the guest.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod figures;
mod image;

use figures::{backend_faults, summary_count, Migration, Report, Summary, BACKEND_FAULT_EVENT};

use super::boot::{fresh_u64, Backend, Device, Machine};
use super::json::Json;
use super::monitor::Qmp;
use super::{build_vu_backend, prepare, Run};

/// Migrations per boot: there, back, and there again.
pub(crate) const MIGRATIONS: u32 = 3;
/// Guest RAM, preallocated on both sides.
const MEMORY: &str = "128M";
/// The bound on the guest's boot until it is ready to be migrated.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// The bound on one migration, from `migrate` to `completed`.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(60);
/// The bound on the guest's progress after a migration, and on its final checks.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(60);
/// How long a process may take to create its socket.
const SOCKET_DEADLINE: Duration = Duration::from_secs(10);
/// Migration bandwidth, bytes/s. QEMU's default (128 MiB/s) moves this guest's RAM in about
/// 150 ms, during which the guest makes few requests; at 64 MiB/s a migration lasts about
/// 1.5 s and the guest reads its 4 MiB half a few times during it, and precopy still
/// converges in a few passes (TCG dirties far less).
const MAX_BANDWIDTH: u64 = 64 << 20;

/// Boots of `vu_blk` in `cargo xtask ci`.
const CI_BOOTS: u32 = 10;
/// Boots of qemu-storage-daemon (the reference) in `ci`.
const CI_REFERENCE_BOOTS: u32 = 2;
/// Boots of the deliberately broken `vu_blk` in the gate, every one of which must be caught
/// by a data mismatch the guest finds.
const CI_BROKEN_BOOTS: u32 = 3;
/// Boots of `vu_blk` with postcopy in `ci` (about 20-35 s each).
const CI_POSTCOPY_BOOTS: u32 = 2;
/// Boots of `vu_blk` on packed virtqueues in `ci` (about 20-25 s each).
const CI_PACKED_BOOTS: u32 = 2;
/// `--test-skip-logging` of the broken run in `ci`: every other read is not logged.
const CI_SKIP_LOGGING: u64 = 2;

/// The command line of `cargo xtask e2e --migrate`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    qsd: bool,
    boots: u32,
    variant: Variant,
}

/// How the backend and the migrations differ from the plain run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Variant {
    /// `vu_blk --test-skip-logging N`.
    skip_logging: Option<u64>,
    /// Postcopy: `postcopy-ram` on both sides and `migrate-start-postcopy` (vu_blk built with
    /// the `postcopy` feature).
    postcopy: bool,
    /// Packed virtqueues: `vu_blk --packed`, `packed=on` on the device, and the guest
    /// checks that it negotiated them.
    packed: bool,
}

const USAGE: &str = "\
usage: cargo xtask e2e --migrate [--backend vu|qsd] [--boots N] [--skip-logging N]
                               [--postcopy] [--packed]
       cargo xtask e2e --migrate --gate

  Boots a guest whose /dev/vda is a vhost-user-blk device and migrates it, running, between
  two QEMU processes on this host (each with its own backend on the same image), 3 times
  per boot; the guest checks every byte it reads. See docs/migration.md.
  --backend       vu: vu_blk (default); qsd: qemu-storage-daemon, the reference
  --boots         boots (default 10)
  --skip-logging  run vu_blk --test-skip-logging N (broken on purpose: must fail)
  --postcopy      postcopy: postcopy-ram on both sides, migrate-start-postcopy at once
                  (vu_blk built with the `postcopy` feature)
  --packed        packed virtqueues (vu_blk --packed, packed=on)
  --gate          the runs of `cargo xtask ci`: vu 10 boots, qsd 2, vu postcopy 2,
                  vu packed 2, broken vu_blk 3 (each must be caught)
";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        qsd: false,
        boots: 10,
        variant: Variant::default(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .map(String::as_str)
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--migrate" => {}
            "--backend" => {
                options.qsd = match value("--backend")? {
                    "vu" => false,
                    "qsd" => true,
                    other => return Err(format!("--migrate runs vu or qsd, not `{other}`")),
                }
            }
            "--boots" => {
                let text = value("--boots")?;
                options.boots = text
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--boots wants a positive number, not `{text}`"))?;
            }
            "--skip-logging" => {
                let text = value("--skip-logging")?;
                options.variant.skip_logging = Some(
                    text.parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("--skip-logging wants N > 0, not `{text}`"))?,
                );
            }
            "--postcopy" => options.variant.postcopy = true,
            "--packed" => options.variant.packed = true,
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    if options.qsd && options.variant != Variant::default() {
        return Err("--skip-logging, --postcopy and --packed run vu_blk only".to_owned());
    }
    Ok(options)
}

/// One side of the migration: a backend and a QEMU.
struct Side {
    backend: Child,
    qemu: Child,
    qmp: Qmp,
    console: PathBuf,
    backend_log: PathBuf,
}

/// What every side of a boot shares.
struct Boot<'a> {
    machine: &'a Machine,
    backend: &'a Backend,
    variant: Variant,
    dir: &'a Path,
    sockets: &'a Path,
    image: PathBuf,
    append: String,
}

pub(super) fn spawn_logged(mut command: Command, log: &Path) -> Result<Child, String> {
    let file =
        File::create(log).map_err(|err| format!("cannot create {}: {err}", log.display()))?;
    let copy = file
        .try_clone()
        .map_err(|err| format!("cannot dup {}: {err}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(copy));
    command
        .spawn()
        .map_err(|err| format!("cannot start {:?}: {err}", command.get_program()))
}

/// SIGTERM by PID, then SIGKILL after 5 s.
pub(super) fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub(super) fn read_text(path: &Path) -> String {
    let mut raw = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_end(&mut raw);
    }
    String::from_utf8_lossy(&raw).into_owned()
}

impl Boot<'_> {
    /// The backend's command line on `socket`.
    fn backend_command(&self, socket: &Path) -> Result<Command, String> {
        match self.backend {
            Backend::Vu(program) => {
                let mut command = Command::new(program);
                command.args([
                    "--socket-path".to_owned(),
                    socket.display().to_string(),
                    "--blk-file".to_owned(),
                    self.image.display().to_string(),
                ]);
                if let Some(n) = self.variant.skip_logging {
                    command.args(["--test-skip-logging".to_owned(), n.to_string()]);
                }
                if self.variant.packed {
                    command.arg("--packed");
                }
                Ok(command)
            }
            Backend::Qsd => {
                let mut command = Command::new("qemu-storage-daemon");
                // Two daemons hold the image at once during a migration: no image locking.
                command.args([
                    "--blockdev".to_owned(),
                    format!(
                        "driver=file,node-name=file0,filename={},locking=off",
                        self.image.display()
                    ),
                    "--export".to_owned(),
                    format!(
                        "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,\
                         addr.path={},writable=on",
                        socket.display()
                    ),
                ]);
                Ok(command)
            }
            Backend::Builtin => Err("--migrate needs a vhost-user backend".to_owned()),
        }
    }

    /// QEMU's command line: the same on both sides, plus `-incoming` on the destination.
    fn qemu_command(
        &self,
        socket: &Path,
        console: &Path,
        qmp: &Path,
        incoming: Option<&Path>,
    ) -> Command {
        let mut command = Command::new(&self.machine.qemu);
        command.args([
            "-nodefaults".to_owned(),
            "-no-user-config".to_owned(),
            "-machine".to_owned(),
            "q35,accel=tcg".to_owned(),
            "-cpu".to_owned(),
            "max".to_owned(),
            "-smp".to_owned(),
            "1".to_owned(),
            "-m".to_owned(),
            MEMORY.to_owned(),
            "-object".to_owned(),
            format!("memory-backend-memfd,id=mem,size={MEMORY},share=on,prealloc=on"),
            "-numa".to_owned(),
            "node,memdev=mem".to_owned(),
            "-chardev".to_owned(),
            format!("socket,id=char0,path={}", socket.display()),
            "-device".to_owned(),
            format!(
                "vhost-user-blk-pci,chardev=char0,num-queues=1{}",
                if self.variant.packed {
                    ",packed=on"
                } else {
                    ""
                }
            ),
            "-kernel".to_owned(),
            self.machine.kernel.display().to_string(),
            "-initrd".to_owned(),
            self.machine.initrd.display().to_string(),
            "-append".to_owned(),
            self.append.clone(),
            "-display".to_owned(),
            "none".to_owned(),
            "-serial".to_owned(),
            format!("file:{}", console.display()),
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-no-reboot".to_owned(),
        ]);
        if let Some(path) = incoming {
            command.args(["-incoming".to_owned(), format!("unix:{}", path.display())]);
        }
        if self.variant.postcopy {
            // Logged to QEMU's stderr (its log file): each fault of the backend's that the
            // destination resolves.
            command.args(["-trace".to_owned(), format!("enable={BACKEND_FAULT_EVENT}")]);
        }
        command
    }

    /// Starts side `index`'s backend and QEMU (`incoming`: as the migration destination).
    fn start(&self, index: u32, incoming: Option<&Path>) -> Result<Side, String> {
        let socket = self.sockets.join(format!("vu{index}.sock"));
        let backend_log = self.dir.join(format!("backend-{index}.log"));
        let mut backend = spawn_logged(self.backend_command(&socket)?, &backend_log)?;
        let start = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = backend.try_wait() {
                return Err(format!("backend {index} exited before listening: {status}"));
            }
            if start.elapsed() > SOCKET_DEADLINE {
                stop(&mut backend);
                return Err(format!("backend {index} did not create its socket"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let console = self.dir.join(format!("console-{index}.log"));
        let qmp_path = self.sockets.join(format!("qmp{index}.sock"));
        let command = self.qemu_command(&socket, &console, &qmp_path, incoming);
        let qemu_log = self.dir.join(format!("qemu-{index}.log"));
        let mut qemu = match spawn_logged(command, &qemu_log) {
            Ok(qemu) => qemu,
            Err(err) => {
                stop(&mut backend);
                return Err(err);
            }
        };
        match connect_monitor(&qmp_path, &mut qemu) {
            Ok(qmp) => Ok(Side {
                backend,
                qemu,
                qmp,
                console,
                backend_log,
            }),
            Err(err) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                stop(&mut backend);
                Err(err)
            }
        }
    }
}

/// Connects to QEMU's monitor once its socket exists; fails at once if QEMU exits first.
fn connect_monitor(path: &Path, qemu: &mut Child) -> Result<Qmp, String> {
    let start = Instant::now();
    while !path.exists() {
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(format!("QEMU exited before its monitor was up: {status}"));
        }
        if start.elapsed() > SOCKET_DEADLINE {
            return Err(format!("no QMP socket at {} in time", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Qmp::connect(path, SOCKET_DEADLINE)
}

impl Side {
    /// Quits QEMU (bounded), then stops the backend; returns the backend's log.
    fn finish(mut self) -> String {
        let _ = self.qmp.execute("quit", None);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.qemu.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        stop(&mut self.backend);
        read_text(&self.backend_log)
    }

    /// Kills QEMU without asking, then stops the backend; returns the backend's log.
    fn kill(mut self) -> String {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        stop(&mut self.backend);
        read_text(&self.backend_log)
    }
}

/// The first `VU-E2E-FAIL` line of `consoles`, if any.
fn guest_failure(consoles: &[PathBuf]) -> Option<String> {
    consoles.iter().find_map(|path| {
        read_text(path)
            .lines()
            .find(|line| line.contains("VU-E2E-FAIL"))
            .map(|line| format!("guest: {}", line.trim()))
    })
}

/// Waits until `console` holds a line containing `text`; fails early when the guest
/// reported a failure or QEMU exited.
fn wait_for_line(
    side: &mut Side,
    consoles: &[PathBuf],
    text: &str,
    deadline: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if read_text(&side.console).contains(text) {
            return Ok(());
        }
        if let Some(failure) = guest_failure(consoles) {
            return Err(failure);
        }
        if let Ok(Some(status)) = side.qemu.try_wait() {
            return Err(format!(
                "QEMU exited ({status}) before the guest printed `{text}`"
            ));
        }
        if start.elapsed() > deadline {
            return Err(format!(
                "the guest did not print `{text}` within {} s",
                deadline.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest's round lines on `side`'s console so far.
fn rounds_on(side: &Side, nonce: &str) -> u64 {
    let round = format!("VU-MIG-ROUND {nonce} ");
    read_text(&side.console).matches(&round).count() as u64
}

/// Migrates `source` to `dest` and returns QEMU's figures.
fn migrate(
    source: &mut Side,
    dest: &mut Side,
    uri: &Path,
    postcopy: bool,
    nonce: &str,
) -> Result<Migration, String> {
    source.qmp.execute(
        "migrate-set-parameters",
        Some(&format!(r#"{{"max-bandwidth": {MAX_BANDWIDTH}}}"#)),
    )?;
    if postcopy {
        // The pages left at the switch are sent at the same rate (QEMU's default is no
        // limit), so that the guest and the backend run on the destination with pages missing
        // for a second or two.
        source.qmp.execute(
            "migrate-set-parameters",
            Some(&format!(r#"{{"max-postcopy-bandwidth": {MAX_BANDWIDTH}}}"#)),
        )?;
        let caps = r#"{"capabilities": [{"capability": "postcopy-ram", "state": true}]}"#;
        dest.qmp.execute("migrate-set-capabilities", Some(caps))?;
        source.qmp.execute("migrate-set-capabilities", Some(caps))?;
    }
    let uri = super::json::quote(&format!("unix:{}", uri.display()));
    let rounds_before = rounds_on(source, nonce);
    source
        .qmp
        .execute("migrate", Some(&format!(r#"{{"uri": {uri}}}"#)))?;
    if postcopy {
        source.qmp.execute("migrate-start-postcopy", None)?;
    }
    let start = Instant::now();
    let (info, rounds_during) = loop {
        let info = source.qmp.execute("query-migrate", None)?;
        match info.get("status").and_then(Json::as_str) {
            Some("completed") => {
                break (info, rounds_on(source, nonce).saturating_sub(rounds_before));
            }
            Some(status @ ("failed" | "cancelled")) => {
                return Err(format!("migration {status}: {info:?}"));
            }
            _ => {}
        }
        if start.elapsed() > MIGRATION_DEADLINE {
            return Err(format!(
                "migration not completed within {} s: {info:?}",
                MIGRATION_DEADLINE.as_secs(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The destination runs the guest once it has loaded the state.
    loop {
        let status = dest.qmp.execute("query-status", None)?;
        if status.get("status").and_then(Json::as_str) == Some("running") {
            break;
        }
        if start.elapsed() > MIGRATION_DEADLINE {
            return Err(format!("destination not running: {status:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Migration {
        rounds_during,
        ..Migration::from_query_migrate(&info)
    })
}

/// One boot with [`MIGRATIONS`] migrations; the report says how it went.
fn run_boot(
    machine: &Machine,
    backend: &Backend,
    variant: Variant,
    dir: &Path,
) -> Result<Report, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let sockets = std::env::temp_dir().join(format!("vu-mig-{:08x}", fresh_u64() as u32));
    std::fs::create_dir(&sockets)
        .map_err(|err| format!("cannot create {}: {err}", sockets.display()))?;
    let result = run_boot_in(machine, backend, variant, dir, &sockets);
    let _ = std::fs::remove_dir_all(&sockets);
    result
}

fn run_boot_in(
    machine: &Machine,
    backend: &Backend,
    variant: Variant,
    dir: &Path,
    sockets: &Path,
) -> Result<Report, String> {
    let nonce = format!("{:016x}", fresh_u64());
    let image = dir.join("disk.img");
    image::prepare(&image, &nonce)?;
    let boot = Boot {
        machine,
        backend,
        variant,
        dir,
        sockets,
        image: image.clone(),
        // init_on_alloc=0: Debian's kernel zeroes every page it allocates, page-cache pages
        // included, so each page the device is about to fill was just written by the guest's
        // CPU, which QEMU tracks itself: QEMU would resend the page after the device's write
        // whether or not the backend logged it, and the test could not see a missing log bit.
        append: format!(
            "console=ttyS0 panic=-1 quiet init_on_alloc=0 e2e.test=migrate e2e.nonce={nonce}{}",
            if variant.packed { " e2e.packed=1" } else { "" }
        ),
    };
    let mut report = Report::default();
    let start = Instant::now();
    let mut consoles = Vec::new();
    let mut side = boot.start(0, None)?;
    consoles.push(side.console.clone());
    // The first migration waits for the guest's first round: in 2 of 10 boots whose first
    // migration started right after the guest's ready line (8 requests served, no read data
    // written while logging), the destination's kernel found its page lists corrupted
    // (`list_del corruption`, CPU-written memory the device never touches); see
    // docs/migration.md.
    if let Err(failure) = wait_for_line(
        &mut side,
        &consoles,
        &format!("VU-MIG-ROUND {nonce} "),
        READY_DEADLINE,
    ) {
        side.kill();
        report.failure = Some(failure);
        return Ok(report);
    }
    let mut backend_logs = String::new();
    let result = migrate_and_stop(
        &boot,
        &nonce,
        side,
        &mut consoles,
        &mut backend_logs,
        &mut report,
    );
    report.seconds = start.elapsed().as_secs_f64();
    report.logged_pages = summary_count(&backend_logs, "pages of read data");
    report.unlogged_reads = summary_count(&backend_logs, "reads not logged");
    report.backend_faults = backend_faults(dir);
    let console = match result {
        Ok(console) => console,
        Err(failure) => {
            report.failure = Some(failure);
            return Ok(report);
        }
    };
    let pass = format!("VU-E2E-PASS migrate {nonce} rounds=");
    report.rounds = console
        .lines()
        .find_map(|line| line.split_once(&pass))
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or(0);
    report.failure = guest_failure(&consoles)
        .map_or_else(|| image::check(&image, &nonce, report.rounds), Err)
        .err();
    Ok(report)
}

/// The migrations from `side` on, then the stop word and the guest's final checks; returns
/// the last console's text, or why the boot failed. Every process is gone when it returns;
/// their backends' logs are appended to `backend_logs`.
fn migrate_and_stop(
    boot: &Boot<'_>,
    nonce: &str,
    mut side: Side,
    consoles: &mut Vec<PathBuf>,
    backend_logs: &mut String,
    report: &mut Report,
) -> Result<String, String> {
    let sockets = boot.sockets;
    for index in 1..=MIGRATIONS {
        let uri = sockets.join(format!("mig{index}.sock"));
        let mut dest = match boot.start(index, Some(&uri)) {
            Ok(dest) => dest,
            Err(err) => {
                backend_logs.push_str(&side.kill());
                return Err(err);
            }
        };
        consoles.push(dest.console.clone());
        match migrate(&mut side, &mut dest, &uri, boot.variant.postcopy, nonce) {
            Ok(migration) => report.migrations.push(migration),
            Err(failure) => {
                backend_logs.push_str(&side.kill());
                backend_logs.push_str(&dest.kill());
                return Err(guest_failure(consoles).unwrap_or(failure));
            }
        }
        backend_logs.push_str(&side.finish());
        side = dest;
        if index == MIGRATIONS {
            // The stop word: the guest's final checks cover the last migration.
            break;
        }
        // The guest checks every region of its page cache after its round and says so on
        // the destination's console (each QEMU has its own console file).
        let checked = format!("VU-MIG-CHECKED {nonce} {index} ");
        let waited = image::write_moved_word(&boot.image, nonce, index)
            .and_then(|()| wait_for_line(&mut side, consoles, &checked, PROGRESS_DEADLINE));
        if let Err(failure) = waited {
            backend_logs.push_str(&side.kill());
            return Err(failure);
        }
    }
    if let Err(err) = image::write_stop_word(&boot.image, nonce) {
        backend_logs.push_str(&side.kill());
        return Err(err);
    }
    let pass = format!("VU-E2E-PASS migrate {nonce} rounds=");
    let waited = wait_for_line(&mut side, consoles, &pass, PROGRESS_DEADLINE);
    // The guest powers off after its verdict.
    let exit_start = Instant::now();
    while exit_start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(_)) = side.qemu.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = read_text(&side.console);
    backend_logs.push_str(&side.finish());
    waited.map(|()| console)
}

/// Runs `options.boots` boots, printing one line each.
fn run(options: &Options) -> Result<Summary, String> {
    let backend_name = if options.qsd { "qsd" } else { "vu" };
    let machine = prepare(
        &[Run {
            device: Device::Blk,
            backend: backend_name,
            queues: 1,
            cpus: 1,
            packed: options.variant.packed,
            iommu: false,
        }],
        false,
    )?;
    let backend = if options.qsd {
        Backend::Qsd
    } else {
        let program = build_vu_backend(Device::Blk, false)?;
        if options.variant.postcopy {
            // The same executable, rebuilt with the feature (the next plain run rebuilds it
            // without).
            crate::cmd::Cmd::cargo(&[
                "build",
                "-p",
                "vu-backend",
                "--example",
                "vu_blk",
                "--features",
                "postcopy",
            ])
            .run()?;
        }
        Backend::Vu(program)
    };
    let mut name = format!("migrate-{backend_name}");
    if let Some(n) = options.variant.skip_logging {
        name.push_str(&format!("-skip{n}"));
    }
    if options.variant.postcopy {
        name.push_str("-postcopy");
    }
    if options.variant.packed {
        name.push_str("-packed");
    }
    let mut summary = Summary::default();
    for index in 0..options.boots {
        let dir = PathBuf::from("target/e2e/runs")
            .join(&name)
            .join(format!("boot-{index:02}"));
        let report = run_boot(&machine, &backend, options.variant, &dir)?;
        summary.boots += 1;
        summary.seconds.push(report.seconds);
        summary.logged_pages += report.logged_pages;
        summary.unlogged_reads += report.unlogged_reads;
        summary.backend_faults += report.backend_faults;
        let downtimes: Vec<String> = report
            .migrations
            .iter()
            .map(|m| m.downtime_ms.to_string())
            .collect();
        match &report.failure {
            None => {
                summary.passes += 1;
                let faults = if options.variant.postcopy {
                    format!(", {} backend faults resolved", report.backend_faults)
                } else {
                    String::new()
                };
                eprintln!(
                    "    boot {index}: pass in {:.1} s: {} migrations (downtime ms {}), {} \
                     guest rounds{faults}",
                    report.seconds,
                    report.migrations.len(),
                    downtimes.join(" "),
                    report.rounds
                );
            }
            Some(reason) => {
                if reason.contains("VU-E2E-FAIL migrate data:") {
                    summary.data_failures += 1;
                }
                eprintln!(
                    "    boot {index}: FAIL after {} migrations: {reason} (logs in {})",
                    report.migrations.len(),
                    dir.display()
                );
            }
        }
        summary.migrations.extend(report.migrations);
    }
    eprintln!("    {}", summary.line(&name));
    Ok(summary)
}

/// `cargo xtask e2e --migrate ...`.
pub(crate) fn main(args: &[String]) -> ExitCode {
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|arg| arg == "--gate") {
        let start = Instant::now();
        let result = ci_step();
        eprintln!(
            "    the gate's migration runs took {:.0} s",
            start.elapsed().as_secs_f64()
        );
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("xtask e2e --migrate --gate: FAILED: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match parse(args) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("xtask e2e --migrate: {err}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(summary) if summary.passes == summary.boots => ExitCode::SUCCESS,
        Ok(summary) => {
            eprintln!(
                "xtask e2e --migrate: FAILED: {}/{} boots passed",
                summary.passes, summary.boots
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("xtask e2e --migrate: FAILED: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The migration runs of `cargo xtask ci`: `vu_blk` ([`CI_BOOTS`] boots, all must pass),
/// qemu-storage-daemon (the reference), `vu_blk` with postcopy ([`CI_POSTCOPY_BOOTS`]) and on
/// packed virtqueues ([`CI_PACKED_BOOTS`]), all of which must pass, and the broken `vu_blk`
/// ([`CI_BROKEN_BOOTS`]), every boot of which must fail with a data mismatch the guest found.
/// The postcopy run rebuilds `vu_blk` with the feature, so the broken run after it rebuilds it
/// without.
pub(crate) fn ci_step() -> Result<(), String> {
    let mut problems = Vec::new();
    let runs = [
        Options {
            qsd: false,
            boots: CI_BOOTS,
            variant: Variant::default(),
        },
        Options {
            qsd: true,
            boots: CI_REFERENCE_BOOTS,
            variant: Variant::default(),
        },
        Options {
            qsd: false,
            boots: CI_POSTCOPY_BOOTS,
            variant: Variant {
                skip_logging: None,
                postcopy: true,
                packed: false,
            },
        },
        Options {
            qsd: false,
            boots: CI_PACKED_BOOTS,
            variant: Variant {
                skip_logging: None,
                postcopy: false,
                packed: true,
            },
        },
    ];
    for options in runs {
        eprintln!("==> e2e: migration, {}", describe(&options));
        match run(&options) {
            Ok(summary) if summary.passes == summary.boots => {}
            Ok(summary) => problems.push(format!(
                "{}: {}/{} boots passed",
                describe(&options),
                summary.passes,
                summary.boots
            )),
            Err(err) => problems.push(err),
        }
    }
    let broken = Options {
        qsd: false,
        boots: CI_BROKEN_BOOTS,
        variant: Variant {
            skip_logging: Some(CI_SKIP_LOGGING),
            postcopy: false,
            packed: false,
        },
    };
    eprintln!(
        "==> e2e: migration, {} (broken on purpose: must be caught, by a data mismatch)",
        describe(&broken)
    );
    // The broken run is what the real one would be with a backend that drops log bits: every
    // boot must go red by a data mismatch the guest found, and none for another reason.
    match run(&broken) {
        Ok(summary) if summary.data_failures == summary.boots => {}
        Ok(summary) => problems.push(format!(
            "the broken vu_blk was caught by a data mismatch in {}/{} boots ({} passed): \
             the migration test misses unlogged writes, or a boot failed for another reason",
            summary.data_failures, summary.boots, summary.passes
        )),
        Err(err) => problems.push(err),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn describe(options: &Options) -> String {
    let mut line = format!(
        "cargo xtask e2e --migrate --backend {} --boots {}",
        if options.qsd { "qsd" } else { "vu" },
        options.boots
    );
    if let Some(n) = options.variant.skip_logging {
        line.push_str(&format!(" --skip-logging {n}"));
    }
    if options.variant.postcopy {
        line.push_str(" --postcopy");
    }
    if options.variant.packed {
        line.push_str(" --packed");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn options_are_parsed() {
        let options = parse(&words("--migrate --backend qsd --boots 3")).unwrap();
        assert_eq!(
            options,
            Options {
                qsd: true,
                boots: 3,
                variant: Variant::default()
            }
        );
        let options = parse(&words("--migrate --skip-logging 4")).unwrap();
        assert_eq!(options.variant.skip_logging, Some(4));
        assert!(
            parse(&words("--migrate --postcopy"))
                .unwrap()
                .variant
                .postcopy
        );
        assert!(parse(&words("--migrate --packed")).unwrap().variant.packed);
        assert!(parse(&words("--backend qsd --skip-logging 2")).is_err());
        assert!(parse(&words("--backend qsd --packed")).is_err());
        assert!(parse(&words("--backend qemu")).is_err());
        assert!(parse(&words("--boots 0")).is_err());
    }
}
