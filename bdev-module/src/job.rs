//! A backup job: its shared state and the streams that copy and drain.
//!
//! [`JobShared`] is what every core sees: the chunk map, the container's free
//! slots, the queue of saved chunks waiting to drain, pacing state and the
//! statistics, all atomics or lock-free queues. `Streams` runs on the job's
//! home reactor as one poller: it drains saved chunks from the container to
//! the target and copies pending chunks from the source to the target, within
//! a queue-depth budget that an AIMD controller adapts to the latency the
//! streams observe on the devices, with drain taking priority as the container
//! fills.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam::queue::ArrayQueue;
use hotcopy_bdev::{BdevChannel, BdevDesc, BdevIo, IoStatus};
use hotcopy_runtime::{clock, BufferPool, DmaBuf};
use serde::Serialize;

use crate::chunk_map::{ChunkMap, ChunkState};
use crate::scope::ScopeSummary;
use crate::target::{BackupTarget, CommitInfo};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum JobState {
    Running = 0,
    Complete = 1,
    Failed = 2,
    Cancelled = 3,
}

impl JobState {
    fn from_u8(v: u8) -> JobState {
        match v {
            0 => JobState::Running,
            1 => JobState::Complete,
            2 => JobState::Failed,
            _ => JobState::Cancelled,
        }
    }

    pub fn is_finished(self) -> bool {
        self != JobState::Running
    }
}

/// The intermediate container: `slots` chunk-sized slots on a bdev region.
pub struct Container {
    pub desc: BdevDesc,
    pub offset_blocks: u64,
    /// Container blocks per slot.
    pub slot_blocks: u64,
    pub slots: u32,
    free: ArrayQueue<u32>,
    /// Chunk held by each slot (`u64::MAX` when free), for the point-in-time view.
    slot_chunk: Box<[AtomicU64]>,
}

impl Container {
    pub(crate) fn new(
        desc: BdevDesc,
        offset_blocks: u64,
        slot_blocks: u64,
        slots: u32,
    ) -> Container {
        let free = ArrayQueue::new(slots.max(1) as usize);
        for s in 0..slots {
            let _ = free.push(s);
        }
        Container {
            desc,
            offset_blocks,
            slot_blocks,
            slots,
            free,
            slot_chunk: (0..slots).map(|_| AtomicU64::new(u64::MAX)).collect(),
        }
    }

    /// Takes a free slot (lock-free), or `None` when all are in use.
    #[inline]
    pub(crate) fn take(&self) -> Option<u32> {
        self.free.pop()
    }

    /// Records that `slot` now holds `chunk`: called only after the capture
    /// has won its chunk (`Pending` → `Saving`), so no two slots ever name
    /// the same chunk.
    #[inline]
    pub(crate) fn assign(&self, slot: u32, chunk: u64) {
        self.slot_chunk[slot as usize].store(chunk, Ordering::Release);
    }

    /// Returns a slot. Only called once its chunk is safely on the target
    /// (or the capture that took it was abandoned before writing it).
    #[inline]
    pub(crate) fn give_back(&self, slot: u32) {
        self.slot_chunk[slot as usize].store(u64::MAX, Ordering::Release);
        let _ = self.free.push(slot);
    }

    /// First container block of `slot`.
    #[inline]
    pub fn slot_lba(&self, slot: u32) -> u64 {
        self.offset_blocks + slot as u64 * self.slot_blocks
    }

    pub fn used(&self) -> u32 {
        self.slots - self.free.len() as u32
    }

    /// The slot holding `chunk`'s old content, if any (linear in the slot count).
    pub fn find(&self, chunk: u64) -> Option<u32> {
        self.slot_chunk
            .iter()
            .position(|c| c.load(Ordering::Acquire) == chunk)
            .map(|s| s as u32)
    }
}

/// Counters every core updates (relaxed atomics; read for status).
#[derive(Default)]
pub struct JobCounters {
    pub chunks_done: AtomicU64,
    pub chunks_copied: AtomicU64,
    pub chunks_saved: AtomicU64,
    pub chunks_drained: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub bytes_drained: AtomicU64,
    pub held_writes: AtomicU64,
    pub paced_writes: AtomicU64,
    pub slot_waits: AtomicU64,
    pub container_peak: AtomicU64,
    pub freeze_us: AtomicU64,
    pub start_tick: AtomicU64,
    pub end_tick: AtomicU64,
    pub budget: AtomicU64,
}

/// Requests from the control path to the streams.
#[derive(Default)]
pub(crate) struct ControlQueue {
    pub prioritize: VecDeque<(u64, u64)>,
}

