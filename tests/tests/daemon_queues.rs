//! Data through the queues of a `VhostUserDaemon` over a real socket: an echo backend, chains
//! of one and three descriptors, EVENT_IDX on and off, several queues on several workers.

use vu_backend::{VhostUserDaemon, VringMutex};
use vu_tests::backends::EchoBackend;
use vu_tests::daemon_support::{echo_bursts, Running};
use vu_tests::device::{DeviceSetup, TestDevice, DEVICE_TIMEOUT};
use vu_tests::virtqueue::Buf;

fn echo(queues: usize) -> EchoBackend<vu_backend::VringMutex> {
    EchoBackend::new(queues, 256)
}

/// Posts a three-descriptor chain (two readable, one writable) on queue `q` and checks the
/// echo.
fn three_descriptor_round_trip(dev: &mut TestDevice, q: u16, tag: u8) {
    let queue = dev.queue(q);
    queue.post_and_kick(&[
        Buf::Readable(vec![tag; 10]),
        Buf::Readable(vec![tag.wrapping_add(1); 6]),
        Buf::Writable(32),
    ]);
    let used = queue.wait_used(1, DEVICE_TIMEOUT);
    assert_eq!(used[0].len, 16);
    let mut expected = vec![tag; 10];
    expected.extend_from_slice(&[tag.wrapping_add(1); 6]);
    expected.resize(32, 0);
    assert_eq!(used[0].written, vec![expected]);
}

#[test]
fn three_descriptor_chain_is_echoed_without_event_idx() {
    let running = Running::serving(echo(1));
    let mut dev = running.device(&DeviceSetup::default());
    three_descriptor_round_trip(&mut dev, 0, 7);
    assert!(!running.backend.event_idx());
}

#[test]
fn three_descriptor_chain_is_echoed_with_event_idx() {
    let running = Running::serving(echo(1));
    let setup = DeviceSetup {
        event_idx: true,
        ..DeviceSetup::default()
    };
    let mut dev = running.device(&setup);
    three_descriptor_round_trip(&mut dev, 0, 9);
    assert!(running.backend.event_idx());
}

#[test]
fn single_descriptor_chains_are_used() {
    let running = Running::serving(echo(1));
    let mut dev = running.device(&DeviceSetup::default());
    let queue = dev.queue(0);
    let readable = queue.post(&[Buf::Readable(b"only-readable".to_vec())]);
    let writable = queue.post(&[Buf::Writable(8)]);
    queue.kick();
    let used = queue.wait_used(2, DEVICE_TIMEOUT);
    let by_head = |h| used.iter().find(|u| u.head == h).expect("used");
    // Nothing to write into: the readable chain is used with length 0.
    assert_eq!(by_head(readable).len, 0);
    // Nothing to echo: the writable chain is used with length 0 and left zeroed.
    assert_eq!(by_head(writable).len, 0);
    assert_eq!(by_head(writable).written, vec![vec![0u8; 8]]);
}

fn many_chains(event_idx: bool) {
    let running = Running::serving(echo(1));
    let setup = DeviceSetup {
        event_idx,
        queue_size: 16,
        ..DeviceSetup::default()
    };
    let mut dev = running.device(&setup);
    let queue = dev.queue(0);
    // More chains than the ring has entries: the indexes wrap around the ring.
    echo_bursts(queue, 20);
}

#[test]
fn chains_beyond_the_ring_size_flow_without_event_idx() {
    many_chains(false);
}

#[test]
fn chains_beyond_the_ring_size_flow_with_event_idx() {
    many_chains(true);
}

#[test]
fn queues_on_separate_workers_are_served_by_their_threads() {
    let running = Running::serving(echo(2).with_threads(vec![0b01, 0b10]));
    let setup = DeviceSetup {
        queues: 2,
        ..DeviceSetup::default()
    };
    let mut dev = running.device(&setup);
    three_descriptor_round_trip(&mut dev, 0, 1);
    three_descriptor_round_trip(&mut dev, 1, 2);
    assert_eq!(running.backend.threads_of(0), vec![0]);
    assert_eq!(running.backend.threads_of(1), vec![1]);
    assert_eq!(running.daemon.get_epoll_handlers().len(), 2);
    assert_eq!(running.daemon.get_epoll_handlers()[1].queues(), &[1]);
}

#[test]
fn queues_above_64_are_served_with_the_all_ones_mask() {
    let running = Running::serving(EchoBackend::new(70, 8));
    let setup = DeviceSetup {
        queues: 70,
        queue_size: 8,
        ..DeviceSetup::default()
    };
    let mut dev = running.device(&setup);
    three_descriptor_round_trip(&mut dev, 69, 3);
    three_descriptor_round_trip(&mut dev, 32, 4);
    assert_eq!(running.backend.threads_of(69), vec![0]);
}

#[test]
fn backend_fd_registered_on_a_worker_reaches_handle_event() {
    use vu_backend::EventSet;
    use vu_tests::proto_support::{eventfd, eventfd_fd};
    let running = Running::serving(echo(1));
    let evt = eventfd();
    let handler = &running.daemon.get_epoll_handlers()[0];
    handler
        .register_listener(eventfd_fd(&evt), EventSet::IN, 5)
        .unwrap();
    evt.write(1).unwrap();
    // The echo backend has no queue 5: handle_event fails, and the daemon stops with it.
    let mut daemon = running.daemon;
    let err = daemon.wait().unwrap_err();
    assert!(
        matches!(
            err,
            vu_backend::DaemonError::HandleEvent {
                device_event: 5,
                ..
            }
        ),
        "{err}"
    );
    assert!(running.backend.calls.lock().unwrap().contains(&(5, 0)));
}

/// A backend that keeps the trait's default `queues_per_thread()`.
struct DefaultMask {
    queues: usize,
}

impl vu_backend::VhostUserBackend for DefaultMask {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> usize {
        8
    }
    fn features(&self) -> u64 {
        vu_backend::VirtioFeatures::VERSION_1.bits()
    }
    fn protocol_features(&self) -> vu_backend::ProtocolFeatures {
        vu_backend::ProtocolFeatures::empty()
    }
    fn set_event_idx(&self, _: bool) {}
    fn update_memory(
        &self,
        _: vu_backend::GuestMemoryAtomic<vu_backend::GuestMemoryMmap>,
    ) -> std::io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        _: u16,
        _: vu_backend::EventSet,
        _: &[VringMutex],
        _: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

fn daemon_of(queues: usize) -> Result<VhostUserDaemon<DefaultMask>, vu_backend::DaemonError> {
    VhostUserDaemon::new(
        "vu-test".to_owned(),
        DefaultMask { queues },
        vu_backend::GuestMemoryAtomic::new(vu_backend::GuestMemoryMmap::new()),
    )
}

#[test]
fn default_mask_is_rust_vmm_s_and_serves_32_queues_on_one_thread() {
    use vu_backend::VhostUserBackend;
    assert_eq!(
        DefaultMask { queues: 1 }.queues_per_thread(),
        vec![0xffff_ffff]
    );
    let daemon = daemon_of(32).expect("32 queues fit the default mask");
    assert_eq!(daemon.get_epoll_handlers().len(), 1);
    assert_eq!(daemon.get_epoll_handlers()[0].queues().len(), 32);
}

#[test]
fn a_queue_beyond_the_default_mask_is_refused_when_the_daemon_is_built() {
    let err = daemon_of(33).unwrap_err();
    assert!(
        matches!(
            err,
            vu_backend::DaemonError::QueueWithoutThread { queue: 32 }
        ),
        "{err}"
    );
}
