//! What the CLI tests share: running the real binary, checking its exit code
//! and output, scratch directories and source files.
//!
//! Each test file takes what it needs (`mod common;`), so not every item is
//! used by every test crate.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_hotcopy");

/// Runs `hotcopy ARGS` with quiet logging and no daemon socket from the
/// environment; (exit code, stdout, stderr). Fails the test if it panicked.
pub fn hotcopy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("HOTCOPY_LOG", "warn")
        .env_remove("HOTCOPY_RPC_SOCKET")
        .output()
        .expect("run hotcopy");
    let (code, out, err) = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !err.contains("panicked"),
        "hotcopy {args:?} panicked:\n{err}"
    );
    (code, out, err)
}

/// `hotcopy ARGS` that must succeed; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let (code, out, err) = hotcopy(args);
    assert_eq!(code, 0, "hotcopy {args:?}\nstdout: {out}\nstderr: {err}");
    out
}

/// `hotcopy ARGS` that must succeed and print one JSON value; returns it.
pub fn ok_parsed(args: &[&str]) -> Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("hotcopy {args:?}: {e}: {out}"))
}

/// `hotcopy ARGS --json` that must succeed; returns the parsed object.
pub fn ok_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    ok_parsed(&a)
}

/// `hotcopy ARGS` that must fail with exit code 2; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let (code, out, err) = hotcopy(args);
    assert_eq!(code, 2, "hotcopy {args:?}\nstdout: {out}\nstderr: {err}");
    err
}

/// `hotcopy repo restore --repo REPO --generation GENERATION --to TO`.
pub fn restore_args<'a>(repo: &'a str, generation: &'a str, to: &'a str) -> Vec<&'a str> {
    vec![
        "repo",
        "restore",
        "--repo",
        repo,
        "--generation",
        generation,
        "--to",
        to,
    ]
}

/// A scratch directory `hotcopy-TAG-…` under `HOTCOPY_SCRATCH` or
/// `/var/tmp` (not tmpfs, which refuses `O_DIRECT`).
pub fn scratch(tag: &str) -> tempfile::TempDir {
    let base = std::env::var_os("HOTCOPY_SCRATCH").unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix(&format!("hotcopy-{tag}-"))
        .tempdir_in(base)
        .unwrap()
}

/// A file of `mib` MiB of pseudo-random data (different per `seed`), in
/// which MiB `i` is zero where `i % zero_every == zero_at`.
pub fn make_source(path: &Path, mib: usize, seed: u64, zero_every: usize, zero_at: usize) {
    let mut x = seed | 1;
    let mut data = vec![0u8; mib << 20];
    for (i, w) in data.chunks_exact_mut(8).enumerate() {
        if ((i * 8) >> 20) % zero_every == zero_at {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, data).unwrap();
}

/// Copies the whole NBD export at `uri` into the raw file `out` with
/// qemu-img (a real client reading every byte).
pub fn nbd_to_file(uri: &str, out: &Path) {
    client(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    );
}

/// Runs an external client; its failure names the command and its output.
pub fn client(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (install qemu-utils and fio)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
