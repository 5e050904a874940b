//! Starting, watching and steering a backup job (control path).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;
use hotcopy_bdev::{Bdev, BdevDesc};
use hotcopy_runtime::{clock, BufferPool, HugepageMode, PollStatus, Poller, ReactorHandle};
use serde::Serialize;

use crate::cbt::CbtBase;
use crate::chunk_map::ChunkMap;
use crate::job::{Container, ControlQueue, JobCounters, JobShared, JobState, JobTuning, Streams};
use crate::scope::{BlockRange, Scope};
use crate::target::{BackupTarget, SkipReason, TargetError};
use crate::vbdev::CowBdev;

/// The default chunk: 64 KiB, the tracking and copy unit.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;

/// Where the intermediate container lives: `slots` chunk-sized slots starting
/// at `offset_blocks` of `desc` (a malloc bdev for RAM, a uring bdev for a
/// file, or a region of any bdev).
#[derive(Clone)]
pub struct ContainerConfig {
    pub desc: BdevDesc,
    pub offset_blocks: u64,
    pub slots: u32,
}

/// Everything a job needs.
#[derive(Clone)]
pub struct BackupConfig {
    pub target: Arc<dyn BackupTarget>,
    pub container: ContainerConfig,
    pub chunk_size: u64,
    pub scope: Scope,
    pub tuning: JobTuning,
    /// Incremental: copy only the chunks the cow bdev's change tracking marks
    /// as written since this generation (which must be the tracking's base,
    /// in the target's repository); the target shares the rest with it.
    pub changed_since: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("{0} is not a cow bdev")]
    NotCow(String),
    #[error("a backup job is already running on {0}")]
    Busy(String),
    #[error("invalid backup configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Target(#[from] crate::target::TargetError),
    #[error("starting the job: {0}")]
    Start(String),
}

/// Per-submitter pacing figures.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitterStats {
    pub name: String,
    pub paced_writes: u64,
    pub held_now: u64,
    pub slot_waits: u64,
    pub delay_us: f64,
}

/// A snapshot of a job's figures.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub id: u64,
    pub source: String,
    pub target: String,
    pub state: JobState,
    pub error: Option<String>,
    pub chunk_size: u64,
    pub chunks_total: u64,
    pub chunks_in_scope: u64,
    pub chunks_done: u64,
    pub chunks_pending: u64,
    pub chunks_copied: u64,
    /// Of `chunks_copied`, those copied outside the streams' budget, paid
    /// by captures ([`crate::JobTuning::copy_per_capture`]).
    pub chunks_copied_ahead: u64,
    /// Of those, the chunks of runs that started at the pending chunk the
    /// last arriving write reached ([`crate::JobTuning::copy_near_writers`]).
    pub chunks_copied_near_writers: u64,
    /// The most such runs in flight at once: at most
    /// [`crate::job::CREDIT_RUNS`], and at most the pressed drain depth
    /// the bystanders allowed when each was issued (so at most
    /// [`crate::JobTuning::pressed_drain_depth`]).
    pub copy_ahead_peak: u64,
    /// Chunks writers forced into the container (captures).
    pub chunks_saved: u64,
    pub container_slots: u32,
    pub container_used: u32,
    pub container_peak: u64,
    pub held_writes: u64,
    pub paced_writes: u64,
    pub slot_waits: u64,
    pub freeze_us: f64,
    pub elapsed_s: f64,
    pub copy_mibps: f64,
    pub drain_mibps: f64,
    pub backup_mibps: f64,
    /// The streams' budget in units of 64 KiB (or of a chunk, if larger) in
    /// flight (below 1: the share of time one unit is in flight).
    pub stream_budget: f64,
    /// Hosts' mean I/O latency on the source in the scheduler's last window,
    /// and the no-backup reference it holds them to (µs; 0: not measured).
    pub fg_latency_us: f64,
    pub fg_reference_us: f64,
    /// Bystanders' latency (hosts with no write held for 20 ms) over their
    /// own no-backup level, in the last window that measured it (0: none
    /// measured), and the drain depth the streams allow while the
    /// container is pressed (see [`crate::job`]).
    pub bystander_latency_ratio: f64,
    pub pressed_drain_depth: u64,
    /// How long the target's final flush took (ms; 0 until it completes):
    /// part of `elapsed_s`, the price of a durable backup.
    pub target_flush_ms: f64,
    /// Copy runs read ahead of the target's writes while hosts were idle
    /// (see [`crate::job`]).
    pub read_ahead_runs: u64,
    /// Copy runs written to the target straight from the source's memory
    /// while hosts were idle (a RAM source and a raw target; see
    /// [`crate::job`]).
    pub zero_copy_runs: u64,
    /// The generation committed, when the target is a repository.
    pub generation: Option<u64>,
    pub submitters: Vec<SubmitterStats>,
}

