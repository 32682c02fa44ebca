//! What the migration and restart guests' scratch disk images share: their size, 4 KiB blocks,
//! the host's marker in block 0, the host's control word in block 1 (the guest polls it with
//! O_DIRECT reads), the guest's final marker in block 2, and the guest's fill pattern.
//! Each scenario's own layout beyond those blocks is in its `image` module.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The image's size: 16 MiB.
pub(super) const IMAGE_SIZE: usize = 16 << 20;
/// The block size the guests read and write with.
pub(super) const BLOCK: usize = 4096;
/// Block 1: the host writes its stop word here.
pub(super) const CONTROL_BLOCK: u64 = 1;
/// Block 2: the guest's final marker.
pub(super) const DONE_BLOCK: usize = 2;

/// Writes the image: zeros, and `VU-E2E-HOST <nonce>` in block 0.
pub(super) fn prepare(image: &Path, nonce: &str) -> Result<(), String> {
    let mut bytes = vec![0u8; IMAGE_SIZE];
    let marker = format!("VU-E2E-HOST {nonce}");
    bytes[..marker.len()].copy_from_slice(marker.as_bytes());
    std::fs::write(image, &bytes).map_err(|err| format!("cannot write {}: {err}", image.display()))
}

/// `count` bytes of `line` repeated, as busybox `yes line | head -c count` writes them.
pub(super) fn repeated(line: &str, count: usize) -> Vec<u8> {
    format!("{line}\n").bytes().cycle().take(count).collect()
}

/// Writes `word` (zero padded) into the control block of a running guest's image.
pub(super) fn write_control_word(image: &Path, word: &str) -> Result<(), String> {
    let mut control = vec![0u8; BLOCK];
    control[..word.len()].copy_from_slice(word.as_bytes());
    File::options()
        .write(true)
        .open(image)
        .and_then(|file| file.write_all_at(&control, CONTROL_BLOCK * BLOCK as u64))
        .map_err(|err| format!("cannot write the control block: {err}"))
}
