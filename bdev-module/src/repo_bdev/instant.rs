//! Instant restore: a bdev that serves a generation at once while a
//! background poller copies it onto the target.
//!
//! [`start_instant_restore`] claims the target bdev, registers a bdev
//! (product `repo_instant`) of the generation's source size, and starts a
//! *hydrator* poller on the `home` reactor that copies the generation onto
//! the target chunk by chunk. Hosts read and write the new bdev from the
//! first moment; the target holds the restored volume once every chunk is
//! done.
//!
//! # Chunk states
//! One atomic byte per chunk, every transition a compare-and-swap, so that
//! exactly one owner (the hydrator, or one host write on any core) copies
//! each chunk:
//!
//! ```text
//!   Pending ──(host read)──► Hot          (queued for the hydrator, once)
//!   Pending | Hot ──(owner wins the CAS)──► Hydrating ──(target written)──► Done
//!   Hydrating ──(read or write failed)──► Hot   (queued again)
//! ```
//!
//! Chunks outside the backup's scope (`Absent`) start `Done`: their target
//! content is left as it is and served from the target.
//!
//! # Host I/O
//! * **Read** of a `Done` chunk: from the target. Of any other chunk: from
//!   the backup directly (zeros for `Zero` chunks, no I/O), never waiting
//!   for hydration; a `Pending` chunk becomes `Hot` and goes on the hot
//!   queue, so the hydrator copies chunks the hosts touch first. A read
//!   whose chunks are all `Done`, or all stored back to back on the
//!   namespace, goes to that device whole with no copy; others are split
//!   per chunk through bounce buffers.
//! * **Write** to a `Done` chunk: to the target. To a `Pending` or `Hot`
//!   chunk: the writer takes it (`Hydrating`), reads the whole chunk from the
//!   backup (checking its crc32c; a whole-chunk write skips the read),
//!   applies its bytes to that buffer and writes the chunk to the target in
//!   one write; then the chunk is `Done` and the write completes. To a
//!   `Hydrating` chunk: it waits (rechecked at every poll of its channel)
//!   until the owner has written the target, then goes to the target.
//! * **Flush** goes to the target.
//!
//! Why a hydration never overwrites a host's newer write: a host write
//! reaches the target only when its chunk is `Done`, and a chunk becomes
//! `Done` only after its single hydration write completed; no hydration
//! write is issued for a chunk that is not `Hydrating` under the issuer's
//! ownership. So the hydration read in flight when a host write arrives is
//! followed by the hydration write, then by the held host write, in that
//! order. A read returns backup data only for a chunk not yet `Done`, which
//! no completed host write has touched.
//!
//! When every chunk is `Done` the bdev is a plain passthrough: each I/O goes
//! to the target untouched.
//!
//! # Hydrator
//! A poller on `home` with its own channels to the namespace and the
//! target keeps up to [`InstantTuning::qd`] runs in flight. It takes chunks
//! from the hot queue first, then in order from a cursor. A run is one
//! chunk plus the following chunks that are free to take and of the same
//! kind: `Data` chunks stored back to back on the namespace (read in one
//! request of up to [`InstantTuning::run_bytes`], crc32c checked, written in
//! one request), or `Zero` chunks (one write-zeroes when the target supports
//! it, a write of zeros otherwise). When all chunks are done it flushes the
//! target and the restore is [`RestoreState::Complete`].
//!
//! A failed namespace read, a checksum mismatch or a failed target write
//! fails the restore ([`RestoreState::Failed`], with the error in
//! [`InstantStatus::error`]); the chunks of the run go back to `Hot`. Hosts
//! carry on: reads of chunks not done still come from the backup (failing
//! with the device's error while it fails), and writes still hydrate their
//! chunks themselves. [`InstantRestore::cancel`] stops the hydrator the same
//! way ([`RestoreState::Cancelled`]). The bdev keeps its claim on the target
//! until it is unregistered and the hydrator has stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;
use hotcopy_bdev::{
    BackendChannel, Bdev, BdevBackend, BdevChannel, BdevDesc, BdevError, BdevInfo, BdevIo,
    BdevRegistry, Claim, IoError, IoStatus, IoType,
};
use hotcopy_runtime::{clock, BufferPool, DmaBuf, HugepageMode, ReactorHandle};
use serde::Serialize;

use super::common::{
    bounce_pool, bump, failed, piece_chan, poll_until_finished, token, translate, untoken, Part,
    PieceChan, Pieces, Slab, Span, Src, INTERNAL, KIND_FLUSH, KIND_PIECE, KIND_RUN,
};
use super::{common_block_size, load_index, RepoBdevError, EIO};
use crate::repo::{ChunkLoc, GenIndex};

