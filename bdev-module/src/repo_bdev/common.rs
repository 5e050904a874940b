//! Pieces shared by the channels of the snapshot and instant-restore bdevs:
//! internal tokens, slot tables, and the caller's requests kept aside.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hotcopy_bdev::{BdevChannel, BdevError, BdevIo, IoError, IoStatus, IoType};
use hotcopy_runtime::{BufferPool, DmaBuf, HugepageMode, PollStatus, Poller};

/// Tokens of this module's own I/O have this bit set.
pub const INTERNAL: u64 = 1 << 63;
/// Bits 56..63 of an internal token say what the index below them names.
const KIND_SHIFT: u32 = 56;
/// A host request forwarded whole with its offset translated.
pub(crate) const KIND_FWD: u64 = 1;
/// One piece of a split host request.
pub(crate) const KIND_PIECE: u64 = 2;
/// Work of a background engine (hydration run, restore op).
pub(crate) const KIND_RUN: u64 = 3;
/// A flush issued by a background engine.
pub(crate) const KIND_FLUSH: u64 = 4;

/// Slot tables start with room for this many host requests in flight per
/// channel, and pieces for four times as many; they grow (allocating) only
/// past the deepest queue seen so far.
pub(crate) const INITIAL_REQS: usize = 64;
pub(crate) const INITIAL_PIECES: usize = 256;

/// Bytes of chunk-sized bounce buffers per channel (at least
/// [`MIN_BOUNCE`] and at most [`MAX_BOUNCE`] buffers): enough for a few
/// split requests in flight without making every channel large.
pub(crate) const BOUNCE_BYTES: u64 = 2 << 20;
pub(crate) const MIN_BOUNCE: u64 = 4;
pub(crate) const MAX_BOUNCE: u64 = 32;

/// Bounce buffers per channel for chunks of `cs` bytes.
pub(crate) fn bounce_count(cs: u64) -> usize {
    (BOUNCE_BYTES / cs).clamp(MIN_BOUNCE, MAX_BOUNCE) as usize
}

/// A channel's bounce buffers for chunks of `cs` bytes, for bdev `name`.
pub(crate) fn bounce_pool(name: &str, cs: u64) -> Result<BufferPool, BdevError> {
    BufferPool::new(cs as usize, bounce_count(cs), HugepageMode::Auto).map_err(|e| {
        BdevError::Channel {
            name: name.to_owned(),
            source: std::io::Error::other(format!("bounce buffers: {e}")),
        }
    })
}

/// The bytes and chunks a host request covers.
pub(crate) struct Span {
    pub start: u64,
    pub len: u64,
    pub c0: u64,
    pub c1: u64,
}

impl Span {
    /// The span of `io` on a bdev of `bs`-byte blocks and `cs`-byte chunks,
    /// or `None` when it covers no byte.
    #[inline]
    pub(crate) fn of(io: &BdevIo, bs: u64, cs: u64) -> Option<Span> {
        let start = io.offset_blocks * bs;
        let len = io.num_blocks * bs;
        if len == 0 {
            return None;
        }
        let (c0, c1) = chunk_span(start, len, cs);
        Some(Span { start, len, c0, c1 })
    }
}

#[inline]
pub(crate) fn token(kind: u64, idx: u32) -> u64 {
    INTERNAL | (kind << KIND_SHIFT) | idx as u64
}

/// The kind and index of an internal token.
#[inline]
pub(crate) fn untoken(t: u64) -> (u64, u32) {
    ((t & !INTERNAL) >> KIND_SHIFT, t as u32)
}

/// A table of values with stable `u32` indices and a free list.
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
    live: usize,
}

impl<T> Slab<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Slab {
            items: (0..capacity).map(|_| None).collect(),
            free: (0..capacity as u32).rev().collect(),
            live: 0,
        }
    }

    #[inline]
    pub(crate) fn insert(&mut self, t: T) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.items[i as usize] = Some(t);
                i
            }
            None => {
                self.items.push(Some(t));
                (self.items.len() - 1) as u32
            }
        }
    }

    #[inline]
    pub(crate) fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize).and_then(Option::as_ref)
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize).and_then(Option::as_mut)
    }

    #[inline]
    pub(crate) fn remove(&mut self, i: u32) -> Option<T> {
        let t = self.items.get_mut(i as usize).and_then(Option::take);
        if t.is_some() {
            self.live -= 1;
            self.free.push(i);
        }
        t
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }
}

