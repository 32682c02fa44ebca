//! A writer for the cpio "newc" format, the one the kernel unpacks as an initramfs.
//!
//! Every entry is a 110-byte ASCII header (`070701` then thirteen 8-digit hex fields), the
//! NUL-terminated name padded to a multiple of 4 bytes, and the data padded the same way. The
//! archive ends with an entry named `TRAILER!!!`. The kernel's documentation of the format is
//! Documentation/driver-api/early-userspace/buffer-format.rst.

/// The magic of a newc header without checksums.
const MAGIC: &str = "070701";
/// File type bits of `mode`, as in `stat(2)`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFLNK: u32 = 0o120_000;

/// An archive being built in memory.
#[derive(Debug, Default)]
pub(crate) struct Archive {
    bytes: Vec<u8>,
    next_ino: u32,
}

impl Archive {
    /// An empty archive.
    pub(crate) fn new() -> Self {
        Self {
            bytes: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds a directory (`path` without a leading `/`).
    pub(crate) fn dir(&mut self, path: &str) {
        self.entry(path, S_IFDIR | 0o755, 2, (0, 0), &[]);
    }

    /// Adds a regular file with permission bits `perm`.
    pub(crate) fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data);
    }

    /// Adds a symbolic link at `path` pointing to `target` (the link's data is its target).
    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    /// Adds a character device node.
    pub(crate) fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[]);
    }

    /// Ends the archive and returns its bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.header_and_name("TRAILER!!!", 0, 1, (0, 0), 0, 0);
        self.bytes
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        // The initramfs is a few MiB; a file of 4 GiB could not be described in 8 hex digits.
        let size = u32::try_from(data.len()).expect("initramfs files are smaller than 4 GiB");
        self.header_and_name(path, mode, nlink, rdev, size, ino);
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn header_and_name(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        (rdev_major, rdev_minor): (u32, u32),
        size: u32,
        ino: u32,
    ) {
        // namesize counts the terminating NUL.
        let name_size = name.len() as u32 + 1;
        // In header order: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check. Owner root, time 0: the archive is reproducible.
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor, name_size, 0,
        ];
        self.bytes.extend_from_slice(MAGIC.as_bytes());
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
    }

    /// Pads with NULs to the next multiple of 4 bytes (the header is 110 bytes, so the name
    /// padding counts from the start of the header, which is itself 4-aligned).
    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], index: usize) -> u32 {
        let start = 6 + 8 * index;
        u32::from_str_radix(std::str::from_utf8(&header[start..start + 8]).unwrap(), 16).unwrap()
    }

    #[test]
    fn file_entry_has_newc_header_name_and_padded_data() {
        let mut archive = Archive::new();
        archive.file("init", 0o755, b"hello");
        let bytes = archive.finish();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(field(&bytes, 1), S_IFREG | 0o755);
        assert_eq!(field(&bytes, 6), 5);
        assert_eq!(field(&bytes, 11), 5);
        // 110-byte header + "init\0" = 115, padded to 116; data at 116, 5 bytes, padded to 124.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..121], b"hello");
        assert_eq!(&bytes[121..124], &[0, 0, 0]);
        assert_eq!(&bytes[124..130], b"070701");
    }

    #[test]
    fn archive_ends_with_the_trailer_entry() {
        let bytes = Archive::new().finish();
        assert_eq!(&bytes[110..121], b"TRAILER!!!\0");
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn char_device_carries_its_numbers_in_rdev() {
        let mut archive = Archive::new();
        archive.char_dev("dev/console", 0o600, 5, 1);
        let bytes = archive.finish();
        assert_eq!(field(&bytes, 1), S_IFCHR | 0o600);
        assert_eq!(field(&bytes, 9), 5);
        assert_eq!(field(&bytes, 10), 1);
    }

    #[test]
    fn symlink_stores_its_target_as_data() {
        let mut archive = Archive::new();
        archive.symlink("bin/sh", "busybox");
        let bytes = archive.finish();
        assert_eq!(field(&bytes, 1), S_IFLNK | 0o777);
        assert_eq!(field(&bytes, 6), 7);
        assert_eq!(&bytes[120..127], b"busybox");
    }

    #[test]
    fn every_entry_starts_four_byte_aligned() {
        let mut archive = Archive::new();
        archive.dir("bin");
        archive.file("bin/x", 0o644, b"abc");
        archive.file("a-longer-name", 0o644, b"");
        let bytes = archive.finish();
        let starts: Vec<usize> = bytes
            .windows(6)
            .enumerate()
            .filter(|(_, w)| *w == b"070701")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(starts.len(), 4);
        assert!(starts.iter().all(|start| start % 4 == 0));
    }
}
