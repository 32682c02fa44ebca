//! `vu_rng`: a vhost-user entropy device (virtio-rng) on the vu framework, the smallest
//! useful device and the one the README walks through.
//!
//! virtio-rng has one queue. The guest's driver posts a buffer it can write to; the device
//! fills it with random bytes and hands it back with the number of bytes written. There is
//! no configuration space and no device-specific feature. Here the bytes come from a file
//! read in order (`--rng-source`, `/dev/urandom` by default), so that a test can feed a
//! known stream and check what the guest read.
//!
//! It follows the vhost-user spec's "Backend program conventions": `--socket-path PATH`
//! (listen) or `--fd N` (an inherited connected socket), `--print-capabilities` (JSON on
//! stdout), no daemonizing, a clean exit on SIGTERM or SIGINT, logs on stderr.
//!
//! ```text
//! cargo run -p vu-backend --example vu_rng -- --socket-path /tmp/rng.sock
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
//!     -chardev socket,id=c0,path=/tmp/rng.sock -device vhost-user-rng-pci,chardev=c0
//! ```
//!
//! `cargo xtask e2e --device rng` boots a Linux guest against it (docs/e2e.md).

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Mutex, MutexGuard, PoisonError};

use vu_backend::prelude::*;

use vu_backend::conventions::{self as common, Conventions, Socket};

/// The most bytes one request gets: the spec lets the device write less than the buffer
/// holds, and this bounds what a guest can make us read at once.
const MAX_REQUEST: usize = 64 << 10;

/// Where the random bytes come from, and what has been served.
#[derive(Debug)]
struct Source {
    file: File,
    /// Requests completed and bytes written into them.
    requests: u64,
    bytes: u64,
    /// The source ended (a regular file read to its end); said once in the log.
    exhausted: bool,
}

/// The device.
#[derive(Debug)]
struct RngBackend {
    /// Taken for each request; there is one queue, served from one worker thread.
    source: Mutex<Source>,
}

impl RngBackend {
    fn source(&self) -> MutexGuard<'_, Source> {
        // A poisoned lock only means a panic mid-request; the file is still a file.
        self.source.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves one request: fills the chain's writable buffers from the source and returns
    /// how many bytes it wrote (the "used length" the driver reads).
    fn fill(&self, chain: Chain<'_, GuestMemoryMmap>) -> u32 {
        let mem = chain.memory();
        let mut source = self.source();
        let mut written = 0usize;
        let mut bytes = Vec::new();
        // Only the buffers the driver marked device-writable; virtio-rng has no others.
        for desc in chain.clone().writable() {
            let room = (desc.len() as usize).min(MAX_REQUEST - written);
            bytes.resize(room, 0);
            let got = match read_up_to(&mut source.file, &mut bytes) {
                Ok(got) => got,
                Err(err) => {
                    log::warn!("reading the source: {err}");
                    break;
                }
            };
            // The descriptor's address is the guest's; guest memory refuses one outside
            // the regions the frontend shared, so a bad descriptor is an error, not a crash.
            if let Err(err) = mem.write_slice(&bytes[..got], desc.addr()) {
                log::warn!("request {}: {err}", chain.head_index());
                break;
            }
            written += got;
            if got < room {
                if !source.exhausted {
                    log::warn!("the source has no more bytes");
                    source.exhausted = true;
                }
                break;
            }
            if written == MAX_REQUEST {
                break;
            }
        }
        source.requests += 1;
        source.bytes += written as u64;
        log::debug!("request {}: {written} bytes", chain.head_index());
        // MAX_REQUEST fits in a u32.
        u32::try_from(written).unwrap_or(u32::MAX)
    }
}

/// Reads until `buf` is full or the file ends; returns how many bytes it read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(done)
}

impl VhostUserBackend for RngBackend {
    // No live migration (no dirty-page log), and vrings behind a mutex for the worker
    // threads of `VhostUserDaemon`.
    type Bitmap = ();
    type Vring = VringMutex;