/// A handle on a running or finished job.
#[derive(Clone)]
pub struct BackupJob {
    pub(crate) job: Arc<JobShared>,
    cow: Bdev,
}

impl BackupJob {
    pub fn shared(&self) -> &Arc<JobShared> {
        &self.job
    }

    pub fn state(&self) -> JobState {
        self.job.state()
    }

    /// Waits until the job ends (or `timeout` passes); returns its final state.
    pub fn wait(&self, timeout: Duration) -> JobState {
        let deadline = Instant::now() + timeout;
        while !self.job.state().is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The streams poller uninstalls the job after it ends; wait for that too.
        while self.installed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.job.state()
    }

    fn installed(&self) -> bool {
        let cow = self.cow.backend::<CowBdev>().expect("checked at start");
        let j = cow.shared.job.lock().unwrap_or_else(|e| e.into_inner());
        j.as_ref().is_some_and(|j| Arc::ptr_eq(j, &self.job))
    }

    /// Asks the job to stop; held writes are released.
    pub fn cancel(&self) {
        self.job.cancel.store(true, Ordering::Relaxed);
    }

    /// Moves a range of source blocks to the front of the copy schedule.
    pub fn prioritize(&self, range: BlockRange) {
        let (c0, c1) = self.job.chunk_span(range.start, range.len.max(1));
        let c1 = c1.min(self.job.map.len().saturating_sub(1));
        self.job
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prioritize
            .push_back((c0, c1 + 1));
    }

