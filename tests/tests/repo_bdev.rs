//! Generations served as bdevs: snapshot access (read-only and writable
//! through an overlay), instant restore (reads and writes while the target
//! hydrates), and the pipelined restore.
//!
//! A repository is built on a malloc namespace with the library API: a full
//! generation and two incrementals of a source whose last chunk is short,
//! with zero chunks (found by `place_run`, and marked), chunks outside the
//! backup's scope (absent), and runs of chunks stored back to back. Every
//! check compares with the generation's content as the test wrote it:
//! absent chunks read as zeros through a snapshot, and keep the
//! destination's own bytes in a restore. All three open the repository for
//! reading only: a damaged index fails the one that serves its generation,
//! with the error a full open gives, and nothing writes to the namespace.
//!
//! The pipelined restore also runs on a long chain of incrementals with
//! scattered changes stored out of chunk order, so that a late
//! generation's chunks lie in dozens of extents and every 1 MiB write is
//! gathered from many reads; every chunk's content is unique to the chunk
//! and the generation that wrote it, so a chunk put at another's place is
//! seen.

use std::time::{Duration, Instant};

use hotcopy_bdev::modules::fault::{self, FaultControl, FaultOptions};
use hotcopy_bdev::modules::{malloc, uring};
use hotcopy_bdev::{BdevChannel, BdevIo, BdevRegistry, IoError, IoStatus};
use hotcopy_cow::repo::{
    BlockIo, ChannelIo, ChunkLoc, GenSpec, GenWriter, Repo, RepoError, SourceIdent,
};
use hotcopy_cow::repo_bdev::{
    create_snapshot, restore_to, restore_to_on, start_instant_restore, HydState, InstantTuning,
    OverlayConfig, RepoBdevError, RestoreState, ENOSPC,
};
use hotcopy_runtime::{DmaBuf, IdlePolicy, Runtime, RuntimeConfig};
use hotcopy_tests::*;

const BS: u64 = 512;
const CS: u64 = 16 * 1024;
const CHUNKS: u64 = 64;
/// The source: 64 chunks, the last one 4 KiB short.
const SRC: u64 = CHUNKS * CS - 4096;
const BLOCKS: u64 = SRC / BS;
const NS_BYTES: u64 = 8 << 20;

/// One generation as the test wrote it.
struct Gen {
    id: u64,
    /// The content; absent chunks hold zeros here.
    image: Vec<u8>,
    absent: Vec<u64>,
}

impl Gen {
    /// What a restore onto a device holding `dest` leaves there.
    fn restored_over(&self, dest: &[u8]) -> Vec<u8> {
        let mut out = self.image.clone();
        for &c in &self.absent {
            let r = chunk_range(c);
            out[r.clone()].copy_from_slice(&dest[r]);
        }
        out
    }
}

struct Fixture {
    reg: BdevRegistry,
    gens: Vec<Gen>,
    /// The fault bdev the namespace is reached through (when asked for).
    ns_fault: Option<FaultControl>,
}

fn chunk_range(c: u64) -> std::ops::Range<usize> {
    (c * CS) as usize..((c + 1) * CS).min(SRC) as usize
}

fn spec(parent: Option<u64>) -> GenSpec {
    GenSpec {
        source: SourceIdent {
            name: "vol0".into(),
            size_bytes: SRC,
        },
        chunk_size: CS as u32,
        parent,
        compare_with_parent: false,
    }
}

/// Stores `chunks` of `img` (consecutive ones in runs of up to 8, which the
/// repository keeps back to back).
fn store(io: &mut dyn BlockIo, w: &GenWriter, img: &[u8], chunks: &[u64]) {
    let mut i = 0;
    while i < chunks.len() {
        let mut n = 1;
        while i + n < chunks.len() && n < 8 && chunks[i + n] == chunks[i] + n as u64 {
            n += 1;
        }
        let mut buf = vec![0u8; n * CS as usize];
        for k in 0..n {
            let r = chunk_range(chunks[i + k]);
            buf[k * CS as usize..][..r.len()].copy_from_slice(&img[r]);
        }
        w.write_run(io, chunks[i], n as u64, &mut buf).unwrap();
        i += n;
    }
}

/// Overwrites chunk `c` of `img` with new data (or zeros).
fn change(img: &mut [u8], c: u64, seed: u64) {
    let r = chunk_range(c);
    let data = if seed == 0 {
        vec![0u8; r.len()]
    } else {
        pattern(seed, r.len())
    };
    img[r].copy_from_slice(&data);
}

/// A repository on `ns` (a malloc bdev, behind a fault bdev with
/// `via_fault`) with three generations; see the module docs.
fn fixture(via_fault: bool) -> Fixture {
    let reg = BdevRegistry::new();
    let ns_fault = if via_fault {
        malloc::create(&reg, "ns_base", NS_BYTES, BS as u32).unwrap();
        Some(
            fault::create(&reg, "ns", "ns_base", FaultOptions::default())
                .unwrap()
                .1,
        )
    } else {
        malloc::create(&reg, "ns", NS_BYTES, BS as u32).unwrap();
        None
    };
    let mut io = ChannelIo::new(reg.open("ns", true).unwrap().channel().unwrap());
    let mut repo = Repo::format(&mut io, false).unwrap();
    let mut gens = Vec::new();

    // Generation 1, full: zero chunks 3, 10 and 11 (found by place_run),
    // chunks 20 and 21 outside the scope.
    let mut img = pattern(0x5EED, SRC as usize);
    for c in [3, 10, 11] {
        change(&mut img, c, 0);
    }
    let absent = vec![20, 21];
    let w = repo.begin(&mut io, &spec(None)).unwrap();
    let stored: Vec<u64> = (0..CHUNKS).filter(|c| !absent.contains(c)).collect();
    store(&mut io, &w, &img, &stored);
    w.mark_absent(20, 2).unwrap();
    let g1 = repo.commit(&mut io, w, 1).unwrap().id;
    let mut snap = img.clone();
    for &c in &absent {
        change(&mut snap, c, 0);
    }
    gens.push(Gen {
        id: g1,
        image: snap,
        absent: absent.clone(),
    });

    // Generation 2: some chunks change (4 becomes zero, 10 gets data), the
    // rest is inherited (20 and 21 stay absent).
    let changed = [0, 4, 5, 6, 7, 10, 30, 31, 32, 33, 34, 35, 63];
    for (i, &c) in changed.iter().enumerate() {
        change(&mut img, c, if c == 4 { 0 } else { 0x200 + i as u64 });
    }
    let w = repo.begin(&mut io, &spec(Some(g1))).unwrap();
    store(&mut io, &w, &img, &changed);
    for c in (0..CHUNKS).filter(|c| !changed.contains(c)) {
        w.inherit(c, 1).unwrap();
    }
    let g2 = repo.commit(&mut io, w, 2).unwrap().id;
    let mut snap = img.clone();
    for &c in &absent {
        change(&mut snap, c, 0);
    }
    gens.push(Gen {
        id: g2,
        image: snap,
        absent: absent.clone(),
    });

    // Generation 3: 1, 2 and 40..=47 change, 60 is marked zero, 50 and 51
    // leave the scope.
    let changed: Vec<u64> = [1, 2].into_iter().chain(40..48).collect();
    for (i, &c) in changed.iter().enumerate() {
        change(&mut img, c, 0x300 + i as u64);
    }
    change(&mut img, 60, 0);
    let w = repo.begin(&mut io, &spec(Some(g2))).unwrap();
    store(&mut io, &w, &img, &changed);
    w.mark_zero(60, 1).unwrap();
    w.mark_absent(50, 2).unwrap();
    for c in (0..CHUNKS).filter(|c| !changed.contains(c) && ![50, 51, 60].contains(c)) {
        w.inherit(c, 1).unwrap();
    }
    let g3 = repo.commit(&mut io, w, 3).unwrap().id;
    let absent3 = vec![20, 21, 50, 51];
    let mut snap = img.clone();
    for &c in &absent3 {
        change(&mut snap, c, 0);
    }
    gens.push(Gen {
        id: g3,
        image: snap,
        absent: absent3,
    });
    assert!(repo.verify(&mut io, None).unwrap().is_ok());
    Fixture {
        reg,
        gens,
        ns_fault,
    }
}

