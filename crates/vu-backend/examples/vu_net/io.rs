//! Where packets go on the host side: [`PacketIo`], with a loopback (what a TX queue sends
//! comes back on the paired RX queue) and a Linux tap device with a virtio-net header.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use vu_backend::vmm_sys_util::ioctl::{ioctl_with_ref, ioctl_with_val};
use vu_backend::vmm_sys_util::ioctl_iow_nr;

use crate::packet::{Backlog, Packet};
use crate::virtio_net::{
    F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, HDR_FLAGS, HDR_F_DATA_VALID, HDR_LEN,
    MAX_FRAME,
};

/// The host side of the device's queue pairs.
pub(crate) trait PacketIo: Send + Sync {
    /// The driver sent `packet` (header, then frame) on queue pair `pair`. The packet goes
    /// out, or into `backlog` for the pair's RX queue; `Err` gives it back when it could not
    /// (counted as dropped by the caller).
    fn transmit(&self, pair: usize, packet: Packet, backlog: &mut Backlog) -> Result<(), Packet>;

    /// Moves what arrived for pair `pair` into `backlog`, until it is full or nothing is
    /// left (the fd of [`ready_fd`](Self::ready_fd) is then drained, as edge-triggered
    /// polling needs).
    fn receive(&self, pair: usize, backlog: &mut Backlog) -> io::Result<()>;

    /// An fd that becomes readable when [`receive`](Self::receive) has something for `pair`.
    fn ready_fd(&self, pair: usize) -> Option<BorrowedFd<'_>>;

    /// The driver acknowledged `features`: pass the offloads it takes to the host side.
    fn set_guest_features(&self, features: u64) -> io::Result<()>;

    /// The virtio-net offload features this host side carries.
    fn offloads(&self) -> u64;

    /// Whether what a TX queue sends comes back on the paired RX queue (the loopback): the
    /// device then copies each packet from its TX chain straight into RX room.
    fn reflects(&self) -> bool {
        false
    }
}

/// What arrives on TX queue `k` goes out on RX queue `k`, header flags cleared (no offload
/// is offered, so there is nothing to carry).
#[derive(Debug, Default)]
pub(crate) struct Loopback;

impl PacketIo for Loopback {
    fn transmit(
        &self,
        _pair: usize,
        mut packet: Packet,
        backlog: &mut Backlog,
    ) -> Result<(), Packet> {
        // The driver's header describes its offloads, none negotiated; the device's own
        // header on RX starts zeroed, `num_buffers` is set on delivery.
        packet[..HDR_LEN].fill(0);
        backlog.push(packet)
    }

    fn receive(&self, _pair: usize, _backlog: &mut Backlog) -> io::Result<()> {
        Ok(())
    }

    fn ready_fd(&self, _pair: usize) -> Option<BorrowedFd<'_>> {
        None
    }

    fn set_guest_features(&self, _features: u64) -> io::Result<()> {
        Ok(())
    }

    fn offloads(&self) -> u64 {
        0
    }

    fn reflects(&self) -> bool {
        true
    }
}

/// `struct ifreq` for `TUNSETIFF`: the interface name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: u16,
    _pad: [u8; 22],
}

/// Tap flags (`include/uapi/linux/if_tun.h`).
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_VNET_HDR: u16 = 0x4000;
/// `TUNSETOFFLOAD` bits: what the kernel may hand us with a virtio-net header.
const TUN_F_CSUM: u64 = 0x01;
const TUN_F_TSO4: u64 = 0x02;
const TUN_F_TSO6: u64 = 0x04;
const TUN_F_TSO_ECN: u64 = 0x08;
/// `O_NONBLOCK` on the architectures this runs on (x86, Arm, RISC-V, POWER, s390).
const O_NONBLOCK: i32 = 0o4000;

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

/// A Linux tap device (created, or attached if it exists) with `IFF_VNET_HDR`: every
/// packet read or written starts with a 12-byte virtio-net header, so checksum and
/// segmentation offloads pass through in both directions. One tap queue (fd) per queue pair;
/// with several, the tap is a multi-queue one (`IFF_MULTI_QUEUE`), and the kernel sends a
/// flow's packets to the queue the flow last transmitted on.
#[derive(Debug)]
pub(crate) struct Tap {
    /// Queue pair `k`'s tap queue.
    files: Vec<File>,
    name: String,
    /// The features the driver acknowledged, for what its RX headers may say.
    guest_features: AtomicU64,
}

