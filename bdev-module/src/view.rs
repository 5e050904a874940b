//! The point-in-time view: a read-only bdev that shows a cow bdev's source
//! exactly as it was at a backup job's consistency point, while the job runs.
//!
//! [`create_view`] registers a bdev (product `cow_view`) with the source's
//! block size and block count. It supports reads, and flush as a no-op. It
//! reads through its own descriptors of the source (read-only), the job's
//! target and the job's container, and holds the job's [`JobShared`]; it
//! does not go through the cow bdev and never slows its writers.
//!
//! # Where each chunk's T0 content is
//! The chunk state map says where the content a chunk had at the consistency
//! point (T0) lives right now:
//!
//! | state | T0 content | the view reads |
//! |---|---|---|
//! | `Pending` | the source (writes must capture it first) | the source, then re-checks; while [fenced](crate::fence), nothing: waits |
//! | `Copying` | the source (writes wait), and the copy stream's buffer or its target write from the source's memory | the source, then re-checks |
//! | `Saving` | the source (writes wait) and the capture's buffer | the source, then re-checks |
//! | `Copied` | only the copy stream's buffer; the target write is in flight | nothing: waits for `Done` |
//! | `Saved` | a container slot (the source may have been overwritten) | the slot, then re-checks |
//! | `Done` | the target, where [`BackupTarget::locate`](crate::BackupTarget::locate) says (zeros without a read for a chunk it recorded as zero) | the target |
//! | `OutOfScope` | nowhere: the job does not preserve it | the source (**not** point-in-time) |
//!
//! Out-of-scope chunks (excluded ranges, and chunks the source reported as
//! deallocated when the job started) are read from the source as they are
//! now: the view is point-in-time only for the chunks in the job's scope.
//!
//! # Reads
//! A read is split into pieces, one per *segment* it touches: a segment is an
//! aligned window of `min(chunk, 128 KiB)` bytes (at least the target's and
//! the container's block size), so a piece never crosses a chunk. Each piece
//! is read into a bounce buffer from the channel's own preallocated pool and,
//! once it is known to hold T0 data, copied into its place in the caller's
//! buffer. Pieces are located independently, so one read can take data from
//! the source, the container and the target at once. Target and container
//! offsets are computed in bytes and rounded out to that device's block size
//! (the bounce buffer holds the rounded range; only the piece is copied).
//! When the pool is empty a piece waits for a buffer (FIFO); a piece that
//! must wait for its chunk's state gives its buffer back while it waits.
//!
//! # Races, and why each one is safe
//! Chunk states only move forward (`Pending` → `Copying`/`Saving` →
//! `Copied`/`Saved` → `Done`), and so does the job state (`Running` → an end
//! state). A foreground write reaches the source of an in-scope chunk only
//! after the chunk has left `Pending`, `Copying` and `Saving`, or after the
//! job has ended ([`ChunkState::write_may_pass`], and the cow channel passes
//! everything once the job is not `Running`).
//!
//! * **Source read, chunk changes state meanwhile.** The state seen when the
//!   read is issued is only a hint. After the read *completes*, the view loads
//!   the chunk state again: if it is still `Pending`, `Copying` or `Saving`
//!   and the job is still `Running`, then by monotonicity it was in that set
//!   for the whole read, so no write to the chunk could have been let through
//!   before the data was read: the data is T0. Otherwise (`Copied`, `Saved`,
//!   `Done`, or the job ended) a write may have landed before or during the
//!   read, and the piece is read again from wherever the state now points.
//! * **`Copied`.** T0 is only in the copy stream's memory; the piece waits
//!   (rechecked at every poll of the channel) until the chunk is `Done`, then
//!   reads the target. If the job fails instead, the piece is aborted.
//! * **`Saved`, slot read.** The slot comes from
//!   [`Container::find`](crate::job::Container::find) after the state was
//!   seen `Saved`; the slot's owner is published before the chunk leaves
//!   `Pending`, and a slot is given back only after its chunk is `Done`, so
//!   while the chunk is `Saved` its slot holds its T0 content and is not
//!   reused. After the slot read completes the view checks that the chunk is
//!   *still* `Saved` and that `find` still names the same slot. If the chunk
//!   became `Done` meanwhile, the slot may already have been given back and
//!   reused by another capture, so the data is discarded and the piece is
//!   read from the target, which holds the same T0 content.
//! * **`Saved` → `Done` between the state check and `find`.** `find` may then
//!   return nothing or a slot that already belongs to another chunk; the
//!   state is loaded again after `find`, and a `Done` chunk goes to the
//!   target instead; the post-read check above catches the rest.
//! * **Transient slot owners.** A capture takes a slot, publishing its chunk,
//!   *before* it tries `Pending` → `Saving`; when that transition fails (the
//!   copy stream or another core won) it gives the slot back at once. For a
//!   moment two slots can name one chunk, and `find` returns the lower one.
//!   The post-read check (`find` must still name the slot that was read)
//!   discards such a read unless the losing capture stayed between its
//!   `take` and its `give_back` for the whole slot read, which needs its
//!   thread to be descheduled in a window of a few instructions. Closing it
//!   completely needs the capture to publish the owner only after winning
//!   the transition (a change to `vbdev.rs` / `job.rs`, outside this module).
//! * **`Done`.** Each chunk is written to the target once per job, and `Done`
//!   is set after that write completed: target reads need no re-check.
//! * **Job ends.** When the job completes, every in-scope chunk is `Done` and
//!   the view keeps serving them from the target (for as long as the target
//!   is not reused). When it fails or is cancelled, held writes are released,
//!   so sources of unfinished chunks are no longer T0: reads submitted after
//!   that fail with [`IoError::Aborted`], and so does any read still in
//!   progress when it completes.
//!
//! The view relies on the same guarantee as the backup itself: no write
//! reaches the source of a chunk that is still `Pending`, `Copying` or
//! `Saving` while the job runs. A write that slipped past the interception
//! would be in both the view and the backup; the view cannot tell.
//!
//! Memory ordering: chunk states and slot owners are stored with release and
//! loaded with acquire, and every re-check is made after the device reported
//! the read complete, so "seen still `Pending` after the read" orders the read
//! before any write a later transition lets through.
//!
//! # Channels
//! A view channel owns a channel to each of the three devices and a pool of
//! [`BOUNCE_BUFS`] bounce buffers, all created with the channel (on its
//! reactor). Its internal I/O carries its own tokens (the piece index); the
//! caller's I/O is kept aside, untouched, and handed back from `poll` with
//! its own token. The common path allocates nothing: request and piece slots
//! are preallocated and only grow when more are in flight at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hotcopy_bdev::{
    BackendChannel, Bdev, BdevBackend, BdevChannel, BdevDesc, BdevError, BdevInfo, BdevIo,
    BdevRegistry, IoError, IoStatus, IoType,
};
use hotcopy_runtime::{BufferPool, DmaBuf, HugepageMode};
use serde::Serialize;

