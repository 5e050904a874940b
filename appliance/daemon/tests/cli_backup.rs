//! `hotcopy backup run` as a user runs it, and `kill -9` in the middle of
//! one: the committed generation stays intact and restorable, the
//! interrupted one is listed incomplete, removable, and the next backup works.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn hotcopy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hotcopy"))
        .args(args)
        .env("HOTCOPY_LOG", "warn")
        .output()
        .expect("run hotcopy");
    let r = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !r.2.contains("panicked"),
        "hotcopy {args:?} panicked:\n{}",
        r.2
    );
    r
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = hotcopy(args);
    assert_eq!(code, 0, "hotcopy {args:?}\nstdout: {out}\nstderr: {err}");
    out
}

fn json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ok(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("hotcopy {a:?}: {e}: {out}"))
}

/// A file of `mib` MiB of pseudo-random data (different per `seed`), with a
/// zero MiB every 16.
fn make_source(path: &Path, mib: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; mib << 20];
    for (i, w) in data.chunks_exact_mut(8).enumerate() {
        if ((i * 8) >> 20) % 16 == 5 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, data).unwrap();
}

fn states(repo: &str) -> Vec<(u64, String)> {
    let v = json(&["repo", "list", "--repo", repo]);
    v["generations"]
        .as_array()
        .expect("a generations list")
        .iter()
        .map(|g| {
            (
                g["id"].as_u64().unwrap(),
                g["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn full_and_incremental_backups_restore_exactly_and_say_what_they_stored() {
    let dir = tempfile::Builder::new()
        .prefix("hotcopy-cli-backup-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = dir.path().join("src.img");
    make_source(&src, 32, 7);
    let repo = format!("uring:{}@256M", dir.path().join("repo.img").display());
    let source = format!("uring:{}", src.display());
    ok(&["repo", "format", "--repo", &repo]);
    let full = json(&["backup", "run", "--source", &source, "--repo", &repo]);
    assert_eq!(full["kind"], "full");
    assert_eq!(full["zero_chunks"], 32, "two zero MiB of 64 KiB chunks");
    // Change three chunks; the incremental compares checksums and stores them.
    let mut data = std::fs::read(&src).unwrap();
    for c in [1usize, 100, 300] {
        data[c << 16] ^= 0xFF;
    }
    std::fs::write(&src, &data).unwrap();
    let inc = json(&[
        "backup",
        "run",
        "--source",
        &source,
        "--repo",
        &repo,
        "--incremental",
    ]);
    assert_eq!(inc["kind"], "incremental");
    assert_eq!(inc["parent"], full["generation"]);
    assert_eq!(inc["chunks_stored"], 3);
    assert!(inc["note"]
        .as_str()
        .unwrap()
        .contains("compared by checksum"));
    let out = dir.path().join("out.img");
    ok(&[
        "repo",
        "restore",
        "--repo",
        &repo,
        "--generation",
        "latest",
        "--to",
        &format!("uring:{}@32M", out.display()),
    ]);
    assert!(std::fs::read(&out).unwrap() == data, "restore differs");
    // Scope: an exclude range is left out (absent), and bad ranges are refused.
    let part = json(&[
        "backup",
        "run",
        "--source",
        &source,
        "--repo",
        &repo,
        "--exclude",
        "0+1M",
    ]);
    assert_eq!(part["chunks_absent"], 16);
    let (code, _, err) = hotcopy(&[
        "backup",
        "run",
        "--source",
        &source,
        "--repo",
        &repo,
        "--include",
        "0+100",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("block size"), "{err}");
    let (code, _, err) = hotcopy(&[
        "backup",
        "run",
        "--source",
        &source,
        "--repo",
        &repo,
        "--include",
        "1G+1M",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("past the end"), "{err}");
}

#[test]
fn kill_9_mid_backup_leaves_the_committed_generation_intact_and_the_next_backup_works() {
    let dir = tempfile::Builder::new()
        .prefix("hotcopy-cli-kill-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = dir.path().join("src.img");
    make_source(&src, 64, 1);
    let first = std::fs::read(&src).unwrap();
    let repo = format!("uring:{}@1G", dir.path().join("repo.img").display());
    let source = format!("uring:{}", src.display());
    ok(&["repo", "format", "--repo", &repo]);
    ok(&["backup", "run", "--source", &source, "--repo", &repo]);
    make_source(&src, 64, 2);
    let second = std::fs::read(&src).unwrap();

    // Start a second backup and kill it as soon as its generation is recorded.
    let mut killed_mid_job = false;
    for attempt in 0..5 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hotcopy"))
            .args(["backup", "run", "--source", &source, "--repo", &repo])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        loop {
            let s = states(&repo);
            if s.iter().any(|(_, st)| st == "in_progress") {
                break;
            }
            if t.elapsed() > Duration::from_secs(20) || child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // SIGKILL: no chance to clean up.
        let _ = child.kill();
        let status = child.wait().unwrap();
        let s = states(&repo);
        if !status.success() && s.iter().any(|(_, st)| st == "in_progress") {
            killed_mid_job = true;
            break;
        }
        // The backup won the race and committed; take that one away and retry.
        for (id, _) in s.iter().skip(1) {
            ok(&[
                "repo",
                "prune",
                "--repo",
                &repo,
                "--remove",
                &id.to_string(),
            ]);
        }
        eprintln!("attempt {attempt}: the backup finished before the kill");
    }
    assert!(killed_mid_job, "never managed to kill a backup mid-job");

    let s = states(&repo);
    assert_eq!(s[0], (1, "complete".to_string()), "{s:?}");
    let stuck: Vec<u64> = s
        .iter()
        .filter(|(_, st)| st == "in_progress")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(stuck.len(), 1, "{s:?}");
    // Every committed generation verifies and restores to its content.
    ok(&["repo", "verify", "--repo", &repo]);
    let out = dir.path().join("out.img");
    let dst = format!("uring:{}@64M", out.display());
    ok(&[
        "repo",
        "restore",
        "--repo",
        &repo,
        "--generation",
        "1",
        "--to",
        &dst,
    ]);
    assert!(
        std::fs::read(&out).unwrap() == first,
        "generation 1 changed"
    );
    // The interrupted one cannot be restored, can be removed, and the next
    // backup works.
    let (code, _, err) = hotcopy(&[
        "repo",
        "restore",
        "--repo",
        &repo,
        "--generation",
        &stuck[0].to_string(),
        "--to",
        &dst,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("incomplete"), "{err}");
    ok(&[
        "repo",
        "prune",
        "--repo",
        &repo,
        "--remove",
        &stuck[0].to_string(),
    ]);
    let r = json(&["backup", "run", "--source", &source, "--repo", &repo]);
    ok(&["repo", "verify", "--repo", &repo]);
    ok(&[
        "repo",
        "restore",
        "--repo",
        &repo,
        "--generation",
        &r["generation"].to_string(),
        "--to",
        &dst,
    ]);
    assert!(
        std::fs::read(&out).unwrap() == second,
        "the new generation differs"
    );
    assert!(states(&repo).iter().all(|(_, st)| st == "complete"));
}