    /// Changes the copy stream's rate limit (bytes per second, 0 = none).
    pub fn set_rate_limit(&self, bytes_per_sec: u64) {
        self.job.rate_limit.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn status(&self) -> JobStatus {
        let j = &self.job;
        let c = &j.counters;
        let tpu = clock::ticks_per_us();
        let end = match c.end_tick.load(Ordering::Relaxed) {
            0 => clock::ticks(),
            e => e,
        };
        let secs =
            (end.saturating_sub(c.start_tick.load(Ordering::Relaxed)) as f64 / tpu / 1e6).max(1e-9);
        let mib = |b: u64| b as f64 / secs / (1024.0 * 1024.0);
        let (copied, drained) = (
            c.bytes_copied.load(Ordering::Relaxed),
            c.bytes_drained.load(Ordering::Relaxed),
        );
        let done = c.chunks_done.load(Ordering::Relaxed);
        let cow = self.cow.backend::<CowBdev>().expect("checked at start");
        JobStatus {
            id: j.id,
            source: j.source.clone(),
            target: j.target.describe(),
            state: j.state(),
            error: j.error(),
            chunk_size: j.chunk_blocks * j.block_size,
            chunks_total: j.map.len(),
            chunks_in_scope: j.in_scope.load(Ordering::Relaxed),
            chunks_done: done,
            chunks_pending: j.in_scope.load(Ordering::Relaxed).saturating_sub(done),
            chunks_copied: c.chunks_copied.load(Ordering::Relaxed),
            chunks_copied_ahead: c.chunks_copied_ahead.load(Ordering::Relaxed),
            chunks_copied_near_writers: c.chunks_copied_near.load(Ordering::Relaxed),
            copy_ahead_peak: c.copy_ahead_peak.load(Ordering::Relaxed),
            chunks_saved: c.chunks_saved.load(Ordering::Relaxed),
            container_slots: j.container.slots,
            container_used: j.container.used(),
            container_peak: c.container_peak.load(Ordering::Relaxed),
            held_writes: c.held_writes.load(Ordering::Relaxed),
            paced_writes: c.paced_writes.load(Ordering::Relaxed),
            slot_waits: c.slot_waits.load(Ordering::Relaxed),
            freeze_us: c.freeze_us.load(Ordering::Relaxed) as f64 / 1000.0,
            elapsed_s: secs,
            copy_mibps: mib(copied),
            drain_mibps: mib(drained),
            backup_mibps: mib(copied + drained),
            stream_budget: c.budget.load(Ordering::Relaxed) as f64 / 16.0,
            fg_latency_us: c.fg_lat_ticks.load(Ordering::Relaxed) as f64 / tpu,
            fg_reference_us: c.fg_ref_ticks.load(Ordering::Relaxed) as f64 / tpu,
            bystander_latency_ratio: c.bystander_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            pressed_drain_depth: c.drain_depth.load(Ordering::Relaxed),
            target_flush_ms: c.target_flush_ticks.load(Ordering::Relaxed) as f64 / tpu / 1000.0,
            read_ahead_runs: c.read_ahead_runs.load(Ordering::Relaxed),
            zero_copy_runs: c.zero_copy_runs.load(Ordering::Relaxed),
            generation: match j.generation.load(Ordering::Relaxed) {
                0 => None,
                g => Some(g),
            },
            submitters: cow
                .channels()
                .iter()
                .map(|ch| SubmitterStats {
                    name: ch.name.clone(),
                    paced_writes: ch.paced_writes.load(Ordering::Relaxed),
                    held_now: ch.held.load(Ordering::Relaxed),
                    slot_waits: ch.slot_waits.load(Ordering::Relaxed),
                    delay_us: ch.pace_delay_ticks.load(Ordering::Relaxed) as f64 / tpu,
                })
                .collect(),
        }
    }
}

static NEXT_JOB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Starts a backup of the cow bdev `cow`, running its streams on `home`.
///
/// Control path: it blocks while it quiesces the source (see the consistency
/// point in [`crate::vbdev`]), so call it from a control thread, never from a
/// reactor.
pub fn start_backup(
    cow: &Bdev,
    home: &ReactorHandle,
    cfg: BackupConfig,
) -> Result<BackupJob, CowError> {
    let target = cfg.target.clone();
    start(cow, home, cfg).inspect_err(|e| {
        // Whatever the target began (a generation in progress) goes.
        target.abort(&e.to_string());
    })
}

fn start(cow: &Bdev, home: &ReactorHandle, cfg: BackupConfig) -> Result<BackupJob, CowError> {
    let cb = cow
        .backend::<CowBdev>()
        .ok_or_else(|| CowError::NotCow(cow.name().to_string()))?;
    // One start at a time (checked and set at once), and none while a job
    // runs.
    if cb.shared.starting.swap(true, Ordering::AcqRel) {
        return Err(CowError::Busy(cow.name().to_string()));
    }
    struct Started<'a>(&'a AtomicBool);
    impl Drop for Started<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _started = Started(&cb.shared.starting);
    if cb.job().is_some_and(|j| j.state() == JobState::Running) {
        return Err(CowError::Busy(cow.name().to_string()));
    }
    let source = cb.source().bdev().clone();
    let bs = source.block_size() as u64;
    let chunk = cfg.chunk_size;
    if !chunk.is_power_of_two() || chunk < bs || !(4096..=64 << 20).contains(&chunk) {
        return Err(CowError::Config(format!(
            "chunk size {chunk} must be a power of two between max(4 KiB, block size {bs}) and 64 MiB"
        )));
    }
    let cont = &cfg.container;
    let cbs = cont.desc.bdev().block_size() as u64;
    if !chunk.is_multiple_of(cbs) {
        return Err(CowError::Config(format!(
            "chunk size {chunk} is not a multiple of the container's block size {cbs}"
        )));
    }
    if cont.slots == 0 {
        return Err(CowError::Config(
            "the container needs at least one slot".into(),
        ));
    }
    if !cont.desc.is_writable() {
        return Err(CowError::Config(format!(
            "container {} is opened read-only",
            cont.desc.bdev().name()
        )));
    }
    let slot_blocks = chunk / cbs;
    let need = cont.offset_blocks + cont.slots as u64 * slot_blocks;
    if need > cont.desc.bdev().num_blocks() {
        return Err(CowError::Config(format!(
            "container {} has {} blocks; {} slots of {chunk} bytes from block {} need {need}",
            cont.desc.bdev().name(),
            cont.desc.bdev().num_blocks(),
            cont.slots,
            cont.offset_blocks
        )));
    }
    cfg.target.prepare(&source, chunk)?;
    let cbt = cb.cbt();
    if let Some(since) = cfg.changed_since {
        let Some(t) = &cbt else {
            return Err(CowError::Config(format!(
                "{} has no change tracking: an incremental needs it",
                cow.name()
            )));
        };
        let base = t.base();
        let repo = cfg.target.repository();
        match (&base, &repo) {
            (Some(b), Some(r)) if b.generation == since && b.repository == *r => {}
            _ => {
                return Err(CowError::Config(format!(
                    "{}'s change tracking is {}, not relative to generation {since} of the target's repository: run a full backup",
                    cow.name(),
                    match &base {
                        Some(b) => format!("relative to generation {} of repository {}", b.generation, b.repository),
                        None => format!("not relative to any backup ({:?})", t.opened()),
                    }
                )))
            }
        }
        if t.chunk_size() != chunk {
            return Err(CowError::Config(format!(
                "change tracking counts chunks of {} bytes; the job asks for {chunk}",
                t.chunk_size()
            )));
        }
    }
    let chunk_blocks = chunk / bs;
    let chunks = source.num_blocks().div_ceil(chunk_blocks);
    let map = ChunkMap::new(chunks);
    let allocated = source.allocated_ranges();
    let mut skips = SkipRuns::new(cfg.target.as_ref());
    let scope = cfg.scope.apply_with(
        &map,
        chunk_blocks,
        source.num_blocks(),
        allocated.as_deref(),
        &mut |c, why| skips.add(c, why),
    );
    skips.finish()?;
    let soft_slots =
        ((cont.slots as f64 * cfg.tuning.soft_watermark.clamp(0.0, 1.0)) as u32).max(1);
    let capture_bufs = BufferPool::new(
        chunk as usize,
        cont.slots.min(256) as usize,
        HugepageMode::Auto,
    )
    .map_err(|e| CowError::Start(e.to_string()))?;
    // Room for every granule the cow channels can have in flight (capped:
    // past it the fence covers everything until they land).
    let fence_table = Arc::new(crate::fence::FenceTable::new(
        (cb.channels().len().max(1) * crate::fence::CHANNEL_ENTRIES).min(1 << 16),
    ));
    fence_table.set_shift(crate::fence::granule_shift(bs));
    let job = Arc::new(JobShared {
        id: NEXT_JOB.fetch_add(1, Ordering::Relaxed),
        source: source.name().to_string(),
        chunk_blocks,
        chunk_shift: chunk_blocks.trailing_zeros(),
        block_size: bs,
        num_blocks: source.num_blocks(),
        map,
        scope,
        container: Container::new(
            cont.desc.clone(),
            cont.offset_blocks,
            slot_blocks,
            cont.slots,
        ),
        saved: ArrayQueue::new(cont.slots as usize),
        wanted: crossbeam::utils::CachePadded::new(AtomicU64::new(crate::job::NO_CHUNK)),
        capture_bufs,
        target: cfg.target.clone(),
        state: Default::default(),
        error: Mutex::new(None),
        counters: JobCounters::default(),
        next_admit: Default::default(),
        admit_interval: Default::default(),
        soft_slots,
        control: Mutex::new(ControlQueue::default()),
        rate_limit: cfg.tuning.rate_limit.into(),
        cancel: Default::default(),
        consistency_point_us: Default::default(),
        tuning: cfg.tuning.clone(),
        fg: cb.fg_meter().clone(),
        generation: Default::default(),
        in_scope: AtomicU64::new(scope.chunks_in_scope),
        changed: Mutex::new(None),
        t0_writes: Mutex::new(Vec::new()),
        fence: fence_table.clone(),
        lent_writes: AtomicU64::new(0),
    });
    // The streams' channels and poller live on the home reactor; their
    // buffers are made here (see `Streams::buffers`).
    let streams = {
        let pool = Streams::buffers(&job).map_err(CowError::Start)?;
        let (job, src, tgt, cont) = (
            job.clone(),
            cb.source().clone(),
            cfg.target.desc().clone(),
            cont.desc.clone(),
        );
        home.exec(move || -> Result<SendStreams, String> {
            let mem = src.bdev().memory_window();
            let s = Streams::new(
                job,
                pool,
                src.channel().map_err(|e| e.to_string())?,
                mem,
                tgt.channel().map_err(|e| e.to_string())?,
                cont.channel().map_err(|e| e.to_string())?,
            )?;
            STAGED.with(|st| *st.borrow_mut() = Some(s));
            Ok(SendStreams)
        })
        .map_err(|e| CowError::Start(e.to_string()))?
        .map_err(CowError::Start)?
    };
    let _ = streams;
    // The hosts' latency without a backup: the scheduler's reference.
    if cfg.tuning.adaptive {
        job.counters
            .fg_ref_ticks
            .store(calibrate(cb), Ordering::Relaxed);
    }
    // Consistency point: freeze, drain, install, resume. The streams' first
    // I/O flushes the source (see the protocol in `vbdev`).
    let install_job = job.clone();
    let cow_shared = cb.shared.clone();
    let install_cbt = cbt.clone();
    let frozen = cb
        .freeze_on(home, fence_table, move || {
            // Tracking restarts at the consistency point; the job keeps what
            // changed before it.
            if let Some(t) = &install_cbt {
                *install_job
                    .changed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(t.take());
            }
            install_job
                .counters
                .start_tick
                .store(clock::ticks(), Ordering::Relaxed);
            let now_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0);
            install_job
                .consistency_point_us
                .store(now_us, Ordering::Relaxed);
            *install_job
                .t0_writes
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = cow_shared
                .channels()
                .iter()
                .map(|c| (c.name.clone(), c.forwarded_writes.load(Ordering::Acquire)))
                .collect();
            *cow_shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(install_job.clone());
        })
        .map_err(CowError::Start)?;
    job.counters
        .freeze_us
        .store(frozen.as_nanos() as u64, Ordering::Relaxed);
    if cfg.changed_since.is_some() {
        // Incremental: chunks not written since the parent are shared with
        // it. A writer may have captured one since the resume; it is then
        // copied like any other.
        let changed = job
            .changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let marked = |c: u64| {
            changed.as_ref().is_some_and(|w| {
                w.get((c / 64) as usize)
                    .is_some_and(|w| w & (1 << (c % 64)) != 0)
            })
        };
        let mut skips = SkipRuns::new(cfg.target.as_ref());
        let mut unchanged = 0;
        for c in 0..chunks {
            if !marked(c) && map_skip(&job, c) {
                unchanged += 1;
                skips.add(c, SkipReason::Unchanged);
            }
        }
        job.in_scope.fetch_sub(unchanged, Ordering::AcqRel);
        if let Err(e) = skips.finish() {
            job.finish(JobState::Failed, Some(e.to_string()));
        }
    }
    // Start the streams.
    let cow_shared = cb.shared.clone();
    let done_cbt = cbt.clone();
    let done_repo = cfg.target.repository();
    home.exec(move || {
        let mut streams = STAGED
            .with(|st| st.borrow_mut().take())
            .expect("staged above");
        // The streams were built before the calibration ran.
        streams.load_reference();
        let streams = Rc::new(RefCell::new(streams));
        let me: Rc<RefCell<Option<Poller>>> = Rc::new(RefCell::new(None));
        let me2 = me.clone();
        let poller = Poller::builder().name("cow_streams").register(move || {
            let mut s = streams.borrow_mut();
            let n = s.poll();
            if s.is_done() {
                if let Some(t) = &done_cbt {
                    let job = s.job();
                    let taken = job.changed.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let gen = job.generation.load(Ordering::Relaxed);
                    match (job.state(), done_repo.clone()) {
                        (JobState::Complete, Some(repository)) if gen != 0 => {
                            t.set_base(Some(CbtBase {
                                generation: gen,
                                repository,
                            }))
                        }
                        (JobState::Complete, _) => t.set_base(None),
                        _ => {
                            if let Some(w) = taken {
                                t.merge(&w);
                            }
                        }
                    }
                }
                // Uninstall: channels drop the job at their next I/O or poll.
                *cow_shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
                cow_shared.gen.fetch_add(1, Ordering::SeqCst);
                me2.borrow_mut().take();
            }
            PollStatus::from_count(n)
        });
        *me.borrow_mut() = Some(poller);
    })
    .map_err(|e| CowError::Start(e.to_string()))?;
    Ok(BackupJob {
        job,
        cow: cow.clone(),
    })
}