fn runtime() -> Runtime {
    Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::SLEEP)).unwrap()
}

/// Every byte of the bdev `name` (`bytes` long), read in 96 KiB steps.
fn read_all(reg: &BdevRegistry, name: &str, bytes: u64) -> Vec<u8> {
    let desc = reg.open(name, false).unwrap();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        let bs = ch.block_size() as u64;
        let step = 96 * 1024;
        let mut out = Vec::with_capacity(bytes as usize);
        let mut off = 0;
        while off < bytes {
            let len = step.min(bytes - off);
            out.extend(read(&mut ch, off / bs, len / bs).expect("read"));
            off += len;
        }
        out
    })
}

/// Writes `data` to the bdev `name` at byte 0.
fn fill(reg: &BdevRegistry, name: &str, data: Vec<u8>) {
    let desc = reg.open(name, true).unwrap();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        assert_eq!(write(&mut ch, 0, &data), IoStatus::Success);
    });
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: differs at byte {i} (chunk {}, block {})",
            i as u64 / CS,
            i as u64 / BS
        );
    }
}

/// Submits every read of `reqs` (first block, blocks) at once, then
/// collects them: many requests and pieces in flight on one channel.
fn read_many(ch: &mut BdevChannel, reqs: &[(u64, u64)]) -> Vec<Result<Vec<u8>, IoStatus>> {
    for (i, &(b, n)) in reqs.iter().enumerate() {
        let buf = DmaBuf::alloc((n * BS) as usize).unwrap();
        ch.submit(BdevIo::read(b, n, buf, i as u64));
    }
    let mut out: Vec<Option<Result<Vec<u8>, IoStatus>>> = reqs.iter().map(|_| None).collect();
    let mut left = reqs.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while left > 0 {
        ch.poll(&mut |mut io| {
            let r = if io.status.is_success() {
                Ok(io.take_buf().unwrap().to_vec())
            } else {
                Err(io.status)
            };
            out[io.token as usize] = Some(r);
            left -= 1;
        });
        assert!(Instant::now() < deadline, "reads did not complete");
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Random reads (1..=96 blocks, so up to four chunks) compared with `want`.
fn check_random_reads(ch: &mut BdevChannel, want: &[u8], seed: u64, rounds: usize, batch: usize) {
    let mut rng = seed;
    for _ in 0..rounds {
        let reqs: Vec<(u64, u64)> = (0..batch)
            .map(|_| {
                let n = 1 + xorshift(&mut rng) % 96;
                (xorshift(&mut rng) % (BLOCKS - n + 1), n)
            })
            .collect();
        for ((b, n), got) in reqs.iter().zip(read_many(ch, &reqs)) {
            let got = got.unwrap_or_else(|s| panic!("read {b}+{n}: {s:?}"));
            let r = (b * BS) as usize..((b + n) * BS) as usize;
            assert_same(&got, &want[r], &format!("read of blocks {b}+{n}"));
        }
    }
}

#[test]
fn snapshots_read_each_generation_exactly_and_refuse_writes() {
    let fx = fixture(false);
    for g in &fx.gens {
        let name = format!("snap{}", g.id);
        let (bdev, h) = create_snapshot(&fx.reg, &name, "ns", g.id, None).unwrap();
        assert_eq!(bdev.size_bytes(), SRC);
        assert!(!h.is_writable());
        assert_same(
            &read_all(&fx.reg, &name, SRC),
            &g.image,
            &format!("generation {}", g.id),
        );
        let desc = fx.reg.open(&name, true).unwrap();
        let want = g.image.clone();
        let seed = 0x1234 + g.id;
        on_reactor(move |_| {
            let mut ch = desc.channel().unwrap();
            check_random_reads(&mut ch, &want, seed, 8, 64);
            assert_eq!(
                write(&mut ch, 5, &[1u8; 512]),
                IoStatus::Failed(IoError::ReadOnly)
            );
            assert_eq!(flush(&mut ch), IoStatus::Success);
        });
        let st = h.stats();
        assert_eq!(st.rejected_writes, 1);
        assert!(st.from_backup > 0 && st.zero_filled > 0, "{st:?}");
        assert_eq!(st.failed, 1, "only the refused write failed: {st:?}");
    }
    let err = create_snapshot(&fx.reg, "nope", "ns", 99, None).unwrap_err();
    assert!(err.to_string().contains("no generation 99"), "{err}");
}

#[test]
fn a_writable_snapshot_keeps_its_writes_to_itself() {
    let fx = fixture(false);
    let g = &fx.gens[1];
    let ns_before = read_all(&fx.reg, "ns", NS_BYTES);
    malloc::create(&fx.reg, "ov", 8192 + CHUNKS * CS, BS as u32).unwrap();
    let overlay = OverlayConfig {
        desc: fx.reg.open("ov", true).unwrap(),
        offset_blocks: 16,
        slots: CHUNKS as u32,
    };
    let (_, h) = create_snapshot(&fx.reg, "snapw", "ns", g.id, Some(overlay)).unwrap();
    assert!(h.is_writable());
    let desc = fx.reg.open("snapw", true).unwrap();
    let image = g.image.clone();
    let touched = on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        let mut model = image;
        let mut touched = std::collections::BTreeSet::new();
        let mut rng = 0xABCDu64;
        // Four writes to one chunk at once: one copies, three wait.
        let c = 12;
        for k in 0..4u64 {
            let data = pattern(900 + k, 1024);
            let b = c * CS / BS + 4 * k;
            ch.submit(BdevIo::write(b, 2, DmaBuf::from_slice(&data).unwrap(), k));
            model[(b * BS) as usize..][..1024].copy_from_slice(&data);
        }
        let mut left = 4;
        while left > 0 {
            ch.poll(&mut |io| {
                assert_eq!(io.status, IoStatus::Success);
                left -= 1;
            });
        }
        touched.insert(c);
        for i in 0..120u64 {
            let (b, n) = match i % 4 {
                // Whole chunks, with no copy needed.
                0 => ((xorshift(&mut rng) % CHUNKS) * CS / BS, CS / BS),
                // Spanning chunks.
                1 => {
                    let n = 1 + xorshift(&mut rng) % 80;
                    (xorshift(&mut rng) % (BLOCKS - n), n)
                }
                _ => {
                    let n = 1 + xorshift(&mut rng) % 8;
                    (xorshift(&mut rng) % (BLOCKS - n), n)
                }
            };
            let n = n.min(BLOCKS - b);
            let data = pattern(1000 + i, (n * BS) as usize);
            assert_eq!(write(&mut ch, b, &data), IoStatus::Success, "write {b}+{n}");
            model[(b * BS) as usize..((b + n) * BS) as usize].copy_from_slice(&data);
            for c in (b * BS / CS)..=((b + n) * BS - 1) / CS {
                touched.insert(c);
            }
            if i % 10 == 9 {
                check_random_reads(&mut ch, &model, i, 1, 16);
            }
        }
        check_random_reads(&mut ch, &model, 77, 4, 64);
        (model, touched)
    });
    let (model, touched) = touched;
    assert_same(
        &read_all(&fx.reg, "snapw", SRC),
        &model,
        "writable snapshot",
    );
    let st = h.stats();
    assert_eq!(st.overlay_chunks_used, touched.len() as u64, "{st:?}");
    assert!(st.write_waits >= 3, "{st:?}");
    assert!(st.chunk_copies >= 1 && st.from_overlay > 0, "{st:?}");
    assert_eq!(st.failed, 0, "{st:?}");
    // Neither the namespace nor another snapshot of the generation changed.
    assert!(
        read_all(&fx.reg, "ns", NS_BYTES) == ns_before,
        "namespace changed"
    );
    create_snapshot(&fx.reg, "snapr", "ns", g.id, None).unwrap();
    assert_same(
        &read_all(&fx.reg, "snapr", SRC),
        &g.image,
        "second snapshot",
    );
}

