//! Restore of a generation onto a bdev, pipelined and gathered.
//!
//! [`restore_to`] is a control-path call: it loads the generation's index,
//! opens the destination for writing, and runs a poller on the `home`
//! reactor that copies the generation; the calling thread waits, reporting
//! progress. [`restore_to_on`] spreads the copy over several reactors (see
//! "Parts" below): one reactor's memcpy and crc32c of the chunks it reads
//! falls short of a fast destination's write bandwidth.
//!
//! ## Runs: the destination is written in large pieces
//!
//! The source is cut, in chunk order, into *runs* of consecutive chunks:
//!
//! * **Data runs** of up to [`RESTORE_IO_BYTES`] (1 MiB) of chunks, ending
//!   early only at an absent chunk, at a zero run, or at the end of the
//!   source. Each is one destination write, however its chunks are spread
//!   over the namespace: a late incremental's chunks lie in the extents of
//!   many generations, and the run *gathers* them into its buffer. Zero
//!   chunks inside a data run are zeros in its buffer, written with the
//!   rest.
//! * **Zero runs**: a stretch of zero chunks as long as a run or longer, or
//!   one that starts a run and ends at an absent chunk or at the end of the
//!   source, is one write-zeroes of up to 16 MiB when the destination
//!   supports it, writes of a zeroed buffer of up to one run otherwise. The
//!   destination is never assumed to hold zeros already.
//! * **Absent chunks** (outside the backup's scope) are skipped: the
//!   destination keeps what it had there.
//!
//! ## Gather: the namespace is read in extents
//!
//! A data run's data chunks, sorted by namespace offset, fall into
//! *segments*: chunks stored back to back, each read with one request.
//! When one segment holds every data chunk of the run in the run's own
//! order from its first chunk (a run of a full backup, unless a zero chunk
//! comes before one of its data chunks), it is read straight into the
//! run's buffer. Otherwise each segment is read into a
//! staging buffer (one chunk, or up to a run for longer segments) and its
//! chunks are copied to their places in the run's buffer as the read
//! completes. Every chunk's crc32c is checked against its index entry as
//! its read completes (a mismatch stops the restore with
//! [`RepoBdevError::Checksum`] naming the chunk). A run is written as soon
//! as its last chunk is in place; runs are written in the order they are
//! completed.
//!
//! ## Parts: one per reactor
//!
//! Over `n` reactors the generation's chunks are cut into `n` contiguous
//! *parts* of whole runs' worth of chunks (1 MiB of them; fewer parts when
//! the generation has fewer runs than that), so that no data run
//! straddles two parts; a zero run ends at its part's end. The cuts share
//! the work, not the chunk count: a data chunk weighs 16, a zero chunk 1,
//! an absent chunk nothing, so that a sparse generation (data in one half,
//! zeros in the other) does not leave one reactor with all the copying. Each part is
//! restored by a poller of its own on its reactor, with its own namespace
//! and destination channels and its own buffers, as below. They share the
//! index (loaded once) and the progress count. The first part to fail
//! stops the others (no new I/O); the restore returns once every part has
//! ended: the first part's error, or the sum of the parts' reports, timed
//! from the start to the end of the last part. With one reactor there is
//! one part: the whole generation.
//!
//! ## Queue depth
//!
//! With queue depth `qd` over `n` parts each part's poller works at
//! `qd / n` (at least 1; with one part, `qd`): with part queue depth `q`
//! it keeps up to `q` destination writes in flight, and namespace reads
//! of up to `q` runs' worth of bytes — as many as `8 × q` requests when
//! the generation is fragmented, so that a late generation read in
//! chunk-sized pieces keeps as many bytes in flight as a full one read in
//! 1 MiB pieces.
//!
//! Each pass hands the destination the writes it queued (runs completed
//! by the reads just reaped, and zero runs) before it issues new reads:
//! a namespace in memory reads by memcpy on the reactor, and writes
//! entered only after a pass's memcpys left the destination short of work
//! for that long (generation 1's 1 MiB reads restored 0.84× of the
//! destination's write ceiling that way, and 1.02× with the writes first).
//!
//! After its last write each part flushes the destination (a flush covers
//! every write completed before it), so the restore succeeds only once
//! every part's writes are flushed. The first error stops new I/O; the
//! restore returns it once the I/O in flight has completed.
//!
//! ## Buffers
//!
//! Nothing is allocated per I/O. The buffers are mapped before the restore
//! starts, never on a reactor, for each part at its queue depth `q`:
//! `q + q / 2` run buffers of one run (fewer, at least 4, when a chunk is
//! larger than 1 MiB) on the calling thread, while a helper thread opens
//! the repository, loads the index and maps the one-chunk staging buffers
//! (8 MiB of them shared by the parts, at most one per read in flight) and
//! `q / 2` run-sized staging buffers. So `n` parts together map about what
//! one restore at `qd` does. Mapping them (all faulted in: 40 MiB at the
//! defaults) is most of a restore's fixed cost, hence the two threads. A
//! part's buffers come back to the calling thread once its last data I/O
//! is done, which hands them to a short-lived thread to unmap, so that
//! neither a reactor nor the restore's return waits for it. A part's run
//! and read slot tables, and each run's list of its data chunks, are
//! allocated on its reactor when it starts.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotcopy_bdev::{BdevChannel, BdevIo, BdevRegistry, IoStatus, IoType};
use hotcopy_runtime::{BufferPool, DmaBuf, HugepageMode, ReactorHandle};
use serde::Serialize;

use super::common::{poll_until_finished, token, untoken, Slab, KIND_FLUSH, KIND_PIECE, KIND_RUN};
use super::{common_block_size, load_index, RepoBdevError};
use crate::repo::{ChunkLoc, GenIndex};

