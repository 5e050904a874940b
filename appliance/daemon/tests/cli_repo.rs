//! `hotcopy repo` as a user runs it: the real binary on repository files,
//! its output, JSON and exit codes. Generations cannot be made from the CLI
//! yet, so [`build_repo`] writes a repository file with the library
//! (`hotcopy_cow::repo`) and the CLI is exercised on it.

use std::path::{Path, PathBuf};

use hotcopy_cow::repo::{ChunkLoc, GenSpec, MemIo, Repo, SourceIdent};
use serde_json::Value;

mod common;

use common::{fails, hotcopy, ok, ok_json, restore_args};

fn scratch() -> tempfile::TempDir {
    common::scratch("cli-repo")
}

fn uring(path: &Path) -> String {
    format!("uring:{}", path.display())
}

fn uring_sized(path: &Path, size: &str) -> String {
    format!("uring:{}@{size}", path.display())
}

/// Deterministic bytes that are never a whole zero chunk.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const CS: u32 = 16 << 10;
const CSU: usize = CS as usize;
/// 40 whole chunks and a 4 KiB tail: the last chunk is short.
const SRC_SIZE: usize = 40 * CSU + 4096;
const CHUNKS: u64 = 41;
/// Chunks 30..35 of the first version are zero.
const ZERO_CHUNKS: std::ops::Range<usize> = 30..35;
/// The chunks the second version changes.
const CHANGED: [u64; 3] = [3, 17, 38];
const REPO_BYTES: u64 = 8 << 20;
const DAY_US: u64 = 86_400_000_000;

struct Built {
    path: PathBuf,
    v1: Vec<u8>,
    v2: Vec<u8>,
    /// Where generation 2's own copy of chunk 17 is on the namespace.
    gen2_chunk17: u64,
}

fn spec(parent: Option<u64>) -> GenSpec {
    GenSpec {
        source: SourceIdent {
            name: "vol0".into(),
            size_bytes: SRC_SIZE as u64,
        },
        chunk_size: CS,
        parent,
        compare_with_parent: false,
    }
}

/// `src` padded with zeros to whole chunks.
fn padded(src: &[u8]) -> Vec<u8> {
    let mut b = src.to_vec();
    b.resize(CHUNKS as usize * CSU, 0);
    b
}

/// Writes `path`: a repository with generation 1 (full, consistency point
/// ten days ago), generation 2 (incremental on 1, an hour ago, three chunks
/// changed) and generation 3 (begun on 2, never committed).
fn build_repo(dir: &Path) -> Built {
    let mut ns = MemIo::new(REPO_BYTES, 512);
    let mut repo = Repo::format(&mut ns, false).unwrap();
    let now = hotcopy_cow::repo::now_us();

    let mut v1 = pattern(1, SRC_SIZE);
    v1[ZERO_CHUNKS.start * CSU..ZERO_CHUNKS.end * CSU].fill(0);
    let w = repo.begin(&mut ns, &spec(None)).unwrap();
    let data = padded(&v1);
    for first in (0..CHUNKS).step_by(8) {
        let n = 8.min(CHUNKS - first);
        let range = first as usize * CSU..(first + n) as usize * CSU;
        w.write_run(&mut ns, first, n, &mut data[range].to_vec())
            .unwrap();
    }
    let g1 = repo.commit(&mut ns, w, now - 10 * DAY_US).unwrap();
    assert_eq!(g1.id, 1);

    let mut v2 = v1.clone();
    for (k, &c) in CHANGED.iter().enumerate() {
        let start = c as usize * CSU;
        let end = (start + CSU).min(SRC_SIZE);
        v2[start..end].copy_from_slice(&pattern(100 + k as u64, end - start));
    }
    let w = repo.begin(&mut ns, &spec(Some(1))).unwrap();
    let data = padded(&v2);
    for c in 0..CHUNKS {
        if CHANGED.contains(&c) {
            let mut chunk = data[c as usize * CSU..(c as usize + 1) * CSU].to_vec();
            w.write_run(&mut ns, c, 1, &mut chunk).unwrap();
        } else {
            w.inherit(c, 1).unwrap();
        }
    }
    let g2 = repo.commit(&mut ns, w, now - DAY_US / 24).unwrap();
    assert_eq!(g2.id, 2);

    // Begun and abandoned, as a crash leaves it: listed as incomplete.
    let w = repo.begin(&mut ns, &spec(Some(2))).unwrap();
    let mut chunk = pattern(200, CSU);
    w.write_run(&mut ns, 0, 1, &mut chunk).unwrap();
    drop(w);

    let gen2_chunk17 = match repo.index(&mut ns, 2).unwrap().resolve(17).unwrap().loc {
        ChunkLoc::Data(at) => at,
        other => panic!("chunk 17 of generation 2 is {other:?}"),
    };
    let path = dir.join("repo.img");
    std::fs::write(&path, &ns.data).unwrap();
    Built {
        path,
        v1,
        v2,
        gen2_chunk17,
    }
}