#[test]
fn a_full_overlay_fails_new_chunks_cleanly() {
    let fx = fixture(false);
    let g = &fx.gens[0];
    malloc::create(&fx.reg, "ov", 2 * CS, BS as u32).unwrap();
    let overlay = OverlayConfig {
        desc: fx.reg.open("ov", true).unwrap(),
        offset_blocks: 0,
        slots: 2,
    };
    let too_small = OverlayConfig {
        slots: 3,
        ..overlay.clone()
    };
    let err = create_snapshot(&fx.reg, "s3", "ns", g.id, Some(too_small)).unwrap_err();
    assert!(matches!(err, RepoBdevError::Invalid { .. }), "{err}");
    let (_, h) = create_snapshot(&fx.reg, "snapw", "ns", g.id, Some(overlay)).unwrap();
    let desc = fx.reg.open("snapw", true).unwrap();
    let image = g.image.clone();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        let cb = CS / BS;
        let a = pattern(1, 512);
        assert_eq!(write(&mut ch, 0, &a), IoStatus::Success);
        assert_eq!(write(&mut ch, cb + 3, &a), IoStatus::Success);
        assert_eq!(
            write(&mut ch, 2 * cb, &a),
            IoStatus::Failed(IoError::Device(ENOSPC))
        );
        // A write spanning a copied chunk and a new one fails as a whole,
        // but its part in the copied chunk took effect.
        let span = pattern(2, 1024);
        assert_eq!(
            write(&mut ch, 2 * cb - 1, &span),
            IoStatus::Failed(IoError::Device(ENOSPC))
        );
        assert_eq!(
            write(&mut ch, 1, &a),
            IoStatus::Success,
            "copied chunks stay writable"
        );
        let mut want = image;
        want[..512].copy_from_slice(&a);
        want[512..1024].copy_from_slice(&a);
        want[((cb + 3) * BS) as usize..][..512].copy_from_slice(&a);
        want[((2 * cb - 1) * BS) as usize..][..512].copy_from_slice(&span[..512]);
        let got = read(&mut ch, 0, 3 * cb).unwrap();
        assert_same(&got, &want[..(3 * CS) as usize], "after overlay full");
    });
    let st = h.stats();
    assert_eq!(st.overlay_full, 2, "{st:?}");
    assert_eq!(st.overlay_chunks_used, 2, "{st:?}");
    assert_eq!(st.failed, 2, "{st:?}");
}

#[test]
fn a_writable_snapshot_takes_writes_from_two_cores() {
    let fx = fixture(false);
    let g = &fx.gens[2];
    malloc::create(&fx.reg, "ov", CHUNKS * CS, BS as u32).unwrap();
    let overlay = OverlayConfig {
        desc: fx.reg.open("ov", true).unwrap(),
        offset_blocks: 0,
        slots: CHUNKS as u32,
    };
    let (_, h) = create_snapshot(&fx.reg, "snapw", "ns", g.id, Some(overlay)).unwrap();
    let rt = runtime();
    let desc = fx.reg.open("snapw", true).unwrap();
    let writers = Writers::start(
        &rt,
        &desc,
        WriterSpec {
            rng_seeds: vec![0x1111, 0x2222],
            qd: 8,
            max_blocks: 40,
            skip: |_, _| false,
        },
    );
    std::thread::sleep(Duration::from_millis(150));
    let outcomes = writers.stop();
    rt.shutdown();
    let mut want = g.image.clone();
    for o in &outcomes {
        assert_eq!(o.errors, 0);
        assert!(!o.log.is_empty());
        apply_writes(&mut want, &o.log, BS);
    }
    assert_same(
        &read_all(&fx.reg, "snapw", SRC),
        &want,
        "after concurrent writes",
    );
    let st = h.stats();
    assert!(
        st.chunk_copies > 0 && st.overlay_chunks_used <= CHUNKS,
        "{st:?}"
    );
}

/// A target `tgt` (a fault bdev over the malloc `tgt_base`, one chunk
/// larger than the source) holding `pattern(77)`, which absent chunks keep.
fn target(reg: &BdevRegistry, latency_us: u64) -> (FaultControl, Vec<u8>) {
    let size = SRC + CS;
    malloc::create(reg, "tgt_base", size, BS as u32).unwrap();
    let before = pattern(77, size as usize);
    fill(reg, "tgt_base", before.clone());
    let (_, ctl) = fault::create(reg, "tgt", "tgt_base", FaultOptions::default()).unwrap();
    ctl.set_latency_us(latency_us);
    (ctl, before)
}

fn one_chunk_runs(qd: usize) -> InstantTuning {
    InstantTuning {
        qd,
        run_bytes: CS,
        ..InstantTuning::default()
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn instant_restore_serves_the_generation_while_it_hydrates_hot_chunks_first() {
    let fx = fixture(false);
    let g = &fx.gens[2];
    // 5 ms per target write, one chunk at a time: about a third of a second
    // of hydration.
    let (tctl, before) = target(&fx.reg, 5000);
    let rt = runtime();
    let (bdev, ir) = start_instant_restore(
        &fx.reg,
        "ir",
        "ns",
        g.id,
        "tgt",
        rt.reactor(0),
        one_chunk_runs(1),
    )
    .unwrap();
    assert_eq!(bdev.size_bytes(), SRC);
    assert_eq!(ir.state(), RestoreState::Running);
    let want = g.restored_over(&before[..SRC as usize]);
    let desc = fx.reg.open("ir", false).unwrap();
    let (w, handle) = (want.clone(), ir.clone());
    let done_when_hot = on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        // A read near the end makes its chunk hot.
        let b = 62 * CS / BS + 3;
        let got = read(&mut ch, b, 4).unwrap();
        assert_same(&got, &w[(b * BS) as usize..][..2048], "hot read");
        let mut done_then = 0;
        wait_until("the hot chunk", Duration::from_secs(10), || {
            done_then = handle.status().chunks_done;
            handle.chunk_state(62) == Some(HydState::Done)
        });
        check_random_reads(&mut ch, &w, 5, 6, 32);
        done_then
    });
    assert!(
        done_when_hot < CHUNKS - 10,
        "chunk 62 was done only after {done_when_hot} chunks"
    );
    assert_eq!(ir.wait(Duration::from_secs(20)), RestoreState::Complete);
    let st = ir.status();
    assert!(st.reads_from_backup > 0 && st.hot_runs > 0, "{st:?}");
    assert_eq!((st.chunks_done, st.chunks_total), (CHUNKS, CHUNKS));
    assert!(ir.is_passthrough());
    tctl.set_latency_us(0);
    assert_same(
        &read_all(&fx.reg, "tgt", SRC),
        &want,
        "target after hydration",
    );
    assert_same(&read_all(&fx.reg, "ir", SRC), &want, "bdev after hydration");
    assert_eq!(
        read_all(&fx.reg, "tgt", SRC + CS)[SRC as usize..],
        before[SRC as usize..],
        "past the source"
    );
    rt.shutdown();
}

#[test]
fn instant_restore_without_hosts_leaves_the_target_equal_to_the_generation() {
    for i in 0..3 {
        let fx = fixture(false);
        let g = &fx.gens[i];
        let (_, before) = target(&fx.reg, 0);
        let rt = runtime();
        let tuning = InstantTuning {
            qd: 1 + i * 4,
            ..InstantTuning::default()
        };
        let (_, ir) =
            start_instant_restore(&fx.reg, "ir", "ns", g.id, "tgt", rt.reactor(1), tuning).unwrap();
        assert_eq!(ir.wait(Duration::from_secs(20)), RestoreState::Complete);
        let want = g.restored_over(&before[..SRC as usize]);
        assert_same(&read_all(&fx.reg, "tgt", SRC), &want, "target");
        let st = ir.status();
        assert_eq!(st.host_reads + st.host_writes, 0);
        assert!(st.error.is_none() && st.bytes_hydrated > 0, "{st:?}");
        // The target stays claimed while the bdev exists.
        assert!(fx.reg.open("tgt", true).is_err());
        fx.reg.unregister("ir").unwrap();
        rt.shutdown();
        drop(ir);
        assert!(fx.reg.open("tgt", true).is_ok(), "claim released");
    }
}

