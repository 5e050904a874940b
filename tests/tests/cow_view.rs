//! The point-in-time view: while a backup job runs, reads of the view return
//! the source exactly as it was at the consistency point, whatever writes go
//! through the cow bdev meanwhile, from whichever place (source, container
//! slot, target) holds each chunk's old content at that moment.
//!
//! The jobs are made slow on purpose (a paused or rate-limited copy stream, a
//! target with latency), so that reads meet chunks in every state, and so
//! that a job cannot end before the test has read what it wants, however
//! slowly a busy machine runs the test. Reads run on a test reactor; writers
//! run on the cow bdev, either from the same test reactor or, in the
//! randomized test, as pollers on both reactors of a real two-core runtime,
//! logging their writes so that the consistency-point image can be rebuilt
//! from the job's `t0_writes` (as in `cow_backup.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hotcopy_bdev::modules::fault::{self, FaultControl, FaultOptions};
use hotcopy_bdev::modules::malloc;
use hotcopy_bdev::{Bdev, BdevChannel, BdevDesc, BdevIo, BdevRegistry, IoError, IoStatus};
use hotcopy_cow::job::JobShared;
use hotcopy_cow::view::{create_view, CowView};
use hotcopy_cow::{
    start_backup, BackupConfig, BackupJob, BackupTarget, ChunkState, CommitInfo, ContainerConfig,
    JobState, JobTuning, RawImageTarget, Scope, TargetError,
};
use hotcopy_runtime::{DmaBuf, IdlePolicy, Runtime, RuntimeConfig};
use hotcopy_tests::*;

const BS: u64 = 512;
const SOURCE_BYTES: u64 = 4 << 20;
const BLOCKS: u64 = SOURCE_BYTES / BS;
const KIB: u64 = 1024;

fn runtime() -> Runtime {
    Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::Poll)).unwrap()
}

/// A cow bdev `vol` on `src` (filled with a known pattern), a fault target
/// `tgt` over `tgt_base`, and a container `cont`.
struct Rig {
    reg: BdevRegistry,
    cow: Bdev,
    tctl: FaultControl,
    image: Vec<u8>,
    chunk: u64,
    slots: u32,
}

impl Rig {
    /// With `source_latency_us`, `src` is a fault bdev over the malloc `src_base`.
    fn new(chunk: u64, slots: u32, source_latency_us: Option<u64>, target_latency_us: u64) -> Rig {
        let reg = BdevRegistry::new();
        let base = if source_latency_us.is_some() {
            "src_base"
        } else {
            "src"
        };
        malloc::create(&reg, base, SOURCE_BYTES, BS as u32).unwrap();
        let image = pattern(0xC0FFEE, SOURCE_BYTES as usize);
        {
            let desc = reg.open(base, true).unwrap();
            let data = image.clone();
            on_reactor(move |_| {
                let mut ch = desc.channel().unwrap();
                assert_eq!(write(&mut ch, 0, &data), IoStatus::Success);
            });
        }
        if let Some(us) = source_latency_us {
            let (_, sctl) =
                fault::create(&reg, "src", "src_base", FaultOptions::default()).unwrap();
            sctl.set_latency_us(us);
        }
        malloc::create(&reg, "tgt_base", SOURCE_BYTES, BS as u32).unwrap();
        let (_, tctl) = fault::create(&reg, "tgt", "tgt_base", FaultOptions::default()).unwrap();
        tctl.set_latency_us(target_latency_us);
        malloc::create(&reg, "cont", chunk * slots as u64, BS as u32).unwrap();
        let cow = hotcopy_cow::create(&reg, "vol", "src").unwrap();
        Rig {
            reg,
            cow,
            tctl,
            image,
            chunk,
            slots,
        }
    }

    fn config(&self, tuning: JobTuning) -> BackupConfig {
        self.config_with(
            tuning,
            Arc::new(RawImageTarget::new(self.reg.open("tgt", true).unwrap())),
        )
    }

    fn config_with(&self, tuning: JobTuning, target: Arc<dyn BackupTarget>) -> BackupConfig {
        BackupConfig {
            target,
            container: ContainerConfig {
                desc: self.reg.open("cont", true).unwrap(),
                offset_blocks: 0,
                slots: self.slots,
            },
            chunk_size: self.chunk,
            scope: Scope::all(),
            tuning,
            changed_since: None,
        }
    }