/// The default queue depth of [`restore_to`].
pub const RESTORE_QD: usize = 16;
/// Largest destination write of a data run, and largest namespace read: 1
/// MiB, the size at which local disks and RAM reach their sequential
/// bandwidth.
pub const RESTORE_IO_BYTES: u64 = 1 << 20;
/// Largest write-zeroes of a run of zero chunks.
const ZERO_RUN_BYTES: u64 = 16 << 20;
/// Namespace reads in flight per unit of queue depth, at most.
const READS_PER_QD: usize = 8;
/// Bytes of one-chunk staging buffers.
const SMALL_STAGING_BYTES: u64 = 8 << 20;
/// How often the waiting caller reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(10);

/// What [`restore_to`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub generation: u64,
    /// The generation's source size.
    pub bytes_total: u64,
    /// Bytes written to the destination (data and zeros).
    pub bytes_written: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    /// Chunks outside the backup's scope, left as they were.
    pub absent_chunks: u64,
    /// Namespace reads and destination writes (and write-zeroes) issued.
    pub reads: u64,
    pub writes: u64,
    /// Data runs whose chunks were gathered from more than one read (or
    /// read through a staging buffer).
    pub gathered_runs: u64,
    pub elapsed: Duration,
    /// `bytes_written` over `elapsed`.
    pub mibps: f64,
}

/// The restore's buffers (see the module docs).
struct Buffers {
    /// Chunks per run.
    run_max: u64,
    run_bufs: usize,
    reads_max: usize,
    runs: BufferPool,
    /// Staging buffers of one chunk and of one run (`None` when a run is
    /// one chunk: every read is then direct).
    small: Option<BufferPool>,
    large: Option<BufferPool>,
}

/// The one-chunk and the run-sized staging buffers of [`Buffers`].
type Staging = (Option<BufferPool>, Option<BufferPool>);

fn pool(size: u64, count: usize, what: &str) -> Result<BufferPool, String> {
    BufferPool::new(size as usize, count, HugepageMode::Auto)
        .map_err(|e| format!("restore {what} buffers: {e}"))
}

impl Buffers {
    /// Chunks per run, and run buffers, of a restore of `cs`-byte chunks at
    /// queue depth `qd`: `qd` writes in flight and half as many runs
    /// gathering, in 1 MiB runs; fewer (at least 4) when a chunk is larger
    /// than that.
    fn shape(cs: u64, qd: usize) -> (u64, usize) {
        let run_max = (RESTORE_IO_BYTES / cs).max(1);
        let run_bytes = run_max * cs;
        let full = qd + qd.div_ceil(2);
        let run_bufs = full.min(((full as u64 * RESTORE_IO_BYTES / run_bytes) as usize).max(4));
        (run_max, run_bufs)
    }

    /// Maps the run buffers (control path). They depend on the chunk size
    /// only through the run's size, which is 1 MiB for every chunk size up
    /// to 1 MiB.
    fn map_runs(cs: u64, qd: usize) -> Result<BufferPool, String> {
        let (run_max, run_bufs) = Buffers::shape(cs, qd);
        pool(run_max * cs, run_bufs, "run")
    }

    /// Maps the staging buffers of one of `parts` parts of a restore
    /// (control path): none when a run is one chunk (every read is then
    /// direct). The parts share [`SMALL_STAGING_BYTES`].
    fn map_staging(cs: u64, qd: usize, parts: usize) -> Result<Staging, String> {
        let (run_max, _) = Buffers::shape(cs, qd);
        if run_max == 1 {
            return Ok((None, None));
        }
        let small = SMALL_STAGING_BYTES / parts.max(1) as u64;
        let n = ((small / cs) as usize).clamp(1, qd * READS_PER_QD);
        Ok((
            Some(pool(cs, n, "staging")?),
            Some(pool(run_max * cs, qd.div_ceil(2), "staging")?),
        ))
    }

    /// The buffers of a restore of `cs`-byte chunks at queue depth `qd`,
    /// from run buffers mapped for another chunk size (`runs`, used when
    /// they fit) and staging buffers mapped for this one.
    fn assemble(
        cs: u64,
        qd: usize,
        runs: Result<BufferPool, String>,
        (small, large): Staging,
    ) -> Result<Buffers, String> {
        let (run_max, run_bufs) = Buffers::shape(cs, qd);
        let runs = match runs {
            Ok(p) if p.buf_size() as u64 == run_max * cs && p.count() == run_bufs => p,
            _ => Buffers::map_runs(cs, qd)?,
        };
        Ok(Buffers {
            run_max,
            run_bufs,
            reads_max: qd * READS_PER_QD,
            runs,
            small,
            large,
        })
    }
}

/// A run of consecutive chunks written to the destination with one request.
struct Run {
    first: u64,
    count: u64,
    /// The write buffer (`count` chunks); `None` for a write-zeroes run,
    /// and while a direct read has it.
    buf: Option<DmaBuf>,
    /// The run's data chunks sorted by namespace offset: (offset, index in
    /// the run). Allocated once with room for a whole run, kept across uses.
    order: Vec<(u64, u32)>,
    /// `order[..next]` have been read or are being read.
    next: usize,
    /// Data chunks not in the buffer yet.
    pending: u64,
    /// One read straight into `buf` brings every data chunk.
    direct: bool,
}

/// A namespace read: `order[i..j]` of run `run`, stored back to back.
#[derive(Clone, Copy)]
struct Read {
    run: u32,
    i: u32,
    j: u32,
}

type Outcome = Result<RestoreReport, RepoBdevError>;

/// What a part's poller sends the waiting caller: its buffers once its
/// last data I/O is done (to unmap off the reactor), then its outcome.
enum Msg {
    Buffers(Buffers),
    Done {
        part: usize,
        outcome: Outcome,
        /// The part stopped because another one failed: its error is not
        /// the restore's.
        stopped: bool,
    },
}

/// The value of the shared "first part to fail" before any has failed.
const NO_FAILURE: usize = usize::MAX;

/// How many zero chunks follow from `from` on (at most `max`).
fn zeros_from(index: &GenIndex, from: u64, max: u64) -> u64 {
    let mut n = 0;
    while n < max && index.resolve(from + n).map(|e| e.loc) == Some(ChunkLoc::Zero) {
        n += 1;
    }
    n
}