/// Generation ids of `repo list --json`.
fn ids(repo: &str) -> Vec<u64> {
    ok_json(&["repo", "list", "--repo", repo])["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_u64().unwrap())
        .collect()
}

/// Restores `generation` to a new file and returns the source's bytes.
fn restore_to_file(repo: &str, generation: &str, dst: &Path) -> (Vec<u8>, String) {
    let out = ok(&restore_args(repo, generation, &uring_sized(dst, "1M")));
    let mut bytes = std::fs::read(dst).unwrap();
    assert_eq!(bytes.len(), 1 << 20);
    bytes.truncate(SRC_SIZE);
    (bytes, out)
}

fn uuid_in(text: &str) -> String {
    text.split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .find(|w| w.len() == 36 && w.matches('-').count() == 4)
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no uuid in {text:?}"))
}

#[test]
fn format_on_a_new_file_then_list_and_info_show_an_empty_repository() {
    let dir = scratch();
    let img = dir.path().join("repo.img");
    let out = ok(&["repo", "format", "--repo", &uring_sized(&img, "8M")]);
    assert!(out.starts_with("formatted "), "{out}");
    let uuid = uuid_in(&out);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 << 20);

    // A separate invocation, on the file alone: the repository persisted.
    let repo = uring(&img);
    let out = ok(&["repo", "list", "--repo", &repo]);
    assert!(
        out.contains(&uuid) && out.contains("0 generations"),
        "{out}"
    );
    let v = ok_json(&["repo", "list", "--repo", &repo]);
    assert_eq!(v["generations"], serde_json::json!([]), "{v}");
    assert_eq!(v["uuid"], uuid.as_str());

    let v = ok_json(&["repo", "info", "--repo", &repo]);
    assert_eq!(v["uuid"], uuid.as_str());
    assert_eq!(v["size_bytes"], 8 << 20);
    assert_eq!(v["generation_count"], 0);
    assert_eq!(v["complete"], 0);
    assert_eq!(v["in_progress"], 0);
    let (used, free) = (
        v["used_bytes"].as_u64().unwrap(),
        v["free_bytes"].as_u64().unwrap(),
    );
    assert!(used > 0 && free > 0 && used + free == 8 << 20, "{v}");
    assert!(v["sequence"].as_u64().unwrap() >= 1);
    let out = ok(&["repo", "info", "--repo", &repo]);
    for k in ["repository", "size", "used", "free", "generations"] {
        assert!(out.contains(k), "{k}: {out}");
    }
}

#[test]
fn format_twice_is_refused_without_force() {
    let dir = scratch();
    let img = dir.path().join("repo.img");
    let first = uuid_in(&ok(&["repo", "format", "--repo", &uring_sized(&img, "4M")]));
    let err = fails(&["repo", "format", "--repo", &uring(&img)]);
    assert!(
        err.contains("refusing to format")
            && err.contains("holds a hotcopy repository")
            && err.contains("--force"),
        "{err}"
    );
    let v = ok_json(&["repo", "info", "--repo", &uring(&img)]);
    assert_eq!(v["uuid"], first.as_str(), "untouched");
    let second = uuid_in(&ok(&["repo", "format", "--repo", &uring(&img), "--force"]));
    assert_ne!(first, second);
    let v = ok_json(&["repo", "info", "--repo", &uring(&img)]);
    assert_eq!(v["uuid"], second.as_str());
}