/// How the job behaves.
#[derive(Debug, Clone)]
pub struct JobTuning {
    /// Most stream I/Os in flight at once (copy + drain).
    pub max_queue_depth: u32,
    /// Copy-stream rate limit in bytes per second (0: none).
    pub rate_limit: u64,
    /// Container fill (0..1) above which writers that need a slot are paced.
    pub soft_watermark: f64,
    /// Adapt the stream budget to device latency (AIMD).
    pub adaptive: bool,
}

impl Default for JobTuning {
    fn default() -> Self {
        JobTuning {
            max_queue_depth: 16,
            rate_limit: 0,
            soft_watermark: 0.5,
            adaptive: true,
        }
    }
}

/// Everything the cores share about one job.
pub struct JobShared {
    pub id: u64,
    pub source: String,
    pub chunk_blocks: u64,
    pub chunk_shift: u32,
    pub block_size: u64,
    pub num_blocks: u64,
    pub map: ChunkMap,
    pub scope: ScopeSummary,
    pub container: Container,
    /// Saved chunks waiting to drain: (chunk, slot).
    pub(crate) saved: ArrayQueue<(u64, u32)>,
    /// Bounce buffers for captures (one chunk each).
    pub(crate) capture_bufs: BufferPool,
    pub target: Arc<dyn BackupTarget>,
    pub(crate) state: AtomicU8,
    pub(crate) error: Mutex<Option<String>>,
    pub counters: JobCounters,
    /// Pacing: the tick before which no paced capture is admitted, and the
    /// ticks between admissions (the measured drain interval; 0 = no pacing).
    pub(crate) next_admit: AtomicU64,
    pub(crate) admit_interval: AtomicU64,
    pub soft_slots: u32,
    pub(crate) control: Mutex<ControlQueue>,
    pub(crate) rate_limit: AtomicU64,
    pub(crate) cancel: AtomicBool,
    /// Microseconds since the Unix epoch at the consistency point.
    pub consistency_point_us: AtomicU64,
    pub tuning: JobTuning,
    /// Per channel (by name): writes forwarded to the source before the
    /// consistency point. Recorded while the source is frozen.
    pub t0_writes: Mutex<Vec<(String, u64)>>,
}

