//! Restore of a generation onto a bdev, pipelined.
//!
//! [`restore_to`] is a control-path call: it loads the generation's index,
//! opens the destination for writing, and runs a poller on the `home`
//! reactor that copies the generation; the calling thread waits, reporting
//! progress. The poller keeps up to `qd` namespace reads and `qd`
//! destination writes in flight at once, so that reading the next runs
//! overlaps writing the previous ones and the destination sees a queue of
//! large writes, never one synchronous request at a time:
//!
//! * **Data chunks**: consecutive chunks stored back to back on the
//!   namespace are read with one request of up to [`RESTORE_IO_BYTES`]; each
//!   chunk's crc32c is checked against its index entry as the read
//!   completes (a mismatch stops the restore with
//!   [`RepoBdevError::Checksum`] naming the chunk), and the run is written
//!   to the destination with one request. Runs are written in the order
//!   their reads complete.
//! * **Zero chunks** are written as zeros: one write-zeroes of up to 16 MiB
//!   when the destination supports it, writes of a zeroed buffer otherwise.
//! * **Absent chunks** (outside the backup's scope) are skipped: the
//!   destination keeps what it had there.
//!
//! After the last write the destination is flushed. The first error stops
//! new I/O; the restore returns it once the I/O in flight has completed.
//! The buffers (`qd + qd / 2` of [`RESTORE_IO_BYTES`] or one chunk, the
//! larger) are allocated on `home` when the restore starts.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotcopy_bdev::{BdevChannel, BdevIo, BdevRegistry, IoStatus, IoType};
use hotcopy_runtime::{BufferPool, HugepageMode, ReactorHandle};
use serde::Serialize;

use super::common::{poll_until_finished, token, untoken, Slab, KIND_FLUSH, KIND_RUN};
use super::{common_block_size, load_index, RepoBdevError};
use crate::repo::{ChunkLoc, GenIndex};

/// The default queue depth of [`restore_to`].
pub const RESTORE_QD: usize = 16;
/// Largest read and write of a run of stored chunks: 1 MiB, the size at
/// which local disks and RAM reach their sequential bandwidth.
pub const RESTORE_IO_BYTES: u64 = 1 << 20;
/// Largest write-zeroes of a run of zero chunks.
const ZERO_RUN_BYTES: u64 = 16 << 20;
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
    /// Namespace reads and destination writes issued.
    pub reads: u64,
    pub writes: u64,
    pub elapsed: Duration,
    /// `bytes_written` over `elapsed`.
    pub mibps: f64,
}

/// One run: consecutive chunks read (if stored) and written together.
struct Op {
    first: u64,
    count: u64,
    /// Namespace byte offset of the first chunk; `None` for zero chunks.
    loc: Option<u64>,
    buf: Option<hotcopy_runtime::DmaBuf>,
}

type Outcome = Result<RestoreReport, RepoBdevError>;

struct Restorer {
    index: GenIndex,
    namespace: String,
    dest: String,
    ns: BdevChannel,
    dst: BdevChannel,
    ns_bs: u64,
    dst_bs: u64,
    cs: u64,
    bufs: BufferPool,
    run_max: u64,
    zero_max: u64,
    write_zeroes: bool,
    ops: Slab<Op>,
    /// Runs read and checked, waiting for a write slot.
    ready: VecDeque<u32>,
    reads: usize,
    writes: usize,
    qd: usize,
    cursor: u64,
    flush_sent: bool,
    flushed: bool,
    error: Option<RepoBdevError>,
    report: RestoreReport,
    start: Instant,
    done: Arc<AtomicU64>,
    comp: Vec<BdevIo>,
    /// Completions reaped while kicking a device, handled next pass.
    kicked: Vec<BdevIo>,
    tx: Option<SyncSender<Outcome>>,
}

