//! Test harness for hotcopy's integration tests.
//!
//! [`on_reactor`] runs a test body on a fresh thread with its own reactor, so
//! the body can create channels and pollers and step the data path
//! deterministically with `poll_once`. [`scratch_dir`] gives a temporary
//! directory on a filesystem that accepts `O_DIRECT` (not tmpfs).

use std::path::PathBuf;

use hotcopy_runtime::{clear_current, IdlePolicy, Reactor};

pub use hotcopy_bdev::testing::*;

/// Runs `f` on a new thread that owns a reactor (core index 0), and returns
/// its result. Panics in `f` fail the calling test.
pub fn on_reactor<T: Send + 'static>(f: impl FnOnce(&Reactor) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let r = Reactor::new(0, IdlePolicy::Poll);
        let out = f(&r);
        drop(r);
        clear_current();
        out
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A temporary directory under /var/tmp (disk-backed, so O_DIRECT works).
pub fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("HOTCOPY_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix("hotcopy-test-")
        .tempdir_in(base)
        .expect("create scratch dir")
}
