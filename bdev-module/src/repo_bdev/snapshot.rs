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

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hotcopy_bdev::{
    BackendChannel, Bdev, BdevBackend, BdevChannel, BdevDesc, BdevError, BdevInfo, BdevIo,
    BdevRegistry, IoError, IoStatus, IoType,
};
use hotcopy_runtime::DmaBuf;
use serde::Serialize;

use super::common::{
    bounce_pool, bump, failed, piece_chan, token, translate, Part, PieceChan, Pieces, Span, Src,
    INTERNAL, KIND_PIECE,
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
        let bufs = bounce_pool(&sh.name, sh.cs)?;
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
                core: Pieces::new(ns, bufs, counters),
                ov_bs: ov.as_ref().map_or(1, |c| c.block_size() as u64),
                ov,
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
    /// The namespace's channel and the pieces; its `waiting` pieces wait
    /// for another write's copy of their chunk.
    core: Pieces<Phase, Counters>,
    ov: Option<BdevChannel>,
    ov_bs: u64,
}

impl ChanState {
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
        let Some(Span { start, len, c0, c1 }) = Span::of(&io, bs, cs) else {
            return self.core.finish(io, IoStatus::Success);
        };
        match Self::route_read(sh, start, c0, c1) {
            Route::Ns(byte) => {
                bump(&self.core.ctr.from_backup);
                translate(&mut io, &mut self.core.fwds, bs, self.core.ns_bs, byte);
                self.core.ns.submit(io);
            }
            Route::Overlay(byte) => {
                bump(&self.core.ctr.from_overlay);
                translate(&mut io, &mut self.core.fwds, bs, self.ov_bs, byte);
                match self.ov.as_mut() {
                    Some(ov) => ov.submit(io),
                    None => unreachable!("an overlay route needs an overlay"),
                }
            }
            Route::Zeros => {
                bump(&self.core.ctr.zero_filled);
                if let Some(b) = io.buf.as_mut() {
                    b[..len as usize].fill(0);
                }
                self.core.finish(io, IoStatus::Success);
            }
            Route::Split => self.split(sh, cs, io, start, len, c0, c1, false),
        }
    }

    fn write(&mut self, sh: &SnapShared, mut io: BdevIo) {
        let (bs, cs) = (sh.bs, sh.cs);
        let Some(o) = sh.overlay.as_ref() else {
            bump(&self.core.ctr.rejected_writes);
            return self.core.finish(io, IoStatus::Failed(IoError::ReadOnly));
        };
        let Some(Span { start, len, c0, c1 }) = Span::of(&io, bs, cs) else {
            return self.core.finish(io, IoStatus::Success);
        };
        if c0 == c1 {
            let s = o.state(c0);
            if s < COPYING {
                let byte = o.base + s as u64 * cs + (start - c0 * cs);
                translate(&mut io, &mut self.core.fwds, bs, self.ov_bs, byte);
                if let Some(ov) = self.ov.as_mut() {
                    ov.submit(io);
                }
                return;
            }
        }
        self.split(sh, cs, io, start, len, c0, c1, true);
    }

    fn dispatch_read(&mut self, sh: &SnapShared, p: u32, part: Part) {
        let Part { chunk, off, .. } = part;
        let src = match sh.overlay.as_ref().map(|o| (o.state(chunk), o)) {
            Some((s, o)) if s < COPYING => Src::Dev(o.base + s as u64 * sh.cs + off),
            _ => match sh.index.resolve(chunk).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => Src::Backup(loc + off),
                _ => Src::Zeros,
            },
        };
        if let Some((byte, buf)) = self.core.start_read_from(sh.cs, p, part, src) {
            if let Some(ov) = self.ov.as_mut() {
                bump(&self.core.ctr.from_overlay);
                let (b, n) = (self.ov_bs, buf.len() as u64);
                ov.submit(BdevIo::read(byte / b, n / b, buf, token(KIND_PIECE, p)));
            }
        }
    }

    fn dispatch_write(&mut self, sh: &SnapShared, p: u32, part: Part) {
        let Some(o) = sh.overlay.as_ref() else {
            return self
                .core
                .finish_piece(p, IoStatus::Failed(IoError::ReadOnly));
        };
        let Part {
            chunk, off, len, ..
        } = part;
        let cs = sh.cs;
        loop {
            let s = o.state(chunk);
            if s == COPYING {
                return self.core.park_write(p);
            }
            let Some(mut buf) = self.core.buffer(cs, p) else {
                return;
            };
            if s < COPYING {
                // In the overlay: write the piece there.
                buf.set_len(len as usize);
                self.core.fill_from_host(p, &mut buf, 0);
                return self.submit_overlay_write(p, buf, o.base + s as u64 * cs + off, false);
            }
            // Not copied: try to become the chunk's copier (holding a buffer
            // first, so that a winner never waits for one).
            if o.map[chunk as usize]
                .compare_exchange(NOT_COPIED, COPYING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                self.core.pieces.get_mut(p).expect("live piece").buf = Some(buf);
                continue;
            }
            let Some(slot) = o.take_slot() else {
                o.map[chunk as usize].store(NOT_COPIED, Ordering::Release);
                bump(&self.core.ctr.overlay_full);
                drop(buf);
                return self
                    .core
                    .finish_piece(p, IoStatus::Failed(IoError::Device(ENOSPC)));
            };
            self.core.pieces.get_mut(p).expect("live piece").slot = slot;
            let slot_byte = o.base + slot as u64 * cs;
            if off == 0 && len == sh.index.chunk_len(chunk) {
                // The write covers the chunk: nothing to copy.
                buf.set_len(len as usize);
                self.core.fill_from_host(p, &mut buf, 0);
                return self.submit_overlay_write(p, buf, slot_byte, true);
            }
            buf.set_len(cs as usize);
            match sh.index.resolve(chunk).map(|e| e.loc) {
                Some(ChunkLoc::Data(loc)) => self.core.read_chunk(p, loc, cs, buf, Phase::CopyRead),
                _ => {
                    buf.fill(0);
                    self.core.fill_from_host(p, &mut buf, off);
                    self.submit_overlay_write(p, buf, slot_byte, true);
                }
            }
            return;
        }
    }

    fn submit_overlay_write(&mut self, p: u32, buf: DmaBuf, byte: u64, publish: bool) {
        let b = self.ov_bs;
        let n = buf.len() as u64 / b;
        if let Some(piece) = self.core.pieces.get_mut(p) {
            piece.phase = Phase::Write { publish };
        }
        match self.ov.as_mut() {
            Some(ov) => ov.submit(BdevIo::write(byte / b, n, buf, token(KIND_PIECE, p))),
            None => unreachable!("a write piece needs an overlay"),
        }
    }

    /// A device I/O of piece `p` came back.
    fn piece_io_done(&mut self, sh: &SnapShared, p: u32, mut io: BdevIo) {
        let Some(piece) = self.core.pieces.get_mut(p) else {
            return;
        };
        let buf = io.take_buf();
        let phase = std::mem::replace(&mut piece.phase, Phase::Idle);
        let (chunk, slot, off) = (piece.chunk, piece.slot, piece.off);
        match phase {
            Phase::Idle => {}
            Phase::Read => self.core.read_done(p, io.status, buf),
            Phase::CopyRead => {
                let Some(o) = sh.overlay.as_ref() else {
                    return self
                        .core
                        .finish_piece(p, IoStatus::Failed(IoError::ReadOnly));
                };
                let Some(mut buf) = buf.filter(|_| io.status.is_success()) else {
                    o.map[chunk as usize].store(NOT_COPIED, Ordering::Release);
                    return self.core.finish_piece(p, failed(io.status));
                };
                self.core.fill_from_host(p, &mut buf, off);
                self.submit_overlay_write(p, buf, o.base + slot as u64 * sh.cs, true);
            }
            Phase::Write { publish } => {
                if let Some(o) = sh.overlay.as_ref().filter(|_| publish) {
                    let v = if io.status.is_success() {
                        bump(&self.core.ctr.chunk_copies);
                        slot
                    } else {
                        NOT_COPIED
                    };
                    o.map[chunk as usize].store(v, Ordering::Release);
                }
                self.core.finish_piece(p, io.status);
            }
        }
    }
}

piece_chan!(ChanState, SnapShared, Phase, Counters);

impl BackendChannel for SnapChannel {
    fn submit(&mut self, io: BdevIo) {
        let (sh, st) = (&*self.sh, &mut self.st);
        match io.io_type {
            IoType::Read => st.read(sh, io),
            IoType::Write => st.write(sh, io),
            IoType::Flush => match st.ov.as_mut() {
                Some(ov) if sh.overlay.as_ref().is_some_and(|o| o.flush) => ov.submit(io),
                _ => st.core.ready.push_back(io.complete(IoStatus::Success)),
            },
            _ if sh.overlay.is_none() => {
                bump(&st.core.ctr.rejected_writes);
                st.core.finish(io, IoStatus::Failed(IoError::ReadOnly));
            }
            _ => st.core.unsupported(io),
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let (sh, st) = (&*self.sh, &mut self.st);
        let mut n = 0;
        let mut comp = st.core.take_completions();
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
        n + st.end_poll(sh, comp, done)
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