/// A host request kept aside while its pieces run.
pub(crate) struct Req {
    pub io: BdevIo,
    /// Pieces not finished yet.
    pub left: u32,
    /// The first failure of a piece (`Success` while none failed).
    pub status: IoStatus,
}

impl Req {
    /// Records a piece's outcome; returns whether it was the last piece.
    #[inline]
    pub(crate) fn piece_done(&mut self, status: IoStatus) -> bool {
        if !status.is_success() && self.status.is_success() {
            self.status = status;
        }
        self.left -= 1;
        self.left == 0
    }
}

/// What a host request forwarded whole had before its translation.
pub(crate) struct Fwd {
    pub offset_blocks: u64,
    pub num_blocks: u64,
    pub token: u64,
}

impl Fwd {
    /// Puts the host's offset, length and token back on a completed request.
    #[inline]
    pub(crate) fn restore(&self, io: &mut BdevIo) {
        io.offset_blocks = self.offset_blocks;
        io.num_blocks = self.num_blocks;
        io.token = self.token;
    }
}

/// Translates a host request of `bs`-byte blocks to byte `byte` of a device
/// of `dev_bs`-byte blocks, keeping what it had in a [`Fwd`] slot whose
/// token it then carries.
#[inline]
pub(crate) fn translate(io: &mut BdevIo, fwds: &mut Slab<Fwd>, bs: u64, dev_bs: u64, byte: u64) {
    let f = fwds.insert(Fwd {
        offset_blocks: io.offset_blocks,
        num_blocks: io.num_blocks,
        token: io.token,
    });
    io.num_blocks = io.num_blocks * bs / dev_bs;
    io.offset_blocks = byte / dev_bs;
    io.token = token(KIND_FWD, f);
}

/// The first and last chunk of `len > 0` bytes at byte `start`.
#[inline]
pub(crate) fn chunk_span(start: u64, len: u64, cs: u64) -> (u64, u64) {
    (start / cs, (start + len - 1) / cs)
}

/// The part of chunk `c` that `len` bytes at `start` cover: (offset in the
/// chunk, length, offset in the request's buffer).
#[inline]
pub(crate) fn piece_of(c: u64, start: u64, len: u64, cs: u64) -> (u64, u64, u64) {
    let a = start.max(c * cs);
    let b = (start + len).min((c + 1) * cs);
    (a - c * cs, b - a, a - start)
}

#[inline]
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The counters of a channel that [`Pieces`] bumps.
pub(crate) trait HostCounters {
    fn reads(&self) -> &AtomicU64;
    fn writes(&self) -> &AtomicU64;
    fn failed(&self) -> &AtomicU64;
    fn backup_reads(&self) -> &AtomicU64;
    fn zero_filled(&self) -> &AtomicU64;
    fn write_waits(&self) -> &AtomicU64;
    fn bounce_waits(&self) -> &AtomicU64;
}

/// What a bdev's piece phases must include.
pub(crate) trait PiecePhase: Copy {
    /// Not submitted (new, waiting, or starved).
    const IDLE: Self;
    /// Reading its bytes from a device into its buffer.
    const READ: Self;
}

/// One chunk's part of a split host request.
pub(crate) struct Piece<P> {
    pub req: u32,
    pub chunk: u64,
    /// Byte offset within the chunk.
    pub off: u64,
    pub len: u64,
    /// Byte offset in the host's buffer.
    pub dst: u64,
    pub write: bool,
    pub phase: P,
    /// The overlay slot the piece copies its chunk into (snapshots only).
    pub slot: u32,
    pub buf: Option<DmaBuf>,
    /// Counted once as a write that waited.
    pub waited: bool,
}

