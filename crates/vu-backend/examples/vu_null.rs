//! `vu_null`: a null vhost-user device on the vu framework, for benchmarks.
//!
//! Every descriptor chain the driver posts is completed at once, reporting its whole writable
//! length as written (nothing is read or written). The queue is served by the framework's
//! [`process_queue`]: pop everything, complete, one interrupt decision per pass, notifications
//! re-armed with the `VIRTIO_RING_F_EVENT_IDX` re-check. That is the whole device: the speed
//! measured with it is the framework's. `cargo xtask bench` drives it (docs/performance.md).
//!
//! It follows the vhost-user spec's "Backend program conventions": `--socket-path PATH`
//! (listen, serve frontends one after another) or `--fd N` (an inherited connected socket),
//! `--print-capabilities` (JSON on stdout), no daemonizing, a clean exit on SIGTERM or
//! SIGINT, logs on stderr through the `log` facade.
//!
//! ```text
//! cargo run --release -p vu-backend --example vu_null -- --socket-path /tmp/null.sock
//! ```

use std::ffi::{c_int, c_void};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use vu_backend::prelude::*;
use vu_backend::vu_daemon::process::process_queue;
use vu_backend::vu_proto::listener::Listener;
use vu_backend::vu_proto::socket::Endpoint;

/// A device that completes every chain with its writable length.
#[derive(Debug)]
struct NullBackend {
    num_queues: u16,
    queue_size: u16,
}

impl VhostUserBackend for NullBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1
            | VirtioFeatures::RING_EVENT_IDX
            | VirtioFeatures::PROTOCOL_FEATURES)
            .bits()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings know; process_queue follows them.
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "unknown device event {device_event}"
            )));
        };
        process_queue(vring, |chain| {
            chain
                .filter(|desc| desc.is_write_only())
                .fold(0u32, |total, desc| total.saturating_add(desc.len()))
        })
        .map_err(io::Error::other)?;
        Ok(())
    }
}

/// A minimal `log` backend: one line per record on stderr, up to a level.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "vu_null: {}: {}",
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// The command line.
#[derive(Debug)]
struct Args {
    socket_path: Option<PathBuf>,
    fd: Option<i32>,
    num_queues: u16,
    queue_size: u16,
    poll_us: u64,
    print_capabilities: bool,
}

const USAGE: &str = "\
usage: vu_null (--socket-path PATH | --fd N) [--num-queues N] [--queue-size N]
               [--poll-us N] [--log-level LEVEL]
       vu_null --print-capabilities

  --socket-path PATH   listen on this UNIX socket, serve frontends one after another
  --fd N               serve the inherited connected socket N, then exit
  --num-queues N       queues (default 1, at most 64), all on one worker thread
  --queue-size N       largest queue size accepted (default 1024)
  --poll-us N          adaptive polling: after serving a queue, spin on it for up to N
                       microseconds before sleeping (default 0, off)
  --log-level LEVEL    error, warn, info (default), debug or trace; logs go to stderr
