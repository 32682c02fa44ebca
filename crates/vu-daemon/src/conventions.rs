//! The vhost-user spec's "Backend program conventions", for a device's `main`: `--socket-path
//! PATH` (listen, serving frontends one after another) or `--fd N` (an inherited connected
//! socket), `--print-capabilities` (the JSON capability document on stdout), no daemonizing, a
//! clean exit on SIGTERM or SIGINT, and `--log-level` with logs on stderr through `log`.
//!
//! [`main`] does all of it around a device's own `run`, which builds the daemon and hands it
//! to [`serve`]; the pieces ([`Conventions`], [`for_each_option`], [`number_in`],
//! [`queue_size`], [`stop_on_signals`], [`start`]) serve a program that wants its own `main`. Nothing here knows about a device; the example devices of `vu-backend`
//! (`examples/vu_rng.rs` is the shortest) use it. It adds no dependency: the option parser is
//! a small one of its own, and the logger writes `<program>: <level>: <message>` lines.
//!
//! ```no_run
//! use std::process::ExitCode;
//!
//! use vu_daemon::conventions::{self, Conventions, Socket};
//!
//! struct Args {
//!     conventions: Conventions,
//! }
//!
//! fn parse(args: &[String]) -> Result<Args, String> {
//!     let mut parsed = Args { conventions: Conventions::default() };
//!     conventions::for_each_option(args, |name, value| {
//!         if parsed.conventions.take(name, value)? {
//!             return Ok(());
//!         }
//!         Err(format!("unexpected argument `{name}`"))
//!     })?;
//!     Ok(parsed)
//! }
//!
//! fn run(_args: &Args, socket: &Socket) -> Result<(), String> {
//!     // Build the daemon, then `conventions::serve(&mut daemon, socket)` (SIGTERM handling,
//!     // `start`, `wait`).
//!     # let _ = socket;
//!     Ok(())
//! }
//!
//! fn main() -> ExitCode {
//!     conventions::main(
//!         "my-device",
//!         "usage: my-device (--socket-path PATH | --fd N)\n",
//!         r#"{"type": "rng", "features": []}"#,
//!         parse,
//!         |args| &args.conventions,
//!         run,
//!     )
//! }
//! ```

use std::ffi::{c_int, c_void};
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;

use vmm_sys_util::eventfd::EventFd;
use vu_proto::listener::Listener;
use vu_proto::socket::Endpoint;

use crate::backend::VhostUserBackend;
use crate::daemon::{ShutdownHandle, VhostUserDaemon};

/// The help text of the options handled here, for an example's usage text.
pub const CONVENTIONS_USAGE: &str =
    "  --socket-path PATH   listen on this UNIX socket, serve frontends one after another
  --fd N               serve the inherited connected socket N, then exit
  --print-capabilities print the device type as JSON on stdout and exit
  --log-level LEVEL    error, warn, info (default), debug or trace; logs go to stderr
";

