//! `hotcopy backup run` as a user runs it, and `kill -9` in the middle of
//! one: the committed generation stays intact and restorable, the
//! interrupted one is listed incomplete, removable, and the next backup works.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{fails, hotcopy, nbd_to_file, ok, ok_json, restore_args, scratch, BIN};
use serde_json::Value;

/// A file of `mib` MiB of pseudo-random data (different per `seed`), with a
/// zero MiB every 16.
fn make_source(path: &std::path::Path, mib: usize, seed: u64) {
    common::make_source(path, mib, seed, 16, 5);
}

/// `hotcopy backup run --source SOURCE --repo REPO EXTRA --json`, which must
/// succeed; returns its report.
fn backup(source: &str, repo: &str, extra: &[&str]) -> Value {
    let mut args = vec!["backup", "run", "--source", source, "--repo", repo];
    args.extend_from_slice(extra);
    ok_json(&args)
}

/// `hotcopy repo restore` of `generation` to `to`, which must succeed.
fn restore(repo: &str, generation: &str, to: &str) -> String {
    ok(&restore_args(repo, generation, to))
}

/// `hotcopy repo prune --remove ID`, which must succeed.
fn remove(repo: &str, id: u64) -> String {
    ok(&["repo", "prune", "--repo", repo, "--remove", &id.to_string()])
}

fn states(repo: &str) -> Vec<(u64, String)> {
    let v = ok_json(&["repo", "list", "--repo", repo]);
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
    let dir = scratch("cli-backup");
    let src = dir.path().join("src.img");
    make_source(&src, 32, 7);
    let repo = format!("uring:{}@256M", dir.path().join("repo.img").display());
    let source = format!("uring:{}", src.display());
    ok(&["repo", "format", "--repo", &repo]);
    let full = backup(&source, &repo, &[]);
    assert_eq!(full["kind"], "full");
    assert_eq!(full["zero_chunks"], 32, "two zero MiB of 64 KiB chunks");
    // Change three chunks; the incremental compares checksums and stores them.
    let mut data = std::fs::read(&src).unwrap();
    for c in [1usize, 100, 300] {
        data[c << 16] ^= 0xFF;
    }
    std::fs::write(&src, &data).unwrap();
    let inc = backup(&source, &repo, &["--incremental"]);
    assert_eq!(inc["kind"], "incremental");
    assert_eq!(inc["parent"], full["generation"]);
    assert_eq!(inc["chunks_stored"], 3);
    assert!(inc["note"]
        .as_str()
        .unwrap()
        .contains("compared by checksum"));
    let out = dir.path().join("out.img");
    restore(&repo, "latest", &format!("uring:{}@32M", out.display()));
    assert!(std::fs::read(&out).unwrap() == data, "restore differs");
    // Scope: an exclude range is left out (absent), and bad ranges are refused.
    let part = backup(&source, &repo, &["--exclude", "0+1M"]);
    assert_eq!(part["chunks_absent"], 16);
    for (range, why) in [("0+100", "block size"), ("1G+1M", "past the end")] {
        let err = fails(&[
            "backup",
            "run",
            "--source",
            &source,
            "--repo",
            &repo,
            "--include",
            range,
        ]);
        assert!(err.contains(why), "--include {range}: {err}");
    }
}