#[test]
fn instant_restore_keeps_every_write_of_two_cores_during_hydration() {
    let fx = fixture(false);
    let g = &fx.gens[1];
    let (tctl, before) = target(&fx.reg, 3000);
    let rt = runtime();
    let (_, ir) = start_instant_restore(
        &fx.reg,
        "ir",
        "ns",
        g.id,
        "tgt",
        rt.reactor(0),
        one_chunk_runs(2),
    )
    .unwrap();
    let desc = fx.reg.open("ir", true).unwrap();
    let writers = Writers::start(
        &rt,
        &desc,
        WriterSpec {
            rng_seeds: vec![0xAAAA, 0xBBBB],
            qd: 4,
            max_blocks: 48,
            skip: |_, _| false,
        },
    );
    std::thread::sleep(Duration::from_millis(120));
    let outcomes = writers.stop();
    assert_eq!(ir.wait(Duration::from_secs(20)), RestoreState::Complete);
    let mut want = g.restored_over(&before[..SRC as usize]);
    for o in &outcomes {
        assert_eq!(o.errors, 0);
        assert!(!o.log.is_empty());
        apply_writes(&mut want, &o.log, BS);
    }
    tctl.set_latency_us(0);
    assert_same(&read_all(&fx.reg, "tgt", SRC), &want, "target");
    assert_same(&read_all(&fx.reg, "ir", SRC), &want, "bdev");
    let st = ir.status();
    assert!(st.host_hydrations + st.write_waits > 0, "{st:?}");
    rt.shutdown();
}

#[test]
fn instant_restore_fails_cleanly_on_a_namespace_read_error() {
    let fx = fixture(true);
    let nctl = fx.ns_fault.clone().unwrap();
    let g = &fx.gens[0];
    let (_, before) = target(&fx.reg, 2000);
    let rt = runtime();
    let (_, ir) = start_instant_restore(
        &fx.reg,
        "ir",
        "ns",
        g.id,
        "tgt",
        rt.reactor(0),
        one_chunk_runs(1),
    )
    .unwrap();
    nctl.set_read_error_rate(1.0);
    assert_eq!(ir.wait(Duration::from_secs(20)), RestoreState::Failed);
    let st = ir.status();
    let err = st.error.clone().unwrap();
    assert!(
        err.contains("namespace") && err.contains("injected"),
        "{err}"
    );
    assert!(st.chunks_done < CHUNKS);
    let pending = (0..CHUNKS)
        .find(|&c| ir.chunk_state(c) != Some(HydState::Done) && !g.absent.contains(&c))
        .unwrap();
    assert!(
        (0..CHUNKS).all(|c| ir.chunk_state(c) != Some(HydState::Hydrating)),
        "a failed run gives its chunks back"
    );
    let want = g.restored_over(&before[..SRC as usize]);
    let desc = fx.reg.open("ir", true).unwrap();
    let w = want.clone();
    let want = on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        let b = pending * CS / BS;
        let zero = g_is_zero(&w, pending);
        let r = read(&mut ch, b, 8);
        if zero {
            assert!(r.is_ok(), "a zero chunk needs no read");
        } else {
            assert_eq!(r, Err(IoStatus::Failed(IoError::Injected)));
        }
        assert_eq!(
            write(&mut ch, b + 1, &[9u8; 512]),
            if zero {
                IoStatus::Success
            } else {
                IoStatus::Failed(IoError::Injected)
            }
        );
        nctl.clear();
        let mut w = w;
        let data = pattern(4242, 1024);
        assert_eq!(write(&mut ch, b + 2, &data), IoStatus::Success);
        if zero {
            w[((b + 1) * BS) as usize..][..512].fill(9);
        }
        w[((b + 2) * BS) as usize..][..1024].copy_from_slice(&data);
        check_random_reads(&mut ch, &w, 11, 2, 16);
        w
    });
    assert_eq!(ir.chunk_state(pending), Some(HydState::Done));
    assert_same(&read_all(&fx.reg, "ir", SRC), &want, "bdev after the error");
    rt.shutdown();
}

fn g_is_zero(img: &[u8], c: u64) -> bool {
    img[chunk_range(c)].iter().all(|&b| b == 0)
}

#[test]
fn restore_to_writes_each_generation_byte_for_byte() {
    let fx = fixture(false);
    let rt = runtime();
    let dir = scratch_dir();
    for (i, g) in fx.gens.iter().enumerate() {
        let dest = format!("dest{i}");
        let before = pattern(500 + i as u64, (SRC + CS) as usize);
        if i == 1 {
            let opts = uring::UringOptions {
                size: Some(SRC + CS),
                ..uring::UringOptions::new(dir.path().join("dest.img"))
            };
            uring::create(&fx.reg, &dest, &opts).unwrap();
        } else {
            malloc::create(&fx.reg, &dest, SRC + CS, BS as u32).unwrap();
        }
        fill(&fx.reg, &dest, before.clone());
        let mut calls: Vec<(u64, u64)> = Vec::new();
        let report = restore_to(&fx.reg, "ns", g.id, &dest, rt.reactor(0), 4, |d, t| {
            calls.push((d, t))
        })
        .unwrap();
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{calls:?}");
        assert_eq!(calls.last(), Some(&(SRC, SRC)));
        assert_eq!(
            report.data_chunks + report.zero_chunks + report.absent_chunks,
            CHUNKS
        );
        assert_eq!(report.absent_chunks, g.absent.len() as u64);
        let got = read_all(&fx.reg, &dest, SRC + CS);
        assert_same(&got[..SRC as usize], &g.restored_over(&before), &dest);
        assert_eq!(
            got[SRC as usize..],
            before[SRC as usize..],
            "past the source"
        );
    }
    malloc::create(&fx.reg, "small", SRC - CS, BS as u32).unwrap();
    let err = restore_to(
        &fx.reg,
        "ns",
        fx.gens[0].id,
        "small",
        rt.reactor(0),
        0,
        |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, RepoBdevError::Invalid { .. }), "{err}");
    rt.shutdown();
}

#[test]
fn restore_to_detects_a_corrupt_chunk() {
    let fx = fixture(false);
    let g = &fx.gens[0];
    // Corrupt one byte of a data chunk of generation 1 on the namespace.
    let chunk = 37;
    let at = flip_chunk_bit(&fx.reg, g.id, chunk);
    malloc::create(&fx.reg, "dest", SRC, BS as u32).unwrap();
    let rt = runtime();
    let err = restore_to(&fx.reg, "ns", g.id, "dest", rt.reactor(0), 8, |_, _| {}).unwrap_err();
    match &err {
        RepoBdevError::Checksum {
            chunk: c, offset, ..
        } => assert_eq!((*c, *offset), (chunk, at)),
        other => panic!("expected a checksum error, got {other}"),
    }
    assert!(err.to_string().contains("crc32c expected"), "{err}");
    // The hydrator of an instant restore finds it too.
    let (_, _) = target(&fx.reg, 0);
    let (_, ir) = start_instant_restore(
        &fx.reg,
        "ir",
        "ns",
        g.id,
        "tgt",
        rt.reactor(1),
        InstantTuning::default(),
    )
    .unwrap();
    assert_eq!(ir.wait(Duration::from_secs(20)), RestoreState::Failed);
    let st = ir.status();
    assert!(st.error.unwrap().contains(&format!("chunk {chunk}")));
    assert_eq!(st.checksum_errors, 1);
    rt.shutdown();
}