    fn start(&self, rt: &Runtime, tuning: JobTuning) -> BackupJob {
        start_backup(&self.cow, rt.reactor(0), self.config(tuning)).expect("job starts")
    }

    /// A job whose copy stream copies one chunk per I/O.
    fn start_chunkwise(&self, rt: &Runtime, tuning: JobTuning) -> BackupJob {
        let raw = RawImageTarget::new(self.reg.open("tgt", true).unwrap());
        let cfg = self.config_with(tuning, Arc::new(ChunkwiseTarget(raw)));
        start_backup(&self.cow, rt.reactor(0), cfg).expect("job starts")
    }

    fn chunk_blocks(&self) -> u64 {
        self.chunk / BS
    }

    fn bytes(&self, block: u64, blocks: u64) -> std::ops::Range<usize> {
        (block * BS) as usize..((block + blocks) * BS) as usize
    }
}

/// The raw image without the promise that consecutive chunks are adjacent,
/// so the copy stream never merges chunks into one I/O.
struct ChunkwiseTarget(RawImageTarget);

impl BackupTarget for ChunkwiseTarget {
    fn desc(&self) -> &BdevDesc {
        self.0.desc()
    }

    fn prepare(&self, source: &Bdev, chunk_bytes: u64) -> Result<(), TargetError> {
        self.0.prepare(source, chunk_bytes)
    }

    fn place(
        &self,
        first: u64,
        count: u64,
        data: &mut [u8],
        valid: usize,
    ) -> Result<Option<(u64, usize)>, TargetError> {
        self.0.place(first, count, data, valid)
    }

    fn locate(&self, chunk: u64) -> Option<hotcopy_cow::Placed> {
        self.0.locate(chunk)
    }

    fn commit(&self, info: &CommitInfo) -> Result<Option<u64>, TargetError> {
        self.0.commit(info)
    }

    fn describe(&self) -> String {
        format!("chunkwise {}", self.0.describe())
    }
}

fn view_stats(view: &Bdev) -> hotcopy_cow::view::ViewStats {
    view.backend::<CowView>().expect("a view").stats()
}

/// Index of the first differing byte (for messages).
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: differs from the expected data at byte {i} (block {}, of {} bytes)",
            i as u64 / BS,
            want.len()
        );
    }
}

/// Waits (polling the job's map) until `cond` holds, or panics.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads `[block, block + blocks)` in steps of at most 1 MiB.
fn read_range(ch: &mut BdevChannel, block: u64, blocks: u64) -> Vec<u8> {
    let step = (1 << 20) / BS;
    let mut out = Vec::with_capacity((blocks * BS) as usize);
    let mut b = block;
    while b < block + blocks {
        let n = step.min(block + blocks - b);
        out.extend(read(ch, b, n).unwrap_or_else(|s| panic!("read {b}+{n}: {s:?}")));
        b += n;
    }
    out
}

/// A copy-stream rate limit that stops it after its first copy I/O: the job
/// then only moves through captures, and ends once the limit is lifted.
const PAUSED: u64 = 1;

/// Tuning for a job that runs for seconds unless its rate limit is lifted.
fn slow_tuning(rate: u64) -> JobTuning {
    JobTuning {
        max_queue_depth: 2,
        rate_limit: rate,
        ..JobTuning::default()
    }
}

