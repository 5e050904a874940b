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
//!   open-addressing table, updated on submit, and for completions in
//!   batches: no allocation, no lock; shared only through the channel's
//!   [`Gate`]);
//! * during the freeze, its controller adds every channel's writes in
//!   flight to the job's [`FenceTable`]. The channel and the controller
//!   hand the channel's table over through a [`Gate`] (a compare-and-swap
//!   to take it, a store to give it back; the owner never waits for it, see
//!   there), so the freeze does not wait for every reactor to come round,
//!   nor for the writes to complete: a reactor held up in a system call (a
//!   virtio doorbell that takes milliseconds on a busy host) does not hold
//!   up the consistency point. (One case still waits: a channel whose
//!   writes registered at the previous consistency point are still
//!   landing. Their counts must go back to that fence first, so the
//!   controller waits for that channel to reap them.);
//! * every write a channel counts carries a tag, the number of times the
//!   channel's writes had been registered; on completion, a write with a
//!   lower tag was registered and releases its granules from the fence, any
//!   other comes off the channel's own table. So a fence count reaches zero
//!   exactly when every write registered for that granule has completed,
//!   however many later writes to it are in flight;
//! * the job's source flush waits until the fence is empty, so that it
//!   covers those writes too.
//!
//! If the job's table fills (more distinct granules in flight than it was
//! sized for), it fences everything until every registered write has
//! completed: the old protocol's guarantee, without holding reads.
//!
//! The hand-over (the gate, the point read again inside it, the tags, the
//! fence's release, a second point waiting for the first's writes) is
//! model-checked with loom at the end of this file: the models drive this
//! file's code from a channel and a controller that take the cow bdev's
//! steps. `.ci/run` runs them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use sync::{AtomicBool, AtomicU32, AtomicU64, UnsafeCell};