/// Restore, snapshot and instant restore open the repository for reading
/// only (`Repo::open_reader`): they read no other generation's index, so
/// damage there does not concern them, but the index of the generation they
/// serve is checked as before, and its damage fails them with the error a
/// full open gives. None of them writes to the namespace (every write to it
/// would fail here, and none is attempted).
#[test]
fn restore_snapshot_and_instant_restore_check_their_own_index_and_never_write() {
    let fx = fixture(true);
    let ctl = fx.ns_fault.clone().unwrap();
    let (bad, good) = (&fx.gens[1], &fx.gens[2]);
    // Flip a bit in the entries of the first block of the bad generation's
    // index.
    let expected = {
        let mut io = ChannelIo::new(fx.reg.open("ns", true).unwrap().channel().unwrap());
        let repo = Repo::open(&mut io).unwrap();
        let at = repo.generation(bad.id).unwrap().index.unwrap().offset + 100;
        let mut block = vec![0u8; BS as usize];
        io.read(at / BS * BS, &mut block).unwrap();
        block[(at % BS) as usize] ^= 0x10;
        io.write(at / BS * BS, &block).unwrap();
        let repo = Repo::open(&mut io).unwrap();
        assert!(repo.damage(good.id).is_none());
        let why = repo.damage(bad.id).expect("a full open finds the damage");
        assert!(why.contains("index block 0"), "{why}");
        repo.index(&mut io, bad.id).unwrap_err().to_string()
    };
    let ns_before = read_all(&fx.reg, "ns", NS_BYTES);
    ctl.set_write_error_rate(1.0);
    let rt = runtime();
    let check = |err: RepoBdevError, what: &str| match &err {
        RepoBdevError::Repo {
            namespace,
            source: RepoError::CorruptIndex { generation, .. },
        } => {
            assert_eq!((namespace.as_str(), *generation), ("ns", bad.id), "{what}");
            assert!(err.to_string().ends_with(&expected), "{what}: {err}");
        }
        other => panic!("{what}: expected a corrupt index, got {other}"),
    };

    // Restore: the damaged generation fails before the destination is
    // touched; the intact one restores byte for byte.
    malloc::create(&fx.reg, "dest", SRC + CS, BS as u32).unwrap();
    let before = pattern(901, (SRC + CS) as usize);
    fill(&fx.reg, "dest", before.clone());
    let err = restore_to(&fx.reg, "ns", bad.id, "dest", rt.reactor(0), 4, |_, _| {}).unwrap_err();
    check(err, "restore_to");
    assert_same(&read_all(&fx.reg, "dest", SRC + CS), &before, "untouched");
    restore_to(&fx.reg, "ns", good.id, "dest", rt.reactor(0), 4, |_, _| {}).unwrap();
    let got = read_all(&fx.reg, "dest", SRC + CS);
    assert_same(
        &got[..SRC as usize],
        &good.restored_over(&before),
        "restore",
    );

    // Snapshot.
    let err = create_snapshot(&fx.reg, "snap_bad", "ns", bad.id, None).unwrap_err();
    check(err, "create_snapshot");
    assert!(fx.reg.lookup("snap_bad").is_err(), "no bdev left behind");
    create_snapshot(&fx.reg, "snap_good", "ns", good.id, None).unwrap();
    assert_same(
        &read_all(&fx.reg, "snap_good", SRC),
        &good.image,
        "snapshot",
    );

    // Instant restore.
    let (_, tgt_before) = target(&fx.reg, 0);
    let err = start_instant_restore(
        &fx.reg,
        "ir_bad",
        "ns",
        bad.id,
        "tgt",
        rt.reactor(1),
        InstantTuning::default(),
    )
    .unwrap_err();
    check(err, "start_instant_restore");
    let (_, ir) = start_instant_restore(
        &fx.reg,
        "ir_good",
        "ns",
        good.id,
        "tgt",
        rt.reactor(1),
        InstantTuning::default(),
    )
    .unwrap();
    assert_eq!(ir.wait(Duration::from_secs(20)), RestoreState::Complete);
    let got = read_all(&fx.reg, "tgt_base", SRC + CS);
    assert_same(
        &got[..SRC as usize],
        &good.restored_over(&tgt_before),
        "instant restore",
    );

    assert_eq!(ctl.injected_errors(), 0, "no write reached the namespace");
    ctl.set_write_error_rate(0.0);
    assert!(
        read_all(&fx.reg, "ns", NS_BYTES) == ns_before,
        "namespace unchanged"
    );
    rt.shutdown();
}

/// Writes `bytes` of the bdev `name` sequentially in 1 MiB writes at queue
/// depth 16, then flushes; returns MiB/s.
fn write_ceiling(reg: &BdevRegistry, name: &str, bytes: u64) -> f64 {
    let desc = reg.open(name, true).unwrap();
    on_reactor(move |_| write_sequentially(&mut desc.channel().unwrap(), bytes))
}

/// [`write_ceiling`] on reactor `home` of a running runtime.
fn write_ceiling_on(
    home: &hotcopy_runtime::ReactorHandle,
    reg: &BdevRegistry,
    name: &str,
    bytes: u64,
) -> f64 {
    let desc = reg.open(name, true).unwrap();
    home.exec(move || write_sequentially(&mut desc.channel().unwrap(), bytes))
        .unwrap()
}

fn write_sequentially(ch: &mut BdevChannel, bytes: u64) -> f64 {
    let bs = ch.block_size() as u64;
    let io_bytes = 1u64 << 20;
    let mut bufs: Vec<DmaBuf> = (0..16)
        .map(|i| DmaBuf::from_slice(&pattern(i, io_bytes as usize)).unwrap())
        .collect();
    let start = Instant::now();
    let (mut next, mut inflight) = (0u64, 0);
    while next < bytes || inflight > 0 {
        while inflight < 16 && next < bytes {
            let buf = bufs.pop().unwrap();
            ch.submit(BdevIo::write(next / bs, io_bytes / bs, buf, next));
            next += io_bytes;
            inflight += 1;
        }
        ch.poll(&mut |mut io| {
            assert_eq!(io.status, IoStatus::Success);
            bufs.push(io.take_buf().unwrap());
            inflight -= 1;
        });
    }
    assert_eq!(flush(ch), IoStatus::Success);
    bytes as f64 / start.elapsed().as_secs_f64() / (1024.0 * 1024.0)
}

/// Restore speed against the destination's sequential write ceiling,
/// measured in the same run on the same file (run in release:
/// `cargo test --release -p hotcopy-tests --test repo_bdev -- --ignored`).
#[test]
#[ignore = "a measurement: run in release"]
fn restore_to_reaches_the_destination_write_ceiling() {
    const SIZE: u64 = 512 << 20;
    const CHUNK: u64 = 64 << 10;
    let reg = BdevRegistry::new();
    malloc::create(&reg, "ns", SIZE + (64 << 20), 4096).unwrap();
    let id = {
        let mut io = ChannelIo::new(reg.open("ns", true).unwrap().channel().unwrap());
        let mut repo = Repo::format(&mut io, false).unwrap();
        let spec = GenSpec {
            source: SourceIdent {
                name: "big".into(),
                size_bytes: SIZE,
            },
            chunk_size: CHUNK as u32,
            parent: None,
            compare_with_parent: false,
        };
        let w = repo.begin(&mut io, &spec).unwrap();
        let run = 16u64;
        for first in (0..SIZE / CHUNK).step_by(run as usize) {
            let mut data = pattern(first + 1, (run * CHUNK) as usize);
            w.write_run(&mut io, first, run, &mut data).unwrap();
        }
        repo.commit(&mut io, w, 1).unwrap().id
    };
    let dir = scratch_dir();
    let opts = uring::UringOptions {
        size: Some(SIZE),
        ..uring::UringOptions::new(dir.path().join("dest.img"))
    };
    uring::create(&reg, "dest", &opts).unwrap();
    // Allocate the file first, so that every run overwrites it. Then
    // alternate ceiling and restore, and compare the best of each (the
    // machine may be shared).
    write_ceiling(&reg, "dest", SIZE);
    let rt = Runtime::start(RuntimeConfig::with_cores(1, IdlePolicy::Poll)).unwrap();
    let (mut ceiling, mut best) = (0f64, 0f64);
    for _ in 0..3 {
        ceiling = ceiling.max(write_ceiling(&reg, "dest", SIZE));
        let report = restore_to(&reg, "ns", id, "dest", rt.reactor(0), 16, |_, _| {}).unwrap();
        assert_eq!((report.reads, report.writes), (512, 512), "1 MiB I/Os");
        best = best.max(report.mibps);
    }
    // The instant restore's hydrator, for the record.
    let (_, ir) = start_instant_restore(
        &reg,
        "ir",
        "ns",
        id,
        "dest",
        rt.reactor(0),
        InstantTuning::default(),
    )
    .unwrap();
    assert_eq!(ir.wait(Duration::from_secs(60)), RestoreState::Complete);
    let hydration = ir.status().mibps;
    rt.shutdown();
    let ratio = best / ceiling;
    println!(
        "restore {best:.0} MiB/s, destination ceiling {ceiling:.0} MiB/s (1 MiB writes, QD16): {ratio:.2}x; instant-restore hydration {hydration:.0} MiB/s"
    );
    assert!(ratio >= 0.9, "restore at {ratio:.2}x the write ceiling");
}

