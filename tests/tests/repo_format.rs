//! The backup repository on real bdevs: format and open, foreign data,
//! generations restored byte for byte, chain-independent resolution, prune,
//! corruption found by verify, and two power-cut campaigns of random
//! backups, prunes, removals, aborts and restores:
//!
//! * on the `fault` bdev with a volatile write cache: at the cut, every
//!   write not covered by a completed flush is lost, and a cut can land in
//!   the middle of a flush's write-back;
//! * on an in-memory model where each 512-byte sector of every unflushed
//!   write survives or not independently (torn and reordered writes), which
//!   catches a missing flush between the data and the superblock.
//!
//! After every cut the repository is reopened; every committed generation
//! must be complete, restore exactly and verify; an interrupted commit is
//! either complete and exact or incomplete and removable; no space leaks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hotcopy_bdev::modules::{fault, malloc, uring};
use hotcopy_bdev::{BdevIo, BdevRegistry, IoError, IoStatus};
use hotcopy_cow::repo::{
    now_us, BlockIo, ChannelIo, ChunkLoc, GenKind, GenSpec, GenState, GenWriter, Generation, MemIo,
    Repo, RepoError, SourceIdent,
};
use hotcopy_tests::*;

const CS: u32 = 16 * 1024;
const CSU: usize = CS as usize;

fn spec(size: u64, parent: Option<u64>, compare: bool) -> GenSpec {
    GenSpec {
        source: SourceIdent {
            name: "vol0".into(),
            size_bytes: size,
        },
        chunk_size: CS,
        parent,
        compare_with_parent: compare,
    }
}

/// The bytes of `chunk` of `src`, padded to a whole chunk.
fn chunk_of(src: &[u8], chunk: u64) -> Vec<u8> {
    let start = chunk as usize * CSU;
    let end = (start + CSU).min(src.len());
    let mut buf = vec![0u8; CSU];
    buf[..end - start].copy_from_slice(&src[start..end]);
    buf
}

/// Places `chunks` (consecutive ones grouped into runs of up to `max_run`)
/// and writes them.
fn write_chunks(
    io: &mut dyn BlockIo,
    w: &GenWriter,
    src: &[u8],
    chunks: &[u64],
    max_run: usize,
) -> Result<(), RepoError> {
    let mut i = 0;
    while i < chunks.len() {
        let mut n = 1;
        while i + n < chunks.len() && n < max_run && chunks[i + n] == chunks[i] + n as u64 {
            n += 1;
        }
        let mut buf = Vec::with_capacity(n * CSU);
        for k in 0..n as u64 {
            buf.extend_from_slice(&chunk_of(src, chunks[i] + k));
        }
        w.write_run(io, chunks[i], n as u64, &mut buf)?;
        i += n;
    }
    Ok(())
}

/// Chunks whose content differs between `a` and `b`.
fn changed_chunks(a: &[u8], b: &[u8]) -> Vec<u64> {
    let chunks = a.len().div_ceil(CSU) as u64;
    (0..chunks)
        .filter(|&c| chunk_of(a, c) != chunk_of(b, c))
        .collect()
}

/// Restores `id` into memory and returns the source's bytes.
fn restore_to_vec(repo: &Repo, io: &mut dyn BlockIo, id: u64) -> Result<Vec<u8>, RepoError> {
    let size = repo.generation(id).unwrap().source.size_bytes;
    let mut dst = MemIo::new(size.next_multiple_of(4096), 512);
    repo.restore(io, id, &mut dst, &mut |_, _| {})?;
    dst.data.truncate(size as usize);
    Ok(dst.data)
}

/// Flips one bit at byte `at` of the device, through `io`.
fn flip_bit(io: &mut dyn BlockIo, at: u64) {
    let bs = io.block_size() as u64;
    let block = at / bs * bs;
    let mut buf = vec![0u8; bs as usize];
    io.read(block, &mut buf).unwrap();
    buf[(at - block) as usize] ^= 0x04;
    io.write(block, &buf).unwrap();
    io.flush().unwrap();
}

/// A [`BlockIo`] that counts requests.
struct Counting<'a> {
    io: &'a mut dyn BlockIo,
    reads: u64,
    read_bytes: u64,
}

impl BlockIo for Counting<'_> {
    fn block_size(&self) -> u32 {
        self.io.block_size()
    }
    fn size_bytes(&self) -> u64 {
        self.io.size_bytes()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), RepoError> {
        self.reads += 1;
        self.read_bytes += buf.len() as u64;
        self.io.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RepoError> {
        self.io.write(offset, data)
    }
    fn flush(&mut self) -> Result<(), RepoError> {
        self.io.flush()
    }
}

#[test]
fn format_and_open_round_trip_on_malloc_and_uring() {
    let dir = scratch_dir();
    let reg = BdevRegistry::new();
    malloc::create(&reg, "m0", 8 << 20, 512).unwrap();
    let opts = uring::UringOptions {
        size: Some(8 << 20),
        ..uring::UringOptions::new(dir.path().join("repo.img"))
    };
    uring::create(&reg, "u0", &opts).unwrap();
    for name in ["m0", "u0"] {
        let desc = reg.open(name, true).unwrap();
        on_reactor(move |_| {
            let mut io = ChannelIo::new(desc.channel().unwrap());
            let mut repo = Repo::format(&mut io, false).unwrap();
            let info = repo.info();
            assert_eq!(info.size_bytes, 8 << 20);
            assert_eq!(info.generations, 0);
            let src = pattern(1, 10 * CSU + 512);
            let w = repo
                .begin(&mut io, &spec(src.len() as u64, None, false))
                .unwrap();
            write_chunks(&mut io, &w, &src, &(0..11).collect::<Vec<_>>(), 4).unwrap();
            let g = repo.commit(&mut io, w, 1234).unwrap();
            drop(repo);
            let repo = Repo::open(&mut io).unwrap();
            assert_eq!(repo.generations(), std::slice::from_ref(&g));
            assert_eq!(g.consistency_point_us, 1234);
            assert_eq!(repo.info().uuid, info.uuid);
            assert!(
                restore_to_vec(&repo, &mut io, g.id).unwrap() == src,
                "{name}"
            );
            assert!(repo.verify(&mut io, None).unwrap().is_ok(), "{name}");
        });
    }
}

