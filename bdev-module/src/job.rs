//! A backup job: its shared state and the streams that copy and drain.
//!
//! [`JobShared`] is what every core sees: the chunk map, the container's free
//! slots, the queue of saved chunks waiting to drain, pacing state and the
//! statistics, all atomics or lock-free queues. `Streams` runs on the job's
//! home reactor as one poller: it drains saved chunks from the container to
//! the target and copies pending chunks from the source to the target, within
//! a budget of bytes in flight that an AIMD controller adapts to the latency
//! hosts see on the source (the foreground meter of [`crate::vbdev`]), with
//! drain taking priority as the container fills.
//!
//! # Scheduling against foreground load
//! Before the consistency point the channels measure the hosts' I/O latency
//! for a short calibration window: the no-backup level, `ref`. Every window
//! (5 ms) after that the streams compare the hosts' latency with it:
//!
//! * above `ref` × [`JobTuning::fg_tolerance`] ([`FG_TOLERANCE`] by default): the budget shrinks by a third
//!   (multiplicative decrease), never below the floor that guarantees
//!   progress: one unit in flight for [`JobTuning::min_share`] of the time
//!   (a quarter by default; below one unit the streams keep one op in flight
//!   and then idle for the rest of the duty cycle);
//! * otherwise it grows by a sixteenth (at least a sixteenth of a unit) up
//!   to `max_queue_depth` copy runs; with no host I/O at all it doubles.
//!
//! The unit is [`BUDGET_UNIT_BYTES`] (64 KiB), or one chunk when chunks are
//! larger, so that the budget means the same bytes in flight whatever the
//! chunk size.
//!
//! A host at a fixed queue depth gets IOPS inversely proportional to its
//! latency, so holding latency within 1.1× of the no-backup level holds
//! IOPS above 0.9× of it, as far as the streams are concerned. If the
//! latency stays high with the budget at the floor, the load has changed
//! and it is not the streams' doing: after 200 ms `ref` starts to rise, 1%
//! every 50 ms. Copy runs
//! are cut to the budget, so at a small budget the streams issue small I/Os
//! that do not park a host's write behind a megabyte of transfer.
//!
//! Drain shares the budget and goes first. Once the container passes its
//! soft watermark, writers that need a slot are being paced, and drain
//! keeps chunks in flight regardless of the budget: the credits slow the
//! writers that fill the container, and draining it is what frees them.
//! How many is a second controller's: on a device shared with hosts that
//! do not fill the container (bystanders, see [`crate::vbdev`]: writers
//! outside the scope, or whose chunks are saved), each drain is a
//! chunk-sized write they queue behind, so every window the pressed drain
//! depth shrinks by a third (to one) while the bystanders' latency is over
//! [`JobTuning::fg_tolerance`] × their own no-backup level, and grows by one
//! (to [`JobTuning::pressed_drain_depth`], 16 by default) while it is not,
//! or at once when there are no bystanders. The writers that fill the
//! container are then the ones paced harder, which is the point of per
//! submitter pacing: the writer causing the pressure is the one slowed.
//!
//! # Copying ahead of captures
//! The budget above prices copy I/O by the latency it adds for hosts. That
//! leaves out what a pending chunk costs when a writer reaches it first:
//! its capture is a chunk-sized read at a random place and, through the
//! container, a chunk-sized write at a random place, while the same chunk
//! copied in a run is a small share of one run's read and write. Under
//! skewed writes the budget sits at its floor while writers keep capturing
//! the cold space chunk by chunk, so the backup pays the dear price for
//! most of the volume, and for longer. With
//! [`JobTuning::copy_per_capture`] = k, every chunk a writer forces into
//! the container earns the copy stream up to k chunks, copied in runs of
//! up to [`CREDIT_RUN_BYTES`] outside the budget: at most
//! [`CREDIT_RUNS`] in flight (credit they cannot use is dropped), and no
//! more than the pressed drain's depth, which the bystanders' latency
//! sets (above), whether the container is pressed or not; while it is
//! pressed they also leave the drain a buffer; none under a manual rate
//! limit. (Bounded by the drain's depth only while pressed, these runs
//! cost an out-of-scope writer 0.932 of its IOPS against 0.962 with the
//! bound, and the uniform writer 0.557 against 0.608: docs/BENCHMARKS.md,
//! session 15.) Such runs
//! are shorter than the budget's longest, because a writer that reaches a
//! chunk of one waits for the whole read. The copying follows the
//! captures: when writers stop forcing chunks, it stops.
//!
//! With [`JobTuning::copy_near_writers`] (the default) these runs start at
//! the pending chunk the last arriving write reached ([`JobShared::wanted`]:
//! a relaxed store when a write arrives at a pending chunk other than the
//! one recorded, not when held writes are retried; in a cache line of its
//! own) and go on from there for up to [`CREDIT_RUNS`] runs' worth of
//! chunks, then from the copy cursor until a write reaches a new chunk.
//! Prioritised ranges still go first. Writers that keep to a region (a hot
//! set, a file being rewritten) get its chunks copied in runs before they
//! force them one by one, and a writer held at the soft watermark can be
//! freed by a copy of its own chunk rather than by a slot. Under uniform
//! writes the runs land at random places, which cost this kind of device
//! about what runs from the cursor do. Measured against runs from the
//! cursor (docs/BENCHMARKS.md, session 12): under skewed writes p99 fell
//! (1.42× against 1.59×, 22 seed pairs) and the backup took longer (7.9 s
//! against 6.0 s); under uniform writes p99 fell a little (1.99× against
//! 2.11×); the IOPS ratios moved within the noise.
//!
//! # Reading ahead while hosts are idle
//! A copy run is a read from the source and then a write to the target
//! with the same buffer. A source in memory (`malloc`) does its read as a
//! memcpy on this reactor, so when a burst of target writes completes, the
//! freed buffers would go back to the target only after one memcpy each,
//! one after another, and the target would run short of writes for that
//! long. While hosts are idle (no host I/O in the last window) the streams
//! keep [`lookahead_runs`] more buffers than the budget, filled ahead: a
//! copy read whose write would take the target's copy writes past the
//! budget waits, read, in a queue, and a completed target write is replaced
//! from that queue before any new read. The target's writes are entered
//! into the kernel before the next reads run. With hosts active there is no
//! read-ahead: the budget bounds reads and writes together as before. A
//! source whose memory can be lent skips the reads instead (next section).
//!
//! # Writing straight from a source in memory
//! When the source's blocks live in memory (a `malloc` bdev lends them, see
//! [`hotcopy_bdev::MemoryWindow`]) and the target stores runs verbatim (a
//! raw image, [`BackupTarget::place_verbatim`]), a copy run needs no read
//! at all while hosts are idle: its target write is issued straight from
//! the source's memory, and its chunks stay `Copying` (writers wait, as for
//! a read in flight) until that write has landed, then become `Done`. This
//! takes the memcpy, and the memory bandwidth it costs the target's DMA,
//! off the backup; such runs are counted in `zero_copy_runs`. At most
//! [`IDLE_LENT_DEPTH`] × `max_queue_depth` of them are in flight, within
//! that many times the budget: the streams run on one reactor, and on a
//! fast disk one submitter at the streams' depth kept 3289–4234 MiB/s
//! where two (the bench's ceiling) kept 6276–6620 and one at twice the
//! depth 5508–6304 (docs/BENCHMARKS.md, session 14). Once hosts
//! are active again (the next window) new runs are read into a buffer as
//! before, so that writers wait for a memcpy, not for a target write; the
//! lent runs already in flight finish first, and the first writers may
//! wait for them.
//!
//! The target reads a lent run's bytes until its write completes, so its
//! writers must wait even if the job ends first (cancelled, or failed
//! elsewhere): the job counts its lent writes in flight
//! (`JobShared::lent_writes`), a cow channel keeps an ended job while any
//! is, and holds writes to its `Copying` chunks until they have landed.
//! A stream announces a lent write before it checks once more that the job
//! is running (both `SeqCst`), so a writer that sees the job ended also
//! sees every lent write that will be issued.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam::channel::{Receiver, TryRecvError};
use crossbeam::queue::ArrayQueue;
use crossbeam::utils::CachePadded;
use hotcopy_bdev::{BdevChannel, BdevDesc, BdevIo, IoStatus, MemoryWindow};
use hotcopy_runtime::sys::PAGE_SIZE;
use hotcopy_runtime::{clock, BufferPool, DmaBuf, HugepageMode};
use serde::Serialize;

