//! Fences: the writes that were in flight at a consistency point.
//!
//! A consistency point (T0) must contain every write the hosts issued before
//! it. The simple way is to hold new I/O and wait until the writes in flight
//! have completed; then the freeze lasts as long as the slowest of them
//! (milliseconds on a busy disk). Instead the freeze only *records* where
//! they are, and lets hosts go on at once:
//!
//! * every cow channel keeps an [`InflightTable`]: how many of its mutating
//!   I/Os are in flight per 64 KiB *granule* of the volume (a fixed-capacity
//!   open-addressing table, updated on submit and completion: no allocation,
//!   no lock, no sharing);
//! * during the freeze every channel that has writes in flight adds its
//!   counts to the job's [`FenceTable`] and acknowledges; the freeze ends
//!   when all have (one reactor pass each), not when the writes complete;
//! * a granule with a count is *fenced*: its content at T0 is not known until
//!   those writes land. Nothing reads a fenced chunk's T0 content from the
//!   source: a host write that would capture it waits, the copy stream comes
//!   back to it later, and the point-in-time view waits. Everything else (all
//!   reads, writes to other chunks) runs;
//! * on completion a channel takes the count off its own table first, and
//!   off the fence only when its own table has none for that granule. A
//!   channel's writes in flight are exactly its own entries plus what it
//!   registered and has not released, so a fence count reaches zero only
//!   after every write registered for that granule has completed (perhaps
//!   later, never earlier);
//! * the job's source flush waits until the fence is empty, so that it
//!   covers those writes too.
//!
//! If the job's table fills (more distinct granules in flight than it was
//! sized for), it fences everything until every registered write has
//! completed: the old protocol's guarantee, without holding reads.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// The fence granule: 64 KiB of the volume.
pub const GRANULE_BYTES: u64 = 64 * 1024;

/// Entries of a channel's table: a channel with more distinct granules in
/// flight holds further writes until some complete.
pub const CHANNEL_ENTRIES: usize = 2048;

/// The granule shift, in blocks, for a volume of `block_size`-byte blocks.
pub fn granule_shift(block_size: u64) -> u32 {
    (GRANULE_BYTES / block_size.clamp(1, GRANULE_BYTES)).trailing_zeros()
}

/// The granules blocks `offset .. offset + count` touch (`count` ≥ 1).
#[inline]
pub fn granules(offset: u64, count: u64, shift: u32) -> std::ops::RangeInclusive<u64> {
    (offset >> shift)..=((offset + count.max(1) - 1) >> shift)
}

/// A channel's writes in flight per granule. Linear probing with
/// backward-shift deletion; keys are `granule + 1` (0 is empty).
pub struct InflightTable {
    keys: Box<[u64]>,
    counts: Box<[u32]>,
    used: usize,
}

impl InflightTable {
    pub fn new(entries: usize) -> InflightTable {
        let cap = entries.next_power_of_two().max(8);
        InflightTable {
            keys: vec![0; cap].into_boxed_slice(),
            counts: vec![0; cap].into_boxed_slice(),
            used: 0,
        }
    }

    #[inline]
    fn mask(&self) -> usize {
        self.keys.len() - 1
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & self.mask()
    }

    /// Whether `n` more distinct granules fit (the table stays at most three
    /// quarters full, so probes stay short).
    #[inline]
    pub fn has_room(&self, n: u64) -> bool {
        (self.used as u64 + n) * 4 <= self.keys.len() as u64 * 3
    }

    /// One more write in flight on granule `g`; false if the table is full.
    #[inline]
    pub fn add(&mut self, g: u64) -> bool {
        let key = g + 1;
        let mut i = self.home(key);
        loop {
            match self.keys[i] {
                k if k == key => {
                    self.counts[i] += 1;
                    return true;
                }
                0 => {
                    if !self.has_room(1) {
                        return false;
                    }
                    self.keys[i] = key;
                    self.counts[i] = 1;
                    self.used += 1;
                    return true;
                }
                _ => i = (i + 1) & self.mask(),
            }
        }
    }