#[test]
fn foreign_data_is_refused_without_force() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "m0", 4 << 20, 512).unwrap();
    let desc = reg.open("m0", true).unwrap();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        let mut foreign = pattern(7, 4096);
        foreign[0] = 0xAB;
        assert_eq!(write(&mut ch, 64, &foreign), IoStatus::Success);
        let mut io = ChannelIo::new(ch);
        let err = Repo::open(&mut io).unwrap_err();
        assert!(matches!(err, RepoError::NotARepository), "{err}");
        assert!(err.to_string().starts_with("not a hotcopy repository"));
        let err = Repo::format(&mut io, false).unwrap_err().to_string();
        assert!(
            err.contains("not a hotcopy repository (non-zero byte at offset 32768)"),
            "{err}"
        );
        let mut ch = io.into_inner();
        assert_eq!(read(&mut ch, 64, 8).unwrap(), foreign, "untouched");
        let mut io = ChannelIo::new(ch);
        let repo = Repo::format(&mut io, true).unwrap();
        let err = Repo::format(&mut io, false).unwrap_err().to_string();
        assert!(err.contains("holds a hotcopy repository"), "{err}");
        assert_eq!(Repo::open(&mut io).unwrap().uuid(), repo.uuid());
    });
}

#[test]
fn full_and_fifty_incrementals_restore_byte_for_byte() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "repo", 16 << 20, 512).unwrap();
    malloc::create(&reg, "src", 1 << 20, 512).unwrap();
    malloc::create(&reg, "dst", 1 << 20, 4096).unwrap();
    let (repo_d, src_d, dst_d) = (
        reg.open("repo", true).unwrap(),
        reg.open("src", true).unwrap(),
        reg.open("dst", true).unwrap(),
    );
    on_reactor(move |_| {
        let mut io = ChannelIo::new(repo_d.channel().unwrap());
        let mut src = ChannelIo::new(src_d.channel().unwrap());
        let mut dst = ChannelIo::new(dst_d.channel().unwrap());
        let size = src.size_bytes();
        let chunks = size / CS as u64;
        let mut repo = Repo::format(&mut io, false).unwrap();
        let mut image = vec![0u8; size as usize];
        src.read(0, &mut image).unwrap();
        let mut rng = 0x9E37_79B9u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // The source starts half full: the empty half is zero chunks.
        src.write(0, &pattern(1, size as usize / 2)).unwrap();
        let mut versions: Vec<(Generation, Vec<u8>)> = Vec::new();
        let mut parent: Option<u64> = None;
        for round in 0..51u64 {
            let mut now = vec![0u8; size as usize];
            src.read(0, &mut now).unwrap();
            // Even rounds track changes; odd ones compare checksums.
            let compare = parent.is_some() && round % 2 == 1;
            let w = repo.begin(&mut io, &spec(size, parent, compare)).unwrap();
            let copy: Vec<u64> = match parent {
                Some(_) if !compare => changed_chunks(&image, &now),
                _ => (0..chunks).collect(),
            };
            write_chunks(&mut io, &w, &now, &copy, 8).unwrap();
            for c in (0..chunks).filter(|c| !copy.contains(c)) {
                w.mark_unchanged(c).unwrap();
            }
            let g = repo.commit(&mut io, w, now_us()).unwrap();
            assert_eq!(g.kind == GenKind::Incremental, parent.is_some());
            if parent.is_some() {
                assert!(
                    g.chunks_stored <= 6,
                    "round {round}: an incremental stored {} chunks",
                    g.chunks_stored
                );
            }
            image = now;
            parent = Some(g.id);
            versions.push((g, image.clone()));
            // Change 1 to 5 chunks, some to zeros, some partly.
            for _ in 0..1 + next() % 5 {
                let c = next() % chunks;
                let data = match next() % 4 {
                    0 => vec![0u8; CSU],
                    _ => pattern(next(), CSU),
                };
                let off = (next() % 4) as usize * 512;
                src.write(c * CS as u64 + off as u64, &data[off..]).unwrap();
            }
        }
        let repo = Repo::open(&mut io).unwrap();
        assert_eq!(repo.generations().len(), 51);
        for (g, want) in &versions {
            let mut calls = 0;
            let stats = repo
                .restore(&mut io, g.id, &mut dst, &mut |done, total| {
                    assert!(done <= total);
                    calls += 1;
                })
                .unwrap();
            assert!(calls >= 1);
            assert_eq!(stats.bytes_written, size);
            let mut got = vec![0u8; size as usize];
            dst.read(0, &mut got).unwrap();
            assert!(got == *want, "generation {} differs after restore", g.id);
        }
        let report = repo.verify(&mut io, None).unwrap();
        assert!(report.is_ok(), "{:?}", report.messages());
        assert_eq!(report.generations.len(), 51);
    });
}