use crate::backup::BackupJob;
use crate::chunk_map::ChunkState;
use crate::job::{JobShared, JobState};
use crate::target::Placed;

/// Largest segment (and bounce buffer), unless a device block is larger.
const SEGMENT_MAX: u64 = 128 * 1024;
/// Bounce buffers per view channel (so at most this many device reads in flight).
pub const BOUNCE_BUFS: usize = 32;
/// Request and piece slots preallocated per channel.
const INITIAL_REQS: usize = 64;
const INITIAL_PIECES: usize = 256;

/// What a view has done, summed over its channels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ViewStats {
    /// Reads completed (successfully or not).
    pub reads: u64,
    /// Reads failed with [`IoError::Aborted`] because the job failed or was cancelled.
    pub aborted: u64,
    /// Reads failed by a device error.
    pub failed: u64,
    /// Pieces served from the source.
    pub from_source: u64,
    /// Pieces served from the backup target.
    pub from_target: u64,
    /// Pieces served from a container slot.
    pub from_container: u64,
    /// Device reads whose data was discarded by the re-check and read again.
    pub redone: u64,
    /// Pieces that had to wait for their chunk's state (`Copied`, or an unclear slot).
    pub deferred: u64,
    /// Times a piece waited for a bounce buffer.
    pub bounce_waits: u64,
}

/// Per-channel counters (each written only by its channel).
#[derive(Default)]
struct ViewCounters {
    reads: AtomicU64,
    aborted: AtomicU64,
    failed: AtomicU64,
    from_source: AtomicU64,
    from_target: AtomicU64,
    from_container: AtomicU64,
    redone: AtomicU64,
    deferred: AtomicU64,
    bounce_waits: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct ViewShared {
    name: String,
    job: Arc<JobShared>,
    source: BdevDesc,
    target: BdevDesc,
    container: BdevDesc,
    seg_bytes: u64,
    channels: Mutex<Vec<Arc<ViewCounters>>>,
}

/// The view bdev's module object (find it with `Bdev::backend::<CowView>()`).
pub struct CowView {
    shared: Arc<ViewShared>,
}

impl CowView {
    /// The job this view shows the consistency point of.
    pub fn job(&self) -> &Arc<JobShared> {
        &self.shared.job
    }