#[test]
fn the_view_shows_the_consistency_point_while_the_cow_bdev_shows_new_writes() {
    let rt = runtime();
    let chunk = 64 * KIB;
    let rig = Rig::new(chunk, 4, None, 2000);
    let cb = rig.chunk_blocks();
    // One chunk per 125 ms, paused once two are on the target.
    let job = rig.start(&rt, slow_tuning(512 * KIB));
    let view = create_view(&rig.reg, "view", &job).unwrap();
    assert_eq!(view.info().product, "cow_view");
    assert_eq!(view.block_size() as u64, BS);
    assert_eq!(view.num_blocks(), BLOCKS);
    let backend = view.backend::<CowView>().expect("a view");
    assert!(Arc::ptr_eq(backend.job(), job.shared()));
    let shared = job.shared().clone();
    wait_until(
        "chunks 0 and 1 on the target",
        Duration::from_secs(20),
        || shared.map.get(0) == ChunkState::Done && shared.map.get(1) == ChunkState::Done,
    );
    job.set_rate_limit(PAUSED);
    // Slow the drain down so that captured chunks stay in the container.
    rig.tctl.set_latency_us(2_000_000);

    // (block, blocks, seed): one already on the target, the rest pending
    // (the copy stream is near the start of the device). The first four
    // captures fill the container; the last write needs three more slots,
    // so it waits for the (slow) drain.
    let writes: Vec<(u64, u64, u64)> = vec![
        (cb + 3, 10, 1),                  // chunk 1: done, passes straight through
        (40 * cb, cb, 2),                 // chunk 40: whole chunk, captured
        (50 * cb + cb / 2, cb, 3),        // chunks 50-51: spans the boundary
        (60 * cb + 77, 1, 4),             // chunk 60: one block
        (BLOCKS - 2 * cb - 5, 2 * cb, 5), // chunks 61-63
    ];
    for &(b, n, _) in &writes[1..] {
        let (c0, c1) = shared.chunk_span(b, n);
        for c in c0..=c1 {
            assert_eq!(shared.map.get(c), ChunkState::Pending, "chunk {c}");
        }
    }
    let mut current = rig.image.clone();
    for &(b, n, seed) in &writes {
        current[rig.bytes(b, n)].copy_from_slice(&pattern(seed, (n * BS) as usize));
    }
    let (vdesc, cdesc) = (
        rig.reg.open("view", false).unwrap(),
        rig.reg.open("vol", true).unwrap(),
    );
    let (image, cur, ws, sh, tctl) = (
        rig.image.clone(),
        current.clone(),
        writes.clone(),
        shared.clone(),
        rig.tctl.clone(),
    );
    on_reactor(move |_| {
        let mut v = vdesc.channel().unwrap();
        let mut c = cdesc.channel().unwrap();
        let img = |b: u64, n: u64| &image[(b * BS) as usize..((b + n) * BS) as usize];
        let cow_write = |c: &mut BdevChannel, &(b, n, seed): &(u64, u64, u64)| {
            let data = pattern(seed, (n * BS) as usize);
            assert_eq!(write(c, b, &data), IoStatus::Success);
        };
        for w in &ws[..4] {
            cow_write(&mut c, w);
        }
        // Whole chunks and unaligned pieces of them, while the captured
        // chunks are still in the container.
        for (b, n) in [
            (40 * cb, cb),
            (50 * cb, cb),
            (51 * cb, cb),
            (60 * cb, cb),
            (40 * cb + 3, 7),
            (50 * cb + 100, cb - 100 + 17),
            (60 * cb + 70, 9),
        ] {
            let got = read(&mut v, b, n).unwrap();
            assert_same(&got, img(b, n), &format!("view of {b}+{n}"));
        }
        assert!(
            [40u64, 50, 51, 60]
                .iter()
                .any(|&c| sh.map.get(c) == ChunkState::Saved),
            "the captured chunks were still in the container"
        );
        // New target I/O is fast again (drains already issued keep their 2 s).
        tctl.set_latency_us(2000);
        cow_write(&mut c, &ws[4]);
        // Across chunk boundaries and states: done (target), pending
        // (source), saved (container) or drained (target).
        for (b, n) in [
            (cb + 5, 4),
            (cb + 100, 2 * cb),
            (59 * cb + 1, 3 * cb),
            (BLOCKS - 3 * cb - 11, 3 * cb + 11),
            (BLOCKS - 1, 1),
        ] {
            let got = read(&mut v, b, n).unwrap();
            assert_same(&got, img(b, n), &format!("view of {b}+{n}"));
        }
        // The whole device in 1 MiB reads, and in one 4 MiB read.
        assert_same(&read_range(&mut v, 0, BLOCKS), &image, "view, 1 MiB reads");
        assert_same(&read(&mut v, 0, BLOCKS).unwrap(), &image, "view, one read");
        // The cow bdev shows the new data.
        assert_same(&read_range(&mut c, 0, BLOCKS), &cur, "cow bdev");
    });
    let stats = view_stats(&view);
    assert_eq!(
        job.state(),
        JobState::Running,
        "the reads ran during the job"
    );
    assert!(stats.from_container > 0, "{stats:?}");
    assert!(stats.from_target > 0, "{stats:?}");
    assert!(stats.from_source > 0, "{stats:?}");
    assert_eq!(stats.aborted + stats.failed, 0, "{stats:?}");

    // Let the job finish: the view keeps showing the consistency point.
    rig.tctl.set_latency_us(0);
    job.set_rate_limit(0);
    assert_eq!(job.wait(Duration::from_secs(60)), JobState::Complete);
    let (vdesc, cdesc, image) = (
        rig.reg.open("view", false).unwrap(),
        rig.reg.open("vol", false).unwrap(),
        rig.image.clone(),
    );
    let before = view_stats(&view);
    on_reactor(move |_| {
        let mut v = vdesc.channel().unwrap();
        let mut c = cdesc.channel().unwrap();
        assert_same(&read_range(&mut v, 0, BLOCKS), &image, "view after the job");
        assert_same(
            &read(&mut v, 7, 3).unwrap(),
            &image[7 * 512..10 * 512],
            "small",
        );
        assert_same(
            &read_range(&mut c, 0, BLOCKS),
            &current,
            "cow after the job",
        );
    });
    let after = view_stats(&view);
    assert_eq!(
        after.from_source, before.from_source,
        "a completed job serves every chunk from the target"
    );
}