#[test]
fn resolving_a_chunk_costs_the_same_at_any_chain_length() {
    // The chain: generation 1 against generation 100.
    const GENERATIONS: u64 = 100;
    let reg = BdevRegistry::new();
    malloc::create(&reg, "repo", 32 << 20, 512).unwrap();
    let desc = reg.open("repo", true).unwrap();
    on_reactor(move |_| {
        let mut io = ChannelIo::new(desc.channel().unwrap());
        let mut repo = Repo::format(&mut io, false).unwrap();
        let size = 600 * CS as u64; // three index blocks
        let mut src = pattern(3, size as usize);
        let w = repo.begin(&mut io, &spec(size, None, false)).unwrap();
        write_chunks(&mut io, &w, &src, &(0..600).collect::<Vec<_>>(), 64).unwrap();
        let first = repo.commit(&mut io, w, 1).unwrap();
        let mut last = first.clone();
        for n in 1..GENERATIONS {
            // Each incremental stores one chunk and inherits the rest.
            let c = n * 7 % 600;
            src[c as usize * CSU] ^= 0xFF;
            let w = repo
                .begin(&mut io, &spec(size, Some(last.id), false))
                .unwrap();
            write_chunks(&mut io, &w, &src, &[c], 1).unwrap();
            w.inherit(0, c).unwrap();
            if c + 1 < 600 {
                w.inherit(c + 1, 600 - c - 1).unwrap();
            }
            last = repo.commit(&mut io, w, 1 + n).unwrap();
        }
        let cost = |repo: &Repo, io: &mut ChannelIo, id: u64| {
            let mut c = Counting {
                io,
                reads: 0,
                read_bytes: 0,
            };
            let idx = repo.index(&mut c, id).unwrap();
            let index_cost = (c.reads, c.read_bytes);
            // A chunk no incremental touched: stored by the full generation.
            let e = idx.resolve(599).unwrap();
            assert_eq!(e.stored_by, first.id);
            let mut buf = vec![0u8; CSU];
            c.reads = 0;
            c.read_bytes = 0;
            assert!(matches!(
                repo.read_chunk(&mut c, &idx, 599, &mut buf).unwrap(),
                ChunkLoc::Data(_)
            ));
            (index_cost, (c.reads, c.read_bytes), idx)
        };
        let (i1, r1, idx1) = cost(&repo, &mut io, first.id);
        let (i_n, r_n, idx_n) = cost(&repo, &mut io, last.id);
        assert_eq!(
            i1, i_n,
            "loading the index of generation 1 vs {GENERATIONS}"
        );
        assert_eq!(r1, (1, CS as u64), "one read of one chunk");
        assert_eq!(
            r_n, r1,
            "reading a shared chunk from generation {GENERATIONS}"
        );
        // Structurally: every chunk of the last generation resolves from its own
        // index, to the data of whichever generation stored it.
        assert_eq!(idx_n.chunks(), 600);
        let mut by: BTreeMap<u64, u64> = BTreeMap::new();
        for c in 0..600 {
            let e = idx_n.resolve(c).unwrap();
            *by.entry(e.stored_by).or_default() += 1;
            if e.stored_by == first.id {
                assert_eq!(
                    idx1.resolve(c),
                    Some(e),
                    "chunk {c} is shared with generation 1"
                );
            }
        }
        assert_eq!(
            by.len() as u64,
            GENERATIONS,
            "data from every generation of the chain"
        );
        assert_eq!(by[&first.id], 600 - (GENERATIONS - 1));
    });
}

#[test]
fn prune_keeps_the_rest_verifiable_and_frees_space() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "repo", 8 << 20, 4096).unwrap();
    let desc = reg.open("repo", true).unwrap();
    on_reactor(move |_| {
        let mut io = ChannelIo::new(desc.channel().unwrap());
        let mut repo = Repo::format(&mut io, false).unwrap();
        let empty = repo.info().used_bytes;
        let size = 32 * CS as u64;
        let mut src = pattern(1, size as usize);
        let mut versions = Vec::new();
        let mut parent = None;
        for n in 0..6u64 {
            let w = repo.begin(&mut io, &spec(size, parent, false)).unwrap();
            let copy: Vec<u64> = if parent.is_none() {
                (0..32).collect()
            } else {
                vec![n, n + 10]
            };
            for &c in &copy {
                src[c as usize * CSU..(c as usize + 1) * CSU]
                    .copy_from_slice(&pattern(100 + n * 32 + c, CSU));
            }
            write_chunks(&mut io, &w, &src, &copy, 4).unwrap();
            for c in (0..32).filter(|c| !copy.contains(c)) {
                w.mark_unchanged(c).unwrap();
            }
            let g = repo
                .commit(&mut io, w, now_us() - (6 - n) * 3_600_000_000)
                .unwrap();
            parent = Some(g.id);
            versions.push((g.id, src.clone()));
        }
        // An abandoned backup (as after a crash) is listed incomplete.
        let w = repo.begin(&mut io, &spec(size, parent, false)).unwrap();
        write_chunks(&mut io, &w, &src, &[0, 1], 2).unwrap();
        let stale = w.id();
        drop(w);
        let full = repo.info().used_bytes;
        // Keep 3: the full generation and two incrementals go, and so does
        // every chunk only they referenced.
        let r = repo.prune_keep(&mut io, 3).unwrap();
        assert_eq!(r.removed, vec![1, 2, 3]);
        assert!(r.freed_bytes >= 4 * CS as u64, "freed {}", r.freed_bytes);
        assert_eq!(repo.info().used_bytes, full - r.freed_bytes);
        assert_eq!(
            repo.generation(stale).unwrap().state,
            GenState::InProgress,
            "prune leaves incomplete records alone"
        );
        repo.remove(&mut io, stale).unwrap();
        let report = repo.verify(&mut io, None).unwrap();
        assert!(report.is_ok(), "{:?}", report.messages());
        for (id, want) in &versions[3..] {
            assert!(
                restore_to_vec(&repo, &mut io, *id).unwrap() == *want,
                "gen {id}"
            );
        }
        // By age: older than 90 minutes, but the newest always stays.
        let r = repo
            .prune_older_than(&mut io, Duration::from_secs(90 * 60))
            .unwrap();
        assert_eq!(r.removed, vec![4, 5]);
        // Space freed is free after a reopen too (nothing leaked).
        let used = repo.info().used_bytes;
        let reopened = Repo::open(&mut io).unwrap();
        assert_eq!(reopened.info().used_bytes, used);
        assert!(restore_to_vec(&reopened, &mut io, 6).unwrap() == versions[5].1);
        drop(reopened);
        repo.remove(&mut io, 6).unwrap();
        assert_eq!(repo.info().used_bytes, empty, "an empty repository again");
        // The freed space is usable: a new full backup fits where the old
        // data was.
        let big = pattern(9, (repo.info().free_bytes - (1 << 20)) as usize);
        let w = repo
            .begin(&mut io, &spec(big.len() as u64, None, false))
            .unwrap();
        let all: Vec<u64> = (0..w.chunks()).collect();
        write_chunks(&mut io, &w, &big, &all, 32).unwrap();
        let g = repo.commit(&mut io, w, now_us()).unwrap();
        assert!(restore_to_vec(&repo, &mut io, g.id).unwrap() == big);
    });
}

