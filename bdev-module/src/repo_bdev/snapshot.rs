//! Snapshot access: a generation of the repository as a bdev.
//!
//! [`create_snapshot`] registers a bdev (product `repo_snapshot`) of the
//! generation's source size. It reads through its own read-only descriptor
//! of the namespace, and never writes to it; it does not touch the original
//! source at all.
//!
//! # Read-only (no overlay)
//! A read resolves each chunk it touches in the generation's index: a
//! `Data` chunk is read from the namespace at the chunk's byte offset plus
//! the offset within the chunk; `Zero` and `Absent` (not backed up) chunks
//! read as zeros. A read that stays in one chunk, or whose chunks are all
//! stored back to back on the namespace (as one backup run stores them), is
//! sent to the namespace as it is, with its offset translated; an all-zero
//! read is filled in place; any other read is split into one piece per
//! chunk, each read into a bounce buffer and copied into place. Writes (and
//! write-zeroes and unmap) fail with [`IoError::ReadOnly`]; flush succeeds
//! and does nothing.
//!
//! # Writable (with an [`OverlayConfig`])
//! The overlay is a region of any bdev (malloc for RAM, uring for a file)
//! with room for `slots` chunks. Each chunk of the snapshot is, in a shared
//! atomic map (one `u32` per chunk), *not copied*, *copying* or *in slot s*:
//!
//! * The first write to a chunk wins `not copied` → `copying` by
//!   compare-and-swap and takes the next free slot (a shared counter). It
//!   reads the whole chunk from the backup (zeros for `Zero` and `Absent`
//!   chunks, no read), applies its own bytes to that buffer, and writes the
//!   chunk to the slot; once that write completed, the chunk is published as
//!   `in slot s` (release store). A write covering the whole chunk skips the
//!   read. Slots are never given back: the overlay holds at most `slots`
//!   distinct chunks for the life of the snapshot.
//! * Writes to a chunk being copied wait (rechecked at every poll of their
//!   channel, on any core) until it is published, then go to the slot.
//! * With every slot taken, a write to a chunk not yet copied fails with
//!   `IoError::Device(ENOSPC)` and is counted in
//!   [`SnapshotStats::overlay_full`]; chunks already in the overlay stay
//!   writable.
//! * Reads of a published chunk go to its slot; reads of any other chunk,
//!   including one being copied, go to the backup. A read that races the
//!   first write of its chunk may return either content, as with any device;
//!   a read submitted after a write completed sees it, because the chunk
//!   was published before the write completed.
//! * Flush goes to the overlay.
//!
//! Nothing a writable snapshot does reaches the namespace (its descriptor is
//! read-only, so the bdev layer would refuse it) or any other snapshot of
//! the same generation: each has its own overlay.
//!
//! A copy that fails (a namespace read error) sets the chunk back to *not
//! copied* and fails the write; the slot it took stays used.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hotcopy_bdev::{
    BackendChannel, Bdev, BdevBackend, BdevChannel, BdevDesc, BdevError, BdevInfo, BdevIo,
    BdevRegistry, IoError, IoStatus, IoType,
};
use hotcopy_runtime::{BufferPool, DmaBuf, HugepageMode};
use serde::Serialize;

use super::common::{
    bounce_count, chunk_span, piece_of, token, translate, untoken, Fwd, Req, Slab, INITIAL_PIECES,
    INITIAL_REQS, INTERNAL, KIND_FWD, KIND_PIECE,
};
use super::{common_block_size, load_index, RepoBdevError, ENOSPC};
use crate::repo::{ChunkLoc, GenIndex};

/// Where a writable snapshot keeps the chunks it changed: `slots` chunk-sized
/// slots from block `offset_blocks` of `desc` (which must be writable).
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    pub desc: BdevDesc,
    pub offset_blocks: u64,
    pub slots: u32,
}

/// Overlay map value: the chunk is only in the backup.
const NOT_COPIED: u32 = u32::MAX;
/// Overlay map value: a write is copying the chunk into its slot.
const COPYING: u32 = u32::MAX - 1;