// ---- Fragmented generations ------------------------------------------------

/// Fills `buf` (one chunk, a multiple of 8 bytes) with bytes unique to
/// `chunk` at `version`: every 8-byte word differs between chunks, so a
/// chunk written at another chunk's place is seen.
fn chunk_content(buf: &mut [u8], chunk: u64, version: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = (version << 44) ^ (chunk << 16) ^ i as u64;
        w.copy_from_slice(&(v.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).to_le_bytes());
    }
}

/// Builds on `io` a full generation of a `size`-byte source in `cs`-byte
/// chunks and incrementals up to generation `gens`, the way `hotcopy bench
/// repo` does: before each incremental a scattered fraction of the chunks
/// changes (`fractions` first, then 1%), and the incremental stores them in
/// chunk order (consecutive ones in runs of up to 16), so a late
/// generation's chunks lie in many generations' extents. Returns the first
/// and the last generation.
fn fragmented_chain(
    io: &mut dyn BlockIo,
    size: u64,
    cs: u64,
    fractions: &[f64],
    gens: u64,
    seed: u64,
) -> (u64, u64) {
    let mut repo = Repo::format(io, false).unwrap();
    let chunks = size.div_ceil(cs);
    let spec = |parent| GenSpec {
        source: SourceIdent {
            name: "frag".into(),
            size_bytes: size,
        },
        chunk_size: cs as u32,
        parent,
        compare_with_parent: false,
    };
    let write_runs = |io: &mut dyn BlockIo, w: &GenWriter, list: &[u64], version: u64| {
        let mut buf = vec![0u8; (16 * cs) as usize];
        let mut i = 0;
        while i < list.len() {
            let mut n = 1;
            while i + n < list.len() && n < 16 && list[i + n] == list[i] + n as u64 {
                n += 1;
            }
            for k in 0..n {
                chunk_content(
                    &mut buf[k * cs as usize..][..cs as usize],
                    list[i + k],
                    version,
                );
            }
            w.write_run(io, list[i], n as u64, &mut buf[..n * cs as usize])
                .unwrap();
            i += n;
        }
    };
    let w = repo.begin(io, &spec(None)).unwrap();
    write_runs(io, &w, &(0..chunks).collect::<Vec<_>>(), 1);
    let first = repo.commit(io, w, 1).unwrap().id;
    let mut last = first;
    let mut rng = seed | 1;
    for g in 2..=gens {
        let f = fractions.get(g as usize - 2).copied().unwrap_or(0.01);
        let n = ((chunks as f64 * f).round() as u64).clamp(1, chunks);
        let mut picked = vec![false; chunks as usize];
        let mut k = 0;
        while k < n {
            let c = xorshift(&mut rng) % chunks;
            if !std::mem::replace(&mut picked[c as usize], true) {
                k += 1;
            }
        }
        let list: Vec<u64> = (0..chunks).filter(|&c| picked[c as usize]).collect();
        let w = repo.begin(io, &spec(Some(last))).unwrap();
        write_runs(io, &w, &list, g);
        for c in (0..chunks).filter(|&c| !picked[c as usize]) {
            w.inherit(c, 1).unwrap();
        }
        last = repo.commit(io, w, g).unwrap().id;
    }
    (first, last)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Restore of generation 1 against a late, fragmented generation of the
/// same chain, and against the destination's write ceiling (on the
/// restore's own reactor), in one run, rounds interleaved; medians. The
/// repository is in RAM, or with `HOTCOPY_RESTORE_NS=file` in a file on the
/// same disk as the destination; the destination is a file, or RAM with
/// `HOTCOPY_RESTORE_DEST=malloc` (what the engine costs in CPU);
/// `HOTCOPY_ROUNDS` rounds (3). Run in release:
/// `cargo test --release -p hotcopy-tests --test repo_bdev -- --ignored
/// --nocapture keeps_pace`.
#[test]
#[ignore = "a measurement: run in release"]
fn restore_of_a_fragmented_generation_keeps_pace_with_a_full_one() {
    const SIZE: u64 = 512 << 20;
    const CHUNK: u64 = 64 << 10;
    let reg = BdevRegistry::new();
    let dir = scratch_dir();
    let ns_bytes = SIZE * 3;
    if std::env::var("HOTCOPY_RESTORE_NS").as_deref() == Ok("file") {
        let opts = uring::UringOptions {
            size: Some(ns_bytes),
            ..uring::UringOptions::new(dir.path().join("ns.img"))
        };
        uring::create(&reg, "ns", &opts).unwrap();
    } else {
        malloc::create(&reg, "ns", ns_bytes, 4096).unwrap();
    }
    let t = Instant::now();
    let (g1, g50) = {
        let mut io = ChannelIo::new(reg.open("ns", true).unwrap().channel().unwrap());
        fragmented_chain(&mut io, SIZE, CHUNK, &[0.01, 0.05, 0.10, 0.25, 0.50], 50, 7)
    };
    println!("chain built in {:.1} s", t.elapsed().as_secs_f64());
    if std::env::var("HOTCOPY_RESTORE_DEST").as_deref() == Ok("malloc") {
        malloc::create(&reg, "dest", SIZE, 4096).unwrap();
    } else {
        let opts = uring::UringOptions {
            size: Some(SIZE),
            ..uring::UringOptions::new(dir.path().join("dest.img"))
        };
        uring::create(&reg, "dest", &opts).unwrap();
    }
    write_ceiling(&reg, "dest", SIZE);
    let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::Poll)).unwrap();
    let home = rt.reactor(1).clone();
    let (mut ceil, mut t1, mut t50) = (Vec::new(), Vec::new(), Vec::new());
    let mut writes = Vec::new();
    let rounds = std::env::var("HOTCOPY_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        ceil.push(write_ceiling_on(&home, &reg, "dest", SIZE));
        for (g, times) in [(g1, &mut t1), (g50, &mut t50)] {
            let t = Instant::now();
            let r = restore_to(&reg, "ns", g, "dest", &home, 0, |_, _| {}).unwrap();
            let s = t.elapsed().as_secs_f64();
            times.push(s);
            writes.push(r.writes);
            println!(
                "round {round}: generation {g}: {s:.3} s ({:.3} s copying), {:.0} MiB/s, {} reads, {} writes",
                r.elapsed.as_secs_f64(), r.mibps, r.reads, r.writes
            );
        }
    }
    rt.shutdown();
    let mib = (SIZE >> 20) as f64;
    let (c, a, b) = (median(&mut ceil), median(&mut t1), median(&mut t50));
    println!(
        "ceiling {c:.0} MiB/s; generation 1 {a:.3} s ({:.2}x), generation 50 {b:.3} s ({:.2}x); 50 over 1: {:.2}",
        mib / a / c,
        mib / b / c,
        b / a
    );
    // Whatever the fragmentation, one 1 MiB write per MiB.
    assert!(writes.iter().all(|&w| w == SIZE >> 20), "{writes:?}");
}

// ---- A fragmented generation, byte for byte -------------------------------

/// The fragmented chain's source: 16 KiB chunks (runs of 64 chunks), the
/// last one 4 KiB short.
const FRAG_CS: u64 = 16 << 10;
const FRAG_CHUNKS: u64 = 600;
const FRAG_SRC: u64 = FRAG_CHUNKS * FRAG_CS - 4096;

fn frag_range(c: u64) -> std::ops::Range<usize> {
    (c * FRAG_CS) as usize..((c + 1) * FRAG_CS).min(FRAG_SRC) as usize
}

/// Chunk `c` of `img` becomes `version`'s content for it (zeros for 0).
fn frag_put(img: &mut [u8], c: u64, version: u64) {
    let mut buf = vec![0u8; FRAG_CS as usize];
    if version > 0 {
        chunk_content(&mut buf, c, version);
    }
    let r = frag_range(c);
    let n = r.len();
    img[r].copy_from_slice(&buf[..n]);
}

