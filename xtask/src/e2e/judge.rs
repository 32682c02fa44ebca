//! The verdict on a boot whose QEMU exited: the guest's own lines on the console, then the
//! host's check of the files after power-off. Every failure is classified ([`Failure`]).

use std::path::Path;

use super::boot::{guest_marker, pass_marker, sha256, Device, Files, Spec, GUEST_BLOCK};
use super::net;
use super::progress::{Class, Failure};

/// QEMU exited without this boot's success line: a kernel panic (the console says so), or
/// init or QEMU ending early.
pub(crate) fn no_verdict(console: &str) -> Failure {
    match console.lines().find(|line| line.contains("Kernel panic")) {
        Some(line) => Failure::new(Class::Crash, format!("guest: {}", line.trim())),
        None => Failure::new(
            Class::Crash,
            "QEMU exited without the success marker with this boot's nonce on the console",
        ),
    }
}

/// Decides a boot from the console and the files: `Err(reason)` on failure.
pub(crate) fn judge(spec: &Spec, nonce: &str, console: &str, files: &Files) -> Result<(), Failure> {
    if let Some(line) = console.lines().find(|line| line.contains("VU-E2E-FAIL")) {
        return Err(Failure::new(
            Class::WrongAnswer,
            format!("guest: {}", line.trim()),
        ));
    }
    let pass = pass_marker(spec.device, nonce);
    let Some(pass_line) = console.lines().find(|line| line.contains(&pass)) else {
        return Err(no_verdict(console));
    };
    check_after_power_off(spec, nonce, pass_line, console, files)
        .map_err(|reason| Failure::new(Class::WrongAnswer, reason))
}

/// The host's own check once the guest has passed: the queue count it saw, and the data.
fn check_after_power_off(
    spec: &Spec,
    nonce: &str,
    pass_line: &str,
    console: &str,
    files: &Files,
) -> Result<(), String> {
    let (image, rng_source) = (&files.image, &files.rng_source);
    // The guest counted the devices that negotiated packed rings (one here).
    if spec.packed && !pass_line.contains(" packed=1") {
        return Err(format!(
            "guest did not confirm packed rings: {}",
            pass_line.trim()
        ));
    }
    // The guest found the device in an IOMMU group, with the DMAR driver's lines in dmesg.
    if spec.iommu && !pass_line.contains(" iommu_group=") {
        return Err(format!(
            "guest did not confirm the device behind the IOMMU: {}",
            pass_line.trim()
        ));
    }
    match spec.device {
        Device::Blk => {
            check_queues(spec, pass_line)?;
            let bytes = std::fs::read(image)
                .map_err(|err| format!("cannot read {}: {err}", image.display()))?;
            check_guest_markers(&bytes, nonce, spec.cpus)
        }
        Device::Rng => {
            let source = std::fs::read(rng_source)
                .map_err(|err| format!("cannot read {}: {err}", rng_source.display()))?;
            check_rng(console, nonce, &source)
        }
        Device::Net => {
            check_queues(spec, pass_line)?;
            check_upload(console, nonce, &files.upload)
        }
    }
}

/// Every one of `pairs` queue pairs carried packets both ways: `vu_net`'s stop summary in
/// `backend_log` has `pair K: tx N packets ..., rx M packets ...` with N and M above 0.
pub(crate) fn check_pairs(backend_log: &str, pairs: u16) -> Result<(), String> {
    let count = |line: &str, tag: &str| -> Option<u64> {
        let (_, rest) = line.split_once(tag)?;
        rest.split_whitespace().next()?.parse().ok()
    };
    for pair in 0..pairs {
        let prefix = format!("pair {pair}: ");
        let line = backend_log
            .lines()
            .find(|line| line.contains(&prefix))
            .ok_or_else(|| format!("the backend's log has no summary of queue pair {pair}"))?;
        let (tx, rx) = (count(line, ": tx "), count(line, ", rx "));
        if !matches!((tx, rx), (Some(tx), Some(rx)) if tx > 0 && rx > 0) {
            return Err(format!(
                "queue pair {pair} did not carry packets both ways: {}",
                line.trim()
            ));
        }
    }
    Ok(())
}