/// What the [`Gate`] and the [`FenceTable`] are built on: std's atomics, or
/// loom's when the crate's tests are built for the model checker
/// (`RUSTFLAGS="--cfg hotcopy_loom"`, see `loom_model` below).
mod sync {
    #[cfg(all(test, hotcopy_loom))]
    pub use loom::cell::UnsafeCell;
    #[cfg(all(test, hotcopy_loom))]
    pub use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
    #[cfg(not(all(test, hotcopy_loom)))]
    pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};

    /// `std::cell::UnsafeCell` with loom's way in: a raw pointer lent to a
    /// closure (so that loom can check who touches the cell, and when).
    #[cfg(not(all(test, hotcopy_loom)))]
    pub struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    #[cfg(not(all(test, hotcopy_loom)))]
    impl<T> UnsafeCell<T> {
        pub fn new(t: T) -> UnsafeCell<T> {
            UnsafeCell(std::cell::UnsafeCell::new(t))
        }

        #[inline(always)]
        pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

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

/// Writes over more granules than this are tracked whole (by range), at most
/// [`BIG_WRITES`] at a time per channel.
pub const BIG_GRANULES: u64 = 64;
pub const BIG_WRITES: usize = 16;

/// A channel's writes in flight, and what it registered at the last
/// consistency point. Lives in the channel's [`Gate`].
pub struct Tracking {
    /// Writes in flight per granule.
    tracked: InflightTable,
    /// Writes over more than [`BIG_GRANULES`] granules, by block range.
    big: Vec<(u64, u64)>,
    gshift: u32,
    /// The fence this channel's writes were registered in, and how many
    /// granule counts of it they have not released yet.
    fence: Option<Arc<FenceTable>>,
    fenced_left: u64,
    /// The consistency point (see [`Gate`]) of the last registration, and
    /// how many registrations there have been: a write is tagged with the
    /// count when it is counted, so its completion can tell whether it was
    /// registered (a lower tag) or is still the channel's own.
    point: u64,
    registrations: u64,
    /// The channel is gone: nothing to register, nothing will complete.
    closed: bool,
}

impl Tracking {
    pub fn new(entries: usize, gshift: u32) -> Tracking {
        Tracking {
            tracked: InflightTable::new(entries),
            big: Vec::with_capacity(BIG_WRITES),
            gshift,
            fence: None,
            fenced_left: 0,
            point: 0,
            registrations: 0,
            closed: false,
        }
    }

    #[inline]
    fn granule_count(&self, offset: u64, count: u64) -> u64 {
        let r = granules(offset, count, self.gshift);
        r.end() - r.start() + 1
    }

    /// Counts a write of blocks `offset .. offset + count` going to the
    /// source, and returns the tag to give [`Tracking::untrack`] when it
    /// completes; `None` (and nothing counted) if the tables have no room.
    #[inline]
    pub fn track(&mut self, offset: u64, count: u64) -> Option<u64> {
        let n = self.granule_count(offset, count);
        if n > BIG_GRANULES {
            if self.big.len() >= BIG_WRITES {
                return None;
            }
            self.big.push((offset, count));
            return Some(self.registrations);
        }
        if !self.tracked.has_room(n) {
            return None;
        }
        for g in granules(offset, count, self.gshift) {
            let added = self.tracked.add(g);
            debug_assert!(added, "room checked above");
        }
        Some(self.registrations)
    }

    /// A tracked write completed (`tag` is what [`Tracking::track`] gave
    /// it): off the fence if it was in flight at the last registration,
    /// else off the channel's own tables.
    ///
    /// The tag, not the tables, tells the two apart: a write registered at
    /// a consistency point and later writes to the same granule are counted
    /// in different places, and a granule that always has a later write in
    /// flight (a hot block written at queue depth 2 or more) would otherwise
    /// never release the fence. Only the last registration can still have
    /// writes in flight: the next waits until they have all completed.
    #[inline]
    pub fn untrack(&mut self, offset: u64, count: u64, tag: u64) {
        if tag < self.registrations {
            if let Some(f) = self.fence.as_ref() {
                for g in granules(offset, count, self.gshift) {
                    f.release(g);
                    self.fenced_left -= 1;
                }
                if self.fenced_left == 0 {
                    self.fence = None;
                }
            }
            return;
        }
        if self.granule_count(offset, count) > BIG_GRANULES {
            let i = self.big.iter().position(|&r| r == (offset, count));
            debug_assert!(i.is_some(), "a big write counted when it went out");
            if let Some(i) = i {
                self.big.swap_remove(i);
            }
        } else {
            for g in granules(offset, count, self.gshift) {
                let had = self.tracked.remove(g);
                debug_assert!(had, "a write counted when it went out");
            }
        }
    }

    /// Takes off every write in `finished` (block range and tag, as for
    /// [`Tracking::untrack`]), emptying it.
    #[inline]
    pub fn untrack_all(&mut self, finished: &mut Vec<(u64, u64, u64)>) {
        for (offset, count, tag) in finished.drain(..) {
            self.untrack(offset, count, tag);
        }
    }

    /// Registers every write in flight in `fence` for consistency point
    /// `point`. False while the writes registered at an earlier point are
    /// still landing (their counts must go back to that fence first): try
    /// again later.
    pub fn register(&mut self, fence: &Arc<FenceTable>, point: u64) -> bool {
        if self.point == point || self.closed {
            return true;
        }
        if self.fenced_left > 0 {
            return false;
        }
        let mut moved = self.tracked.register_into(fence);
        for (off, n) in self.big.drain(..) {
            for g in granules(off, n, self.gshift) {
                fence.add(g, 1);
                moved += 1;
            }
        }
        if moved > 0 {
            self.fenced_left = moved;
            self.fence = Some(fence.clone());
        }
        self.point = point;
        self.registrations += 1;
        true
    }

    /// The channel is going away: the writes it registered will not be
    /// reported, so the fence must not wait for them.
    pub fn close(&mut self) {
        if let Some(f) = self.fence.take() {
            f.forget(self.fenced_left);
        }
        self.fenced_left = 0;
        self.closed = true;
    }
}

/// Who holds a [`Gate`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Holder {
    /// The channel, on its own reactor.
    Owner = 1,
    /// A consistency point's controller, on the job's home reactor.
    Freezer = 2,
}

const GATE_OPEN: u32 = 0;