    /// virtio-rng has one queue, `requestq`.
    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    /// Virtio 1.x, the ring options the framework serves for us, and vhost-user protocol
    /// features. QEMU 7.2 lets the guest use EVENT_IDX and indirect descriptors even when
    /// they are not offered (docs/e2e.md); offering them says so honestly.
    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1
            | VirtioFeatures::RING_INDIRECT_DESC
            | VirtioFeatures::RING_EVENT_IDX
            | VirtioFeatures::RING_PACKED
            | VirtioFeatures::PROTOCOL_FEATURES)
            .bits()
    }

    /// REPLY_ACK: the frontend learns at once when a request of its own fails.
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vring knows whether EVENT_IDX was negotiated; process_queue follows it.
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // Each descriptor chain carries the guest memory it was read from.
        Ok(())
    }

    /// The guest kicked queue `device_event`: serve everything it posted. `process_queue`
    /// pops each chain, calls `fill`, puts the chain in the used ring, interrupts the guest
    /// at most once, and re-arms kicks (with the EVENT_IDX re-check that catches a chain
    /// posted meanwhile).
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "unknown device event {device_event}"
            )));
        };
        process_queue(vring, |chain| self.fill(chain));
        Ok(())
    }
}

/// The command line.
#[derive(Debug)]
struct Args {
    conventions: Conventions,
    rng_source: PathBuf,
}

const USAGE: &str = "\
usage: vu_rng (--socket-path PATH | --fd N) [--rng-source FILE] [--log-level LEVEL]
       vu_rng --print-capabilities

  --rng-source FILE    serve this file's bytes in order (default /dev/urandom)
";

/// The spec's capability document; virtio-rng has no type-specific features.
const CAPABILITIES: &str = r#"{
  "type": "rng",
  "features": []
}"#;

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        conventions: Conventions::default(),
        rng_source: PathBuf::from("/dev/urandom"),
    };
    common::for_each_option(args, |name, value| {
        if parsed.conventions.take(name, value)? {
            return Ok(());
        }
        match name {
            "--rng-source" => parsed.rng_source = PathBuf::from(value()?),
            other => return Err(format!("unexpected argument `{other}`")),
        }
        Ok(())
    })?;
    Ok(parsed)
}

