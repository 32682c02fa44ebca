//! The guest's virtqueues read straight from its RAM, while QEMU and the backend run.
//!
//! QEMU backs the guest's RAM with a file in /dev/shm (`memory-backend-file`, `share=on`,
//! the whole RAM as NUMA node 0 from guest physical address 0), so the harness reads the
//! available and used indices with `pread` at the ring addresses, without stopping
//! anything. The addresses come from QMP `x-query-virtio-vhost-queue-status`, which reads
//! QEMU's copy of them; `x-query-virtio-queue-status` must not be used on a started vhost
//! device: in QEMU 7.2 it asks the backend for the ring base, which stops the ring.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::super::json::{quote, Json};
use super::super::monitor::Qmp;

/// Where one split ring lives in guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ring {
    avail: u64,
    used: u64,
}

/// The indices of one ring at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Indices {
    /// `avail.idx`: requests the guest has made available.
    pub(super) avail: u16,
    /// `used.idx`: requests the device has completed.
    pub(super) used: u16,
}

impl Indices {
    /// Requests made available and not completed.
    pub(super) fn outstanding(self) -> u16 {
        self.avail.wrapping_sub(self.used)
    }
}

/// The rings of the guest's virtio-blk device.
#[derive(Debug)]
pub(super) struct Rings {
    memory: File,
    rings: Vec<Ring>,
}

impl Rings {
    /// Finds the virtio-blk device and its queues' ring addresses through QMP; `memory` is the
    /// file behind the guest's RAM.
    pub(super) fn locate(qmp: &mut Qmp, memory: File) -> Result<Rings, String> {
        let devices = qmp.execute("x-query-virtio", None)?;
        let path = devices
            .as_array()
            .unwrap_or_default()
            .iter()
            .find(|device| device.get("name").and_then(Json::as_str) == Some("virtio-blk"))
            .and_then(|device| device.get("path").and_then(Json::as_str))
            .ok_or_else(|| format!("no virtio-blk device in x-query-virtio: {devices:?}"))?
            .to_owned();
        let arguments = format!("{{\"path\": {}}}", quote(&path));
        let status = qmp.execute("x-query-virtio-status", Some(&arguments))?;
        if status.get("vhost-started") != Some(&Json::Bool(true)) {
            return Err(format!("{path}: vhost not started: {status:?}"));
        }
        let queues = status.get("num-vqs").and_then(Json::as_u64).unwrap_or(0);
        let mut rings = Vec::new();
        for queue in 0..queues {
            let arguments = format!("{{\"path\": {}, \"queue\": {queue}}}", quote(&path));
            let ring = qmp.execute("x-query-virtio-vhost-queue-status", Some(&arguments))?;
            let field = |name| ring.get(name).and_then(Json::as_u64).unwrap_or(0);
            let (avail, used) = (field("avail-phys"), field("used-phys"));
            if avail == 0 || used == 0 {
                return Err(format!("{path} queue {queue} not set up: {ring:?}"));
            }
            rings.push(Ring { avail, used });
        }
        if rings.is_empty() {
            return Err(format!("{path} has no queues: {status:?}"));
        }
        Ok(Rings { memory, rings })
    }

    /// The indices of every ring now. Each index is one aligned 16-bit store by its writer;
    /// the two of a ring are read a few microseconds apart, the used index first: the
    /// available index only grows, and never trails the used index at any instant, so the
    /// later reading of it cannot trail the earlier reading of the used index (read the other
    /// way round, completions in between made `avail - used` wrap).
    pub(super) fn read(&self) -> Result<Vec<Indices>, String> {
        self.rings
            .iter()
            .map(|ring| {
                let used = self.u16_at(ring.used + 2)?;
                let avail = self.u16_at(ring.avail + 2)?;
                Ok(Indices { avail, used })
            })
            .collect()
    }

    fn u16_at(&self, addr: u64) -> Result<u16, String> {
        let mut bytes = [0u8; 2];
        self.memory
            .read_exact_at(&mut bytes, addr)
            .map_err(|err| format!("cannot read guest memory at {addr:#x}: {err}"))?;
        Ok(u16::from_le_bytes(bytes))
    }
}

/// The rings in one line: `q0 avail 812 used 809 (3 outstanding), q1 ...`.
pub(super) fn describe(indices: &[Indices]) -> String {
    let queues: Vec<String> = indices
        .iter()
        .enumerate()
        .map(|(queue, ring)| {
            format!(
                "q{queue} avail {} used {} ({} outstanding)",
                ring.avail,
                ring.used,
                ring.outstanding()
            )
        })
        .collect();
    queues.join(", ")
}

/// Requests outstanding on all rings together.
pub(super) fn total_outstanding(indices: &[Indices]) -> u32 {
    indices
        .iter()
        .map(|ring| u32::from(ring.outstanding()))
        .sum()
}

/// Whether any ring's used index moved since `before`: the device completed a request.
pub(super) fn completed_since(before: &[Indices], now: &[Indices]) -> bool {
    before
        .iter()
        .zip(now)
        .any(|(before, now)| before.used != now.used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outstanding_requests_wrap_with_the_indices() {
        let ring = Indices {
            avail: 3,
            used: 65534,
        };
        assert_eq!(ring.outstanding(), 5);
        let rings = [ring, Indices { avail: 7, used: 7 }];
        assert_eq!(total_outstanding(&rings), 5);
        assert_eq!(
            describe(&rings),
            "q0 avail 3 used 65534 (5 outstanding), q1 avail 7 used 7 (0 outstanding)"
        );
        let later = [ring, Indices { avail: 9, used: 8 }];
        assert!(completed_since(&rings, &later));
        assert!(!completed_since(&rings, &rings));
    }

    #[test]
    fn ring_indices_are_read_at_the_ring_addresses() {
        let path = std::env::temp_dir().join(format!("vu-rings-{}", std::process::id()));
        let mut bytes = vec![0u8; 0x3000];
        bytes[0x1002..0x1004].copy_from_slice(&40u16.to_le_bytes());
        bytes[0x2002..0x2004].copy_from_slice(&37u16.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let rings = Rings {
            memory: File::open(&path).unwrap(),
            rings: vec![Ring {
                avail: 0x1000,
                used: 0x2000,
            }],
        };
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            rings.read().unwrap(),
            [Indices {
                avail: 40,
                used: 37
            }]
        );
    }
}