    /// Bytes per piece and per bounce buffer.
    pub fn segment_bytes(&self) -> u64 {
        self.shared.seg_bytes
    }

    /// Counters of every channel the view has had.
    pub fn stats(&self) -> ViewStats {
        let chans = self
            .shared
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut s = ViewStats::default();
        for c in chans.iter() {
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            s.reads += l(&c.reads);
            s.aborted += l(&c.aborted);
            s.failed += l(&c.failed);
            s.from_source += l(&c.from_source);
            s.from_target += l(&c.from_target);
            s.from_container += l(&c.from_container);
            s.redone += l(&c.redone);
            s.deferred += l(&c.deferred);
            s.bounce_waits += l(&c.bounce_waits);
        }
        s
    }
}

impl BdevBackend for CowView {
    fn supports(&self, io_type: IoType) -> bool {
        matches!(io_type, IoType::Read | IoType::Flush)
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let s = &self.shared;
        let chan_err = |e: String| BdevError::Channel {
            name: s.name.clone(),
            source: std::io::Error::other(e),
        };
        let bounce = BufferPool::new(s.seg_bytes as usize, BOUNCE_BUFS, HugepageMode::Auto)
            .map_err(|e| chan_err(format!("bounce buffers: {e}")))?;
        let src = s.source.channel()?;
        let tgt = s.target.channel()?;
        let cont = s.container.channel()?;
        let counters = Arc::new(ViewCounters::default());
        s.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(counters.clone());
        let job = s.job.clone();
        Ok(Box::new(ViewChannel {
            bs: job.block_size,
            chunk_bytes: job.chunk_blocks * job.block_size,
            seg_bytes: s.seg_bytes,
            tb: tgt.block_size() as u64,
            cb: cont.block_size() as u64,
            job,
            src,
            tgt,
            cont,
            bounce,
            reqs: (0..INITIAL_REQS).map(|_| None).collect(),
            free_reqs: (0..INITIAL_REQS as u32).rev().collect(),
            pieces: (0..INITIAL_PIECES).map(|_| None).collect(),
            free_pieces: (0..INITIAL_PIECES as u32).rev().collect(),
            waiting: VecDeque::with_capacity(INITIAL_PIECES),
            starved: VecDeque::with_capacity(INITIAL_PIECES),
            ready: VecDeque::with_capacity(INITIAL_REQS),
            completed: Vec::with_capacity(BOUNCE_BUFS),
            counters,
        }))
    }
}

/// Where a piece's device read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Source,
    Target,
    Slot(u32),
}

/// What to do with a piece now.
enum Where {
    Read(Loc),
    Wait,
    Abort,
}

/// A caller's read, kept aside while its pieces run.
struct Req {
    io: BdevIo,
    /// Pieces not finished yet.
    left: u32,
    /// The first failure of a piece (`Success` while none failed).
    status: IoStatus,
}

/// One segment of a caller's read.
struct Piece {
    req: u32,
    chunk: u64,
    /// Byte offset within the chunk.
    off: u64,
    len: u64,
    /// Byte offset in the caller's buffer.
    dst: u64,
    /// Where the last device read went.
    from: Loc,
    /// Chunk byte offset of the first byte in the bounce buffer.
    read_off: u64,
    buf: Option<DmaBuf>,
    /// Whether it is in the waiting queue now (counted once per wait).
    waiting: bool,
}

struct ViewChannel {
    job: Arc<JobShared>,
    src: BdevChannel,
    tgt: BdevChannel,
    cont: BdevChannel,
    bounce: BufferPool,
    bs: u64,
    chunk_bytes: u64,
    seg_bytes: u64,
    tb: u64,
    cb: u64,
    reqs: Vec<Option<Req>>,
    free_reqs: Vec<u32>,
    pieces: Vec<Option<Piece>>,
    free_pieces: Vec<u32>,
    /// Pieces waiting for their chunk's state to move on.
    waiting: VecDeque<u32>,
    /// Pieces waiting for a bounce buffer.
    starved: VecDeque<u32>,
    /// Caller I/O finished, to hand back at the next poll.
    ready: VecDeque<BdevIo>,
    /// Device completions of one poll (kept for its allocation).
    completed: Vec<BdevIo>,
    counters: Arc<ViewCounters>,
}

