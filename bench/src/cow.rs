//! `hotcopy bench cow`: what an online backup costs foreground writes.
//!
//! The scenario builds a source, a backup target and an intermediate
//! container. It fills the source, so the backup has real data to copy, and
//! stacks a cow bdev on it. It then runs a random-write load three times:
//! with no job, while a full backup runs (from job start to job end), and
//! with no job again. The baseline is the two runs without a job taken
//! together, so that it brackets the backup: a shared disk whose speed drifts
//! over tens of seconds biases a ratio against a baseline taken only before.
//! It prints the baseline (and each half), the run during the backup, and
//! their ratios.
//!
//! **Verify.** Each writer owns the I/O units congruent to its index and never
//! has two writes in flight to one unit. Every write carries a pattern made
//! from its unit and a per-writer sequence number, and the writer logs the
//! unit (4 bytes a write). The job records how many writes each channel had
//! forwarded at the consistency point. So after the job, the image at that
//! instant can be rebuilt, and the target is compared with it unit by unit.
//! The log grows with the run; `--no-verify` drops it.
//!
//! **Fairness.** A second writer on its own channel writes only into a range
//! excluded from the backup. Its IOPS during the job over its IOPS without a
//! job is the fairness ratio: the backup should not slow writers that never
//! touch pending chunks.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hotcopy_bdev::{BdevChannel, BdevDesc, BdevIo, BdevRegistry, IoStatus};
use hotcopy_cow::{
    BackupConfig, BackupJob, ContainerConfig, JobState, JobStatus, JobTuning, RawImageTarget, Scope,
};
use hotcopy_runtime::{clock, BufferPool, DmaBuf, HugepageMode, PollStatus, Poller, Runtime};
use serde::Serialize;

use crate::Latency;

/// Width of one timeline bucket.
pub const TIMELINE_BUCKET: Duration = Duration::from_millis(100);

/// Latency buckets per timeline slot: 4 per octave over 2^0..2^48 ticks.
const LAT_BUCKETS: usize = 4 * 48;

fn lat_bucket(t: u64) -> usize {
    let t = t.max(1);
    let lz = 63 - t.leading_zeros() as usize;
    let sub = if lz >= 2 {
        ((t >> (lz - 2)) & 3) as usize
    } else {
        0
    };
    (lz * 4 + sub).min(LAT_BUCKETS - 1)
}

fn bucket_value(b: usize) -> u64 {
    let (oct, sub) = (b / 4, b % 4);
    if oct < 2 {
        1 << oct
    } else {
        (1u64 << oct) + ((sub as u64) << (oct - 2))
    }
}

/// Per-100 ms latency counts of one writer.
#[derive(Clone)]
pub struct Timeline {
    pub start_tick: u64,
    pub slots: Vec<[u32; LAT_BUCKETS]>,
}

impl Timeline {
    fn new(start_tick: u64, max: Duration) -> Timeline {
        let n = (max.as_millis() / TIMELINE_BUCKET.as_millis()) as usize + 2;
        Timeline {
            start_tick,
            slots: vec![[0u32; LAT_BUCKETS]; n],
        }
    }

    #[inline]
    fn record(&mut self, now: u64, lat: u64, bucket_ticks: u64) {
        let i = ((now - self.start_tick) / bucket_ticks) as usize;
        if let Some(s) = self.slots.get_mut(i) {
            s[lat_bucket(lat)] += 1;
        }
    }

    /// (seconds, p50 µs, p99 µs, IOPS) per slot with data.
    pub fn points(&self, offset_s: f64) -> Vec<(f64, f64, f64, f64)> {
        let tpu = clock::ticks_per_us();
        let secs = TIMELINE_BUCKET.as_secs_f64();
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let n: u64 = s.iter().map(|c| *c as u64).sum();
                if n == 0 {
                    return None;
                }
                let q = |f: f64| {
                    let want = (n as f64 * f).ceil() as u64;
                    let mut acc = 0;
                    for (b, c) in s.iter().enumerate() {
                        acc += *c as u64;
                        if acc >= want {
                            return bucket_value(b) as f64 / tpu;
                        }
                    }
                    0.0
                };
                Some((
                    offset_s + (i as f64 + 0.5) * secs,
                    q(0.5),
                    q(0.99),
                    n as f64 / secs,
                ))
            })
            .collect()
    }
}