/// A repository with a full generation of 20 chunks and two incrementals
/// that each change one chunk; returns it with each generation's content.
fn three_generations(io: &mut ChannelIo) -> (Repo, Vec<(Generation, Vec<u8>)>) {
    let mut repo = Repo::format(io, false).unwrap();
    let size = 20 * CS as u64;
    let mut src = pattern(5, size as usize);
    let mut out: Vec<(Generation, Vec<u8>)> = Vec::new();
    for n in 0..3u64 {
        let parent = out.last().map(|(g, _)| g.id);
        let w = repo.begin(io, &spec(size, parent, false)).unwrap();
        let copy: Vec<u64> = if parent.is_none() {
            (0..20).collect()
        } else {
            vec![n * 3]
        };
        if parent.is_some() {
            src[(n * 3) as usize * CSU + 10] ^= 0x55;
        }
        write_chunks(io, &w, &src, &copy, 5).unwrap();
        for c in (0..20).filter(|c| !copy.contains(c)) {
            w.mark_unchanged(c).unwrap();
        }
        out.push((repo.commit(io, w, n + 1).unwrap(), src.clone()));
    }
    (repo, out)
}

#[test]
fn a_corrupt_superblock_slot_falls_back_to_the_other() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "repo", 4 << 20, 512).unwrap();
    let desc = reg.open("repo", true).unwrap();
    on_reactor(move |_| {
        let mut io = ChannelIo::new(desc.channel().unwrap());
        let (repo, gens) = three_generations(&mut io);
        let seq = repo.info().sequence;
        let newest_slot = |io: &mut ChannelIo| {
            let mut b = vec![0u8; 8192];
            io.read(0, &mut b).unwrap();
            let s0 = u64::from_le_bytes(b[16..24].try_into().unwrap());
            let s1 = u64::from_le_bytes(b[4096 + 16..4096 + 24].try_into().unwrap());
            if s0 > s1 {
                0u64
            } else {
                1
            }
        };
        let slot = newest_slot(&mut io);
        drop(repo);
        // The older slot damaged: nothing changes.
        flip_bit(&mut io, (1 - slot) * 4096 + 40);
        let repo = Repo::open(&mut io).unwrap();
        assert_eq!(repo.info().sequence, seq);
        let report = repo.verify(&mut io, None).unwrap();
        assert!(report.is_ok(), "{:?}", report.messages());
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("crc32c mismatch")),
            "{:?}",
            report.warnings
        );
        drop(repo);
        // Repair by one more commit, then damage the newest slot: the
        // previous state (one commit back) serves, and is intact.
        let mut repo = Repo::open(&mut io).unwrap();
        let w = repo
            .begin(&mut io, &spec(20 * CS as u64, None, false))
            .unwrap();
        repo.abort(&mut io, w).unwrap();
        let slot = newest_slot(&mut io);
        let seq = repo.info().sequence;
        drop(repo);
        flip_bit(&mut io, slot * 4096 + 3000);
        let repo = Repo::open(&mut io).unwrap();
        assert_eq!(repo.info().sequence, seq - 1);
        let incomplete: Vec<u64> = repo
            .generations()
            .iter()
            .filter(|g| g.state == GenState::InProgress)
            .map(|g| g.id)
            .collect();
        assert_eq!(incomplete, vec![4], "the aborted backup, before its abort");
        for (g, want) in &gens {
            assert!(restore_to_vec(&repo, &mut io, g.id).unwrap() == *want);
        }
        // Both damaged: a clear error, naming both slots.
        flip_bit(&mut io, (1 - slot) * 4096 + 20);
        let err = Repo::open(&mut io).unwrap_err().to_string();
        assert!(
            err.starts_with("corrupt superblock: slot 0: crc32c mismatch"),
            "{err}"
        );
        assert!(err.contains("slot 1: crc32c mismatch"), "{err}");
    });
}