/// A channel's [`Tracking`], handed between the channel and a consistency
/// point's controller.
///
/// Whoever wants it swaps the gate from open to itself, works, and opens it
/// again; whoever finds it taken does not wait:
/// * the owner only takes it to count a write going to the source (after
///   checking, inside, that no consistency point began since it decided to
///   forward the write) and to count completions. Finding it taken means a
///   consistency point is being set up: it holds the write like any other
///   during a freeze, and keeps the completions for its next poll;
/// * the controller takes it to register the channel's writes in flight,
///   after announcing the consistency point. Finding it taken, it tries
///   again on its next step (the owner holds it for one write's table
///   update and a batch of completions).
///
/// So taking the gate once after the announcement proves that every write
/// the channel forwarded without seeing it is in the table, and that every
/// later one sees it, without waiting for the channel's reactor to come
/// round (it may be inside a system call that takes milliseconds).
pub struct Gate {
    state: AtomicU32,
    tracking: UnsafeCell<Tracking>,
}

// SAFETY: `tracking` is only reached through `try_with`, which hands out the
// `&mut` only to the one caller whose compare-and-swap took the gate from
// open (Acquire), and opens it again (Release) after the closure returns or
// unwinds (the `&mut` cannot outlive the closure), so
// accesses from the two threads never overlap and each sees the other's
// writes. `Tracking` itself is `Send`.
unsafe impl Sync for Gate {}

impl Gate {
    pub fn new(tracking: Tracking) -> Gate {
        Gate {
            state: AtomicU32::new(GATE_OPEN),
            tracking: UnsafeCell::new(tracking),
        }
    }