/// Polls `ch` until the I/O with `token` is back.
fn wait_io(ch: &mut BdevChannel, token: u64) -> BdevIo {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = None;
    while out.is_none() {
        ch.poll(&mut |io| {
            assert_eq!(io.token, token);
            out = Some(io);
        });
        assert!(Instant::now() < deadline, "I/O {token} lost");
    }
    out.unwrap()
}

/// Waits for the raced view read (token 7) of chunk `x` (`chunk` bytes) and
/// checks that it returned the chunk as it was at the consistency point
/// (`image`), and that the cow bdev now holds `new` there. Returns the
/// chunk's bytes at the consistency point.
#[track_caller]
fn check_raced_read<'a>(
    v: &mut BdevChannel,
    c: &mut BdevChannel,
    x: u64,
    chunk: u64,
    image: &'a [u8],
    new: &[u8],
) -> &'a [u8] {
    let cb = chunk / BS;
    let mut r = wait_io(v, 7);
    assert_eq!(r.status, IoStatus::Success);
    let t0 = &image[(x * chunk) as usize..((x + 1) * chunk) as usize];
    assert_same(&r.take_buf().unwrap(), t0, "raced view read");
    assert_same(&read(c, x * cb, cb).unwrap(), new, "cow after write");
    t0
}

#[test]
fn a_source_read_that_races_a_capture_is_redone_from_the_container() {
    let rt = runtime();
    let chunk = 64 * KIB;
    // Drains take 2 s, so the captured chunks stay in the container.
    let rig = Rig::new(chunk, 4, None, 2_000_000);
    let cb = rig.chunk_blocks();
    // The copy stream stops after its first run (1 MiB at most).
    let job = rig.start(&rt, slow_tuning(PAUSED));
    let view = create_view(&rig.reg, "view", &job).unwrap();
    let (vdesc, cdesc, image, shared) = (
        rig.reg.open("view", false).unwrap(),
        rig.reg.open("vol", true).unwrap(),
        rig.image.clone(),
        job.shared().clone(),
    );
    on_reactor(move |_| {
        let mut v = vdesc.channel().unwrap();
        let mut c = cdesc.channel().unwrap();
        for x in [40u64, 45, 50] {
            assert_eq!(shared.map.get(x), ChunkState::Pending);
            // The write starts the capture (its source read is in flight) ...
            let new = pattern(2000 + x, chunk as usize);
            let w = BdevIo::write(x * cb, cb, DmaBuf::from_slice(&new).unwrap(), 8);
            c.submit(w);
            assert_eq!(shared.map.get(x), ChunkState::Saving);
            // ... so the view reads the source, which still holds T0 ...
            let r = BdevIo::read(x * cb, cb, DmaBuf::alloc(chunk as usize).unwrap(), 7);
            v.submit(r);
            // ... but by the time the view looks at its read, the capture has
            // finished and the write has gone to the source.
            assert_eq!(wait_io(&mut c, 8).status, IoStatus::Success);
            assert_eq!(shared.map.get(x), ChunkState::Saved);
            check_raced_read(&mut v, &mut c, x, chunk, &image, &new);
        }
    });
    let stats = view_stats(&view);
    assert_eq!(stats.redone, 3, "{stats:?}");
    assert_eq!(stats.from_container, 3, "{stats:?}");
    assert_eq!(stats.from_source, 0, "{stats:?}");
    rig.tctl.set_latency_us(0);
    job.set_rate_limit(0);
    assert_eq!(job.wait(Duration::from_secs(60)), JobState::Complete);
}