#[test]
fn a_corrupt_index_is_reported_by_verify() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "repo", 4 << 20, 512).unwrap();
    let desc = reg.open("repo", true).unwrap();
    on_reactor(move |_| {
        let mut io = ChannelIo::new(desc.channel().unwrap());
        let (repo, gens) = three_generations(&mut io);
        let victim = &gens[1].0;
        let idx = victim.index.unwrap();
        drop(repo);
        flip_bit(&mut io, idx.offset + 16 + 5 * 16 + 3);
        let repo = Repo::open(&mut io).unwrap();
        assert!(repo.damage(victim.id).is_some());
        let report = repo.verify(&mut io, None).unwrap();
        assert!(!report.is_ok());
        let bad: Vec<&_> = report.generations.iter().filter(|g| !g.is_ok()).collect();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].id, victim.id);
        let msg = bad[0].problems.join("; ");
        assert!(
            msg.contains(&format!("index block 0 (byte {})", idx.offset))
                && msg.contains("crc32c expected"),
            "{msg}"
        );
        // The other generations are whole, including the one built on it.
        for (g, want) in [&gens[0], &gens[2]] {
            assert!(restore_to_vec(&repo, &mut io, g.id).unwrap() == *want);
        }
        let err = restore_to_vec(&repo, &mut io, victim.id).unwrap_err();
        assert!(
            matches!(err, RepoError::CorruptIndex { generation, .. } if generation == victim.id)
        );
        assert!(err.to_string().starts_with(&format!(
            "corrupt index of generation {}: index block 0",
            victim.id
        )));
    });
}

#[test]
fn a_corrupt_chunk_is_reported_by_verify() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "repo", 4 << 20, 512).unwrap();
    let desc = reg.open("repo", true).unwrap();
    on_reactor(move |_| {
        let mut io = ChannelIo::new(desc.channel().unwrap());
        let (repo, gens) = three_generations(&mut io);
        // Chunk 19 was stored by generation 1 and is shared by all three.
        let idx = repo.index(&mut io, gens[2].0.id).unwrap();
        let e = idx.resolve(19).unwrap();
        assert_eq!(e.stored_by, gens[0].0.id);
        let ChunkLoc::Data(offset) = e.loc else {
            panic!("chunk 19 has data")
        };
        flip_bit(&mut io, offset + 1000);
        let report = repo.verify(&mut io, None).unwrap();
        assert!(!report.is_ok());
        assert_eq!(
            report.bad_chunks.len(),
            3,
            "one bad extent, three generations"
        );
        for (b, (g, _)) in report.bad_chunks.iter().zip(&gens) {
            assert_eq!((b.generation, b.chunk, b.offset), (g.id, 19, offset));
            let msg = b.to_string();
            assert!(
                msg.starts_with(&format!(
                    "generation {} chunk 19 (data at byte {offset}): crc32c expected {:#010x}, found",
                    g.id, e.crc
                )),
                "{msg}"
            );
        }
        // Verify of one generation, and a restore, find it too.
        let one = repo.verify(&mut io, Some(gens[1].0.id)).unwrap();
        assert_eq!(one.bad_chunks.len(), 1);
        let err = restore_to_vec(&repo, &mut io, gens[2].0.id).unwrap_err();
        assert!(
            matches!(err, RepoError::ChunkChecksum { chunk: 19, .. }),
            "{err}"
        );
        let mut buf = vec![0u8; CSU];
        assert!(repo.read_chunk(&mut io, &idx, 19, &mut buf).is_err());
        assert!(repo.read_chunk(&mut io, &idx, 18, &mut buf).is_ok());
    });
}

// -- Power cuts ---------------------------------------------------------------

/// A device whose power can be cut at a chosen request. The campaign tells
/// it which operation is running (`phase`) so that a cut can be attributed.
trait CrashDevice: BlockIo {
    /// Arms the next cut somewhere in the coming requests.
    fn arm(&mut self, rng: &mut Rng);
    fn set_phase(&mut self, phase: &'static str);
    fn phase(&self) -> &'static str;
    /// The phase the last cut landed in, if a cut happened since `clear_cut`.
    fn cut(&self) -> Option<&'static str>;
    fn clear_cut(&mut self);
    /// Power back on after a cut, with whatever survived it.
    fn restore_power(&mut self, rng: &mut Rng);
}

/// A [`BlockIo`] on a fault bdev that cuts the power when its countdown of
/// requests runs out: the request at zero and every later one fails, and
/// every write not covered by a completed flush is lost. A cut that lands on
/// a flush may hit it mid-way through its write-back.
struct CutIo {
    io: ChannelIo,
    ctl: fault::FaultControl,
    countdown: Option<u64>,
    /// Count only flushes down (so the cut lands on one).
    flushes_only: bool,
    /// Polls to give a flush before cutting it (`None`: cut before it).
    mid_flush: Option<u32>,
    phase: &'static str,
    cut: Option<&'static str>,
}

impl CutIo {
    /// Whether the power goes now, before a request (`flush`: a flush).
    fn due(&mut self, flush: bool) -> bool {
        if self.flushes_only && !flush {
            return false;
        }
        match self.countdown {
            Some(0) => {
                self.countdown = None;
                self.cut = Some(self.phase);
                true
            }
            Some(n) => {
                self.countdown = Some(n - 1);
                false
            }
            None => false,
        }
    }
}

impl BlockIo for CutIo {
    fn block_size(&self) -> u32 {
        self.io.block_size()
    }
    fn size_bytes(&self) -> u64 {
        self.io.size_bytes()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), RepoError> {
        if self.due(false) {
            self.ctl.power_cut();
        }
        self.io.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RepoError> {
        if self.due(false) {
            self.ctl.power_cut();
        }
        self.io.write(offset, data)
    }
    fn flush(&mut self) -> Result<(), RepoError> {
        if !self.due(true) {
            return self.io.flush();
        }
        let Some(polls) = self.mid_flush else {
            self.ctl.power_cut();
            return self.io.flush();
        };
        let ch = self.io.channel_mut();
        ch.submit(BdevIo::flush(99));
        let mut status = None;
        for _ in 0..polls {
            ch.poll(&mut |io| status = Some(io.status));
        }
        self.ctl.power_cut();
        let t0 = Instant::now();
        while status.is_none() {
            ch.poll(&mut |io| status = Some(io.status));
            assert!(t0.elapsed() < Duration::from_secs(10), "flush lost");
        }
        match status {
            Some(IoStatus::Success) => Ok(()),
            Some(IoStatus::Failed(source)) => Err(power_loss_with(source)),
            _ => Err(power_loss_with(IoError::Aborted)),
        }
    }
}

fn power_loss_with(source: IoError) -> RepoError {
    RepoError::Io {
        op: "flush",
        offset: 0,
        len: 0,
        source,
    }
}

impl CrashDevice for CutIo {
    /// Mostly anywhere among the next 70 requests; sometimes on one of the
    /// next 8 flushes; half the time in the middle of a flush's write-back
    /// (a fault-bdev flush takes two polls: the first issues and lands the
    /// write-back, the second completes the base's flush).
    fn arm(&mut self, rng: &mut Rng) {
        self.flushes_only = rng.below(3) == 0;
        self.countdown = Some(rng.below(if self.flushes_only { 8 } else { 70 }));
        self.mid_flush = (rng.below(2) == 0).then(|| rng.below(3) as u32);
    }
    fn set_phase(&mut self, phase: &'static str) {
        self.phase = phase;
    }
    fn phase(&self) -> &'static str {
        self.phase
    }
    fn cut(&self) -> Option<&'static str> {
        self.cut
    }
    fn clear_cut(&mut self) {
        self.cut = None;
    }
    fn restore_power(&mut self, _rng: &mut Rng) {
        self.ctl.power_on();
    }
}