/// The content of unit `unit` after the write with sequence `seq` (0: the fill).
pub fn unit_pattern(buf: &mut [u8], unit: u64, seq: u64) {
    for (w, word) in buf.chunks_exact_mut(8).enumerate() {
        let mut z = unit.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.rotate_left(29) ^ w as u64;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

struct Writer {
    ch: BdevChannel,
    /// Units this writer may touch: `first + k * stride` for k < count.
    first: u64,
    stride: u64,
    count: u64,
    /// Skew: this share (per cent) of writes goes to the last `hot_units` of
    /// the writer's units (0: uniform).
    hot_pct: u64,
    hot_units: u64,
    unit_blocks: u64,
    unit_bytes: usize,
    qd: usize,
    bufs: Vec<Option<DmaBuf>>,
    slot_unit: Vec<u64>,
    start: Vec<u64>,
    rng: u64,
    seq: u64,
    /// Sequence number base: writer index << 40.
    seq_base: u64,
    log: Option<Vec<u32>>,
    hist: Histogram<u64>,
    timeline: Timeline,
    bucket_ticks: u64,
    ios: u64,
    errors: u64,
    started: u64,
    stop: Arc<AtomicBool>,
    stopping: bool,
    end_tick: u64,
    inflight: usize,
    /// Completions of one pass (kept to reuse its allocation).
    fin: Vec<(usize, bool, Option<DmaBuf>)>,
    /// Rate cap: ticks between issues (0: none, a slot is refilled as soon as
    /// it completes), the tick the next write is due, and the slots waiting
    /// for their turn.
    interval: u64,
    next_due: u64,
    idle: Vec<usize>,
}

impl Writer {
    fn rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn issue(&mut self, slot: usize, now: u64) {
        let unit = loop {
            let r = self.rand();
            let k = if self.hot_pct == 0 || self.hot_units == 0 || self.hot_units >= self.count {
                ((r as u128 * self.count as u128) >> 64) as u64
            } else if r % 100 < self.hot_pct {
                let h = self.rand();
                self.count - self.hot_units + ((h as u128 * self.hot_units as u128) >> 64) as u64
            } else {
                let c = self.rand();
                ((c as u128 * (self.count - self.hot_units) as u128) >> 64) as u64
            };
            let u = self.first + k * self.stride;
            if !self
                .slot_unit
                .iter()
                .enumerate()
                .any(|(i, &v)| i != slot && v == u)
            {
                break u;
            }
        };
        self.seq += 1;
        let mut buf = self.bufs[slot].take().expect("idle slot has its buffer");
        unit_pattern(&mut buf, unit, self.seq_base | self.seq);
        if let Some(log) = self.log.as_mut() {
            log.push(unit as u32);
        }
        self.slot_unit[slot] = unit;
        self.start[slot] = now;
        self.inflight += 1;
        self.ch.submit(BdevIo::write(
            unit * self.unit_blocks,
            self.unit_blocks,
            buf,
            slot as u64,
        ));
    }

    fn poll(&mut self) -> usize {
        let now = clock::ticks();
        if !self.stopping && (self.stop.load(Ordering::Relaxed) || now >= self.end_tick) {
            self.stopping = true;
        }
        let mut fin = std::mem::take(&mut self.fin);
        let n = self.ch.poll(&mut |mut io| {
            fin.push((
                io.token as usize,
                io.status == IoStatus::Success,
                io.take_buf(),
            ))
        });
        for (slot, ok, buf) in fin.drain(..) {
            let lat = now.saturating_sub(self.start[slot]).max(1);
            self.hist.saturating_record(lat);
            self.timeline.record(now, lat, self.bucket_ticks);
            self.ios += 1;
            self.inflight -= 1;
            if !ok {
                self.errors += 1;
            }
            self.bufs[slot] = buf;
            self.slot_unit[slot] = u64::MAX;
            if !self.stopping {
                if self.interval == 0 {
                    self.issue(slot, now);
                } else {
                    self.idle.push(slot);
                }
            }
        }
        self.fin = fin;
        n + self.issue_due(now)
    }

    /// Under a rate cap, issues the writes that are due on idle slots. The
    /// schedule is fixed in time, so a writer held back by the backup catches
    /// up when it is let go, but by at most a queue's worth: it does not bank
    /// an unbounded debt of writes while every slot is busy. Latency is timed
    /// from the issue, as fio times it: the wait of a due write for a free
    /// slot is not counted.
    fn issue_due(&mut self, now: u64) -> usize {
        if self.interval == 0 || self.stopping {
            return 0;
        }
        let floor = now.saturating_sub(self.interval.saturating_mul(self.qd as u64));
        if self.next_due < floor {
            self.next_due = floor;
        }
        let mut issued = 0;
        while self.next_due <= now {
            let Some(slot) = self.idle.pop() else { break };
            self.issue(slot, now);
            self.next_due = self.next_due.saturating_add(self.interval);
            issued += 1;
        }
        issued
    }
}

thread_local! {
    static WRITERS: RefCell<Vec<(Rc<RefCell<Writer>>, Poller)>> = const { RefCell::new(Vec::new()) };
}

/// What one writer did.
#[derive(Clone)]
pub struct WriterResult {
    pub name: String,
    pub ios: u64,
    pub errors: u64,
    pub secs: f64,
    pub hist: Histogram<u64>,
    pub timeline: Timeline,
    pub log: Option<Vec<u32>>,
    pub seq_base: u64,
    pub first: u64,
    pub stride: u64,
}

impl WriterResult {
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.secs.max(1e-9)
    }
}

/// A writer to start on a reactor.
#[derive(Clone)]
pub struct WriterSpec {
    pub reactor: usize,
    pub first_unit: u64,
    pub stride: u64,
    pub count: u64,
    /// Per cent of writes to the hot set, and the hot set's size in units (the
    /// writer's last units: the end of the volume, which the copy stream
    /// reaches last). 0: uniform.
    pub hot_pct: u64,
    pub hot_units: u64,
    pub qd: usize,
    pub log: bool,
    pub seq_base: u64,
    pub seed: u64,
    /// Most writes per second this writer issues (0: as many as its queue
    /// depth lets it, the default: a writer that saturates the device).
    pub rate_iops: f64,
}

/// Starts writers on `desc` (one channel each), runs them until `stop` is set
/// or `max` passes, and returns their results.
pub fn run_writers(
    rt: &Runtime,
    desc: &BdevDesc,
    unit_bytes: usize,
    specs: &[WriterSpec],
    stop: Arc<AtomicBool>,
    max: Duration,
    during: impl FnOnce(),
) -> Result<Vec<WriterResult>, String> {
    let bs = desc.bdev().block_size() as usize;
    let pool = BufferPool::new(
        unit_bytes.div_ceil(4096) * 4096,
        specs.iter().map(|s| s.qd).sum(),
        HugepageMode::Auto,
    )
    .map_err(|e| e.to_string())?;
    let tpu = clock::ticks_per_us();
    for s in specs {
        let (desc, s, pool, stop) = (desc.clone(), s.clone(), pool.clone(), stop.clone());
        rt.exec(s.reactor, move || -> Result<(), String> {
            let now = clock::ticks();
            let bucket_ticks = (TIMELINE_BUCKET.as_secs_f64() * 1e6 * tpu) as u64;
            let mut w = Writer {
                ch: desc.channel().map_err(|e| e.to_string())?,
                first: s.first_unit,
                stride: s.stride,
                count: s.count,
                hot_pct: s.hot_pct,
                hot_units: s.hot_units,
                unit_blocks: (unit_bytes / bs) as u64,
                unit_bytes,
                qd: s.qd,
                bufs: (0..s.qd).map(|_| pool.get(unit_bytes)).collect(),
                slot_unit: vec![u64::MAX; s.qd],
                start: vec![0; s.qd],
                rng: s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                seq: 0,
                seq_base: s.seq_base,
                log: s.log.then(|| Vec::with_capacity(1 << 20)),
                hist: Histogram::new_with_bounds(1, (60e6 * tpu) as u64, 3)
                    .map_err(|e| e.to_string())?,
                timeline: Timeline::new(now, max),
                bucket_ticks,
                ios: 0,
                errors: 0,
                started: now,
                stop,
                stopping: false,
                end_tick: now + (max.as_secs_f64() * 1e6 * tpu) as u64,
                inflight: 0,
                fin: Vec::with_capacity(s.qd),
                interval: if s.rate_iops > 0.0 {
                    ((1e6 * tpu / s.rate_iops) as u64).max(1)
                } else {
                    0
                },
                next_due: now,
                idle: Vec::with_capacity(s.qd),
            };
            let _ = w.unit_bytes;
            if w.interval == 0 {
                for slot in 0..w.qd {
                    w.issue(slot, now);
                }
            } else {
                w.idle.extend((0..w.qd).rev());
                w.issue_due(now);
            }
            let w = Rc::new(RefCell::new(w));
            let p = Poller::builder().name("cow_writer").register({
                let w = w.clone();
                move || PollStatus::from_count(w.borrow_mut().poll())
            });
            WRITERS.with(|ws| ws.borrow_mut().push((w, p)));
            Ok(())
        })
        .map_err(|e| e.to_string())??;
    }
    during();
    stop.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    for r in 0..rt.num_reactors() {
        loop {
            let idle = rt
                .exec(r, || {
                    WRITERS.with(|ws| ws.borrow().iter().all(|(w, _)| w.borrow().inflight == 0))
                })
                .map_err(|e| e.to_string())?;
            if idle {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let results = rt
            .exec(r, move || {
                let ws = WRITERS.with(|ws| std::mem::take(&mut *ws.borrow_mut()));
                let tpu = clock::ticks_per_us();
                ws.into_iter()
                    .enumerate()
                    .map(|(i, (w, p))| {
                        drop(p);
                        let mut w = w.borrow_mut();
                        let end = clock::ticks();
                        WriterResult {
                            name: format!("core{r}/w{i}"),
                            ios: w.ios,
                            errors: w.errors,
                            secs: (end - w.started) as f64 / tpu / 1e6,
                            hist: w.hist.clone(),
                            timeline: w.timeline.clone(),
                            log: w.log.take(),
                            seq_base: w.seq_base,
                            first: w.first,
                            stride: w.stride,
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())?;
        out.extend(results);
    }
    out.sort_by_key(|w| w.seq_base);
    Ok(out)
}

/// Figures of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub iops: f64,
    pub lat_us: Latency,
    pub ios: u64,
    pub errors: u64,
    pub secs: f64,
}

impl PhaseReport {
    pub fn from_writers(ws: &[&WriterResult]) -> PhaseReport {
        let mut h: Option<Histogram<u64>> = None;
        for w in ws {
            match h.as_mut() {
                None => h = Some(w.hist.clone()),
                Some(h) => {
                    let _ = h.add(&w.hist);
                }
            }
        }
        let h = h.unwrap_or_else(|| Histogram::new(3).expect("valid precision"));
        PhaseReport {
            iops: ws.iter().map(|w| w.iops()).sum(),
            lat_us: Latency::from_ticks(&h),
            ios: ws.iter().map(|w| w.ios).sum(),
            errors: ws.iter().map(|w| w.errors).sum(),
            secs: ws.iter().map(|w| w.secs).fold(0.0, f64::max),
        }
    }
}

/// Shared with the plot and the demo.
pub struct Shared {
    pub status: Mutex<Option<JobStatus>>,
}

/// Options of the scenario.
#[derive(Debug, Clone)]
pub struct CowBenchParams {
    pub size: u64,
    pub queue_depth: usize,
    pub io_size: usize,
    pub baseline: Duration,
    pub max_backup: Duration,
    pub chunk_size: u64,
    pub container_slots: u32,
    pub rate_limit: u64,
    pub stream_qd: u32,
    pub pressed_drain_depth: u32,
    pub adaptive: bool,
    pub min_share: f64,
    pub tolerance: f64,
    pub soft_watermark: f64,
    pub copy_per_capture: f64,
    pub copy_near_writers: bool,
    pub fairness: bool,
    pub verify: bool,
    pub writers: usize,
    pub seed: u64,
    /// Skewed writes: (per cent of writes, per cent of the volume) — e.g.
    /// (90, 10) like fio's `random_distribution=zoned:90/10`, with the hot
    /// zone at the end of the volume. None: uniform over the volume.
    pub hot: Option<(u32, u32)>,
    /// A cap on the main writers' IOPS (all of them together), the same in
    /// every phase. None: they write as fast as their queue depth lets them.
    pub write_rate: Option<WriteRate>,
}

/// How fast the main writers may write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WriteRate {
    /// This many writes per second.
    Iops(f64),
    /// This share (0..1] of what they reach uncapped, measured first in a
    /// calibration run on the cow bdev without a job: a load that leaves the
    /// device headroom, like a guest behind NBD or NVMe/TCP.
    Share(f64),
}

/// A baseline spread (see [`CowBenchReport::baseline_spread`]) past which
/// the text report warns that the device's speed moved during the run.
pub const BASELINE_SPREAD_WARN: f64 = 1.5;

/// The larger of `a` and `b` over the smaller (1 when either is zero).
fn spread(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo > 0.0 {
        hi / lo
    } else {
        1.0
    }
}

/// Everything `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CowBenchReport {
    pub source: String,
    pub target: String,
    pub container: String,
    pub size_bytes: u64,
    pub chunk_size: u64,
    pub queue_depth: usize,
    pub io_size: usize,
    /// The main writers' IOPS cap (None: uncapped, saturating the device).
    pub write_iops_cap: Option<f64>,
    /// Under `WriteRate::Share`, the uncapped IOPS the cap was taken from.
    pub saturated_iops: Option<f64>,
    /// The runs before and after the job taken together.
    pub baseline: PhaseReport,
    /// The main writers' IOPS in the run before the job and in the run after.
    pub baseline_before_iops: f64,
    pub baseline_after_iops: f64,
    /// The larger of the two baselines over the smaller: how far the
    /// device's own speed moved across the run. Past
    /// [`BASELINE_SPREAD_WARN`] the ratios say as much about the device as
    /// about the backup.
    pub baseline_spread: f64,
    pub during: PhaseReport,
    pub iops_ratio: f64,
    pub p99_ratio: f64,
    /// Seconds of the main writers' baseline work the backup cost them:
    /// (baseline IOPS − during IOPS) × the job's window (`during.secs`) /
    /// baseline IOPS. Unlike `iops_ratio` it hardly depends on how long the
    /// job's tail lasts, when the writers are back at their baseline rate:
    /// a backup that dragged its tail out would raise the ratio at no gain
    /// to anyone. Noise can make it slightly negative.
    pub foreground_lost_s: f64,
    pub backup_mibps: f64,
    pub backup_s: f64,
    pub freeze_us: f64,
    pub container_slots: u32,
    pub container_peak: u64,
    pub paced_writes: u64,
    pub held_writes: u64,
    pub verified: Option<bool>,
    pub verify_detail: Option<String>,
    pub job: JobStatus,
    pub fairness: Option<FairnessReport>,
    pub idle_backup: Option<IdleBackupReport>,
    pub freeze_samples: Option<FreezeReport>,
    pub peak_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FairnessReport {
    pub baseline_iops: f64,
    pub during_iops: f64,
    pub ratio: f64,
    pub during_p99_us: f64,
}

/// The bdevs the scenario uses, already registered in `reg`.
pub struct CowBenchBdevs {
    /// The cow bdev over the source.
    pub cow: String,
    /// The source under it.
    pub source: String,
    /// The target bdev (written raw).
    pub target: String,
    /// The container bdev (its first `slots` chunks are used).
    pub container: String,
}

/// Timelines for plotting, with the job's start and end (seconds).
pub struct CowRunTrace {
    pub baseline: Vec<WriterResult>,
    pub during: Vec<WriterResult>,
    pub during_offset_s: f64,
    pub job_start_s: f64,
    pub job_end_s: f64,
    pub samples: Vec<(f64, JobStatus)>,
}

/// Runs the scenario. `progress` is called about every 100 ms during the job.
pub fn run_cow(
    rt: &Runtime,
    reg: &BdevRegistry,
    b: &CowBenchBdevs,
    p: &CowBenchParams,
    mut progress: impl FnMut(&JobStatus),
) -> Result<(CowBenchReport, CowRunTrace), String> {
    let cow = reg.lookup(&b.cow).map_err(|e| e.to_string())?;
    let bs = cow.block_size() as u64;
    let unit = p.io_size as u64;
    if !unit.is_multiple_of(bs) || !p.chunk_size.is_multiple_of(unit) {
        return Err(format!("I/O size {unit} must be a multiple of the block size {bs} and divide the chunk size {}", p.chunk_size));
    }
    let units = cow.size_bytes() / unit;
    // Fairness: the last 1/8 of the device is excluded from the backup and
    // belongs to the fairness writer; the main writers share the rest.
    let fair_units = if p.fairness { units / 8 } else { 0 };
    let fair_units = fair_units / (p.chunk_size / unit) * (p.chunk_size / unit);
    let main_units = units - fair_units;
    let desc = cow.open(true).map_err(|e| e.to_string())?;
    let writers = p.writers.max(1);
    let is_main = |w: &&WriterResult| w.seq_base & (0xFF << 40) != 0xFF << 40;
    // The writers of one phase: `rate_iops` caps each main writer (0: none);
    // the fairness writer is never capped.
    let specs = |seq_tag: u64, log: bool, rate_iops: f64| -> Vec<WriterSpec> {
        let mut v: Vec<WriterSpec> = (0..writers)
            .map(|i| WriterSpec {
                reactor: i % rt.num_reactors(),
                first_unit: i as u64,
                stride: writers as u64,
                count: main_units / writers as u64,
                hot_pct: p.hot.map_or(0, |h| h.0 as u64),
                hot_units: p
                    .hot
                    .map_or(0, |h| main_units / writers as u64 * h.1 as u64 / 100),
                qd: p.queue_depth,
                log,
                seq_base: (seq_tag << 44) | ((i as u64 + 1) << 40),
                seed: p.seed + i as u64 * 7 + seq_tag,
                rate_iops,
            })
            .collect();
        if p.fairness {
            v.push(WriterSpec {
                reactor: rt.num_reactors() - 1,
                first_unit: main_units,
                stride: 1,
                count: fair_units,
                hot_pct: 0,
                hot_units: 0,
                qd: p.queue_depth,
                log: false,
                seq_base: (seq_tag << 44) | (0xFF << 40),
                seed: p.seed + 999,
                rate_iops: 0.0,
            });
        }
        v
    };
    let mut saturated_iops = None;
    let mut calibration = Vec::new();
    let cap = match p.write_rate {
        None => None,
        Some(WriteRate::Iops(n)) => Some(n),
        Some(WriteRate::Share(f)) => {
            // Calibration: the same writers (and the same fairness writer)
            // uncapped, on the cow bdev without a job; the cap is a share of
            // what the main writers reached.
            let calib = p.baseline.min(Duration::from_secs(3));
            let ws = run_writers(
                rt,
                &desc,
                p.io_size,
                &specs(4, p.verify, 0.0),
                Arc::new(AtomicBool::new(false)),
                calib,
                || std::thread::sleep(calib),
            )?;
            let iops: f64 = ws.iter().filter(is_main).map(|w| w.iops()).sum();
            saturated_iops = Some(iops);
            calibration = ws;
            Some(iops * f)
        }
    };
    if let Some(c) = cap {
        if c < 1.0 {
            return Err(format!(
                "the writers' cap came to {c:.2} IOPS (uncapped they reached {:.0}): too low to run",
                saturated_iops.unwrap_or(0.0)
            ));
        }
    }
    let rate_iops = cap.map_or(0.0, |c| c / writers as f64);
    let t0 = Instant::now();
    // Phase 1: no job.
    let stop = Arc::new(AtomicBool::new(false));
    let baseline = run_writers(
        rt,
        &desc,
        p.io_size,
        &specs(1, p.verify, rate_iops),
        stop,
        p.baseline,
        || std::thread::sleep(p.baseline),
    )?;
    // Phase 2: the same load while a full backup runs.
    let scope = Scope {
        include: vec![],
        exclude: if fair_units > 0 {
            vec![hotcopy_cow::BlockRange::new(
                main_units * unit / bs,
                fair_units * unit / bs,
            )]
        } else {
            vec![]
        },
        skip_unallocated: true,
    };
    let cfg = backup_config(reg, b, p, scope.clone())?;
    let during_offset = t0.elapsed().as_secs_f64();
    let stop = Arc::new(AtomicBool::new(false));
    let job_slot: Mutex<Option<BackupJob>> = Mutex::new(None);
    let mut samples = Vec::new();
    let mut job_err = None;
    let mut job_times = (0.0, 0.0);
    let during = run_writers(
        rt,
        &desc,
        p.io_size,
        &specs(2, p.verify, rate_iops),
        stop,
        p.max_backup + Duration::from_secs(5),
        || {
            // Let the writers settle for a moment, then start the backup.
            std::thread::sleep(Duration::from_millis(200));
            job_times.0 = t0.elapsed().as_secs_f64();
            let home = rt.reactor(rt.num_reactors() - 1);
            match hotcopy_cow::start_backup(&cow, home, cfg) {
                Ok(job) => {
                    let deadline = Instant::now() + p.max_backup;
                    while !job.state().is_finished() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                        let s = job.status();
                        progress(&s);
                        samples.push((t0.elapsed().as_secs_f64(), s));
                    }
                    if !job.state().is_finished() {
                        job.cancel();
                    }
                    job.wait(Duration::from_secs(30));
                    job_times.1 = t0.elapsed().as_secs_f64();
                    let s = job.status();
                    progress(&s);
                    samples.push((t0.elapsed().as_secs_f64(), s));
                    *job_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
                }
                Err(e) => job_err = Some(e.to_string()),
            }
        },
    )?;
    if let Some(e) = job_err {
        return Err(format!("starting the backup: {e}"));
    }
    // Phase 3: no job again, so the baseline brackets the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let after = run_writers(
        rt,
        &desc,
        p.io_size,
        &specs(3, false, rate_iops),
        stop,
        p.baseline,
        || std::thread::sleep(p.baseline),
    )?;
    let base_all = merge_phases(&baseline, &after);
    let job = job_slot
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .ok_or("no job")?;
    let status = job.status();
    if status.state != JobState::Complete {
        return Err(format!(
            "the backup did not complete: {:?} {}",
            status.state,
            status.error.clone().unwrap_or_default()
        ));
    }
    // The "during" phase is the job's lifetime: scale each writer's I/O count
    // by the share of its run the job covered, using the timeline.
    let during_main = restrict(&during, during_offset, job_times.0, job_times.1);
    let main_iops = |ws: &[WriterResult]| ws.iter().filter(is_main).map(|w| w.iops()).sum::<f64>();
    let base_main: Vec<&WriterResult> = base_all.iter().filter(is_main).collect();
    let dm: Vec<&WriterResult> = during_main.iter().filter(is_main).collect();
    let base_r = PhaseReport::from_writers(&base_main);
    let dur_r = PhaseReport::from_writers(&dm);
    let fairness = p.fairness.then(|| {
        let bf = base_all
            .iter()
            .find(|w| w.seq_base & (0xFF << 40) == 0xFF << 40);
        let df = during_main
            .iter()
            .find(|w| w.seq_base & (0xFF << 40) == 0xFF << 40);
        let (bi, di) = (
            bf.map(|w| w.iops()).unwrap_or(0.0),
            df.map(|w| w.iops()).unwrap_or(0.0),
        );
        FairnessReport {
            baseline_iops: bi,
            during_iops: di,
            ratio: di / bi.max(1e-9),
            during_p99_us: df.map(|w| Latency::from_ticks(&w.hist).p99).unwrap_or(0.0),
        }
    });
    let (verified, verify_detail) = if p.verify {
        // The calibration run's writes came first, then phase 1's.
        let before: Vec<WriterResult> = calibration
            .into_iter()
            .chain(baseline.iter().cloned())
            .collect();
        match verify_backup(rt, reg, b, p, &job, &before, &during, main_units) {
            Ok(()) => (Some(true), None),
            Err(e) => (Some(false), Some(e)),
        }
    } else {
        (None, None)
    };
    let (before_iops, after_iops) = (main_iops(&baseline), main_iops(&after));
    let report = CowBenchReport {
        source: cow.name().to_string(),
        target: b.target.clone(),
        container: b.container.clone(),
        size_bytes: cow.size_bytes(),
        chunk_size: p.chunk_size,
        queue_depth: p.queue_depth,
        io_size: p.io_size,
        write_iops_cap: cap,
        saturated_iops,
        iops_ratio: dur_r.iops / base_r.iops.max(1e-9),
        p99_ratio: dur_r.lat_us.p99 / base_r.lat_us.p99.max(1e-9),
        foreground_lost_s: (base_r.iops - dur_r.iops) * dur_r.secs / base_r.iops.max(1e-9),
        baseline: base_r,
        baseline_before_iops: before_iops,
        baseline_after_iops: after_iops,
        baseline_spread: spread(before_iops, after_iops),
        during: dur_r,
        backup_mibps: status.backup_mibps,
        backup_s: status.elapsed_s,
        freeze_us: status.freeze_us,
        container_slots: status.container_slots,
        container_peak: status.container_peak,
        paced_writes: status.paced_writes,
        held_writes: status.held_writes,
        verified,
        verify_detail,
        job: status,
        fairness,
        idle_backup: None,
        freeze_samples: None,
        peak_rss_mib: hotcopy_runtime::sys::peak_rss_bytes() as f64 / (1024.0 * 1024.0),
    };
    let trace = CowRunTrace {
        baseline,
        during,
        during_offset_s: during_offset,
        job_start_s: job_times.0,
        job_end_s: job_times.1,
        samples,
    };
    Ok((report, trace))
}

fn backup_config(
    reg: &BdevRegistry,
    b: &CowBenchBdevs,
    p: &CowBenchParams,
    scope: Scope,
) -> Result<BackupConfig, String> {
    Ok(BackupConfig {
        target: Arc::new(RawImageTarget::new(
            reg.open(&b.target, true).map_err(|e| e.to_string())?,
        )),
        container: ContainerConfig {
            desc: reg.open(&b.container, true).map_err(|e| e.to_string())?,
            offset_blocks: 0,
            slots: p.container_slots,
        },
        chunk_size: p.chunk_size,
        scope,
        tuning: JobTuning {
            max_queue_depth: p.stream_qd,
            rate_limit: p.rate_limit,
            adaptive: p.adaptive,
            min_share: p.min_share,
            fg_tolerance: p.tolerance,
            soft_watermark: p.soft_watermark,
            pressed_drain_depth: p.pressed_drain_depth,
            copy_per_capture: p.copy_per_capture,
            copy_near_writers: p.copy_near_writers,
        },
        changed_since: None,
    })
}

/// Full backups with no foreground load, next to the devices' sequential
/// ceilings measured in the same run: the target's write ceiling before
/// each backup and after the last, so that each backup has one on either
/// side (a 2 GiB backup from RAM lasts half a second on a fast disk, and
/// the disk's speed moves by tens of per cent within a minute).
#[derive(Debug, Clone, Serialize)]
pub struct IdleBackupReport {
    /// The medians of the runs' figures, each taken on its own (the median
    /// MiB/s and the median ratio may come from different runs).
    pub backup_mibps: f64,
    pub backup_s: f64,
    /// 1 MiB sequential writes to the target at the streams' queue depth:
    /// the mean of `target_write_ceiling_runs_mibps`.
    pub target_write_ceiling_mibps: f64,
    /// That ceiling measured before each backup and after the last.
    pub target_write_ceiling_runs_mibps: Vec<f64>,
    /// 1 MiB sequential reads from the source at the streams' queue depth.
    pub source_read_ceiling_mibps: f64,
    /// The target's final flush, part of `backup_s` (ms).
    pub target_flush_ms: f64,
    /// Copy runs written to the target straight from the source's memory
    /// (a RAM source and a raw target), and runs read ahead of the
    /// target's writes (any other source), over all the backups: see
    /// `hotcopy_cow::job`.
    pub zero_copy_runs: u64,
    pub read_ahead_runs: u64,
    /// The median over the backups of each one's MiB/s over the mean of
    /// the target's write ceilings measured right before and right after
    /// it.
    pub ratio_to_target_ceiling: f64,
    /// Backup MiB/s (the median) over the lower of the target's mean
    /// write ceiling and the source's read ceiling (the backup reads the
    /// source and writes the target; on one disk they share it).
    pub ratio_to_ceiling: f64,
    /// Each backup: MiB/s, seconds, and its ratio to the ceilings around it.
    pub runs: Vec<IdleBackupRun>,
}

/// One backup with no foreground load.
#[derive(Debug, Clone, Serialize)]
pub struct IdleBackupRun {
    pub backup_mibps: f64,
    pub backup_s: f64,
    pub target_flush_ms: f64,
    pub ratio_to_target_ceiling: f64,
}

/// Freeze times over many small jobs started while the writers run.
#[derive(Debug, Clone, Serialize)]
pub struct FreezeReport {
    pub jobs: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// `bdev`'s sequential ceiling at the streams' queue depth, over 3 s.
fn ceiling(
    rt: &Runtime,
    reg: &BdevRegistry,
    bdev: &str,
    workload: crate::Workload,
    qd: u32,
) -> Result<f64, String> {
    crate::seq_ceiling(rt, reg, bdev, workload, qd as usize, Duration::from_secs(3))
}

/// Runs `runs` full backups (at least one) with no writers, with the
/// target's write ceiling measured before each and after the last, then
/// the source's read ceiling. It overwrites the target, so it runs after
/// the verify.
pub fn run_idle_backup(
    rt: &Runtime,
    reg: &BdevRegistry,
    b: &CowBenchBdevs,
    p: &CowBenchParams,
    runs: usize,
) -> Result<IdleBackupReport, String> {
    let cow = reg.lookup(&b.cow).map_err(|e| e.to_string())?;
    let home = rt.reactor(rt.num_reactors() - 1);
    let mut ceilings = vec![ceiling(
        rt,
        reg,
        &b.target,
        crate::Workload::Write,
        p.stream_qd,
    )?];
    let mut done = Vec::new();
    let (mut zero_copy_runs, mut read_ahead_runs) = (0, 0);
    for i in 0..runs.max(1) {
        let cfg = backup_config(reg, b, p, Scope::default())?;
        let job = hotcopy_cow::start_backup(&cow, home, cfg).map_err(|e| e.to_string())?;
        let state = job.wait(p.max_backup + Duration::from_secs(30));
        let st = job.status();
        if state != JobState::Complete {
            return Err(format!(
                "backup {} of {} with no foreground load did not complete: {state:?} {}",
                i + 1,
                runs.max(1),
                st.error.unwrap_or_default()
            ));
        }
        drop(job);
        let w = ceiling(rt, reg, &b.target, crate::Workload::Write, p.stream_qd)?;
        let around = (ceilings[i] + w) / 2.0;
        ceilings.push(w);
        zero_copy_runs += st.zero_copy_runs;
        read_ahead_runs += st.read_ahead_runs;
        done.push(IdleBackupRun {
            backup_mibps: st.backup_mibps,
            backup_s: st.elapsed_s,
            target_flush_ms: st.target_flush_ms,
            ratio_to_target_ceiling: st.backup_mibps / around.max(1e-9),
        });
    }
    let w = ceilings.iter().sum::<f64>() / ceilings.len() as f64;
    let r = ceiling(rt, reg, &b.source, crate::Workload::Read, p.stream_qd)?;
    let med = |f: fn(&IdleBackupRun) -> f64| crate::median(&done.iter().map(f).collect::<Vec<_>>());
    let backup_mibps = med(|d| d.backup_mibps);
    Ok(IdleBackupReport {
        backup_mibps,
        backup_s: med(|d| d.backup_s),
        target_flush_ms: med(|d| d.target_flush_ms),
        target_write_ceiling_mibps: w,
        target_write_ceiling_runs_mibps: ceilings,
        source_read_ceiling_mibps: r,
        zero_copy_runs,
        read_ahead_runs,
        ratio_to_target_ceiling: med(|d| d.ratio_to_target_ceiling),
        ratio_to_ceiling: backup_mibps / w.min(r).max(1e-9),
        runs: done,
    })
}

/// Starts `n` jobs of one chunk each, one after another, while the writers
/// of the scenario run, and reports the distribution of their freeze times.
pub fn run_freeze_samples(
    rt: &Runtime,
    reg: &BdevRegistry,
    b: &CowBenchBdevs,
    p: &CowBenchParams,
    n: usize,
) -> Result<FreezeReport, String> {
    let cow = reg.lookup(&b.cow).map_err(|e| e.to_string())?;
    let desc = cow.open(true).map_err(|e| e.to_string())?;
    let bs = cow.block_size() as u64;
    let units = cow.size_bytes() / p.io_size as u64;
    let spec = WriterSpec {
        reactor: 0,
        first_unit: 0,
        stride: 1,
        count: units,
        hot_pct: 0,
        hot_units: 0,
        qd: p.queue_depth,
        log: false,
        seq_base: 3 << 44,
        seed: p.seed + 3,
        rate_iops: 0.0,
    };
    let mut freezes = Vec::with_capacity(n);
    let mut err = None;
    let chunks = cow.size_bytes() / p.chunk_size;
    run_writers(
        rt,
        &desc,
        p.io_size,
        &[spec],
        Arc::new(AtomicBool::new(false)),
        Duration::from_secs(600),
        || {
            std::thread::sleep(Duration::from_millis(200));
            let home = rt.reactor(rt.num_reactors() - 1);
            for i in 0..n as u64 {
                let chunk = (i * 7919) % chunks.max(1);
                let scope = Scope {
                    include: vec![hotcopy_cow::BlockRange::new(
                        chunk * p.chunk_size / bs,
                        p.chunk_size / bs,
                    )],
                    exclude: vec![],
                    skip_unallocated: false,
                };
                let r = backup_config(reg, b, p, scope).and_then(|cfg| {
                    let job =
                        hotcopy_cow::start_backup(&cow, home, cfg).map_err(|e| e.to_string())?;
                    match job.wait(Duration::from_secs(30)) {
                        JobState::Complete => Ok(job.status().freeze_us),
                        s => Err(format!("freeze sample job {i}: {s:?}")),
                    }
                });
                match r {
                    Ok(f) => freezes.push(f),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
        },
    )?;
    if let Some(e) = err {
        return Err(e);
    }
    freezes.sort_by(f64::total_cmp);
    let q = |f: f64| {
        freezes
            .get(((freezes.len() as f64 * f).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(FreezeReport {
        jobs: freezes.len(),
        p50_us: q(0.5),
        p99_us: q(0.99),
        max_us: freezes.last().copied().unwrap_or(0.0),
    })
}

/// Limits each writer's figures to the job's window, using its timeline.
fn restrict(ws: &[WriterResult], offset: f64, from: f64, to: f64) -> Vec<WriterResult> {
    let b = TIMELINE_BUCKET.as_secs_f64();
    ws.iter()
        .map(|w| {
            let mut r = w.clone();
            let mut hist = Histogram::new_from(&w.hist);
            let mut ios = 0u64;
            for (i, s) in w.timeline.slots.iter().enumerate() {
                let t = offset + i as f64 * b;
                if t + b <= from || t >= to {
                    continue;
                }
                for (k, c) in s.iter().enumerate() {
                    if *c > 0 {
                        hist.saturating_record_n(bucket_value(k), *c as u64);
                        ios += *c as u64;
                    }
                }
            }
            r.hist = hist;
            r.ios = ios;
            r.secs = (to - from).max(b);
            r
        })
        .collect()
}

/// Each writer's runs of two phases taken as one: I/O counts and seconds
/// add up, latency histograms merge. Writers are matched by their position
/// (both phases run the same specs). Timelines and logs are dropped.
fn merge_phases(a: &[WriterResult], b: &[WriterResult]) -> Vec<WriterResult> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let mut hist = x.hist.clone();
            let _ = hist.add(&y.hist);
            WriterResult {
                name: x.name.clone(),
                ios: x.ios + y.ios,
                errors: x.errors + y.errors,
                secs: x.secs + y.secs,
                hist,
                timeline: Timeline {
                    start_tick: 0,
                    slots: Vec::new(),
                },
                log: None,
                seq_base: x.seq_base,
                first: x.first,
                stride: x.stride,
            }
        })
        .collect()
}

/// Checks the target against the source as it was at the consistency point.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the pieces are distinct"
)]
fn verify_backup(
    rt: &Runtime,
    reg: &BdevRegistry,
    b: &CowBenchBdevs,
    p: &CowBenchParams,
    job: &BackupJob,
    baseline: &[WriterResult],
    during: &[WriterResult],
    main_units: u64,
) -> Result<(), String> {
    // Expected sequence per unit: 0 (the fill) unless a write forwarded
    // before the consistency point touched it.
    let mut expect = vec![0u64; main_units as usize];
    let t0 = job
        .shared()
        .t0_writes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let cow_name = &b.cow;
    // Every baseline write completed before the job started.
    for w in baseline {
        for (i, u) in w.log.iter().flatten().enumerate() {
            if let Some(e) = expect.get_mut(*u as usize) {
                *e = w.seq_base | (i as u64 + 1);
            }
        }
    }
    // Channels are named "<cow>/core<r>/ch<n>" in creation order; writers were
    // created in spec order on their reactors, so match by order per reactor.
    for w in during {
        let Some(log) = &w.log else { continue };
        // Find this writer's T0 count: channels with exactly this writer's name order.
        let k = t0_for(&t0, cow_name, w)
            .ok_or_else(|| format!("no consistency-point record for writer {}", w.name))?;
        for (i, u) in log.iter().take(k as usize).enumerate() {
            expect[*u as usize] = w.seq_base | (i as u64 + 1);
        }
    }
    let unit = p.io_size;
    let target = reg.open(&b.target, false).map_err(|e| e.to_string())?;
    let tbs = target.bdev().block_size() as u64;
    let expect = Arc::new(expect);
    let bad = rt
        .exec(0, move || -> Result<Option<String>, String> {
            let mut ch = target.channel().map_err(|e| e.to_string())?;
            let step = 1 << 20;
            let mut want = vec![0u8; unit];
            let units_per_step = step / unit;
            let mut u = 0u64;
            while u < expect.len() as u64 {
                let n = (units_per_step as u64).min(expect.len() as u64 - u);
                let buf = DmaBuf::alloc(n as usize * unit).map_err(|e| e.to_string())?;
                let io = hotcopy_bdev::testing::run_io(&mut ch, BdevIo::read(u * unit as u64 / tbs, n * unit as u64 / tbs, buf, 1));
                if io.status != IoStatus::Success {
                    return Err(format!("reading the target: {:?}", io.status));
                }
                let data = io.buf.expect("read returns its buffer");
                for i in 0..n {
                    let uu = u + i;
                    unit_pattern(&mut want, uu, expect[uu as usize]);
                    let got = &data[(i as usize * unit)..((i as usize + 1) * unit)];
                    if got != &want[..] {
                        return Ok(Some(format!(
                            "unit {uu} (byte {}) of the backup is not the source's content at the consistency point",
                            uu * unit as u64
                        )));
                    }
                }
                u += n;
            }
            Ok(None)
        })
        .map_err(|e| e.to_string())??;
    match bad {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// This writer's count of writes forwarded before the consistency point.
fn t0_for(t0: &[(String, u64)], cow: &str, w: &WriterResult) -> Option<u64> {
    // w.name is "core<r>/w<i>" where i is the writer's index on reactor r;
    // cow channels on that reactor were created in the same order.
    let (core, idx) = w.name.split_once("/w")?;
    let idx: usize = idx.parse().ok()?;
    let prefix = format!("{cow}/{core}/");
    let mut chans: Vec<(u64, u64)> = t0
        .iter()
        .filter_map(|(n, k)| {
            n.strip_prefix(&prefix)
                .and_then(|c| c.strip_prefix("ch"))
                .and_then(|c| c.parse().ok())
                .map(|c: u64| (c, *k))
        })
        .collect();
    chans.sort();
    chans.get(idx).map(|(_, k)| *k)
}

/// Writes every I/O unit of `desc` with its fill pattern (sequence 0), in
/// 1 MiB writes from reactor 0, so the backup has real data to copy and the
/// verify knows the starting image.
pub fn fill_source(rt: &Runtime, desc: &BdevDesc, unit_bytes: usize) -> Result<(), String> {
    fill(rt, desc, Some(unit_bytes))
}

/// Writes zeros over the whole of `desc` in 1 MiB writes and flushes: on a
/// filesystem that stores the zeros (ext4 does), a file target's blocks
/// then exist before the backup writes them, as a namespace's do (a sparse
/// file would allocate them under the backup's writes, on the filesystem's
/// journal).
pub fn fill_zeros(rt: &Runtime, desc: &BdevDesc) -> Result<(), String> {
    fill(rt, desc, None)
}

/// Sequential 1 MiB writes over the whole bdev: the unit pattern of
/// `unit_bytes` units, or zeros (in blocks, so that the whole bdev is
/// written whatever its size).
fn fill(rt: &Runtime, desc: &BdevDesc, unit_bytes: Option<usize>) -> Result<(), String> {
    let what = if unit_bytes.is_some() {
        "the source"
    } else {
        "the target with zeros"
    };
    let desc = desc.clone();
    rt.exec(0, move || -> Result<(), String> {
        let mut ch = desc.channel().map_err(|e| e.to_string())?;
        let bs = ch.block_size() as u64;
        let total = ch.num_blocks() * bs;
        let unit = unit_bytes.map_or(bs, |u| u as u64);
        let step = (1u64 << 20).min(total) / unit * unit;
        if step == 0 {
            return Err(format!("{what}: {total} bytes hold no {unit}-byte unit"));
        }
        // Zeros once; the source's pattern changes with every unit.
        let mut buf = DmaBuf::alloc(step as usize).map_err(|e| e.to_string())?;
        buf.set_len(step as usize);
        buf.fill(0);
        let mut off = 0;
        while off + unit <= total {
            let len = step.min(total - off) / unit * unit;
            buf.set_len(len as usize);
            if unit_bytes.is_some() {
                for (i, u) in buf.chunks_exact_mut(unit as usize).enumerate() {
                    unit_pattern(u, off / unit + i as u64, 0);
                }
            }
            let mut io =
                hotcopy_bdev::testing::run_io(&mut ch, BdevIo::write(off / bs, len / bs, buf, 0));
            if io.status != IoStatus::Success {
                return Err(format!("filling {what} at byte {off}: {:?}", io.status));
            }
            buf = io.take_buf().expect("write returns its buffer");
            off += len;
        }
        match hotcopy_bdev::testing::run_io(&mut ch, BdevIo::flush(0)).status {
            IoStatus::Success => Ok(()),
            s => Err(format!("flushing {what}: {s:?}")),
        }
    })
    .map_err(|e| e.to_string())?
}

/// Draws write latency, container fill and copy progress over the run.
pub fn plot(report: &CowBenchReport, trace: &CowRunTrace) -> crate::plot::Chart {
    use crate::plot::{Chart, Panel, Series};
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for (phase, offset) in [
        (&trace.baseline, 0.0),
        (&trace.during, trace.during_offset_s),
    ] {
        // Merge the main writers' timelines (the fairness writer is drawn apart).
        let mains: Vec<&WriterResult> = phase
            .iter()
            .filter(|w| w.seq_base & (0xFF << 40) != 0xFF << 40)
            .collect();
        let Some(first) = mains.first() else { continue };
        let mut merged = first.timeline.clone();
        for w in &mains[1..] {
            for (a, b) in merged.slots.iter_mut().zip(w.timeline.slots.iter()) {
                for (x, y) in a.iter_mut().zip(b.iter()) {
                    *x += *y;
                }
            }
        }
        for (t, a, b, _) in merged.points(offset) {
            p50.push((t, a));
            p99.push((t, b));
        }
        p50.push((f64::NAN, f64::NAN));
        p99.push((f64::NAN, f64::NAN));
    }
    let fill: Vec<(f64, f64)> = trace
        .samples
        .iter()
        .map(|(t, s)| (*t, s.container_used as f64))
        .collect();
    let progress: Vec<(f64, f64)> = trace
        .samples
        .iter()
        .map(|(t, s)| {
            (
                *t,
                100.0 * s.chunks_done as f64 / s.chunks_in_scope.max(1) as f64,
            )
        })
        .collect();
    let cap = report.container_slots as f64;
    let (t0, t1) = (trace.job_start_s, trace.job_end_s.max(trace.job_start_s));
    Chart {
        title: format!(
            "hotcopy bench cow: {} writes QD{} on {} MiB, container {} slots",
            report.io_size,
            report.queue_depth,
            report.size_bytes >> 20,
            report.container_slots
        ),
        x_label: "seconds".into(),
        panels: vec![
            Panel {
                title: "foreground write latency".into(),
                y_label: "µs".into(),
                series: vec![
                    Series {
                        name: "p50".into(),
                        points: p50,
                        dashed: false,
                    },
                    Series {
                        name: "p99".into(),
                        points: p99,
                        dashed: false,
                    },
                ],
                log_y: None,
                y_min: None,
                y_max: None,
            },
            Panel {
                title: "intermediate container".into(),
                y_label: "slots used".into(),
                series: vec![
                    Series {
                        name: "used".into(),
                        points: fill,
                        dashed: false,
                    },
                    Series {
                        name: "capacity".into(),
                        points: vec![(t0, cap), (t1, cap)],
                        dashed: true,
                    },
                ],
                log_y: Some(false),
                y_min: Some(0.0),
                y_max: None,
            },
            Panel {
                title: "backup progress".into(),
                y_label: "% of chunks on target".into(),
                series: vec![Series {
                    name: "done".into(),
                    points: progress,
                    dashed: false,
                }],
                log_y: Some(false),
                y_min: Some(0.0),
                y_max: Some(100.0),
            },
        ],
        markers: vec![(t0, "backup start".into()), (t1, "backup end".into())],
    }
}

/// The job's window as text: one row per 100 ms with the main writers' IOPS
/// and latency next to the job's progress, container fill and stream budget.
pub fn timeline_table(trace: &CowRunTrace) -> String {
    use std::fmt::Write;
    let mains: Vec<&WriterResult> = trace
        .during
        .iter()
        .filter(|w| w.seq_base & (0xFF << 40) != 0xFF << 40)
        .collect();
    let mut s = String::new();
    let Some(first) = mains.first() else {
        return s;
    };
    let mut merged = first.timeline.clone();
    for w in &mains[1..] {
        for (a, b) in merged.slots.iter_mut().zip(w.timeline.slots.iter()) {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += *y;
            }
        }
    }
    // The out-of-scope writer's IOPS per slot, when there is one.
    let fair: Vec<(f64, f64)> = trace
        .during
        .iter()
        .find(|w| w.seq_base & (0xFF << 40) == 0xFF << 40)
        .map(|w| {
            w.timeline
                .points(trace.during_offset_s)
                .into_iter()
                .map(|(t, _, _, iops)| (t, iops))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "{:>7} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>6} {:>6} {:>9}",
        "t s",
        "IOPS",
        "p50 us",
        "p99 us",
        "done %",
        "container",
        "copy MiB",
        "saved",
        "budget",
        "fg us",
        "ref us",
        "by x",
        "drain",
        if fair.is_empty() { "" } else { "oos IOPS" }
    );
    let mut prev: Option<&JobStatus> = None;
    for (t, p50, p99, iops) in merged.points(trace.during_offset_s) {
        if t < trace.job_start_s - 0.3 || t > trace.job_end_s + 0.3 {
            continue;
        }
        // The last job sample taken before the end of this slot.
        let sample = trace
            .samples
            .iter()
            .rev()
            .find(|(st, _)| *st <= t + TIMELINE_BUCKET.as_secs_f64() / 2.0);
        match sample {
            Some((st, js)) if *st >= trace.job_start_s => {
                let (copied, saved) = match prev {
                    Some(p) => (
                        js.chunks_copied.saturating_sub(p.chunks_copied),
                        js.chunks_saved.saturating_sub(p.chunks_saved),
                    ),
                    None => (js.chunks_copied, js.chunks_saved),
                };
                let _ = writeln!(
                    s,
                    "{:>7.1} {:>9.0} {:>9.0} {:>9.0} {:>7.1} {:>9} {:>9.1} {:>9} {:>7.2} {:>8.0} {:>8.0} {:>6.2} {:>6} {:>9}",
                    t,
                    iops,
                    p50,
                    p99,
                    100.0 * js.chunks_done as f64 / js.chunks_in_scope.max(1) as f64,
                    js.container_used,
                    (copied * js.chunk_size) as f64 / (1024.0 * 1024.0),
                    saved,
                    js.stream_budget,
                    js.fg_latency_us,
                    js.fg_reference_us,
                    js.bystander_latency_ratio,
                    js.pressed_drain_depth,
                    fair.iter()
                        .find(|(ft, _)| (ft - t).abs() < 1e-6)
                        .map(|(_, i)| format!("{i:.0}"))
                        .unwrap_or_default()
                );
                prev = Some(js);
            }
            _ => {
                let _ = writeln!(s, "{t:>7.1} {iops:>9.0} {p50:>9.0} {p99:>9.0}");
            }
        }
    }
    s
}