impl Restorer {
    fn run_len(&self, first: u64, count: u64) -> u64 {
        self.index
            .source_size()
            .min((first + count) * self.cs)
            .saturating_sub(first * self.cs)
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
        }
    }

    /// One pass; returns the work done and whether the restore has ended.
    fn poll(&mut self) -> (usize, bool) {
        let mut work = 0;
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
            // Each checked run goes to the device at once, not after the
            // checks of every other read of this pass.
            if read && self.issue_writes() > 0 {
                self.kick_dst();
            }
        }
        self.comp = comp;
        let (writes, reads) = (self.issue_writes(), self.fill());
        if writes + reads > 0 {
            self.kick_dst();
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
        if self.cursor < self.index.chunks() || !self.ready.is_empty() {
            return (work, false);
        }
        if !self.flush_sent {
            self.flush_sent = true;
            self.writes += 1;
            self.dst.submit(BdevIo::flush(token(KIND_FLUSH, 0)));
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

    fn end(&mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(outcome);
        }
    }

    fn io_done(&mut self, mut io: BdevIo) {
        let (kind, idx) = untoken(io.token);
        if kind == KIND_FLUSH {
            self.writes -= 1;
            self.flushed = true;
            if !io.status.is_success() {
                let e = self.io_error(&self.dest, "flush", 0, 0, io.status);
                self.fail(e);
            }
            return;
        }
        let Some(op) = self.ops.get_mut(idx) else {
            return;
        };
        let buf = io.take_buf();
        let (first, count, loc) = (op.first, op.count, op.loc);
        let cs = self.cs;
        if io.io_type == IoType::Read {
            self.reads -= 1;
            if !io.status.is_success() {
                let e = self.io_error(
                    &self.namespace,
                    "read",
                    loc.unwrap_or(0),
                    count * cs,
                    io.status,
                );
                self.ops.remove(idx);
                return self.fail(e);
            }
            let Some(mut buf) = buf else {
                self.ops.remove(idx);
                let e = self.io_error(&self.namespace, "read", 0, 0, io.status);
                return self.fail(e);
            };
            for k in 0..count {
                let found = crc32c::crc32c(&buf[(k * cs) as usize..((k + 1) * cs) as usize]);
                let expected = self.index.resolve(first + k).map(|e| e.crc).unwrap_or(0);
                if found != expected {
                    self.ops.remove(idx);
                    return self.fail(RepoBdevError::Checksum {
                        generation: self.index.generation(),
                        namespace: self.namespace.clone(),
                        chunk: first + k,
                        offset: loc.unwrap_or(0) + k * cs,
                        expected,
                        found,
                    });
                }
            }
            buf.set_len(self.run_len(first, count) as usize);
            if let Some(op) = self.ops.get_mut(idx) {
                op.buf = Some(buf);
            }
            self.ready.push_back(idx);
            return;
        }
        // A write (or write-zeroes) came back.
        self.writes -= 1;
        self.ops.remove(idx);
        let len = self.run_len(first, count);
        if !io.status.is_success() {
            let e = self.io_error(&self.dest, "write", first * cs, len, io.status);
            return self.fail(e);
        }
        self.report.bytes_written += len;
        self.done.fetch_add(len, Ordering::Relaxed);
    }

    /// Writes runs that are read and checked, up to the queue depth.
    fn issue_writes(&mut self) -> usize {
        let mut n = 0;
        while self.writes < self.qd {
            let Some(idx) = self.ready.pop_front() else {
                break;
            };
            if self.error.is_some() {
                self.ops.remove(idx);
                continue;
            }
            let Some(op) = self.ops.get_mut(idx) else {
                continue;
            };
            let Some(buf) = op.buf.take() else {
                continue;
            };
            let b = self.dst_bs;
            let blocks = buf.len() as u64 / b;
            let at = op.first * self.cs / b;
            self.writes += 1;
            self.report.writes += 1;
            self.dst
                .submit(BdevIo::write(at, blocks, buf, token(KIND_RUN, idx)));
            n += 1;
        }
        n
    }

    /// Starts new runs while there is room.
    fn fill(&mut self) -> usize {
        let mut n = 0;
        let chunks = self.index.chunks();
        let cs = self.cs;
        while self.error.is_none() {
            while self.cursor < chunks
                && matches!(
                    self.index.resolve(self.cursor).map(|e| e.loc),
                    Some(ChunkLoc::Absent)
                )
            {
                self.report.absent_chunks += 1;
                let len = self.run_len(self.cursor, 1);
                self.done.fetch_add(len, Ordering::Relaxed);
                self.cursor += 1;
            }
            if self.cursor >= chunks {
                break;
            }
            let first = self.cursor;
            match self.index.resolve(first).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => {
                    if self.reads >= self.qd {
                        break;
                    }
                    let Some(mut buf) = self.bufs.get((self.run_max * cs) as usize) else {
                        break;
                    };
                    let mut count = 1;
                    while count < self.run_max
                        && first + count < chunks
                        && self.index.resolve(first + count).map(|e| e.loc)
                            == Some(ChunkLoc::Data(loc + count * cs))
                    {
                        count += 1;
                    }
                    buf.set_len((count * cs) as usize);
                    let idx = self.ops.insert(Op {
                        first,
                        count,
                        loc: Some(loc),
                        buf: None,
                    });
                    let b = self.ns_bs;
                    self.reads += 1;
                    self.report.reads += 1;
                    self.report.data_chunks += count;
                    self.ns.submit(BdevIo::read(
                        loc / b,
                        count * cs / b,
                        buf,
                        token(KIND_RUN, idx),
                    ));
                    self.cursor += count;
                }
                _ => {
                    if self.writes >= self.qd {
                        break;
                    }
                    let max = if self.write_zeroes {
                        self.zero_max
                    } else {
                        self.run_max
                    };
                    let mut count = 1;
                    while count < max
                        && first + count < chunks
                        && self.index.resolve(first + count).map(|e| e.loc) == Some(ChunkLoc::Zero)
                    {
                        count += 1;
                    }
                    let len = self.run_len(first, count);
                    let b = self.dst_bs;
                    let idx = self.ops.insert(Op {
                        first,
                        count,
                        loc: None,
                        buf: None,
                    });
                    let t = token(KIND_RUN, idx);
                    if self.write_zeroes {
                        self.dst
                            .submit(BdevIo::write_zeroes(first * cs / b, len / b, t));
                    } else {
                        let Some(mut buf) = self.bufs.get(len as usize) else {
                            self.ops.remove(idx);
                            break;
                        };
                        buf.fill(0);
                        self.dst
                            .submit(BdevIo::write(first * cs / b, len / b, buf, t));
                    }
                    self.writes += 1;
                    self.report.writes += 1;
                    self.report.zero_chunks += count;
                    self.cursor += count;
                }
            }
            n += 1;
        }
        n
    }
}