    /// Runs `f` on the tracking if the gate is open; `None` if the other
    /// side holds it.
    #[inline]
    pub fn try_with<R>(&self, who: Holder, f: impl FnOnce(&mut Tracking) -> R) -> Option<R> {
        self.state
            .compare_exchange(GATE_OPEN, who as u32, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // Opens the gate again when `f` returns, or unwinds.
        struct Reopen<'a>(&'a AtomicU32);
        impl Drop for Reopen<'_> {
            fn drop(&mut self) {
                self.0.store(GATE_OPEN, Ordering::Release);
            }
        }
        let _reopen = Reopen(&self.state);
        // SAFETY: the swap above made us the only holder (see `impl Sync`),
        // until `_reopen` opens the gate after `f` is done with the borrow.
        Some(self.tracking.with_mut(|t| f(unsafe { &mut *t })))
    }

    /// The owner's side of a consistency point: counts a write of blocks
    /// `offset .. offset + count` going to the source and returns its tag
    /// (see [`Tracking::track`]), unless the gate is taken, the tracking is
    /// full, or a consistency point began since the caller read `seen` from
    /// `point` and decided to forward the write. The point is read again
    /// inside the gate: a controller that announced it and registered the
    /// channel in between would otherwise find the write in neither the
    /// fence nor the channel's held writes. `inside` runs first under the
    /// gate (completions to take off), `counted` once the write is counted
    /// (what must be counted with it, under the gate).
    #[inline]
    pub fn count_write(
        &self,
        point: impl FnOnce() -> u64,
        seen: u64,
        (offset, count): (u64, u64),
        inside: impl FnOnce(&mut Tracking),
        counted: impl FnOnce(),
    ) -> Option<u64> {
        self.try_with(Holder::Owner, |t| {
            inside(t);
            if point() != seen {
                return None;
            }
            let tag = t.track(offset, count)?;
            counted();
            Some(tag)
        })
        .flatten()
    }

    /// Runs `f` once the gate is open (control path: the channel going away).
    pub fn with_spin<R>(&self, who: Holder, f: impl FnOnce(&mut Tracking) -> R) -> R {
        let mut f = Some(f);
        loop {
            if let Some(r) = self.try_with(who, |t| (f.take().expect("runs once"))(t)) {
                return r;
            }
            std::hint::spin_loop();
        }
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
    fn tracking_hands_writes_in_flight_to_the_fence_and_takes_them_back() {
        let mut t = Tracking::new(16, 4); // 16 blocks per granule
        let a = t.track(0, 1).unwrap();
        let b = t.track(3, 1).unwrap();
        let c = t.track(40, 1).unwrap();
        let f = Arc::new(FenceTable::new(16));
        f.set_shift(4);
        assert!(t.register(&f, 1));
        assert!(
            t.register(&f, 1),
            "registering twice for one point is a no-op"
        );
        assert_eq!(f.left(), 3);
        assert!(f.fenced(0, 1) && f.fenced(32, 16) && !f.fenced(16, 16));
        // A write after the point stays the channel's own.
        let d = t.track(0, 1).unwrap();
        assert_eq!(f.left(), 3);
        // The next point must wait until the first one's writes landed.
        let g = Arc::new(FenceTable::new(16));
        assert!(!t.register(&g, 3));
        t.untrack(0, 1, d); // the post-point write: off the channel's table
        assert_eq!(f.left(), 3);
        t.untrack(0, 1, a);
        t.untrack(3, 1, b);
        assert_eq!(f.left(), 1);
        assert!(!f.fenced(0, 1) && f.fenced(40, 1));
        t.untrack(40, 1, c);
        assert!(!f.active());
        assert!(t.register(&g, 3) && !g.active(), "nothing in flight");
        // No room: the write is not counted.
        let mut small = Tracking::new(8, 0); // 8 entries, 6 usable
        let fitted = (0..8).filter(|&b| small.track(b, 1).is_some()).count();
        assert_eq!(fitted, 6);
        // Big writes are counted by range, a few at a time.
        let mut big = Tracking::new(16, 0);
        let tags: Vec<_> = (0..20).map(|i| big.track(i * 1000, 100)).collect();
        assert_eq!(tags.iter().flatten().count(), BIG_WRITES);
        big.untrack(0, 100, tags[0].unwrap());
        assert!(big.track(50_000, 100).is_some());
    }

    /// A hot granule that always has a later write in flight still releases
    /// the fence when its registered write completes.
    #[test]
    fn a_granule_written_without_pause_releases_the_fence_on_time() {
        let mut t = Tracking::new(16, 4);
        let first = t.track(5, 1).unwrap();
        let f = Arc::new(FenceTable::new(16));
        f.set_shift(4);
        assert!(t.register(&f, 1));
        // Queue depth 2 on the same block: a later write is always in
        // flight, before and after the registered one completes.
        let mut prev = t.track(5, 1).unwrap();
        for i in 0..10 {
            let next = t.track(5, 1).unwrap();
            if i == 4 {
                assert!(f.fenced(5, 1));
                t.untrack(5, 1, first);
                assert!(!f.active(), "the registered write completed");
            }
            t.untrack(5, 1, prev);
            prev = next;
        }
        t.untrack(5, 1, prev);
        assert!(!f.active() && t.tracked.is_empty());
    }

    #[test]
    fn a_closed_channel_gives_up_what_it_registered() {
        let mut t = Tracking::new(16, 0);
        assert!(t.track(7, 1).is_some());
        let f = Arc::new(FenceTable::new(16));
        assert!(t.register(&f, 1));
        t.close();
        assert!(!f.active());
        assert!(t.register(&Arc::new(FenceTable::new(16)), 3));
    }

    #[test]
    fn a_held_gate_turns_the_other_side_away() {
        let gate = Gate::new(Tracking::new(16, 0));
        let inner = gate.try_with(Holder::Freezer, |_| {
            gate.try_with(Holder::Owner, |_| ()).is_some()
        });
        assert_eq!(inner, Some(false));
        assert_eq!(
            gate.try_with(Holder::Owner, |t| t.track(1, 1)),
            Some(Some(0))
        );
    }

    /// An owner tracking and completing writes on one thread, a controller
    /// registering them at consistency points on another, both through the
    /// gate: every count ends up released exactly once, whoever held it.
    #[test]
    fn owner_and_controller_share_the_tracking_without_losing_counts() {
        let gate = Arc::new(Gate::new(Tracking::new(64, 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let fences: Arc<std::sync::Mutex<Vec<Arc<FenceTable>>>> = Arc::default();
        let controller = {
            let (gate, stop, fences) = (gate.clone(), stop.clone(), fences.clone());
            let rounds = rounds.clone();
            std::thread::spawn(move || {
                let mut point = 1;
                while !stop.load(Ordering::Acquire) {
                    let f = Arc::new(FenceTable::new(64));
                    loop {
                        match gate.try_with(Holder::Freezer, |t| t.register(&f, point)) {
                            Some(true) => break,
                            _ if stop.load(Ordering::Acquire) => break,
                            _ => std::hint::spin_loop(),
                        }
                    }
                    fences.lock().unwrap().push(f);
                    rounds.fetch_add(1, Ordering::Release);
                    point += 2;
                }
            })
        };
        // Writes in flight (block, tag), completing in any order.
        let mut inflight: Vec<(u64, u64)> = Vec::new();
        let mut finished = Vec::new();
        let mut x = 0x1234_5678_u64;
        // At least 200 K steps, and on until the controller has come round
        // 100 times (a loaded machine may not run it at once), for 20 s at
        // most.
        let started = std::time::Instant::now();
        let mut i = 0u64;
        while i < 200_000
            || (rounds.load(Ordering::Acquire) < 100
                && started.elapsed() < std::time::Duration::from_secs(20))
        {
            i += 1;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if inflight.len() < 32 && !x.is_multiple_of(3) {
                let b = x % 40;
                if let Some(Some(tag)) = gate.try_with(Holder::Owner, |t| t.track(b, 1)) {
                    inflight.push((b, tag));
                }
            } else if !inflight.is_empty() {
                let k = (x >> 8) as usize % inflight.len();
                finished.push(inflight.swap_remove(k));
            }
            if i.is_multiple_of(8) && !finished.is_empty() {
                gate.try_with(Holder::Owner, |t| {
                    for (b, tag) in finished.drain(..) {
                        t.untrack(b, 1, tag);
                    }
                });
            }
        }
        finished.append(&mut inflight);
        stop.store(true, Ordering::Release);
        controller.join().unwrap();
        let registered = rounds.load(Ordering::Acquire);
        gate.with_spin(Holder::Owner, |t| {
            for (b, tag) in finished.drain(..) {
                t.untrack(b, 1, tag);
            }
            assert!(t.tracked.is_empty() && t.fenced_left == 0);
        });
        assert!(
            registered >= 100,
            "the controller registered {registered} times"
        );
        for f in fences.lock().unwrap().iter() {
            assert_eq!(f.left(), 0);
        }
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

/// The consistency point's hand-over, under the interleavings loom explores:
/// `RUSTFLAGS="--cfg hotcopy_loom" cargo test -p hotcopy-cow --lib
/// --profile loom loom_model` (`.ci/run` does).
/// The models drive this file's code (the gate, `Gate::count_write`, the
/// tracking and the fence table); the channel's and the controller's steps
/// around it are re-enacted the way `vbdev` takes them: the channel reads
/// the point, decides, then counts the write inside the gate, and takes
/// completions off there too (keeping them while the gate is taken); the
/// controller announces the point and registers the channel, retrying while
/// the gate is taken or the last point's writes are still landing.
#[cfg(all(test, hotcopy_loom))]
mod loom_model {
    use super::*;
    use loom::sync::atomic::{AtomicBool as LoomBool, AtomicU64 as LoomU64};
    use loom::sync::Arc;
    use loom::thread;

    /// Every interleaving (`bound: None`), or those with up to `bound`
    /// preemptions (loom's advice: most bugs show within two or three) where
    /// a side waits for the other in a loop and the whole space is too large.
    fn model_with(bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = bound;
        b.max_branches = 100_000;
        b.check(f);
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        model_with(None, f);
    }

    /// Blocks `BLOCK .. BLOCK + 1`, granule `BLOCK` (the models use a granule
    /// shift of 0: one block per granule).
    const BLOCK: u64 = 5;

    type Fence = std::sync::Arc<FenceTable>;

    fn fence() -> Fence {
        let fence = std::sync::Arc::new(FenceTable::new(4));
        fence.set_shift(0);
        fence
    }

    fn parts() -> (Arc<LoomU64>, Arc<Gate>, Fence) {
        (
            Arc::new(LoomU64::new(0)),
            Arc::new(Gate::new(Tracking::new(8, 0))),
            fence(),
        )
    }

    /// The channel forwards one write: `Some(tag)` if it went to the
    /// source, `None` if the channel holds it (it saw the point begin, before
    /// or inside the gate, or found the gate taken). Also checks that what
    /// `count_write` runs under the gate ran when it should.
    fn forward(point: &LoomU64, gate: &Gate) -> Option<u64> {
        let seen = point.load(Ordering::Acquire);
        if seen & 1 == 1 {
            return None;
        }
        let (mut inside, mut counted) = (false, false);
        let tag = gate.count_write(
            || point.load(Ordering::Acquire),
            seen,
            (BLOCK, 1),
            |_| inside = true,
            || counted = true,
        );
        assert!(inside || tag.is_none(), "counted without the gate");
        assert_eq!(
            counted,
            tag.is_some(),
            "counted() ran for a write not counted"
        );
        tag
    }

    /// The write completes: taken off under the gate, retried while the
    /// controller holds it (the channel keeps it for its next poll).
    /// `landed` is set first: the write is on the source.
    fn complete(gate: &Gate, tag: u64, landed: &LoomBool) {
        landed.store(true, Ordering::Release);
        while gate
            .try_with(Holder::Owner, |t| t.untrack(BLOCK, 1, tag))
            .is_none()
        {
            thread::yield_now();
        }
    }

    /// The controller: announces the next point (odd) and registers the
    /// channel's writes in flight, retrying while the channel holds the gate
    /// or its last point's writes are still landing.
    fn freeze(point: &LoomU64, gate: &Gate, fence: &Fence) {
        let p = point.fetch_add(1, Ordering::SeqCst) + 1;
        while !gate
            .try_with(Holder::Freezer, |t| t.register(fence, p))
            .unwrap_or(false)
        {
            thread::yield_now();
        }
    }

    /// The channel's tables are empty, and so is every fence.
    fn all_clear(gate: &Gate, fences: &[&Fence]) {
        for f in fences {
            assert_eq!(f.left(), 0, "a fence did not empty");
            assert!(!f.fenced(BLOCK, 1));
        }
        gate.try_with(Holder::Owner, |t| {
            assert!(
                t.tracked.is_empty() && t.fenced_left == 0,
                "counts left behind"
            )
        })
        .expect("the gate is open at the end");
    }

    /// A write the channel forwards while the controller takes a point is
    /// either held, or counted under point 0 and then, until it lands, in
    /// the fence the controller registered. The fence ends empty.
    #[test]
    fn a_write_forwarded_across_the_point_is_fenced_until_it_lands_or_held() {
        model(|| {
            let (point, gate, fence) = parts();
            let landed = Arc::new(LoomBool::new(false));
            let owner = {
                let (point, gate, landed) = (point.clone(), gate.clone(), landed.clone());
                thread::spawn(move || {
                    let tag = forward(&point, &gate);
                    if let Some(tag) = tag {
                        complete(&gate, tag, &landed);
                    }
                    tag
                })
            };
            freeze(&point, &gate, &fence);
            // The consistency point is set: a source read of the block now
            // sees its T0 content only if the fence says so.
            let fenced = fence.fenced(BLOCK, 1);
            let has_landed = landed.load(Ordering::Acquire);
            let tag = owner.join().unwrap();
            match tag {
                Some(0) => assert!(fenced || has_landed, "in flight at T0 and not fenced"),
                Some(t) => panic!("a write forwarded with tag {t} after the point began"),
                None => assert!(!fenced, "a held write was fenced"),
            }
            all_clear(&gate, &[&fence]);
        });
    }

    /// The schedule the point's re-check inside the gate exists for, forced:
    /// the channel read point 0 and decided to forward, and the controller
    /// announced point 1 and registered the channel before the channel took
    /// the gate. The write must not go out: the consistency point would miss
    /// it (it is in neither the fence nor the held queue). Loom runs this
    /// one schedule; the model above reaches it among the others.
    #[test]
    fn a_write_decided_before_the_point_and_counted_after_registration_is_held() {
        model(|| {
            let (point, gate, fence) = parts();
            let seen = point.load(Ordering::Acquire);
            let controller = {
                let (point, gate, fence) = (point.clone(), gate.clone(), fence.clone());
                thread::spawn(move || freeze(&point, &gate, &fence))
            };
            controller.join().unwrap();
            let counted = gate.count_write(
                || point.load(Ordering::Acquire),
                seen,
                (BLOCK, 1),
                |_| {},
                || panic!("counted after registration: T0 misses it"),
            );
            assert_eq!(counted, None);
        });
    }

    /// A hot block: write A in flight at the point, and write B to the same
    /// granule tried while the point is taken (forwarded before or after
    /// it, or held); then A and B complete, in the order given. The fence is
    /// released when A lands, whatever B does, and a reader that finds the
    /// granule unfenced after the point knows A has landed.
    fn hot_granule(b_lands_first: bool) {
        model(move || {
            let (point, gate, fence) = parts();
            let (a_landed, b_landed) = (
                Arc::new(LoomBool::new(false)),
                Arc::new(LoomBool::new(false)),
            );
            let a = forward(&point, &gate).expect("no point yet");
            let owner = {
                let (point, gate, fence) = (point.clone(), gate.clone(), fence.clone());
                let a_landed = a_landed.clone();
                thread::spawn(move || {
                    let b = forward(&point, &gate);
                    if let (Some(b), true) = (b, b_lands_first) {
                        complete(&gate, b, &b_landed);
                    }
                    complete(&gate, a, &a_landed);
                    if b.is_some_and(|b| b > a) {
                        // B went out after the registration: A was the
                        // fence's only write there, and B must not keep it.
                        assert!(!fence.fenced(BLOCK, 1), "B kept the fence after A landed");
                    }
                    if let (Some(b), false) = (b, b_lands_first) {
                        complete(&gate, b, &b_landed);
                    }
                })
            };
            freeze(&point, &gate, &fence);
            assert!(fence.fenced(BLOCK, 1) || a_landed.load(Ordering::Acquire));
            point.fetch_add(1, Ordering::SeqCst);
            // A capture's look at the granule: unfenced means A has landed.
            if !fence.fenced(BLOCK, 1) {
                assert!(a_landed.load(Ordering::Acquire), "unfenced before A landed");
            }
            owner.join().unwrap();
            all_clear(&gate, &[&fence]);
        });
    }

    #[test]
    fn a_hot_granule_releases_the_fence_when_the_registered_write_lands() {
        hot_granule(false);
    }

    #[test]
    fn a_hot_granule_keeps_the_fence_while_the_registered_write_is_in_flight() {
        hot_granule(true);
    }

    /// Two points in a row: the second's controller finds the first's write
    /// still landing and waits for the channel to take it off (its count
    /// must go back to the first fence), then registers. Nothing is lost
    /// or counted twice, and the second fence never holds the landed write.
    #[test]
    fn a_second_point_waits_for_the_first_points_writes_to_land() {
        model_with(Some(3), || {
            let (point, gate, first) = parts();
            let second = fence();
            let landed = Arc::new(LoomBool::new(false));
            let a = forward(&point, &gate).expect("no point yet");
            freeze(&point, &gate, &first);
            point.fetch_add(1, Ordering::SeqCst);
            assert!(first.fenced(BLOCK, 1));
            let owner = {
                let (gate, landed) = (gate.clone(), landed.clone());
                thread::spawn(move || complete(&gate, a, &landed))
            };
            freeze(&point, &gate, &second);
            // Registered only once A was off the channel's books.
            assert!(landed.load(Ordering::Acquire));
            assert_eq!(first.left(), 0, "A released the wrong fence");
            assert!(
                !second.fenced(BLOCK, 1),
                "a landed write fenced at the second point"
            );
            owner.join().unwrap();
            all_clear(&gate, &[&first, &second]);
        });
    }
}
