//! A device thread that touches guest memory not there yet, during postcopy, waits until the
//! frontend places the page, then goes on: what QEMU does for a backend's faults
//! (`vhost_user_postcopy_fault_handler`), played by the test over the userfaultfd the backend
//! handed out on `POSTCOPY_ADVISE`.

#![allow(clippy::unwrap_used)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};

use userfaultfd::{Event, Uffd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vu_proto::fd::BorrowFd;
use vu_proto::features::{ProtocolFeatures, VirtioFeatures};
use vu_vring::VringMutex;

use crate::backend::VhostUserBackend;
use crate::daemon::VhostUserDaemon;
use crate::process::process_queue;
use crate::testing::{socket_pair, wait_readable, Buf, DriverMemory, SplitQueue, DEVICE_TIMEOUT};

const PAGE: u64 = 4096;
const FILL: u8 = 0xAB;

/// Fills every writable buffer with [`FILL`].
struct Filler;

impl VhostUserBackend for Filler {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        (VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES).bits()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK | ProtocolFeatures::PAGEFAULT
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        Ok(())
    }

    fn handle_event(&self, q: u16, _: EventSet, vrings: &[VringMutex], _: usize) -> io::Result<()> {
        process_queue(&vrings[usize::from(q)], |chain| {
            let mut written = 0;
            for desc in chain.clone().writable() {
                let bytes = vec![FILL; desc.len() as usize];
                if chain.memory().write_slice(&bytes, desc.addr()).is_ok() {
                    written += desc.len();
                }
            }
            written
        });
        Ok(())
    }
}

/// Drops the pages of `memory` in `start..start + len` (guest addresses, page aligned) from
/// the memfd, as QEMU discards the pages a postcopy destination has not received: a mapping
/// registered with a userfaultfd then faults on them.
fn discard(memory: &DriverMemory, start: GuestAddress, len: u64) {
    let offset = start.0 - memory.region().guest_phys_addr;
    let fd = memory.fd().as_raw_fd();
    // The test's own helper: fallocate takes no pointers; the fd is the driver's memfd and the
    // range lies inside it.
    #[allow(unsafe_code)]
    // SAFETY: see above; punching a hole changes no mapping, the pages read back as missing.
    let rc = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            i64::try_from(offset).unwrap(),
            i64::try_from(len).unwrap(),
        )
    };
    assert_eq!(rc, 0, "fallocate: {}", io::Error::last_os_error());
}

#[test]
fn a_device_write_to_a_page_not_yet_placed_waits_for_the_frontend_to_place_it() {
    let mut daemon = VhostUserDaemon::new(
        "postcopy-fault".to_owned(),
        Filler,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let (device_end, mut fe) = socket_pair();
    daemon.start_connection(device_end).unwrap();

    fe.set_owner().unwrap();
    let features = VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES;
    assert!(fe.get_features().unwrap().contains(features));
    fe.set_features(features).unwrap();
    let protocol = ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK | ProtocolFeatures::PAGEFAULT;
    assert!(fe.get_protocol_features().unwrap().contains(protocol));
    fe.set_protocol_features(protocol).unwrap();

    // QEMU's order on the destination: ADVISE, LISTEN, then the memory table, whose reply
    // carries the backend's own addresses (QEMU acknowledges it).
    let uffd = fe.postcopy_advise().unwrap();
    fe.postcopy_listen().unwrap();
    let mut memory = DriverMemory::new(4 << 20);
    let table = fe
        .set_mem_table_postcopy(&[memory.region()], &[memory.fd()])
        .unwrap();
    let local_base = table.regions[0].user_addr;
    let mut queue = SplitQueue::new(&mut memory, 0, 16);
    fe.set_vring_num(0, 16).unwrap();
    fe.set_vring_addr(&queue.vring_addr()).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, Some(queue.call.borrow_fd())).unwrap();
    fe.set_vring_kick(0, Some(queue.kick.borrow_fd())).unwrap();
    fe.set_vring_enable(0, true).unwrap();

    // Two chains with one writable buffer each; the second one's page is then dropped, as if
    // never received (the first buffer shares its page with the rings, which stay).
    let first = queue.post(&[Buf::Writable(64)]);
    let head = queue.post(&[Buf::Writable(64)]);
    let (desc_table, avail, used) = queue.ring_addrs();
    let buffer: u64 = memory
        .mem()
        .read_obj(desc_table.unchecked_add(16 * u64::from(head)))
        .unwrap();
    let page = GuestAddress(buffer - buffer % PAGE);
    assert_eq!(
        (buffer + 63) / PAGE,
        page.0 / PAGE,
        "the buffer spans two pages"
    );
    for ring in [desc_table, avail, used] {
        assert_ne!(
            ring.0 / PAGE,
            page.0 / PAGE,
            "the buffer shares a page with a ring"
        );
    }
    discard(&memory, page, PAGE);
    queue.kick();

    // The device's worker faults on the page: the fault arrives on the userfaultfd at the
    // backend's address of that page, and no used entry can appear before it is placed.
    let uffd = unsafe_uffd(uffd);
    assert!(
        wait_readable(uffd.as_fd(), DEVICE_TIMEOUT),
        "the device did not fault on the missing page"
    );
    let Some(Event::Pagefault { addr, .. }) = uffd.read_event().unwrap() else {
        panic!("not a page fault");
    };
    let backend_page = local_base + (page.0 - memory.region().guest_phys_addr);
    let fault = addr as u64;
    assert!(
        (backend_page..backend_page + PAGE).contains(&fault),
        "fault at {fault:#x}, the buffer's page is at {backend_page:#x} in the backend"
    );
    let before = queue.poll_used();
    assert!(
        before.iter().all(|used| used.head == first),
        "the chain completed before its page was placed"
    );

    // Place the page (zeros, as the source had them) and wake the device's thread.
    let zeros = vec![0u8; PAGE as usize];
    place(&uffd, &zeros, backend_page);
    let mut done = before;
    done.extend(queue.wait_used(2 - done.len(), DEVICE_TIMEOUT));
    let last = done.iter().find(|used| used.head == head).unwrap();
    assert_eq!(last.len, 64);
    assert_eq!(last.written, vec![vec![FILL; 64]]);

    fe.postcopy_end().unwrap();
    daemon.stop().unwrap();
}

/// The userfaultfd returned by `POSTCOPY_ADVISE`, as the `userfaultfd` crate's handle.
fn unsafe_uffd(fd: std::os::fd::OwnedFd) -> Uffd {
    #[allow(unsafe_code)]
    // SAFETY: `fd` is an open userfaultfd (the backend's, duplicated for the frontend) whose
    // ownership moves into the handle.
    unsafe {
        Uffd::from_raw_fd(fd.into_raw_fd())
    }
}

/// `UFFDIO_COPY` of `data` (one page) to the backend's page at `dst`, waking its waiter.
fn place(uffd: &Uffd, data: &[u8], dst: u64) {
    #[allow(unsafe_code)]
    // SAFETY: `data` is a live buffer of one page; `dst` is a page of a mapping registered
    // with this userfaultfd (the backend's mapping of the test's memfd, alive until the daemon
    // stops), and the kernel checks both.
    let copied = unsafe {
        uffd.copy(
            data.as_ptr().cast(),
            dst as *mut libc::c_void,
            data.len(),
            true,
        )
    }
    .unwrap();
    assert_eq!(copied, data.len());
}