/// A stricter crash model in memory: every write since the last completed
/// flush survives a cut or not, independently for each 512-byte sector (so
/// writes can tear and be persisted out of order), which is what a disk
/// with a volatile cache may do.
struct SectorCrashIo {
    /// The device as reads see it.
    live: MemIo,
    /// What a cut cannot take away.
    durable: MemIo,
    /// Writes since the last completed flush, in order.
    unflushed: Vec<(u64, Vec<u8>)>,
    countdown: Option<u64>,
    dead: bool,
    phase: &'static str,
    cut: Option<&'static str>,
}

impl SectorCrashIo {
    fn new(size: u64) -> Self {
        SectorCrashIo {
            live: MemIo::new(size, 512),
            durable: MemIo::new(size, 512),
            unflushed: Vec::new(),
            countdown: None,
            dead: false,
            phase: "format",
            cut: None,
        }
    }

    fn request(&mut self) -> Result<(), RepoError> {
        if let Some(n) = self.countdown {
            if n == 0 {
                self.countdown = None;
                self.dead = true;
                self.cut = Some(self.phase);
            } else {
                self.countdown = Some(n - 1);
            }
        }
        if self.dead {
            Err(RepoError::Io {
                op: "request",
                offset: 0,
                len: 0,
                source: IoError::PowerLoss,
            })
        } else {
            Ok(())
        }
    }
}

