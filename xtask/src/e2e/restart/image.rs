//! The restart guest's disk image: its layout (tests/e2e/restart.sh has the same table), the
//! host's writes before and during a boot, and its check after power-off.

use std::path::Path;

pub(super) use crate::e2e::disk::prepare;
use crate::e2e::disk::{repeated, write_control_word, BLOCK, DONE_BLOCK, IMAGE_SIZE};

/// Worker `w`'s region starts at `(REGION_FIRST + w) * REGION`.
const REGION: usize = 512 << 10;
const REGION_FIRST: usize = 2;
/// The regions that fit after the first one.
pub(super) const MAX_WORKERS: u32 = (IMAGE_SIZE / REGION - REGION_FIRST) as u32;

/// The image after power-off: the final marker names each worker's last round, and each
/// region holds that round's lines. Returns the rounds, summed over the workers.
pub(super) fn check(image: &Path, nonce: &str, workers: u32) -> Result<u64, String> {
    let bytes =
        std::fs::read(image).map_err(|err| format!("cannot read {}: {err}", image.display()))?;
    let done = bytes
        .get(DONE_BLOCK * BLOCK..(DONE_BLOCK + 1) * BLOCK)
        .unwrap_or(&[]);
    let text: String = done
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| char::from(b))
        .collect();
    let prefix = format!("VU-RS-DONE {nonce} ");
    let rounds: Vec<u64> = text
        .strip_prefix(&prefix)
        .map(|rest| rest.split(' ').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    if rounds.len() != workers as usize {
        return Err(format!(
            "after power-off block {DONE_BLOCK} holds `{text}`, not `{prefix}` and {workers} \
             round counts"
        ));
    }
    for (worker, &round) in rounds.iter().enumerate() {
        let at = (REGION_FIRST + worker) * REGION;
        let want = repeated(&format!("VU-RS {nonce} w{worker} r{round}"), REGION);
        if bytes.get(at..at + REGION) != Some(&want[..]) {
            return Err(format!(
                "after power-off worker {worker}'s region at {at:#x} lacks its round {round}'s \
                 lines"
            ));
        }
    }
    Ok(rounds.iter().sum())
}

/// Writes `VU-RS-STOP <nonce>` into the control block: the guest's workers finish their round
/// and the guest checks everything once more.
pub(super) fn write_stop_word(image: &Path, nonce: &str) -> Result<(), String> {
    write_control_word(image, &format!("VU-RS-STOP {nonce}"))
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn an_image_the_guest_finished_passes_and_a_stale_region_fails() {
        let path = std::env::temp_dir().join(format!("vu-rs-image-{}", std::process::id()));
        prepare(&path, "n1").unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        let done = b"VU-RS-DONE n1 4 7";
        file.write_all_at(done, (DONE_BLOCK * BLOCK) as u64)
            .unwrap();
        for (worker, round) in [(0usize, 4u64), (1, 7)] {
            let lines = repeated(&format!("VU-RS n1 w{worker} r{round}"), REGION);
            let at = (REGION_FIRST + worker) * REGION;
            file.write_all_at(&lines, at as u64).unwrap();
        }
        assert_eq!(check(&path, "n1", 2), Ok(11));
        assert!(check(&path, "n1", 3).is_err());
        let stale = repeated("VU-RS n1 w1 r6", REGION);
        file.write_all_at(&stale, ((REGION_FIRST + 1) * REGION) as u64)
            .unwrap();
        let err = check(&path, "n1", 2).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("worker 1"), "{err}");
    }
}