#[test]
fn a_source_read_that_races_the_copy_of_its_chunk_is_redone_from_the_target() {
    let rt = runtime();
    let chunk = 64 * KIB;
    // Every source read takes 100 ms; one chunk per copy, one copy at a
    // time: over 6 s for the job.
    let rig = Rig::new(chunk, 4, Some(100_000), 0);
    let cb = rig.chunk_blocks();
    let job = rig.start_chunkwise(
        &rt,
        JobTuning {
            max_queue_depth: 1,
            adaptive: false,
            ..JobTuning::default()
        },
    );
    let view = create_view(&rig.reg, "view", &job).unwrap();
    let (vdesc, cdesc, image, shared) = (
        rig.reg.open("view", false).unwrap(),
        rig.reg.open("vol", true).unwrap(),
        rig.image.clone(),
        job.shared().clone(),
    );
    let raced = on_reactor(move |_| {
        let mut v = vdesc.channel().unwrap();
        let mut c = cdesc.channel().unwrap();
        let mut raced = Vec::new();
        while raced.len() < 3 && shared.state() == JobState::Running {
            // A chunk the copy stream is reading now.
            let Some(x) = (0..shared.map.len()).find(|&c| shared.map.get(c) == ChunkState::Copying)
            else {
                continue;
            };
            let r = BdevIo::read(x * cb, cb, DmaBuf::alloc(chunk as usize).unwrap(), 7);
            v.submit(r);
            if shared.map.get(x) != ChunkState::Copying {
                // Too late: the view may not have read the source.
                wait_io(&mut v, 7);
                continue;
            }
            // The view read the source while the chunk was Copying; it looks
            // at the result only once the copy stream has moved on (and a
            // write may have reached the source).
            let deadline = Instant::now() + Duration::from_secs(30);
            while shared.map.get(x) == ChunkState::Copying {
                assert!(Instant::now() < deadline, "chunk {x} stuck in Copying");
                std::thread::sleep(Duration::from_millis(1));
            }
            let new = pattern(1000 + x, chunk as usize);
            let w = BdevIo::write(x * cb, cb, DmaBuf::from_slice(&new).unwrap(), 8);
            assert_eq!(run_io(&mut c, w).status, IoStatus::Success);
            let t0 = check_raced_read(&mut v, &mut c, x, chunk, &image, &new);
            assert_same(&read(&mut v, x * cb, cb).unwrap(), t0, "view again");
            raced.push(x);
        }
        raced
    });
    let stats = view_stats(&view);
    assert_eq!(
        raced.len(),
        3,
        "chunks raced before the job ended: {raced:?}"
    );
    assert!(stats.redone >= 3, "{stats:?}");
    assert_eq!(job.wait(Duration::from_secs(60)), JobState::Complete);
}