/// Stores chunks `first..first + n` of `img` with one `write_run`, so that
/// they lie back to back, after whatever the generation stored before.
fn frag_store(io: &mut dyn BlockIo, w: &GenWriter, img: &[u8], first: u64, n: u64) {
    let mut buf = vec![0u8; (n * FRAG_CS) as usize];
    for k in 0..n {
        let r = frag_range(first + k);
        buf[(k * FRAG_CS) as usize..][..r.len()].copy_from_slice(&img[r]);
    }
    w.write_run(io, first, n, &mut buf).unwrap();
}

/// A chain of 41 generations on the malloc bdev `ns`: a full one with zero
/// chunks (isolated ones, and a stretch of 200 that keeps its last 160),
/// then 40 incrementals that each change 4% of the other chunks at random
/// (a few of them to zeros, a triple of consecutive chunks every fifth
/// time) and store them in random order, so that namespace order is not
/// chunk order; the last one also marks chunks zero and leaves chunks
/// 300..310 out of its scope. Every
/// chunk's content is unique to the chunk and the generation that wrote
/// it. Returns each generation as the test wrote it.
fn fragmented_fixture(reg: &BdevRegistry) -> Vec<Gen> {
    malloc::create(reg, "ns", 64 << 20, BS as u32).unwrap();
    let mut io = ChannelIo::new(reg.open("ns", true).unwrap().channel().unwrap());
    let mut repo = Repo::format(&mut io, false).unwrap();
    let spec = |parent| GenSpec {
        source: SourceIdent {
            name: "frag".into(),
            size_bytes: FRAG_SRC,
        },
        chunk_size: FRAG_CS as u32,
        parent,
        compare_with_parent: false,
    };
    let mut img = vec![0u8; FRAG_SRC as usize];
    for c in 0..FRAG_CHUNKS {
        let zero = [7, 63, 64, 65, 250].contains(&c) || (200..400).contains(&c);
        frag_put(&mut img, c, if zero { 0 } else { 1 });
    }
    let w = repo.begin(&mut io, &spec(None)).unwrap();
    for first in (0..FRAG_CHUNKS).step_by(8) {
        frag_store(&mut io, &w, &img, first, 8.min(FRAG_CHUNKS - first));
    }
    let mut last = repo.commit(&mut io, w, 1).unwrap().id;
    let mut gens = vec![Gen {
        id: last,
        image: img.clone(),
        absent: Vec::new(),
    }];
    let mut rng = 0xF4A6_u64;
    for v in 2..=41u64 {
        let mut picked = vec![false; FRAG_CHUNKS as usize];
        let mut list = Vec::new();
        while list.len() < 24 {
            let c = xorshift(&mut rng) % FRAG_CHUNKS;
            if !(240..400).contains(&c) && !std::mem::replace(&mut picked[c as usize], true) {
                list.push((c, 1));
            }
        }
        if v % 5 == 0 {
            let c = xorshift(&mut rng) % (FRAG_CHUNKS - 3);
            if (c..c + 3).all(|c| !picked[c as usize] && !(240..400).contains(&c)) {
                (c..c + 3).for_each(|c| picked[c as usize] = true);
                list.push((c, 3));
            }
        }
        // Random order: the namespace holds them out of chunk order.
        for i in (1..list.len()).rev() {
            list.swap(i, (xorshift(&mut rng) % (i as u64 + 1)) as usize);
        }
        let w = repo.begin(&mut io, &spec(Some(last))).unwrap();
        for (k, &(c, n)) in list.iter().enumerate() {
            for c in c..c + n {
                frag_put(&mut img, c, if k % 9 == 8 { 0 } else { v });
            }
            frag_store(&mut io, &w, &img, c, n);
        }
        let mut absent = Vec::new();
        if v == 41 {
            for c in [1, 2, 3, 500] {
                if !picked[c as usize] {
                    picked[c as usize] = true;
                    frag_put(&mut img, c, 0);
                    w.mark_zero(c, 1).unwrap();
                }
            }
            for c in 300..310 {
                if !picked[c as usize] {
                    picked[c as usize] = true;
                    w.mark_absent(c, 1).unwrap();
                    absent.push(c);
                }
            }
        }
        for c in (0..FRAG_CHUNKS).filter(|&c| !picked[c as usize]) {
            w.inherit(c, 1).unwrap();
        }
        last = repo.commit(&mut io, w, v).unwrap().id;
        let mut image = img.clone();
        for &c in &absent {
            image[frag_range(c)].fill(0);
        }
        gens.push(Gen {
            id: last,
            image,
            absent,
        });
    }
    assert!(repo.verify(&mut io, None).unwrap().is_ok());
    gens
}

/// Flips one bit inside stored chunk `chunk` of generation `gen` on the
/// namespace `ns` of `reg` (flipping it again undoes it); returns where the
/// chunk is stored.
fn flip_chunk_bit(reg: &BdevRegistry, gen: u64, chunk: u64) -> u64 {
    let mut io = ChannelIo::new(reg.open("ns", true).unwrap().channel().unwrap());
    let repo = Repo::open(&mut io).unwrap();
    let index = repo.index(&mut io, gen).unwrap();
    let Some(ChunkLoc::Data(loc)) = index.resolve(chunk).map(|e| e.loc) else {
        panic!("chunk {chunk} is stored");
    };
    let at = loc + 1000;
    let mut block = vec![0u8; BS as usize];
    io.read(at / BS * BS, &mut block).unwrap();
    block[(at % BS) as usize] ^= 0x10;
    io.write(at / BS * BS, &block).unwrap();
    loc
}

/// Creates restore destination `dest` once: "file" is a uring file in
/// `dir`, any other name a RAM disk.
fn frag_dest(reg: &BdevRegistry, dest: &str, size: u64, dir: &std::path::Path) {
    if reg.open(dest, false).is_ok() {
        return;
    }
    if dest == "file" {
        let opts = uring::UringOptions {
            size: Some(size),
            ..uring::UringOptions::new(dir.join("dest.img"))
        };
        uring::create(reg, dest, &opts).unwrap();
    } else {
        malloc::create(reg, dest, size, BS as u32).unwrap();
    }
}

/// Checks a restore of fragmented generation `g` onto `dest`, which held
/// `before`: the generation's chunks in place (its absent ones left as
/// they were), nothing past the source touched, and every chunk counted
/// once in `report`.
fn assert_frag_restored(
    reg: &BdevRegistry,
    dest: &str,
    size: u64,
    g: &Gen,
    before: &[u8],
    report: &hotcopy_cow::repo_bdev::RestoreReport,
    what: &str,
) {
    let got = read_all(reg, dest, size);
    let mut want = g.image.clone();
    for &c in &g.absent {
        let r = frag_range(c);
        want[r.clone()].copy_from_slice(&before[r]);
    }
    if let Some(b) = got[..FRAG_SRC as usize]
        .iter()
        .zip(&want)
        .position(|(a, b)| a != b)
    {
        panic!("{what}: differs at byte {b} (chunk {})", b as u64 / FRAG_CS);
    }
    assert_eq!(
        got[FRAG_SRC as usize..],
        before[FRAG_SRC as usize..],
        "{what}: past the source"
    );
    assert_eq!(
        report.data_chunks + report.zero_chunks + report.absent_chunks,
        FRAG_CHUNKS,
        "{what}: {report:?}"
    );
    assert_eq!(report.absent_chunks, g.absent.len() as u64, "{what}");
}