";

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        socket_path: None,
        fd: None,
        num_queues: 1,
        queue_size: 1024,
        poll_us: 0,
        print_capabilities: false,
    };
    log::set_max_level(log::LevelFilter::Info);
    let mut words = args.iter();
    while let Some(word) = words.next() {
        // Both `--name value` and `--name=value`.
        let (name, inline) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (word.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| words.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |text: String| {
            text.parse::<u64>()
                .map_err(|_| format!("{name}: `{text}` is not a number"))
        };
        match name {
            "--socket-path" => parsed.socket_path = Some(PathBuf::from(value()?)),
            "--fd" => {
                let n = number(value()?)?;
                parsed.fd = Some(i32::try_from(n).map_err(|_| "--fd: too large".to_owned())?);
            }
            "--num-queues" => {
                let n = number(value()?)?;
                parsed.num_queues = u16::try_from(n)
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or("--num-queues: 1 to 64")?;
            }
            "--queue-size" => {
                let n = number(value()?)?;
                parsed.queue_size = u16::try_from(n)
                    .ok()
                    .filter(|n| n.is_power_of_two() && *n <= 32768)
                    .ok_or("--queue-size: a power of two up to 32768")?;
            }
            "--poll-us" => parsed.poll_us = number(value()?)?,
            "--log-level" => {
                let level = value()?;
                let filter = level
                    .parse::<log::LevelFilter>()
                    .map_err(|_| format!("--log-level: unknown level `{level}`"))?;
                log::set_max_level(filter);
            }
            "--print-capabilities" => parsed.print_capabilities = true,
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    if parsed.print_capabilities {
        return Ok(parsed);
    }
    if parsed.socket_path.is_some() == parsed.fd.is_some() {
        return Err("give exactly one of --socket-path and --fd".to_owned());
    }
    Ok(parsed)
}

/// Written by the SIGTERM/SIGINT handler; a thread waiting on it stops the daemon.
static STOP_EVENT: OnceLock<EventFd> = OnceLock::new();

/// The signal handler, generic over the `siginfo_t` pointer type (inferred from
/// `vmm_sys_util`'s `SignalHandler`); it only writes an eventfd, which is async-signal-safe.
extern "C" fn on_stop_signal<T>(_signal: c_int, _info: *mut T, _context: *mut c_void) {
    if let Some(event) = STOP_EVENT.get() {
        let _ = event.write(1);
    }
}

/// SIGINT and SIGTERM (the same numbers on every Linux architecture).
const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;

fn install_stop_handler(daemon: &VhostUserDaemon<NullBackend>) -> Result<(), String> {
    let event = EventFd::new(0).map_err(|err| format!("cannot create an eventfd: {err}"))?;
    let waiter = event
        .try_clone()
        .map_err(|err| format!("cannot clone an eventfd: {err}"))?;
    STOP_EVENT
        .set(event)
        .map_err(|_| "the stop handler is installed twice".to_owned())?;
    let shutdown = daemon.shutdown_handle();
    std::thread::Builder::new()
        .name("vu_null-signals".to_owned())
        .spawn(move || {
            if waiter.read().is_ok() {
                log::info!("stopping on a signal");
                shutdown.shutdown();
            }
        })
        .map_err(|err| format!("cannot spawn the signal thread: {err}"))?;
    for signal in [SIGINT, SIGTERM] {
        vu_backend::vmm_sys_util::signal::register_signal_handler(signal, on_stop_signal)
            .map_err(|err| format!("cannot handle signal {signal}: {err}"))?;
    }
    Ok(())
}

/// Takes the inherited socket `fd` (the `--fd` convention).
fn inherited_socket(fd: i32) -> Result<Endpoint, String> {
    // OwnedFd must hold an open fd: check that this one is open before adopting it.
    if !std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists() {
        return Err(format!("--fd {fd}: no such open file descriptor"));
    }
    // SAFETY: fd is open (checked just above) and, by the --fd convention, was handed to this
    // process to own; nothing else in this program uses it, so taking ownership is sound.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Endpoint::from_fd(owned).map_err(|err| format!("--fd {fd}: {err}"))
}

fn run(args: &Args) -> Result<(), String> {
    let backend = NullBackend {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
    };
    let mut daemon = VhostUserDaemon::new(
        "vu_null".to_owned(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|err| format!("cannot create the daemon: {err}"))?;
    if args.poll_us > 0 {
        for queue in 0..args.num_queues {
            daemon
                .set_polling(queue, Duration::from_micros(args.poll_us))
                .map_err(|err| format!("cannot set polling: {err}"))?;
        }
    }
    install_stop_handler(&daemon)?;
    log::info!(
        "{} queue(s) of up to {}, polling {} µs",
        args.num_queues,
        args.queue_size,
        args.poll_us
    );
    match (&args.socket_path, args.fd) {
        (Some(path), _) => {
            let listener = Listener::bind_replacing_stale(path)
                .map_err(|err| format!("cannot listen on {}: {err}", path.display()))?;
            log::info!("listening on {}", path.display());
            daemon
                .start_serving(listener)
                .map_err(|err| format!("cannot start: {err}"))?;
        }
        (None, Some(fd)) => {
            let endpoint = inherited_socket(fd)?;
            daemon
                .start_connection(endpoint)
                .map_err(|err| format!("cannot start: {err}"))?;
        }
        (None, None) => return Err("no socket".to_owned()),
    }
    daemon.wait().map_err(|err| format!("daemon failed: {err}"))
}

fn main() -> ExitCode {
    // Only fails if a logger is already set, which nothing else here does.
    let _ = log::set_logger(&LOGGER);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&args) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("vu_null: {err}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.print_capabilities {
        // The spec's capability document; a null device has no type-specific features.
        println!("{{\n  \"type\": \"null\",\n  \"features\": []\n}}");
        return ExitCode::SUCCESS;
    }
    match run(&args) {
        Ok(()) => {
            log::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            log::error!("{err}");
            ExitCode::FAILURE
        }
    }
}
