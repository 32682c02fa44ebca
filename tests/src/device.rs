//! Setting up a device over a vu-proto `Frontend`, as QEMU does (the facade's test kit,
//! [`vu_backend::testing`], re-exported), and short socket paths for tests.

use std::path::PathBuf;

use vmm_sys_util::tempdir::TempDir;

pub use vu_backend::testing::{DeviceSetup, TestDevice, DEVICE_TIMEOUT};

/// A socket path in a fresh directory under `/tmp` (short enough for `sun_path`); the
/// directory is removed when the returned [`TempDir`] is dropped.
pub fn socket_path() -> (TempDir, PathBuf) {
    let dir = TempDir::new_with_prefix("/tmp/vu-").expect("temp dir");
    let path = dir.as_path().join("s.sock");
    assert!(path.as_os_str().len() < 100, "socket path too long");
    (dir, path)
}