    /// One write on `g` completed; false if the table had none there.
    #[inline]
    pub fn remove(&mut self, g: u64) -> bool {
        let key = g + 1;
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            match self.keys[i] {
                0 => return false,
                k if k == key => break,
                _ => i = (i + 1) & mask,
            }
        }
        self.counts[i] -= 1;
        if self.counts[i] > 0 {
            return true;
        }
        // Backward-shift deletion: keep every later key of the cluster
        // reachable from its home slot.
        self.used -= 1;
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.keys[j] != 0 {
            let h = self.home(self.keys[j]);
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < h && h <= j
            } else {
                hole < h || h <= j
            };
            if !stays {
                self.keys[hole] = self.keys[j];
                self.counts[hole] = self.counts[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.keys[hole] = 0;
        self.counts[hole] = 0;
        true
    }

    /// Moves every count into `fence` and empties the table; returns the
    /// writes moved (per granule: a write on k granules counts k times).
    pub fn register_into(&mut self, fence: &FenceTable) -> u64 {
        let mut moved = 0;
        for i in 0..self.keys.len() {
            if self.keys[i] != 0 {
                fence.add(self.keys[i] - 1, self.counts[i]);
                moved += self.counts[i] as u64;
                self.keys[i] = 0;
                self.counts[i] = 0;
            }
        }
        self.used = 0;
        moved
    }

    /// Distinct granules with writes in flight.
    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }
}

/// The granules fenced at a job's consistency point, shared by every core:
/// open addressing with atomic keys and counts, filled only during the
/// freeze and emptied by completions. Keys are never removed (the table
/// lives as long as its job).
pub struct FenceTable {
    keys: Box<[AtomicU64]>,
    counts: Box<[AtomicU32]>,
    /// Granule counts registered and not yet released (0: nothing fenced).
    left: AtomicU64,
    /// The table overflowed: every granule is fenced until `left` is 0.
    all: AtomicBool,
    shift: AtomicU32,
}

impl FenceTable {
    /// A table for about `entries` distinct granules.
    pub fn new(entries: usize) -> FenceTable {
        let cap = (entries * 2).next_power_of_two().max(64);
        FenceTable {
            keys: (0..cap).map(|_| AtomicU64::new(0)).collect(),
            counts: (0..cap).map(|_| AtomicU32::new(0)).collect(),
            left: AtomicU64::new(0),
            all: AtomicBool::new(false),
            shift: AtomicU32::new(0),
        }
    }

    /// Sets the granule shift of the volume (before the freeze).
    pub fn set_shift(&self, shift: u32) {
        self.shift.store(shift, Ordering::Relaxed);
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & (self.keys.len() - 1)
    }