/// Device numbers in [`Fwd::dev`] and pieces.
const DEV_NS: u8 = 0;
const DEV_OVERLAY: u8 = 1;

struct Overlay {
    desc: BdevDesc,
    /// Byte offset of slot 0.
    base: u64,
    slots: u32,
    /// Slots handed out (never more than `slots`).
    next: AtomicU32,
    /// Per chunk: `NOT_COPIED`, `COPYING` or the slot.
    map: Box<[AtomicU32]>,
    /// Whether the overlay bdev takes flushes.
    flush: bool,
}

impl Overlay {
    #[inline]
    fn state(&self, chunk: u64) -> u32 {
        self.map[chunk as usize].load(Ordering::Acquire)
    }

    /// The next free slot, if any.
    #[inline]
    fn take_slot(&self) -> Option<u32> {
        let mut n = self.next.load(Ordering::Relaxed);
        loop {
            if n >= self.slots {
                return None;
            }
            match self
                .next
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(n),
                Err(seen) => n = seen,
            }
        }
    }

    fn used(&self) -> u32 {
        self.next.load(Ordering::Relaxed).min(self.slots)
    }
}

/// Per-channel counters (each written only by its channel).
#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    failed: AtomicU64,
    rejected_writes: AtomicU64,
    overlay_full: AtomicU64,
    chunk_copies: AtomicU64,
    write_waits: AtomicU64,
    bounce_waits: AtomicU64,
    from_backup: AtomicU64,
    from_overlay: AtomicU64,
    zero_filled: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What a snapshot has done, summed over its channels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotStats {
    /// Host reads completed (successfully or not).
    pub reads: u64,
    /// Host writes completed (successfully or not).
    pub writes: u64,
    /// Host I/O that failed (device errors, overlay full, read-only).
    pub failed: u64,
    /// Writes refused because the snapshot is read-only.
    pub rejected_writes: u64,
    /// Write pieces refused because every overlay slot was taken.
    pub overlay_full: u64,
    /// Chunks in the overlay (slots taken).
    pub overlay_chunks_used: u64,
    pub overlay_slots: u64,
    /// Chunks copied from the backup into the overlay.
    pub chunk_copies: u64,
    /// Write pieces that waited for their chunk's copy by another write.
    pub write_waits: u64,
    /// Times a piece waited for a bounce buffer.
    pub bounce_waits: u64,
    /// Device reads sent to the namespace (whole requests or pieces).
    pub from_backup: u64,
    /// Device reads sent to the overlay.
    pub from_overlay: u64,
    /// Requests or pieces filled with zeros without a device read.
    pub zero_filled: u64,
}

struct SnapShared {
    name: String,
    index: GenIndex,
    cs: u64,
    bs: u64,
    ns: BdevDesc,
    overlay: Option<Overlay>,
    channels: Mutex<Vec<Arc<Counters>>>,
}

/// A handle on a snapshot bdev: its figures and what it shows.
#[derive(Clone)]
pub struct SnapshotHandle {
    shared: Arc<SnapShared>,
}

impl std::fmt::Debug for SnapshotHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotHandle")
            .field("name", &self.shared.name)
            .field("generation", &self.generation())
            .field("writable", &self.is_writable())
            .finish()
    }
}

impl SnapshotHandle {
    pub fn generation(&self) -> u64 {
        self.shared.index.generation()
    }

    pub fn chunk_size(&self) -> u64 {
        self.shared.cs
    }

    pub fn is_writable(&self) -> bool {
        self.shared.overlay.is_some()
    }