impl JobShared {
    #[inline]
    pub fn state(&self) -> JobState {
        JobState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Ends the job (first caller wins); returns whether this call ended it.
    pub(crate) fn finish(&self, state: JobState, error: Option<String>) -> bool {
        let won = self
            .state
            .compare_exchange(
                JobState::Running as u8,
                state as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if won {
            self.counters
                .end_tick
                .store(clock::ticks(), Ordering::Relaxed);
            if let Some(e) = error {
                tracing::warn!(job = self.id, source = %self.source, "backup job {state:?}: {e}");
                *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
        won
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Chunks `[first, last]` that blocks `[offset, offset + len)` touch.
    #[inline]
    pub fn chunk_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let last = if len == 0 { offset } else { offset + len - 1 };
        (offset >> self.chunk_shift, last >> self.chunk_shift)
    }

    /// Blocks of `chunk` (the last chunk may be short).
    #[inline]
    pub fn chunk_len(&self, chunk: u64) -> u64 {
        let start = chunk << self.chunk_shift;
        self.chunk_blocks.min(self.num_blocks - start)
    }

    pub(crate) fn note_container_use(&self) {
        let used = self.container.used() as u64;
        self.counters
            .container_peak
            .fetch_max(used, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpKind {
    CopyRead,
    CopyWrite,
    DrainRead,
    DrainWrite,
    FlushTarget,
}

struct Op {
    kind: OpKind,
    /// First chunk (copy ops cover `count` consecutive chunks).
    chunk: u64,
    count: u64,
    slot: u32,
    start: u64,
}

/// Largest copy I/O: consecutive pending chunks are copied together up to this.
pub const COPY_RUN_BYTES: u64 = 1 << 20;

enum Phase {
    Running,
    Flushing,
    Done,
}

/// The copy and drain streams of one job, run by a poller on its home reactor.
pub(crate) struct Streams {
    job: Arc<JobShared>,
    src: BdevChannel,
    tgt: BdevChannel,
    cont: BdevChannel,
    bufs: Vec<DmaBuf>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    /// Completions of one pass (kept to reuse its allocation).
    completed: Vec<BdevIo>,
    cursor: u64,
    prio: VecDeque<(u64, u64)>,
    phase: Phase,
    budget: u32,
    /// AIMD: latency window and the best window seen (the no-contention level).
    win_sum: u64,
    win_n: u64,
    win_start: u64,
    best_lat: u64,
    /// Drain rate measurement for pacing.
    drained_in_window: u64,
    /// Rate limit: bytes the copy stream may have issued so far.
    rate_start: u64,
    rate_issued: u64,
    tick_us: f64,
}

/// Ticks between AIMD/pacing updates.
const WINDOW: Duration = Duration::from_millis(5);

impl Streams {
    pub(crate) fn new(
        job: Arc<JobShared>,
        src: BdevChannel,
        tgt: BdevChannel,
        cont: BdevChannel,
    ) -> Result<Streams, String> {
        let qd = job.tuning.max_queue_depth.max(1) as usize;
        let bytes = (job.chunk_blocks * job.block_size).max(COPY_RUN_BYTES) as usize;
        let bufs = (0..qd)
            .map(|_| DmaBuf::alloc(bytes).map_err(|e| format!("stream buffers: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let now = clock::ticks();
        Ok(Streams {
            budget: qd as u32,
            ops: (0..qd + 1).map(|_| None).collect(),
            free_ops: (0..qd + 1).rev().collect(),
            completed: Vec::with_capacity(qd + 1),
            bufs,
            cursor: 0,
            prio: VecDeque::new(),
            phase: Phase::Running,
            win_sum: 0,
            win_n: 0,
            win_start: now,
            best_lat: u64::MAX,
            drained_in_window: 0,
            rate_start: now,
            rate_issued: 0,
            tick_us: clock::ticks_per_us(),
            job,
            src,
            tgt,
            cont,
        })
    }

    pub(crate) fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn inflight(&self) -> usize {
        self.ops.len() - self.free_ops.len()
    }

    /// Takes an op slot for `count` chunks from `chunk` (drain ops: one).
    fn start_op(&mut self, kind: OpKind, chunk: u64, count: u64, slot: u32, now: u64) -> usize {
        let i = self.free_ops.pop().expect("budget keeps a free op");
        self.ops[i] = Some(Op {
            kind,
            chunk,
            count,
            slot,
            start: now,
        });
        i
    }

    fn fail(&mut self, why: String) {
        self.job.finish(JobState::Failed, Some(why));
    }

    /// One pass: reap completions, adapt, issue new work. Returns work done.
    pub(crate) fn poll(&mut self) -> usize {
        let now = clock::ticks();
        let mut work = 0;
        let mut completed = std::mem::take(&mut self.completed);
        work += self.src.poll(&mut |io| completed.push(io));
        work += self.tgt.poll(&mut |io| completed.push(io));
        work += self.cont.poll(&mut |io| completed.push(io));
        for io in completed.drain(..) {
            self.complete(io, now);
        }
        self.completed = completed;
        if self.job.cancel.load(Ordering::Relaxed) {
            self.job
                .finish(JobState::Cancelled, Some("cancelled".into()));
        }
        self.adapt(now);
        match self.phase {
            Phase::Running => {
                if self.job.state().is_finished() {
                    if self.inflight() == 0 {
                        self.phase = Phase::Done;
                    }
                    return work;
                }
                work += self.issue(now);
                let c = &self.job.counters;
                let settled =
                    c.chunks_done.load(Ordering::Acquire) >= self.job.scope.chunks_in_scope;
                if settled && self.inflight() == 0 {
                    // Everything is on the target: make it durable.
                    let i = self.start_op(OpKind::FlushTarget, 0, 0, 0, now);
                    self.tgt.submit(BdevIo::flush(i as u64));
                    self.phase = Phase::Flushing;
                }
            }
            Phase::Flushing => {}
            Phase::Done => {}
        }
        work
    }

    fn complete(&mut self, mut io: BdevIo, now: u64) {
        let i = io.token as usize;
        let Some(op) = self.ops.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.free_ops.push(i);
        let lat = now.saturating_sub(op.start);
        self.win_sum += lat;
        self.win_n += 1;
        let ok = io.status == IoStatus::Success;
        let buf = io.take_buf();
        let job = self.job.clone();
        match op.kind {
            OpKind::CopyRead => {
                let buf = buf.expect("copy read carries a buffer");
                if !ok {
                    self.bufs.push(buf);
                    return self.fail(format!(
                        "reading chunk {} from the source: {:?}",
                        op.chunk, io.status
                    ));
                }
                // The chunks' T0 content is in our buffer: writers may pass now.
                for c in op.chunk..op.chunk + op.count {
                    let moved = job
                        .map
                        .transition(c, ChunkState::Copying, ChunkState::Copied);
                    debug_assert!(moved, "only the copy stream moves a Copying chunk");
                }
                let blocks = io.num_blocks;
                let lba = job
                    .target
                    .chunk_lba(op.chunk, job.chunk_blocks * job.block_size);
                let tb = self.tgt.block_size() as u64;
                let j = self.start_op(OpKind::CopyWrite, op.chunk, op.count, 0, now);
                let w = BdevIo::write(lba, blocks * job.block_size / tb, buf, j as u64);
                self.tgt.submit(w);
            }
            OpKind::CopyWrite => {
                if let Some(b) = buf {
                    self.bufs.push(b);
                }
                if !ok {
                    return self.fail(format!(
                        "writing chunk {} to the target: {:?}",
                        op.chunk, io.status
                    ));
                }
                for c in op.chunk..op.chunk + op.count {
                    job.map.transition(c, ChunkState::Copied, ChunkState::Done);
                }
                job.counters
                    .chunks_copied
                    .fetch_add(op.count, Ordering::Relaxed);
                job.counters.bytes_copied.fetch_add(
                    io.num_blocks * self.tgt.block_size() as u64,
                    Ordering::Relaxed,
                );
                job.counters
                    .chunks_done
                    .fetch_add(op.count, Ordering::Release);
            }
            OpKind::DrainRead => {
                let buf = buf.expect("drain read carries a buffer");
                if !ok {
                    self.bufs.push(buf);
                    return self.fail(format!(
                        "reading container slot {}: {:?}",
                        op.slot, io.status
                    ));
                }
                let blocks = job.chunk_len(op.chunk);
                let lba = job
                    .target
                    .chunk_lba(op.chunk, job.chunk_blocks * job.block_size);
                let tb = self.tgt.block_size() as u64;
                let j = self.start_op(OpKind::DrainWrite, op.chunk, 1, op.slot, now);
                let mut buf = buf;
                buf.set_len((blocks * job.block_size) as usize);
                self.tgt.submit(BdevIo::write(
                    lba,
                    blocks * job.block_size / tb,
                    buf,
                    j as u64,
                ));
            }
            OpKind::DrainWrite => {
                if let Some(b) = buf {
                    self.bufs.push(b);
                }
                if !ok {
                    return self.fail(format!(
                        "writing chunk {} to the target: {:?}",
                        op.chunk, io.status
                    ));
                }
                // The chunk is safe on the target: only now may its slot be reused.
                job.map
                    .transition(op.chunk, ChunkState::Saved, ChunkState::Done);
                job.container.give_back(op.slot);
                job.counters.chunks_drained.fetch_add(1, Ordering::Relaxed);
                job.counters.bytes_drained.fetch_add(
                    io.num_blocks * self.tgt.block_size() as u64,
                    Ordering::Relaxed,
                );
                job.counters.chunks_done.fetch_add(1, Ordering::Release);
                self.drained_in_window += 1;
            }
            OpKind::FlushTarget => {
                if !ok {
                    return self.fail(format!("flushing the target: {:?}", io.status));
                }
                let info = CommitInfo {
                    source: job.source.clone(),
                    chunk_bytes: job.chunk_blocks * job.block_size,
                    chunks_total: job.map.len(),
                    chunks_copied: job.counters.chunks_done.load(Ordering::Relaxed),
                    consistency_point_us: job.consistency_point_us.load(Ordering::Relaxed),
                };
                match job.target.commit(&info) {
                    Ok(()) => {
                        job.finish(JobState::Complete, None);
                    }
                    Err(e) => self.fail(e.to_string()),
                }
                self.phase = Phase::Done;
            }
        }
    }

    /// Issues drain first, then copy, within the budget.
    fn issue(&mut self, now: u64) -> usize {
        let job = self.job.clone();
        let mut issued = 0;
        let fill = job.container.used();
        // Drain has priority and a budget of its own that grows with the
        // container's fill (full budget at the soft watermark): a full container
        // is what forces writers to be paced, so draining it is never throttled
        // by the latency controller. Copy gets the AIMD budget, and stays out of
        // the way entirely while the container is past half its soft watermark.
        let max = job.tuning.max_queue_depth.max(1);
        let drain_budget = ((max as u64 * fill as u64).div_ceil(job.soft_slots.max(1) as u64)
            as u32)
            .clamp(1, max);
        while (self.inflight() as u32) < drain_budget.max(self.budget) && !self.bufs.is_empty() {
            let Some((chunk, slot)) = job.saved.pop() else {
                break;
            };
            let mut buf = self.bufs.pop().expect("checked non-empty");
            let slot_bytes = job.container.slot_blocks * self.cont.block_size() as u64;
            buf.set_len(slot_bytes as usize);
            let i = self.start_op(OpKind::DrainRead, chunk, 1, slot, now);
            self.cont.submit(BdevIo::read(
                job.container.slot_lba(slot),
                job.container.slot_blocks,
                buf,
                i as u64,
            ));
            issued += 1;
        }
        let copy_ok = fill < job.soft_slots / 2 || job.saved.is_empty();
        if !copy_ok {
            return issued;
        }
        {
            let mut ctl = job.control.lock().unwrap_or_else(|e| e.into_inner());
            self.prio.extend(ctl.prioritize.drain(..));
        }
        let rate = job.rate_limit.load(Ordering::Relaxed);
        let chunk_bytes = job.chunk_blocks * job.block_size;
        while (self.inflight() as u32) < self.budget && !self.bufs.is_empty() {
            if rate > 0 {
                let allowed = (now - self.rate_start) as f64 / self.tick_us / 1e6 * rate as f64;
                if self.rate_issued as f64 + chunk_bytes as f64 > allowed + chunk_bytes as f64 {
                    break;
                }
            }
            let Some(chunk) = self.next_pending() else {
                break;
            };
            // Extend to a run of consecutive pending chunks (one read, one
            // target write) when the target keeps consecutive chunks together.
            let max_run = if job.target.contiguous() {
                (COPY_RUN_BYTES / chunk_bytes).max(1)
            } else {
                1
            };
            let mut count = 1;
            while count < max_run
                && chunk + count < job.map.len()
                && job
                    .map
                    .transition(chunk + count, ChunkState::Pending, ChunkState::Copying)
            {
                count += 1;
            }
            let blocks =
                (count * job.chunk_blocks).min(job.num_blocks - (chunk << job.chunk_shift));
            let mut buf = self.bufs.pop().expect("checked non-empty");
            buf.set_len((blocks * job.block_size) as usize);
            let i = self.start_op(OpKind::CopyRead, chunk, count, 0, now);
            self.src.submit(BdevIo::read(
                chunk << job.chunk_shift,
                blocks,
                buf,
                i as u64,
            ));
            self.rate_issued += blocks * job.block_size;
            issued += 1;
        }
        issued
    }

    /// The next chunk to copy, claimed (`Pending` → `Copying`): prioritised
    /// ranges first, then in order.
    fn next_pending(&mut self) -> Option<u64> {
        let map = &self.job.map;
        while let Some((s, e)) = self.prio.front_mut() {
            while *s < *e {
                let c = *s;
                *s += 1;
                if map.transition(c, ChunkState::Pending, ChunkState::Copying) {
                    return Some(c);
                }
            }
            self.prio.pop_front();
        }
        while self.cursor < map.len() {
            let c = self.cursor;
            self.cursor += 1;
            if map.transition(c, ChunkState::Pending, ChunkState::Copying) {
                return Some(c);
            }
        }
        None
    }

    /// AIMD on the streams' own device latency, and the drain rate for pacing.
    fn adapt(&mut self, now: u64) {
        let window = clock::duration_to_ticks(WINDOW);
        if now - self.win_start < window {
            return;
        }
        let elapsed = now - self.win_start;
        if self.win_n > 0 && self.job.tuning.adaptive {
            let mean = self.win_sum / self.win_n;
            // The reference is the best recent window: it follows the load up
            // slowly (2% a window, doubling in ~175 ms) so that one quiet moment
            // does not pin the budget at the floor for the rest of the job.
            self.best_lat = self.best_lat.saturating_add(self.best_lat / 50).min(mean);
            let max = self.job.tuning.max_queue_depth.max(1);
            if mean > self.best_lat.saturating_mul(2) {
                // The devices are queueing behind someone: back off.
                self.budget = (self.budget / 2).max(1);
            } else if self.budget < max {
                self.budget += 1;
            }
        }
        self.job
            .counters
            .budget
            .store(self.budget as u64, Ordering::Relaxed);
        // Pacing: admit captures at the rate the drain frees slots.
        let interval = elapsed.checked_div(self.drained_in_window).unwrap_or(0);
        self.job.admit_interval.store(interval, Ordering::Relaxed);
        self.win_sum = 0;
        self.win_n = 0;
        self.win_start = now;
        self.drained_in_window = 0;
    }
}
