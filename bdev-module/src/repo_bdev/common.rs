//! Pieces shared by the channels of the snapshot and instant-restore bdevs:
//! internal tokens, slot tables, and the caller's requests kept aside.

use hotcopy_bdev::{BdevIo, IoStatus};

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