/// What a piece covers: `len` bytes at `off` of chunk `chunk`, at byte
/// `dst` of request `req`'s buffer.
#[derive(Clone, Copy)]
pub(crate) struct Part {
    pub chunk: u64,
    pub off: u64,
    pub len: u64,
    pub dst: u64,
    pub req: u32,
}

/// Where a read piece's bytes are.
pub(crate) enum Src {
    /// At this byte of the backup.
    Backup(u64),
    /// At this byte of the bdev's other device.
    Dev(u64),
    Zeros,
}

/// The status of a device I/O that failed, or that succeeded without a
/// buffer.
#[inline]
pub(crate) fn failed(s: IoStatus) -> IoStatus {
    match s {
        IoStatus::Success => IoStatus::Failed(IoError::BadBuffer),
        s => s,
    }
}

/// A channel's bookkeeping of host requests, their pieces, and the
/// namespace (backup) device both bdevs read from.
pub(crate) struct Pieces<P, C> {
    pub ns: BdevChannel,
    pub ns_bs: u64,
    pub bufs: BufferPool,
    pub reqs: Slab<Req>,
    pub fwds: Slab<Fwd>,
    pub pieces: Slab<Piece<P>>,
    /// Write pieces waiting for another owner's copy of their chunk.
    pub waiting: VecDeque<u32>,
    /// Pieces waiting for a bounce buffer.
    pub starved: VecDeque<u32>,
    /// Host I/O finished, handed back at the next poll.
    pub ready: VecDeque<BdevIo>,
    /// Device completions of one poll (kept for its allocation).
    pub comp: Vec<BdevIo>,
    pub ctr: Arc<C>,
}

impl<P: PiecePhase, C: HostCounters> Pieces<P, C> {
    pub(crate) fn new(ns: BdevChannel, bufs: BufferPool, ctr: Arc<C>) -> Self {
        Pieces {
            ns_bs: ns.block_size() as u64,
            ns,
            bufs,
            reqs: Slab::new(INITIAL_REQS),
            fwds: Slab::new(INITIAL_REQS),
            pieces: Slab::new(INITIAL_PIECES),
            waiting: VecDeque::with_capacity(INITIAL_PIECES),
            starved: VecDeque::with_capacity(INITIAL_PIECES),
            ready: VecDeque::with_capacity(INITIAL_REQS),
            comp: Vec::with_capacity(INITIAL_REQS),
            ctr,
        }
    }

    /// Finishes a host request.
    pub(crate) fn finish(&mut self, io: BdevIo, status: IoStatus) {
        let c = &*self.ctr;
        bump(if io.io_type == IoType::Read {
            c.reads()
        } else {
            c.writes()
        });
        if !status.is_success() {
            bump(c.failed());
        }
        self.ready.push_back(io.complete(status));
    }

    /// Fails host request `io` as unsupported (without counting it).
    pub(crate) fn unsupported(&mut self, io: BdevIo) {
        self.ready
            .push_back(io.complete(IoStatus::Failed(IoError::Unsupported)));
    }

    /// Keeps `io` aside for its pieces of chunks `c0..=c1`.
    pub(crate) fn add_req(&mut self, io: BdevIo, c0: u64, c1: u64) -> u32 {
        self.reqs.insert(Req {
            io,
            left: (c1 - c0 + 1) as u32,
            status: IoStatus::Success,
        })
    }

    /// A new idle piece of request `r`: its part of chunk `c`.
    pub(crate) fn add_piece(
        &mut self,
        r: u32,
        c: u64,
        start: u64,
        len: u64,
        cs: u64,
        write: bool,
    ) -> u32 {
        let (off, plen, dst) = piece_of(c, start, len, cs);
        self.pieces.insert(Piece {
            req: r,
            chunk: c,
            off,
            len: plen,
            dst,
            write,
            phase: P::IDLE,
            slot: 0,
            buf: None,
            waited: false,
        })
    }

    /// A bounce buffer for piece `p` (its own, or a new one), or `None`
    /// after queueing the piece to wait for one.
    pub(crate) fn buffer(&mut self, cs: u64, p: u32) -> Option<DmaBuf> {
        if let Some(b) = self.pieces.get_mut(p)?.buf.take() {
            return Some(b);
        }
        match self.bufs.get(cs as usize) {
            Some(b) => Some(b),
            None => {
                bump(self.ctr.bounce_waits());
                self.starved.push_back(p);
                None
            }
        }
    }