/// How long the channels measure the hosts' latency before a job starts.
pub const CALIBRATION: Duration = Duration::from_millis(30);

/// How long the calibration watches before it concludes that hosts are
/// idle (no host I/O completed and none in flight) and stops.
pub const CALIBRATION_IDLE: Duration = Duration::from_millis(5);

/// Measures the hosts' mean I/O latency on `cb` for [`CALIBRATION`] (ticks;
/// 0 when they did too little I/O to tell). Idle hosts are told apart
/// after [`CALIBRATION_IDLE`], so that a job on an idle volume does not
/// wait out the whole window.
fn calibrate(cb: &CowBdev) -> u64 {
    let fg = cb.fg_meter();
    cb.set_measuring(true);
    // Channels start measuring at their next I/O or poll.
    std::thread::sleep(Duration::from_millis(2));
    let (a0, d0) = fg.read();
    std::thread::sleep(CALIBRATION_IDLE);
    if fg.read().1 == d0 && fg.busy.load(Ordering::Relaxed) == 0 {
        cb.set_measuring(false);
        return 0;
    }
    std::thread::sleep(CALIBRATION.saturating_sub(CALIBRATION_IDLE));
    let (a1, d1) = fg.read();
    cb.set_measuring(false);
    let done = d1 - d0;
    if done < 32 {
        0
    } else {
        (a1 - a0) / done
    }
}