#[test]
fn writes_to_the_view_fail_and_flush_is_a_no_op() {
    let rt = runtime();
    let rig = Rig::new(16 * KIB, 2, None, 2000);
    let job = rig.start(&rt, slow_tuning(PAUSED));
    let view = create_view(&rig.reg, "view", &job).unwrap();
    assert!(!view.supports(hotcopy_bdev::IoType::Write));
    let (rw, ro, image) = (
        rig.reg.open("view", true).unwrap(),
        rig.reg.open("view", false).unwrap(),
        rig.image.clone(),
    );
    on_reactor(move |_| {
        let mut w = rw.channel().unwrap();
        let data = vec![0xAB; 4 * BS as usize];
        for (what, status) in [
            ("write", write(&mut w, 8, &data)),
            ("write at 0", write(&mut w, 0, &data)),
            ("unmap", unmap(&mut w, 0, 64)),
            ("write-zeroes", write_zeroes(&mut w, 0, 64)),
        ] {
            assert!(
                matches!(
                    status,
                    IoStatus::Failed(IoError::Unsupported | IoError::ReadOnly)
                ),
                "{what} through a writable view descriptor: {status:?}"
            );
        }
        assert_eq!(flush(&mut w), IoStatus::Success);
        let mut r = ro.channel().unwrap();
        let status = write(&mut r, 8, &data);
        assert!(
            matches!(
                status,
                IoStatus::Failed(IoError::Unsupported | IoError::ReadOnly)
            ),
            "write through a read-only view descriptor: {status:?}"
        );
        assert_same(&read_range(&mut r, 0, BLOCKS), &image, "view");
    });
    assert_eq!(job.state(), JobState::Running);
    job.set_rate_limit(0);
    rig.tctl.set_latency_us(0);
    assert_eq!(job.wait(Duration::from_secs(60)), JobState::Complete);
    assert_same(
        &{
            let d = rig.reg.open("src", false).unwrap();
            on_reactor(move |_| read_range(&mut d.channel().unwrap(), 0, BLOCKS))
        },
        &rig.image,
        "the source after writes to the view",
    );
}

#[test]
fn reads_fail_with_aborted_after_the_job_fails_or_is_cancelled() {
    let rt = runtime();
    let rig = Rig::new(64 * KIB, 2, None, 0);
    // The target dies at its first write.
    rig.tctl.fail_writes_after(0);
    let job = rig.start(&rt, JobTuning::default());
    let view = create_view(&rig.reg, "view", &job).unwrap();
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Failed);
    let read_once = |name: &'static str, block: u64, blocks: u64| {
        let d = rig.reg.open(name, false).unwrap();
        on_reactor(move |_| read(&mut d.channel().unwrap(), block, blocks))
    };
    for (b, n) in [(0, 1), (0, BLOCKS), (BLOCKS - 3, 3)] {
        assert_eq!(
            read_once("view", b, n).map(|_| ()),
            Err(IoStatus::Failed(IoError::Aborted)),
            "read {b}+{n} of a failed job's view"
        );
    }
    assert!(view_stats(&view).aborted >= 3);
    // The cow bdev itself carries on.
    assert_same(
        &read_once("vol", 0, 128).unwrap(),
        &rig.image[..128 * 512],
        "cow",
    );

    // A second job on a working target, cancelled while it runs.
    rig.tctl.clear();
    let job2 = rig.start(&rt, slow_tuning(256 * KIB));
    create_view(&rig.reg, "view2", &job2).unwrap();
    assert_same(
        &read_once("view2", 0, BLOCKS).unwrap(),
        &rig.image,
        "view of the second job",
    );
    // The first view still belongs to the failed job.
    assert_eq!(
        read_once("view", 0, 1).map(|_| ()),
        Err(IoStatus::Failed(IoError::Aborted))
    );
    job2.cancel();
    assert_eq!(job2.wait(Duration::from_secs(30)), JobState::Cancelled);
    assert_eq!(
        read_once("view2", 0, 8).map(|_| ()),
        Err(IoStatus::Failed(IoError::Aborted)),
        "read of a cancelled job's view"
    );
}

// ---- Randomized: concurrent writers on both reactors, reads of the view ----

/// Writers leave every fourth 64 KiB alone, so that those chunks stay
/// pending until the (paused) copy stream reaches them: the job cannot end
/// before the test lifts the limit, however slowly the test runs.
fn untouched(block: u64) -> bool {
    ((block * BS) >> 16) % 4 == 3
}