#[inline]
fn job_aborted(job: &JobShared) -> bool {
    matches!(job.state(), JobState::Failed | JobState::Cancelled)
}

impl ViewChannel {
    fn alloc_req(&mut self, req: Req) -> u32 {
        match self.free_reqs.pop() {
            Some(r) => {
                self.reqs[r as usize] = Some(req);
                r
            }
            None => {
                self.reqs.push(Some(req));
                (self.reqs.len() - 1) as u32
            }
        }
    }

    fn alloc_piece(&mut self, piece: Piece) -> u32 {
        match self.free_pieces.pop() {
            Some(p) => {
                self.pieces[p as usize] = Some(piece);
                p
            }
            None => {
                self.pieces.push(Some(piece));
                (self.pieces.len() - 1) as u32
            }
        }
    }

    /// Where `chunk`'s T0 content can be read now (see the module docs).
    fn locate(&self, chunk: u64) -> Where {
        let job = &*self.job;
        if job_aborted(job) {
            return Where::Abort;
        }
        match job.map.get(chunk) {
            ChunkState::Done => Where::Read(Loc::Target),
            ChunkState::Copied => Where::Wait,
            ChunkState::Saved => {
                let slot = job.container.find(chunk);
                // Re-check after `find`: a slot named by a chunk still `Saved`
                // is not given back before the chunk is `Done`.
                match (job.map.get(chunk), slot) {
                    (ChunkState::Saved, Some(s)) => Where::Read(Loc::Slot(s)),
                    (ChunkState::Done, _) => Where::Read(Loc::Target),
                    _ => Where::Wait,
                }
            }
            // A write of the consistency point is still landing in it.
            ChunkState::Pending if job.fence.fenced(chunk << job.chunk_shift, job.chunk_blocks) => {
                Where::Wait
            }
            ChunkState::OutOfScope
            | ChunkState::Pending
            | ChunkState::Copying
            | ChunkState::Saving => Where::Read(Loc::Source),
        }
    }

    /// Whether the device read of `chunk` that just completed from `from`
    /// holds T0 data (see the module docs).
    fn still_valid(&self, chunk: u64, from: Loc) -> bool {
        let job = &*self.job;
        match from {
            Loc::Source => match job.map.get(chunk) {
                ChunkState::OutOfScope => true,
                ChunkState::Pending | ChunkState::Copying | ChunkState::Saving => {
                    job.state() == JobState::Running
                }
                ChunkState::Copied | ChunkState::Saved | ChunkState::Done => false,
            },
            Loc::Target => true,
            Loc::Slot(slot) => {
                job.map.get(chunk) == ChunkState::Saved && job.container.find(chunk) == Some(slot)
            }
        }
    }

    /// Locates a piece and issues its device read, or parks it.
    fn dispatch(&mut self, p: u32) {
        let chunk = self.pieces[p as usize]
            .as_ref()
            .expect("dispatching a live piece")
            .chunk;
        let from = match self.locate(chunk) {
            Where::Read(from) => from,
            Where::Abort => return self.finish_piece(p, IoStatus::Failed(IoError::Aborted)),
            Where::Wait => {
                let piece = self.pieces[p as usize].as_mut().expect("live piece");
                // Do not sit on a bounce buffer while waiting.
                piece.buf = None;
                if !piece.waiting {
                    piece.waiting = true;
                    bump(&self.counters.deferred);
                }
                self.waiting.push_back(p);
                return;
            }
        };
        let mut target_base = 0;
        if from == Loc::Target {
            match self.job.target.locate(chunk) {
                Some(Placed::Block(b)) => target_base = b,
                Some(Placed::Zero) => return self.zero_piece(p),
                None => return self.finish_piece(p, IoStatus::Failed(IoError::Aborted)),
            }
        }
        let piece = self.pieces[p as usize].as_mut().expect("live piece");
        piece.waiting = false;
        let mut buf = match piece.buf.take() {
            Some(b) => b,
            None => match self.bounce.get(self.seg_bytes as usize) {
                Some(b) => b,
                None => {
                    bump(&self.counters.bounce_waits);
                    self.starved.push_back(p);
                    return;
                }
            },
        };
        let (ch, lba, blocks, read_off, bytes) = match from {
            Loc::Source => {
                let start = chunk * self.chunk_bytes + piece.off;
                (
                    &mut self.src,
                    start / self.bs,
                    piece.len / self.bs,
                    piece.off,
                    piece.len,
                )
            }
            Loc::Target => {
                let tb = self.tb;
                let r0 = piece.off / tb * tb;
                let r1 = (piece.off + piece.len).div_ceil(tb) * tb;
                (
                    &mut self.tgt,
                    target_base + r0 / tb,
                    (r1 - r0) / tb,
                    r0,
                    r1 - r0,
                )
            }
            Loc::Slot(slot) => {
                let cb = self.cb;
                let r0 = piece.off / cb * cb;
                let r1 = (piece.off + piece.len).div_ceil(cb) * cb;
                let base = self.job.container.slot_lba(slot);
                (&mut self.cont, base + r0 / cb, (r1 - r0) / cb, r0, r1 - r0)
            }
        };
        piece.from = from;
        piece.read_off = read_off;
        buf.set_len(bytes as usize);
        ch.submit(BdevIo::read(lba, blocks, buf, p as u64));
    }