/// How the hydrator runs.
#[derive(Debug, Clone)]
pub struct InstantTuning {
    /// Runs in flight at once.
    pub qd: usize,
    /// Largest read (and write) of a run of stored chunks, in bytes.
    pub run_bytes: u64,
    /// Room in the hot queue; a chunk that finds it full is left to the
    /// cursor.
    pub hot_queue: usize,
    /// Runs in flight while hosts are doing I/O (any within the last
    /// `busy_window`): the hydrator steps aside so that a host's first read,
    /// which goes to the backup, does not queue behind megabytes of
    /// hydration on the same devices.
    pub busy_qd: usize,
    pub busy_window: std::time::Duration,
}

impl Default for InstantTuning {
    /// 16 runs of up to 1 MiB: a sequential stream that keeps a local disk
    /// or a RAM namespace busy, and a queue of 4096 hot chunks.
    fn default() -> Self {
        InstantTuning {
            qd: 16,
            run_bytes: 1 << 20,
            hot_queue: 4096,
            busy_qd: 2,
            busy_window: std::time::Duration::from_millis(2),
        }
    }
}

/// Zero runs with write-zeroes are not bounded by a buffer: up to this.
const ZERO_RUN_BYTES: u64 = 16 << 20;

/// The hydration state of one chunk (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[repr(u8)]
pub enum HydState {
    Pending = 0,
    /// Pending, and on the hot queue.
    Hot = 1,
    Hydrating = 2,
    Done = 3,
}

impl HydState {
    fn from_u8(v: u8) -> HydState {
        match v {
            0 => HydState::Pending,
            1 => HydState::Hot,
            2 => HydState::Hydrating,
            _ => HydState::Done,
        }
    }

    #[inline]
    fn is_free(self) -> bool {
        matches!(self, HydState::Pending | HydState::Hot)
    }
}

/// Where an instant restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[repr(u8)]
pub enum RestoreState {
    /// The hydrator is copying chunks.
    Running = 0,
    /// Every chunk is on the target, flushed; the bdev is a passthrough.
    Complete = 1,
    /// The hydrator stopped on an error (see the status).
    Failed = 2,
    /// The hydrator was stopped by [`InstantRestore::cancel`].
    Cancelled = 3,
}

impl RestoreState {
    fn from_u8(v: u8) -> RestoreState {
        match v {
            0 => RestoreState::Running,
            1 => RestoreState::Complete,
            2 => RestoreState::Failed,
            _ => RestoreState::Cancelled,
        }
    }
}

/// A snapshot of an instant restore's figures.
#[derive(Debug, Clone, Serialize)]
pub struct InstantStatus {
    pub generation: u64,
    pub target: String,
    pub state: RestoreState,
    pub error: Option<String>,
    pub chunk_size: u64,
    pub chunks_total: u64,
    /// Chunks on the target (hydrated, written whole by hosts, or absent).
    pub chunks_done: u64,
    /// Bytes the hydrator wrote to the target.
    pub bytes_hydrated: u64,
    /// Runs the hydrator started from the hot queue.
    pub hot_runs: u64,
    /// Chunks host writes hydrated themselves.
    pub host_hydrations: u64,
    pub elapsed_s: f64,
    /// The hydrator's rate, `bytes_hydrated` over the elapsed time.
    pub mibps: f64,
    /// Host reads served from the backup / from the target (requests or
    /// pieces), and filled with zeros.
    pub reads_from_backup: u64,
    pub reads_from_target: u64,
    pub zero_filled: u64,
    pub host_reads: u64,
    pub host_writes: u64,
    pub host_failed: u64,
    /// Write pieces that waited for another owner's hydration.
    pub write_waits: u64,
    /// Chunks whose backup data did not match its crc32c.
    pub checksum_errors: u64,
}

/// Per-channel counters (each written only by its channel).
#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    failed: AtomicU64,
    from_backup: AtomicU64,
    from_target: AtomicU64,
    zero_filled: AtomicU64,
    host_hydrations: AtomicU64,
    write_waits: AtomicU64,
    bounce_waits: AtomicU64,
    checksum_errors: AtomicU64,
}

struct IrShared {
    name: String,
    target: String,
    index: GenIndex,
    cs: u64,
    bs: u64,
    chunks: u64,
    ns: BdevDesc,
    tgt: BdevDesc,
    map: Box<[AtomicU8]>,
    done: AtomicU64,
    all_done: AtomicBool,
    hot: ArrayQueue<u64>,
    /// Set when a chunk went back to `Hot` without a place on the hot
    /// queue: the cursor must sweep again.
    rescan: AtomicBool,
    state: AtomicU8,
    cancel: AtomicBool,
    error: Mutex<Option<String>>,
    bytes_hydrated: AtomicU64,
    hot_runs: AtomicU64,
    checksum_errors: AtomicU64,
    /// When a host last submitted I/O (TSC ticks).
    host_tick: AtomicU64,
    start: Instant,
    /// Nanoseconds from `start` to the end of the hydrator (0 while running).
    elapsed_ns: AtomicU64,
    channels: Mutex<Vec<Arc<Counters>>>,
}

impl IrShared {
    #[inline]
    fn state_of(&self, c: u64) -> HydState {
        HydState::from_u8(self.map[c as usize].load(Ordering::Acquire))
    }