fn run(args: &Args, socket: &Socket) -> Result<(), String> {
    let file = File::open(&args.rng_source)
        .map_err(|err| format!("cannot open {}: {err}", args.rng_source.display()))?;
    let backend = RngBackend {
        source: Mutex::new(Source {
            file,
            requests: 0,
            bytes: 0,
            exhausted: false,
        }),
    };
    // The guest memory starts empty; the frontend's memory table fills it.
    let mut daemon = VhostUserDaemon::new(
        "vu_rng".to_owned(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|err| format!("cannot create the daemon: {err}"))?;
    log::info!("serving the bytes of {}", args.rng_source.display());
    // Serves frontend after frontend until SIGTERM.
    let result = common::serve(&mut daemon, socket);
    let source = daemon.backend().source();
    log::info!(
        "served {} requests, {} bytes",
        source.requests,
        source.bytes
    );
    result
}

fn main() -> ExitCode {
    common::main(
        "vu_rng",
        USAGE,
        CAPABILITIES,
        parse_args,
        |args| &args.conventions,
        run,
    )
}

/// The device's tests, written with the facade's test kit (`vu_backend::testing`, feature
/// `testing`) as the model for a device's own: the device is served in-process on a socket
/// pair, the kit plays QEMU and the guest's driver, and no QEMU runs.
///
/// `cargo test -p vu-backend --features testing --example vu_rng`
#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use vu_backend::testing::{Buf, DeviceSetup, InProcess};
    use vu_backend::vmm_sys_util::tempfile::TempFile;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// The device, reading `bytes` from a file.
    fn rng_over(bytes: &[u8]) -> RngBackend {
        let file = TempFile::new().expect("temp file");
        file.as_file().write_all(bytes).expect("write the source");
        let source = File::open(file.as_path()).expect("open the source");
        RngBackend {
            source: Mutex::new(Source {
                file: source,
                requests: 0,
                bytes: 0,
                exhausted: false,
            }),
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn writable_buffers_get_the_source_bytes_in_order() {
        let source = pattern(100);
        let mut rng = InProcess::start(rng_over(&source), &DeviceSetup::default());
        let queue = rng.device.queue(0);
        queue.post_and_kick(&[Buf::Writable(8)]);
        queue.post_and_kick(&[Buf::Writable(16), Buf::Writable(4)]);
        let used = queue.wait_used(2, TIMEOUT);
        assert_eq!(used[0].len, 8);
        assert_eq!(used[0].written, vec![source[..8].to_vec()]);
        assert_eq!(used[1].len, 20);
        assert_eq!(
            used[1].written,
            vec![source[8..24].to_vec(), source[24..28].to_vec()]
        );
        rng.stop().expect("clean stop");
        assert_eq!(rng.daemon.backend().source().requests, 2);
        assert_eq!(rng.daemon.backend().source().bytes, 28);
    }

    #[test]
    fn a_request_gets_at_most_max_request_bytes() {
        let source = pattern(MAX_REQUEST + 4096);
        let mut rng = InProcess::start(rng_over(&source), &DeviceSetup::default());
        let queue = rng.device.queue(0);
        // 17 buffers of 4 KiB: one more than MAX_REQUEST (64 KiB) can fill.
        let bufs = vec![Buf::Writable(4096); 17];
        queue.post_and_kick(&bufs);
        let used = queue.wait_used(1, TIMEOUT);
        assert_eq!(used[0].len as usize, MAX_REQUEST);
        assert_eq!(used[0].written[15], source[15 * 4096..16 * 4096].to_vec());
        assert_eq!(used[0].written[16], vec![0; 4096]);
        rng.stop().expect("clean stop");
    }

    #[test]
    fn an_exhausted_source_completes_with_what_it_had() {
        let mut rng = InProcess::start(rng_over(b"0123456789"), &DeviceSetup::default());
        let queue = rng.device.queue(0);
        queue.post_and_kick(&[Buf::Writable(16)]);
        queue.post_and_kick(&[Buf::Writable(16)]);
        let used = queue.wait_used(2, TIMEOUT);
        assert_eq!(used[0].len, 10);
        assert_eq!(&used[0].written[0][..10], b"0123456789");
        assert_eq!(used[1].len, 0);
        rng.stop().expect("clean stop");
        assert!(rng.daemon.backend().source().exhausted);
    }

    #[test]
    fn a_chain_without_writable_buffers_is_completed_empty() {
        let mut rng = InProcess::start(rng_over(&pattern(64)), &DeviceSetup::default());
        let queue = rng.device.queue(0);
        queue.post_and_kick(&[Buf::Readable(b"nothing to fill".to_vec())]);
        let used = queue.wait_used(1, TIMEOUT);
        assert_eq!(used[0].len, 0);
        rng.stop().expect("clean stop");
    }

    #[test]
    fn event_idx_serves_every_chain_across_ring_wraps() {
        let source = pattern(64 * 40);
        let setup = DeviceSetup {
            queue_size: 8,
            event_idx: true,
            ..DeviceSetup::default()
        };
        let mut rng = InProcess::start(rng_over(&source), &setup);
        let queue = rng.device.queue(0);
        let mut expected = source.chunks(64);
        // Forty chains through an eight-entry ring, four at a time.
        for _ in 0..10 {
            for _ in 0..4 {
                queue.post_and_kick(&[Buf::Writable(64)]);
            }
            for used in queue.wait_used(4, TIMEOUT) {
                assert_eq!(used.written[0], expected.next().expect("more source"));
            }
        }
        assert_eq!(queue.in_flight(), 0);
        rng.stop().expect("clean stop");
    }
}
