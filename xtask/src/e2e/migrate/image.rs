//! The migration guest's disk image: its layout (tests/e2e/migrate.sh has the same table), the
//! host's writes before and during a boot, and its check after power-off.

use std::path::Path;

pub(super) use crate::e2e::disk::prepare;
use crate::e2e::disk::{repeated, write_control_word, BLOCK, DONE_BLOCK};

/// Blocks 64..80: the guest's O_DIRECT block of round `r` is in slot `r % 16`.
const DIRECT_SLOTS_AT: usize = 64;
const SLOTS: u64 = 16;
/// The regions the guest fills in turn and reads through its page cache: round `r` fills
/// region `r % 16`, from 1 MiB on.
const REGIONS_AT: usize = 1 << 20;
const REGIONS: u64 = 16;
const REGION_LEN: usize = 512 << 10;
/// The guest's 64 KiB buffered writes: slot `r % 16` from 10 MiB.
const BUFFERED_AT: usize = 10 << 20;
const BUFFERED_LEN: usize = 64 << 10;

/// The image after power-off: the final marker and the last rounds' blocks, slots and
/// regions.
pub(super) fn check(image: &Path, nonce: &str, rounds: u64) -> Result<(), String> {
    let bytes =
        std::fs::read(image).map_err(|err| format!("cannot read {}: {err}", image.display()))?;
    let block = |index: usize| -> &[u8] {
        let at = index * BLOCK;
        bytes.get(at..at + BLOCK).unwrap_or(&[])
    };
    let holds = |data: &[u8], text: &str| {
        data.starts_with(text.as_bytes()) && data[text.len()..].iter().all(|&b| b == 0)
    };
    let done = format!("VU-MIG-DONE {nonce} {rounds}");
    if !holds(block(DONE_BLOCK), &done) {
        return Err(format!("after power-off the image lacks `{done}`"));
    }
    for round in rounds.saturating_sub(SLOTS - 1).max(1)..=rounds {
        let slot = (round % SLOTS) as usize;
        let mark = format!("VU-MIG-D {nonce} {round}");
        if !holds(block(DIRECT_SLOTS_AT + slot), &mark) {
            return Err(format!("after power-off the image lacks `{mark}`"));
        }
        let at = BUFFERED_AT + slot * BUFFERED_LEN;
        let want = repeated(&format!("VU-MIG-B {nonce} {round}"), BUFFERED_LEN);
        if bytes.get(at..at + BUFFERED_LEN) != Some(&want[..]) {
            return Err(format!(
                "after power-off the buffered slot {slot} lacks round {round}'s lines"
            ));
        }
    }
    for round in rounds.saturating_sub(REGIONS - 1).max(1)..=rounds {
        let region = (round % REGIONS) as usize;
        let at = REGIONS_AT + region * REGION_LEN;
        let want = repeated(&format!("VU-MIG-P {nonce} {round}"), REGION_LEN);
        if bytes.get(at..at + REGION_LEN) != Some(&want[..]) {
            return Err(format!(
                "after power-off region {region} lacks round {round}'s lines"
            ));
        }
    }
    Ok(())
}

/// Writes `VU-MIG-MOVED <nonce> <k>` into the control block: after its round, the guest
/// checks every region from its page cache and says `VU-MIG-CHECKED <nonce> <k>`.
pub(super) fn write_moved_word(image: &Path, nonce: &str, migration: u32) -> Result<(), String> {
    write_control_word(image, &format!("VU-MIG-MOVED {nonce} {migration}"))
}

/// Writes `VU-MIG-STOP <nonce>` into the control block: the guest finishes after its round.
pub(super) fn write_stop_word(image: &Path, nonce: &str) -> Result<(), String> {
    write_control_word(image, &format!("VU-MIG-STOP {nonce}"))
}