    #[inline]
    fn take(&self, c: u64, from: HydState) -> bool {
        self.map[c as usize]
            .compare_exchange(
                from as u8,
                HydState::Hydrating as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The owner of `c` has written it to the target.
    #[inline]
    fn chunk_done(&self, c: u64) {
        self.map[c as usize].store(HydState::Done as u8, Ordering::Release);
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.chunks {
            self.all_done.store(true, Ordering::Release);
        }
    }

    /// The owner of `c` gives it back after a failure.
    #[inline]
    fn requeue(&self, c: u64) {
        self.map[c as usize].store(HydState::Hot as u8, Ordering::Release);
        if self.hot.push(c).is_err() {
            self.rescan.store(true, Ordering::Release);
        }
    }

    /// A host read touched `c`, which is not done.
    #[inline]
    fn mark_hot(&self, c: u64) {
        let cell = &self.map[c as usize];
        if cell.load(Ordering::Relaxed) == HydState::Pending as u8
            && cell
                .compare_exchange(
                    HydState::Pending as u8,
                    HydState::Hot as u8,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            && self.hot.push(c).is_err()
        {
            self.rescan.store(true, Ordering::Release);
        }
    }

    /// Bytes of the source in chunks `first..first + count`.
    #[inline]
    fn run_len(&self, first: u64, count: u64) -> u64 {
        self.index
            .source_size()
            .min((first + count) * self.cs)
            .saturating_sub(first * self.cs)
    }

    fn state(&self) -> RestoreState {
        RestoreState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn end(&self, state: RestoreState) {
        let ns = self.start.elapsed().as_nanos().max(1) as u64;
        self.elapsed_ns.store(ns, Ordering::Relaxed);
        self.state.store(state as u8, Ordering::Release);
    }

    fn record_error(&self, why: String) {
        let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            tracing::warn!(bdev = %self.name, "instant restore: {why}");
            *e = Some(why);
        }
    }
}

/// A handle on an instant restore: status, wait, cancel.
#[derive(Clone)]
pub struct InstantRestore {
    sh: Arc<IrShared>,
}

impl std::fmt::Debug for InstantRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstantRestore")
            .field("name", &self.sh.name)
            .field("generation", &self.sh.index.generation())
            .field("target", &self.sh.target)
            .field("state", &self.sh.state())
            .finish()
    }
}

impl InstantRestore {
    pub fn state(&self) -> RestoreState {
        self.sh.state()
    }

    /// Waits until the hydrator stops (or `timeout` passes); returns the state.
    pub fn wait(&self, timeout: Duration) -> RestoreState {
        let deadline = Instant::now() + timeout;
        while self.sh.state() == RestoreState::Running && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.sh.state()
    }

    /// Stops the hydrator after the runs in flight; the bdev keeps serving
    /// (chunks not done from the backup).
    pub fn cancel(&self) {
        self.sh.cancel.store(true, Ordering::Relaxed);
    }

    /// The state of one chunk (`None` past the end).
    pub fn chunk_state(&self, chunk: u64) -> Option<HydState> {
        (chunk < self.sh.chunks).then(|| self.sh.state_of(chunk))
    }

    /// Whether every chunk is done (the bdev passes I/O straight through).
    pub fn is_passthrough(&self) -> bool {
        self.sh.all_done.load(Ordering::Acquire)
    }