/// Restores generation `generation` of the repository on `namespace` onto
/// the bdev `dest` (see the module docs), with a poller on `home` keeping
/// `qd` reads and `qd` writes in flight (0 means [`RESTORE_QD`]).
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
    mut progress: impl FnMut(u64, u64),
) -> Result<RestoreReport, RepoBdevError> {
    let ns = reg.open(namespace, false)?;
    let index = load_index(&ns, generation)?;
    let dst = reg.open(dest, true)?;
    let what = format!("restore of generation {generation} to {dest}");
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
    let qd = if qd == 0 { RESTORE_QD } else { qd };
    let cs = index.chunk_size() as u64;
    let run_max = (RESTORE_IO_BYTES / cs).max(1);
    let write_zeroes = dst.bdev().supports(IoType::WriteZeroes);
    let can_flush = dst.bdev().supports(IoType::Flush);
    let zero_max = if write_zeroes {
        (ZERO_RUN_BYTES / cs).max(run_max)
    } else {
        run_max
    };
    let done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = sync_channel::<Outcome>(1);
    let engine_done = done.clone();
    let (namespace, dest) = (namespace.to_string(), dest.to_string());
    let report = RestoreReport {
        generation,
        bytes_total: total,
        bytes_written: 0,
        data_chunks: 0,
        zero_chunks: 0,
        absent_chunks: 0,
        reads: 0,
        writes: 0,
        elapsed: Duration::ZERO,
        mibps: 0.0,
    };
    let started = home
        .exec(move || -> Result<(), String> {
            let bufs = BufferPool::new(
                (run_max * cs) as usize,
                qd + qd.div_ceil(2),
                HugepageMode::Auto,
            )
            .map_err(|e| format!("restore buffers: {e}"))?;
            let nsch = ns.channel().map_err(|e| e.to_string())?;
            let dstch = dst.channel().map_err(|e| e.to_string())?;
            let mut r = Restorer {
                ns_bs: nsch.block_size() as u64,
                dst_bs: dstch.block_size() as u64,
                ns: nsch,
                dst: dstch,
                cs,
                bufs,
                run_max,
                zero_max,
                write_zeroes,
                ops: Slab::new(2 * qd),
                ready: VecDeque::with_capacity(2 * qd),
                reads: 0,
                writes: 0,
                qd,
                cursor: 0,
                flush_sent: !can_flush,
                flushed: !can_flush,
                error: None,
                report,
                start: Instant::now(),
                done: engine_done,
                comp: Vec::with_capacity(4 * qd),
                kicked: Vec::with_capacity(4 * qd),
                tx: Some(tx),
                index,
                namespace,
                dest,
            };
            poll_until_finished("repo_restore", move || r.poll());
            Ok(())
        })
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    if let Err(why) = started {
        return Err(RepoBdevError::Reactor {
            core: home.core(),
            why,
        });
    }
    let mut last = u64::MAX;
    loop {
        match rx.recv_timeout(PROGRESS_EVERY) {
            Ok(outcome) => {
                let d = done.load(Ordering::Relaxed);
                if d != last {
                    progress(d, total);
                }
                return outcome;
            }
            Err(RecvTimeoutError::Timeout) => {
                let d = done.load(Ordering::Relaxed);
                if d != last {
                    progress(d, total);
                    last = d;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(RepoBdevError::Reactor {
                    core: home.core(),
                    why: "the restore poller went away without a result (reactor stopped?)".into(),
                })
            }
        }
    }
}