    /// Registers `n` writes in flight on granule `g`.
    pub fn add(&self, g: u64, n: u32) {
        let key = g + 1;
        self.left.fetch_add(n as u64, Ordering::AcqRel);
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        for _ in 0..self.keys.len() {
            match self.keys[i].compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.counts[i].fetch_add(n, Ordering::AcqRel);
                    return;
                }
                Err(k) if k == key => {
                    self.counts[i].fetch_add(n, Ordering::AcqRel);
                    return;
                }
                Err(_) => i = (i + 1) & mask,
            }
        }
        // Full: fence everything until every registered write completes.
        self.all.store(true, Ordering::Release);
    }

    /// A registered write on granule `g` completed.
    pub fn release(&self, g: u64) {
        let key = g + 1;
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        for _ in 0..self.keys.len() {
            match self.keys[i].load(Ordering::Acquire) {
                k if k == key => {
                    self.counts[i].fetch_sub(1, Ordering::AcqRel);
                    break;
                }
                0 => break,
                _ => i = (i + 1) & mask,
            }
        }
        // (Not found: it was counted under `all`.)
        self.left.fetch_sub(1, Ordering::AcqRel);
    }

    /// Gives up `n` registered counts whose writes will never be reported
    /// (their channel went away). Their granules stay fenced until every
    /// other registered write has completed.
    pub fn forget(&self, n: u64) {
        self.all.store(true, Ordering::Release);
        self.left.fetch_sub(n, Ordering::AcqRel);
    }

    /// Whether anything is fenced.
    #[inline]
    pub fn active(&self) -> bool {
        self.left.load(Ordering::Acquire) > 0
    }

    /// Registered granule counts not yet released.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }

    fn granule_fenced(&self, g: u64) -> bool {
        let key = g + 1;
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        for _ in 0..self.keys.len() {
            match self.keys[i].load(Ordering::Acquire) {
                k if k == key => return self.counts[i].load(Ordering::Acquire) > 0,
                0 => return false,
                _ => i = (i + 1) & mask,
            }
        }
        false
    }

    /// Whether blocks `offset .. offset + count` touch a fenced granule: their
    /// content at the consistency point is not on the source yet.
    #[inline]
    pub fn fenced(&self, offset: u64, count: u64) -> bool {
        if !self.active() {
            return false;
        }
        if self.all.load(Ordering::Acquire) {
            return true;
        }
        let shift = self.shift.load(Ordering::Relaxed);
        granules(offset, count, shift).any(|g| self.granule_fenced(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn granule_shift_is_64k() {
        assert_eq!(granule_shift(512), 7);
        assert_eq!(granule_shift(4096), 4);
        assert_eq!(granules(15, 2, 4), 0..=1);
        assert_eq!(granules(16, 16, 4), 1..=1);
    }

    proptest! {
        /// The table agrees with a plain map under any sequence of adds and
        /// removes (backward-shift deletion keeps every key findable).
        #[test]
        fn inflight_table_matches_a_map(ops in prop::collection::vec((any::<bool>(), 0u64..64), 1..600)) {
            let mut t = InflightTable::new(16);
            let mut m = std::collections::HashMap::<u64, u32>::new();
            for (add, g) in ops {
                if add {
                    let fits = t.has_room(1) || m.contains_key(&g);
                    let ok = t.add(g);
                    prop_assert_eq!(ok, fits);
                    if ok { *m.entry(g).or_default() += 1; }
                } else {
                    let had = m.get(&g).copied().unwrap_or(0) > 0;
                    prop_assert_eq!(t.remove(g), had);
                    if had {
                        let c = m.get_mut(&g).unwrap();
                        *c -= 1;
                        if *c == 0 { m.remove(&g); }
                    }
                }
                prop_assert_eq!(t.len(), m.len());
            }
            let f = FenceTable::new(64);
            let moved = t.register_into(&f);
            prop_assert_eq!(moved, m.values().map(|&c| c as u64).sum::<u64>());
            prop_assert!(t.is_empty());
            for g in 0..64u64 {
                prop_assert_eq!(f.granule_fenced(g), m.contains_key(&g));
            }
        }
    }

    #[test]
    fn fence_clears_when_every_registered_write_completes() {
        let f = FenceTable::new(4);
        f.set_shift(4);
        f.add(3, 2);
        f.add(9, 1);
        assert!(f.fenced(48, 1) && f.fenced(40, 16) && !f.fenced(64, 16));
        f.release(3);
        assert!(f.fenced(48, 1));
        f.release(3);
        assert!(!f.fenced(48, 1) && f.fenced(144, 1));
        f.release(9);
        assert!(!f.active() && !f.fenced(144, 1));
    }

    #[test]
    fn a_full_fence_fences_everything_until_empty() {
        let f = FenceTable::new(1); // 64 entries
        for g in 0..65 {
            f.add(g, 1);
        }
        assert!(f.fenced(1 << 40, 1));
        for g in 0..65 {
            f.release(g);
        }
        assert!(!f.active() && !f.fenced(1 << 40, 1));
    }
}