    pub fn status(&self) -> InstantStatus {
        let sh = &*self.sh;
        let elapsed = match sh.elapsed_ns.load(Ordering::Relaxed) {
            0 => sh.start.elapsed(),
            ns => Duration::from_nanos(ns),
        };
        let secs = elapsed.as_secs_f64().max(1e-9);
        let hydrated = sh.bytes_hydrated.load(Ordering::Relaxed);
        let mut s = InstantStatus {
            generation: sh.index.generation(),
            target: sh.target.clone(),
            state: sh.state(),
            error: sh.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            chunk_size: sh.cs,
            chunks_total: sh.chunks,
            chunks_done: sh.done.load(Ordering::Relaxed),
            bytes_hydrated: hydrated,
            hot_runs: sh.hot_runs.load(Ordering::Relaxed),
            host_hydrations: 0,
            elapsed_s: secs,
            mibps: hydrated as f64 / secs / (1024.0 * 1024.0),
            reads_from_backup: 0,
            reads_from_target: 0,
            zero_filled: 0,
            host_reads: 0,
            host_writes: 0,
            host_failed: 0,
            write_waits: 0,
            checksum_errors: sh.checksum_errors.load(Ordering::Relaxed),
        };
        let chans = sh.channels.lock().unwrap_or_else(|e| e.into_inner());
        for c in chans.iter() {
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            s.host_hydrations += l(&c.host_hydrations);
            s.reads_from_backup += l(&c.from_backup);
            s.reads_from_target += l(&c.from_target);
            s.zero_filled += l(&c.zero_filled);
            s.host_reads += l(&c.reads);
            s.host_writes += l(&c.writes);
            s.host_failed += l(&c.failed);
            s.write_waits += l(&c.write_waits);
            s.checksum_errors += l(&c.checksum_errors);
        }
        s
    }
}

/// The instant-restore bdev's module object (find it with
/// `Bdev::backend::<InstantBdev>()`).
pub struct InstantBdev {
    sh: Arc<IrShared>,
    _claim: Arc<Claim>,
}

impl InstantBdev {
    pub fn handle(&self) -> InstantRestore {
        InstantRestore {
            sh: self.sh.clone(),
        }
    }
}

impl BdevBackend for InstantBdev {
    fn supports(&self, io_type: IoType) -> bool {
        matches!(io_type, IoType::Read | IoType::Write)
            || (io_type == IoType::Flush && self.sh.tgt.bdev().supports(IoType::Flush))
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let sh = &self.sh;
        let bufs = bounce_pool(&sh.name, sh.cs)?;
        let ns = sh.ns.channel()?;
        let tgt = sh.tgt.channel()?;
        let counters = Arc::new(Counters::default());
        sh.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(counters.clone());
        Ok(Box::new(IrChannel {
            sh: sh.clone(),
            st: ChanState {
                core: Pieces::new(ns, bufs, counters),
                tgt_bs: tgt.block_size() as u64,
                tgt,
            },
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not submitted (new, waiting, or starved).
    Idle,
    /// Reading its bytes into its buffer.
    Read,
    /// Reading its whole chunk from the backup, as the chunk's owner.
    HydRead,
    /// Writing to the target; with `hyd`, the whole chunk, as its owner.
    Write { hyd: bool },
}

struct IrChannel {
    sh: Arc<IrShared>,
    st: ChanState,
}

struct ChanState {
    /// The backup's channel and the pieces; its `waiting` pieces wait for
    /// another owner's hydration of their chunk.
    core: Pieces<Phase, Counters>,
    tgt: BdevChannel,
    tgt_bs: u64,
}

impl ChanState {
    /// Host I/O handed to the target untouched (its completion comes back
    /// with the host's token).
    #[inline]
    fn pass(&mut self, io: BdevIo) {
        let c = &self.core.ctr;
        match io.io_type {
            IoType::Read => {
                bump(&c.reads);
                bump(&c.from_target);
            }
            IoType::Write => bump(&c.writes),
            _ => {}
        }
        self.tgt.submit(io);
    }

    fn read(&mut self, sh: &IrShared, mut io: BdevIo) {
        let (bs, cs) = (sh.bs, sh.cs);
        let Some(Span { start, len, c0, c1 }) = Span::of(&io, bs, cs) else {
            return self.core.finish(io, IoStatus::Success);
        };
        let (mut done, mut first, mut contiguous) = (true, None, true);
        for c in c0..=c1 {
            if sh.state_of(c) == HydState::Done {
                contiguous = false;
                continue;
            }
            done = false;
            sh.mark_hot(c);
            match sh.index.resolve(c).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => match first {
                    None if c == c0 => first = Some(loc),
                    Some(f) if loc == f + (c - c0) * cs => {}
                    _ => contiguous = false,
                },
                _ => contiguous = false,
            }
        }
        if done {
            return self.pass(io);
        }
        match first {
            Some(f) if contiguous => {
                bump(&self.core.ctr.from_backup);
                let byte = f + (start - c0 * cs);
                translate(&mut io, &mut self.core.fwds, bs, self.core.ns_bs, byte);
                self.core.ns.submit(io);
            }
            _ => self.split(sh, cs, io, start, len, c0, c1, false),
        }
    }

    fn write(&mut self, sh: &IrShared, io: BdevIo) {
        let (bs, cs) = (sh.bs, sh.cs);
        let Some(Span { start, len, c0, c1 }) = Span::of(&io, bs, cs) else {
            return self.core.finish(io, IoStatus::Success);
        };
        if (c0..=c1).all(|c| sh.state_of(c) == HydState::Done) {
            return self.pass(io);
        }
        self.split(sh, cs, io, start, len, c0, c1, true);
    }

    fn dispatch_read(&mut self, sh: &IrShared, p: u32, part: Part) {
        let Part { chunk, off, .. } = part;
        let src = if sh.state_of(chunk) == HydState::Done {
            Src::Dev(chunk * sh.cs + off)
        } else {
            sh.mark_hot(chunk);
            match sh.index.resolve(chunk).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => Src::Backup(loc + off),
                Some(ChunkLoc::Zero) => Src::Zeros,
                // Absent chunks start done; the target holds them.
                _ => Src::Dev(chunk * sh.cs + off),
            }
        };
        if let Some((byte, buf)) = self.core.start_read_from(sh.cs, p, part, src) {
            bump(&self.core.ctr.from_target);
            let (b, n) = (self.tgt_bs, buf.len() as u64);
            self.tgt
                .submit(BdevIo::read(byte / b, n / b, buf, token(KIND_PIECE, p)));
        }
    }

    fn dispatch_write(&mut self, sh: &IrShared, p: u32, part: Part) {
        let Part {
            chunk, off, len, ..
        } = part;
        let cs = sh.cs;
        loop {
            let s = sh.state_of(chunk);
            if s == HydState::Hydrating {
                return self.core.park_write(p);
            }
            let Some(mut buf) = self.core.buffer(cs, p) else {
                return;
            };
            if s == HydState::Done {
                buf.set_len(len as usize);
                self.core.fill_from_host(p, &mut buf, 0);
                return self.submit_target_write(p, buf, chunk * cs + off, false);
            }
            // Pending or Hot: take the chunk (holding a buffer first, so
            // that an owner never waits for one).
            if !sh.take(chunk, s) {
                self.core.pieces.get_mut(p).expect("live piece").buf = Some(buf);
                continue;
            }
            bump(&self.core.ctr.host_hydrations);
            let chunk_len = sh.index.chunk_len(chunk);
            if off == 0 && len == chunk_len {
                buf.set_len(len as usize);
                self.core.fill_from_host(p, &mut buf, 0);
                return self.submit_target_write(p, buf, chunk * cs, true);
            }
            match sh.index.resolve(chunk).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => self.core.read_chunk(p, loc, cs, buf, Phase::HydRead),
                _ => {
                    buf.set_len(chunk_len as usize);
                    buf.fill(0);
                    self.core.fill_from_host(p, &mut buf, off);
                    self.submit_target_write(p, buf, chunk * cs, true);
                }
            }
            return;
        }
    }

    fn submit_target_write(&mut self, p: u32, buf: DmaBuf, byte: u64, hyd: bool) {
        let b = self.tgt_bs;
        let n = buf.len() as u64 / b;
        if let Some(piece) = self.core.pieces.get_mut(p) {
            piece.phase = Phase::Write { hyd };
        }
        self.tgt
            .submit(BdevIo::write(byte / b, n, buf, token(KIND_PIECE, p)));
    }

    fn piece_io_done(&mut self, sh: &IrShared, p: u32, mut io: BdevIo) {
        let Some(piece) = self.core.pieces.get_mut(p) else {
            return;
        };
        let buf = io.take_buf();
        let phase = std::mem::replace(&mut piece.phase, Phase::Idle);
        let (chunk, off) = (piece.chunk, piece.off);
        match phase {
            Phase::Idle => {}
            Phase::Read => self.core.read_done(p, io.status, buf),
            Phase::HydRead => {
                let Some(mut buf) = buf.filter(|_| io.status.is_success()) else {
                    sh.requeue(chunk);
                    return self.core.finish_piece(p, failed(io.status));
                };
                let expected = sh.index.resolve(chunk).map(|e| e.crc).unwrap_or(0);
                if crc32c::crc32c(&buf) != expected {
                    bump(&self.core.ctr.checksum_errors);
                    sh.requeue(chunk);
                    return self
                        .core
                        .finish_piece(p, IoStatus::Failed(IoError::Device(EIO)));
                }
                buf.set_len(sh.index.chunk_len(chunk) as usize);
                self.core.fill_from_host(p, &mut buf, off);
                self.submit_target_write(p, buf, chunk * sh.cs, true);
            }
            Phase::Write { hyd } => {
                if hyd {
                    if io.status.is_success() {
                        sh.chunk_done(chunk);
                    } else {
                        sh.requeue(chunk);
                    }
                }
                self.core.finish_piece(p, io.status);
            }
        }
    }
}

piece_chan!(ChanState, IrShared, Phase, Counters);

impl BackendChannel for IrChannel {
    fn submit(&mut self, io: BdevIo) {
        let (sh, st) = (&*self.sh, &mut self.st);
        if sh.all_done.load(Ordering::Acquire) {
            return st.pass(io);
        }
        // Hosts are active: the hydrator narrows its queue for a moment.
        sh.host_tick.store(clock::ticks(), Ordering::Relaxed);
        match io.io_type {
            IoType::Read => st.read(sh, io),
            IoType::Write => st.write(sh, io),
            IoType::Flush => st.tgt.submit(io),
            _ => st.core.unsupported(io),
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let (sh, st) = (&*self.sh, &mut self.st);
        if st.core.pieces.is_empty() && st.core.fwds.is_empty() && st.core.ready.is_empty() {
            // No internal I/O exists: every completion is the host's.
            return st.tgt.poll(done);
        }
        let mut n = 0;
        let mut comp = st.core.take_completions();
        if st.tgt.inflight() > 0 {
            st.tgt.poll(&mut |io| {
                if io.token & INTERNAL != 0 {
                    comp.push(io);
                } else {
                    n += 1;
                    done(io);
                }
            });
        }
        n + st.end_poll(sh, comp, done)
    }
}

// ---- The hydrator ------------------------------------------------------------

/// Consecutive chunks the hydrator copies with one read and one write.
struct Run {
    first: u64,
    count: u64,
    /// Namespace byte offset of the first chunk; `None` for zero chunks.
    loc: Option<u64>,
    writing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    NotYet,
    InFlight,
    Done,
}

struct Hydrator {
    sh: Arc<IrShared>,
    /// Keeps the target claimed while runs may still write to it.
    _claim: Arc<Claim>,
    ns: BdevChannel,
    tgt: BdevChannel,
    ns_bs: u64,
    tgt_bs: u64,
    bufs: BufferPool,
    /// Largest run of stored chunks, and of zero chunks.
    run_max: u64,
    zero_max: u64,
    write_zeroes: bool,
    /// Runs in flight while hosts are busy, and how recent their last I/O
    /// must be for that (ticks).
    busy_qd: usize,
    busy_ticks: u64,
    runs: Slab<Run>,
    qd: usize,
    cursor: u64,
    flush: Flush,
    failed: bool,
    comp: Vec<BdevIo>,
    /// Completions reaped while handing submissions to the devices.
    kicked: Vec<BdevIo>,
}

impl Hydrator {
    fn new(sh: Arc<IrShared>, claim: Arc<Claim>, tuning: &InstantTuning) -> Result<Self, String> {
        let cs = sh.cs;
        let qd = tuning.qd.max(1);
        let busy_qd = tuning.busy_qd.clamp(1, qd);
        let busy_ticks = clock::duration_to_ticks(tuning.busy_window);
        let run_max = (tuning.run_bytes / cs).max(1);
        let write_zeroes = sh.tgt.bdev().supports(IoType::WriteZeroes);
        let zero_max = if write_zeroes {
            (ZERO_RUN_BYTES / cs).max(run_max)
        } else {
            run_max
        };
        let bufs = BufferPool::new((run_max * cs) as usize, qd, HugepageMode::Auto)
            .map_err(|e| format!("hydration buffers: {e}"))?;
        let ns = sh.ns.channel().map_err(|e| e.to_string())?;
        let tgt = sh.tgt.channel().map_err(|e| e.to_string())?;
        Ok(Hydrator {
            ns_bs: ns.block_size() as u64,
            tgt_bs: tgt.block_size() as u64,
            ns,
            tgt,
            bufs,
            run_max,
            zero_max,
            write_zeroes,
            runs: Slab::new(qd),
            qd,
            busy_qd,
            busy_ticks,
            cursor: 0,
            // A target that takes no flush is durable as written.
            flush: if sh.tgt.bdev().supports(IoType::Flush) {
                Flush::NotYet
            } else {
                Flush::Done
            },
            failed: false,
            comp: Vec::with_capacity(2 * qd),
            kicked: Vec::with_capacity(2 * qd),
            sh,
            _claim: claim,
        })
    }

