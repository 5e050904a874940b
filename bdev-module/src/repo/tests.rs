//! Unit tests of the repository on a [`MemIo`] namespace. The integration
//! tests (tests/tests/repo_format.rs) run it on bdevs, with power cuts.

use std::sync::Arc;

use hotcopy_bdev::testing::pattern;

use super::*;

const CS: u32 = 16 * 1024;

fn spec(name: &str, size: u64, parent: Option<u64>) -> GenSpec {
    GenSpec {
        source: SourceIdent {
            name: name.into(),
            size_bytes: size,
        },
        chunk_size: CS,
        parent,
        compare_with_parent: false,
    }
}

/// Backs up all of `src` as a full generation, one run per `run` chunks.
fn full(repo: &mut Repo, io: &mut MemIo, name: &str, src: &[u8], run: u64) -> Generation {
    let w = repo.begin(io, &spec(name, src.len() as u64, None)).unwrap();
    write_all(io, &w, src, run);
    repo.commit(io, w, now_us()).unwrap()
}

fn write_all(io: &mut MemIo, w: &GenWriter, src: &[u8], run: u64) {
    let cs = CS as u64;
    let mut c = 0;
    while c < w.chunks() {
        let n = run.min(w.chunks() - c);
        let mut buf = vec![0u8; (n * cs) as usize];
        let end = ((c + n) * cs).min(src.len() as u64) as usize;
        buf[..end - (c * cs) as usize].copy_from_slice(&src[(c * cs) as usize..end]);
        w.write_run(io, c, n, &mut buf).unwrap();
        c += n;
    }
}

fn restored(repo: &Repo, io: &mut MemIo, id: u64, size: u64) -> Vec<u8> {
    let mut dst = MemIo::new(size.next_multiple_of(4096), 512);
    repo.restore(io, id, &mut dst, &mut |_, _| {}).unwrap();
    dst.data.truncate(size as usize);
    dst.data
}

/// A source with some zero chunks.
fn source(seed: u64, size: usize) -> Vec<u8> {
    let mut s = pattern(seed, size);
    for z in (0..size).step_by(CS as usize * 5) {
        let end = (z + CS as usize).min(size);
        s[z..end].fill(0);
    }
    s
}

#[test]
fn format_then_open_sees_the_same_repository() {
    let mut io = MemIo::new(4 << 20, 512);
    let repo = Repo::format(&mut io, false).unwrap();
    let info = repo.info();
    assert_eq!(info.generations, 0);
    assert_eq!(info.size_bytes, 4 << 20);
    assert_eq!(info.used_bytes, 3 * ALLOC_UNIT, "two slots and a catalog");
    let again = Repo::open(&mut io).unwrap();
    assert_eq!(again.info(), info);
    assert_eq!(again.uuid(), repo.uuid());
    // Formatting again needs force, and gives a new repository.
    let err = Repo::format(&mut io, false).unwrap_err().to_string();
    assert!(err.contains("holds a hotcopy repository"), "{err}");
    let fresh = Repo::format(&mut io, true).unwrap();
    assert_ne!(fresh.uuid(), repo.uuid());
}

#[test]
fn foreign_data_is_refused() {
    let mut io = MemIo::new(1 << 20, 4096);
    io.data[70_000] = 1;
    let err = Repo::format(&mut io, false).unwrap_err().to_string();
    assert!(
        err.contains("not a hotcopy repository") && err.contains("70000"),
        "{err}"
    );
    assert!(matches!(
        Repo::open(&mut io),
        Err(RepoError::NotARepository)
    ));
    io.data[100] = 7;
    assert!(matches!(
        Repo::open(&mut io),
        Err(RepoError::NotARepository)
    ));
    assert_eq!(io.data[100], 7, "nothing written");
    Repo::format(&mut io, true).unwrap();
    Repo::open(&mut io).unwrap();
    // Unsupported devices.
    let mut tiny = MemIo::new(32 * 1024, 512);
    assert!(matches!(
        Repo::format(&mut tiny, true),
        Err(RepoError::Namespace(_))
    ));
    let mut odd = MemIo::new(1 << 20, 8192);
    assert!(matches!(
        Repo::format(&mut odd, true),
        Err(RepoError::Namespace(_))
    ));
}