#[test]
fn restore_to_gathers_a_fragmented_generation_byte_for_byte() {
    let reg = BdevRegistry::new();
    let gens = fragmented_fixture(&reg);
    let rt = runtime();
    let dir = scratch_dir();
    let size = FRAG_SRC + FRAG_CS;
    // (generation index, destination, queue depth)
    let cases = [
        (0, "m16", 16),
        (20, "m16", 16),
        (40, "m16", 16),
        (40, "m1", 1),
        (0, "file", 4),
        (40, "file", 4),
    ];
    for (i, &(gi, dest, qd)) in cases.iter().enumerate() {
        let g = &gens[gi];
        frag_dest(&reg, dest, size, dir.path());
        let before = pattern(900 + i as u64, size as usize);
        fill(&reg, dest, before.clone());
        let report = restore_to(&reg, "ns", g.id, dest, rt.reactor(1), qd, |_, _| {}).unwrap();
        let what = format!("generation {} onto {dest} at qd {qd}", g.id);
        assert_frag_restored(&reg, dest, size, g, &before, &report, &what);
        if gi == 0 {
            // Runs of the full generation without zero chunks are read
            // whole into their buffers; the stretch of zeros is one
            // write-zeroes.
            assert!(report.gathered_runs < report.writes, "{what}: {report:?}");
            assert!(report.zero_chunks >= 200, "{what}: {report:?}");
        } else {
            // Gathered: many extents read, few large writes.
            assert!(report.gathered_runs > 0, "{what}: {report:?}");
            assert!(report.reads > 8 * report.writes, "{what}: {report:?}");
            assert!(report.writes <= 14, "{what}: {report:?}");
        }
    }
    rt.shutdown();
}

// ---- A restore spread over several reactors --------------------------------

/// A restore over two (and three) reactors writes what one does: the
/// fragmented chain's 600 chunks are ten runs of 64 (the last one short),
/// cut into parts of about equal work (data chunks weigh more than zero
/// ones, absent ones nothing): at chunk 384 for the full generation over
/// two reactors, inside its stretch of zeros (200..400); at 256 for the
/// last one, whose absent chunks (300..310) fall in its second part; at
/// 192 and 512 over three. The
/// destination holds a pattern first, so a part that skips a chunk at its
/// ends leaves it there; one that restores a chunk twice counts it twice in
/// the report and in the progress.
#[test]
fn restore_to_on_two_reactors_writes_each_part_byte_for_byte() {
    let reg = BdevRegistry::new();
    let gens = fragmented_fixture(&reg);
    let rt = runtime();
    let dir = scratch_dir();
    let size = FRAG_SRC + FRAG_CS;
    let (r0, r1) = (rt.reactor(0).clone(), rt.reactor(1).clone());
    let two = [r0.clone(), r1.clone()];
    let three = [r0.clone(), r1.clone(), r0.clone()];
    // (generation index, destination, reactors, queue depth)
    let cases: [(usize, &str, &[_], usize); 6] = [
        (0, "m16", &two, 16),
        (40, "m16", &two, 16),
        (20, "m16", &three, 16),
        (40, "m1", &two, 1),
        (0, "file", &two, 4),
        (40, "file", &three, 0),
    ];
    for (i, &(gi, dest, homes, qd)) in cases.iter().enumerate() {
        let g = &gens[gi];
        frag_dest(&reg, dest, size, dir.path());
        let before = pattern(700 + i as u64, size as usize);
        fill(&reg, dest, before.clone());
        let mut calls: Vec<(u64, u64)> = Vec::new();
        let report =
            restore_to_on(&reg, "ns", g.id, dest, homes, qd, |d, t| calls.push((d, t))).unwrap();
        let what = format!(
            "generation {} onto {dest} over {} reactors at qd {qd}",
            g.id,
            homes.len()
        );
        // Every chunk counted once, every byte written once.
        assert_frag_restored(&reg, dest, size, g, &before, &report, &what);
        assert_eq!(
            report.bytes_written,
            FRAG_SRC - g.absent.len() as u64 * FRAG_CS,
            "{what}: {report:?}"
        );
        assert_eq!(report.bytes_total, FRAG_SRC, "{what}");
        assert!(
            calls.windows(2).all(|w| w[0].0 <= w[1].0),
            "{what}: {calls:?}"
        );
        assert_eq!(calls.last(), Some(&(FRAG_SRC, FRAG_SRC)), "{what}");
        assert!(
            report.mibps > 0.0 && report.elapsed > Duration::ZERO,
            "{what}"
        );
        // At least one write per part: no run straddles two parts.
        let parts = homes.len() as u64;
        assert!(report.writes >= parts, "{what}: {report:?}");
    }

    // A generation of one run is one part, whatever the reactors.
    let fx = fixture(false);
    let g = &fx.gens[2];
    malloc::create(&fx.reg, "dest", SRC + CS, BS as u32).unwrap();
    let before = pattern(777, (SRC + CS) as usize);
    fill(&fx.reg, "dest", before.clone());
    let report = restore_to_on(&fx.reg, "ns", g.id, "dest", &three, 4, |_, _| {}).unwrap();
    assert_eq!(
        report.data_chunks + report.zero_chunks + report.absent_chunks,
        CHUNKS
    );
    let got = read_all(&fx.reg, "dest", SRC + CS);
    assert_same(&got[..SRC as usize], &g.restored_over(&before), "one run");
    assert_eq!(
        got[SRC as usize..],
        before[SRC as usize..],
        "past the source"
    );
    // No reactor at all is refused.
    let err = restore_to_on(&fx.reg, "ns", g.id, "dest", &[], 4, |_, _| {}).unwrap_err();
    assert!(matches!(err, RepoBdevError::Invalid { .. }), "{err}");
    rt.shutdown();
}

/// A part that fails fails the restore with its own error (not the one
/// the other parts stop with), once every part has ended: a corrupt chunk
/// in the second part (and in the first), and a destination write that
/// fails while the parts have writes in flight. The same devices then
/// restore cleanly.
#[test]
fn restore_to_on_fails_with_the_error_of_the_part_that_failed() {
    let reg = BdevRegistry::new();
    let gens = fragmented_fixture(&reg);
    let g = &gens[0];
    let rt = runtime();
    let (r0, r1) = (rt.reactor(0).clone(), rt.reactor(1).clone());
    let two = [r0.clone(), r1.clone()];
    let three = [r0.clone(), r1.clone(), r0.clone()];
    let size = FRAG_SRC + FRAG_CS;
    malloc::create(&reg, "dest_base", size, BS as u32).unwrap();
    let (_, ctl) = fault::create(&reg, "dest", "dest_base", FaultOptions::default()).unwrap();

    // Flips a bit of chunk `chunk` of generation 1 on the namespace;
    // returns where the chunk is stored and how to undo it.
    let corrupt = |chunk: u64| -> u64 { flip_chunk_bit(&reg, g.id, chunk) };
    // (corrupt chunk, reactors): in the second of two parts (320..600),
    // and in the first of three (0..192).
    for (chunk, homes) in [(550u64, &two[..]), (100, &three[..])] {
        let loc = corrupt(chunk);
        let err = restore_to_on(&reg, "ns", g.id, "dest", homes, 8, |_, _| {}).unwrap_err();
        match &err {
            RepoBdevError::Checksum {
                chunk: c, offset, ..
            } => assert_eq!((*c, *offset), (chunk, loc)),
            other => panic!("chunk {chunk}: expected a checksum error, got {other}"),
        }
        assert_eq!(corrupt(chunk), loc, "undone");
    }

    // A destination write fails while both parts have writes in flight.
    ctl.set_latency_us(2000);
    ctl.fail_next_writes(1);
    let err = restore_to_on(&reg, "ns", g.id, "dest", &two, 16, |_, _| {}).unwrap_err();
    match &err {
        RepoBdevError::Io {
            device,
            op,
            source: IoError::Injected,
            ..
        } => assert_eq!((device.as_str(), *op), ("dest", "write"), "{err}"),
        other => panic!("expected an injected write error, got {other}"),
    }
    // Every part had ended: nothing reaches the destination any more.
    let seen = ctl.ios_seen();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ctl.ios_seen(), seen, "I/O after the restore returned");
    assert_eq!(ctl.injected_errors(), 1);

    // The same devices restore cleanly.
    ctl.clear();
    let before = pattern(4321, size as usize);
    fill(&reg, "dest", before.clone());
    restore_to_on(&reg, "ns", g.id, "dest", &two, 16, |_, _| {}).unwrap();
    let got = read_all(&reg, "dest", size);
    assert!(got[..FRAG_SRC as usize] == g.image[..], "restored");
    assert_eq!(got[FRAG_SRC as usize..], before[FRAG_SRC as usize..]);
    rt.shutdown();
}