/// One part of a restore: chunks `cursor..end` of the generation, on one
/// reactor.
struct Restorer {
    index: Arc<GenIndex>,
    /// This part's number, and the first part that failed ([`NO_FAILURE`]
    /// while none has; the number of parts when the caller gave up
    /// starting them), shared by every part: a failure stops the others.
    part: usize,
    first_failed: Arc<AtomicUsize>,
    /// The error is another part's failure, not this part's.
    stopped: bool,
    namespace: String,
    dest: String,
    ns: BdevChannel,
    dst: BdevChannel,
    ns_bs: u64,
    dst_bs: u64,
    cs: u64,
    /// Handed back to the caller with the outcome (so that they are
    /// unmapped there).
    bufs: Option<Buffers>,
    run_max: u64,
    zero_max: u64,
    write_zeroes: bool,
    runs: Vec<Run>,
    free_runs: Vec<u32>,
    read_ops: Slab<Read>,
    /// Runs with reads left to issue, oldest first.
    gather: VecDeque<u32>,
    /// Runs complete in their buffers (or zero runs), waiting for a write
    /// slot.
    ready: VecDeque<u32>,
    reads: usize,
    read_bytes: u64,
    reads_max: usize,
    read_bytes_max: u64,
    writes: usize,
    qd: usize,
    cursor: u64,
    /// The end of this part's chunks (a run boundary, or the end of the
    /// source).
    end: u64,
    flush_sent: bool,
    flushed: bool,
    error: Option<RepoBdevError>,
    report: RestoreReport,
    /// When the restore (every part) started.
    start: Instant,
    done: Arc<AtomicU64>,
    comp: Vec<BdevIo>,
    /// Completions reaped while kicking a device, handled next pass.
    kicked: Vec<BdevIo>,
    /// Room for both messages, so a send never blocks.
    tx: Option<SyncSender<Msg>>,
}

impl Restorer {
    fn run_len(&self, first: u64, count: u64) -> u64 {
        self.index
            .source_size()
            .min((first + count) * self.cs)
            .saturating_sub(first * self.cs)
    }

    fn loc(&self, chunk: u64) -> Option<ChunkLoc> {
        self.index.resolve(chunk).map(|e| e.loc)
    }

    fn io_error(
        &self,
        device: &str,
        op: &'static str,
        offset: u64,
        len: u64,
        s: IoStatus,
    ) -> RepoBdevError {
        RepoBdevError::Io {
            generation: self.index.generation(),
            device: device.to_string(),
            op,
            offset,
            len,
            source: match s {
                IoStatus::Failed(e) => e,
                _ => hotcopy_bdev::IoError::Aborted,
            },
        }
    }