#[test]
fn full_and_incrementals_restore_exactly() {
    let mut io = MemIo::new(8 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    // Not a multiple of the chunk size: the last chunk is short.
    let size = 40 * CS as u64 - 1024;
    let mut src = source(1, size as usize);
    let g1 = full(&mut repo, &mut io, "vol", &src, 7);
    assert_eq!(g1.kind, GenKind::Full);
    assert_eq!(g1.zero_chunks, 8);
    assert_eq!(g1.chunks_stored, 32);
    let mut versions = vec![(g1.id, src.clone())];
    let mut parent = g1.id;
    for round in 0..6u64 {
        // Change a few chunks (one to zeros), with change tracking.
        let changed: Vec<u64> = (0..4).map(|k| (round * 7 + k * 11) % 40).collect();
        for (k, &c) in changed.iter().enumerate() {
            let start = (c * CS as u64) as usize;
            let end = (start + CS as usize).min(src.len());
            if k == 0 {
                src[start..end].fill(0);
            } else {
                src[start..end].copy_from_slice(&pattern(round * 100 + c, end - start));
            }
        }
        let w = repo
            .begin(&mut io, &spec("vol", size, Some(parent)))
            .unwrap();
        for c in 0..w.chunks() {
            if changed.contains(&c) {
                let mut buf = vec![0u8; CS as usize];
                let start = (c * CS as u64) as usize;
                let end = (start + CS as usize).min(src.len());
                buf[..end - start].copy_from_slice(&src[start..end]);
                w.write_run(&mut io, c, 1, &mut buf).unwrap();
            } else {
                w.mark_unchanged(c).unwrap();
            }
        }
        let g = repo.commit(&mut io, w, now_us()).unwrap();
        assert_eq!(g.kind, GenKind::Incremental);
        assert!(g.chunks_stored <= 3, "only changed chunks are stored");
        versions.push((g.id, src.clone()));
        parent = g.id;
    }
    for (id, want) in &versions {
        assert!(restored(&repo, &mut io, *id, size) == *want, "gen {id}");
    }
    // Reopen: same answers, and every generation verifies.
    let repo = Repo::open(&mut io).unwrap();
    let report = repo.verify(&mut io, None).unwrap();
    assert!(report.is_ok(), "{:?}", report.messages());
    for (id, want) in &versions {
        assert!(restored(&repo, &mut io, *id, size) == *want, "gen {id}");
    }
}

#[test]
fn place_run_compacts_and_compares_with_the_parent() {
    let mut io = MemIo::new(4 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 8 * CS as u64;
    let src = pattern(3, size as usize);
    let g1 = full(&mut repo, &mut io, "v", &src, 8);
    let mut s = spec("v", size, Some(g1.id));
    s.compare_with_parent = true;
    let w = repo.begin(&mut io, &s).unwrap();
    let cs = CS as usize;
    let mut buf = src.clone();
    buf[cs..2 * cs].fill(0); // chunk 1 zero
    buf[3 * cs] ^= 1; // chunk 3 changed
    buf[6 * cs + 5] ^= 1; // chunk 6 changed
    let want3 = buf[3 * cs..4 * cs].to_vec();
    let want6 = buf[6 * cs..7 * cs].to_vec();
    let p = w.place_run(0, 8, &mut buf).unwrap();
    assert_eq!((p.stored, p.zero, p.unchanged), (2, 1, 5));
    let ext = p.write.unwrap();
    assert_eq!(ext.len, 2 * CS as u64);
    assert!(
        buf[..cs] == want3[..] && buf[cs..2 * cs] == want6[..],
        "compacted in order"
    );
    io.write(ext.offset, &buf[..ext.len as usize]).unwrap();
    let g2 = repo.commit(&mut io, w, now_us()).unwrap();
    assert!(g2.crc_compared);
    assert_eq!(g2.chunks_stored, 2);
    let idx = repo.index(&mut io, g2.id).unwrap();
    assert_eq!(idx.resolve(0).unwrap().stored_by, g1.id);
    assert_eq!(idx.resolve(1).unwrap().loc, ChunkLoc::Zero);
    assert_eq!(idx.resolve(3).unwrap().loc, ChunkLoc::Data(ext.offset));
    assert_eq!(idx.resolve(3).unwrap().stored_by, g2.id);
    assert_eq!(idx.resolve(8), None);
    let mut chunk = vec![0u8; cs];
    assert_eq!(
        repo.read_chunk(&mut io, &idx, 6, &mut chunk).unwrap(),
        ChunkLoc::Data(ext.offset + CS as u64)
    );
    assert!(chunk == want6);
    // An all-zero and all-unchanged run needs no write at all.
    let w = repo.begin(&mut io, &s).unwrap();
    let mut same = src[..2 * cs].to_vec();
    let p = w.place_run(0, 2, &mut same).unwrap();
    assert_eq!(p.write, None);
    assert_eq!(p.unchanged, 2);
    repo.abort(&mut io, w).unwrap();
}

#[test]
fn writers_place_runs_from_several_threads() {
    let mut io = MemIo::new(16 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 256 * CS as u64;
    let src = pattern(9, size as usize);
    let w = Arc::new(repo.begin(&mut io, &spec("v", size, None)).unwrap());
    let placed: Vec<(u64, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let w = w.clone();
                let src = &src;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for run in (t..32).step_by(4) {
                        let first = run * 8;
                        let range =
                            (first * CS as u64) as usize..((first + 8) * CS as u64) as usize;
                        let mut buf = src[range].to_vec();
                        let p = w.place_run(first, 8, &mut buf).unwrap();
                        let e = p.write.unwrap();
                        out.push((e.offset, buf[..e.len as usize].to_vec()));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut extents: Vec<(u64, u64)> = placed.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
    extents.sort();
    for pair in extents.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 <= pair[1].0,
            "extents overlap: {pair:?}"
        );
    }
    for (offset, data) in &placed {
        io.write(*offset, data).unwrap();
    }
    let w = Arc::into_inner(w).unwrap();
    let g = repo.commit(&mut io, w, now_us()).unwrap();
    assert!(restored(&repo, &mut io, g.id, size) == src);
}

#[test]
fn commit_needs_every_chunk_and_drop_leaves_an_incomplete_record() {
    let mut io = MemIo::new(4 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let used0 = repo.info().used_bytes;
    let w = repo
        .begin(&mut io, &spec("v", 10 * CS as u64, None))
        .unwrap();
    let mut buf = pattern(1, 4 * CS as usize);
    w.write_run(&mut io, 2, 4, &mut buf).unwrap();
    w.mark_absent(0, 2).unwrap();
    assert!(w.inherit(6, 1).is_err(), "a full generation has no parent");
    assert!(w.place_run(9, 2, &mut buf).is_err(), "past the end");
    assert_eq!(w.unset_chunks(), 4);
    let id = w.id();
    assert!(repo.remove(&mut io, id).is_err(), "being written");
    let err = repo.commit(&mut io, w, 1).unwrap_err().to_string();
    assert!(
        err.contains("4 chunks were never written (first: chunk 6)"),
        "{err}"
    );
    // The writer is gone: its space is free, its record incomplete.
    assert_eq!(repo.generation(id).unwrap().state, GenState::InProgress);
    let reopened = Repo::open(&mut io).unwrap();
    assert_eq!(reopened.info().used_bytes, repo.info().used_bytes);
    assert_eq!(reopened.generation(id).unwrap().state, GenState::InProgress);
    assert!(matches!(
        repo.index(&mut io, id),
        Err(RepoError::Incomplete(_))
    ));
    repo.remove(&mut io, id).unwrap();
    assert!(repo.generations().is_empty());
    assert_eq!(repo.info().used_bytes, used0);
}

#[test]
fn removing_a_parent_keeps_its_children_whole_and_frees_space() {
    let mut io = MemIo::new(8 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 32 * CS as u64;
    let src = pattern(5, size as usize);
    let empty = repo.info().used_bytes;
    let g1 = full(&mut repo, &mut io, "v", &src, 4);
    let mut src2 = src.clone();
    src2[..CS as usize].fill(0xAB);
    let w = repo.begin(&mut io, &spec("v", size, Some(g1.id))).unwrap();
    let mut buf = src2[..CS as usize].to_vec();
    w.write_run(&mut io, 0, 1, &mut buf).unwrap();
    w.inherit(1, 31).unwrap();
    let g2 = repo.commit(&mut io, w, now_us()).unwrap();
    let with_both = repo.info().used_bytes;
    let r = repo.remove(&mut io, g1.id).unwrap();
    assert_eq!(r.removed, vec![g1.id]);
    // Chunk 0 of g1 and g1's index were g1's alone; and where two catalogs
    // were kept (one per slot) there is one now.
    assert_eq!(r.freed_bytes, CS as u64 + 2 * ALLOC_UNIT);
    assert_eq!(repo.info().used_bytes, with_both - r.freed_bytes);
    assert!(restored(&repo, &mut io, g2.id, size) == src2);
    let reopened = Repo::open(&mut io).unwrap();
    assert_eq!(reopened.info().used_bytes, repo.info().used_bytes);
    assert!(reopened.verify(&mut io, None).unwrap().is_ok());
    repo.remove(&mut io, g2.id).unwrap();
    assert_eq!(repo.info().used_bytes, empty);
}

#[test]
fn prune_by_count_and_age_per_source() {
    let mut io = MemIo::new(8 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 4 * CS as u64;
    let day = 86_400_000_000u64;
    let now = now_us();
    for (i, name) in ["a", "b", "a", "a", "b", "a"].iter().enumerate() {
        let w = repo.begin(&mut io, &spec(name, size, None)).unwrap();
        let mut buf = pattern(i as u64, size as usize);
        w.write_run(&mut io, 0, 4, &mut buf).unwrap();
        repo.commit(&mut io, w, now - (10 - i as u64) * day)
            .unwrap();
    }
    // a: 1 3 4 6, b: 2 5 (consistency points 10..5 days ago).
    let r = repo
        .prune_older_than(&mut io, Duration::from_secs(7 * 86_400 + 60))
        .unwrap();
    assert_eq!(r.removed, vec![1, 2, 3]);
    let r = repo.prune_keep(&mut io, 1).unwrap();
    assert_eq!(r.removed, vec![4]);
    let ids: Vec<u64> = repo.generations().iter().map(|g| g.id).collect();
    assert_eq!(ids, vec![5, 6]);
    // The newest of each source survives any age.
    let r = repo.prune_older_than(&mut io, Duration::ZERO).unwrap();
    assert!(r.removed.is_empty());
    assert!(repo.verify(&mut io, None).unwrap().is_ok());
}

#[test]
fn a_torn_newest_superblock_falls_back_to_the_previous_state() {
    let mut io = MemIo::new(4 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 8 * CS as u64;
    let src = pattern(11, size as usize);
    let g1 = full(&mut repo, &mut io, "v", &src, 8);
    let g2 = full(&mut repo, &mut io, "v", &pattern(12, size as usize), 8);
    let slot = repo.slot;
    io.data[slot * 4096 + 100] ^= 0xFF;
    let back = Repo::open(&mut io).unwrap();
    assert_eq!(back.generation(g1.id).unwrap().state, GenState::Complete);
    assert_eq!(
        back.generation(g2.id).unwrap().state,
        GenState::InProgress,
        "the commit of g2 is lost, its begin is not"
    );
    assert!(restored(&back, &mut io, g1.id, size) == src);
    let report = back.verify(&mut io, None).unwrap();
    assert!(report.is_ok(), "{:?}", report.messages());
    assert!(
        report.warnings[0].contains("crc32c mismatch"),
        "{:?}",
        report.warnings
    );
    // Both slots bad: a clear error.
    io.data[(1 - slot) * 4096 + 200] ^= 0xFF;
    let err = Repo::open(&mut io).unwrap_err().to_string();
    assert!(
        err.starts_with("corrupt superblock: slot 0: crc32c mismatch"),
        "{err}"
    );
}

#[test]
fn damaged_metadata_never_panics() {
    let mut io = MemIo::new(2 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 20 * CS as u64 + 512;
    let g1 = full(&mut repo, &mut io, "v", &source(1, size as usize), 3);
    let w = repo.begin(&mut io, &spec("v", size, Some(g1.id))).unwrap();
    let mut buf = pattern(2, 2 * CS as usize);
    w.write_run(&mut io, 4, 2, &mut buf).unwrap();
    w.inherit(0, 4).unwrap();
    w.inherit(6, 15).unwrap();
    repo.commit(&mut io, w, 5).unwrap();
    let pristine = io.clone();
    let used = (repo.info().used_bytes as usize).min(io.data.len());
    let mut x = 0x1234_5678_9ABC_DEF1u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut opened = 0;
    for _ in 0..300 {
        let mut io = pristine.clone();
        for _ in 0..1 + next() % 4 {
            // Metadata lives near the start (first fit); hit it often.
            let at = (next() % (used as u64 + 16384)) as usize % io.data.len();
            io.data[at] ^= 1 << (next() % 8);
        }
        // Anything but a panic is acceptable.
        if let Ok(r) = Repo::open(&mut io) {
            opened += 1;
            let _ = r.verify(&mut io, None);
            for g in r.generations() {
                let mut dst = MemIo::new(size.next_multiple_of(4096), 512);
                let _ = r.restore(&mut io, g.id, &mut dst, &mut |_, _| {});
            }
        }
        if let Ok(r) = Repo::open_reader(&mut io) {
            for g in r.generations() {
                let mut dst = MemIo::new(size.next_multiple_of(4096), 512);
                let _ = r.restore(&mut io, g.id, &mut dst, &mut |_, _| {});
            }
        }
    }
    assert!(opened > 0);
}

/// A [`MemIo`] whose `fail_at`-th write from now fails.
struct FailingIo {
    mem: MemIo,
    fail_at: Option<u64>,
}

impl BlockIo for FailingIo {
    fn block_size(&self) -> u32 {
        self.mem.block_size()
    }
    fn size_bytes(&self) -> u64 {
        self.mem.size_bytes()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.mem.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match self.fail_at {
            Some(0) => {
                self.fail_at = None;
                Err(RepoError::Io {
                    op: "write",
                    offset,
                    len: data.len() as u64,
                    source: hotcopy_bdev::IoError::Device(5),
                })
            }
            Some(n) => {
                self.fail_at = Some(n - 1);
                self.mem.write(offset, data)
            }
            None => self.mem.write(offset, data),
        }
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_commit_before_its_superblock_leaves_the_repository_usable() {
    let mut io = FailingIo {
        mem: MemIo::new(4 << 20, 512),
        fail_at: None,
    };
    let mut repo = Repo::format(&mut io, false).unwrap();
    let empty = repo.info().used_bytes;
    let w = repo
        .begin(&mut io, &spec("v", 4 * CS as u64, None))
        .unwrap();
    let mut buf = pattern(1, 4 * CS as usize);
    w.write_run(&mut io, 0, 4, &mut buf).unwrap();
    let id = w.id();
    // Index written, catalog write fails.
    io.fail_at = Some(1);
    let err = repo.commit(&mut io, w, 1).unwrap_err();
    assert!(matches!(err, RepoError::Io { .. }), "{err}");
    assert_eq!(repo.generation(id).unwrap().state, GenState::InProgress);
    repo.remove(&mut io, id).unwrap();
    assert_eq!(repo.info().used_bytes, empty, "nothing leaked");
    // The repository carries on.
    let w = repo
        .begin(&mut io, &spec("v", 4 * CS as u64, None))
        .unwrap();
    w.write_run(&mut io, 0, 4, &mut buf.clone()).unwrap();
    repo.commit(&mut io, w, 2).unwrap();
    assert!(repo.verify(&mut io, None).unwrap().is_ok());
}

#[test]
fn a_failed_superblock_write_poisons_until_reopen() {
    let mut io = FailingIo {
        mem: MemIo::new(4 << 20, 512),
        fail_at: None,
    };
    let mut repo = Repo::format(&mut io, false).unwrap();
    let w = repo
        .begin(&mut io, &spec("v", 4 * CS as u64, None))
        .unwrap();
    let mut buf = pattern(1, 4 * CS as usize);
    w.write_run(&mut io, 0, 4, &mut buf).unwrap();
    let id = w.id();
    let other = repo
        .begin(&mut io, &spec("w", 4 * CS as u64, None))
        .unwrap();
    // Index and catalog written, the superblock write fails.
    io.fail_at = Some(2);
    assert!(matches!(
        repo.commit(&mut io, w, 1),
        Err(RepoError::Io { .. })
    ));
    assert!(matches!(
        repo.begin(&mut io, &spec("v", 4 * CS as u64, None)),
        Err(RepoError::Poisoned)
    ));
    assert!(matches!(
        other.place_run(0, 4, &mut buf),
        Err(RepoError::Poisoned)
    ));
    assert!(matches!(repo.remove(&mut io, id), Err(RepoError::Poisoned)));
    drop(other);
    let mut repo = Repo::open(&mut io).unwrap();
    assert_eq!(repo.generation(id).unwrap().state, GenState::InProgress);
    repo.remove(&mut io, id).unwrap();
    assert!(repo.verify(&mut io, None).unwrap().is_ok());
}

#[test]
fn running_backups_pin_their_parent_and_absent_chunks_are_not_restored() {
    let mut io = MemIo::new(4 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 6 * CS as u64;
    let src = pattern(4, size as usize);
    let g1 = full(&mut repo, &mut io, "v", &src, 6);
    let w = repo.begin(&mut io, &spec("v", size, Some(g1.id))).unwrap();
    let err = repo.remove(&mut io, g1.id).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "generation {} is being written against it",
            w.id()
        )),
        "{err}"
    );
    let r = repo.prune_keep(&mut io, 0).unwrap();
    assert_eq!((r.removed, r.kept_in_use), (vec![], vec![g1.id]));
    // Chunks 0-1 out of scope, 2 zero, 3-5 unchanged.
    w.mark_absent(0, 2).unwrap();
    w.mark_zero(2, 1).unwrap();
    w.inherit(3, 3).unwrap();
    let g2 = repo.commit(&mut io, w, 3).unwrap();
    assert_eq!(
        (g2.chunks_absent, g2.zero_chunks, g2.chunks_stored),
        (2, 1, 0)
    );
    let mut dst = MemIo::new(size, 512);
    dst.data.fill(0xEE);
    let stats = repo
        .restore(&mut io, g2.id, &mut dst, &mut |_, _| {})
        .unwrap();
    assert_eq!(
        (stats.absent_chunks, stats.zero_chunks, stats.data_chunks),
        (2, 1, 3)
    );
    let cs = CS as usize;
    assert!(
        dst.data[..2 * cs].iter().all(|&b| b == 0xEE),
        "absent: untouched"
    );
    assert!(
        dst.data[2 * cs..3 * cs].iter().all(|&b| b == 0),
        "zero chunk"
    );
    assert!(dst.data[3 * cs..] == src[3 * cs..]);
    // Now g1 can go; g2 keeps the data it shares.
    assert_eq!(repo.prune_keep(&mut io, 1).unwrap().removed, vec![g1.id]);
    assert!(repo.verify(&mut io, None).unwrap().is_ok());
}

/// A superblock whose sequence number is at its maximum (forged or
/// corrupt) opens, but a change is refused with a clear error instead of
/// wrapping the sequence to 0, which would make the next open pick the
/// older slot and lose the change (found by the `repo_open` fuzz target).
#[test]
fn a_superblock_sequence_at_its_maximum_refuses_changes() {
    let mut io = MemIo::new(4 << 20, 512);
    Repo::format(&mut io, false).unwrap();
    let mut b = vec![0u8; SLOT_BYTES];
    let mut slot = None;
    for s in 0..2u64 {
        io.read(s * SLOT_BYTES as u64, &mut b).unwrap();
        if let Ok(sb) = format::Superblock::decode(&b, io.size_bytes()) {
            slot = Some((s, sb));
        }
    }
    let (s, mut sb) = slot.expect("a formatted repository has a valid superblock");
    sb.seq = u64::MAX;
    io.write(s * SLOT_BYTES as u64, &sb.encode()).unwrap();
    let mut repo = Repo::open(&mut io).unwrap();
    let Err(err) = repo.begin(&mut io, &spec("v", 4 * CS as u64, None)) else {
        panic!("no change can be recorded");
    };
    let err = err.to_string();
    assert!(err.contains("sequence number is at its maximum"), "{err}");
}

/// A [`MemIo`] that records what is read and refuses every write and flush.
struct ReadOnlyIo<'a> {
    mem: &'a mut MemIo,
    reads: Vec<(u64, u64)>,
    refused: u64,
}

impl<'a> ReadOnlyIo<'a> {
    fn new(mem: &'a mut MemIo) -> Self {
        ReadOnlyIo {
            mem,
            reads: Vec::new(),
            refused: 0,
        }
    }

    /// Whether any read touched `len` bytes at `offset`.
    fn touched(&self, offset: u64, len: u64) -> bool {
        self.reads
            .iter()
            .any(|&(o, l)| o < offset + len && offset < o + l)
    }
}

impl BlockIo for ReadOnlyIo<'_> {
    fn block_size(&self) -> u32 {
        self.mem.block_size()
    }
    fn size_bytes(&self) -> u64 {
        self.mem.size_bytes()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reads.push((offset, buf.len() as u64));
        self.mem.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.refused += 1;
        Err(RepoError::Io {
            op: "write",
            offset,
            len: data.len() as u64,
            source: hotcopy_bdev::IoError::Device(30), // EROFS
        })
    }
    fn flush(&mut self) -> Result<()> {
        self.refused += 1;
        Err(RepoError::Io {
            op: "flush",
            offset: 0,
            len: 0,
            source: hotcopy_bdev::IoError::Device(30),
        })
    }
}

/// A full generation and `n` incrementals of `size` bytes, each changing a
/// few chunks; returns each generation with its source.
fn chain(repo: &mut Repo, io: &mut MemIo, size: u64, n: u64) -> Vec<(Generation, Vec<u8>)> {
    let mut src = source(21, size as usize);
    let g1 = full(repo, io, "vol", &src, 5);
    let mut out = vec![(g1.clone(), src.clone())];
    let mut parent = g1.id;
    let chunks = size.div_ceil(CS as u64);
    for round in 0..n {
        let changed = [(round * 5 + 1) % chunks, (round * 3 + 7) % chunks];
        let w = repo.begin(io, &spec("vol", size, Some(parent))).unwrap();
        for c in 0..w.chunks() {
            if changed.contains(&c) {
                let start = (c * CS as u64) as usize;
                let end = (start + CS as usize).min(src.len());
                src[start..end].copy_from_slice(&pattern(round * 1000 + c, end - start));
                let mut buf = vec![0u8; CS as usize];
                buf[..end - start].copy_from_slice(&src[start..end]);
                w.write_run(io, c, 1, &mut buf).unwrap();
            } else {
                w.mark_unchanged(c).unwrap();
            }
        }
        let g = repo.commit(io, w, now_us()).unwrap();
        out.push((g.clone(), src.clone()));
        parent = g.id;
    }
    out
}

/// Flips a bit in the entries of the first block of `g`'s index.
fn damage_index(io: &mut MemIo, g: &Generation) {
    let idx = g.index.expect("a complete generation has an index");
    io.data[idx.offset as usize + 100] ^= 0x10;
}

#[test]
fn a_reader_restores_the_same_bytes_reading_only_its_generation_and_never_writing() {
    let mut mem = MemIo::new(8 << 20, 512);
    let mut repo = Repo::format(&mut mem, false).unwrap();
    let size = 24 * CS as u64 - 512;
    let gens = chain(&mut repo, &mut mem, size, 5);
    let before = mem.data.clone();
    let mut io = ReadOnlyIo::new(&mut mem);
    let reader = Repo::open_reader(&mut io).unwrap();
    assert_eq!(reader.uuid(), repo.uuid());
    assert_eq!(reader.sequence(), repo.info().sequence);
    assert_eq!(reader.generations(), repo.generations());
    assert_eq!(reader.latest(Some("vol")), repo.latest(Some("vol")));
    assert_eq!(reader.latest(Some("other")), None);
    // Opening read the superblocks and the catalog, and no index.
    for (g, _) in &gens {
        let idx = g.index.unwrap();
        assert!(
            !io.touched(idx.offset, idx.len),
            "opening a reader read generation {}'s index",
            g.id
        );
    }
    for (g, want) in &gens {
        let mut dst = MemIo::new(size.next_multiple_of(4096), 512);
        let stats = reader
            .restore(&mut io, g.id, &mut dst, &mut |_, _| {})
            .unwrap();
        assert_eq!(stats.bytes_written, size);
        assert!(dst.data[..size as usize] == want[..], "generation {}", g.id);
        let mut full = MemIo::new(size.next_multiple_of(4096), 512);
        repo.restore(io.mem, g.id, &mut full, &mut |_, _| {})
            .unwrap();
        assert!(full.data == dst.data, "generation {}", g.id);
        // Chunk by chunk too.
        let index = reader.index(&mut io, g.id).unwrap();
        let mut chunk = vec![0u8; CS as usize];
        for c in 0..index.chunks() {
            reader.read_chunk(&mut io, &index, c, &mut chunk).unwrap();
            let at = (c * CS as u64) as usize;
            let len = index.chunk_len(c) as usize;
            assert!(chunk[..len] == want[at..at + len], "chunk {c}");
        }
    }
    assert_eq!(io.refused, 0, "a reader never writes nor flushes");
    drop(io);
    assert!(mem.data == before, "the namespace is unchanged");
    assert!(matches!(
        reader.index(&mut mem, 999),
        Err(RepoError::NoSuchGeneration(999))
    ));
}

#[test]
fn a_reader_reports_damage_to_the_index_it_reads_and_ignores_the_others() {
    let mut io = MemIo::new(8 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 12 * CS as u64;
    let gens = chain(&mut repo, &mut io, size, 3);
    let (bad, _) = &gens[1];
    let (good, want) = &gens[3];
    damage_index(&mut io, bad);
    // The full open finds the damage; the reader does not look.
    let full = Repo::open(&mut io).unwrap();
    let found = full
        .damage(bad.id)
        .expect("open finds the damage")
        .to_string();
    assert!(full.damage(good.id).is_none());
    let reader = Repo::open_reader(&mut io).unwrap();
    let mut dst = MemIo::new(size, 512);
    reader
        .restore(&mut io, good.id, &mut dst, &mut |_, _| {})
        .unwrap();
    assert!(dst.data == *want, "an intact generation restores");
    // Reading the damaged generation fails with the error a full open
    // gives, naming the generation and the block.
    let err = reader.index(&mut io, bad.id).unwrap_err();
    let RepoError::CorruptIndex { generation, why } = &err else {
        panic!("not a corrupt index: {err}");
    };
    assert_eq!(*generation, bad.id);
    assert_eq!(*why, found);
    assert!(why.contains("index block 0"), "{why}");
    assert_eq!(
        err.to_string(),
        full.index(&mut io, bad.id).unwrap_err().to_string()
    );
    let mut dst = MemIo::new(size, 512);
    let err = reader
        .restore(&mut io, bad.id, &mut dst, &mut |_, _| {})
        .unwrap_err();
    assert!(
        matches!(err, RepoError::CorruptIndex { generation, .. } if generation == bad.id),
        "{err}"
    );
    assert!(dst.data.iter().all(|&b| b == 0), "nothing restored");
}

#[test]
fn a_reader_refuses_incomplete_generations_and_falls_back_like_open() {
    let mut io = MemIo::new(8 << 20, 512);
    let mut repo = Repo::format(&mut io, false).unwrap();
    let size = 8 * CS as u64;
    let src = source(31, size as usize);
    let g1 = full(&mut repo, &mut io, "v", &src, 8);
    let w = repo.begin(&mut io, &spec("v", size, None)).unwrap();
    let pending = w.id();
    let reader = Repo::open_reader(&mut io).unwrap();
    assert!(matches!(
        reader.index(&mut io, pending),
        Err(RepoError::Incomplete(id)) if id == pending
    ));
    drop(w);
    // The newest catalog corrupt: both opens use the other slot's.
    let loc = repo.cur.loc;
    io.data[loc.offset as usize + 70] ^= 1;
    let full = Repo::open(&mut io).unwrap();
    let reader = Repo::open_reader(&mut io).unwrap();
    assert_eq!(reader.generations(), full.generations());
    assert_eq!(reader.sequence(), full.info().sequence);
    assert!(reader.generation(pending).is_none(), "the previous state");
    let mut dst = MemIo::new(size, 512);
    reader
        .restore(&mut io, g1.id, &mut dst, &mut |_, _| {})
        .unwrap();
    assert!(dst.data == src);
    // Neither slot usable: the same error as open.
    io.data[SLOT_BYTES + 100] ^= 0xFF;
    io.data[100] ^= 0xFF;
    assert_eq!(
        Repo::open_reader(&mut io).unwrap_err().to_string(),
        Repo::open(&mut io).unwrap_err().to_string()
    );
}