/// Checks a view read of `[b, b + got.len())` against the T0 image. On a
/// mismatch, says where the wrong data came from: a chunk the job never
/// captured whose source already holds newer data means a write after the
/// consistency point slipped past the cow interception (the backup gets the
/// same bytes), not a view error.
fn check_view_read(
    got: &[u8],
    image: &[u8],
    b: u64,
    src: &mut BdevChannel,
    job: &JobShared,
    what: &str,
) {
    let r = (b * BS) as usize..(b * BS) as usize + got.len();
    let Some(i) = first_diff(got, &image[r]) else {
        return;
    };
    let blk = b + i as u64 / BS;
    let chunk = blk / job.chunk_blocks;
    let state = job.map.get(chunk);
    let now = read(src, blk, 1).expect("read the source");
    let k = (blk - b) as usize * BS as usize;
    let from_source_now = got[k..k + BS as usize] == now[..];
    panic!(
        "{what}: block {blk} (chunk {chunk}, now {state:?}, job {:?}) differs from the \
         consistency point; it {} the source's current content{}",
        job.state(),
        if from_source_now { "equals" } else { "is not" },
        if from_source_now && state == ChunkState::Pending {
            ": a later write reached a chunk the job never captured \
             (interception bypass; the backup has it too)"
        } else {
            ""
        }
    );
}