    /// A device read of a piece came back.
    fn complete(&mut self, mut io: BdevIo) {
        let p = io.token as u32;
        let Some(piece) = self.pieces.get_mut(p as usize).and_then(Option::as_mut) else {
            return;
        };
        piece.buf = io.take_buf();
        if !io.status.is_success() {
            return self.finish_piece(p, io.status);
        }
        let (chunk, from) = (piece.chunk, piece.from);
        if !self.still_valid(chunk, from) {
            bump(&self.counters.redone);
            return self.dispatch(p);
        }
        let piece = self.pieces[p as usize].as_ref().expect("live piece");
        let req = self.reqs[piece.req as usize]
            .as_mut()
            .expect("live request");
        let copied = match (piece.buf.as_ref(), req.io.buf.as_mut()) {
            (Some(bounce), Some(dst)) => {
                let s = (piece.off - piece.read_off) as usize;
                let len = piece.len as usize;
                dst[piece.dst as usize..][..len].copy_from_slice(&bounce[s..s + len]);
                true
            }
            _ => false,
        };
        if !copied {
            return self.finish_piece(p, IoStatus::Failed(IoError::BadBuffer));
        }
        bump(match from {
            Loc::Source => &self.counters.from_source,
            Loc::Target => &self.counters.from_target,
            Loc::Slot(_) => &self.counters.from_container,
        });
        self.finish_piece(p, IoStatus::Success);
    }

    /// A piece of a chunk the target recorded as zeros: no device read.
    fn zero_piece(&mut self, p: u32) {
        let piece = self.pieces[p as usize].as_mut().expect("live piece");
        piece.waiting = false;
        let (dst, len, req) = (piece.dst as usize, piece.len as usize, piece.req as usize);
        let filled = match self.reqs[req].as_mut().and_then(|r| r.io.buf.as_mut()) {
            Some(d) => {
                d[dst..][..len].fill(0);
                true
            }
            None => false,
        };
        if !filled {
            return self.finish_piece(p, IoStatus::Failed(IoError::BadBuffer));
        }
        bump(&self.counters.from_target);
        self.finish_piece(p, IoStatus::Success)
    }

    /// Ends a piece; completes its request when it was the last one.
    fn finish_piece(&mut self, p: u32, status: IoStatus) {
        let piece = self.pieces[p as usize]
            .take()
            .expect("finishing a live piece");
        self.free_pieces.push(p);
        drop(piece.buf);
        let r = piece.req as usize;
        let req = self.reqs[r].as_mut().expect("live request");
        if !status.is_success() && req.status.is_success() {
            req.status = status;
        }
        req.left -= 1;
        if req.left > 0 {
            return;
        }
        let req = self.reqs[r].take().expect("live request");
        self.free_reqs.push(r as u32);
        let mut status = req.status;
        if status.is_success() && job_aborted(&self.job) {
            status = IoStatus::Failed(IoError::Aborted);
        }
        self.finish_req(req.io, status);
    }

    fn finish_req(&mut self, io: BdevIo, status: IoStatus) {
        let c = &self.counters;
        bump(&c.reads);
        match status {
            IoStatus::Failed(IoError::Aborted) => bump(&c.aborted),
            IoStatus::Failed(_) => bump(&c.failed),
            _ => {}
        }
        self.ready.push_back(io.complete(status));
    }
}