/// What QEMU asked of a net boot's backend beside the rings reached it: `NET_SET_MTU` with the
/// device's `host_mtu` (`vu_net` logs `MTU N`), and, when the harness had QEMU announce the
/// guest (`announced`, the monitor's answer), `SEND_RARP` (`vu_net` logs `broadcast a RARP
/// for MAC`).
pub(crate) fn check_net_requests(
    backend_log: &str,
    announced: Option<Result<(), String>>,
) -> Result<(), String> {
    let mtu = format!("MTU {}", super::boot::NET_MTU);
    if !backend_log.lines().any(|line| line.ends_with(&mtu)) {
        return Err(format!(
            "the backend's log has no `{mtu}`: QEMU's NET_SET_MTU (host_mtu) did not reach it"
        ));
    }
    match announced {
        None => Err(
            "the guest's interface never appeared, so QEMU was not asked to announce it".to_owned(),
        ),
        Some(Err(err)) => Err(format!("QEMU's announce-self failed: {err}")),
        Some(Ok(())) if backend_log.contains("broadcast a RARP for ") => Ok(()),
        Some(Ok(())) => Err(
            "QEMU announced the guest, but the backend's log has no `broadcast a RARP for`: \
             SEND_RARP did not reach it"
                .to_owned(),
        ),
    }
}

/// The guest's success line names the queue count the run asked for (`queues=N`).
fn check_queues(spec: &Spec, pass_line: &str) -> Result<(), String> {
    if pass_line.contains(&format!("queues={}", spec.queues)) {
        Ok(())
    } else {
        Err(format!(
            "guest saw another queue count: {}",
            pass_line.trim()
        ))
    }
}

/// The upload the host's peer received is [`net::BYTES`] long and has the sha256 the guest
/// computed before sending it (`VU-E2E-NET <nonce> up=<sha256> down=<bytes>`).
fn check_upload(console: &str, nonce: &str, upload: &Path) -> Result<(), String> {
    let tag = format!("VU-E2E-NET {nonce} up=");
    let guest_sum = console
        .lines()
        .find_map(|line| line.split_once(&tag).map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| "no VU-E2E-NET line with this boot's nonce".to_owned())?;
    let len = std::fs::metadata(upload)
        .map_err(|err| {
            format!(
                "the host's peer stored no upload ({}): {err}",
                upload.display()
            )
        })?
        .len();
    if len != net::BYTES as u64 {
        return Err(format!(
            "the host's peer received {len} bytes, the guest sent {}",
            net::BYTES
        ));
    }
    let host_sum = sha256(upload)?;
    if host_sum != guest_sum {
        return Err(format!(
            "upload: the guest sent sha256 {guest_sum}, the host received sha256 {host_sum}"
        ));
    }
    Ok(())
}