/// Takes `c` out of an incremental's copy (`Pending` → `OutOfScope`);
/// false when a writer got to it first.
fn map_skip(job: &JobShared, c: u64) -> bool {
    job.map
        .transition(c, crate::ChunkState::Pending, crate::ChunkState::OutOfScope)
}

/// Batches consecutive chunks skipped for the same reason into one call of
/// [`BackupTarget::skip`].
struct SkipRuns<'a> {
    target: &'a dyn BackupTarget,
    run: Option<(u64, u64, SkipReason)>,
    err: Option<TargetError>,
}

impl<'a> SkipRuns<'a> {
    fn new(target: &'a dyn BackupTarget) -> Self {
        SkipRuns {
            target,
            run: None,
            err: None,
        }
    }

    fn add(&mut self, c: u64, why: SkipReason) {
        match &mut self.run {
            Some((first, count, w)) if *w == why && *first + *count == c => *count += 1,
            _ => {
                self.flush();
                self.run = Some((c, 1, why));
            }
        }
    }

    fn flush(&mut self) {
        if let Some((first, count, why)) = self.run.take() {
            if self.err.is_none() {
                if let Err(e) = self.target.skip(first, count, why) {
                    self.err = Some(e);
                }
            }
        }
    }

    fn finish(mut self) -> Result<(), TargetError> {
        self.flush();
        match self.err.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Marker returned from the staging step (the streams themselves stay on the reactor).
struct SendStreams;

thread_local! {
    static STAGED: RefCell<Option<Streams>> = const { RefCell::new(None) };
}