    /// The snapshot bdev's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn stats(&self) -> SnapshotStats {
        let sh = &self.shared;
        let mut s = SnapshotStats::default();
        if let Some(o) = &sh.overlay {
            s.overlay_chunks_used = o.used() as u64;
            s.overlay_slots = o.slots as u64;
        }
        let chans = sh.channels.lock().unwrap_or_else(|e| e.into_inner());
        for c in chans.iter() {
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            s.reads += l(&c.reads);
            s.writes += l(&c.writes);
            s.failed += l(&c.failed);
            s.rejected_writes += l(&c.rejected_writes);
            s.overlay_full += l(&c.overlay_full);
            s.chunk_copies += l(&c.chunk_copies);
            s.write_waits += l(&c.write_waits);
            s.bounce_waits += l(&c.bounce_waits);
            s.from_backup += l(&c.from_backup);
            s.from_overlay += l(&c.from_overlay);
            s.zero_filled += l(&c.zero_filled);
        }
        s
    }
}

/// The snapshot bdev's module object (find it with
/// `Bdev::backend::<RepoSnapshot>()`).
pub struct RepoSnapshot {
    shared: Arc<SnapShared>,
}

impl RepoSnapshot {
    pub fn handle(&self) -> SnapshotHandle {
        SnapshotHandle {
            shared: self.shared.clone(),
        }
    }
}

impl BdevBackend for RepoSnapshot {
    fn supports(&self, io_type: IoType) -> bool {
        // Writes are accepted by the layer so that a read-only snapshot can
        // fail them with `ReadOnly` rather than `Unsupported`.
        matches!(io_type, IoType::Read | IoType::Write | IoType::Flush)
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let sh = &self.shared;
        let bufs = BufferPool::new(sh.cs as usize, bounce_count(sh.cs), HugepageMode::Auto)
            .map_err(|e| BdevError::Channel {
                name: sh.name.clone(),
                source: std::io::Error::other(format!("bounce buffers: {e}")),
            })?;
        let ns = sh.ns.channel()?;
        let ov = match &sh.overlay {
            Some(o) => Some(o.desc.channel()?),
            None => None,
        };
        let counters = Arc::new(Counters::default());
        sh.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(counters.clone());
        Ok(Box::new(SnapChannel {
            sh: sh.clone(),
            st: ChanState {
                ns_bs: ns.block_size() as u64,
                ov_bs: ov.as_ref().map_or(1, |c| c.block_size() as u64),
                ns,
                ov,
                bufs,
                reqs: Slab::new(INITIAL_REQS),
                fwds: Slab::new(INITIAL_REQS),
                pieces: Slab::new(INITIAL_PIECES),
                waiting: VecDeque::with_capacity(INITIAL_PIECES),
                starved: VecDeque::with_capacity(INITIAL_PIECES),
                ready: VecDeque::with_capacity(INITIAL_REQS),
                comp: Vec::with_capacity(INITIAL_REQS),
                ctr: counters,
            },
        }))
    }
}

/// What a piece is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not submitted (new, waiting, or starved).
    Idle,
    /// Reading its bytes from a device into its buffer.
    Read,
    /// Reading its chunk from the namespace to copy it into `slot`.
    CopyRead,
    /// Writing to the overlay; with `publish`, the whole chunk into `slot`.
    Write { publish: bool },
}

/// One chunk's part of a split host request.
struct Piece {
    req: u32,
    chunk: u64,
    /// Byte offset within the chunk.
    off: u64,
    len: u64,
    /// Byte offset in the host's buffer.
    dst: u64,
    write: bool,
    phase: Phase,
    slot: u32,
    buf: Option<DmaBuf>,
    /// Counted once as a write that waited.
    waited: bool,
}

/// How a host read can be served.
enum Route {
    /// Whole, from the namespace at this byte.
    Ns(u64),
    /// Whole, from the overlay at this byte.
    Overlay(u64),
    /// Every byte is zero.
    Zeros,
    /// Piece by piece.
    Split,
}

struct SnapChannel {
    sh: Arc<SnapShared>,
    st: ChanState,
}