impl BlockIo for SectorCrashIo {
    fn block_size(&self) -> u32 {
        512
    }
    fn size_bytes(&self) -> u64 {
        self.live.size_bytes()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), RepoError> {
        self.request()?;
        self.live.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RepoError> {
        self.request()?;
        self.live.write(offset, data)?;
        self.unflushed.push((offset, data.to_vec()));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), RepoError> {
        self.request()?;
        for (offset, data) in self.unflushed.drain(..) {
            self.durable.write(offset, &data)?;
        }
        Ok(())
    }
}

impl CrashDevice for SectorCrashIo {
    fn arm(&mut self, rng: &mut Rng) {
        self.countdown = Some(rng.below(70));
    }
    fn set_phase(&mut self, phase: &'static str) {
        self.phase = phase;
    }
    fn phase(&self) -> &'static str {
        self.phase
    }
    fn cut(&self) -> Option<&'static str> {
        self.cut
    }
    fn clear_cut(&mut self) {
        self.cut = None;
    }
    fn restore_power(&mut self, rng: &mut Rng) {
        for (offset, data) in std::mem::take(&mut self.unflushed) {
            for (i, sector) in data.chunks(512).enumerate() {
                if rng.below(2) == 0 {
                    let at = offset as usize + i * 512;
                    self.durable.data[at..at + 512].copy_from_slice(sector);
                }
            }
        }
        self.live.data.copy_from_slice(&self.durable.data);
        self.dead = false;
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the model knows about an operation the power cut interrupted.
enum Pending {
    /// Nothing uncertain.
    None,
    /// A backup whose commit may or may not have become durable.
    Backup { content: Vec<u8> },
    /// Generations whose removal may or may not have become durable.
    Removal(Vec<u64>),
}

const SRC_BYTES: usize = 16 * CSU - 4096;

#[derive(Default)]
struct Tally {
    cuts: u64,
    by_phase: BTreeMap<&'static str, u64>,
    commits_lost: u64,
    commits_kept: u64,
}

trait UnwrapOrErr<T> {
    fn unwrap_or_err(self, ctx: &str) -> T;
}

impl<T> UnwrapOrErr<T> for Result<T, RepoError> {
    fn unwrap_or_err(self, ctx: &str) -> T {
        self.unwrap_or_else(|e| panic!("{ctx}: {e}"))
    }
}

/// After a cut (power back on): reopens, checks every committed generation,
/// resolves what was uncertain, removes what is incomplete, verifies
/// everything, and checks that no space leaked. Returns the repository.
fn recover(
    io: &mut dyn BlockIo,
    committed: &mut BTreeMap<u64, Vec<u8>>,
    pending: Pending,
    ctx: &str,
    tally: &mut Tally,
) -> Repo {
    let mut repo = Repo::open(io).unwrap_or_err(ctx);
    let removals = match &pending {
        Pending::Removal(ids) => ids.clone(),
        _ => Vec::new(),
    };
    for g in repo.generations().to_vec() {
        if let Some(want) = committed.get(&g.id) {
            assert_eq!(
                g.state,
                GenState::Complete,
                "{ctx}: generation {} lost its commit",
                g.id
            );
            let got = restore_to_vec(&repo, io, g.id)
                .unwrap_or_else(|e| panic!("{ctx}: restore of generation {}: {e}", g.id));
            assert!(got == *want, "{ctx}: generation {} differs", g.id);
            continue;
        }
        match (&pending, g.state) {
            (Pending::Backup { content }, GenState::Complete) => {
                let got = restore_to_vec(&repo, io, g.id)
                    .unwrap_or_else(|e| panic!("{ctx}: restore of cut commit {}: {e}", g.id));
                assert!(
                    got == *content,
                    "{ctx}: the cut commit of {} is wrong",
                    g.id
                );
                committed.insert(g.id, content.clone());
                tally.commits_kept += 1;
            }
            (_, GenState::InProgress) => {
                if matches!(pending, Pending::Backup { .. }) {
                    tally.commits_lost += 1;
                }
                repo.remove(io, g.id)
                    .unwrap_or_else(|e| panic!("{ctx}: remove incomplete {}: {e}", g.id));
            }
            _ => panic!("{ctx}: unexpected complete generation {}", g.id),
        }
    }
    for id in committed.keys().copied().collect::<Vec<_>>() {
        if repo.generation(id).is_none() {
            assert!(
                removals.contains(&id),
                "{ctx}: committed generation {id} is gone"
            );
            committed.remove(&id);
        }
    }
    let report = repo.verify(io, None).unwrap_or_err(ctx);
    assert!(report.is_ok(), "{ctx}: verify: {:?}", report.messages());
    let used = repo.info().used_bytes;
    let again = Repo::open(io).unwrap_or_err(ctx);
    assert_eq!(
        again.info().used_bytes,
        used,
        "{ctx}: space differs after a reopen"
    );
    repo
}

/// One backup of `src` (full, tracked incremental, or checksum-compared
/// incremental against the newest committed generation).
fn backup<D: CrashDevice>(
    repo: &mut Repo,
    io: &mut D,
    rng: &mut Rng,
    src: &[u8],
    committed: &BTreeMap<u64, Vec<u8>>,
) -> Result<Generation, RepoError> {
    let parent = committed.keys().next_back().copied();
    let (parent, compare) = match (parent, rng.below(3)) {
        (Some(p), 1) => (Some(p), false),
        (Some(p), 2) => (Some(p), true),
        _ => (None, false),
    };
    io.set_phase("begin");
    let w = repo.begin(io, &spec(SRC_BYTES as u64, parent, compare))?;
    io.set_phase("place");
    let chunks = w.chunks();
    let copy: Vec<u64> = match parent {
        Some(p) if !compare => changed_chunks(&committed[&p], src),
        _ => (0..chunks).collect(),
    };
    write_chunks(io, &w, src, &copy, 1 + rng.below(6) as usize)?;
    for c in (0..chunks).filter(|c| !copy.contains(c)) {
        w.mark_unchanged(c)?;
    }
    io.set_phase("commit");
    repo.commit(io, w, now_us())
}

/// One campaign case on a freshly formatted device: random backups,
/// prunes, removals, aborted backups and restores until `max_cuts` cuts
/// have been recovered from.
fn campaign_case<D: CrashDevice>(io: &mut D, seed: u64, max_cuts: u64, tally: &mut Tally) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut repo = Repo::format(io, false).unwrap();
    let mut src = pattern(seed, SRC_BYTES);
    let mut committed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut cuts = 0;
    io.arm(&mut rng);
    for step in 0..60 {
        if cuts == max_cuts {
            break;
        }
        let ctx = format!("seed {seed} step {step}");
        io.clear_cut();
        let (result, pending) = match rng.below(10) {
            0..=5 => {
                // Change a few chunks, then back up.
                for _ in 0..1 + rng.below(3) {
                    let c = rng.below(16) as usize;
                    let end = ((c + 1) * CSU).min(SRC_BYTES);
                    if rng.below(4) == 0 {
                        src[c * CSU..end].fill(0);
                    } else {
                        let data = pattern(rng.next(), end - c * CSU);
                        src[c * CSU..end].copy_from_slice(&data);
                    }
                }
                match backup(&mut repo, io, &mut rng, &src, &committed) {
                    Ok(g) => {
                        committed.insert(g.id, src.clone());
                        (Ok(()), Pending::None)
                    }
                    Err(e) if io.phase() == "commit" => (
                        Err(e),
                        Pending::Backup {
                            content: src.clone(),
                        },
                    ),
                    Err(e) => (Err(e), Pending::None),
                }
            }
            6 | 7 => {
                io.set_phase("prune");
                let keep = 1 + rng.below(3) as usize;
                let ids: Vec<u64> = committed.keys().copied().collect();
                let victims = ids[..ids.len().saturating_sub(keep)].to_vec();
                match repo.prune_keep(io, keep) {
                    Ok(r) => {
                        assert_eq!(r.removed, victims, "{ctx}: prune");
                        for id in &victims {
                            committed.remove(id);
                        }
                        (Ok(()), Pending::None)
                    }
                    Err(e) => (Err(e), Pending::Removal(victims)),
                }
            }
            8 => {
                io.set_phase("remove");
                let ids: Vec<u64> = committed.keys().copied().collect();
                if ids.is_empty() {
                    continue;
                }
                let id = ids[rng.below(ids.len() as u64) as usize];
                match repo.remove(io, id) {
                    Ok(_) => {
                        committed.remove(&id);
                        (Ok(()), Pending::None)
                    }
                    Err(e) => (Err(e), Pending::Removal(vec![id])),
                }
            }
            _ if rng.below(2) == 0 => {
                // A backup abandoned half-way.
                io.set_phase("abort");
                let r = repo
                    .begin(io, &spec(SRC_BYTES as u64, None, false))
                    .and_then(|w| {
                        write_chunks(io, &w, &src, &[0, 1, 2], 2)?;
                        repo.abort(io, w)
                    });
                (r, Pending::None)
            }
            _ => {
                io.set_phase("restore");
                let r = match committed.keys().next_back() {
                    Some(&id) => restore_to_vec(&repo, io, id).map(|got| {
                        assert!(got == committed[&id], "{ctx}: restore");
                    }),
                    None => Ok(()),
                };
                (r, Pending::None)
            }
        };
        let pending = match (result, io.cut()) {
            (Ok(()), None) => continue,
            (Err(e), None) => panic!("{ctx}: {e} without a power cut"),
            (Err(e), Some(phase)) => {
                assert!(
                    matches!(
                        e,
                        RepoError::Io {
                            source: IoError::PowerLoss,
                            ..
                        } | RepoError::Poisoned
                    ),
                    "{ctx}: unexpected error after a cut in {phase}: {e}"
                );
                pending
            }
            // The operation finished its durable part before the cut (the
            // cut hit a read after its last commit point).
            (Ok(()), Some(_)) => Pending::None,
        };
        let phase = io.cut().unwrap_or("?");
        cuts += 1;
        tally.cuts += 1;
        *tally.by_phase.entry(phase).or_default() += 1;
        drop(repo);
        io.restore_power(&mut rng);
        let ctx = format!("{ctx} (cut in {phase})");
        repo = recover(io, &mut committed, pending, &ctx, tally);
        io.arm(&mut rng);
    }
}