/// Random reads of the view, `qd` at a time, each checked against `image`.
fn random_reads(
    ch: &mut BdevChannel,
    src: &mut BdevChannel,
    job: &JobShared,
    image: &[u8],
    rng: &mut u64,
    count: usize,
    qd: usize,
) {
    let mut inflight: Vec<(u64, u64, u64)> = Vec::new();
    let (mut issued, mut done, mut token) = (0, 0, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < count {
        while issued < count && inflight.len() < qd {
            let n = match xorshift(rng) % 4 {
                0 => 1 + xorshift(rng) % 8,
                1 => 1 + xorshift(rng) % 300,
                2 => 1 + xorshift(rng) % 1024,
                _ => 1 + xorshift(rng) % 4096,
            };
            let b = xorshift(rng) % (BLOCKS - n + 1);
            token += 1;
            let buf = DmaBuf::alloc((n * BS) as usize).unwrap();
            ch.submit(BdevIo::read(b, n, buf, token));
            inflight.push((token, b, n));
            issued += 1;
        }
        let mut finished = Vec::new();
        ch.poll(&mut |io| finished.push(io));
        for mut io in finished {
            let i = inflight
                .iter()
                .position(|&(t, _, _)| t == io.token)
                .expect("a read we submitted");
            let (_, b, n) = inflight.swap_remove(i);
            assert_eq!(io.status, IoStatus::Success, "view read {b}+{n}");
            let len = (n * BS) as usize;
            let got = io.take_buf().unwrap();
            check_view_read(
                &got[..len],
                image,
                b,
                src,
                job,
                &format!("random view read {b}+{n}"),
            );
            done += 1;
        }
        assert!(Instant::now() < deadline, "view reads stalled");
    }
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    chunk_kib: u64,
    slots: u32,
    /// At most 64 KiB, so that a write touches at most two granules.
    max_write_blocks: u64,
    writer_qd: usize,
    reader_qd: usize,
    target_latency_us: u64,
}

fn run_random_case(case: &Case) {
    let rt = runtime();
    let rig = Rig::new(
        case.chunk_kib * KIB,
        case.slots,
        None,
        case.target_latency_us,
    );
    let desc = rig.reg.open("vol", true).unwrap();
    let writers = Writers::start(
        &rt,
        &desc,
        WriterSpec {
            rng_seeds: (0..2)
                .map(|core| case.seed ^ (core as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect(),
            qd: case.writer_qd,
            max_blocks: case.max_write_blocks,
            skip: |start, n| untouched(start) || untouched(start + n - 1),
        },
    );
    std::thread::sleep(Duration::from_millis(20));
    // The copy stream copies its first run, then waits for the test.
    let job = rig.start(&rt, slow_tuning(PAUSED));
    let view = create_view(&rig.reg, "view", &job).unwrap();

    // The consistency point: each writer's first `k` logged writes.
    let t0 = job.shared().t0_writes.lock().unwrap().clone();
    let mut image = rig.image.clone();
    for (core, log) in writers.logs().iter().enumerate() {
        let k = t0_count(&t0, "vol", core) as usize;
        assert!(k <= log.len(), "{case:?}");
        apply_writes(&mut image, &log[..k], BS);
    }
    let image = Arc::new(image);

    // Read the view over and over while the job runs.
    let (vdesc, sdesc, img, shared, c) = (
        rig.reg.open("view", false).unwrap(),
        rig.reg.open("src", false).unwrap(),
        image.clone(),
        job.shared().clone(),
        case.clone(),
    );
    let (passes, reads) = on_reactor(move |_| {
        let mut ch = vdesc.channel().unwrap();
        let mut src = sdesc.channel().unwrap();
        let mut rng = c.seed | 1;
        let (mut passes, mut reads) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while passes < 3 && shared.state() == JobState::Running && Instant::now() < deadline {
            random_reads(&mut ch, &mut src, &shared, &img, &mut rng, 12, c.reader_qd);
            reads += 12;
            let whole = read_range(&mut ch, 0, BLOCKS);
            let what = format!("whole view, pass {passes}, {c:?}");
            check_view_read(&whole, &img, 0, &mut src, &shared, &what);
            if shared.state() == JobState::Running {
                passes += 1;
            }
        }
        (passes, reads)
    });
    let during = view_stats(&view);
    job.set_rate_limit(0);
    rig.tctl.set_latency_us(0);
    assert_eq!(
        job.wait(Duration::from_secs(60)),
        JobState::Complete,
        "{case:?}"
    );
    assert!(
        passes == 3,
        "{passes} whole passes ({reads} random reads) ran during the job: {case:?}"
    );
    assert!(
        during.from_source > 0 && during.from_target > 0,
        "{during:?}"
    );
    assert_eq!(during.aborted + during.failed, 0, "{during:?}");

    // After the job: still the consistency point, now all from the target.
    let (vdesc, sdesc, img, shared, c) = (
        rig.reg.open("view", false).unwrap(),
        rig.reg.open("src", false).unwrap(),
        image.clone(),
        job.shared().clone(),
        case.clone(),
    );
    on_reactor(move |_| {
        let mut ch = vdesc.channel().unwrap();
        let mut src = sdesc.channel().unwrap();
        let mut rng = c.seed.wrapping_mul(3) | 1;
        random_reads(&mut ch, &mut src, &shared, &img, &mut rng, 32, c.reader_qd);
        assert_same(&read_range(&mut ch, 0, BLOCKS), &img, "view after the job");
    });

    // Stop the writers; none failed, and the source moved on past T0 (so
    // the reads above did test something).
    let mut later_writes = 0;
    for (core, o) in writers.stop().iter().enumerate() {
        assert_eq!(o.errors, 0, "writer {core}: {case:?}");
        later_writes += o.log.len() as u64 - t0_count(&t0, "vol", core);
    }
    assert!(
        later_writes > 100,
        "{later_writes} writes after T0: {case:?}"
    );
    eprintln!(
        "{case:?}: {passes} passes, {reads} random reads, {later_writes} writes after T0; {:?}",
        view_stats(&view)
    );
}

#[test]
fn randomized_reads_of_the_view_under_concurrent_writers_match_the_consistency_point() {
    let cases = [
        Case {
            seed: 0x5EED_0001,
            chunk_kib: 64,
            slots: 4,
            max_write_blocks: 16,
            writer_qd: 4,
            reader_qd: 4,
            // Drain at most 2 chunks per 50 ms: >= 1.6 s for 64 chunks.
            target_latency_us: 50_000,
        },
        Case {
            seed: 0x5EED_0002,
            chunk_kib: 4,
            slots: 2,
            max_write_blocks: 64,
            writer_qd: 8,
            reader_qd: 8,
            // 1024 chunks, 2 per ms at best.
            target_latency_us: 1_000,
        },
        Case {
            seed: 0x5EED_0003,
            chunk_kib: 16,
            slots: 3,
            max_write_blocks: 40,
            writer_qd: 2,
            reader_qd: 2,
            // 256 chunks, 2 per 10 ms at best.
            target_latency_us: 10_000,
        },
    ];
    for case in &cases {
        run_random_case(case);
    }
}