    /// Copies the host's bytes of piece `p` into `buf` at `at`.
    pub(crate) fn fill_from_host(&self, p: u32, buf: &mut [u8], at: u64) {
        let Some(piece) = self.pieces.get(p) else {
            return;
        };
        if let Some(src) = self.reqs.get(piece.req).and_then(|r| r.io.buf.as_ref()) {
            let (d, n, a) = (piece.dst as usize, piece.len as usize, at as usize);
            buf[a..a + n].copy_from_slice(&src[d..d + n]);
        }
    }

    /// Serves read piece `p` (of `len` bytes at `dst` of request `req`)
    /// with zeros.
    pub(crate) fn read_zeros(&mut self, p: u32, req: u32, dst: u64, len: u64) {
        bump(self.ctr.zero_filled());
        let (d, n) = (dst as usize, len as usize);
        if let Some(b) = self.reqs.get_mut(req).and_then(|r| r.io.buf.as_mut()) {
            b[d..d + n].fill(0);
        }
        self.finish_piece(p, IoStatus::Success);
    }

    /// A buffer of `len` bytes for read piece `p`, now reading, or `None`
    /// after queueing the piece to wait for one.
    pub(crate) fn start_read(&mut self, cs: u64, p: u32, len: u64) -> Option<DmaBuf> {
        let mut buf = self.buffer(cs, p)?;
        buf.set_len(len as usize);
        if let Some(piece) = self.pieces.get_mut(p) {
            piece.phase = P::READ;
        }
        Some(buf)
    }

    /// Starts read piece `p` of `part` from `src`; for [`Src::Dev`] it
    /// returns the byte and the buffer for the caller to read into.
    pub(crate) fn start_read_from(
        &mut self,
        cs: u64,
        p: u32,
        part: Part,
        src: Src,
    ) -> Option<(u64, DmaBuf)> {
        let byte = match src {
            Src::Zeros => {
                self.read_zeros(p, part.req, part.dst, part.len);
                return None;
            }
            Src::Backup(byte) | Src::Dev(byte) => byte,
        };
        let buf = self.start_read(cs, p, part.len)?;
        if let Src::Backup(_) = src {
            self.read_backup(p, byte, buf);
            return None;
        }
        Some((byte, buf))
    }

    /// Reads `buf.len()` bytes at byte `byte` of the backup for piece `p`.
    pub(crate) fn read_backup(&mut self, p: u32, byte: u64, buf: DmaBuf) {
        bump(self.ctr.backup_reads());
        let b = self.ns_bs;
        let n = buf.len() as u64 / b;
        self.ns
            .submit(BdevIo::read(byte / b, n, buf, token(KIND_PIECE, p)));
    }

    /// Reads the `cs`-byte chunk at byte `loc` of the backup into `buf` for
    /// piece `p`, which then is in `phase`.
    pub(crate) fn read_chunk(&mut self, p: u32, loc: u64, cs: u64, mut buf: DmaBuf, phase: P) {
        bump(self.ctr.backup_reads());
        buf.set_len(cs as usize);
        let b = self.ns_bs;
        self.pieces.get_mut(p).expect("live piece").phase = phase;
        self.ns
            .submit(BdevIo::read(loc / b, cs / b, buf, token(KIND_PIECE, p)));
    }

    /// Parks write piece `p` until another owner's copy of its chunk ends,
    /// without sitting on a bounce buffer.
    pub(crate) fn park_write(&mut self, p: u32) {
        let piece = self.pieces.get_mut(p).expect("live piece");
        piece.buf = None;
        piece.phase = P::IDLE;
        if !piece.waited {
            piece.waited = true;
            bump(self.ctr.write_waits());
        }
        self.waiting.push_back(p);
    }