/// The phases every campaign must cut at least [`MIN_CUTS_PER_PHASE`] times.
const CUT_PHASES: [&str; 6] = ["begin", "place", "commit", "prune", "remove", "restore"];
const MIN_CUTS_PER_PHASE: u64 = 5;

/// A campaign goes on until it has made `min_cuts` cuts and cut every phase
/// of [`CUT_PHASES`] often enough (restore and remove come up least).
fn campaign_goes_on(tally: &Tally, min_cuts: u64) -> bool {
    tally.cuts < min_cuts
        || CUT_PHASES
            .iter()
            .any(|p| tally.by_phase.get(p).copied().unwrap_or(0) < MIN_CUTS_PER_PHASE)
}

fn check_tally(name: &str, tally: &Tally, t0: Instant) {
    eprintln!(
        "{name}: {} cuts ({:?}), by phase {:?}; cut commits kept {}, lost {}",
        tally.cuts,
        t0.elapsed(),
        tally.by_phase,
        tally.commits_kept,
        tally.commits_lost
    );
    for phase in CUT_PHASES {
        assert!(
            tally.by_phase.get(phase).copied().unwrap_or(0) >= MIN_CUTS_PER_PHASE,
            "{name}: too few cuts in {phase}: {:?}",
            tally.by_phase
        );
    }
    assert!(
        tally.commits_lost > 0,
        "{name}: no commit was cut before its superblock"
    );
    assert!(
        tally.commits_kept > 0,
        "{name}: no cut commit became durable"
    );
}

#[test]
fn power_cuts_on_the_fault_bdev_never_lose_a_committed_generation() {
    on_reactor(|_| {
        let mut tally = Tally::default();
        let t0 = Instant::now();
        let mut case = 0;
        while campaign_goes_on(&tally, 200) {
            assert!(
                case < 5000,
                "the campaign never cut every phase: {:?}",
                tally.by_phase
            );
            let reg = BdevRegistry::new();
            malloc::create(&reg, "m", 2 << 20, 512).unwrap();
            let opts = fault::FaultOptions {
                volatile_cache: true,
                seed: case,
                ..Default::default()
            };
            let (_bdev, ctl) = fault::create(&reg, "f", "m", opts).unwrap();
            let desc = reg.open("f", true).unwrap();
            let mut io = CutIo {
                io: ChannelIo::new(desc.channel().unwrap()),
                ctl,
                countdown: None,
                flushes_only: false,
                mid_flush: None,
                phase: "format",
                cut: None,
            };
            campaign_case(&mut io, case, 3, &mut tally);
            case += 1;
        }
        check_tally("fault-bdev power cuts", &tally, t0);
    });
}

#[test]
fn torn_and_reordered_unflushed_writes_never_lose_a_committed_generation() {
    let mut tally = Tally::default();
    let t0 = Instant::now();
    let mut case = 0;
    while campaign_goes_on(&tally, 300) {
        assert!(
            case < 5000,
            "the campaign never cut every phase: {:?}",
            tally.by_phase
        );
        let mut io = SectorCrashIo::new(2 << 20);
        campaign_case(&mut io, 1_000_000 + case, 3, &mut tally);
        case += 1;
    }
    check_tally("sector-level crash states", &tally, t0);
}