#[test]
fn foreign_data_is_refused_with_a_clear_message_and_left_alone() {
    let dir = scratch();
    let img = dir.path().join("random.img");
    let junk = pattern(42, 4 << 20);
    std::fs::write(&img, &junk).unwrap();
    let repo = uring(&img);
    for sub in ["list", "info", "verify"] {
        let err = fails(&["repo", sub, "--repo", &repo]);
        assert!(
            err.contains("not a hotcopy repository") && err.contains(&repo),
            "{sub}: {err}"
        );
    }
    let err = fails(&["repo", "list", "--repo", &repo, "--json"]);
    assert!(err.contains("not a hotcopy repository"), "{err}");
    let err = fails(&["repo", "format", "--repo", &repo]);
    assert!(
        err.contains("refusing to format")
            && err.contains("not a hotcopy repository")
            && err.contains("--force"),
        "{err}"
    );
    let err = fails(&restore_args(&repo, "latest", "malloc:8M"));
    assert!(err.contains("not a hotcopy repository"), "{err}");
    assert!(
        std::fs::read(&img).unwrap() == junk,
        "the data is untouched"
    );

    // A spec that is no bdev, and a file that is not there.
    let err = fails(&["repo", "list", "--repo", "floppy:1G"]);
    assert!(err.contains("floppy"), "{err}");
    let missing = dir.path().join("missing.img");
    let err = fails(&["repo", "list", "--repo", &uring(&missing)]);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn verify_on_a_fresh_repository_exits_zero() {
    let dir = scratch();
    let img = dir.path().join("repo.img");
    ok(&["repo", "format", "--repo", &uring_sized(&img, "4M")]);
    let out = ok(&["repo", "verify", "--repo", &uring(&img)]);
    assert!(out.contains("verify: OK"), "{out}");
    let v = ok_json(&["repo", "verify", "--repo", &uring(&img)]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["generations"], serde_json::json!([]));
    assert_eq!(v["bad_chunks"], serde_json::json!([]));
    assert_eq!(v["problems"], serde_json::json!([]));
    let err = fails(&[
        "repo",
        "verify",
        "--repo",
        &uring(&img),
        "--generation",
        "4",
    ]);
    assert!(err.contains("no generation 4"), "{err}");
}

#[test]
fn prune_arguments_are_validated() {
    let dir = scratch();
    let img = dir.path().join("repo.img");
    ok(&["repo", "format", "--repo", &uring_sized(&img, "4M")]);
    let repo = uring(&img);
    let err = fails(&[
        "repo",
        "prune",
        "--repo",
        &repo,
        "--keep",
        "2",
        "--older-than",
        "7d",
    ]);
    assert!(
        err.contains("--keep") && err.contains("--older-than") && err.contains("cannot be used"),
        "{err}"
    );
    let err = fails(&["repo", "prune", "--repo", &repo]);
    assert!(
        err.contains("required") && err.contains("--keep") && err.contains("--older-than"),
        "{err}"
    );
    for bad in ["7x", "7", "d", "1.5h", "-3d", ""] {
        let arg = format!("--older-than={bad}");
        let err = fails(&["repo", "prune", "--repo", &repo, &arg]);
        assert!(
            err.contains("--older-than") && err.contains(bad),
            "{bad}: {err}"
        );
    }
    let err = fails(&["repo", "prune", "--repo", &repo, "--older-than", "7x"]);
    assert!(
        err.contains("invalid duration") && err.contains("12h"),
        "{err}"
    );
    let err = fails(&["repo", "prune", "--repo", &repo, "--keep", "0"]);
    assert!(err.contains("--keep"), "{err}");
    // Valid, with nothing to do.
    for args in [["--keep", "3"], ["--older-than", "30s"]] {
        let out = ok(&["repo", "prune", "--repo", &repo, args[0], args[1]]);
        assert!(out.contains("nothing to remove"), "{out}");
    }
    let err = fails(&["repo", "prune", "--repo", &repo, "--remove", "1"]);
    assert!(err.contains("no generation 1"), "{err}");
}

#[test]
fn restore_of_a_missing_generation_is_a_clear_error() {
    let dir = scratch();
    let img = dir.path().join("repo.img");
    ok(&["repo", "format", "--repo", &uring_sized(&img, "4M")]);
    let repo = uring(&img);
    let dst = uring_sized(&dir.path().join("dst.img"), "1M");
    let restore = |generation: &str| fails(&restore_args(&repo, generation, &dst));
    let err = restore("5");
    assert!(err.contains("no generation 5"), "{err}");
    let err = restore("latest");
    assert!(err.contains("no complete generation"), "{err}");
    let err = restore("newest");
    assert!(err.contains("newest") && err.contains("latest"), "{err}");
    let err = fails(&restore_args(&repo, "1", &repo));
    assert!(err.contains("own namespace"), "{err}");
}

#[test]
fn list_and_info_describe_real_generations() {
    let dir = scratch();
    let b = build_repo(dir.path());
    let repo = uring(&b.path);
    let v = ok_json(&["repo", "list", "--repo", &repo]);
    let gens = v["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 3, "{v}");
    let g1 = &gens[0];
    assert_eq!(g1["id"], 1);
    assert_eq!(g1["state"], "complete");
    assert_eq!(g1["kind"], "full");
    assert_eq!(g1["parent"], Value::Null);
    assert_eq!(g1["source"]["name"], "vol0");
    assert_eq!(g1["source"]["size_bytes"], SRC_SIZE as u64);
    assert_eq!(g1["chunk_size"], CS);
    let cp = g1["consistency_point"].as_str().unwrap();
    assert!(
        cp.len() == 27 && cp.ends_with('Z') && &cp[10..11] == "T",
        "RFC 3339 UTC with microseconds: {cp}"
    );
    let cp_us = g1["consistency_point_us"].as_u64().unwrap();
    assert!(cp_us > 0);
    assert!(g1["created"].as_str().unwrap().ends_with('Z'));
    assert!(g1["created_us"].as_u64().unwrap() >= cp_us);
    let zero = ZERO_CHUNKS.len() as u64;
    assert_eq!(g1["chunks"]["total"], CHUNKS);
    assert_eq!(g1["chunks"]["zero"], zero);
    assert_eq!(g1["chunks"]["stored"], CHUNKS - zero);
    assert_eq!(g1["chunks"]["absent"], 0);
    assert_eq!(g1["bytes_stored"], (CHUNKS - zero) * CS as u64);
    let g2 = &gens[1];
    assert_eq!(g2["kind"], "incremental");
    assert_eq!(g2["parent"], 1);
    assert_eq!(g2["chunks"]["stored"], CHANGED.len());
    assert!(g2["consistency_point_us"].as_u64().unwrap() > cp_us);
    let g3 = &gens[2];
    assert_eq!(g3["state"], "in_progress");
    assert_eq!(g3["parent"], 2);
    assert_eq!(g3["consistency_point"], Value::Null);

    let out = ok(&["repo", "list", "--repo", &repo]);
    assert!(out.contains("3 generations"), "{out}");
    for word in [
        "ID",
        "STATE",
        "incremental",
        "in_progress",
        "vol0",
        "16.0 KiB",
    ] {
        assert!(out.contains(word), "{word}: {out}");
    }
    assert_eq!(
        out.lines().count(),
        5,
        "header line, table header, 3 rows: {out}"
    );

    let v = ok_json(&["repo", "info", "--repo", &repo, "--generation", "2"]);
    assert_eq!(v["generation_count"], 3);
    assert_eq!(v["complete"], 2);
    assert_eq!(v["in_progress"], 1);
    assert_eq!(v["generation"]["id"], 2);
    assert_eq!(
        v["generation"]["data_from"],
        serde_json::json!([
            { "generation": 1, "chunks": CHUNKS - zero - CHANGED.len() as u64 },
            { "generation": 2, "chunks": CHANGED.len() },
        ])
    );
    assert!(v["generation"]["index"]["len"].as_u64().unwrap() >= 4096);
    let out = ok(&["repo", "info", "--repo", &repo, "--generation", "3"]);
    assert!(
        out.contains("in_progress") && out.contains("incomplete"),
        "{out}"
    );
    let err = fails(&["repo", "info", "--repo", &repo, "--generation", "9"]);
    assert!(err.contains("no generation 9"), "{err}");
}

#[test]
fn restore_writes_generations_back_byte_for_byte() {
    let dir = scratch();
    let b = build_repo(dir.path());
    let repo = uring(&b.path);
    let (bytes, out) = restore_to_file(&repo, "1", &dir.path().join("g1.img"));
    assert!(bytes == b.v1, "generation 1 differs from the first version");
    assert!(
        out.contains("restored generation 1") && out.contains("MiB/s"),
        "{out}"
    );
    // `latest` is the newest complete one: 2 (3 never committed).
    let (bytes, out) = restore_to_file(&repo, "latest", &dir.path().join("g2.img"));
    assert!(
        bytes == b.v2,
        "generation 2 differs from the second version"
    );
    assert!(out.contains("restored generation 2"), "{out}");

    let dst = uring_sized(&dir.path().join("j.img"), "1M");
    let v = ok_json(&restore_args(&repo, "2", &dst));
    assert_eq!(v["generation"], 2);
    assert_eq!(v["bytes_written"], SRC_SIZE as u64);
    assert_eq!(v["zero_chunks"], ZERO_CHUNKS.len());
    assert!(v["mibps"].as_f64().unwrap() > 0.0);

    let err = fails(&restore_args(&repo, "3", &dst));
    assert!(
        err.contains("incomplete") && err.contains("--remove 3"),
        "{err}"
    );
    let small = dir.path().join("small.img");
    let err = fails(&restore_args(&repo, "1", &uring_sized(&small, "256K")));
    assert!(
        err.contains("destination holds") && err.contains("needs"),
        "{err}"
    );
    assert!(
        std::fs::read(&small).unwrap().iter().all(|&x| x == 0),
        "nothing written to a destination that is too small"
    );
    let mut args = restore_args(&repo, "latest", &dst);
    args.extend(["--source", "vol9"]);
    let err = fails(&args);
    assert!(err.contains("vol9"), "{err}");
}

#[test]
fn verify_finds_a_corrupted_chunk_and_exits_one() {
    let dir = scratch();
    let b = build_repo(dir.path());
    let repo = uring(&b.path);
    let out = ok(&["repo", "verify", "--repo", &repo]);
    assert!(out.contains("verify: OK"), "{out}");
    assert!(out.contains("incomplete"), "generation 3 is listed: {out}");

    let mut img = std::fs::read(&b.path).unwrap();
    img[b.gen2_chunk17 as usize + 100] ^= 0x20;
    std::fs::write(&b.path, &img).unwrap();

    let (code, out, err) = hotcopy(&["repo", "verify", "--repo", &repo]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("verify: FAILED") && out.contains("generation 2 chunk 17"),
        "{out}"
    );
    assert!(out.contains("DAMAGED"), "{out}");
    let (code, out, _) = hotcopy(&["repo", "verify", "--repo", &repo, "--json"]);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    let bad = v["bad_chunks"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{v}");
    assert_eq!(bad[0]["generation"], 2);
    assert_eq!(bad[0]["chunk"], 17);
    assert_eq!(bad[0]["offset"], b.gen2_chunk17);
    // Generation 1 does not use that chunk: intact.
    let out = ok(&["repo", "verify", "--repo", &repo, "--generation", "1"]);
    assert!(out.contains("verify: OK"), "{out}");
    // Restore refuses to write the damaged chunk back.
    let dst = uring_sized(&dir.path().join("d.img"), "1M");
    let err = fails(&restore_args(&repo, "2", &dst));
    assert!(err.contains("chunk 17") && err.contains("crc32c"), "{err}");
}

#[test]
fn verify_reports_a_corrupt_superblock_as_damage() {
    let dir = scratch();
    let b = build_repo(dir.path());
    let mut img = std::fs::read(&b.path).unwrap();
    // Both slots keep their magic but fail their checksums.
    img[200] ^= 1;
    img[4096 + 200] ^= 1;
    std::fs::write(&b.path, &img).unwrap();
    let (code, out, err) = hotcopy(&["repo", "verify", "--repo", &uring(&b.path)]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("corrupt superblock"), "{out}");
    let err = fails(&["repo", "list", "--repo", &uring(&b.path)]);
    assert!(err.contains("corrupt superblock"), "{err}");
}

#[test]
fn prune_by_age_keeps_shared_chunks_and_reclaims_the_rest() {
    let dir = scratch();
    let b = build_repo(dir.path());
    let repo = uring(&b.path);
    let before = ok_json(&["repo", "info", "--repo", &repo])["free_bytes"]
        .as_u64()
        .unwrap();
    let out = ok(&["repo", "prune", "--repo", &repo, "--older-than", "7d"]);
    assert!(
        out.contains("removed generation 1") && out.contains("reclaimed"),
        "{out}"
    );
    assert_eq!(ids(&repo), vec![2, 3]);
    let after = ok_json(&["repo", "info", "--repo", &repo])["free_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        after >= before + CHANGED.len() as u64 * CS as u64,
        "the replaced chunks are free: {before} -> {after}"
    );
    // Generation 2 shared most of its chunks with 1: still whole.
    ok(&["repo", "verify", "--repo", &repo]);
    let (bytes, _) = restore_to_file(&repo, "2", &dir.path().join("g2.img"));
    assert!(bytes == b.v2);
    // The newest of a source is always kept.
    let out = ok(&["repo", "prune", "--repo", &repo, "--older-than", "1s"]);
    assert!(out.contains("nothing to remove"), "{out}");
    assert_eq!(ids(&repo), vec![2, 3]);
}

#[test]
fn prune_keep_and_remove() {
    let dir = scratch();
    let b = build_repo(dir.path());
    let repo = uring(&b.path);
    let v = ok_json(&["repo", "prune", "--repo", &repo, "--keep", "1"]);
    assert_eq!(v["removed"], serde_json::json!([1]), "{v}");
    assert!(v["freed_bytes"].as_u64().unwrap() >= CHANGED.len() as u64 * CS as u64);
    assert_eq!(ids(&repo), vec![2, 3]);
    // The incomplete generation goes by id.
    let out = ok(&["repo", "prune", "--repo", &repo, "--remove", "3"]);
    assert!(out.contains("removed generation 3"), "{out}");
    assert_eq!(ids(&repo), vec![2]);
    ok(&["repo", "verify", "--repo", &repo]);
    let (bytes, _) = restore_to_file(&repo, "latest", &dir.path().join("l.img"));
    assert!(bytes == b.v2);
}

#[test]
fn help_texts_have_examples() {
    let out = ok(&["repo", "--help"]);
    for sub in [
        "format",
        "list",
        "info",
        "verify",
        "prune",
        "restore",
        "mount",
        "Examples:",
    ] {
        assert!(out.contains(sub), "{sub}: {out}");
    }
    for sub in [
        "format", "list", "info", "verify", "prune", "restore", "mount",
    ] {
        let out = ok(&["repo", sub, "--help"]);
        assert!(
            out.contains("Examples:") && out.contains("--repo"),
            "{sub}: {out}"
        );
    }
    let out = ok(&["--help"]);
    assert!(out.contains("repo"), "{out}");
}
