//! `vu_null`: a null vhost-user device on the vu framework, for benchmarks.
//!
//! Every descriptor chain the driver posts is completed at once, reporting its whole writable
//! length as written (nothing is read or written). The queue is served by the framework's
//! [`process_queue`]: pop everything, complete, one interrupt decision per pass, notifications
//! re-armed with the `VIRTIO_RING_F_EVENT_IDX` re-check. That is the whole device: the speed
//! measured with it is the framework's. It offers `VIRTIO_F_RING_PACKED` too, so the same
//! device serves split or packed rings as the frontend chooses. `cargo xtask bench` drives it
//! (docs/performance.md).
//!
//! It follows the vhost-user spec's "Backend program conventions": `--socket-path PATH`
//! (listen, serve frontends one after another) or `--fd N` (an inherited connected socket),
//! `--print-capabilities` (JSON on stdout), no daemonizing, a clean exit on SIGTERM or
//! SIGINT, logs on stderr through the `log` facade.
//!
//! ```text
//! cargo run --release -p vu-backend --example vu_null -- --socket-path /tmp/null.sock
//! ```

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use vu_backend::conventions::{self as common, Conventions, Socket};
use vu_backend::prelude::*;

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
            | VirtioFeatures::RING_PACKED
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
        });
        Ok(())
    }
}

/// The command line.
#[derive(Debug)]
struct Args {
    conventions: Conventions,
    num_queues: u16,
    queue_size: u16,
    poll_us: Option<u64>,
    message_poll_us: Option<u64>,
}

const USAGE: &str = "\
usage: vu_null (--socket-path PATH | --fd N) [--num-queues N] [--queue-size N]
               [--poll-us N] [--message-poll-us N] [--log-level LEVEL]
       vu_null --print-capabilities

  --num-queues N       queues (default 1, at most 64), all on one worker thread
  --queue-size N       largest queue size accepted (default 1024)
  --poll-us N          after serving a queue, spin on it for up to N microseconds before
                       sleeping, after every kick; 0 turns polling off (default: the
                       framework's adaptive polling, 50, backing off where it does not pay)
  --message-poll-us N  after each vhost-user message, look for the next one for up to N
                       microseconds before blocking (default: the framework's, 50)
";

/// The spec's capability document; a null device has no type-specific features.
const CAPABILITIES: &str = r#"{
  "type": "null",
  "features": []
}"#;

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        conventions: Conventions::default(),
        num_queues: 1,
        queue_size: 1024,
        poll_us: None,
        message_poll_us: None,
    };
    common::for_each_option(args, |name, value| {
        if parsed.conventions.take(name, value)? {
            return Ok(());
        }
        match name {
            "--num-queues" => parsed.num_queues = common::number_in(name, &value()?, 1..=64)?,
            "--queue-size" => parsed.queue_size = common::queue_size(name, &value()?)?,
            "--poll-us" => parsed.poll_us = Some(common::number(name, &value()?)?),
            "--message-poll-us" => {
                parsed.message_poll_us = Some(common::number(name, &value()?)?);
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
        Ok(())
    })?;
    Ok(parsed)
}

fn run(args: &Args, socket: &Socket) -> Result<(), String> {
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
    if let Some(us) = args.poll_us {
        for queue in 0..args.num_queues {
            daemon
                .set_polling(queue, Duration::from_micros(us))
                .map_err(|err| format!("cannot set polling: {err}"))?;
        }
    }
    if let Some(us) = args.message_poll_us {
        daemon.set_message_polling(Duration::from_micros(us));
    }
    let polling = args
        .poll_us
        .map_or_else(|| "adaptive".to_owned(), |us| format!("{us} µs"));
    log::info!(
        "{} queue(s) of up to {}, polling {polling}",
        args.num_queues,
        args.queue_size,
    );
    common::serve(&mut daemon, socket)
}

fn main() -> ExitCode {
    common::main(
        "vu_null",
        USAGE,
        CAPABILITIES,
        parse_args,
        |args| &args.conventions,
        run,
    )
}