    /// One pass: completions, new runs, the end. Returns the work done and
    /// whether the hydrator has finished.
    fn poll(&mut self) -> (usize, bool) {
        let mut work = 0;
        let mut comp = std::mem::take(&mut self.comp);
        comp.append(&mut self.kicked);
        if self.tgt.inflight() > 0 {
            self.tgt.poll(&mut |io| comp.push(io));
        }
        if self.ns.inflight() > 0 {
            self.ns.poll(&mut |io| comp.push(io));
        }
        for io in comp.drain(..) {
            work += 1;
            self.io_done(io);
        }
        self.comp = comp;
        if work > 0 {
            // The writes of the runs just read go to the device before this
            // pass's new reads (a namespace in memory reads by memcpy here).
            let kicked = &mut self.kicked;
            self.tgt.poll(&mut |io| kicked.push(io));
        }
        let stop = self.failed || self.sh.cancel.load(Ordering::Relaxed);
        let now = clock::ticks();
        let qd = if now.saturating_sub(self.sh.host_tick.load(Ordering::Relaxed)) < self.busy_ticks
        {
            self.busy_qd
        } else {
            self.qd
        };
        if !stop {
            while self.runs.len() < qd {
                let Some(run) = self.next_run() else { break };
                work += 1;
                self.start(run);
            }
        }
        if work > 0 {
            // Hand this pass's submissions to the devices now (a queue pair
            // enters the kernel when polled); what that reaps waits for the
            // next pass.
            let kicked = &mut self.kicked;
            self.tgt.poll(&mut |io| kicked.push(io));
            self.ns.poll(&mut |io| kicked.push(io));
        }
        if !self.runs.is_empty() || self.flush == Flush::InFlight {
            return (work, false);
        }
        if self.failed {
            self.sh.end(RestoreState::Failed);
            return (work, true);
        }
        if self.sh.done.load(Ordering::Acquire) == self.sh.chunks {
            if self.flush == Flush::Done {
                self.sh.end(RestoreState::Complete);
                return (work, true);
            }
            self.flush = Flush::InFlight;
            self.tgt.submit(BdevIo::flush(token(KIND_FLUSH, 0)));
            return (work + 1, false);
        }
        if self.sh.cancel.load(Ordering::Relaxed) {
            self.sh.end(RestoreState::Cancelled);
            return (work, true);
        }
        (work, false)
    }