/// A channel's own state; its methods take the shared part as an argument,
/// so that nothing touches the `Arc`'s count per I/O.
struct ChanState {
    ns: BdevChannel,
    ov: Option<BdevChannel>,
    ns_bs: u64,
    ov_bs: u64,
    bufs: BufferPool,
    reqs: Slab<Req>,
    fwds: Slab<Fwd>,
    pieces: Slab<Piece>,
    /// Write pieces waiting for another write's copy of their chunk.
    waiting: VecDeque<u32>,
    /// Pieces waiting for a bounce buffer.
    starved: VecDeque<u32>,
    /// Host I/O finished, handed back at the next poll.
    ready: VecDeque<BdevIo>,
    /// Device completions of one poll (kept for its allocation).
    comp: Vec<BdevIo>,
    ctr: Arc<Counters>,
}

/// Where a read piece's bytes are.
enum Src {
    Dev(u8, u64),
    Zeros,
}

impl ChanState {
    /// Finishes a host request.
    fn finish(&mut self, io: BdevIo, status: IoStatus) {
        let c = &self.ctr;
        bump(if io.io_type == IoType::Read {
            &c.reads
        } else {
            &c.writes
        });
        if !status.is_success() {
            bump(&c.failed);
        }
        self.ready.push_back(io.complete(status));
    }

