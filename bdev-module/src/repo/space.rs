//! The in-memory free-space map: one bit per 4 KiB allocation unit, set when
//! the unit is in use. It is never written to the device: [`super::Repo`]
//! rebuilds it at open from what the committed catalog references.

use super::format::ALLOC_UNIT;

/// A bitmap allocator over `units` allocation units.
#[derive(Debug, Clone)]
pub struct SpaceMap {
    words: Vec<u64>,
    units: u64,
    used: u64,
    /// Where the next data allocation starts looking (next fit keeps the
    /// chunks of one backup in device order).
    data_hint: u64,
}

impl SpaceMap {
    /// An empty map of a namespace of `size` bytes (whole units only).
    pub fn new(size: u64) -> SpaceMap {
        let units = size / ALLOC_UNIT;
        SpaceMap {
            words: vec![0; units.div_ceil(64) as usize],
            units,
            used: 0,
            data_hint: 0,
        }
    }

    pub fn units(&self) -> u64 {
        self.units
    }

    pub fn used_units(&self) -> u64 {
        self.used
    }

    #[cfg(test)]
    pub fn is_used(&self, unit: u64) -> bool {
        unit < self.units && self.words[(unit / 64) as usize] & (1 << (unit % 64)) != 0
    }

    fn set_range(&mut self, start: u64, n: u64, on: bool) {
        let end = (start + n).min(self.units);
        let mut u = start.min(end);
        while u < end {
            let bit = u % 64;
            let take = (64 - bit).min(end - u);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            let w = &mut self.words[(u / 64) as usize];
            let before = (*w & mask).count_ones() as u64;
            if on {
                *w |= mask;
                self.used += take - before;
            } else {
                *w &= !mask;
                self.used -= before;
            }
            u += take;
        }
    }

    /// Marks the units covering `len` bytes at byte `offset` as used
    /// (idempotent; clipped to the namespace).
    pub fn mark_bytes(&mut self, offset: u64, len: u64) {
        let start = offset / ALLOC_UNIT;
        let end = offset.saturating_add(len).div_ceil(ALLOC_UNIT);
        self.set_range(start, end - start, true);
    }

    /// Frees the units covering `len` bytes at byte `offset`.
    pub fn free_bytes(&mut self, offset: u64, len: u64) {
        let start = offset / ALLOC_UNIT;
        let end = offset.saturating_add(len).div_ceil(ALLOC_UNIT);
        self.set_range(start, end - start, false);
    }

    /// First run of `n` free units in `[from, to)`.
    fn find_run(&self, from: u64, to: u64, n: u64) -> Option<u64> {
        let mut u = from;
        let mut run_start = from;
        let mut run = 0u64;
        while u < to {
            let w = self.words[(u / 64) as usize];
            if u.is_multiple_of(64) && u + 64 <= to && (w == 0 || w == u64::MAX) {
                if w == u64::MAX {
                    run = 0;
                } else {
                    if run == 0 {
                        run_start = u;
                    }
                    run += 64;
                    if run >= n {
                        return Some(run_start);
                    }
                }
                u += 64;
                continue;
            }
            if w & (1 << (u % 64)) != 0 {
                run = 0;
            } else {
                if run == 0 {
                    run_start = u;
                }
                run += 1;
                if run >= n {
                    return Some(run_start);
                }
            }
            u += 1;
        }
        None
    }

    /// Allocates `n` contiguous units for chunk data, next fit from where the
    /// last data allocation ended. Returns the first unit.
    pub fn alloc_data(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.units {
            return None;
        }
        let hint = self.data_hint.min(self.units);
        let start = self
            .find_run(hint, self.units, n)
            .or_else(|| self.find_run(0, self.units, n))?;
        self.set_range(start, n, true);
        self.data_hint = start + n;
        Some(start)
    }

    /// Allocates `n` contiguous units for metadata, first fit from the start
    /// of the namespace (metadata stays near the superblocks).
    pub fn alloc_meta(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.units {
            return None;
        }
        let start = self.find_run(0, self.units, n)?;
        self.set_range(start, n, true);
        Some(start)
    }

    /// The longest run of free units.
    pub fn largest_free(&self) -> u64 {
        let (mut best, mut run) = (0, 0);
        let mut u = 0;
        while u < self.units {
            let w = self.words[(u / 64) as usize];
            if u.is_multiple_of(64) && u + 64 <= self.units && (w == 0 || w == u64::MAX) {
                run = if w == 0 { run + 64 } else { 0 };
                best = best.max(run);
                u += 64;
                continue;
            }
            if w & (1 << (u % 64)) != 0 {
                run = 0;
            } else {
                run += 1;
                best = best.max(run);
            }
            u += 1;
        }
        best
    }

    /// Keeps the data allocation position of `other` (after a rebuild).
    pub fn take_hint(&mut self, other: &SpaceMap) {
        self.data_hint = other.data_hint;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_contiguous_runs_and_frees() {
        let mut m = SpaceMap::new(300 * ALLOC_UNIT);
        m.mark_bytes(0, 2 * ALLOC_UNIT);
        assert_eq!(m.used_units(), 2);
        assert_eq!(m.alloc_meta(1), Some(2));
        assert_eq!(m.alloc_data(100), Some(3));
        assert_eq!(m.alloc_data(100), Some(103));
        assert_eq!(m.alloc_data(100), None, "97 left");
        assert_eq!(m.alloc_data(97), Some(203));
        assert_eq!(m.used_units(), 300);
        m.free_bytes(50 * ALLOC_UNIT, 70 * ALLOC_UNIT);
        assert_eq!(m.used_units(), 230);
        assert_eq!(m.largest_free(), 70);
        // Next fit wraps around to the hole.
        assert_eq!(m.alloc_data(64), Some(50));
        assert_eq!(m.alloc_meta(6), Some(114));
        assert_eq!(m.alloc_meta(1), None);
        // Marking is idempotent.
        m.mark_bytes(0, 300 * ALLOC_UNIT);
        assert_eq!(m.used_units(), 300);
        m.free_bytes(1, 1);
        assert!(!m.is_used(0));
        assert_eq!(m.used_units(), 299);
    }

    #[test]
    fn finds_runs_across_word_boundaries() {
        let mut m = SpaceMap::new(1000 * ALLOC_UNIT);
        m.mark_bytes(0, 1000 * ALLOC_UNIT);
        m.free_bytes(60 * ALLOC_UNIT, 10 * ALLOC_UNIT); // 60..70
        m.free_bytes(120 * ALLOC_UNIT, 200 * ALLOC_UNIT); // 120..320
        assert_eq!(m.alloc_meta(11), Some(120));
        assert_eq!(m.alloc_meta(10), Some(60));
        assert_eq!(m.alloc_meta(189), Some(131));
        assert_eq!(m.alloc_meta(1), None);
    }

    #[test]
    fn largest_free_spans_whole_words() {
        let mut m = SpaceMap::new(1000 * ALLOC_UNIT);
        assert_eq!(m.largest_free(), 1000);
        m.mark_bytes(10 * ALLOC_UNIT, ALLOC_UNIT);
        m.mark_bytes(500 * ALLOC_UNIT, ALLOC_UNIT);
        assert_eq!(m.largest_free(), 499);
        m.mark_bytes(0, 1000 * ALLOC_UNIT);
        assert_eq!(m.largest_free(), 0);
    }
}