    fn fail(&mut self, why: String) {
        self.failed = true;
        self.sh.record_error(why);
    }

    /// Gives the chunks of run `r` back after a failure.
    fn release(&mut self, r: u32) {
        if let Some(run) = self.runs.remove(r) {
            for c in run.first..run.first + run.count {
                self.sh.requeue(c);
            }
        }
    }

    fn io_done(&mut self, mut io: BdevIo) {
        let (kind, r) = untoken(io.token);
        if kind == KIND_FLUSH {
            match io.status {
                IoStatus::Success => self.flush = Flush::Done,
                s => {
                    self.flush = Flush::NotYet;
                    let why = format!(
                        "flush of the target {} failed: {}",
                        self.sh.target,
                        status_text(s)
                    );
                    self.fail(why);
                }
            }
            return;
        }
        let Some(run) = self.runs.get_mut(r) else {
            return;
        };
        let (first, count, loc, writing) = (run.first, run.count, run.loc, run.writing);
        let sh = self.sh.clone();
        let cs = sh.cs;
        let buf = io.take_buf();
        if !io.status.is_success() {
            let what = if writing {
                format!(
                    "write of chunks {first}..{} to the target {} failed",
                    first + count,
                    sh.target
                )
            } else {
                format!(
                    "read of chunks {first}..{} from the namespace {} at byte {} failed",
                    first + count,
                    sh.ns.bdev().name(),
                    loc.unwrap_or(0)
                )
            };
            self.fail(format!("{what}: {}", status_text(io.status)));
            return self.release(r);
        }
        if writing {
            for c in first..first + count {
                sh.chunk_done(c);
            }
            sh.bytes_hydrated
                .fetch_add(sh.run_len(first, count), Ordering::Relaxed);
            self.runs.remove(r);
            return;
        }
        // A read of stored chunks: check them, then write them.
        let Some(mut buf) = buf else {
            self.fail("a namespace read came back without its buffer".into());
            return self.release(r);
        };
        for k in 0..count {
            let bytes = &buf[(k * cs) as usize..((k + 1) * cs) as usize];
            let found = crc32c::crc32c(bytes);
            let expected = sh.index.resolve(first + k).map(|e| e.crc).unwrap_or(0);
            if found != expected {
                sh.checksum_errors.fetch_add(1, Ordering::Relaxed);
                self.fail(format!(
                    "generation {} chunk {} (data at byte {} of {}): crc32c expected {expected:#010x}, found {found:#010x}",
                    sh.index.generation(),
                    first + k,
                    loc.unwrap_or(0) + k * cs,
                    sh.ns.bdev().name()
                ));
                return self.release(r);
            }
        }
        let len = sh.run_len(first, count);
        buf.set_len(len as usize);
        if let Some(run) = self.runs.get_mut(r) {
            run.writing = true;
        }
        let b = self.tgt_bs;
        self.tgt.submit(BdevIo::write(
            first * cs / b,
            len / b,
            buf,
            token(KIND_RUN, r),
        ));
    }