    fn route_read(sh: &SnapShared, start: u64, c0: u64, c1: u64) -> Route {
        let cs = sh.cs;
        let ov = sh.overlay.as_ref();
        if c0 == c1 {
            if let Some(o) = ov {
                let s = o.state(c0);
                if s < COPYING {
                    return Route::Overlay(o.base + s as u64 * cs + (start - c0 * cs));
                }
            }
        }
        let mut first = None;
        let (mut contiguous, mut zeros) = (true, true);
        for c in c0..=c1 {
            if ov.is_some_and(|o| o.state(c) < COPYING) {
                return Route::Split;
            }
            match sh.index.resolve(c).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => {
                    zeros = false;
                    match first {
                        None if c == c0 => first = Some(loc),
                        Some(f) if loc == f + (c - c0) * cs => {}
                        _ => contiguous = false,
                    }
                }
                _ => contiguous = false,
            }
        }
        match first {
            Some(f) if contiguous => Route::Ns(f + (start - c0 * cs)),
            _ if zeros => Route::Zeros,
            _ => Route::Split,
        }
    }

    fn read(&mut self, sh: &SnapShared, mut io: BdevIo) {
        let (bs, cs) = (sh.bs, sh.cs);
        let start = io.offset_blocks * bs;
        let len = io.num_blocks * bs;
        if len == 0 {
            return self.finish(io, IoStatus::Success);
        }
        let (c0, c1) = chunk_span(start, len, cs);
        match Self::route_read(sh, start, c0, c1) {
            Route::Ns(byte) => {
                bump(&self.ctr.from_backup);
                translate(&mut io, &mut self.fwds, bs, self.ns_bs, byte);
                self.ns.submit(io);
            }
            Route::Overlay(byte) => {
                bump(&self.ctr.from_overlay);
                translate(&mut io, &mut self.fwds, bs, self.ov_bs, byte);
                match self.ov.as_mut() {
                    Some(ov) => ov.submit(io),
                    None => unreachable!("an overlay route needs an overlay"),
                }
            }
            Route::Zeros => {
                bump(&self.ctr.zero_filled);
                if let Some(b) = io.buf.as_mut() {
                    b[..len as usize].fill(0);
                }
                self.finish(io, IoStatus::Success);
            }
            Route::Split => self.split(sh, io, start, len, c0, c1, false),
        }
    }

    fn write(&mut self, sh: &SnapShared, mut io: BdevIo) {
        let (bs, cs) = (sh.bs, sh.cs);
        let Some(o) = sh.overlay.as_ref() else {
            bump(&self.ctr.rejected_writes);
            return self.finish(io, IoStatus::Failed(IoError::ReadOnly));
        };
        let start = io.offset_blocks * bs;
        let len = io.num_blocks * bs;
        if len == 0 {
            return self.finish(io, IoStatus::Success);
        }
        let (c0, c1) = chunk_span(start, len, cs);
        if c0 == c1 {
            let s = o.state(c0);
            if s < COPYING {
                let byte = o.base + s as u64 * cs + (start - c0 * cs);
                translate(&mut io, &mut self.fwds, bs, self.ov_bs, byte);
                if let Some(ov) = self.ov.as_mut() {
                    ov.submit(io);
                }
                return;
            }
        }
        self.split(sh, io, start, len, c0, c1, true);
    }

    /// Keeps `io` aside and runs one piece per chunk.
    #[allow(clippy::too_many_arguments, reason = "one request's geometry")]
    fn split(
        &mut self,
        sh: &SnapShared,
        io: BdevIo,
        start: u64,
        len: u64,
        c0: u64,
        c1: u64,
        write: bool,
    ) {
        let r = self.reqs.insert(Req {
            io,
            left: (c1 - c0 + 1) as u32,
            status: IoStatus::Success,
        });
        for c in c0..=c1 {
            let (off, plen, dst) = piece_of(c, start, len, sh.cs);
            let p = self.pieces.insert(Piece {
                req: r,
                chunk: c,
                off,
                len: plen,
                dst,
                write,
                phase: Phase::Idle,
                slot: 0,
                buf: None,
                waited: false,
            });
            self.dispatch(sh, p);
        }
    }

    /// A bounce buffer for piece `p` (its own, or a new one), or `None`
    /// after queueing the piece to wait for one.
    fn buffer(&mut self, sh: &SnapShared, p: u32) -> Option<DmaBuf> {
        if let Some(b) = self.pieces.get_mut(p)?.buf.take() {
            return Some(b);
        }
        match self.bufs.get(sh.cs as usize) {
            Some(b) => Some(b),
            None => {
                bump(&self.ctr.bounce_waits);
                self.starved.push_back(p);
                None
            }
        }
    }

    /// Copies the host's bytes of piece `p` into `buf` at `at`.
    fn fill_from_host(&self, p: u32, buf: &mut [u8], at: u64) {
        let Some(piece) = self.pieces.get(p) else {
            return;
        };
        if let Some(src) = self.reqs.get(piece.req).and_then(|r| r.io.buf.as_ref()) {
            let (d, n, a) = (piece.dst as usize, piece.len as usize, at as usize);
            buf[a..a + n].copy_from_slice(&src[d..d + n]);
        }
    }

    /// Starts (or restarts) piece `p`.
    fn dispatch(&mut self, sh: &SnapShared, p: u32) {
        match self.pieces.get(p) {
            Some(piece) if piece.write => self.dispatch_write(sh, p),
            Some(_) => self.dispatch_read(sh, p),
            None => {}
        }
    }

    fn dispatch_read(&mut self, sh: &SnapShared, p: u32) {
        let Some(&Piece {
            chunk,
            off,
            len,
            dst,
            req,
            ..
        }) = self.pieces.get(p)
        else {
            return;
        };
        let src = match sh.overlay.as_ref().map(|o| (o.state(chunk), o)) {
            Some((s, o)) if s < COPYING => Src::Dev(DEV_OVERLAY, o.base + s as u64 * sh.cs + off),
            _ => match sh.index.resolve(chunk).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => Src::Dev(DEV_NS, loc + off),
                _ => Src::Zeros,
            },
        };
        let (dev, byte) = match src {
            Src::Dev(dev, byte) => (dev, byte),
            Src::Zeros => {
                bump(&self.ctr.zero_filled);
                let (d, n) = (dst as usize, len as usize);
                if let Some(b) = self.reqs.get_mut(req).and_then(|r| r.io.buf.as_mut()) {
                    b[d..d + n].fill(0);
                }
                return self.finish_piece(p, IoStatus::Success);
            }
        };
        let Some(mut buf) = self.buffer(sh, p) else {
            return;
        };
        buf.set_len(len as usize);
        if let Some(piece) = self.pieces.get_mut(p) {
            piece.phase = Phase::Read;
        }
        let t = token(KIND_PIECE, p);
        if dev == DEV_NS {
            bump(&self.ctr.from_backup);
            let b = self.ns_bs;
            self.ns.submit(BdevIo::read(byte / b, len / b, buf, t));
        } else if let Some(ov) = self.ov.as_mut() {
            bump(&self.ctr.from_overlay);
            let b = self.ov_bs;
            ov.submit(BdevIo::read(byte / b, len / b, buf, t));
        }
    }

    fn dispatch_write(&mut self, sh: &SnapShared, p: u32) {
        let Some(o) = sh.overlay.as_ref() else {
            return self.finish_piece(p, IoStatus::Failed(IoError::ReadOnly));
        };
        let Some(&Piece {
            chunk, off, len, ..
        }) = self.pieces.get(p)
        else {
            return;
        };
        let cs = sh.cs;
        loop {
            let s = o.state(chunk);
            if s == COPYING {
                let piece = self.pieces.get_mut(p).expect("live piece");
                // Do not sit on a bounce buffer while waiting.
                piece.buf = None;
                piece.phase = Phase::Idle;
                if !piece.waited {
                    piece.waited = true;
                    bump(&self.ctr.write_waits);
                }
                self.waiting.push_back(p);
                return;
            }
            let Some(mut buf) = self.buffer(sh, p) else {
                return;
            };
            if s < COPYING {
                // In the overlay: write the piece there.
                buf.set_len(len as usize);
                self.fill_from_host(p, &mut buf, 0);
                return self.submit_overlay_write(p, buf, o.base + s as u64 * cs + off, false);
            }
            // Not copied: try to become the chunk's copier (holding a buffer
            // first, so that a winner never waits for one).
            if o.map[chunk as usize]
                .compare_exchange(NOT_COPIED, COPYING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                self.pieces.get_mut(p).expect("live piece").buf = Some(buf);
                continue;
            }
            let Some(slot) = o.take_slot() else {
                o.map[chunk as usize].store(NOT_COPIED, Ordering::Release);
                bump(&self.ctr.overlay_full);
                drop(buf);
                return self.finish_piece(p, IoStatus::Failed(IoError::Device(ENOSPC)));
            };
            self.pieces.get_mut(p).expect("live piece").slot = slot;
            let slot_byte = o.base + slot as u64 * cs;
            if off == 0 && len == sh.index.chunk_len(chunk) {
                // The write covers the chunk: nothing to copy.
                buf.set_len(len as usize);
                self.fill_from_host(p, &mut buf, 0);
                return self.submit_overlay_write(p, buf, slot_byte, true);
            }
            buf.set_len(cs as usize);
            match sh.index.resolve(chunk).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => {
                    bump(&self.ctr.from_backup);
                    let b = self.ns_bs;
                    self.pieces.get_mut(p).expect("live piece").phase = Phase::CopyRead;
                    self.ns
                        .submit(BdevIo::read(loc / b, cs / b, buf, token(KIND_PIECE, p)));
                }
                _ => {
                    buf.fill(0);
                    self.fill_from_host(p, &mut buf, off);
                    self.submit_overlay_write(p, buf, slot_byte, true);
                }
            }
            return;
        }
    }

    fn submit_overlay_write(&mut self, p: u32, buf: DmaBuf, byte: u64, publish: bool) {
        let b = self.ov_bs;
        let n = buf.len() as u64 / b;
        if let Some(piece) = self.pieces.get_mut(p) {
            piece.phase = Phase::Write { publish };
        }
        match self.ov.as_mut() {
            Some(ov) => ov.submit(BdevIo::write(byte / b, n, buf, token(KIND_PIECE, p))),
            None => unreachable!("a write piece needs an overlay"),
        }
    }

    /// A device I/O of piece `p` came back.
    fn piece_io_done(&mut self, sh: &SnapShared, p: u32, mut io: BdevIo) {
        let Some(piece) = self.pieces.get_mut(p) else {
            return;
        };
        let buf = io.take_buf();
        let phase = std::mem::replace(&mut piece.phase, Phase::Idle);
        let (chunk, slot, off, req, dst, len) = (
            piece.chunk,
            piece.slot,
            piece.off,
            piece.req,
            piece.dst,
            piece.len,
        );
        match phase {
            Phase::Idle => {}
            Phase::Read => {
                if !io.status.is_success() {
                    return self.finish_piece(p, io.status);
                }
                let (d, n) = (dst as usize, len as usize);
                let dstbuf = self.reqs.get_mut(req).and_then(|r| r.io.buf.as_mut());
                let status = match (buf, dstbuf) {
                    (Some(src), Some(dstbuf)) => {
                        dstbuf[d..d + n].copy_from_slice(&src[..n]);
                        IoStatus::Success
                    }
                    _ => IoStatus::Failed(IoError::BadBuffer),
                };
                self.finish_piece(p, status);
            }
            Phase::CopyRead => {
                let Some(o) = sh.overlay.as_ref() else {
                    return self.finish_piece(p, IoStatus::Failed(IoError::ReadOnly));
                };
                let Some(mut buf) = buf.filter(|_| io.status.is_success()) else {
                    o.map[chunk as usize].store(NOT_COPIED, Ordering::Release);
                    let status = match io.status {
                        IoStatus::Success => IoStatus::Failed(IoError::BadBuffer),
                        s => s,
                    };
                    return self.finish_piece(p, status);
                };
                self.fill_from_host(p, &mut buf, off);
                self.submit_overlay_write(p, buf, o.base + slot as u64 * sh.cs, true);
            }
            Phase::Write { publish } => {
                if let Some(o) = sh.overlay.as_ref().filter(|_| publish) {
                    let v = if io.status.is_success() {
                        bump(&self.ctr.chunk_copies);
                        slot
                    } else {
                        NOT_COPIED
                    };
                    o.map[chunk as usize].store(v, Ordering::Release);
                }
                self.finish_piece(p, io.status);
            }
        }
    }

    /// Ends a piece; finishes its request when it was the last one.
    fn finish_piece(&mut self, p: u32, status: IoStatus) {
        let Some(piece) = self.pieces.remove(p) else {
            return;
        };
        drop(piece.buf);
        let r = piece.req;
        let last = self
            .reqs
            .get_mut(r)
            .is_some_and(|req| req.piece_done(status));
        if last {
            let req = self.reqs.remove(r).expect("live request");
            self.finish(req.io, req.status);
        }
    }

    /// A device completion carrying an internal token.
    fn internal_done(&mut self, sh: &SnapShared, mut io: BdevIo) {
        let (kind, idx) = untoken(io.token);
        match kind {
            KIND_FWD => {
                if let Some(f) = self.fwds.remove(idx) {
                    f.restore(&mut io);
                    let status = io.status;
                    self.finish(io, status);
                }
            }
            KIND_PIECE => self.piece_io_done(sh, idx, io),
            _ => {}
        }
    }
}