impl BackendChannel for ViewChannel {
    fn submit(&mut self, io: BdevIo) {
        match io.io_type {
            IoType::Read => {}
            // Nothing is ever written through the view.
            IoType::Flush => return self.ready.push_back(io.complete(IoStatus::Success)),
            _ => {
                return self
                    .ready
                    .push_back(io.complete(IoStatus::Failed(IoError::Unsupported)))
            }
        }
        if job_aborted(&self.job) {
            return self.finish_req(io, IoStatus::Failed(IoError::Aborted));
        }
        let start = io.offset_blocks * self.bs;
        let end = start + io.num_blocks * self.bs;
        if end == start {
            return self.finish_req(io, IoStatus::Success);
        }
        let seg = self.seg_bytes;
        let count = ((end - 1) / seg - start / seg + 1) as u32;
        let r = self.alloc_req(Req {
            io,
            left: count,
            status: IoStatus::Success,
        });
        let mut pos = start;
        while pos < end {
            let next = ((pos / seg + 1) * seg).min(end);
            let chunk = pos / self.chunk_bytes;
            let p = self.alloc_piece(Piece {
                req: r,
                chunk,
                off: pos - chunk * self.chunk_bytes,
                len: next - pos,
                dst: pos - start,
                from: Loc::Source,
                read_off: 0,
                buf: None,
                waiting: false,
            });
            self.dispatch(p);
            pos = next;
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut comp = std::mem::take(&mut self.completed);
        if self.src.inflight() > 0 {
            self.src.poll(&mut |io| comp.push(io));
        }
        if self.tgt.inflight() > 0 {
            self.tgt.poll(&mut |io| comp.push(io));
        }
        if self.cont.inflight() > 0 {
            self.cont.poll(&mut |io| comp.push(io));
        }
        for io in comp.drain(..) {
            self.complete(io);
        }
        self.completed = comp;
        for _ in 0..self.waiting.len() {
            let Some(p) = self.waiting.pop_front() else {
                break;
            };
            self.dispatch(p);
        }
        for _ in 0..self.starved.len() {
            if self.bounce.available() == 0 {
                break;
            }
            let Some(p) = self.starved.pop_front() else {
                break;
            };
            self.dispatch(p);
        }
        let n = self.ready.len();
        while let Some(io) = self.ready.pop_front() {
            done(io);
        }
        n
    }
}

/// Registers `name`, a read-only view of `job`'s source as it was at the
/// job's consistency point (see the module docs).
pub fn create_view(reg: &BdevRegistry, name: &str, job: &BackupJob) -> Result<Bdev, BdevError> {
    let js = job.shared().clone();
    let invalid = |why: String| BdevError::InvalidGeometry {
        name: name.to_string(),
        why,
    };
    let source = reg.open(&js.source, false)?;
    let sb = source.bdev();
    if sb.block_size() as u64 != js.block_size || sb.num_blocks() != js.num_blocks {
        return Err(invalid(format!(
            "source {} is {} blocks of {} bytes; the job saw {} of {}",
            sb.name(),
            sb.num_blocks(),
            sb.block_size(),
            js.num_blocks,
            js.block_size
        )));
    }
    let target = js.target.desc().clone();
    let container = js.container.desc.clone();
    let chunk_bytes = js.chunk_blocks * js.block_size;
    let tb = target.bdev().block_size() as u64;
    let cb = container.bdev().block_size() as u64;
    for (what, b) in [("target", tb), ("container", cb)] {
        if !chunk_bytes.is_multiple_of(b) {
            return Err(invalid(format!(
                "chunk size {chunk_bytes} is not a multiple of the {what}'s block size {b}"
            )));
        }
    }
    // Powers of two no larger than the chunk: segments tile every chunk, and
    // a piece rounded out to a target or container block stays in its segment.
    let seg_bytes = chunk_bytes
        .min(SEGMENT_MAX)
        .max(tb)
        .max(cb)
        .max(js.block_size);
    let info = BdevInfo::new(name, "cow_view", js.block_size as u32, js.num_blocks);
    reg.register(
        info,
        CowView {
            shared: Arc::new(ViewShared {
                name: name.to_string(),
                job: js,
                source,
                target,
                container,
                seg_bytes,
                channels: Mutex::new(Vec::new()),
            }),
        },
    )
}