    /// Takes the next run: hot chunks first, then from the cursor.
    fn next_run(&mut self) -> Option<Run> {
        let sh = self.sh.clone();
        while let Some(c) = sh.hot.pop() {
            if c < sh.chunks && sh.take(c, HydState::Hot) {
                sh.hot_runs.fetch_add(1, Ordering::Relaxed);
                return Some(self.extend(c, true));
            }
        }
        loop {
            while self.cursor < sh.chunks {
                let c = self.cursor;
                self.cursor += 1;
                let s = sh.state_of(c);
                if s.is_free() && sh.take(c, s) {
                    return Some(self.extend(c, false));
                }
            }
            if sh.rescan.swap(false, Ordering::AcqRel) {
                self.cursor = 0;
                continue;
            }
            return None;
        }
    }

    /// A run starting at `first` (already taken): the chunks after it that
    /// are free and continue it.
    fn extend(&mut self, first: u64, hot: bool) -> Run {
        let sh = &*self.sh;
        let cs = sh.cs;
        let loc = match sh.index.resolve(first).map(|e| e.loc) {
            Some(ChunkLoc::Data(l)) => Some(l),
            _ => None,
        };
        let max = if loc.is_some() {
            self.run_max
        } else {
            self.zero_max
        };
        let mut count = 1;
        while count < max && first + count < sh.chunks {
            let c = first + count;
            let next = sh.index.resolve(c).map(|e| e.loc);
            let continues = match (loc, next) {
                (Some(l), Some(ChunkLoc::Data(x))) => x == l + count * cs,
                (None, Some(ChunkLoc::Zero)) => true,
                _ => false,
            };
            let s = sh.state_of(c);
            if !continues || !s.is_free() || !sh.take(c, s) {
                break;
            }
            count += 1;
        }
        if !hot {
            self.cursor = self.cursor.max(first + count);
        }
        Run {
            first,
            count,
            loc,
            writing: false,
        }
    }