use crate::chunk_map::{ChunkMap, ChunkState};
use crate::scope::ScopeSummary;
use crate::target::{BackupTarget, CommitInfo, TargetError};
use crate::vbdev::FgMeter;

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
    /// Of `chunks_copied`, those copied outside the budget, paid by captures.
    pub chunks_copied_ahead: AtomicU64,
    /// Of those, the chunks of runs that started near the writers
    /// ([`JobTuning::copy_near_writers`]).
    pub chunks_copied_near: AtomicU64,
    /// Most copy runs paid by captures in flight at once.
    pub copy_ahead_peak: AtomicU64,
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
    /// The streams' budget, in sixteenths of a [`BUDGET_UNIT_BYTES`] unit
    /// (or a chunk, if larger) in flight.
    pub budget: AtomicU64,
    /// Hosts' latency in the last window, and the no-backup reference (ticks; 0: unknown).
    pub fg_lat_ticks: AtomicU64,
    pub fg_ref_ticks: AtomicU64,
    /// Bystanders' latency over their own no-backup level in the last
    /// window that measured it, in thousandths (0: none measured), and the
    /// drain depth while pressed.
    pub bystander_milli: AtomicU64,
    pub drain_depth: AtomicU64,
    /// Ticks the target's final flush took (0 until it completes).
    pub target_flush_ticks: AtomicU64,
    /// Copy runs whose target write waited for another to end (read ahead).
    pub read_ahead_runs: AtomicU64,
    /// Copy runs written to the target straight from the source's memory.
    pub zero_copy_runs: AtomicU64,
}

/// Requests from the control path to the streams.
#[derive(Default)]
pub(crate) struct ControlQueue {
    pub prioritize: VecDeque<(u64, u64)>,
}

/// How the job behaves.
#[derive(Debug, Clone)]
pub struct JobTuning {
    /// Most stream I/Os in flight at once (copy + drain); copy I/Os are up to
    /// 1 MiB, so the largest budget is this many megabytes in flight (while
    /// hosts are idle, [`IDLE_LENT_DEPTH`] times as many runs written from a
    /// source's memory, or a few runs read ahead).
    pub max_queue_depth: u32,
    /// Copy-stream rate limit in bytes per second (0: none).
    pub rate_limit: u64,
    /// Container fill (0..1) above which writers that need a slot are paced.
    pub soft_watermark: f64,
    /// Adapt the stream budget to the hosts' latency (AIMD); off: always the full budget.
    pub adaptive: bool,
    /// The progress guarantee: the least share of time (0..=1) the streams
    /// keep a chunk in flight, however loaded the hosts are.
    pub min_share: f64,
    /// Hosts' latency, relative to their no-backup level, above which the
    /// streams back off (default [`FG_TOLERANCE`]).
    pub fg_tolerance: f64,
    /// Most drain I/Os kept in flight, whatever the budget, while the
    /// container is past its soft watermark (default 16, the streams' full
    /// depth). Draining is what frees the paced writers, but every drain is
    /// a chunk-sized write on a device that other hosts may share: the
    /// streams go below this while bystanders' latency is over the
    /// tolerance (see the module docs), and a smaller maximum protects them
    /// further at the price of pacing the writers that fill the container
    /// harder. The copy runs paid by captures keep within the same depth,
    /// pressed or not (at most [`CREDIT_RUNS`] of them).
    pub pressed_drain_depth: u32,
    /// Chunks (at most) the copy stream moves, outside its budget, for
    /// every chunk a writer's first write forces into the container (0:
    /// none; [`DEFAULT_COPY_PER_CAPTURE`] by default; see the module docs,
    /// "Copying ahead of captures").
    pub copy_per_capture: f64,
    /// Where those copies go: from the chunk writers last reached (on:
    /// the default), or in order from the copy cursor (off). Measured
    /// against off under skewed and uniform saturating writes
    /// (docs/BENCHMARKS.md, session 12): p99 lower in 14 of 22 and 8 of 12
    /// seed pairs, the IOPS ratios within the noise, and the skewed
    /// backups longer (7.9 s against 6.0 s at the median).
    pub copy_near_writers: bool,
}