/// The `main` of an example backend: logs to stderr as `program`, answers `-h`/`--help`
/// with `usage` followed by [`CONVENTIONS_USAGE`], parses the arguments with `parse`, prints
/// `capabilities` (the spec's JSON capability document) for `--print-capabilities`, and
/// otherwise serves the socket the conventions name with `run`.
///
/// Exits 0 after help, capabilities or a clean stop; 2 on a bad argument (with the usage
/// text on stderr); 1 when `run` fails (the error is logged).
pub fn main<A>(
    program: &'static str,
    usage: &str,
    capabilities: &str,
    parse: impl FnOnce(&[String]) -> Result<A, String>,
    conventions: impl FnOnce(&A) -> &Conventions,
    run: impl FnOnce(&A, &Socket) -> Result<(), String>,
) -> ExitCode {
    init_logger(program);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "-h" || arg == "--help") {
        print!("{usage}{CONVENTIONS_USAGE}");
        return ExitCode::SUCCESS;
    }
    let parsed = parse(&args).and_then(|args| {
        let conventions = conventions(&args);
        let socket = if conventions.print_capabilities {
            None
        } else {
            Some(conventions.socket()?)
        };
        Ok((args, socket))
    });
    let (args, socket) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => {
            eprintln!("{program}: {err}\n\n{usage}{CONVENTIONS_USAGE}");
            return ExitCode::from(2);
        }
    };
    let Some(socket) = socket else {
        println!("{capabilities}");
        return ExitCode::SUCCESS;
    };
    match run(&args, &socket) {
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

/// A minimal `log` backend: one line per record on stderr, `<program>: <level>: <message>`.
struct StderrLogger {
    program: &'static str,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "{}: {}: {}",
                self.program,
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Sends `log` records at `info` and above to stderr, prefixed with `program`.
fn init_logger(program: &'static str) {
    let logger = LOGGER.get_or_init(|| StderrLogger { program });
    // Only fails if a logger is already set, which nothing else in an example does.
    let _ = log::set_logger(logger);
    log::set_max_level(log::LevelFilter::Info);
}

/// Where the frontend is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Socket {
    /// `--socket-path`: listen here and serve frontends one after another.
    Path(PathBuf),
    /// `--fd`: an inherited connected socket; serve it, then exit.
    Fd(i32),
}

/// The options every backend program takes.
#[derive(Debug, Default)]
pub struct Conventions {
    socket_path: Option<PathBuf>,
    fd: Option<i32>,
    /// `--print-capabilities` was given.
    pub print_capabilities: bool,
}

impl Conventions {
    /// Takes option `name` if it is one of the conventions' (reading its value with
    /// `value`); `Ok(false)` if it is not, for the device to look at.
    pub fn take(
        &mut self,
        name: &str,
        value: &mut dyn FnMut() -> Result<String, String>,
    ) -> Result<bool, String> {
        match name {
            "--socket-path" => self.socket_path = Some(PathBuf::from(value()?)),
            "--fd" => {
                let n = number(name, &value()?)?;
                self.fd = Some(i32::try_from(n).map_err(|_| "--fd: too large".to_owned())?);
            }
            "--print-capabilities" => self.print_capabilities = true,
            "--log-level" => {
                let level = value()?;
                let filter = level
                    .parse::<log::LevelFilter>()
                    .map_err(|_| format!("--log-level: unknown level `{level}`"))?;
                log::set_max_level(filter);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The socket to serve: exactly one of `--socket-path` and `--fd`.
    pub fn socket(&self) -> Result<Socket, String> {
        match (&self.socket_path, self.fd) {
            (Some(path), None) => Ok(Socket::Path(path.clone())),
            (None, Some(fd)) => Ok(Socket::Fd(fd)),
            _ => Err("give exactly one of --socket-path and --fd".to_owned()),
        }
    }
}

/// Calls `each(name, value)` for every option of `args`, where `value()` reads the option's
/// value from `--name value` or `--name=value`.
pub fn for_each_option(
    args: &[String],
    mut each: impl FnMut(&str, &mut dyn FnMut() -> Result<String, String>) -> Result<(), String>,
) -> Result<(), String> {
    let mut words = args.iter();
    while let Some(word) = words.next() {
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
        each(name, &mut value)?;
    }
    Ok(())
}

/// Option `name`'s value as a number.
pub fn number(name: &str, text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .map_err(|_| format!("{name}: `{text}` is not a number"))
}

/// Option `name`'s value as a number of type `T` within `range` (`--num-queues: 1 to 64`
/// otherwise).
pub fn number_in<T>(name: &str, text: &str, range: RangeInclusive<T>) -> Result<T, String>
where
    T: TryFrom<u64> + PartialOrd + Display,
{
    T::try_from(number(name, text)?)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| format!("{name}: {} to {}", range.start(), range.end()))
}

/// The largest queue size virtio allows (split and packed rings alike).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Option `name`'s value as a queue size: a power of two up to [`MAX_QUEUE_SIZE`].
pub fn queue_size(name: &str, text: &str) -> Result<u16, String> {
    u16::try_from(number(name, text)?)
        .ok()
        .filter(|n| n.is_power_of_two() && *n <= MAX_QUEUE_SIZE)
        .ok_or_else(|| format!("{name}: a power of two up to {MAX_QUEUE_SIZE}"))
}

/// Written by the SIGTERM/SIGINT handler; a thread waiting on it stops the daemon.
static STOP_EVENT: OnceLock<EventFd> = OnceLock::new();

/// The signal handler. Generic over the `siginfo_t` pointer type, which is inferred from
/// `vmm_sys_util`'s `SignalHandler`. It only writes an eventfd (one `write(2)`), which is
/// async-signal-safe.
extern "C" fn on_stop_signal<T>(_signal: c_int, _info: *mut T, _context: *mut c_void) {
    if let Some(event) = STOP_EVENT.get() {
        let _ = event.write(1);
    }
}

/// On SIGTERM or SIGINT, stops the daemon through `shutdown` (its `wait` then returns `Ok`).
pub fn stop_on_signals(shutdown: ShutdownHandle) -> Result<(), String> {
    let event = EventFd::new(0).map_err(|err| format!("cannot create an eventfd: {err}"))?;
    let waiter = event
        .try_clone()
        .map_err(|err| format!("cannot clone an eventfd: {err}"))?;
    STOP_EVENT
        .set(event)
        .map_err(|_| "the stop handler is installed twice".to_owned())?;
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            if waiter.read().is_ok() {
                log::info!("stopping on a signal");
                shutdown.shutdown();
            }
        })
        .map_err(|err| format!("cannot spawn the signal thread: {err}"))?;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(signal, on_stop_signal)
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
    let owned = crate::sys::adopt_inherited(fd).map_err(|err| format!("--fd {fd}: {err}"))?;
    Endpoint::from_fd(owned).map_err(|err| format!("--fd {fd}: {err}"))
}

/// Serves `socket` with `daemon` until it stops: [`stop_on_signals`], [`start`], then the
/// daemon's `wait`. `Ok` after a clean stop (a signal, or the end of an `--fd` connection).
pub fn serve<S>(daemon: &mut VhostUserDaemon<S>, socket: &Socket) -> Result<(), String>
where
    S: VhostUserBackend + Send + Sync + 'static,
    S::Vring: Clone + Send + Sync + 'static,
    S::Bitmap: Send + Sync + 'static,
{
    stop_on_signals(daemon.shutdown_handle())?;
    start(daemon, socket)?;
    daemon.wait().map_err(|err| format!("daemon failed: {err}"))
}

/// Starts serving `socket` (listening on a path, or the inherited connection); returns at
/// once. The daemon's `wait` returns when it stops.
pub fn start<S>(daemon: &mut VhostUserDaemon<S>, socket: &Socket) -> Result<(), String>
where
    S: VhostUserBackend + Send + Sync + 'static,
    S::Vring: Clone + Send + Sync + 'static,
    S::Bitmap: Send + Sync + 'static,
{
    match socket {
        Socket::Path(path) => {
            let listener = Listener::bind_replacing_stale(path)
                .map_err(|err| format!("cannot listen on {}: {err}", path.display()))?;
            log::info!("listening on {}", path.display());
            daemon
                .start_serving(listener)
                .map_err(|err| format!("cannot start: {err}"))
        }
        Socket::Fd(fd) => {
            let endpoint = inherited_socket(*fd)?;
            daemon
                .start_connection(endpoint)
                .map_err(|err| format!("cannot start: {err}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn number_in_checks_the_type_and_the_range() {
        assert_eq!(number_in::<u16>("--n", "64", 1..=64), Ok(64));
        assert_eq!(
            number_in::<u16>("--n", "65", 1..=64),
            Err("--n: 1 to 64".to_owned())
        );
        assert_eq!(
            number_in::<u16>("--n", "70000", 1..=u16::MAX),
            Err("--n: 1 to 65535".to_owned())
        );
        assert!(number_in::<usize>("--n", "x", 1..=2).is_err());
    }

    #[test]
    fn queue_size_is_a_power_of_two_up_to_32768() {
        assert_eq!(queue_size("--queue-size", "256"), Ok(256));
        assert_eq!(queue_size("--queue-size", "32768"), Ok(32768));
        for bad in ["0", "100", "65536", "-1"] {
            assert!(queue_size("--queue-size", bad).is_err(), "{bad}");
        }
    }

    fn parse(words: &[&str]) -> Result<Conventions, String> {
        let mut conventions = Conventions::default();
        for_each_option(&args(words), |name, value| {
            if conventions.take(name, value)? {
                Ok(())
            } else {
                Err(format!("unexpected `{name}`"))
            }
        })?;
        Ok(conventions)
    }

    #[test]
    fn socket_path_takes_its_value_in_either_form() {
        let spaced = parse(&["--socket-path", "/tmp/a.sock"]).unwrap();
        let joined = parse(&["--socket-path=/tmp/a.sock"]).unwrap();
        for c in [spaced, joined] {
            assert_eq!(
                c.socket().unwrap(),
                Socket::Path(PathBuf::from("/tmp/a.sock"))
            );
        }
    }

    #[test]
    fn exactly_one_of_socket_path_and_fd_is_required() {
        assert_eq!(
            parse(&["--fd", "3"]).unwrap().socket().unwrap(),
            Socket::Fd(3)
        );
        assert!(parse(&[]).unwrap().socket().is_err());
        assert!(parse(&["--fd", "3", "--socket-path", "/s"])
            .unwrap()
            .socket()
            .is_err());
    }

    #[test]
    fn bad_values_and_unknown_options_are_errors() {
        assert!(parse(&["--fd", "three"]).is_err());
        assert!(parse(&["--fd", "99999999999"]).is_err());
        assert!(parse(&["--socket-path"]).is_err());
        assert!(parse(&["--log-level", "loud"]).is_err());
        assert!(parse(&["--frobnicate"]).is_err());
        assert!(parse(&["--print-capabilities"]).unwrap().print_capabilities);
    }

    #[test]
    fn an_fd_that_is_not_open_is_refused() {
        let err = inherited_socket(i32::MAX).unwrap_err();
        assert!(err.contains("no such open file descriptor"), "{err}");
    }

    #[test]
    fn an_open_socket_fd_is_adopted() {
        use std::io::Read;
        use std::os::fd::IntoRawFd;

        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let endpoint = inherited_socket(ours.into_raw_fd()).unwrap();
        // Dropping the endpoint closes the adopted fd: the peer reads end of file.
        drop(endpoint);
        let mut rest = Vec::new();
        assert_eq!(theirs.read_to_end(&mut rest).unwrap(), 0);
    }
}