/// The image holds each vCPU's marker in its block, followed by NULs.
pub(crate) fn check_guest_markers(image: &[u8], nonce: &str, cpus: u16) -> Result<(), String> {
    for cpu in 0..cpus {
        let marker = guest_marker(nonce, cpu);
        let at = GUEST_BLOCK * (1 + usize::from(cpu));
        let block = image
            .get(at..at + GUEST_BLOCK)
            .ok_or_else(|| "image too short".to_owned())?;
        let ok =
            block.starts_with(marker.as_bytes()) && block[marker.len()..].iter().all(|&b| b == 0);
        if !ok {
            let shown = String::from_utf8_lossy(&block[..64.min(block.len())]).into_owned();
            return Err(format!(
                "after power-off the image lacks `{marker}` at {at}: {shown:?}"
            ));
        }
    }
    Ok(())
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The bytes the guest read from /dev/hwrng are one contiguous run of the backend's source.
pub(crate) fn check_rng(console: &str, nonce: &str, source: &[u8]) -> Result<(), String> {
    let tag = format!("VU-E2E-RNG {nonce} ");
    let hex = console
        .lines()
        .find_map(|line| line.split_once(&tag).map(|(_, rest)| rest.trim()))
        .ok_or_else(|| "no VU-E2E-RNG line with this boot's nonce".to_owned())?;
    let got = decode_hex(hex).ok_or_else(|| format!("bad hex from the guest: {hex}"))?;
    if got.is_empty() {
        return Err("the guest read no bytes".to_owned());
    }
    match source.windows(got.len()).position(|window| window == got) {
        Some(_) => Ok(()),
        None => Err(format!(
            "the {} bytes the guest read are not a run of the backend's source",
            got.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::boot::{files_in, pattern, Backend};
    use crate::e2e::progress::Deadlines;
    use std::path::PathBuf;

    fn spec(device: Device, queues: u16) -> Spec {
        Spec {
            device,
            backend: Backend::Qsd,
            queues,
            cpus: queues,
            packed: false,
            iommu: false,
            dir: PathBuf::from("/nonexistent"),
            deadlines: Deadlines::UNCALIBRATED,
        }
    }

    fn files() -> Files {
        files_in(Path::new("/nonexistent"), Path::new("/s"))
    }

    #[test]
    fn net_upload_must_have_the_guests_length_and_sum() {
        let dir = std::env::temp_dir().join(format!("vu-judge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let upload = dir.join("up.bin");
        std::fs::write(&upload, pattern(3, net::BYTES)).unwrap();
        let sum = sha256(&upload).unwrap();
        let console = format!("VU-E2E-NET n up={sum} down=4194304\n");
        check_upload(&console, "n", &upload).unwrap();
        assert!(check_upload(&console, "m", &upload).is_err());
        std::fs::write(&upload, pattern(4, net::BYTES)).unwrap();
        let err = check_upload(&console, "n", &upload).unwrap_err();
        assert!(err.contains("upload: the guest sent sha256"), "{err}");
        std::fs::write(&upload, b"short").unwrap();
        let err = check_upload(&console, "n", &upload).unwrap_err();
        assert!(err.contains("received 5 bytes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_pair_must_carry_packets_both_ways() {
        let log = "vu_net: info: pair 0: tx 435 packets (4223118 bytes, 0 bad chains, 0 dropped), \
                   rx 399 packets (4222246 bytes, 0 bad chains, 0 too big)\n\
                   vu_net: info: pair 1: tx 3 packets (180 bytes, 0 bad chains, 0 dropped), \
                   rx 0 packets (0 bytes, 0 bad chains, 0 too big)\n";
        check_pairs(log, 1).unwrap();
        let err = check_pairs(log, 2).unwrap_err();
        assert!(err.contains("queue pair 1 did not carry"), "{err}");
        let first = log.lines().next().unwrap_or_default();
        let err = check_pairs(first, 2).unwrap_err();
        assert!(err.contains("no summary of queue pair"), "{err}");
    }

    #[test]
    fn a_net_boot_needs_the_mtu_and_the_announcement_in_the_backend_log() {
        let both = "vu_net: info: MTU 1500\nvu_net: info: broadcast a RARP for 52:54:00:12:34:56\n";
        check_net_requests(both, Some(Ok(()))).unwrap();
        let no_rarp = "vu_net: info: MTU 1500\n";
        let err = check_net_requests(no_rarp, Some(Ok(()))).unwrap_err();
        assert!(err.contains("SEND_RARP did not reach it"), "{err}");
        let err = check_net_requests(both, Some(Err("no monitor".to_owned()))).unwrap_err();
        assert!(err.contains("announce-self failed: no monitor"), "{err}");
        let err = check_net_requests(both, None).unwrap_err();
        assert!(err.contains("never appeared"), "{err}");
        let no_mtu = "vu_net: info: broadcast a RARP for 52:54:00:12:34:56\n";
        let err = check_net_requests(no_mtu, Some(Ok(()))).unwrap_err();
        assert!(err.contains("NET_SET_MTU"), "{err}");
    }

    #[test]
    fn missing_success_marker_fails_even_without_fail_line() {
        let err = judge(
            &spec(Device::Rng, 1),
            "abc",
            "VU-E2E-PASS rng stale\n",
            &files(),
        )
        .unwrap_err();
        assert_eq!(err.class, Class::Crash);
        assert!(err.reason.contains("nonce"), "{err}");
    }

    #[test]
    fn a_kernel_panic_is_named_as_the_crash() {
        let console = "[    0.9] Kernel panic - not syncing: IO-APIC + timer doesn't work!
";
        let err = judge(&spec(Device::Blk, 1), "abc", console, &files()).unwrap_err();
        assert_eq!(err.class, Class::Crash);
        assert!(err.reason.contains("IO-APIC + timer"), "{err}");
    }

    #[test]
    fn fail_line_wins_over_pass_line() {
        let console = "VU-E2E-FAIL blk sector 0\nVU-E2E-PASS blk abc queues=1\n";
        let err = judge(&spec(Device::Blk, 1), "abc", console, &files()).unwrap_err();
        assert_eq!(err.class, Class::WrongAnswer);
        assert!(err.reason.contains("sector 0"), "{err}");
    }

    #[test]
    fn guest_markers_are_found_per_cpu() {
        let mut image = vec![0u8; 4 * GUEST_BLOCK];
        for cpu in 0..2u16 {
            let marker = guest_marker("n1", cpu);
            let at = GUEST_BLOCK * (1 + usize::from(cpu));
            image[at..at + marker.len()].copy_from_slice(marker.as_bytes());
        }
        check_guest_markers(&image, "n1", 2).unwrap();
        assert!(check_guest_markers(&image, "n2", 1).is_err());
        assert!(check_guest_markers(&image, "n1", 3).is_err());
    }

    #[test]
    fn rng_bytes_must_be_a_run_of_the_source() {
        let source = pattern(1, 4096);
        let hex: String = source[100..164]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let console = format!("[    1.0] VU-E2E-RNG n {hex}\n");
        check_rng(&console, "n", &source).unwrap();
        let mut other = source.clone();
        other[120] ^= 1;
        assert!(check_rng(&console, "n", &other).is_err());
        assert!(check_rng(&console, "m", &source).is_err());
    }
}