impl BackendChannel for SnapChannel {
    fn submit(&mut self, io: BdevIo) {
        let (sh, st) = (&*self.sh, &mut self.st);
        match io.io_type {
            IoType::Read => st.read(sh, io),
            IoType::Write => st.write(sh, io),
            IoType::Flush => match st.ov.as_mut() {
                Some(ov) if sh.overlay.as_ref().is_some_and(|o| o.flush) => ov.submit(io),
                _ => st.ready.push_back(io.complete(IoStatus::Success)),
            },
            _ if sh.overlay.is_none() => {
                bump(&st.ctr.rejected_writes);
                st.finish(io, IoStatus::Failed(IoError::ReadOnly));
            }
            _ => st
                .ready
                .push_back(io.complete(IoStatus::Failed(IoError::Unsupported))),
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let (sh, st) = (&*self.sh, &mut self.st);
        let mut n = 0;
        let mut comp = std::mem::take(&mut st.comp);
        if st.ns.inflight() > 0 {
            st.ns.poll(&mut |io| comp.push(io));
        }
        if let Some(ov) = st.ov.as_mut() {
            if ov.inflight() > 0 {
                ov.poll(&mut |io| {
                    if io.token & INTERNAL != 0 {
                        comp.push(io);
                    } else {
                        // A host flush, passed through untouched.
                        n += 1;
                        done(io);
                    }
                });
            }
        }
        for io in comp.drain(..) {
            st.internal_done(sh, io);
        }
        st.comp = comp;
        for _ in 0..st.waiting.len() {
            let Some(p) = st.waiting.pop_front() else {
                break;
            };
            st.dispatch(sh, p);
        }
        for _ in 0..st.starved.len() {
            if st.bufs.available() == 0 {
                break;
            }
            let Some(p) = st.starved.pop_front() else {
                break;
            };
            st.dispatch(sh, p);
        }
        while let Some(io) = st.ready.pop_front() {
            n += 1;
            done(io);
        }
        n
    }
}

/// Registers `name`, a bdev showing generation `generation` of the
/// repository on the bdev `namespace` (see the module docs): read-only, or
/// writable through `overlay`.
///
/// Control path: it reads the repository and the generation's index on the
/// calling thread.
pub fn create_snapshot(
    reg: &BdevRegistry,
    name: &str,
    namespace: &str,
    generation: u64,
    overlay: Option<OverlayConfig>,
) -> Result<(Bdev, SnapshotHandle), RepoBdevError> {
    let ns = reg.open(namespace, false)?;
    let index = load_index(&ns, generation)?;
    let cs = index.chunk_size() as u64;
    let what = format!("snapshot {name} of generation {generation}");
    let invalid = |why: String| RepoBdevError::Invalid {
        what: what.clone(),
        why,
    };
    let mut sizes = vec![ns.bdev().block_size()];
    let overlay = match overlay {
        None => None,
        Some(cfg) => {
            let ob = cfg.desc.bdev();
            if !cfg.desc.is_writable() {
                return Err(invalid(format!(
                    "overlay {} is opened read-only",
                    ob.name()
                )));
            }
            if cfg.slots == 0 {
                return Err(invalid("the overlay needs at least one slot".into()));
            }
            let obs = ob.block_size() as u64;
            let base = cfg.offset_blocks * obs;
            let need = base + cfg.slots as u64 * cs;
            if need > ob.size_bytes() {
                return Err(invalid(format!(
                    "overlay {} has {} bytes; {} slots of {cs} bytes from byte {base} need {need}",
                    ob.name(),
                    ob.size_bytes(),
                    cfg.slots
                )));
            }
            sizes.push(ob.block_size());
            Some(Overlay {
                flush: ob.supports(IoType::Flush),
                desc: cfg.desc,
                base,
                slots: cfg.slots,
                next: AtomicU32::new(0),
                map: (0..index.chunks())
                    .map(|_| AtomicU32::new(NOT_COPIED))
                    .collect(),
            })
        }
    };
    let bs = common_block_size(&what, &index, &sizes)?;
    if let Some(o) = &overlay {
        if !o.base.is_multiple_of(bs) {
            return Err(invalid(format!(
                "the overlay starts at byte {}, not on a {bs}-byte block",
                o.base
            )));
        }
    }
    let info = BdevInfo::new(name, "repo_snapshot", bs as u32, index.source_size() / bs);
    let shared = Arc::new(SnapShared {
        name: name.to_string(),
        cs,
        bs,
        ns,
        overlay,
        index,
        channels: Mutex::new(Vec::new()),
    });
    let bdev = reg.register(
        info,
        RepoSnapshot {
            shared: shared.clone(),
        },
    )?;
    Ok((bdev, SnapshotHandle { shared }))
}