impl Tap {
    /// Opens `/dev/net/tun` `pairs` times and attaches each to (or creates) tap `name`,
    /// non-blocking, with a 12-byte vnet header and no guest offloads until the driver
    /// acknowledges some. With more than one pair the tap must be (or is made) a
    /// multi-queue one.
    pub(crate) fn open(name: &str, pairs: u16) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tap name: 1 to 15 bytes",
            ));
        }
        let multi = if pairs > 1 { IFF_MULTI_QUEUE } else { 0 };
        let files = (0..pairs)
            .map(|_| Self::open_queue(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | multi))
            .collect::<io::Result<Vec<File>>>()?;
        let tap = Tap {
            files,
            name: name.to_owned(),
            guest_features: AtomicU64::new(0),
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// One fd of tap `name`, attached with `flags`.
    // The TUN ioctls are the device's own system calls, which no framework API wraps: the
    // example keeps their `unsafe` here, one block per ioctl.
    #[allow(unsafe_code)]
    fn open_queue(name: &str, flags: u16) -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq`, which `IfReq` lays out (40 bytes, the
        // name then the flags); `req` lives across the call and `file` is an open tun fd.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETIFF(), &req) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let hdr_len = HDR_LEN as std::os::raw::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `hdr_len` is, alive across the call.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }

    /// Sets the device's offloads (one setting for the whole tap, through any of its fds).
    #[allow(unsafe_code)] // TUNSETOFFLOAD, as in `open_queue`.
    fn set_offload(&self, flags: u64) -> io::Result<()> {
        let Some(file) = self.files.first() else {
            return Ok(());
        };
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe { ioctl_with_val(file, TUNSETOFFLOAD(), flags) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl PacketIo for Tap {
    fn transmit(&self, pair: usize, packet: Packet, backlog: &mut Backlog) -> Result<(), Packet> {
        let Some(mut file) = self.files.get(pair) else {
            return Err(packet);
        };
        // A tap takes one packet per write, whole or not at all.
        let result = file.write(&packet);
        match result {
            Ok(_) => {
                backlog.recycle(packet);
                Ok(())
            }
            Err(err) => {
                if err.kind() != io::ErrorKind::WouldBlock {
                    log::debug!("tap write: {err}");
                }
                Err(packet)
            }
        }
    }

    fn receive(&self, pair: usize, backlog: &mut Backlog) -> io::Result<()> {
        let Some(mut file) = self.files.get(pair) else {
            return Ok(());
        };
        while !backlog.is_full() {
            let mut packet = backlog.buffer();
            packet.resize(HDR_LEN + MAX_FRAME, 0);
            match file.read(&mut packet) {
                Ok(n) if n >= HDR_LEN => {
                    packet.truncate(n);
                    // The header's last two bytes (`num_buffers`) are the device's; the tap
                    // leaves them as they were.
                    packet[HDR_LEN - 2..HDR_LEN].fill(0);
                    mask_rx_header(&mut packet, self.guest_features.load(Ordering::Relaxed));
                    let _ = backlog.push(packet);
                }
                Ok(_) => backlog.recycle(packet),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    backlog.recycle(packet);
                    return Ok(());
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => backlog.recycle(packet),
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    fn ready_fd(&self, pair: usize) -> Option<BorrowedFd<'_>> {
        self.files.get(pair).map(AsFd::as_fd)
    }

    fn set_guest_features(&self, features: u64) -> io::Result<()> {
        self.guest_features.store(features, Ordering::Relaxed);
        let mut flags = 0;
        if features & F_GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
            if features & F_GUEST_ECN != 0 && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                flags |= TUN_F_TSO_ECN;
            }
        }
        self.set_offload(flags)
    }

    fn offloads(&self) -> u64 {
        crate::virtio_net::TAP_OFFLOADS
    }
}

/// Clears what a driver without `VIRTIO_NET_F_GUEST_CSUM` must not see in an RX header
/// (`DATA_VALID`, which the kernel sets on packets it verified).
fn mask_rx_header(packet: &mut Packet, guest_features: u64) {
    if guest_features & F_GUEST_CSUM == 0 {
        if let Some(flags) = packet.get_mut(HDR_FLAGS) {
            *flags &= !HDR_F_DATA_VALID;
        }
    }
}