    fn fail(&mut self, e: RepoBdevError) {
        if self.error.is_none() {
            self.error = Some(e);
            let _ = self.first_failed.compare_exchange(
                NO_FAILURE,
                self.part,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Stops issuing I/O when another part has failed (this part's I/O in
    /// flight still completes before it ends).
    fn check_others(&mut self) {
        if self.error.is_none() {
            let f = self.first_failed.load(Ordering::Relaxed);
            if f != NO_FAILURE && f != self.part {
                self.stopped = true;
                self.error = Some(RepoBdevError::Invalid {
                    what: format!("restore of generation {}", self.index.generation()),
                    why: "stopped: another part failed".into(),
                });
            }
        }
    }

    /// One pass; returns the work done and whether the restore has ended.
    fn poll(&mut self) -> (usize, bool) {
        let mut work = 0;
        self.check_others();
        let mut comp = std::mem::take(&mut self.comp);
        comp.append(&mut self.kicked);
        if self.dst.inflight() > 0 {
            self.dst.poll(&mut |io| comp.push(io));
        }
        if self.ns.inflight() > 0 {
            self.ns.poll(&mut |io| comp.push(io));
        }
        for io in comp.drain(..) {
            work += 1;
            let read = io.io_type == IoType::Read;
            self.io_done(io);
            // Each completed run goes to the device at once, not after the
            // checks and copies of every other read of this pass.
            if read && self.issue_writes() > 0 {
                self.kick_dst();
            }
        }
        self.comp = comp;
        let writes = self.issue_writes() + self.plan();
        // Writes go to the device before this pass's reads: a namespace in
        // memory reads by memcpy on this reactor, as long as they take.
        if writes > 0 {
            self.kick_dst();
        }
        let reads = self.issue_reads();
        if reads > 0 {
            self.kick_ns();
        }
        work += writes + reads;
        if self.reads > 0 || self.writes > 0 || (self.flush_sent && !self.flushed) {
            return (work, false);
        }
        if let Some(e) = self.error.take() {
            self.end(Err(e));
            return (work, true);
        }
        if self.cursor < self.end || self.free_runs.len() < self.runs.len() {
            return (work, false);
        }
        if !self.flush_sent {
            self.flush_sent = true;
            self.writes += 1;
            self.dst.submit(BdevIo::flush(token(KIND_FLUSH, 0)));
            self.give_back_buffers();
            return (work + 1, false);
        }
        let elapsed = self.start.elapsed();
        self.report.elapsed = elapsed;
        self.report.mibps =
            self.report.bytes_written as f64 / elapsed.as_secs_f64().max(1e-9) / (1024.0 * 1024.0);
        let report = self.report.clone();
        self.end(Ok(report));
        (work, true)
    }

    /// Hands what was submitted to the destination to the device now (a
    /// queue pair enters the kernel when it is polled); completions reaped
    /// meanwhile wait for the next pass.
    fn kick_dst(&mut self) {
        let kicked = &mut self.kicked;
        self.dst.poll(&mut |io| kicked.push(io));
    }

    fn kick_ns(&mut self) {
        let kicked = &mut self.kicked;
        self.ns.poll(&mut |io| kicked.push(io));
    }

    /// Hands the buffers back to the caller (if not done yet), once every
    /// one is back from the devices.
    fn give_back_buffers(&mut self) {
        for run in &mut self.runs {
            run.buf = None;
        }
        if let (Some(tx), Some(b)) = (&self.tx, self.bufs.take()) {
            let _ = tx.try_send(Msg::Buffers(b));
        }
    }

    fn end(&mut self, outcome: Outcome) {
        self.give_back_buffers();
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Msg::Done {
                part: self.part,
                outcome,
                stopped: self.stopped,
            });
        }
    }

    fn free_run(&mut self, r: u32) {
        let run = &mut self.runs[r as usize];
        run.buf = None;
        run.order.clear();
        self.free_runs.push(r);
    }

    fn io_done(&mut self, io: BdevIo) {
        let (kind, idx) = untoken(io.token);
        match kind {
            KIND_FLUSH => {
                self.writes -= 1;
                self.flushed = true;
                if !io.status.is_success() {
                    let e = self.io_error(&self.dest, "flush", 0, 0, io.status);
                    self.fail(e);
                }
            }
            KIND_PIECE => self.read_done(idx, io),
            _ => self.write_done(idx, io),
        }
    }

    /// A namespace read came back: check its chunks and put them in place.
    fn read_done(&mut self, idx: u32, mut io: BdevIo) {
        let Some(Read { run: r, i, j }) = self.read_ops.remove(idx) else {
            return;
        };
        let cs = self.cs;
        let (i, j) = (i as usize, j as usize);
        let run0 = &self.runs[r as usize];
        let len = run0.order[j - 1].0 - run0.order[i].0 + cs;
        self.reads -= 1;
        self.read_bytes -= len;
        let run = &mut self.runs[r as usize];
        let loc = run.order[i].0;
        let buf = io.take_buf();
        let Some(buf) = buf.filter(|_| io.status.is_success()) else {
            let st = if io.status.is_success() {
                IoStatus::Failed(hotcopy_bdev::IoError::BadBuffer)
            } else {
                io.status
            };
            let e = self.io_error(&self.namespace, "read", loc, len, st);
            return self.fail(e);
        };
        if self.error.is_some() {
            return;
        }
        let mut bad = None;
        if run.direct {
            for &(at, off) in &run.order[i..j] {
                let off = off as u64;
                let found = crc32c::crc32c(&buf[(off * cs) as usize..][..cs as usize]);
                let expected = self.index.resolve(run.first + off).map_or(0, |e| e.crc);
                if found != expected {
                    bad = Some((run.first + off, at, expected, found));
                    break;
                }
            }
            run.buf = Some(buf);
        } else {
            let Some(dst) = run.buf.as_mut() else {
                // Not reached: a gathered run keeps its buffer.
                let e = self.io_error(&self.dest, "gather", loc, len, IoStatus::Success);
                return self.fail(e);
            };
            for &(at, off) in &run.order[i..j] {
                let off = off as u64;
                let src = &buf[(at - loc) as usize..][..cs as usize];
                let found = crc32c::crc32c(src);
                let expected = self.index.resolve(run.first + off).map_or(0, |e| e.crc);
                if found != expected {
                    bad = Some((run.first + off, at, expected, found));
                    break;
                }
                dst[(off * cs) as usize..][..cs as usize].copy_from_slice(src);
            }
        }
        if let Some((chunk, offset, expected, found)) = bad {
            return self.fail(RepoBdevError::Checksum {
                generation: self.index.generation(),
                namespace: self.namespace.clone(),
                chunk,
                offset,
                expected,
                found,
            });
        }
        run.pending -= (j - i) as u64;
        if run.pending == 0 {
            self.ready.push_back(r);
        }
    }

    /// A write (or write-zeroes) of run `r` came back.
    fn write_done(&mut self, r: u32, io: BdevIo) {
        self.writes -= 1;
        let Some(run) = self.runs.get(r as usize) else {
            return;
        };
        let (first, count) = (run.first, run.count);
        self.free_run(r);
        let len = self.run_len(first, count);
        if !io.status.is_success() {
            let e = self.io_error(&self.dest, "write", first * self.cs, len, io.status);
            return self.fail(e);
        }
        self.report.bytes_written += len;
        self.done.fetch_add(len, Ordering::Relaxed);
    }

    /// Writes runs that are complete, up to the queue depth.
    fn issue_writes(&mut self) -> usize {
        let mut n = 0;
        while self.writes < self.qd {
            let Some(r) = self.ready.pop_front() else {
                break;
            };
            if self.error.is_some() {
                self.free_run(r);
                continue;
            }
            let (first, count) = (self.runs[r as usize].first, self.runs[r as usize].count);
            let len = self.run_len(first, count);
            let Some(mut buf) = self.runs[r as usize].buf.take() else {
                // Not reached: a run is ready only with its buffer. Stop
                // rather than leave the run's slot taken forever.
                self.free_run(r);
                let e = self.io_error(
                    &self.dest,
                    "write",
                    first * self.cs,
                    len,
                    IoStatus::Failed(hotcopy_bdev::IoError::BadBuffer),
                );
                self.fail(e);
                continue;
            };
            buf.set_len(len as usize);
            let b = self.dst_bs;
            self.writes += 1;
            self.report.writes += 1;
            self.dst.submit(BdevIo::write(
                first * self.cs / b,
                len / b,
                buf,
                token(KIND_RUN, r),
            ));
            n += 1;
        }
        n
    }

    /// Cuts the next runs while there are run slots and buffers: data runs
    /// get their buffer and their list of reads; zero runs go to the
    /// destination (write-zeroes) or to the write queue (a zeroed buffer).
    /// Returns the write-zeroes issued.
    fn plan(&mut self) -> usize {
        let mut n = 0;
        let end = self.end;
        let cs = self.cs;
        while self.error.is_none() {
            while self.cursor < end && self.loc(self.cursor) == Some(ChunkLoc::Absent) {
                self.report.absent_chunks += 1;
                let len = self.run_len(self.cursor, 1);
                self.done.fetch_add(len, Ordering::Relaxed);
                self.cursor += 1;
            }
            if self.cursor >= end {
                break;
            }
            let Some(&r) = self.free_runs.last() else {
                break;
            };
            let first = self.cursor;
            // The part's end is the end of the source to it.
            let zeros = zeros_from(&self.index, first, self.zero_max.min(end - first));
            let zero_run = zeros > 0
                && (zeros >= self.run_max
                    || first + zeros == end
                    || !matches!(self.loc(first + zeros), Some(ChunkLoc::Data(_))));
            if zero_run && self.write_zeroes {
                if self.writes >= self.qd {
                    break;
                }
                self.free_runs.pop();
                let run = &mut self.runs[r as usize];
                (run.first, run.count, run.buf) = (first, zeros, None);
                let len = self.run_len(first, zeros);
                let b = self.dst_bs;
                self.dst.submit(BdevIo::write_zeroes(
                    first * cs / b,
                    len / b,
                    token(KIND_RUN, r),
                ));
                self.writes += 1;
                self.report.writes += 1;
                self.report.zero_chunks += zeros;
                self.cursor += zeros;
                n += 1;
                continue;
            }
            let run_bytes = (self.run_max * cs) as usize;
            let Some(mut buf) = self.bufs.as_ref().and_then(|b| b.runs.get(run_bytes)) else {
                break;
            };
            self.free_runs.pop();
            let run = &mut self.runs[r as usize];
            run.order.clear();
            let mut count = 0;
            if zero_run {
                count = zeros.min(self.run_max);
                buf.fill(0);
            } else {
                // Zero chunks before this one were found in a stretch
                // shorter than a run.
                let mut short_zeros_until = 0;
                while count < self.run_max && first + count < end {
                    let c = first + count;
                    match self.index.resolve(c).map(|e| e.loc) {
                        Some(ChunkLoc::Data(loc)) => run.order.push((loc, count as u32)),
                        Some(ChunkLoc::Zero) => {
                            if c >= short_zeros_until {
                                // A stretch of a run or more is a zero run
                                // of its own.
                                let z = zeros_from(&self.index, c, self.run_max.min(end - c));
                                if z >= self.run_max && count > 0 {
                                    break;
                                }
                                short_zeros_until = c + z;
                            }
                            buf[(count * cs) as usize..][..cs as usize].fill(0);
                        }
                        _ => break,
                    }
                    count += 1;
                }
            }
            buf.set_len((count * cs) as usize);
            run.order.sort_unstable();
            let data = run.order.len() as u64;
            let base = run.order.first().map_or(0, |o| o.0);
            run.direct = run
                .order
                .iter()
                .enumerate()
                .all(|(k, &(loc, off))| off as usize == k && loc == base + k as u64 * cs);
            (run.first, run.count, run.buf) = (first, count, Some(buf));
            (run.next, run.pending) = (0, data);
            self.report.data_chunks += data;
            self.report.zero_chunks += count - data;
            if data == 0 {
                self.ready.push_back(r);
            } else {
                self.report.gathered_runs += u64::from(!run.direct);
                self.gather.push_back(r);
            }
            self.cursor += count;
        }
        n
    }

    /// Issues the next reads of the runs being gathered, while the read
    /// limits allow and staging buffers are free.
    fn issue_reads(&mut self) -> usize {
        let mut n = 0;
        let cs = self.cs;
        while self.error.is_none()
            && self.reads < self.reads_max
            && self.read_bytes < self.read_bytes_max
        {
            let Some(&r) = self.gather.front() else {
                break;
            };
            let run = &mut self.runs[r as usize];
            let order = &run.order;
            let i = run.next;
            let mut j = i + 1;
            // A segment: chunks stored back to back, up to a run's bytes.
            while j < order.len()
                && order[j].0 == order[j - 1].0 + cs
                && (order[j].0 - order[i].0) / cs < self.run_max
            {
                j += 1;
            }
            let span = (order[j - 1].0 - order[i].0) / cs + 1;
            // One-chunk reads go through one-chunk staging buffers, longer
            // ones through run-sized ones; a read waits for its kind.
            let buf = if run.direct {
                run.buf.take()
            } else if span == 1 {
                let small = self.bufs.as_ref().and_then(|b| b.small.as_ref());
                small.and_then(|p| p.get(cs as usize))
            } else {
                let len = span * cs;
                let large = self.bufs.as_ref().and_then(|b| b.large.as_ref());
                large.and_then(|p| p.get(len as usize))
            };
            let Some(buf) = buf else {
                break;
            };
            let loc = order[i].0;
            run.next = j;
            if j == order.len() {
                self.gather.pop_front();
            }
            let len = span * cs;
            let idx = self.read_ops.insert(Read {
                run: r,
                i: i as u32,
                j: j as u32,
            });
            self.reads += 1;
            self.read_bytes += len;
            self.report.reads += 1;
            let b = self.ns_bs;
            self.ns
                .submit(BdevIo::read(loc / b, len / b, buf, token(KIND_PIECE, idx)));
            n += 1;
        }
        n
    }
}

/// Restores generation `generation` of the repository on `namespace` onto
/// the bdev `dest` (see the module docs), with a poller on `home` keeping
/// `qd` writes and `qd` runs' worth of reads in flight (0 means
/// [`RESTORE_QD`]): [`restore_to_on`] with one reactor.
/// `progress(done, total)` is called on the calling thread, in bytes of the
/// source, as the restore goes and once at the end.
///
/// Control path: it blocks until the restore ends, so call it from a
/// thread that is not `home`. `dest` is opened for writing, so it must not
/// be claimed.
pub fn restore_to(
    reg: &BdevRegistry,
    namespace: &str,
    generation: u64,
    dest: &str,
    home: &ReactorHandle,
    qd: usize,
    progress: impl FnMut(u64, u64),
) -> Result<RestoreReport, RepoBdevError> {
    restore_to_on(
        reg,
        namespace,
        generation,
        dest,
        std::slice::from_ref(home),
        qd,
        progress,
    )
}

/// What a run costs a part, for cutting the generation into parts of
/// about equal work: a data chunk is read, checked and written
/// ([`DATA_WEIGHT`]); a zero chunk is at most a zeroed write, usually part
/// of one write-zeroes (1); an absent chunk costs nothing.
const DATA_WEIGHT: u64 = 16;

/// Each run's weight (see [`DATA_WEIGHT`]), for [`weighted_part_bounds`].
fn run_weights(index: &GenIndex, run_max: u64) -> Vec<u64> {
    let chunks = index.chunks();
    (0..chunks.div_ceil(run_max))
        .map(|r| {
            (r * run_max..((r + 1) * run_max).min(chunks))
                .map(|c| match index.resolve(c).map(|e| e.loc) {
                    Some(ChunkLoc::Data(_)) => DATA_WEIGHT,
                    Some(ChunkLoc::Zero) => 1,
                    _ => 0,
                })
                .sum::<u64>()
        })
        .collect()
}

/// [`part_bounds`], with the cuts placed by the runs' `weights` (one per
/// run) instead of by chunk count, so that a sparse generation (its data
/// in one half, zeros or absent chunks in the other) still gives each
/// part about the same work. A cut goes after the first run where the
/// weight so far reaches the next `k / parts` of the total; with no
/// weight at all, the cut is by chunk count. Fewer parts when the weight
/// sits in too few runs to cut between.
fn weighted_part_bounds(weights: &[u64], chunks: u64, run_max: u64, parts: usize) -> Vec<u64> {
    let runs = chunks.div_ceil(run_max);
    let n = (parts.max(1) as u64).min(runs.max(1));
    let total: u64 = weights.iter().sum();
    if total == 0 || n == 1 || weights.len() as u64 != runs {
        return part_bounds(chunks, run_max, parts);
    }
    let mut bounds = vec![0];
    let mut acc = 0u64;
    for (r, &w) in weights.iter().enumerate() {
        acc += w;
        let (k, next) = (bounds.len() as u64, r as u64 + 1);
        if k < n && next < runs && acc * n >= total * k {
            bounds.push(next * run_max);
        }
    }
    bounds.push(chunks);
    bounds
}

/// Chunks `bounds[i]..bounds[i + 1]` are part `i` of a restore of `chunks`
/// chunks in runs of `run_max` chunks over at most `parts` parts: as many
/// parts as there are runs, at most, each a contiguous range of whole runs
/// (the last one may be short), and at least one part.
fn part_bounds(chunks: u64, run_max: u64, parts: usize) -> Vec<u64> {
    let runs = chunks.div_ceil(run_max);
    let n = (parts.max(1) as u64).min(runs.max(1));
    (0..=n)
        .map(|i| (runs * i / n * run_max).min(chunks))
        .collect()
}

/// [`restore_to`] spread over the reactors `homes`: the generation's
/// chunks are cut into `homes.len()` contiguous parts of whole runs (fewer
/// when it has fewer runs), each restored by a poller of its own on its
/// reactor, with its own channels and buffers, at queue depth
/// `qd / parts` (at least 1), so that together they keep about `qd`
/// writes in flight. The first part to fail stops the others; the call
/// returns once every part has ended: the first error, or the parts'
/// reports summed (`elapsed` from the start to the end of the last part).
/// Every part flushes the destination after its own last write.
pub fn restore_to_on(
    reg: &BdevRegistry,
    namespace: &str,
    generation: u64,
    dest: &str,
    homes: &[ReactorHandle],
    qd: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<RestoreReport, RepoBdevError> {
    let what = format!("restore of generation {generation} to {dest}");
    let Some(home0) = homes.first() else {
        return Err(RepoBdevError::Invalid {
            what,
            why: "no reactor to run it on".into(),
        });
    };
    let qd = if qd == 0 { RESTORE_QD } else { qd };
    let part_qd = |parts: usize| (qd / parts.max(1)).max(1);
    let ns = reg.open(namespace, false)?;
    // Mapping and faulting in the buffers (tens of MiB) takes longer than
    // opening the repository for reading and loading the index (about a
    // millisecond), so the work is split between this thread and a helper,
    // never a reactor: this thread maps the run buffers of every part at
    // once, for the default chunk size (they are the same for any chunk
    // size up to 1 MiB, and mapped again otherwise, or when the generation
    // has fewer runs than there are reactors); the helper loads the index,
    // then maps the staging buffers of each part for the generation's chunk
    // size.
    let (loaded, mut runs) = std::thread::scope(|s| {
        let loaded = s.spawn(|| {
            let index = load_index(&ns, generation)?;
            let cs = index.chunk_size() as u64;
            let (run_max, _) = Buffers::shape(cs, qd);
            let weights = run_weights(&index, run_max);
            let bounds = weighted_part_bounds(&weights, index.chunks(), run_max, homes.len());
            let parts = bounds.len() - 1;
            let staging = (0..parts)
                .map(|_| Buffers::map_staging(cs, part_qd(parts), parts))
                .collect::<Result<Vec<_>, _>>();
            Ok::<_, RepoBdevError>((index, bounds, staging))
        });
        let runs: Vec<_> = (0..homes.len())
            .map(|_| Buffers::map_runs(crate::DEFAULT_CHUNK_SIZE, part_qd(homes.len())))
            .collect();
        (loaded.join(), runs)
    });
    let (index, bounds, staging) = match loaded {
        Ok(loaded) => loaded?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let dst = reg.open(dest, true)?;
    let total = index.source_size();
    if dst.bdev().size_bytes() < total {
        return Err(RepoBdevError::Invalid {
            what,
            why: format!(
                "the destination has {} bytes; the generation's source has {total}",
                dst.bdev().size_bytes()
            ),
        });
    }
    common_block_size(
        &what,
        &index,
        &[ns.bdev().block_size(), dst.bdev().block_size()],
    )?;
    let cs = index.chunk_size() as u64;
    let parts = bounds.len() - 1;
    let qd = part_qd(parts);
    // Those of reactors left without a part (a generation of fewer runs).
    let spare = runs.split_off(parts);
    if !spare.is_empty() {
        let _ = std::thread::Builder::new()
            .name("restore-unmap".into())
            .spawn(move || drop(spare));
    }
    let bufs = staging
        .and_then(|staging| {
            staging
                .into_iter()
                .zip(runs)
                .map(|(staging, runs)| Buffers::assemble(cs, qd, runs, staging))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|why| RepoBdevError::Reactor {
            core: home0.core(),
            why,
        })?;
    let run_max = bufs[0].run_max;
    let write_zeroes = dst.bdev().supports(IoType::WriteZeroes);
    let can_flush = dst.bdev().supports(IoType::Flush);
    let zero_max = if write_zeroes {
        (ZERO_RUN_BYTES / cs).max(run_max)
    } else {
        run_max
    };
    let index = Arc::new(index);
    let done = Arc::new(AtomicU64::new(0));
    let first_failed = Arc::new(AtomicUsize::new(NO_FAILURE));
    // Two messages per part: a send never blocks.
    let (tx, rx) = sync_channel::<Msg>(2 * parts);
    let report = RestoreReport {
        generation,
        bytes_total: total,
        bytes_written: 0,
        data_chunks: 0,
        zero_chunks: 0,
        absent_chunks: 0,
        reads: 0,
        writes: 0,
        gathered_runs: 0,
        elapsed: Duration::ZERO,
        mibps: 0.0,
    };
    let start = Instant::now();
    let mut started = 0;
    let mut start_error = None;
    for (part, bufs) in bufs.into_iter().enumerate() {
        let home = &homes[part];
        if start_error.is_some() {
            unmap_elsewhere(bufs);
            continue;
        }
        let (ns, dst, index) = (ns.clone(), dst.clone(), index.clone());
        let (done, failed, tx) = (done.clone(), first_failed.clone(), tx.clone());
        let (namespace, dest) = (namespace.to_string(), dest.to_string());
        let report = report.clone();
        let (cursor, end) = (bounds[part], bounds[part + 1]);
        let reads_max = bufs.reads_max;
        let slots = bufs.run_bufs + qd;
        let r = home.exec(move || -> Result<(), (String, Buffers)> {
            let channels = ns.channel().and_then(|n| Ok((n, dst.channel()?)));
            let (nsch, dstch) = match channels {
                Ok(c) => c,
                Err(e) => return Err((e.to_string(), bufs)),
            };
            let mut r = Restorer {
                ns_bs: nsch.block_size() as u64,
                dst_bs: dstch.block_size() as u64,
                ns: nsch,
                dst: dstch,
                cs,
                bufs: Some(bufs),
                run_max,
                zero_max,
                write_zeroes,
                runs: (0..slots)
                    .map(|_| Run {
                        first: 0,
                        count: 0,
                        buf: None,
                        order: Vec::with_capacity(run_max as usize),
                        next: 0,
                        pending: 0,
                        direct: false,
                    })
                    .collect(),
                free_runs: (0..slots as u32).rev().collect(),
                read_ops: Slab::new(reads_max),
                gather: VecDeque::with_capacity(slots),
                ready: VecDeque::with_capacity(slots),
                reads: 0,
                read_bytes: 0,
                reads_max,
                read_bytes_max: qd as u64 * run_max * cs,
                writes: 0,
                qd,
                cursor,
                end,
                flush_sent: !can_flush,
                flushed: !can_flush,
                error: None,
                report,
                start,
                done,
                comp: Vec::with_capacity(reads_max + 2 * qd),
                kicked: Vec::with_capacity(reads_max + 2 * qd),
                tx: Some(tx),
                index,
                part,
                first_failed: failed,
                stopped: false,
                namespace,
                dest,
            };
            poll_until_finished("repo_restore", move || r.poll());
            Ok(())
        });
        match r {
            Ok(Ok(())) => started += 1,
            Ok(Err((why, bufs))) => {
                unmap_elsewhere(bufs);
                start_error = Some((home.core(), why));
            }
            Err(e) => start_error = Some((home.core(), e.to_string())),
        }
        if start_error.is_some() {
            // Stops the parts already started; they are waited for below.
            first_failed.store(parts, Ordering::Relaxed);
        }
    }
    // Only the parts hold a sender now: the channel disconnects when the
    // last one goes away.
    drop(tx);
    let mut outcomes: Vec<Option<(Outcome, bool)>> = (0..parts).map(|_| None).collect();
    let mut ended = 0;
    let mut last = u64::MAX;
    while ended < started {
        match rx.recv_timeout(PROGRESS_EVERY) {
            Ok(Msg::Buffers(bufs)) => unmap_elsewhere(bufs),
            Ok(Msg::Done {
                part,
                outcome,
                stopped,
            }) => {
                outcomes[part] = Some((outcome, stopped));
                ended += 1;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let d = done.load(Ordering::Relaxed);
        if d != last && ended < started {
            progress(d, total);
            last = d;
        }
    }
    let d = done.load(Ordering::Relaxed);
    if d != last && started > 0 {
        progress(d, total);
    }
    if let Some((core, why)) = start_error {
        return Err(RepoBdevError::Reactor { core, why });
    }
    // The first part to fail, else any part's own error, else a part that
    // went away without a result.
    let first = first_failed.load(Ordering::Relaxed);
    let mut sum = report;
    let mut error = None;
    for (part, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Some((Ok(r), _)) => {
                sum.bytes_written += r.bytes_written;
                sum.data_chunks += r.data_chunks;
                sum.zero_chunks += r.zero_chunks;
                sum.absent_chunks += r.absent_chunks;
                sum.reads += r.reads;
                sum.writes += r.writes;
                sum.gathered_runs += r.gathered_runs;
                sum.elapsed = sum.elapsed.max(r.elapsed);
            }
            Some((Err(e), stopped)) => {
                if part == first {
                    return Err(e);
                }
                if !stopped && error.is_none() {
                    error = Some(e);
                }
            }
            None => {
                error.get_or_insert(RepoBdevError::Reactor {
                    core: homes[part].core(),
                    why: "the restore poller went away without a result (reactor stopped?)".into(),
                });
            }
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    sum.mibps = sum.bytes_written as f64 / sum.elapsed.as_secs_f64().max(1e-9) / (1024.0 * 1024.0);
    Ok(sum)
}

/// Unmaps `bufs` on a thread of its own (a few ms for 40 MiB), not on a
/// reactor, and not on the waiting caller: a flush that completes first
/// would wait for it. When the thread cannot start, the closure and the
/// buffers are dropped here.
fn unmap_elsewhere(bufs: Buffers) {
    let _ = std::thread::Builder::new()
        .name("restore-unmap".into())
        .spawn(move || drop(bufs));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run buffers mapped ahead for the default chunk size serve every
    /// chunk size up to 1 MiB and are mapped again for larger ones; the
    /// staging buffers are the generation's.
    #[test]
    fn buffers_mapped_ahead_fit_every_chunk_size() {
        let qd = 4;
        let ahead = || Buffers::map_runs(crate::DEFAULT_CHUNK_SIZE, qd);
        let ahead_size = ahead().unwrap().buf_size();
        for cs in [4 << 10, 64 << 10, 1 << 20, 2 << 20, 4 << 20] {
            let b = Buffers::assemble(cs, qd, ahead(), Buffers::map_staging(cs, qd, 1).unwrap())
                .unwrap();
            let run_bytes = (b.run_max * cs) as usize;
            assert_eq!(run_bytes as u64, RESTORE_IO_BYTES.max(cs), "chunks of {cs}");
            assert_eq!(b.runs.buf_size(), run_bytes, "chunks of {cs}");
            assert_eq!(b.runs.count(), b.run_bufs, "chunks of {cs}");
            assert_eq!(b.run_bufs, if cs <= 1 << 20 { 6 } else { 4 });
            assert_eq!(cs > 1 << 20, b.runs.buf_size() != ahead_size);
            match (&b.small, &b.large) {
                (Some(s), Some(l)) => {
                    assert!(cs < 1 << 20, "chunks of {cs}");
                    assert_eq!(s.buf_size() as u64, cs);
                    assert_eq!(s.count(), qd * READS_PER_QD);
                    assert_eq!(l.buf_size(), run_bytes);
                    assert_eq!(l.count(), qd / 2);
                }
                (None, None) => assert!(cs >= 1 << 20, "chunks of {cs}"),
                _ => panic!("chunks of {cs}: one staging pool without the other"),
            }
        }
        // A failed mapping ahead is made up for.
        let b = Buffers::assemble(64 << 10, qd, Err("no".into()), (None, None)).unwrap();
        assert_eq!(b.runs.count(), 6);
    }

    /// Parts are whole runs, contiguous, cover every chunk once, and are
    /// never empty (fewer parts than asked when there are fewer runs).
    #[test]
    fn parts_are_contiguous_whole_runs() {
        assert_eq!(part_bounds(600, 64, 2), [0, 320, 600]);
        assert_eq!(part_bounds(600, 64, 3), [0, 192, 384, 600]);
        assert_eq!(part_bounds(64, 64, 3), [0, 64]);
        assert_eq!(part_bounds(65, 64, 3), [0, 64, 65]);
        assert_eq!(part_bounds(0, 64, 2), [0, 0]);
        assert_eq!(part_bounds(10, 1, 0), [0, 10]);
        for chunks in [1, 63, 64, 127, 128, 129, 1000, 4099] {
            for run_max in [1, 4, 64] {
                for parts in 1..6 {
                    let b = part_bounds(chunks, run_max, parts);
                    assert_eq!((b[0], *b.last().unwrap()), (0, chunks));
                    assert!(b.len() - 1 <= parts);
                    assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
                    assert!(b[..b.len() - 1].iter().all(|x| x % run_max == 0), "{b:?}");
                }
            }
        }
    }

    #[test]
    fn weighted_parts_balance_the_work_of_a_sparse_generation() {
        // Even weights cut where chunk counts do.
        assert_eq!(
            weighted_part_bounds(&[16; 10], 600, 64, 2),
            part_bounds(600, 64, 2)
        );
        // The data in the first four of ten runs, zeros after: two parts
        // share the data rather than one getting all of it.
        let mut w = vec![16 * 64; 4];
        w.extend([64; 6]);
        assert_eq!(weighted_part_bounds(&w, 640, 64, 2), [0, 192, 640]);
        assert_eq!(part_bounds(640, 64, 2), [0, 320, 640]);
        // All the weight in the last run: nothing to cut between.
        assert_eq!(weighted_part_bounds(&[0, 0, 0, 5], 256, 64, 2), [0, 256]);
        // No weight (every chunk absent), or weights of another shape:
        // by chunk count.
        assert_eq!(
            weighted_part_bounds(&[0; 10], 600, 64, 3),
            part_bounds(600, 64, 3)
        );
        assert_eq!(
            weighted_part_bounds(&[1; 3], 600, 64, 3),
            part_bounds(600, 64, 3)
        );
        // Invariants, and balance: no part carries more than its share
        // plus one run.
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for chunks in [1u64, 63, 64, 129, 1000, 4099] {
            for run_max in [1u64, 4, 64] {
                let runs = chunks.div_ceil(run_max) as usize;
                for parts in 1..6 {
                    let w: Vec<u64> = (0..runs)
                        .map(|_| {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            [0, 1, 16, 16 * 64][(seed % 4) as usize]
                        })
                        .collect();
                    let b = weighted_part_bounds(&w, chunks, run_max, parts);
                    assert_eq!((b[0], *b.last().unwrap()), (0, chunks));
                    assert!(b.len() - 1 <= parts);
                    assert!(b.windows(2).all(|x| x[0] < x[1]), "{b:?}");
                    assert!(b[..b.len() - 1].iter().all(|x| x % run_max == 0), "{b:?}");
                    // With every part cut, none carries more than its
                    // share plus one run.
                    let total: u64 = w.iter().sum();
                    let n = b.len() as u64 - 1;
                    if total > 0 && n == parts.min(runs) as u64 {
                        let heaviest = w.iter().copied().max().unwrap_or(0);
                        for p in b.windows(2) {
                            let (r0, r1) =
                                ((p[0] / run_max) as usize, p[1].div_ceil(run_max) as usize);
                            let part: u64 = w[r0..r1].iter().sum();
                            assert!(part <= total.div_ceil(n) + heaviest, "{w:?} {b:?}");
                        }
                    }
                }
            }
        }
    }
}