    /// The device read of read piece `p` came back with `status` and `buf`.
    pub(crate) fn read_done(&mut self, p: u32, status: IoStatus, buf: Option<DmaBuf>) {
        if !status.is_success() {
            return self.finish_piece(p, status);
        }
        let Some(&Piece { req, dst, len, .. }) = self.pieces.get(p) else {
            return;
        };
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

    /// Ends a piece; finishes its request when it was the last one.
    pub(crate) fn finish_piece(&mut self, p: u32, status: IoStatus) {
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

    /// The completions kept for this poll, with the backup's added.
    pub(crate) fn take_completions(&mut self) -> Vec<BdevIo> {
        let mut comp = std::mem::take(&mut self.comp);
        if self.ns.inflight() > 0 {
            self.ns.poll(&mut |io| comp.push(io));
        }
        comp
    }

    /// Hands back the finished host I/O; returns how many.
    pub(crate) fn hand_back(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut n = 0;
        while let Some(io) = self.ready.pop_front() {
            n += 1;
            done(io);
        }
        n
    }
}

/// A channel of a bdev that splits host requests into [`Pieces`].
pub(crate) trait PieceChan {
    type Shared;
    type Phase: PiecePhase;
    type Ctr: HostCounters;

    fn core(&mut self) -> &mut Pieces<Self::Phase, Self::Ctr>;
    /// Starts (or restarts) write piece `p`, which covers `part`.
    fn dispatch_write(&mut self, sh: &Self::Shared, p: u32, part: Part);
    /// Starts (or restarts) read piece `p`, which covers `part`.
    fn dispatch_read(&mut self, sh: &Self::Shared, p: u32, part: Part);
    /// A device I/O of piece `p` came back.
    fn piece_io_done(&mut self, sh: &Self::Shared, p: u32, io: BdevIo);

    /// Starts (or restarts) piece `p`.
    fn dispatch(&mut self, sh: &Self::Shared, p: u32) {
        let Some(piece) = self.core().pieces.get(p) else {
            return;
        };
        let part = Part {
            chunk: piece.chunk,
            off: piece.off,
            len: piece.len,
            dst: piece.dst,
            req: piece.req,
        };
        if piece.write {
            self.dispatch_write(sh, p, part)
        } else {
            self.dispatch_read(sh, p, part)
        }
    }

    /// Keeps `io` aside and runs one piece per chunk of `c0..=c1`.
    #[allow(clippy::too_many_arguments, reason = "one request's geometry")]
    fn split(
        &mut self,
        sh: &Self::Shared,
        cs: u64,
        io: BdevIo,
        start: u64,
        len: u64,
        c0: u64,
        c1: u64,
        write: bool,
    ) {
        let r = self.core().add_req(io, c0, c1);
        for c in c0..=c1 {
            let p = self.core().add_piece(r, c, start, len, cs, write);
            self.dispatch(sh, p);
        }
    }

    /// A device completion carrying an internal token.
    fn internal_done(&mut self, sh: &Self::Shared, mut io: BdevIo) {
        let (kind, idx) = untoken(io.token);
        match kind {
            KIND_FWD => {
                let core = self.core();
                if let Some(f) = core.fwds.remove(idx) {
                    f.restore(&mut io);
                    let status = io.status;
                    core.finish(io, status);
                }
            }
            KIND_PIECE => self.piece_io_done(sh, idx, io),
            _ => {}
        }
    }

    /// Ends a poll: handles the internal completions `comp`, restarts the
    /// pieces that waited, and hands back the finished host I/O; returns
    /// how many.
    fn end_poll(
        &mut self,
        sh: &Self::Shared,
        mut comp: Vec<BdevIo>,
        done: &mut dyn FnMut(BdevIo),
    ) -> usize {
        for io in comp.drain(..) {
            self.internal_done(sh, io);
        }
        self.core().comp = comp;
        for _ in 0..self.core().waiting.len() {
            let Some(p) = self.core().waiting.pop_front() else {
                break;
            };
            self.dispatch(sh, p);
        }
        for _ in 0..self.core().starved.len() {
            if self.core().bufs.available() == 0 {
                break;
            }
            let Some(p) = self.core().starved.pop_front() else {
                break;
            };
            self.dispatch(sh, p);
        }
        self.core().hand_back(done)
    }
}

/// Implements [`HostCounters`] for `$ctr` (which has the counters as fields
/// of their names), [`PiecePhase`] for `$phase` (with `Idle` and `Read`), and
/// [`PieceChan`] for `$chan` (which has `core` and the inherent methods
/// `dispatch_write`, `dispatch_read` and `piece_io_done`).
macro_rules! piece_chan {
    ($chan:ty, $shared:ty, $phase:ty, $ctr:ty) => {
        impl super::common::HostCounters for $ctr {
            fn reads(&self) -> &AtomicU64 {
                &self.reads
            }
            fn writes(&self) -> &AtomicU64 {
                &self.writes
            }
            fn failed(&self) -> &AtomicU64 {
                &self.failed
            }
            fn backup_reads(&self) -> &AtomicU64 {
                &self.from_backup
            }
            fn zero_filled(&self) -> &AtomicU64 {
                &self.zero_filled
            }
            fn write_waits(&self) -> &AtomicU64 {
                &self.write_waits
            }
            fn bounce_waits(&self) -> &AtomicU64 {
                &self.bounce_waits
            }
        }

        impl super::common::PiecePhase for $phase {
            const IDLE: Self = Self::Idle;
            const READ: Self = Self::Read;
        }

        impl super::common::PieceChan for $chan {
            type Shared = $shared;
            type Phase = $phase;
            type Ctr = $ctr;

            fn core(&mut self) -> &mut super::common::Pieces<$phase, $ctr> {
                &mut self.core
            }

            fn dispatch_write(&mut self, sh: &$shared, p: u32, part: super::common::Part) {
                <$chan>::dispatch_write(self, sh, p, part)
            }

            fn dispatch_read(&mut self, sh: &$shared, p: u32, part: super::common::Part) {
                <$chan>::dispatch_read(self, sh, p, part)
            }

            fn piece_io_done(&mut self, sh: &$shared, p: u32, io: BdevIo) {
                <$chan>::piece_io_done(self, sh, p, io)
            }
        }
    };
}
pub(crate) use piece_chan;

/// Registers a poller `name` on this reactor that runs `poll` (work done,
/// finished) until it says it finished, and then unregisters itself.
pub(crate) fn poll_until_finished(
    name: &'static str,
    mut poll: impl FnMut() -> (usize, bool) + 'static,
) {
    let me: std::rc::Rc<std::cell::RefCell<Option<Poller>>> = Default::default();
    let me2 = me.clone();
    let p = Poller::builder().name(name).register(move || {
        let (work, finished) = poll();
        if finished {
            me2.borrow_mut().take();
        }
        PollStatus::from_count(work)
    });
    *me.borrow_mut() = Some(p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_keep_the_internal_bit() {
        for (k, i) in [(KIND_FWD, 0u32), (KIND_PIECE, 7), (KIND_RUN, u32::MAX)] {
            let t = token(k, i);
            assert_ne!(t & INTERNAL, 0);
            assert_eq!(untoken(t), (k, i));
        }
    }

    #[test]
    fn slab_reuses_indices_and_grows_past_its_capacity() {
        let mut s = Slab::new(2);
        let a = s.insert(1);
        let b = s.insert(2);
        let c = s.insert(3);
        assert_eq!(s.len(), 3);
        assert_eq!(s.remove(b), Some(2));
        assert_eq!(s.remove(b), None);
        assert_eq!(s.insert(4), b);
        assert_eq!((s.get(a), s.get(c)), (Some(&1), Some(&3)));
        assert!(!s.is_empty());
    }

    #[test]
    fn pieces_tile_a_request_within_chunks() {
        let cs = 16;
        let (start, len) = (10, 40);
        let (c0, c1) = chunk_span(start, len, cs);
        assert_eq!((c0, c1), (0, 3));
        let parts: Vec<_> = (c0..=c1).map(|c| piece_of(c, start, len, cs)).collect();
        assert_eq!(parts, vec![(10, 6, 0), (0, 16, 6), (0, 16, 22), (0, 2, 38)]);
    }
}