    fn start(&mut self, run: Run) {
        let cs = self.sh.cs;
        let (first, count, loc) = (run.first, run.count, run.loc);
        let len = self.sh.run_len(first, count);
        let r = self.runs.insert(run);
        let t = token(KIND_RUN, r);
        let tb = self.tgt_bs;
        match loc {
            Some(loc) => {
                let Some(mut buf) = self.bufs.get((count * cs) as usize) else {
                    self.fail("no hydration buffer for a run (a bug: one per run)".into());
                    return self.release(r);
                };
                buf.set_len((count * cs) as usize);
                let b = self.ns_bs;
                self.ns
                    .submit(BdevIo::read(loc / b, count * cs / b, buf, t));
            }
            None => {
                if let Some(run) = self.runs.get_mut(r) {
                    run.writing = true;
                }
                if self.write_zeroes {
                    self.tgt
                        .submit(BdevIo::write_zeroes(first * cs / tb, len / tb, t));
                } else {
                    let Some(mut buf) = self.bufs.get(len as usize) else {
                        self.fail("no hydration buffer for a run (a bug: one per run)".into());
                        return self.release(r);
                    };
                    buf.fill(0);
                    self.tgt
                        .submit(BdevIo::write(first * cs / tb, len / tb, buf, t));
                }
            }
        }
    }
}

/// A completion status in words.
pub(crate) fn status_text(s: IoStatus) -> String {
    match s {
        IoStatus::Failed(e) => e.to_string(),
        IoStatus::Success => "success".into(),
        IoStatus::Pending => "not completed".into(),
    }
}

/// Registers `name`, a bdev serving generation `generation` of the
/// repository on `namespace` at once, claims `target`, and starts copying
/// the generation onto it from a poller on `home` (see the module docs).
///
/// Control path: it reads the repository on the calling thread and waits
/// for `home` to set the hydrator up, so call it from a thread that is not
/// `home`.
pub fn start_instant_restore(
    reg: &BdevRegistry,
    name: &str,
    namespace: &str,
    generation: u64,
    target: &str,
    home: &ReactorHandle,
    tuning: InstantTuning,
) -> Result<(Bdev, InstantRestore), RepoBdevError> {
    let ns = reg.open(namespace, false)?;
    let index = load_index(&ns, generation)?;
    let what = format!("instant restore {name} of generation {generation} to {target}");
    let tb = reg.lookup(target)?;
    if tb.size_bytes() < index.source_size() {
        return Err(RepoBdevError::Invalid {
            what,
            why: format!(
                "the target has {} bytes; the generation's source has {}",
                tb.size_bytes(),
                index.source_size()
            ),
        });
    }
    let bs = common_block_size(&what, &index, &[ns.bdev().block_size(), tb.block_size()])?;
    let claim = Arc::new(tb.claim(name)?);
    let tgt = claim.open();
    let chunks = index.chunks();
    let map: Box<[AtomicU8]> = (0..chunks)
        .map(|c| {
            let absent = matches!(index.resolve(c).map(|e| e.loc), Some(ChunkLoc::Absent));
            let s = if absent {
                HydState::Done
            } else {
                HydState::Pending
            };
            AtomicU8::new(s as u8)
        })
        .collect();
    let done = map
        .iter()
        .filter(|s| s.load(Ordering::Relaxed) == HydState::Done as u8)
        .count() as u64;
    let mut info = BdevInfo::new(name, "repo_instant", bs as u32, index.source_size() / bs);
    info.volatile_write_cache = tb.info().volatile_write_cache;
    let sh = Arc::new(IrShared {
        name: name.to_string(),
        target: target.to_string(),
        cs: index.chunk_size() as u64,
        bs,
        chunks,
        ns,
        tgt,
        map,
        done: AtomicU64::new(done),
        all_done: AtomicBool::new(done == chunks),
        hot: ArrayQueue::new(tuning.hot_queue.max(1)),
        rescan: AtomicBool::new(false),
        state: AtomicU8::new(RestoreState::Running as u8),
        cancel: AtomicBool::new(false),
        error: Mutex::new(None),
        bytes_hydrated: AtomicU64::new(0),
        hot_runs: AtomicU64::new(0),
        host_tick: AtomicU64::new(0),
        checksum_errors: AtomicU64::new(0),
        start: Instant::now(),
        elapsed_ns: AtomicU64::new(0),
        channels: Mutex::new(Vec::new()),
        index,
    });
    let bdev = reg.register(
        info,
        InstantBdev {
            sh: sh.clone(),
            _claim: claim.clone(),
        },
    )?;
    let (hsh, hclaim) = (sh.clone(), claim);
    let started = home
        .exec(move || -> Result<(), String> {
            let mut h = Hydrator::new(hsh, hclaim, &tuning)?;
            poll_until_finished("repo_hydrate", move || h.poll());
            Ok(())
        })
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    if let Err(why) = started {
        let _ = reg.unregister(name);
        return Err(RepoBdevError::Reactor {
            core: home.core(),
            why,
        });
    }
    Ok((bdev, InstantRestore { sh }))
}