#[test]
fn kill_9_mid_backup_leaves_the_committed_generation_intact_and_the_next_backup_works() {
    let dir = scratch("cli-kill");
    let src = dir.path().join("src.img");
    make_source(&src, 64, 1);
    let first = std::fs::read(&src).unwrap();
    let repo = format!("uring:{}@1G", dir.path().join("repo.img").display());
    let source = format!("uring:{}", src.display());
    ok(&["repo", "format", "--repo", &repo]);
    backup(&source, &repo, &[]);
    make_source(&src, 64, 2);
    let second = std::fs::read(&src).unwrap();

    // Start a second backup and kill it as soon as its generation is recorded.
    let mut killed_mid_job = false;
    for attempt in 0..5 {
        let mut child = Command::new(BIN)
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
            remove(&repo, *id);
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
    restore(&repo, "1", &dst);
    assert!(
        std::fs::read(&out).unwrap() == first,
        "generation 1 changed"
    );
    // The interrupted one cannot be restored, can be removed, and the next
    // backup works.
    let (code, _, err) = hotcopy(&restore_args(&repo, &stuck[0].to_string(), &dst));
    assert_ne!(code, 0);
    assert!(err.contains("incomplete"), "{err}");
    remove(&repo, stuck[0]);
    let r = backup(&source, &repo, &[]);
    ok(&["repo", "verify", "--repo", &repo]);
    restore(&repo, &r["generation"].to_string(), &dst);
    assert!(
        std::fs::read(&out).unwrap() == second,
        "the new generation differs"
    );
    assert!(states(&repo).iter().all(|(_, st)| st == "complete"));
}

/// `repo mount` serves a generation over NBD: qemu-img reads exactly the
/// backup; a writable mount takes writes that the repository never sees.
/// Isolation from the source both ways: the source changes after the
/// backup and no mount shows it; the writable mount's writes never reach
/// the source. Then the generation is restored onto the source itself.
#[test]
fn repo_mount_serves_a_generation_over_nbd_read_only_and_writable() {
    let dir = scratch("mount");
    let d = dir.path();
    let src = d.join("src.img");
    make_source(&src, 16, 3);
    let repo = format!("uring:{}@128M", d.join("repo.img").display());
    let source = format!("uring:{}", src.display());
    ok(&["repo", "format", "--repo", &repo]);
    backup(&source, &repo, &[]);
    let original = std::fs::read(&src).unwrap();
    // The source moves on after its backup.
    let mut changed = original.clone();
    changed[2 << 20..3 << 20].fill(0x55);
    std::fs::write(&src, &changed).unwrap();
    for writable in [false, true] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nbd = format!("127.0.0.1:{port}");
        let mut args = vec![
            "repo",
            "mount",
            "--repo",
            &repo,
            "--generation",
            "latest",
            "--nbd",
            &nbd,
        ];
        if writable {
            args.push("--writable");
        }
        let mut child = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "repo mount exited early"
            );
            assert!(Instant::now() < deadline, "repo mount never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = format!("nbd://127.0.0.1:{port}/backup");
        let run = |cmd: &str, a: &[&str]| {
            let o = Command::new(cmd).args(a).output().unwrap();
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr),
            )
        };
        if writable {
            let (okw, out) = run(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    &uri,
                    "-c",
                    "write -P 0x77 0 1M",
                    "-c",
                    "read -P 0x77 0 1M",
                ],
            );
            assert!(okw && !out.contains("failed"), "{out}");
        } else {
            let (okw, out) = run("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x77 0 4k"]);
            assert!(
                !okw || out.to_lowercase().contains("permission") || out.contains("failed"),
                "a read-only mount took a write: {out}"
            );
        }
        let via = d.join(format!("via-{writable}.img"));
        nbd_to_file(&uri, &via);
        let got = std::fs::read(&via).unwrap();
        if writable {
            assert!(
                got[..1 << 20].iter().all(|&b| b == 0x77),
                "the overlay lost a write"
            );
            assert!(
                got[1 << 20..] == original[1 << 20..],
                "the rest of the mount differs"
            );
        } else {
            assert!(got == original, "the mount differs from the backup");
        }
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(
            child.wait().unwrap().success(),
            "repo mount did not stop cleanly"
        );
    }
    // Neither mount changed the repository, nor the source.
    ok(&["repo", "verify", "--repo", &repo]);
    assert!(
        std::fs::read(&src).unwrap() == changed,
        "a write to the mount reached the source"
    );
    let out = d.join("out.img");
    restore(&repo, "latest", &format!("uring:{}@16M", out.display()));
    assert!(std::fs::read(&out).unwrap() == original);
    // Restore onto the original volume: it is the backup again.
    restore(&repo, "latest", &source);
    assert!(
        std::fs::read(&src).unwrap() == original,
        "the restore onto the source differs from the backup"
    );
}

/// On a terminal `repo restore` draws a progress bar with the generation's
/// size as its total (run under `script`, which gives it a pty); through
/// a pipe it draws none.
#[test]
fn restore_draws_a_progress_bar_on_a_terminal_only() {
    let dir = scratch("bar");
    let d = dir.path();
    let src = d.join("src.img");
    make_source(&src, 16, 9);
    let repo = format!("uring:{}@64M", d.join("repo.img").display());
    ok(&["repo", "format", "--repo", &repo]);
    backup(&format!("uring:{}", src.display()), &repo, &[]);
    let to = format!("uring:{}@16M", d.join("out.img").display());
    let cmd = format!("{BIN} repo restore --repo {repo} --generation latest --to {to}");
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .output()
        .expect("script (util-linux) runs");
    assert!(out.status.success(), "{out:?}");
    // Drop the terminal's escape sequences and carriage returns.
    let raw = String::from_utf8_lossy(&out.stdout);
    let mut text = String::new();
    let mut esc = false;
    for ch in raw.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, c) if c.is_ascii_alphabetic() => esc = false,
            (true, _) => {}
            (false, '\r') => text.push('\n'),
            (false, c) => text.push(c),
        }
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("restore ") && l.contains("/16.00 MiB")),
        "no progress bar on the terminal: {text}"
    );
    assert!(std::fs::read(d.join("out.img")).unwrap() == std::fs::read(&src).unwrap());
    // Through a pipe: no bar.
    let (code, _, err) = hotcopy(&restore_args(&repo, "latest", &to));
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("MiB/16.00 MiB"),
        "a bar drawn into a pipe: {err}"
    );
}