impl Default for JobTuning {
    fn default() -> Self {
        JobTuning {
            max_queue_depth: 16,
            rate_limit: 0,
            soft_watermark: 0.5,
            adaptive: true,
            min_share: 0.25,
            fg_tolerance: FG_TOLERANCE,
            pressed_drain_depth: 16,
            copy_per_capture: DEFAULT_COPY_PER_CAPTURE,
            copy_near_writers: true,
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
    /// The pending chunk the last arriving write reached ([`NO_CHUNK`]:
    /// none yet), where the copies ahead of captures start (module docs).
    /// Padded: every core writes it, and it must not share a line with
    /// the fields every write reads.
    pub(crate) wanted: CachePadded<AtomicU64>,
    /// Copy runs being written to the target from the source's own memory.
    /// While any is, writes to `Copying` chunks wait even after the job has
    /// ended (the target is still reading those bytes): see the module
    /// docs. Updated and read with `SeqCst`, as the job state is.
    pub(crate) lent_writes: AtomicU64,
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
    /// The cow bdev's foreground meter.
    pub fg: Arc<FgMeter>,
    /// The generation the target committed (0: none, or not a repository).
    pub generation: AtomicU64,
    /// Chunks the job copies: the scope's, less those an incremental found
    /// unchanged at the consistency point.
    pub in_scope: AtomicU64,
    /// Change tracking marks taken at the consistency point (given back if
    /// the job does not complete).
    pub(crate) changed: Mutex<Option<Vec<u64>>>,
    /// Per channel (by name): writes forwarded to the source before the
    /// consistency point. Recorded while the source is frozen.
    pub t0_writes: Mutex<Vec<(String, u64)>>,
    /// The granules whose writes of the consistency point were still in
    /// flight when it was taken (see [`crate::fence`]).
    pub fence: Arc<crate::fence::FenceTable>,
}

impl JobShared {
    #[inline]
    pub fn state(&self) -> JobState {
        // SeqCst with `finish` and `lent_writes` (see `Streams::write_lent`).
        JobState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Ends the job (first caller wins); returns whether this call ended it.
    pub(crate) fn finish(&self, state: JobState, error: Option<String>) -> bool {
        let won = self
            .state
            .compare_exchange(
                JobState::Running as u8,
                state as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
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

    /// A copy run's chunks leave `Copying` (their T0 content is safe in a
    /// buffer or on the target): writers to them may pass.
    fn leave_copying(&self, op: &Op) {
        for c in op.chunk..op.chunk + op.count {
            let moved = self
                .map
                .transition(c, ChunkState::Copying, ChunkState::Copied);
            debug_assert!(moved, "only the copy stream moves a Copying chunk");
        }
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
    FlushSource,
    CopyRead,
    CopyWrite,
    /// A copy run's target write from the source's own memory (no read).
    LentWrite,
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
    /// Chunks this op holds of the budget (0: a copy run outside the
    /// budget, paid by captures).
    weight: u32,
    /// When the op (or the read that led to it) was issued.
    start: u64,
    /// A copy run outside the budget that started near the writers.
    near: bool,
}

/// Largest copy I/O: consecutive pending chunks are copied together up to this.
pub const COPY_RUN_BYTES: u64 = 1 << 20;

/// [`JobTuning::copy_per_capture`] by default: measured against 0 under
/// uniform and skewed saturating writes (docs/BENCHMARKS.md, session 11),
/// it halved the backup's length and, under uniform writes, the work the
/// writers lost, with their IOPS ratios about the same and p99 within 0.15
/// of it either way.
pub const DEFAULT_COPY_PER_CAPTURE: f64 = 4.0;

/// Most copy runs in flight outside the budget, paid by captures, and
/// their largest size: a writer that reaches a chunk of such a run waits
/// for the whole read, so they are kept shorter than budgeted runs. Fewer
/// while the bystanders' drain depth is lower (module docs).
pub const CREDIT_RUNS: u32 = 4;
const CREDIT_RUN_BYTES: u64 = 256 << 10;

/// No chunk (see [`JobShared::wanted`]).
pub(crate) const NO_CHUNK: u64 = u64::MAX;

/// Copy runs read ahead of the target's writes while hosts are idle: half
/// the streams' queue depth (see the module docs).
pub fn lookahead_runs(queue_depth: usize) -> usize {
    queue_depth.div_ceil(2)
}

/// While hosts are idle, runs written straight from the source's memory
/// may be this many times the streams' queue depth deep: one submitting
/// reactor at the streams' depth reached about 50–65% of the target's
/// ceiling on a fast disk (session 14), at twice that depth 85–100% (see
/// the module docs, "Writing straight from a source in memory").
pub const IDLE_LENT_DEPTH: usize = 2;

/// The streams' budget is counted in units of this many bytes (or of one
/// chunk, when chunks are larger), so that the controller's floor, its
/// steps and its ceiling mean the same bytes in flight whatever the chunk
/// size: with 16 KiB chunks one unit is four chunks.
pub const BUDGET_UNIT_BYTES: u64 = 64 << 10;

/// Ticks between AIMD/pacing updates.
const WINDOW: Duration = Duration::from_millis(5);

/// Hosts' latency, relative to the no-backup level, above which the streams back off.
pub const FG_TOLERANCE: f64 = 1.1;

/// Fewest host completions in a window for its latency to count.
const FG_MIN_SAMPLES: u64 = 8;

enum Phase {
    Running,
    Flushing,
    /// The target's commit runs on a thread of its own (its metadata I/O
    /// is synchronous: the index, the catalog, the superblock and their
    /// flushes would hold the reactor, and every host I/O on it, for that
    /// long); the streams poll for its outcome.
    Committing(Receiver<Result<Option<u64>, TargetError>>),
    Done,
}

/// The copy and drain streams of one job, run by a poller on its home reactor.
pub(crate) struct Streams {
    job: Arc<JobShared>,
    src: BdevChannel,
    /// The source's memory, when it can lend it (zero-copy runs).
    src_mem: Option<MemoryWindow>,
    tgt: BdevChannel,
    cont: BdevChannel,
    bufs: Vec<DmaBuf>,
    /// The most lent-buffer target writes in flight (`JobShared::lent_writes`).
    max_lent_ops: u64,
    /// Copy runs read and waiting for their target write (read-ahead), with
    /// the source blocks each holds; their chunks count in `inflight_chunks`.
    ready: VecDeque<(Op, u64, DmaBuf)>,
    /// Chunks of copy runs being written to the target.
    writing_chunks: u32,
    /// Chunks the copy stream may read beyond the budget while hosts are idle.
    ahead_chunks: u32,
    /// No host I/O in the last window (read-ahead allowed).
    hosts_idle: bool,
    /// Writes were submitted to the target since it was last polled.
    tgt_queued: bool,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    /// Completions of one pass (kept to reuse its allocation).
    completed: Vec<BdevIo>,
    cursor: u64,
    prio: VecDeque<(u64, u64)>,
    /// Chunks passed over while fenced, to come back to.
    deferred: VecDeque<u64>,
    phase: Phase,
    /// The source flush of the consistency point is still to be submitted.
    flush_source: bool,
    /// Budget in sixteenths of a unit ([`BUDGET_UNIT_BYTES`], `unit_chunks`
    /// chunks) in flight (below 16: one unit at a time, idle between ops for
    /// the rest of the duty cycle), the largest budget, use in chunks, and
    /// the most a copy run may cover.
    budget_q: u32,
    max_budget_q: u32,
    paused_until: u64,
    inflight_chunks: u32,
    run_chunks: u32,
    unit_chunks: u32,
    /// Foreground meter reading at the start of the window, the no-backup
    /// reference latency (ticks; 0: not known yet), and how many windows in a
    /// row the hosts were above it with the budget at its floor.
    fg_prev: (u64, u64),
    fg_ref: u64,
    ref_calibrated: bool,
    floor_windows: u32,
    /// Bystanders' meter reading at the start of their window, windows in a
    /// row without a bystander completion, and the drain depth while
    /// pressed.
    by_prev: (u64, u64, u64),
    by_idle_windows: u32,
    drain_depth: u32,
    win_start: u64,
    /// Drain rate measurement for pacing.
    drained_in_window: u64,
    /// Rate limit: bytes the copy stream may have issued so far.
    rate_start: u64,
    rate_issued: u64,
    tick_us: f64,
    /// Copying ahead of captures: captures counted so far, chunks earned
    /// and not yet copied, and such copy runs in flight.
    saved_seen: u64,
    credit: f64,
    credit_runs: u32,
    /// The last [`JobShared::wanted`] seen, and the chunks from it still to
    /// look at for copies ahead: `near..near_end`.
    wanted_seen: u64,
    near: u64,
    near_end: u64,
}

impl Streams {
    /// How many stream buffers `job` needs, and of what size.
    fn buffer_shape(job: &JobShared) -> (usize, usize) {
        let qd = job.tuning.max_queue_depth.max(1) as usize;
        let chunk_bytes = job.chunk_blocks * job.block_size;
        let bytes = chunk_bytes.max(COPY_RUN_BYTES) as usize;
        (bytes, qd + lookahead_runs(qd))
    }

    /// The streams' buffers, in one region (transparent huge pages from
    /// 2 MiB). Made on the control thread, before the streams move to their
    /// reactor: mapping and populating tens of MiB takes milliseconds that
    /// a reactor would take from its hosts' I/O.
    pub(crate) fn buffers(job: &JobShared) -> Result<BufferPool, String> {
        let (bytes, nbufs) = Self::buffer_shape(job);
        BufferPool::new(
            bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE,
            nbufs,
            HugepageMode::Auto,
        )
        .map_err(|e| format!("stream buffers: {e}"))
    }

    pub(crate) fn new(
        job: Arc<JobShared>,
        pool: BufferPool,
        src: BdevChannel,
        src_mem: Option<MemoryWindow>,
        tgt: BdevChannel,
        cont: BdevChannel,
    ) -> Result<Streams, String> {
        let qd = job.tuning.max_queue_depth.max(1) as usize;
        let chunk_bytes = job.chunk_blocks * job.block_size;
        let (bytes, nbufs) = Self::buffer_shape(&job);
        let ahead = lookahead_runs(qd);
        let bufs = (0..nbufs)
            .map(|_| pool.get(bytes))
            .collect::<Option<Vec<_>>>()
            .ok_or("stream buffers: the pool is smaller than the streams need")?;
        let run_chunks = if job.target.contiguous() {
            (COPY_RUN_BYTES / chunk_bytes).max(1) as u32
        } else {
            1
        };
        let unit_chunks = (BUDGET_UNIT_BYTES / chunk_bytes).max(1) as u32;
        let max_budget_q = qd as u32 * (run_chunks / unit_chunks).max(1) * 16;
        let now = clock::ticks();
        let fg_ref = job.counters.fg_ref_ticks.load(Ordering::Relaxed);
        // Buffered ops, lent writes, and the two flushes.
        let nops = nbufs + IDLE_LENT_DEPTH * qd + 2;
        Ok(Streams {
            // Start small when hosts are busy; the controller opens up fast
            // if they are not.
            budget_q: if job.tuning.adaptive && fg_ref > 0 {
                16
            } else {
                max_budget_q
            },
            max_budget_q,
            paused_until: 0,
            inflight_chunks: 0,
            run_chunks,
            unit_chunks,
            ops: (0..nops).map(|_| None).collect(),
            free_ops: (0..nops).rev().collect(),
            completed: Vec::with_capacity(nops),
            max_lent_ops: (IDLE_LENT_DEPTH * qd) as u64,
            bufs,
            ready: VecDeque::with_capacity(nbufs),
            writing_chunks: 0,
            ahead_chunks: ahead as u32 * run_chunks,
            hosts_idle: job.tuning.adaptive && fg_ref == 0,
            tgt_queued: false,
            cursor: 0,
            prio: VecDeque::new(),
            deferred: VecDeque::new(),
            phase: Phase::Running,
            flush_source: true,
            fg_prev: job.fg.read(),
            fg_ref,
            ref_calibrated: fg_ref > 0,
            floor_windows: 0,
            by_prev: job.fg.read_bystanders(),
            by_idle_windows: 0,
            drain_depth: job.tuning.pressed_drain_depth.max(1),
            win_start: now,
            drained_in_window: 0,
            rate_start: now,
            rate_issued: 0,
            tick_us: clock::ticks_per_us(),
            saved_seen: job.counters.chunks_saved.load(Ordering::Relaxed),
            credit: 0.0,
            credit_runs: 0,
            wanted_seen: NO_CHUNK,
            near: 0,
            near_end: 0,
            // Lend only what the target writes as it is, in whole pages.
            src_mem: src_mem.filter(|m| {
                m.block_size() == job.block_size
                    && chunk_bytes.is_multiple_of(PAGE_SIZE as u64)
                    && job.target.place_verbatim(0, 1).is_some()
            }),
            job,
            src,
            tgt,
            cont,
        })
    }

    pub(crate) fn job(&self) -> &Arc<JobShared> {
        &self.job
    }

    pub(crate) fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn inflight(&self) -> usize {
        self.ops.len() - self.free_ops.len()
    }

    /// Takes an op slot for `count` chunks from `chunk` (drain ops: one).
    #[allow(clippy::too_many_arguments, reason = "the fields of one op")]
    fn start_op(
        &mut self,
        kind: OpKind,
        chunk: u64,
        count: u64,
        slot: u32,
        weight: u32,
        start: u64,
    ) -> usize {
        let i = self.free_ops.pop().expect("budget keeps a free op");
        self.inflight_chunks += weight;
        self.ops[i] = Some(Op {
            kind,
            chunk,
            count,
            slot,
            weight,
            start,
            near: false,
        });
        i
    }

    /// Chunks the streams may have in flight now (outside forced drains).
    #[inline]
    fn cap_chunks(&self, now: u64) -> u32 {
        if now < self.paused_until {
            0
        } else {
            self.budget_chunks()
        }
    }

    /// The budget in chunks, duty cycle aside.
    #[inline]
    fn budget_chunks(&self) -> u32 {
        (self.budget_q / 16).max(1) * self.unit_chunks
    }

    /// Sends read-ahead copy runs to the target while its copy writes are
    /// within the budget, oldest first.
    fn flush_ready(&mut self) {
        while self.writing_chunks < self.budget_chunks() {
            let Some((op, blocks, buf)) = self.ready.pop_front() else {
                break;
            };
            self.inflight_chunks -= op.weight;
            self.write_to_target(OpKind::CopyWrite, &op, blocks, buf);
        }
    }

    /// After an op ends under a budget below one chunk, idle long enough that
    /// the streams are busy `budget_q`/16 of the time.
    #[inline]
    fn duty_pause(&mut self, op_start: u64, now: u64) {
        if self.budget_q < 16 {
            let busy = now.saturating_sub(op_start);
            let q = self.budget_q.max(1) as u64;
            self.paused_until = now + busy * (16 - q) / q;
        }
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
        // This enters whatever was queued for the target so far.
        self.tgt_queued = false;
        work += self.tgt.poll(&mut |io| completed.push(io));
        work += self.cont.poll(&mut |io| completed.push(io));
        for io in completed.drain(..) {
            self.complete(io, now);
        }
        // Hand the target the writes just queued before this pass's reads
        // (a memory source's read is a memcpy on this reactor).
        if std::mem::take(&mut self.tgt_queued) {
            work += self.tgt.poll(&mut |io| completed.push(io));
            for io in completed.drain(..) {
                self.complete(io, now);
            }
        }
        self.completed = completed;
        // Once the commit has begun the job's outcome is the commit's.
        if self.job.cancel.load(Ordering::Relaxed) && !matches!(self.phase, Phase::Committing(_)) {
            self.job
                .finish(JobState::Cancelled, Some("cancelled".into()));
        }
        self.adapt(now);
        match &self.phase {
            Phase::Running => {
                if self.job.state().is_finished() {
                    // Read-ahead runs are not written once the job has ended.
                    self.ready.clear();
                    if self.inflight() == 0 {
                        // Failed or cancelled: the target drops what it began.
                        let why = self.job.error().unwrap_or_else(|| "ended".into());
                        self.job.target.abort(&why);
                        self.phase = Phase::Done;
                    }
                    return work;
                }
                if self.flush_source && !self.job.fence.active() {
                    // Covers every write of the consistency point: those in
                    // flight at the freeze have landed (the fence is empty).
                    self.flush_source = false;
                    let i = self.start_op(OpKind::FlushSource, 0, 0, 0, 0, now);
                    self.src.submit(BdevIo::flush(i as u64));
                    work += 1;
                }
                work += self.issue(now);
                let c = &self.job.counters;
                let settled = c.chunks_done.load(Ordering::Acquire)
                    >= self.job.in_scope.load(Ordering::Acquire);
                if settled && self.inflight() == 0 && !self.flush_source {
                    // Everything is on the target: make it durable.
                    let i = self.start_op(OpKind::FlushTarget, 0, 0, 0, 0, now);
                    self.tgt.submit(BdevIo::flush(i as u64));
                    self.phase = Phase::Flushing;
                }
            }
            Phase::Flushing => {}
            Phase::Committing(rx) => match rx.try_recv() {
                Ok(r) => {
                    self.committed(r);
                    work += 1;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    // The commit thread ended without an answer (it panicked).
                    self.committed(Err(TargetError::Commit {
                        target: self.job.target.describe(),
                        why: "the commit thread stopped without an outcome".into(),
                    }));
                }
            },
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
        self.inflight_chunks -= op.weight;
        let ok = io.status == IoStatus::Success;
        let buf = io.take_buf();
        let job = self.job.clone();
        match op.kind {
            OpKind::FlushSource => {
                if !ok {
                    self.fail(format!(
                        "flushing the source at the consistency point: {:?}",
                        io.status
                    ));
                }
            }
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
                job.leave_copying(&op);
                if op.weight == 0
                    || (self.ready.is_empty() && self.writing_chunks < self.budget_chunks())
                {
                    self.write_to_target(OpKind::CopyWrite, &op, io.num_blocks, buf);
                } else {
                    // Read ahead (or the budget shrank while it read): its
                    // write waits for one in flight to end.
                    self.inflight_chunks += op.weight;
                    job.counters.read_ahead_runs.fetch_add(1, Ordering::Relaxed);
                    self.ready.push_back((op, io.num_blocks, buf));
                }
            }
            OpKind::CopyWrite => {
                self.writing_chunks -= op.weight;
                if let Some(b) = buf {
                    self.bufs.push(b);
                }
                if !ok {
                    return self.fail(format!(
                        "writing chunk {} to the target: {:?}",
                        op.chunk, io.status
                    ));
                }
                self.copied(&op, now);
                self.flush_ready();
            }
            OpKind::LentWrite => {
                self.writing_chunks -= op.weight;
                // A window onto the source: dropping it gives nothing back.
                drop(buf);
                if !ok {
                    // The target is done with the bytes: with the job failed,
                    // the chunks' writers may go.
                    job.lent_writes.fetch_sub(1, Ordering::SeqCst);
                    return self.fail(format!(
                        "writing chunk {} to the target: {:?}",
                        op.chunk, io.status
                    ));
                }
                // Landed: the chunks' T0 content is on the target now.
                job.leave_copying(&op);
                job.lent_writes.fetch_sub(1, Ordering::SeqCst);
                self.copied(&op, now);
                self.flush_ready();
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
                self.write_to_target(OpKind::DrainWrite, &op, job.chunk_len(op.chunk), buf);
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
                self.drained(&op, now);
            }
            OpKind::FlushTarget => {
                job.counters
                    .target_flush_ticks
                    .store(now.saturating_sub(op.start).max(1), Ordering::Relaxed);
                if !ok {
                    // The last op: end here, or the streams would wait in
                    // `Flushing` for ever and the job never be uninstalled.
                    let why = format!("flushing the target: {:?}", io.status);
                    self.fail(why.clone());
                    job.target.abort(&why);
                    self.phase = Phase::Done;
                    return;
                }
                if job.state().is_finished() {
                    // Cancelled (or failed) while the target flushed: the
                    // generation is not committed.
                    let why = job.error().unwrap_or_else(|| "ended".into());
                    job.target.abort(&why);
                    self.phase = Phase::Done;
                    return;
                }
                let info = CommitInfo {
                    source: job.source.clone(),
                    chunk_bytes: job.chunk_blocks * job.block_size,
                    chunks_total: job.map.len(),
                    chunks_copied: job.counters.chunks_done.load(Ordering::Relaxed),
                    consistency_point_us: job.consistency_point_us.load(Ordering::Relaxed),
                };
                // Once per job, not per I/O: a thread for the commit.
                let (tx, rx) = crossbeam::channel::bounded(1);
                let target = job.target.clone();
                let commit_info = info.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("hotcopy-commit-{}", job.id))
                    .spawn(move || {
                        let _ = tx.send(target.commit(&commit_info));
                    });
                match spawned {
                    Ok(_) => self.phase = Phase::Committing(rx),
                    // No thread to be had: commit here, holding the reactor.
                    Err(_) => {
                        let r = job.target.commit(&info);
                        self.committed(r);
                    }
                }
            }
        }
    }

    /// The target's commit ended: the job completes, or fails and the
    /// target drops the generation.
    fn committed(&mut self, r: Result<Option<u64>, TargetError>) {
        let job = self.job.clone();
        match r {
            Ok(gen) => {
                if let Some(g) = gen {
                    job.generation.store(g, Ordering::Relaxed);
                }
                job.finish(JobState::Complete, None);
            }
            Err(e) => {
                self.fail(e.to_string());
                job.target.abort(&e.to_string());
            }
        }
        self.phase = Phase::Done;
    }

    /// Writes what `op` read (`blocks` source blocks in `buf`) to the target,
    /// where the target places it: the second half of a copy or a drain.
    fn write_to_target(&mut self, kind: OpKind, op: &Op, blocks: u64, mut buf: DmaBuf) {
        let job = self.job.clone();
        let valid = (blocks * job.block_size) as usize;
        // Whole chunks: the tail of the source's last chunk is padding.
        let whole = (op.count * job.chunk_blocks * job.block_size) as usize;
        buf.set_len(whole.max(valid));
        let placed = job.target.place(op.chunk, op.count, &mut buf, valid);
        match placed {
            Err(e) => {
                self.bufs.push(buf);
                self.fail(format!("placing chunk {} on the target: {e}", op.chunk));
            }
            Ok(None) => {
                // Recorded without data (zeros, or shared with the parent).
                self.bufs.push(buf);
                match kind {
                    OpKind::CopyWrite => self.copied(op, clock::ticks()),
                    _ => self.drained(op, clock::ticks()),
                }
            }
            Ok(Some((lba, bytes))) => {
                buf.set_len(bytes);
                let tb = self.tgt.block_size() as u64;
                if kind == OpKind::CopyWrite {
                    self.writing_chunks += op.weight;
                }
                let j = self.start_op(kind, op.chunk, op.count, op.slot, op.weight, op.start);
                if let Some(w) = self.ops[j].as_mut() {
                    w.near = op.near;
                }
                self.tgt
                    .submit(BdevIo::write(lba, bytes as u64 / tb, buf, j as u64));
                self.tgt_queued = true;
            }
        }
    }

    /// A copy run is on the target.
    fn copied(&mut self, op: &Op, now: u64) {
        let job = &self.job;
        for c in op.chunk..op.chunk + op.count {
            job.map.transition(c, ChunkState::Copied, ChunkState::Done);
        }
        let bytes = (op.count * job.chunk_blocks)
            .min(job.num_blocks - (op.chunk << job.chunk_shift))
            * job.block_size;
        job.counters
            .chunks_copied
            .fetch_add(op.count, Ordering::Relaxed);
        job.counters
            .bytes_copied
            .fetch_add(bytes, Ordering::Relaxed);
        job.counters
            .chunks_done
            .fetch_add(op.count, Ordering::Release);
        if op.weight == 0 {
            self.credit_runs -= 1;
            job.counters
                .chunks_copied_ahead
                .fetch_add(op.count, Ordering::Relaxed);
            if op.near {
                job.counters
                    .chunks_copied_near
                    .fetch_add(op.count, Ordering::Relaxed);
            }
        } else {
            self.duty_pause(op.start, now);
        }
    }

    /// A drained chunk is on the target: only now may its slot be reused.
    fn drained(&mut self, op: &Op, now: u64) {
        let job = &self.job;
        job.map
            .transition(op.chunk, ChunkState::Saved, ChunkState::Done);
        job.container.give_back(op.slot);
        job.counters.chunks_drained.fetch_add(1, Ordering::Relaxed);
        job.counters
            .bytes_drained
            .fetch_add(job.chunk_len(op.chunk) * job.block_size, Ordering::Relaxed);
        job.counters.chunks_done.fetch_add(1, Ordering::Release);
        self.drained_in_window += 1;
        self.duty_pause(op.start, now);
    }

    /// Issues drain first, then copy, within the budget.
    fn issue(&mut self, now: u64) -> usize {
        let job = self.job.clone();
        let mut issued = 0;
        let fill = job.container.used();
        // Past the soft watermark writers are paced: drain at least at the
        // pressed depth, whatever the budget. Below it, drain goes first
        // within the budget.
        let pressed = fill >= job.soft_slots;
        // Idle hosts: write straight from a source in memory, as deep as
        // [`IDLE_LENT_DEPTH`] allows, or else read ahead of the target's
        // writes (module docs). Drain shares the deeper cap, so that it
        // still goes first.
        let lend = self.hosts_idle && self.src_mem.is_some();
        let cap = self.cap_chunks(now);
        let cap = match (self.hosts_idle && cap > 0, lend) {
            (true, true) => cap * IDLE_LENT_DEPTH as u32,
            (true, false) => cap + self.ahead_chunks,
            (false, _) => cap,
        };
        let drain_cap = if pressed {
            cap.max(self.drain_depth)
        } else {
            cap
        };
        while !self.bufs.is_empty() && self.inflight_chunks < drain_cap {
            let Some((chunk, slot)) = job.saved.pop() else {
                break;
            };
            let mut buf = self.bufs.pop().expect("checked non-empty");
            let slot_bytes = job.container.slot_blocks * self.cont.block_size() as u64;
            buf.set_len(slot_bytes as usize);
            let i = self.start_op(OpKind::DrainRead, chunk, 1, slot, 1, now);
            self.cont.submit(BdevIo::read(
                job.container.slot_lba(slot),
                job.container.slot_blocks,
                buf,
                i as u64,
            ));
            issued += 1;
        }
        issued += self.copy_ahead_of_captures(&job, now, pressed);
        if pressed {
            return issued;
        }
        {
            let mut ctl = job.control.lock().unwrap_or_else(|e| e.into_inner());
            self.prio.extend(ctl.prioritize.drain(..));
        }
        self.flush_ready();
        let rate = job.rate_limit.load(Ordering::Relaxed);
        let chunk_bytes = job.chunk_blocks * job.block_size;
        while self.inflight_chunks < cap
            && !self.bufs.is_empty()
            && (!lend || job.lent_writes.load(Ordering::Relaxed) < self.max_lent_ops)
        {
            if rate > 0 {
                let allowed = (now - self.rate_start) as f64 / self.tick_us / 1e6 * rate as f64;
                if self.rate_issued as f64 + chunk_bytes as f64 > allowed + chunk_bytes as f64 {
                    break;
                }
            }
            let Some(chunk) = self.next_pending() else {
                break;
            };
            // As far as the budget allows.
            let max_run = self.run_chunks.min(cap - self.inflight_chunks).max(1) as u64;
            let count = self.claim_run(chunk, max_run);
            let blocks =
                (count * job.chunk_blocks).min(job.num_blocks - (chunk << job.chunk_shift));
            self.rate_issued += blocks * job.block_size;
            issued += 1;
            if lend && self.write_lent(chunk, count, blocks, now) {
                continue;
            }
            let mut buf = self.bufs.pop().expect("checked non-empty");
            buf.set_len((blocks * job.block_size) as usize);
            let i = self.start_op(OpKind::CopyRead, chunk, count, 0, count as u32, now);
            self.src.submit(BdevIo::read(
                chunk << job.chunk_shift,
                blocks,
                buf,
                i as u64,
            ));
        }
        issued
    }

    /// Extends the claimed chunk `chunk` to a run of up to `max_run`
    /// consecutive pending chunks (one read, one target write) when the
    /// target keeps consecutive chunks together; returns its length.
    fn claim_run(&mut self, chunk: u64, max_run: u64) -> u64 {
        let map = &self.job.map;
        let mut count = 1;
        while count < max_run
            && chunk + count < map.len()
            && !self.fenced(chunk + count)
            && map.transition(chunk + count, ChunkState::Pending, ChunkState::Copying)
        {
            count += 1;
        }
        count
    }

    /// Copy runs outside the budget, paid by captures (module docs,
    /// "Copying ahead of captures"): runs of [`CREDIT_RUN_BYTES`] (one
    /// chunk on a target that does not keep chunks together), at most
    /// [`CREDIT_RUNS`] and at most the pressed drain's depth in flight,
    /// pressed or not, none under a manual rate limit. While the container
    /// is pressed they also leave the drain a buffer. Credit the runs in
    /// flight cannot use is dropped.
    fn copy_ahead_of_captures(&mut self, job: &JobShared, now: u64, pressed: bool) -> usize {
        let per = job.tuning.copy_per_capture;
        let saved = job.counters.chunks_saved.load(Ordering::Relaxed);
        let new = saved.saturating_sub(self.saved_seen);
        self.saved_seen = saved;
        if per.is_nan() || per <= 0.0 || job.rate_limit.load(Ordering::Relaxed) > 0 {
            return 0;
        }
        let chunk_bytes = job.chunk_blocks * job.block_size;
        let run_chunks = ((CREDIT_RUN_BYTES / chunk_bytes).max(1) as u32).min(self.run_chunks);
        let run = run_chunks as f64;
        self.credit = (self.credit + new as f64 * per).min(run * CREDIT_RUNS as f64);
        // Within the pressed drain's depth, which the bystanders' latency
        // sets, pressed or not: these runs are as long as drains and land
        // on the device the bystanders use.
        let max_runs = CREDIT_RUNS.min(self.drain_depth);
        let spare_bufs = usize::from(pressed);
        let mut issued = 0;
        while self.credit >= run && self.credit_runs < max_runs && self.bufs.len() > spare_bufs {
            // Prioritised ranges stay at the front of the schedule.
            let near = if job.tuning.copy_near_writers && self.prio.is_empty() {
                self.next_near_writers(run_chunks as u64 * CREDIT_RUNS as u64)
            } else {
                None
            };
            let Some(chunk) = near.or_else(|| self.next_pending()) else {
                break;
            };
            let count = self.claim_run(chunk, run_chunks as u64);
            self.credit -= count as f64;
            let blocks =
                (count * job.chunk_blocks).min(job.num_blocks - (chunk << job.chunk_shift));
            let mut buf = self.bufs.pop().expect("checked non-empty");
            buf.set_len((blocks * job.block_size) as usize);
            let i = self.start_op(OpKind::CopyRead, chunk, count, 0, 0, now);
            if let Some(op) = self.ops[i].as_mut() {
                op.near = near.is_some();
            }
            self.credit_runs += 1;
            job.counters
                .copy_ahead_peak
                .fetch_max(self.credit_runs as u64, Ordering::Relaxed);
            self.src.submit(BdevIo::read(
                chunk << job.chunk_shift,
                blocks,
                buf,
                i as u64,
            ));
            issued += 1;
        }
        issued
    }

    /// Writes the claimed copy run of `count` chunks from `chunk` (`blocks`
    /// source blocks) to the target straight from the source's memory (see
    /// the module docs). Returns `false`, having done nothing, when it
    /// cannot: no lendable source, a run that ends in a partial chunk, or a
    /// target that does not store runs verbatim; the caller reads it.
    fn write_lent(&mut self, chunk: u64, count: u64, blocks: u64, now: u64) -> bool {
        let job = self.job.clone();
        let Some(mem) = self.src_mem.as_ref() else {
            return false;
        };
        if blocks != count * job.chunk_blocks {
            return false;
        }
        let Some(lba) = job.target.place_verbatim(chunk, count) else {
            return false;
        };
        // Announce the write before looking at the job state once more, so
        // that a writer that sees the job ended also sees it (both SeqCst:
        // see `JobShared::lent_writes` and the cow bdev's `admit`).
        job.lent_writes.fetch_add(1, Ordering::SeqCst);
        if job.state() != JobState::Running {
            job.lent_writes.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        // SAFETY: every chunk of the run is `Copying`, claimed by this
        // stream in `next_pending` and in the run's extension, and none is
        // fenced, so no write of the consistency point is still landing in
        // it. A write through the cow bdev reaches a `Copying` chunk only
        // after it leaves that state, which happens when this write has
        // completed (`OpKind::LentWrite` in `complete`), and, once the job
        // has ended, only when no lent write is in flight (`lent_writes`,
        // announced above while the job was running). The source is claimed
        // by the cow bdev, so nothing else writes it. The buffer goes only
        // to the target bdev's write path, which reads it (`as_ptr`,
        // `Deref`); a lent `DmaBuf` refuses mutable access.
        let Some(buf) = (unsafe { mem.lend(chunk << job.chunk_shift, blocks) }) else {
            job.lent_writes.fetch_sub(1, Ordering::SeqCst);
            return false;
        };
        let tb = self.tgt.block_size() as u64;
        let bytes = blocks * job.block_size;
        self.writing_chunks += count as u32;
        let i = self.start_op(OpKind::LentWrite, chunk, count, 0, count as u32, now);
        self.tgt
            .submit(BdevIo::write(lba, bytes / tb, buf, i as u64));
        self.tgt_queued = true;
        job.counters.zero_copy_runs.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Whether chunk `c` is fenced: a write of the consistency point is
    /// still landing in it, so its T0 content is not on the source yet.
    #[inline]
    fn fenced(&self, c: u64) -> bool {
        let job = &self.job;
        job.fence.fenced(c << job.chunk_shift, job.chunk_blocks)
    }

    /// A pending chunk at or after the one the last arriving write reached
    /// ([`JobShared::wanted`]), claimed (`Pending` → `Copying`): the
    /// copies ahead of captures go where the writers are (module docs).
    /// `None` once the `span` chunks from there hold no more; a new chunk
    /// reached starts a new span. A fenced chunk is passed over: the copy
    /// cursor comes back to it.
    fn next_near_writers(&mut self, span: u64) -> Option<u64> {
        let map = &self.job.map;
        let w = self.job.wanted.load(Ordering::Relaxed);
        if w != self.wanted_seen && w < map.len() {
            self.wanted_seen = w;
            self.near = w;
            self.near_end = (w + span).min(map.len());
        }
        while self.near < self.near_end {
            let c = self.near;
            self.near += 1;
            if map.get(c) == ChunkState::Pending
                && !self.fenced(c)
                && map.transition(c, ChunkState::Pending, ChunkState::Copying)
            {
                return Some(c);
            }
        }
        None
    }

    /// The next chunk to copy, claimed (`Pending` → `Copying`): prioritised
    /// ranges first, then in order, then those passed over while fenced.
    fn next_pending(&mut self) -> Option<u64> {
        let job = self.job.clone();
        let map = &job.map;
        while let Some(&(s, e)) = self.prio.front() {
            let mut c = s;
            while c < e {
                if map.get(c) == ChunkState::Pending && self.fenced(c) {
                    self.deferred.push_back(c);
                } else if map.transition(c, ChunkState::Pending, ChunkState::Copying) {
                    self.prio[0].0 = c + 1;
                    return Some(c);
                }
                c += 1;
            }
            self.prio.pop_front();
        }
        while self.cursor < map.len() {
            let c = self.cursor;
            self.cursor += 1;
            if map.get(c) == ChunkState::Pending && self.fenced(c) {
                self.deferred.push_back(c);
            } else if map.transition(c, ChunkState::Pending, ChunkState::Copying) {
                return Some(c);
            }
        }
        // Fenced chunks, once their writes have landed (a writer may have
        // captured them meanwhile: then they are no longer `Pending`).
        while let Some(&c) = self.deferred.front() {
            if map.get(c) == ChunkState::Pending && self.fenced(c) {
                return None;
            }
            self.deferred.pop_front();
            if map.transition(c, ChunkState::Pending, ChunkState::Copying) {
                return Some(c);
            }
        }
        None
    }

    /// Takes the hosts' calibrated no-backup latency (measured after the
    /// streams were built, just before the consistency point) as the
    /// scheduler's reference, and starts the first window now. Called on
    /// the home reactor right before the first poll.
    pub fn load_reference(&mut self) {
        let fg_ref = self.job.counters.fg_ref_ticks.load(Ordering::Relaxed);
        self.fg_ref = fg_ref;
        self.ref_calibrated = fg_ref > 0;
        self.hosts_idle = self.job.tuning.adaptive && fg_ref == 0;
        self.budget_q = if self.job.tuning.adaptive && fg_ref > 0 {
            16
        } else {
            self.max_budget_q
        };
        self.fg_prev = self.job.fg.read();
        self.by_prev = self.job.fg.read_bystanders();
        self.job
            .counters
            .drain_depth
            .store(self.drain_depth as u64, Ordering::Relaxed);
        self.win_start = clock::ticks();
    }

    /// The pressed drain depth, from the bystanders' latency against their
    /// own no-backup levels (see the module docs).
    fn adapt_drain(&mut self) {
        let now = self.job.fg.read_bystanders();
        let window = (
            now.0 - self.by_prev.0,
            now.1 - self.by_prev.1,
            now.2 - self.by_prev.2,
        );
        let step = drain_step(
            self.drain_depth,
            self.job.tuning.pressed_drain_depth.max(1),
            self.job.tuning.fg_tolerance,
            window,
            self.by_idle_windows,
        );
        if step.consumed {
            self.by_prev = now;
        }
        self.drain_depth = step.depth;
        self.by_idle_windows = step.idle_windows;
        if let Some(milli) = step.milli {
            self.job
                .counters
                .bystander_milli
                .store(milli.max(1), Ordering::Relaxed);
        }
        self.job
            .counters
            .drain_depth
            .store(self.drain_depth as u64, Ordering::Relaxed);
    }

    /// AIMD on the hosts' latency (see the module docs), and the drain rate
    /// for pacing.
    fn adapt(&mut self, now: u64) {
        let window = clock::duration_to_ticks(WINDOW);
        if now - self.win_start < window {
            return;
        }
        let elapsed = now - self.win_start;
        let (area, done) = self.job.fg.read();
        let (d_area, d_done) = (area - self.fg_prev.0, done - self.fg_prev.1);
        let floor = ((self.job.tuning.min_share.clamp(0.0, 1.0) * 16.0).round() as u32).max(1);
        if self.job.tuning.adaptive {
            self.adapt_drain();
            if d_done < FG_MIN_SAMPLES {
                let fg = &self.job.fg;
                let quiet =
                    fg.held.load(Ordering::Relaxed) == 0 && fg.busy.load(Ordering::Relaxed) == 0;
                self.hosts_idle = d_done == 0 && quiet;
                if quiet {
                    // Hosts (nearly) idle: the device is ours.
                    self.budget_q = (self.budget_q * 2).min(self.max_budget_q);
                    self.fg_prev = (area, done);
                }
                // Otherwise they are waiting on the device, on captures or
                // on credits: too few completions to tell their latency.
                // Keep the budget, and keep this window's samples for the
                // next (a slow device widens the window until it says
                // something).
            } else {
                self.hosts_idle = false;
                self.fg_prev = (area, done);
                let lat = d_area / d_done;
                self.job.counters.fg_lat_ticks.store(lat, Ordering::Relaxed);
                if self.fg_ref == 0 || (!self.ref_calibrated && lat < self.fg_ref) {
                    // Hosts were idle at calibration: the lowest level seen
                    // since stands in for the no-backup level.
                    self.fg_ref = lat;
                }
                if (lat as f64) > self.fg_ref as f64 * self.job.tuning.fg_tolerance.max(1.0) {
                    let pressed = self.job.container.used() >= self.job.soft_slots;
                    if self.budget_q <= floor && !pressed {
                        // Still over with the copy stream at its floor and no
                        // forced drain: the load changed, not our share of
                        // the device. Follow it up, slowly: after 200 ms,
                        // 1% every 50 ms (doubling takes about 3.5 s).
                        self.floor_windows += 1;
                        if self.floor_windows >= 40 && self.floor_windows.is_multiple_of(10) {
                            self.fg_ref += self.fg_ref / 100 + 1;
                        }
                    }
                    self.budget_q = (self.budget_q * 2 / 3).max(floor);
                } else {
                    self.floor_windows = 0;
                    self.budget_q =
                        (self.budget_q + (self.budget_q / 16).max(1)).min(self.max_budget_q);
                }
                self.job
                    .counters
                    .fg_ref_ticks
                    .store(self.fg_ref, Ordering::Relaxed);
            }
        }
        self.job
            .counters
            .budget
            .store(self.budget_q as u64, Ordering::Relaxed);
        // Pacing: admit captures at the rate the drain frees slots.
        let interval = elapsed.checked_div(self.drained_in_window).unwrap_or(0);
        self.job.admit_interval.store(interval, Ordering::Relaxed);
        self.win_start = now;
        self.drained_in_window = 0;
    }
}

/// One window of the pressed-drain controller (see the module docs).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DrainStep {
    pub depth: u32,
    pub idle_windows: u32,
    /// The window's samples were used (otherwise they carry over).
    pub consumed: bool,
    /// Bystanders' latency over their reference, in thousandths, when measured.
    pub milli: Option<u64>,
}

/// The pressed drain depth after a window in which bystanders completed
/// `done` I/Os with latency area `area` against a reference area
/// `ref_area`: a third less (never below one) when they were over
/// `tolerance`, one more (up to `max`) when not; back to `max` after four
/// windows without a bystander completion; unchanged, keeping the samples,
/// when there were too few to tell.
pub(crate) fn drain_step(
    depth: u32,
    max: u32,
    tolerance: f64,
    (area, ref_area, done): (u64, u64, u64),
    idle_windows: u32,
) -> DrainStep {
    if done == 0 {
        let idle_windows = idle_windows + 1;
        return DrainStep {
            depth: if idle_windows >= 4 { max } else { depth },
            idle_windows,
            consumed: true,
            milli: None,
        };
    }
    if done < FG_MIN_SAMPLES || ref_area == 0 {
        return DrainStep {
            depth,
            idle_windows,
            consumed: false,
            milli: None,
        };
    }
    let milli = area.saturating_mul(1000) / ref_area;
    let depth = if milli as f64 > 1000.0 * tolerance.max(1.0) {
        (depth * 2 / 3).max(1)
    } else {
        (depth + 1).min(max)
    };
    DrainStep {
        depth,
        idle_windows: 0,
        consumed: true,
        milli: Some(milli),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_narrows_while_bystanders_suffer_and_widens_back() {
        // 20% over their own level at tolerance 1.1: a third less each window, down to one.
        let over = (1200, 1000, 50);
        let mut d = 16;
        let mut seen = vec![];
        for _ in 0..10 {
            let s = drain_step(d, 16, 1.1, over, 0);
            assert!(s.consumed);
            assert_eq!(s.milli, Some(1200));
            d = s.depth;
            seen.push(d);
        }
        assert_eq!(seen[..6], [10, 6, 4, 2, 1, 1]);
        // Within tolerance: one more per window, up to the maximum.
        let fine = (1050, 1000, 50);
        for want in 2..=16 {
            d = drain_step(d, 16, 1.1, fine, 0).depth;
            assert_eq!(d, want);
        }
        assert_eq!(drain_step(d, 16, 1.1, fine, 0).depth, 16);
    }

    #[test]
    fn no_bystanders_means_full_depth_and_few_samples_carry_over() {
        // Too few completions to tell: nothing changes, the samples are kept.
        let s = drain_step(3, 16, 1.1, (900, 100, FG_MIN_SAMPLES - 1), 2);
        assert_eq!(
            s,
            DrainStep {
                depth: 3,
                idle_windows: 2,
                consumed: false,
                milli: None
            }
        );
        // No bystander completion: after four such windows, full depth.
        let mut d = 2;
        let mut idle = 0;
        for w in 1..=4 {
            let s = drain_step(d, 16, 1.1, (0, 0, 0), idle);
            (d, idle) = (s.depth, s.idle_windows);
            assert_eq!(d, if w < 4 { 2 } else { 16 });
        }
        // A bystander's sample resets the count.
        let s = drain_step(d, 16, 1.1, (2000, 1000, 20), idle);
        assert_eq!((s.depth, s.idle_windows), (10, 0));
    }
}
