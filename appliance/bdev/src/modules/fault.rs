//! `fault`: a virtual bdev that injects failures on command, for tests.
//!
//! A fault bdev is stacked on a base bdev exactly like `passthru`: it claims
//! the base (so nobody else can write to it), opens it through the claim and
//! creates one base channel inside each of its own channels. With every knob
//! off it forwards each I/O unchanged. The knobs live in a [`FaultControl`]
//! (an `Arc` around atomics, `Send + Sync`, cheap to clone) returned by
//! [`create`] and reachable later from the bdev with [`control`], so a test, a
//! job or an RPC handler can turn faults on and off while I/O runs.
//!
//! # Knobs
//!
//! | knob | effect |
//! |---|---|
//! | [`set_read_error_rate`](FaultControl::set_read_error_rate) / [`set_write_error_rate`](FaultControl::set_write_error_rate) | each read / write fails with [`IoError::Injected`] with this probability (clamped to `[0, 1]`, kept as 32-bit fixed point) |
//! | [`fail_next_reads`](FaultControl::fail_next_reads) / [`fail_next_writes`](FaultControl::fail_next_writes) | exactly the next `n` reads / writes fail with `Injected` (replaces any count still pending) |
//! | [`fail_writes_after`](FaultControl::fail_writes_after) | the next `n` writes succeed, the `n + 1`-th and every later one fails with `Injected` until [`clear`](FaultControl::clear): a backup target that dies mid-job |
//! | [`set_latency_us`](FaultControl::set_latency_us) | every completion is held until at least `submit time + latency` |
//! | [`set_late_writes`](FaultControl::set_late_writes) | [`IoType::Write`]s (not write-zeroes or unmap) wait in the bdev, in submission order, until their release time (latency, bandwidth) and only then go to the base, which takes their data from the caller's buffer then: a device that fetches write data when it runs the command, not when it is queued. Without it the base takes the data at submit and only the completion is held. No effect with a volatile cache. Late writes still waiting when their channel is dropped never reach the base |
//! | [`set_bandwidth_limit`](FaultControl::set_bandwidth_limit) | reads and writes are paced to `bytes_per_sec` for the whole bdev (0 = unlimited): a slow target. Excess I/O is held, never failed |
//! | [`power_cut`](FaultControl::power_cut) / [`power_on`](FaultControl::power_on) | see *Power cuts* below |
//! | [`clear`](FaultControl::clear) | all of the above off, power on (the volatile cache keeps its contents) |
//!
//! Counters: [`injected_errors`](FaultControl::injected_errors) (I/O failed
//! with `Injected`), [`dropped_writes`](FaultControl::dropped_writes) (blocks
//! lost from the volatile cache by power cuts), [`ios_seen`](FaultControl::ios_seen)
//! (every I/O submitted to the bdev), and [`dirty_blocks`](FaultControl::dirty_blocks)
//! (blocks in the volatile cache now).
//!
//! # Which I/O a knob applies to
//!
//! "Reads" are [`IoType::Read`]. "Writes" are every I/O that changes data:
//! [`IoType::Write`], [`IoType::WriteZeroes`] and [`IoType::Unmap`]. Flushes
//! are never failed by error injection (only by a power cut). Each I/O is
//! checked in this order, and the first check that fails it decides:
//!
//! 1. power off → [`IoError::PowerLoss`];
//! 2. writes only: the [`fail_writes_after`](FaultControl::fail_writes_after)
//!    budget (every write reaching this step counts, whatever happens to it
//!    next) → `Injected`;
//! 3. the [`fail_next_reads`](FaultControl::fail_next_reads) /
//!    [`fail_next_writes`](FaultControl::fail_next_writes) count → `Injected`;
//! 4. the error rate → `Injected`.
//!
//! An injected failure never reaches the base: a failed write leaves the data
//! (and the volatile cache) exactly as it was. Random decisions come from a
//! per-channel xorshift generator seeded with `FaultOptions::seed` plus the
//! channel's creation index on this bdev (0, 1, …), so for a given seed and
//! order of I/O the same requests fail on every run. Nothing is drawn while
//! the rate is 0.
//!
//! # Latency and bandwidth
//!
//! Every completion, failed or not, goes through a per-channel FIFO and is
//! handed out by `poll` once [`clock::ticks`] has passed its release time:
//! `submit time + latency`, or for reads and writes under a bandwidth limit
//! the end of the I/O's transfer slot if that is later. Slots are handed out
//! device-wide through one atomic "next free tick": an I/O of `b` bytes takes
//! `b / bytes_per_sec` seconds starting at `max(now, end of the previous
//! slot)` (pacing with no burst allowance). Completions leave the FIFO in
//! order, so an I/O with a short hold can wait behind one with a long hold.
//! Changing a knob affects I/O submitted afterwards.
//!
//! # Power cuts
//!
//! [`power_cut`](FaultControl::power_cut) turns the power off: every I/O
//! submitted while it is off fails with [`IoError::PowerLoss`], and so does
//! every I/O that was in flight across a power transition (cut or
//! [`power_on`](FaultControl::power_on)) when it completes, even if the base
//! finished it. An I/O that failed with `PowerLoss` may or may not have taken
//! effect (like a real disk), except for writes failed because the power was
//! already off when they were submitted: those never change anything.
//! `power_on` restores service; [`clear`](FaultControl::clear) also does.
//!
//! **Without `volatile_cache`** the base is the durable medium and the fault
//! bdev has no cache: every write that completed successfully survives a cut.
//!
//! **With `volatile_cache`** the bdev models a disk with a volatile write
//! cache (and reports [`BdevInfo::volatile_write_cache`]). A cut keeps
//! exactly these, and loses every other write
//! ([`dropped_writes`](FaultControl::dropped_writes) counts the blocks lost):
//!
//! * every successful write that was submitted before some flush was
//!   submitted, where that flush completed successfully before the cut. This
//!   covers every write whose completion was followed by a completed flush
//!   (the guarantee to rely on); a write still in flight when the flush is
//!   submitted is covered too, as its data is already in the cache;
//! * every successful FUA write (`BdevIo::fua`), write-zeroes and unmap:
//!   durable when it completes.
//!
//! Each block holds the last of those writes of it (writes of one block take
//! effect in the order the bdev receives them). A write submitted while a
//! flush is in flight is not made durable by that flush, even if it completes
//! first. A flush cut short by the power leaves each block of its snapshot
//! either old or new: its write-back is not atomic.
//!
//! How it works: a device-wide write-back cache (a `Mutex<BTreeMap>` of
//! block number → one block of data) sits in front of the base.
//! * A write copies its blocks into the cache and completes; the base is not
//!   touched.
//! * A read goes to the base and, when the base completes it, is patched
//!   with the cached blocks of its range. If the cache dropped entries
//!   (after writing them back) while the read was at the base, the read is
//!   sent to the base again, so it can never return data older than the
//!   cache held.
//! * A flush takes a snapshot of the cache when it is submitted, writes the
//!   snapshot to the base (contiguous blocks coalesced into writes of up to
//!   128 KiB, at most 8 in flight per channel), then flushes the base, then
//!   drops from the cache the entries that still hold the snapshot's data.
//!   Blocks written again meanwhile stay dirty.
//! * A FUA write, a write-zeroes and an unmap are write-through: they replace
//!   the cache entries of their range that exist (with their data or zeros),
//!   so that reads see them at once and no older cached data can be written
//!   back over them later, go to the base (FUA set on the write), and drop
//!   those entries when the base completes.
//! * These four kinds of work (flushes and write-through I/O) run one at a
//!   time for the whole bdev, in submission order, whichever channel they were
//!   submitted on, so that writes of the same block reach the base in order.
//!   A channel's queued work only advances while that channel is polled, so
//!   poll every channel that has I/O outstanding.
//! * `power_cut` empties the cache (counting the blocks) and advances a power
//!   epoch; I/O stamped with an older epoch fails when it completes, and
//!   flush work in progress stops issuing writes.
//!
//! Unmap and write-zeroes go to the base as they are (an unmap reads back as
//! zeros on bases that zero unmapped blocks, such as malloc);
//! [`BdevBackend::allocated_ranges`] reports the base's ranges plus every
//! block in the cache.
//!
//! # Data path rules
//!
//! `submit` and `poll` never block and, in the common case, never allocate:
//! per-I/O state lives in a slot table, and completions in queues, that are
//! preallocated per channel and only grow past the deepest queue seen so far.
//! The exception is volatile-cache mode: because this is a test device, that
//! mode takes a `Mutex` on the cache for every write, read completion, flush
//! and power transition, and allocates cache entries (one per block written)
//! and flush snapshots. Without `volatile_cache` no lock is ever taken on the
//! data path.
//!
//! # Example
//!
//! ```
//! use hotcopy_bdev::modules::{fault, malloc};
//! use hotcopy_bdev::testing::{flush, read, write};
//! use hotcopy_bdev::{BdevRegistry, IoError, IoStatus};
//!
//! let reg = BdevRegistry::new();
//! malloc::create(&reg, "m0", 1 << 20, 512).unwrap();
//! let opts = fault::FaultOptions { volatile_cache: true, ..Default::default() };
//! let (_bdev, ctl) = fault::create(&reg, "f0", "m0", opts).unwrap();
//! let mut ch = reg.open("f0", true).unwrap().channel().unwrap();
//!
//! assert_eq!(write(&mut ch, 0, &[1; 512]), IoStatus::Success);
//! assert_eq!(flush(&mut ch), IoStatus::Success); // block 0 = 1s is durable
//! assert_eq!(write(&mut ch, 0, &[2; 512]), IoStatus::Success); // not flushed
//! ctl.power_cut();
//! assert_eq!(read(&mut ch, 0, 1), Err(IoStatus::Failed(IoError::PowerLoss)));
//! ctl.power_on();
//! assert_eq!(read(&mut ch, 0, 1).unwrap(), vec![1; 512]);
//! assert_eq!(ctl.dropped_writes(), 1);
//!
//! ctl.fail_next_writes(1);
//! assert_eq!(write(&mut ch, 0, &[3; 512]), IoStatus::Failed(IoError::Injected));
//! ```

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hotcopy_runtime::{clock, BufferPool, HugepageMode};

use crate::bdev::{
    BackendChannel, BdevBackend, BdevChannel, BdevDesc, BdevInfo, BdevRegistry, Claim,
};
use crate::io::{BdevIo, IoError, IoStatus, IoType};
use crate::{Bdev, BdevError};

/// Largest write the volatile cache's write-back issues to the base.
const WRITEBACK_CHUNK: usize = 128 * 1024;
/// Write-back writes a channel keeps in flight at once.
const WRITEBACK_DEPTH: usize = 8;
/// Initial capacity of each channel's slot table and queues.
const QUEUE_HINT: usize = 256;
/// Token of the base I/O a channel issues for its write-back work.
const JOB_TOKEN: u64 = u64::MAX;
/// `Cache::job_head` when no write-back work is queued.
const NO_JOB: u64 = u64::MAX;
/// `FaultShared::writes_left` when `fail_writes_after` is off.
const NEVER: u64 = u64::MAX;
/// An error rate of 1.0 in fixed point (probabilities are `rate * 2^32`).
const RATE_ONE: u64 = 1 << 32;

/// How to create a fault bdev. The default injects nothing.
#[derive(Debug, Clone, Default)]
pub struct FaultOptions {
    /// Probability in `[0, 1]` that a read fails with [`IoError::Injected`].
    pub read_error_rate: f64,
    /// Probability in `[0, 1]` that a write (write, write-zeroes, unmap)
    /// fails with [`IoError::Injected`].
    pub write_error_rate: f64,
    /// Minimum time from submission to completion of every I/O.
    pub latency_us: u64,
    /// Model a volatile write cache: completed writes are lost by a power cut
    /// until a flush completes. See the module docs.
    pub volatile_cache: bool,
    /// Seed of the per-channel random generators.
    pub seed: u64,
}

/// The volatile write cache, shared by every channel of one fault bdev.
struct Cache {
    state: Mutex<CacheState>,
    /// Bumped (under the lock) whenever entries are dropped after their data
    /// reached the base; a read that sees it change while at the base retries.
    clean_seq: AtomicU64,
    /// Id of the write-back job allowed to run (`NO_JOB` when none is queued),
    /// mirrored from `CacheState::jobs` so that channels can check it without
    /// the lock.
    job_head: AtomicU64,
}

#[derive(Default)]
struct CacheState {
    /// Dirty blocks: block number → data. Entries are immutable once shared
    /// with a job; a job recognises its own entries with `Arc::ptr_eq`.
    blocks: BTreeMap<u64, Arc<[u8]>>,
    /// Device-wide FIFO of write-back jobs (flushes and write-through I/O).
    jobs: VecDeque<u64>,
    next_job: u64,
}

struct FaultShared {
    name: String,
    block_size: u64,
    ticks_per_sec: u64,
    seed: u64,
    channels: AtomicU64,
    read_rate: AtomicU64,
    write_rate: AtomicU64,
    fail_reads: AtomicU64,
    fail_writes: AtomicU64,
    /// Writes that may still succeed before every write fails; `NEVER` = off.
    writes_left: AtomicU64,
    latency_us: AtomicU64,
    latency_ticks: AtomicU64,
    late_writes: AtomicBool,
    bw_limit: AtomicU64,
    /// End of the last bandwidth slot handed out, in ticks.
    bw_next: AtomicU64,
    powered: AtomicBool,
    /// Advanced by every power transition; I/O from an older epoch fails.
    epoch: AtomicU64,
    /// Serialises power transitions (control path only).
    power_lock: Mutex<()>,
    injected: AtomicU64,
    dropped: AtomicU64,
    seen: AtomicU64,
    cache: Option<Cache>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn rate_to_fixed(rate: f64) -> u64 {
    if rate.is_nan() || rate <= 0.0 {
        0
    } else if rate >= 1.0 {
        RATE_ONE
    } else {
        (rate * RATE_ONE as f64) as u64
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64*: one step.
#[inline]
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Draws against a fixed-point rate; draws nothing when the rate is 0.
#[inline]
fn roll(rng: &mut u64, rate: &AtomicU64) -> bool {
    let threshold = rate.load(Ordering::Relaxed);
    threshold != 0 && (next_random(rng) >> 32) < threshold
}

/// Takes one from a "fail the next n" counter; true when it was positive.
#[inline]
fn take_one(count: &AtomicU64) -> bool {
    count.load(Ordering::Relaxed) != 0
        && count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .is_ok()
}

impl FaultShared {
    /// Whether I/O stamped with `epoch` may still succeed.
    #[inline]
    fn is_current(&self, epoch: u64) -> bool {
        self.powered.load(Ordering::SeqCst) && self.epoch.load(Ordering::SeqCst) == epoch
    }

    fn us_to_ticks(&self, us: u64) -> u64 {
        let t = (us as u128 * self.ticks_per_sec as u128).div_ceil(1_000_000);
        t.min(u64::MAX as u128) as u64
    }

    /// Whether a write (any data-changing I/O) must fail; see the module docs
    /// for the order of the checks.
    #[inline]
    fn inject_write(&self, rng: &mut u64) -> bool {
        if self.writes_left.load(Ordering::Relaxed) != NEVER {
            let r = self
                .writes_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    if v == NEVER || v == 0 {
                        None
                    } else {
                        Some(v - 1)
                    }
                });
            if r == Err(0) {
                return true;
            }
        }
        take_one(&self.fail_writes) || roll(rng, &self.write_rate)
    }

    #[inline]
    fn inject_read(&self, rng: &mut u64) -> bool {
        take_one(&self.fail_reads) || roll(rng, &self.read_rate)
    }

    /// Reserves a transfer slot of `bytes`; returns when it ends (0 when no
    /// limit is set).
    #[inline]
    fn reserve_bandwidth(&self, now: u64, bytes: u64) -> u64 {
        let bps = self.bw_limit.load(Ordering::Relaxed);
        if bps == 0 {
            return 0;
        }
        let cost = (bytes as u128 * self.ticks_per_sec as u128).div_ceil(bps as u128);
        let cost = cost.min(u64::MAX as u128) as u64;
        let end = |slot: u64| slot.max(now).saturating_add(cost);
        let prev = self
            .bw_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |slot| Some(end(slot)))
            .unwrap_or_else(|v| v);
        end(prev)
    }
}

/// The knobs and counters of one fault bdev. Cloning shares them; every
/// method is safe to call from any thread while I/O runs.
#[derive(Clone)]
pub struct FaultControl {
    shared: Arc<FaultShared>,
}

impl fmt::Debug for FaultControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.shared;
        let rate = |r: &AtomicU64| r.load(Ordering::Relaxed) as f64 / RATE_ONE as f64;
        f.debug_struct("FaultControl")
            .field("bdev", &s.name)
            .field("read_error_rate", &rate(&s.read_rate))
            .field("write_error_rate", &rate(&s.write_rate))
            .field("fail_next_reads", &s.fail_reads.load(Ordering::Relaxed))
            .field("fail_next_writes", &s.fail_writes.load(Ordering::Relaxed))
            .field("latency_us", &s.latency_us.load(Ordering::Relaxed))
            .field("bandwidth_limit", &s.bw_limit.load(Ordering::Relaxed))
            .field("powered", &self.is_powered())
            .field("volatile_cache", &s.cache.is_some())
            .field("injected_errors", &self.injected_errors())
            .field("dropped_writes", &self.dropped_writes())
            .field("ios_seen", &self.ios_seen())
            .finish()
    }
}

impl FaultControl {
    /// Probability in `[0, 1]` (clamped) that each read fails with `Injected`.
    pub fn set_read_error_rate(&self, rate: f64) {
        self.shared
            .read_rate
            .store(rate_to_fixed(rate), Ordering::Relaxed);
    }

    /// Probability in `[0, 1]` (clamped) that each write, write-zeroes or
    /// unmap fails with `Injected`.
    pub fn set_write_error_rate(&self, rate: f64) {
        self.shared
            .write_rate
            .store(rate_to_fixed(rate), Ordering::Relaxed);
    }

    /// Exactly the next `n` reads fail with `Injected` (0 cancels).
    pub fn fail_next_reads(&self, n: u64) {
        self.shared.fail_reads.store(n, Ordering::Relaxed);
    }

    /// Exactly the next `n` writes (write, write-zeroes, unmap) fail with
    /// `Injected` (0 cancels). They do not touch the data.
    pub fn fail_next_writes(&self, n: u64) {
        self.shared.fail_writes.store(n, Ordering::Relaxed);
    }

    /// The next `n` writes may succeed; the `n + 1`-th and every later one
    /// fails with `Injected` until [`clear`](Self::clear) ("the target dies
    /// mid-job"). Reads and flushes keep working. `u64::MAX` turns it off.
    pub fn fail_writes_after(&self, n: u64) {
        self.shared.writes_left.store(n, Ordering::Relaxed);
    }

    /// Holds every completion at least `us` microseconds after submission.
    pub fn set_latency_us(&self, us: u64) {
        let s = &*self.shared;
        s.latency_us.store(us, Ordering::Relaxed);
        s.latency_ticks.store(s.us_to_ticks(us), Ordering::Relaxed);
    }

    /// Writes (not write-zeroes, unmap or flush) wait in the bdev, in
    /// submission order, until their release time and only then reach the
    /// base, which reads their buffer then (see the module docs). For bdevs
    /// without a volatile cache; with one it has no effect. Applies to
    /// writes submitted afterwards.
    pub fn set_late_writes(&self, on: bool) {
        self.shared.late_writes.store(on, Ordering::Relaxed);
    }

    /// Paces reads and writes of the whole bdev to `bytes_per_sec` (0 = no
    /// limit). I/O over the budget is held until its slot ends, never failed.
    pub fn set_bandwidth_limit(&self, bytes_per_sec: u64) {
        self.shared.bw_limit.store(bytes_per_sec, Ordering::Relaxed);
        self.shared.bw_next.store(0, Ordering::Relaxed);
    }

    /// Cuts the power: the volatile cache is lost and all I/O fails with
    /// `PowerLoss`, including I/O in flight, until [`power_on`](Self::power_on).
    pub fn power_cut(&self) {
        let s = &*self.shared;
        let _power = lock(&s.power_lock);
        let cache = s.cache.as_ref().map(|c| lock(&c.state));
        if s.powered.swap(false, Ordering::SeqCst) {
            s.epoch.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(mut st) = cache {
            let lost = st.blocks.len() as u64;
            st.blocks.clear();
            s.dropped.fetch_add(lost, Ordering::Relaxed);
        }
    }

    /// Restores the power. I/O that was in flight across the cut still fails.
    pub fn power_on(&self) {
        let s = &*self.shared;
        let _power = lock(&s.power_lock);
        let _cache = s.cache.as_ref().map(|c| lock(&c.state));
        if !s.powered.load(Ordering::SeqCst) {
            s.epoch.fetch_add(1, Ordering::SeqCst);
            s.powered.store(true, Ordering::SeqCst);
        }
    }

    /// Turns every fault off and the power on. Counters and the volatile
    /// cache's contents are kept.
    pub fn clear(&self) {
        let s = &*self.shared;
        s.read_rate.store(0, Ordering::Relaxed);
        s.write_rate.store(0, Ordering::Relaxed);
        s.fail_reads.store(0, Ordering::Relaxed);
        s.fail_writes.store(0, Ordering::Relaxed);
        s.writes_left.store(NEVER, Ordering::Relaxed);
        self.set_latency_us(0);
        self.set_late_writes(false);
        self.set_bandwidth_limit(0);
        self.power_on();
    }

    /// Whether the power is on.
    pub fn is_powered(&self) -> bool {
        self.shared.powered.load(Ordering::SeqCst)
    }

    /// I/O failed with `Injected` so far.
    pub fn injected_errors(&self) -> u64 {
        self.shared.injected.load(Ordering::Relaxed)
    }

    /// Blocks of completed-but-unflushed writes lost to power cuts so far
    /// (always 0 without `volatile_cache`).
    pub fn dropped_writes(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Every I/O submitted to the bdev so far, failed or not.
    pub fn ios_seen(&self) -> u64 {
        self.shared.seen.load(Ordering::Relaxed)
    }

    /// Blocks in the volatile cache now (not yet durable; 0 without
    /// `volatile_cache`).
    pub fn dirty_blocks(&self) -> u64 {
        self.shared
            .cache
            .as_ref()
            .map_or(0, |c| lock(&c.state).blocks.len() as u64)
    }
}

/// The module object behind a fault bdev (reach it with
/// `bdev.backend::<FaultBdev>()`, or use [`control`]).
pub struct FaultBdev {
    base: BdevDesc,
    shared: Arc<FaultShared>,
    _claim: Claim,
}

impl FaultBdev {
    /// The bdev's knobs.
    pub fn control(&self) -> FaultControl {
        FaultControl {
            shared: self.shared.clone(),
        }
    }
}

impl BdevBackend for FaultBdev {
    fn supports(&self, io_type: IoType) -> bool {
        // With a volatile cache the fault bdev implements flush itself.
        (io_type == IoType::Flush && self.shared.cache.is_some())
            || self.base.bdev().supports(io_type)
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let s = &self.shared;
        let base = self.base.channel()?;
        let index = s.channels.fetch_add(1, Ordering::Relaxed);
        let mut rng = splitmix64(s.seed.wrapping_add(index));
        if rng == 0 {
            rng = 0x9E37_79B9_7F4A_7C15;
        }
        let chunk = WRITEBACK_CHUNK.max(s.block_size as usize);
        let wb_pool = match s.cache {
            Some(_) => Some(
                BufferPool::new(chunk, WRITEBACK_DEPTH, HugepageMode::Off).map_err(|e| {
                    BdevError::Channel {
                        name: s.name.clone(),
                        source: std::io::Error::other(e),
                    }
                })?,
            ),
            None => None,
        };
        let mut free_slots: Vec<u32> = (0..QUEUE_HINT as u32).collect();
        free_slots.reverse();
        Ok(Box::new(FaultChannel {
            shared: s.clone(),
            base,
            base_flush: self.base.bdev().supports(IoType::Flush),
            rng,
            slots: vec![Slot::default(); QUEUE_HINT],
            free_slots,
            from_base: VecDeque::with_capacity(QUEUE_HINT),
            held: VecDeque::with_capacity(QUEUE_HINT),
            late: VecDeque::new(),
            jobs: VecDeque::new(),
            wb_pool,
            chunk_blocks: (chunk as u64 / s.block_size).max(1),
        }))
    }

    fn allocated_ranges(&self) -> Option<Vec<(u64, u64)>> {
        let base = self.base.bdev().allocated_ranges();
        let Some(cache) = self.shared.cache.as_ref() else {
            return base;
        };
        let mut ranges = base?;
        ranges.extend(lock(&cache.state).blocks.keys().map(|b| (*b, 1)));
        ranges.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (off, len) in ranges {
            match out.last_mut() {
                Some((o, l)) if *o + *l >= off => *l = (*l).max(off + len - *o),
                _ => out.push((off, len)),
            }
        }
        Some(out)
    }
}

/// Per-I/O state of a request at the base.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    token: u64,
    epoch: u64,
    release: u64,
    clean_seq: u64,
}

/// A completion waiting for its release time.
struct Held {
    release: u64,
    epoch: u64,
    io: BdevIo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to reach the head of the device-wide job queue.
    Queued,
    /// Flush: writing the snapshot to the base.
    Writing,
    /// Flush: the base flush is in flight.
    Flushing,
    /// Write-through: the caller's I/O is at the base.
    Through,
    /// Finished (successfully or not): complete the caller's I/O.
    Done,
}

/// Write-back work of the volatile cache: a flush, or a write-through I/O
/// (FUA write, write-zeroes, unmap).
struct Job {
    id: u64,
    /// The caller's I/O (out at the base while a write-through runs).
    io: Option<BdevIo>,
    token: u64,
    epoch: u64,
    release: u64,
    write_back: bool,
    /// Flush: the snapshot to write. Write-through: the entries it replaced.
    /// Either way, the entries to drop from the cache when it succeeds.
    blocks: Vec<(u64, Arc<[u8]>)>,
    next: usize,
    inflight: usize,
    error: Option<IoError>,
    phase: Phase,
}

struct FaultChannel {
    shared: Arc<FaultShared>,
    base: BdevChannel,
    base_flush: bool,
    rng: u64,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    from_base: VecDeque<BdevIo>,
    held: VecDeque<Held>,
    /// Late writes waiting for their release time to go to the base.
    late: VecDeque<Held>,
    /// This channel's write-back jobs, in the device-wide order.
    jobs: VecDeque<Job>,
    wb_pool: Option<BufferPool>,
    chunk_blocks: u64,
}

impl FaultChannel {
    #[inline]
    fn hold(&mut self, io: BdevIo, status: IoStatus, release: u64, epoch: u64) {
        self.held.push_back(Held {
            release,
            epoch,
            io: io.complete(status),
        });
    }

    #[inline]
    fn submit_base(&mut self, mut io: BdevIo, epoch: u64, release: u64, clean_seq: u64) {
        let slot = Slot {
            token: io.token,
            epoch,
            release,
            clean_seq,
        };
        let idx = match self.free_slots.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i as usize
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        io.token = idx as u64;
        self.base.submit(io);
    }

    /// Volatile-cache mode: everything but plain reads goes through the cache.
    fn submit_cached(&mut self, io: BdevIo, epoch: u64, release: u64) {
        let Some(cache) = self.shared.cache.as_ref() else {
            return;
        };
        if io.io_type == IoType::Read {
            let seq = cache.clean_seq.load(Ordering::SeqCst);
            self.submit_base(io, epoch, release, seq);
            return;
        }
        let bs = self.shared.block_size as usize;
        let (off, n) = (io.offset_blocks, io.num_blocks);
        let mut st = lock(&cache.state);
        // Checked under the lock that power transitions take, so nothing is
        // cached after the cache was dropped.
        let status = if !self.shared.is_current(epoch) {
            Some(IoStatus::Failed(IoError::PowerLoss))
        } else if io.io_type == IoType::Write && !io.fua {
            match io.buf.as_ref() {
                Some(buf) => {
                    for (i, data) in buf.chunks_exact(bs).take(n as usize).enumerate() {
                        match st.blocks.entry(off + i as u64) {
                            Entry::Occupied(mut e) => match Arc::get_mut(e.get_mut()) {
                                // Nobody else holds this entry: reuse it.
                                Some(mine) => mine.copy_from_slice(data),
                                None => {
                                    e.insert(Arc::from(data));
                                }
                            },
                            Entry::Vacant(e) => {
                                e.insert(Arc::from(data));
                            }
                        }
                    }
                    Some(IoStatus::Success)
                }
                None => Some(IoStatus::Failed(IoError::BadBuffer)),
            }
        } else {
            None
        };
        if let Some(status) = status {
            drop(st);
            self.hold(io, status, release, epoch);
            return;
        }
        // Flush or write-through: queue a job.
        let blocks: Vec<(u64, Arc<[u8]>)> = match io.io_type {
            IoType::Flush => st.blocks.iter().map(|(b, d)| (*b, d.clone())).collect(),
            IoType::Write => {
                let mut v = Vec::new();
                if let Some(buf) = io.buf.as_ref() {
                    for (b, entry) in st.blocks.range_mut(off..off + n) {
                        let at = (b - off) as usize * bs;
                        let data: Arc<[u8]> = Arc::from(&buf[at..at + bs]);
                        *entry = data.clone();
                        v.push((*b, data));
                    }
                }
                v
            }
            _ => {
                let mut v = Vec::new();
                let mut zero: Option<Arc<[u8]>> = None;
                for (b, entry) in st.blocks.range_mut(off..off + n) {
                    let z = zero.get_or_insert_with(|| Arc::from(vec![0u8; bs])).clone();
                    *entry = z.clone();
                    v.push((*b, z));
                }
                v
            }
        };
        let id = st.next_job;
        st.next_job += 1;
        st.jobs.push_back(id);
        if st.jobs.len() == 1 {
            cache.job_head.store(id, Ordering::SeqCst);
        }
        drop(st);
        let token = io.token;
        self.jobs.push_back(Job {
            id,
            write_back: io.io_type == IoType::Flush,
            io: Some(io),
            token,
            epoch,
            release,
            blocks,
            next: 0,
            inflight: 0,
            error: None,
            phase: Phase::Queued,
        });
        self.advance_jobs();
    }

    /// Moves this channel's write-back jobs forward as far as they can go
    /// without waiting.
    fn advance_jobs(&mut self) {
        let FaultChannel {
            shared,
            base,
            jobs,
            held,
            wb_pool,
            chunk_blocks,
            base_flush,
            ..
        } = self;
        let Some(cache) = shared.cache.as_ref() else {
            return;
        };
        let bs = shared.block_size as usize;
        while let Some(job) = jobs.front_mut() {
            match job.phase {
                Phase::Queued => {
                    if cache.job_head.load(Ordering::SeqCst) != job.id {
                        return;
                    }
                    if !shared.is_current(job.epoch) {
                        job.error = Some(IoError::PowerLoss);
                        job.phase = Phase::Done;
                    } else if job.write_back {
                        job.phase = Phase::Writing;
                    } else if let Some(mut io) = job.io.take() {
                        io.token = JOB_TOKEN;
                        job.inflight = 1;
                        job.phase = Phase::Through;
                        base.submit(io);
                        return;
                    } else {
                        job.phase = Phase::Done;
                    }
                }
                Phase::Writing => {
                    if job.error.is_none() && !shared.is_current(job.epoch) {
                        // The power went: the disk writes nothing more.
                        job.error = Some(IoError::PowerLoss);
                    }
                    let Some(pool) = wb_pool.as_ref() else {
                        job.error.get_or_insert(IoError::Unsupported);
                        job.phase = Phase::Done;
                        continue;
                    };
                    while job.error.is_none() && job.next < job.blocks.len() {
                        let Some(mut buf) = pool.get(pool.buf_size()) else {
                            break;
                        };
                        let start = job.blocks[job.next].0;
                        let mut n = 0u64;
                        while job.next < job.blocks.len()
                            && n < *chunk_blocks
                            && job.blocks[job.next].0 == start + n
                        {
                            let at = n as usize * bs;
                            buf[at..at + bs].copy_from_slice(&job.blocks[job.next].1);
                            n += 1;
                            job.next += 1;
                        }
                        buf.set_len(n as usize * bs);
                        job.inflight += 1;
                        base.submit(BdevIo::write(start, n, buf, JOB_TOKEN));
                    }
                    if job.inflight > 0 {
                        return;
                    }
                    if job.error.is_none() && *base_flush {
                        job.inflight = 1;
                        job.phase = Phase::Flushing;
                        base.submit(BdevIo::flush(JOB_TOKEN));
                        return;
                    }
                    job.phase = Phase::Done;
                }
                Phase::Flushing | Phase::Through => {
                    if job.inflight > 0 {
                        return;
                    }
                    job.phase = Phase::Done;
                }
                Phase::Done => {
                    if let Some(job) = jobs.pop_front() {
                        finish_job(shared, cache, held, job);
                    }
                }
            }
        }
    }

    /// A base completion of write-back work (always the front job's).
    fn on_job_io(&mut self, mut io: BdevIo) {
        let Some(job) = self.jobs.front_mut() else {
            return;
        };
        job.inflight = job.inflight.saturating_sub(1);
        if let IoStatus::Failed(e) = io.status {
            job.error.get_or_insert(e);
        }
        if job.phase == Phase::Through {
            io.token = job.token;
            job.io = Some(io);
        }
        // A write-back buffer returns to its pool as `io` drops here.
    }

    fn on_base(&mut self, mut io: BdevIo) {
        if io.token == JOB_TOKEN {
            self.on_job_io(io);
            return;
        }
        let idx = io.token as usize;
        let slot = self.slots[idx];
        if io.io_type == IoType::Read && io.status.is_success() {
            if let Some(cache) = self.shared.cache.as_ref() {
                let st = lock(&cache.state);
                let seq = cache.clean_seq.load(Ordering::SeqCst);
                if seq != slot.clean_seq {
                    // Cached blocks were dropped while the read was at the
                    // base: it may hold data older than they did. Read again.
                    drop(st);
                    self.slots[idx].clean_seq = seq;
                    self.base.submit(io);
                    return;
                }
                let bs = self.shared.block_size as usize;
                let (off, n) = (io.offset_blocks, io.num_blocks);
                if let Some(buf) = io.buf.as_mut() {
                    for (b, data) in st.blocks.range(off..off + n) {
                        let at = (b - off) as usize * bs;
                        buf[at..at + bs].copy_from_slice(data);
                    }
                }
            }
        }
        io.token = slot.token;
        self.free_slots.push(idx as u32);
        self.held.push_back(Held {
            release: slot.release,
            epoch: slot.epoch,
            io,
        });
    }
}

/// Completes a write-back job: on success, drops the cache entries it made
/// durable; then lets the next job in the device-wide queue run.
fn finish_job(shared: &FaultShared, cache: &Cache, held: &mut VecDeque<Held>, mut job: Job) {
    let mut status = match job.error {
        Some(e) => IoStatus::Failed(e),
        None => IoStatus::Success,
    };
    {
        let mut st = lock(&cache.state);
        if status.is_success() {
            if shared.is_current(job.epoch) {
                let mut removed = false;
                for (b, data) in &job.blocks {
                    if st.blocks.get(b).is_some_and(|cur| Arc::ptr_eq(cur, data)) {
                        st.blocks.remove(b);
                        removed = true;
                    }
                }
                if removed {
                    cache.clean_seq.fetch_add(1, Ordering::SeqCst);
                }
            } else {
                status = IoStatus::Failed(IoError::PowerLoss);
            }
        }
        if let Some(pos) = st.jobs.iter().position(|j| *j == job.id) {
            st.jobs.remove(pos);
        }
        cache
            .job_head
            .store(st.jobs.front().copied().unwrap_or(NO_JOB), Ordering::SeqCst);
        // The snapshot's references go while the lock is held, so a writer
        // that takes the lock next can reuse its entry in place.
        job.blocks.clear();
    }
    if let Some(mut io) = job.io.take() {
        io.token = job.token;
        held.push_back(Held {
            release: job.release,
            epoch: job.epoch,
            io: io.complete(status),
        });
    }
}

impl BackendChannel for FaultChannel {
    fn submit(&mut self, io: BdevIo) {
        let s = &*self.shared;
        s.seen.fetch_add(1, Ordering::Relaxed);
        let now = clock::ticks();
        let mut release = now.saturating_add(s.latency_ticks.load(Ordering::Relaxed));
        let epoch = s.epoch.load(Ordering::SeqCst);
        if !s.powered.load(Ordering::SeqCst) {
            self.hold(io, IoStatus::Failed(IoError::PowerLoss), release, epoch);
            return;
        }
        let injected = match io.io_type {
            IoType::Read => s.inject_read(&mut self.rng),
            IoType::Write | IoType::WriteZeroes | IoType::Unmap => s.inject_write(&mut self.rng),
            IoType::Flush => false,
        };
        if injected {
            s.injected.fetch_add(1, Ordering::Relaxed);
            self.hold(io, IoStatus::Failed(IoError::Injected), release, epoch);
            return;
        }
        if matches!(io.io_type, IoType::Read | IoType::Write) {
            release = release.max(s.reserve_bandwidth(now, io.num_blocks * s.block_size));
        }
        if s.cache.is_some() {
            self.submit_cached(io, epoch, release);
        } else if io.io_type == IoType::Write && s.late_writes.load(Ordering::Relaxed) {
            self.late.push_back(Held { release, epoch, io });
        } else {
            self.submit_base(io, epoch, release, 0);
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        if !self.late.is_empty() {
            // Late writes whose time has come go to the base now, and
            // complete when it does. Across a power transition one never
            // reaches it.
            let now = clock::ticks();
            let epoch = self.shared.epoch.load(Ordering::SeqCst);
            while self.late.front().is_some_and(|h| h.release <= now) {
                let Some(h) = self.late.pop_front() else {
                    break;
                };
                if h.epoch == epoch && self.shared.powered.load(Ordering::SeqCst) {
                    self.submit_base(h.io, h.epoch, now, 0);
                } else {
                    self.hold(h.io, IoStatus::Failed(IoError::PowerLoss), now, h.epoch);
                }
            }
        }
        {
            let q = &mut self.from_base;
            self.base.poll(&mut |io| q.push_back(io));
        }
        while let Some(io) = self.from_base.pop_front() {
            self.on_base(io);
        }
        if !self.jobs.is_empty() {
            self.advance_jobs();
        }
        if self.held.is_empty() {
            return 0;
        }
        let s = &*self.shared;
        let now = clock::ticks();
        let powered = s.powered.load(Ordering::SeqCst);
        let epoch = s.epoch.load(Ordering::SeqCst);
        let mut n = 0;
        while self.held.front().is_some_and(|h| h.release <= now) {
            let Some(Held {
                epoch: e, mut io, ..
            }) = self.held.pop_front()
            else {
                break;
            };
            if !powered || e != epoch {
                io.status = IoStatus::Failed(IoError::PowerLoss);
            }
            n += 1;
            done(io);
        }
        n
    }
}

impl Drop for FaultChannel {
    fn drop(&mut self) {
        // Let other channels' write-back work proceed without ours.
        if self.jobs.is_empty() {
            return;
        }
        if let Some(cache) = self.shared.cache.as_ref() {
            let mut st = lock(&cache.state);
            let mine = &self.jobs;
            st.jobs.retain(|id| !mine.iter().any(|j| j.id == *id));
            cache
                .job_head
                .store(st.jobs.front().copied().unwrap_or(NO_JOB), Ordering::SeqCst);
        }
    }
}

/// Creates the fault bdev `name` on top of the bdev `base`, claiming it, and
/// returns it with its control.
pub fn create(
    reg: &BdevRegistry,
    name: &str,
    base: &str,
    opts: FaultOptions,
) -> Result<(Bdev, FaultControl), BdevError> {
    let base_bdev = reg.lookup(base)?;
    let claim = base_bdev.claim(name)?;
    let b = claim.bdev().info().clone();
    // Calibrates the clock now (it sleeps the first time), not on the data path.
    let ticks_per_sec = clock::duration_to_ticks(Duration::from_secs(1)).max(1);
    let cache = opts.volatile_cache.then(|| Cache {
        state: Mutex::new(CacheState::default()),
        clean_seq: AtomicU64::new(0),
        job_head: AtomicU64::new(NO_JOB),
    });
    let shared = Arc::new(FaultShared {
        name: name.to_string(),
        block_size: b.block_size as u64,
        ticks_per_sec,
        seed: opts.seed,
        channels: AtomicU64::new(0),
        read_rate: AtomicU64::new(rate_to_fixed(opts.read_error_rate)),
        write_rate: AtomicU64::new(rate_to_fixed(opts.write_error_rate)),
        fail_reads: AtomicU64::new(0),
        fail_writes: AtomicU64::new(0),
        writes_left: AtomicU64::new(NEVER),
        latency_us: AtomicU64::new(0),
        latency_ticks: AtomicU64::new(0),
        late_writes: AtomicBool::new(false),
        bw_limit: AtomicU64::new(0),
        bw_next: AtomicU64::new(0),
        powered: AtomicBool::new(true),
        epoch: AtomicU64::new(0),
        power_lock: Mutex::new(()),
        injected: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        seen: AtomicU64::new(0),
        cache,
    });
    let ctl = FaultControl {
        shared: shared.clone(),
    };
    ctl.set_latency_us(opts.latency_us);
    let mut info = BdevInfo::new(name, "fault", b.block_size, b.num_blocks);
    info.volatile_write_cache = opts.volatile_cache || b.volatile_write_cache;
    let desc = claim.open();
    let bdev = reg.register(
        info,
        FaultBdev {
            base: desc,
            shared,
            _claim: claim,
        },
    )?;
    tracing::debug!(bdev = name, base, ?opts, "fault bdev created");
    Ok((bdev, ctl))
}

/// The control of an existing fault bdev (`None` if `bdev` is not one).
pub fn control(bdev: &Bdev) -> Option<FaultControl> {
    bdev.backend::<FaultBdev>().map(FaultBdev::control)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use hotcopy_runtime::DmaBuf;

    use super::*;
    use crate::modules::malloc;
    use crate::testing::{flush, pattern, read, run_io, unmap, write, write_zeroes};

    const BS: usize = 512;
    const OK: IoStatus = IoStatus::Success;
    const INJECTED: IoStatus = IoStatus::Failed(IoError::Injected);
    const POWER_LOSS: IoStatus = IoStatus::Failed(IoError::PowerLoss);

    /// Runs `f` on a fresh thread with its own reactor, re-raising its panic.
    fn on_reactor(f: impl FnOnce() + Send + 'static) {
        let r = std::thread::spawn(move || {
            let _reactor = hotcopy_runtime::Reactor::new(0, hotcopy_runtime::IdlePolicy::Poll);
            f();
            hotcopy_runtime::clear_current();
        })
        .join();
        if let Err(panic) = r {
            std::panic::resume_unwind(panic);
        }
    }

    struct Rig {
        reg: BdevRegistry,
        bdev: Bdev,
        ctl: FaultControl,
        /// A writable channel to the fault bdev.
        ch: BdevChannel,
        /// A read-only channel straight to the base.
        base: BdevChannel,
    }

    fn rig_sized(size: u64, opts: FaultOptions) -> Rig {
        let reg = BdevRegistry::new();
        malloc::create(&reg, "m0", size, BS as u32).unwrap();
        let (bdev, ctl) = create(&reg, "f0", "m0", opts).unwrap();
        let ch = reg.open("f0", true).unwrap().channel().unwrap();
        let base = reg.open("m0", false).unwrap().channel().unwrap();
        Rig {
            reg,
            bdev,
            ctl,
            ch,
            base,
        }
    }

    fn rig(opts: FaultOptions) -> Rig {
        rig_sized(4 << 20, opts)
    }

    fn volatile() -> FaultOptions {
        FaultOptions {
            volatile_cache: true,
            ..Default::default()
        }
    }

    fn write_fua(ch: &mut BdevChannel, offset_blocks: u64, data: &[u8]) -> IoStatus {
        let buf = DmaBuf::from_slice(data).unwrap();
        let mut io = BdevIo::write(offset_blocks, (data.len() / BS) as u64, buf, 7);
        io.fua = true;
        run_io(ch, io).status
    }

    /// Polls until the I/O with `token` comes back; returns it.
    fn wait_for(ch: &mut BdevChannel, token: u64) -> BdevIo {
        let start = Instant::now();
        let mut out = None;
        while out.is_none() {
            ch.poll(&mut |io| {
                assert_eq!(io.token, token, "unexpected completion");
                out = Some(io);
            });
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "I/O {token} never completed"
            );
        }
        out.unwrap()
    }

    #[test]
    fn passes_io_through_unchanged_without_faults() {
        on_reactor(|| {
            let mut r = rig(FaultOptions::default());
            let info = r.bdev.info();
            assert_eq!(info.product, "fault");
            assert_eq!((info.block_size, info.num_blocks), (512, 8192));
            assert!(!info.volatile_write_cache);
            for (i, off) in [0u64, 9, 100, 8192 - 8].into_iter().enumerate() {
                let data = pattern(i as u64 + 1, 8 * BS);
                assert_eq!(write(&mut r.ch, off, &data), OK);
                assert_eq!(read(&mut r.ch, off, 8).unwrap(), data);
                assert_eq!(
                    read(&mut r.base, off, 8).unwrap(),
                    data,
                    "the base holds the data"
                );
            }
            let big = pattern(99, 256 * BS);
            assert_eq!(write(&mut r.ch, 1000, &big), OK);
            assert_eq!(read(&mut r.ch, 1000, 256).unwrap(), big);
            assert_eq!(flush(&mut r.ch), OK);
            assert_eq!(write_zeroes(&mut r.ch, 1000, 4), OK);
            assert_eq!(unmap(&mut r.ch, 1004, 4), OK);
            let got = read(&mut r.ch, 1000, 9).unwrap();
            assert!(got[..8 * BS].iter().all(|b| *b == 0));
            assert_eq!(got[8 * BS..], big[8 * BS..9 * BS]);
            assert_eq!(r.ctl.ios_seen(), 4 * 2 + 2 + 3 + 1);
            assert_eq!(r.ctl.injected_errors(), 0);
            assert_eq!(r.ctl.dropped_writes(), 0);
            assert!(r.ctl.is_powered());
        });
    }

    #[test]
    fn claims_its_base_and_is_found_by_control() {
        on_reactor(|| {
            let r = rig(volatile());
            assert!(matches!(
                r.reg.open("m0", true),
                Err(BdevError::Claimed { .. })
            ));
            assert!(
                r.reg.open("m0", false).is_ok(),
                "read-only opens still work"
            );
            assert!(matches!(
                r.reg.unregister("m0"),
                Err(BdevError::Claimed { .. })
            ));
            assert!(matches!(
                create(&r.reg, "f1", "m0", FaultOptions::default()),
                Err(BdevError::Claimed { .. })
            ));
            assert!(r.bdev.info().volatile_write_cache);
            assert!(r.bdev.supports(IoType::Flush));
            let ctl = control(&r.bdev).expect("a fault bdev has a control");
            ctl.fail_next_writes(1);
            let mut ch = r.reg.open("f0", true).unwrap().channel().unwrap();
            assert_eq!(
                write(&mut ch, 0, &[1; BS]),
                INJECTED,
                "the looked-up control is the same"
            );
            assert_eq!(r.ctl.injected_errors(), 1);
            assert!(
                control(&r.reg.get("m0").unwrap()).is_none(),
                "malloc is no fault bdev"
            );
            // With several fault bdevs, each control is its own bdev's.
            malloc::create(&r.reg, "m1", 1 << 20, BS as u32).unwrap();
            let (f1, ctl1) = create(&r.reg, "f1", "m1", FaultOptions::default()).unwrap();
            let found = control(&f1).unwrap();
            found.fail_next_reads(1);
            let mut ch1 = r.reg.open("f1", true).unwrap().channel().unwrap();
            assert_eq!(read(&mut ch1, 0, 1), Err(INJECTED));
            assert_eq!((ctl1.injected_errors(), r.ctl.injected_errors()), (1, 1));
            assert!(matches!(
                create(&r.reg, "f2", "nope", FaultOptions::default()),
                Err(BdevError::NotFound { .. })
            ));
        });
    }

    #[test]
    fn error_rates_of_one_and_zero() {
        on_reactor(|| {
            let mut r = rig(FaultOptions {
                read_error_rate: 1.0,
                ..Default::default()
            });
            let old = pattern(1, BS);
            assert_eq!(write(&mut r.ch, 3, &old), OK);
            for _ in 0..50 {
                assert_eq!(read(&mut r.ch, 3, 1), Err(INJECTED));
            }
            r.ctl.set_read_error_rate(0.0);
            r.ctl.set_write_error_rate(1.0);
            for i in 0..50 {
                assert_eq!(read(&mut r.ch, 3, 1).unwrap(), old);
                assert_eq!(write(&mut r.ch, 3, &pattern(i + 10, BS)), INJECTED);
                assert_eq!(write_zeroes(&mut r.ch, 3, 1), INJECTED);
                assert_eq!(unmap(&mut r.ch, 3, 1), INJECTED);
                assert_eq!(flush(&mut r.ch), OK, "flushes are never injected");
            }
            assert_eq!(
                read(&mut r.base, 3, 1).unwrap(),
                old,
                "failed writes never reach the base"
            );
            assert_eq!(r.ctl.injected_errors(), 50 + 150);
            r.ctl.set_write_error_rate(0.0);
            for i in 0..50 {
                let data = pattern(i + 100, BS);
                assert_eq!(write(&mut r.ch, 3, &data), OK);
                assert_eq!(read(&mut r.ch, 3, 1).unwrap(), data);
            }
            assert_eq!(r.ctl.injected_errors(), 200);
            // Out-of-range rates are clamped.
            r.ctl.set_write_error_rate(7.0);
            assert_eq!(write(&mut r.ch, 3, &old), INJECTED);
            r.ctl.set_write_error_rate(-1.0);
            assert_eq!(write(&mut r.ch, 3, &old), OK);
        });
    }

    /// Which of `n` one-block writes fail at `rate` on a new fault bdev.
    fn failure_pattern(seed: u64, rate: f64, n: usize) -> Vec<bool> {
        let opts = FaultOptions {
            write_error_rate: rate,
            seed,
            ..Default::default()
        };
        let mut r = rig_sized(64 * BS as u64, opts);
        let data = [5u8; BS];
        (0..n)
            .map(|i| {
                let st = write(&mut r.ch, (i % 64) as u64, &data);
                assert!(st == OK || st == INJECTED, "{st:?}");
                st == INJECTED
            })
            .collect()
    }

    #[test]
    fn error_rate_of_a_half_is_plausible_and_deterministic() {
        on_reactor(|| {
            let a = failure_pattern(42, 0.5, 2000);
            let failed = a.iter().filter(|f| **f).count();
            // Binomial(2000, 0.5): sd ~22; this band is ~6.7 sd wide each way.
            assert!(
                (850..=1150).contains(&failed),
                "{failed} of 2000 failed at rate 0.5"
            );
            assert_eq!(
                failure_pattern(42, 0.5, 2000),
                a,
                "same seed, same failures"
            );
            assert_ne!(
                failure_pattern(43, 0.5, 2000),
                a,
                "another seed, other failures"
            );
            let tenth = failure_pattern(7, 0.1, 2000).iter().filter(|f| **f).count();
            assert!(
                (120..=280).contains(&tenth),
                "{tenth} of 2000 failed at rate 0.1"
            );
        });
    }

    #[test]
    fn fail_next_writes_fails_exactly_n_and_leaves_the_base_alone() {
        on_reactor(|| {
            let mut r = rig(FaultOptions::default());
            let old = pattern(1, 4 * BS);
            assert_eq!(write(&mut r.ch, 20, &old), OK);
            r.ctl.fail_next_writes(3);
            for i in 0..3 {
                assert_eq!(
                    write(&mut r.ch, 20, &pattern(50 + i, 4 * BS)),
                    INJECTED,
                    "write {i}"
                );
                assert_eq!(
                    read(&mut r.base, 20, 4).unwrap(),
                    old,
                    "base unchanged after {i}"
                );
                assert_eq!(
                    read(&mut r.ch, 20, 4).unwrap(),
                    old,
                    "reads are not affected"
                );
            }
            let new = pattern(2, 4 * BS);
            assert_eq!(write(&mut r.ch, 20, &new), OK, "the 4th write succeeds");
            assert_eq!(read(&mut r.base, 20, 4).unwrap(), new);
            for i in 0..20 {
                assert_eq!(write(&mut r.ch, 30, &pattern(60 + i, BS)), OK);
            }
            assert_eq!(r.ctl.injected_errors(), 3);
            // Cancelling a pending count.
            r.ctl.fail_next_writes(5);
            r.ctl.fail_next_writes(0);
            assert_eq!(write(&mut r.ch, 30, &new[..BS]), OK);
        });
    }

    #[test]
    fn fail_next_reads_fails_exactly_n() {
        on_reactor(|| {
            let mut r = rig(FaultOptions::default());
            let data = pattern(3, 2 * BS);
            assert_eq!(write(&mut r.ch, 0, &data), OK);
            r.ctl.fail_next_reads(2);
            assert_eq!(
                write(&mut r.ch, 2, &data),
                OK,
                "writes do not consume read failures"
            );
            assert_eq!(read(&mut r.ch, 0, 2), Err(INJECTED));
            assert_eq!(read(&mut r.ch, 0, 2), Err(INJECTED));
            for _ in 0..10 {
                assert_eq!(read(&mut r.ch, 0, 2).unwrap(), data);
            }
            assert_eq!(r.ctl.injected_errors(), 2);
        });
    }

    #[test]
    fn fail_writes_after_kills_the_target_until_cleared() {
        on_reactor(|| {
            let mut r = rig(FaultOptions::default());
            r.ctl.fail_writes_after(5);
            for i in 0..5u64 {
                assert_eq!(
                    write(&mut r.ch, i, &pattern(i, BS)),
                    OK,
                    "write {i} is within budget"
                );
            }
            for i in 5..25u64 {
                assert_eq!(write(&mut r.ch, i, &pattern(i, BS)), INJECTED, "write {i}");
            }
            assert_eq!(
                write_zeroes(&mut r.ch, 0, 1),
                INJECTED,
                "a dead target takes no zeroes"
            );
            assert_eq!(flush(&mut r.ch), OK);
            for i in 0..5u64 {
                assert_eq!(read(&mut r.ch, i, 1).unwrap(), pattern(i, BS));
            }
            assert!(read(&mut r.base, 5, 20).unwrap().iter().all(|b| *b == 0));
            assert_eq!(r.ctl.injected_errors(), 21);
            r.ctl.clear();
            assert_eq!(write(&mut r.ch, 5, &pattern(5, BS)), OK);
            // Zero: the very next write fails.
            r.ctl.fail_writes_after(0);
            assert_eq!(write(&mut r.ch, 6, &pattern(6, BS)), INJECTED);
            r.ctl.fail_writes_after(u64::MAX);
            assert_eq!(
                write(&mut r.ch, 6, &pattern(6, BS)),
                OK,
                "u64::MAX turns it off"
            );
        });
    }

    #[test]
    fn late_writes_reach_the_base_only_at_their_release_time() {
        on_reactor(|| {
            let mut r = rig(FaultOptions {
                latency_us: 20_000,
                ..Default::default()
            });
            // Without late writes the base takes the data at submit.
            r.ch.submit(BdevIo::write(
                0,
                1,
                DmaBuf::from_slice(&[1; BS]).unwrap(),
                1,
            ));
            r.ch.poll(&mut |_| panic!("back before its latency"));
            assert_eq!(read(&mut r.base, 0, 1).unwrap(), vec![1; BS]);
            assert_eq!(wait_for(&mut r.ch, 1).status, OK);
            // With them it reaches the base only once its time has come.
            r.ctl.set_late_writes(true);
            let t0 = Instant::now();
            r.ch.submit(BdevIo::write(
                0,
                1,
                DmaBuf::from_slice(&[2; BS]).unwrap(),
                2,
            ));
            r.ch.poll(&mut |_| panic!("back before its latency"));
            let before = read(&mut r.base, 0, 1).unwrap();
            if t0.elapsed() < Duration::from_millis(15) {
                assert_eq!(before, vec![1; BS], "a late write reached the base early");
            }
            assert_eq!(wait_for(&mut r.ch, 2).status, OK);
            // 20 ms counted in calibrated TSC ticks: a part in a hundred of slack.
            assert!(t0.elapsed() >= Duration::from_micros(19_800));
            assert_eq!(read(&mut r.base, 0, 1).unwrap(), vec![2; BS]);
            // Reads are not affected; a cut while a late write waits fails
            // it without touching the base.
            assert_eq!(read(&mut r.ch, 0, 1).unwrap(), vec![2; BS]);
            r.ch.submit(BdevIo::write(
                0,
                1,
                DmaBuf::from_slice(&[3; BS]).unwrap(),
                3,
            ));
            r.ctl.power_cut();
            r.ctl.power_on();
            assert_eq!(
                wait_for(&mut r.ch, 3).status,
                IoStatus::Failed(IoError::PowerLoss)
            );
            assert_eq!(read(&mut r.base, 0, 1).unwrap(), vec![2; BS]);
            r.ctl.clear();
            assert_eq!(write(&mut r.ch, 0, &[4; BS]), OK);
            assert_eq!(read(&mut r.base, 0, 1).unwrap(), vec![4; BS]);
        });
    }

    #[test]
    fn latency_holds_each_completion() {
        on_reactor(|| {
            let mut r = rig(FaultOptions {
                latency_us: 2000,
                ..Default::default()
            });
            // The module counts the latency in TSC ticks, calibrated against
            // the monotonic clock the test reads; allow the calibration a part
            // in a hundred (a missing latency would be off by nearly all of it).
            let lat = Duration::from_micros(1980);
            for (token, io) in [
                (
                    11,
                    BdevIo::write(0, 1, DmaBuf::from_slice(&[9; BS]).unwrap(), 11),
                ),
                (12, BdevIo::read(0, 1, DmaBuf::alloc(BS).unwrap(), 12)),
                (13, BdevIo::flush(13)),
            ] {
                let t0 = Instant::now();
                r.ch.submit(io);
                let mut early = 0;
                let n = r.ch.poll(&mut |_| early += 1);
                let first_poll = t0.elapsed();
                if first_poll < Duration::from_micros(1500) {
                    assert_eq!(
                        (n, early),
                        (0, 0),
                        "I/O {token} came back before its latency"
                    );
                }
                let io = wait_for(&mut r.ch, token);
                let elapsed = t0.elapsed();
                assert_eq!(io.status, OK);
                assert!(elapsed >= lat, "I/O {token} came back after {elapsed:?}");
            }
            assert_eq!(read(&mut r.ch, 0, 1).unwrap(), vec![9; BS]);
            // Injected failures are held too.
            r.ctl.fail_next_writes(1);
            let t0 = Instant::now();
            assert_eq!(write(&mut r.ch, 0, &[1; BS]), INJECTED);
            assert!(t0.elapsed() >= lat);
            r.ctl.set_latency_us(0);
            r.ch.submit(BdevIo::flush(14));
            let mut polls = 0;
            let mut back = false;
            while !back {
                r.ch.poll(&mut |_| back = true);
                polls += 1;
                assert!(polls < 1000);
            }
            assert!(
                polls <= 3,
                "without latency a flush is back in {polls} polls"
            );
        });
    }

    #[test]
    fn bandwidth_limit_paces_io_without_failing_it() {
        on_reactor(|| {
            let mut r = rig(FaultOptions::default());
            r.ctl.set_bandwidth_limit(8 << 20);
            let chunk = pattern(4, 256 << 10);
            let t0 = Instant::now();
            for i in 0..16u64 {
                assert_eq!(write(&mut r.ch, i * 512, &chunk), OK);
            }
            let elapsed = t0.elapsed();
            assert!(
                elapsed >= Duration::from_millis(450),
                "4 MiB at 8 MiB/s took {elapsed:?}"
            );
            // Several I/O in flight share the budget.
            let t0 = Instant::now();
            for i in 0..8u64 {
                r.ch.submit(BdevIo::read(
                    i * 512,
                    512,
                    DmaBuf::alloc(256 << 10).unwrap(),
                    i,
                ));
            }
            let mut back = 0;
            while back < 8 {
                r.ch.poll(&mut |io| {
                    assert_eq!(io.status, OK);
                    assert_eq!(&io.buf.as_ref().unwrap()[..], &chunk[..]);
                    back += 1;
                });
            }
            let elapsed = t0.elapsed();
            assert!(
                elapsed >= Duration::from_millis(220),
                "2 MiB at 8 MiB/s took {elapsed:?}"
            );
            r.ctl.set_bandwidth_limit(0);
            let t0 = Instant::now();
            for i in 0..16u64 {
                assert_eq!(write(&mut r.ch, i * 512, &chunk), OK);
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no limit, no pacing");
        });
    }

    #[test]
    fn volatile_power_cut_loses_unflushed_writes() {
        on_reactor(|| {
            let mut r = rig(volatile());
            let a = pattern(10, 8 * BS);
            let b = pattern(11, 8 * BS);
            let elsewhere = pattern(12, 2 * BS);
            assert_eq!(write(&mut r.ch, 100, &a), OK);
            assert_eq!(flush(&mut r.ch), OK);
            assert_eq!(
                read(&mut r.base, 100, 8).unwrap(),
                a,
                "a flush reaches the base"
            );
            assert_eq!(write(&mut r.ch, 100, &b), OK);
            assert_eq!(write(&mut r.ch, 5000, &elsewhere), OK);
            assert_eq!(r.ctl.dirty_blocks(), 10);
            assert_eq!(read(&mut r.ch, 100, 8).unwrap(), b, "reads see cached data");
            assert_eq!(read(&mut r.ch, 4999, 4).unwrap()[BS..3 * BS], elsewhere[..]);
            assert_eq!(
                read(&mut r.base, 100, 8).unwrap(),
                a,
                "the base has not seen B"
            );

            r.ctl.power_cut();
            assert!(!r.ctl.is_powered());
            assert_eq!(r.ctl.dropped_writes(), 10, "B's 8 blocks and the other 2");
            assert_eq!(r.ctl.dirty_blocks(), 0);
            assert_eq!(read(&mut r.ch, 100, 8), Err(POWER_LOSS));
            assert_eq!(write(&mut r.ch, 100, &b), POWER_LOSS);
            assert_eq!(flush(&mut r.ch), POWER_LOSS);
            assert_eq!(write_zeroes(&mut r.ch, 100, 1), POWER_LOSS);
            assert_eq!(write_fua(&mut r.ch, 100, &b), POWER_LOSS);
            assert_eq!(
                r.ctl.dirty_blocks(),
                0,
                "nothing is cached while the power is off"
            );
            r.ctl.power_cut();
            assert_eq!(
                r.ctl.dropped_writes(),
                10,
                "a second cut loses nothing more"
            );

            r.ctl.power_on();
            assert_eq!(read(&mut r.ch, 100, 8).unwrap(), a, "A survives, B is gone");
            assert!(read(&mut r.ch, 5000, 2).unwrap().iter().all(|x| *x == 0));
            assert_eq!(read(&mut r.base, 100, 8).unwrap(), a);
            assert_eq!(write(&mut r.ch, 100, &b), OK, "service is back");
            assert_eq!(read(&mut r.ch, 100, 8).unwrap(), b);
            assert_eq!(r.ctl.injected_errors(), 0);
        });
    }

    #[test]
    fn volatile_flush_makes_cached_writes_durable() {
        on_reactor(|| {
            let mut r = rig(volatile());
            // Scattered blocks: many coalesced runs, more than the write-back depth.
            let mut expect = Vec::new();
            for i in 0..40u64 {
                let data = pattern(i + 1, 3 * BS);
                assert_eq!(write(&mut r.ch, i * 100, &data), OK);
                expect.push((i * 100, data));
            }
            // One run longer than a write-back chunk (128 KiB = 256 blocks).
            let long = pattern(77, 600 * BS);
            assert_eq!(write(&mut r.ch, 5000, &long), OK);
            assert_eq!(r.ctl.dirty_blocks(), 40 * 3 + 600);
            assert!(read(&mut r.base, 5000, 600)
                .unwrap()
                .iter()
                .all(|x| *x == 0));
            assert_eq!(flush(&mut r.ch), OK);
            assert_eq!(r.ctl.dirty_blocks(), 0);
            r.ctl.power_cut();
            assert_eq!(r.ctl.dropped_writes(), 0);
            r.ctl.power_on();
            for (off, data) in &expect {
                assert_eq!(&read(&mut r.ch, *off, 3).unwrap(), data, "block {off}");
                assert_eq!(
                    &read(&mut r.base, *off, 3).unwrap(),
                    data,
                    "base block {off}"
                );
            }
            assert_eq!(read(&mut r.ch, 5000, 600).unwrap(), long);
        });
    }

    #[test]
    fn volatile_fua_write_survives_a_power_cut() {
        on_reactor(|| {
            let mut r = rig(volatile());
            let dirty = pattern(1, 4 * BS);
            let fua = pattern(2, 2 * BS);
            let fresh = pattern(3, 2 * BS);
            assert_eq!(write(&mut r.ch, 10, &dirty), OK);
            // Over two of the dirty blocks, and on two clean ones.
            assert_eq!(write_fua(&mut r.ch, 12, &fua), OK);
            assert_eq!(write_fua(&mut r.ch, 50, &fresh), OK);
            assert_eq!(
                read(&mut r.base, 12, 2).unwrap(),
                fua,
                "FUA is written through"
            );
            assert_eq!(read(&mut r.ch, 10, 4).unwrap()[..2 * BS], dirty[..2 * BS]);
            assert_eq!(read(&mut r.ch, 12, 2).unwrap(), fua);
            assert_eq!(
                r.ctl.dirty_blocks(),
                2,
                "only blocks 10 and 11 are still dirty"
            );
            r.ctl.power_cut();
            assert_eq!(r.ctl.dropped_writes(), 2);
            r.ctl.power_on();
            let got = read(&mut r.ch, 10, 4).unwrap();
            assert!(
                got[..2 * BS].iter().all(|x| *x == 0),
                "the unflushed write is lost"
            );
            assert_eq!(got[2 * BS..], fua[..]);
            assert_eq!(read(&mut r.ch, 50, 2).unwrap(), fresh);
            // A later flush must not write the older cached data over FUA data.
            assert_eq!(write(&mut r.ch, 60, &dirty), OK);
            assert_eq!(write_fua(&mut r.ch, 60, &dirty[..BS]), OK);
            assert_eq!(flush(&mut r.ch), OK);
            assert_eq!(read(&mut r.base, 60, 4).unwrap(), dirty);
        });
    }

    #[test]
    fn volatile_write_during_an_inflight_flush_stays_dirty() {
        on_reactor(|| {
            let mut r = rig(volatile());
            let a = pattern(20, 4 * BS);
            let b = pattern(21, 4 * BS);
            let c = pattern(22, BS);
            assert_eq!(write(&mut r.ch, 0, &a), OK);
            r.ch.submit(BdevIo::flush(50));
            // B overwrites the blocks the flush is writing back; C is new.
            assert_eq!(write(&mut r.ch, 0, &b), OK, "completes before the flush");
            r.ch.submit(BdevIo::write(9, 1, DmaBuf::from_slice(&c).unwrap(), 51));
            let mut got = Vec::new();
            while got.len() < 2 {
                r.ch.poll(&mut |io| got.push((io.token, io.status)));
            }
            got.sort_unstable_by_key(|(t, _)| *t);
            assert_eq!(got, vec![(50, OK), (51, OK)]);
            assert_eq!(read(&mut r.ch, 0, 4).unwrap(), b, "reads see B");
            assert_eq!(
                read(&mut r.base, 0, 4).unwrap(),
                a,
                "the flush wrote A's snapshot"
            );
            assert_eq!(r.ctl.dirty_blocks(), 5, "B and C stay dirty");
            r.ctl.power_cut();
            assert_eq!(r.ctl.dropped_writes(), 5);
            r.ctl.power_on();
            assert_eq!(
                read(&mut r.ch, 0, 4).unwrap(),
                a,
                "A was flushed, B was not"
            );
            assert!(read(&mut r.ch, 9, 1).unwrap().iter().all(|x| *x == 0));

            // Twenty separate runs: more than the write-back keeps in flight,
            // so the last ones are still waiting when they are overwritten.
            let old: Vec<Vec<u8>> = (0..20).map(|i| pattern(100 + i, BS)).collect();
            for (i, data) in old.iter().enumerate() {
                assert_eq!(write(&mut r.ch, 1000 + 2 * i as u64, data), OK);
            }
            r.ch.submit(BdevIo::flush(52));
            let newer = pattern(200, BS);
            let mut ch2 = r.reg.open("f0", true).unwrap().channel().unwrap();
            for i in 0..20u64 {
                assert_eq!(write(&mut ch2, 1000 + 2 * i, &newer), OK);
            }
            assert_eq!(wait_for(&mut r.ch, 52).status, OK);
            assert_eq!(r.ctl.dirty_blocks(), 20);
            r.ctl.power_cut();
            r.ctl.power_on();
            for (i, data) in old.iter().enumerate() {
                let b = 1000 + 2 * i as u64;
                assert_eq!(
                    &read(&mut r.ch, b, 1).unwrap(),
                    data,
                    "block {b}: the flush's data"
                );
            }
        });
    }

    #[test]
    fn volatile_read_racing_a_write_back_never_returns_stale_data() {
        on_reactor(|| {
            let mut r = rig(volatile());
            let mut ch2 = r.reg.open("f0", true).unwrap().channel().unwrap();
            let a = pattern(35, 4 * BS);
            assert_eq!(write(&mut r.ch, 8, &a), OK);
            // The read reaches the base (which still has zeros) first; then a
            // flush on another channel writes A back and drops it from the
            // cache before the read's completion is patched.
            r.ch.submit(BdevIo::read(8, 4, DmaBuf::alloc(4 * BS).unwrap(), 36));
            assert_eq!(flush(&mut ch2), OK);
            assert_eq!(r.ctl.dirty_blocks(), 0);
            let mut io = wait_for(&mut r.ch, 36);
            assert_eq!(io.status, OK);
            assert_eq!(
                io.take_buf().unwrap().to_vec(),
                a,
                "the read saw neither cache nor base"
            );
        });
    }

    #[test]
    fn volatile_write_zeroes_and_unmap_are_write_through() {
        on_reactor(|| {
            let mut r = rig(volatile());
            let d = pattern(30, 8 * BS);
            let a = pattern(31, 8 * BS);
            assert_eq!(write(&mut r.ch, 0, &d), OK);
            assert_eq!(flush(&mut r.ch), OK);
            assert_eq!(write(&mut r.ch, 0, &a), OK);
            assert_eq!(write_zeroes(&mut r.ch, 2, 4), OK);
            assert_eq!(unmap(&mut r.ch, 7, 1), OK);
            let got = read(&mut r.ch, 0, 8).unwrap();
            assert_eq!(got[..2 * BS], a[..2 * BS]);
            assert!(got[2 * BS..6 * BS].iter().all(|x| *x == 0));
            assert_eq!(got[6 * BS..7 * BS], a[6 * BS..7 * BS]);
            assert!(got[7 * BS..].iter().all(|x| *x == 0));
            let base = read(&mut r.base, 0, 8).unwrap();
            assert!(
                base[2 * BS..6 * BS].iter().all(|x| *x == 0),
                "zeroes reached the base"
            );
            assert_eq!(base[..2 * BS], d[..2 * BS], "the plain write did not");
            assert_eq!(r.ctl.dirty_blocks(), 3, "blocks 0, 1 and 6");
            r.ctl.power_cut();
            assert_eq!(r.ctl.dropped_writes(), 3);
            r.ctl.power_on();
            let got = read(&mut r.ch, 0, 8).unwrap();
            assert_eq!(got[..2 * BS], d[..2 * BS]);
            assert!(
                got[2 * BS..6 * BS].iter().all(|x| *x == 0),
                "write-zeroes is durable"
            );
            assert_eq!(got[6 * BS..7 * BS], d[6 * BS..7 * BS]);
            assert!(got[7 * BS..].iter().all(|x| *x == 0), "unmap is durable");
        });
    }

    #[test]
    fn volatile_injected_write_leaves_the_cache_alone() {
        on_reactor(|| {
            let mut r = rig(volatile());
            let a = pattern(40, BS);
            assert_eq!(write(&mut r.ch, 1, &a), OK);
            r.ctl.fail_next_writes(2);
            assert_eq!(write(&mut r.ch, 1, &pattern(41, BS)), INJECTED);
            assert_eq!(write_fua(&mut r.ch, 1, &pattern(42, BS)), INJECTED);
            assert_eq!(read(&mut r.ch, 1, 1).unwrap(), a);
            assert_eq!(r.ctl.dirty_blocks(), 1);
        });
    }

    #[test]
    fn power_cut_without_volatile_cache_keeps_completed_writes() {
        on_reactor(|| {
            let mut r = rig(FaultOptions::default());
            let a = pattern(50, 16 * BS);
            assert_eq!(write(&mut r.ch, 200, &a), OK);
            r.ctl.power_cut();
            assert_eq!(write(&mut r.ch, 200, &pattern(51, 16 * BS)), POWER_LOSS);
            assert_eq!(read(&mut r.ch, 200, 16), Err(POWER_LOSS));
            assert_eq!(flush(&mut r.ch), POWER_LOSS);
            assert_eq!(unmap(&mut r.ch, 200, 16), POWER_LOSS);
            assert_eq!(
                read(&mut r.base, 200, 16).unwrap(),
                a,
                "nothing reached the base"
            );
            r.ctl.power_on();
            assert_eq!(
                read(&mut r.ch, 200, 16).unwrap(),
                a,
                "completed writes are durable"
            );
            assert_eq!(r.ctl.dropped_writes(), 0);
            assert_eq!(write(&mut r.ch, 200, &a[..BS]), OK);
        });
    }

    #[test]
    fn io_in_flight_across_a_power_cycle_fails() {
        for volatile_cache in [false, true] {
            on_reactor(move || {
                let opts = FaultOptions {
                    latency_us: 20_000,
                    volatile_cache,
                    ..Default::default()
                };
                let mut r = rig(opts);
                r.ch.submit(BdevIo::write(
                    0,
                    1,
                    DmaBuf::from_slice(&[1; BS]).unwrap(),
                    60,
                ));
                r.ch.submit(BdevIo::read(0, 1, DmaBuf::alloc(BS).unwrap(), 61));
                r.ch.submit(BdevIo::flush(62));
                r.ch.poll(&mut |io| panic!("{io:?} came back before its latency"));
                r.ctl.power_cut();
                r.ctl.power_on();
                let mut got = Vec::new();
                let t0 = Instant::now();
                while got.len() < 3 {
                    r.ch.poll(&mut |io| got.push((io.token, io.status)));
                    assert!(t0.elapsed() < Duration::from_secs(10));
                }
                got.sort_unstable_by_key(|(t, _)| *t);
                assert_eq!(
                    got,
                    vec![(60, POWER_LOSS), (61, POWER_LOSS), (62, POWER_LOSS)]
                );
                r.ctl.set_latency_us(0);
                assert_eq!(
                    write(&mut r.ch, 0, &[2; BS]),
                    OK,
                    "new I/O works after power-on"
                );
            });
        }
    }

    #[test]
    fn volatile_cache_is_shared_and_flushes_run_in_order_across_channels() {
        on_reactor(|| {
            let mut r = rig(volatile());
            let mut ch2 = r.reg.open("f0", true).unwrap().channel().unwrap();
            let a = pattern(70, 2 * BS);
            let b = pattern(71, 2 * BS);
            assert_eq!(write(&mut r.ch, 40, &a), OK);
            assert_eq!(
                read(&mut ch2, 40, 2).unwrap(),
                a,
                "one cache for every channel"
            );
            // Flush 1 starts on channel 1; B then goes into the cache; flush 2 on
            // channel 2 must wait for flush 1 even though channel 1 is not polled.
            r.ch.submit(BdevIo::flush(80));
            assert_eq!(write(&mut ch2, 40, &b), OK);
            ch2.submit(BdevIo::flush(81));
            for _ in 0..2000 {
                ch2.poll(&mut |io| panic!("{io:?} finished before the flush ahead of it"));
            }
            assert_eq!(wait_for(&mut r.ch, 80).status, OK);
            assert_eq!(wait_for(&mut ch2, 81).status, OK);
            assert_eq!(r.ctl.dirty_blocks(), 0);
            r.ctl.power_cut();
            r.ctl.power_on();
            assert_eq!(
                read(&mut r.ch, 40, 2).unwrap(),
                b,
                "the later flush wrote B last"
            );
            // A dropped channel gives up its place in the queue.
            assert_eq!(write(&mut r.ch, 41, &a[..BS]), OK);
            let mut ch3 = r.reg.open("f0", true).unwrap().channel().unwrap();
            ch3.submit(BdevIo::flush(82));
            ch2.submit(BdevIo::flush(83));
            drop(ch3);
            assert_eq!(wait_for(&mut ch2, 83).status, OK);
        });
    }

    #[test]
    fn allocated_ranges_include_cached_blocks() {
        on_reactor(|| {
            let mut r = rig(volatile());
            assert_eq!(r.bdev.allocated_ranges(), Some(vec![]));
            assert_eq!(write(&mut r.ch, 5000, &[1; 2 * BS]), OK);
            assert_eq!(write(&mut r.ch, 5002, &[1; BS]), OK);
            assert_eq!(r.bdev.allocated_ranges(), Some(vec![(5000, 3)]));
            assert_eq!(r.reg.get("m0").unwrap().allocated_ranges(), Some(vec![]));
            assert_eq!(flush(&mut r.ch), OK);
            // malloc tracks 64 KiB granules: 128 blocks.
            assert_eq!(r.bdev.allocated_ranges(), Some(vec![(4992, 128)]));
            assert_eq!(write(&mut r.ch, 5100, &[1; BS]), OK);
            assert_eq!(r.bdev.allocated_ranges(), Some(vec![(4992, 128)]));
        });
    }

    #[test]
    fn clear_turns_every_fault_off() {
        on_reactor(|| {
            let mut r = rig(FaultOptions {
                latency_us: 1_000_000,
                ..volatile()
            });
            r.ctl.set_read_error_rate(1.0);
            r.ctl.set_write_error_rate(1.0);
            r.ctl.fail_next_reads(10);
            r.ctl.fail_next_writes(10);
            r.ctl.fail_writes_after(0);
            r.ctl.set_bandwidth_limit(1);
            r.ctl.power_cut();
            assert!(format!("{:?}", r.ctl).contains("powered: false"));
            r.ctl.clear();
            let t0 = Instant::now();
            let data = pattern(90, 64 * BS);
            assert_eq!(write(&mut r.ch, 0, &data), OK);
            assert_eq!(read(&mut r.ch, 0, 64).unwrap(), data);
            assert_eq!(flush(&mut r.ch), OK);
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "no latency, no pacing"
            );
            assert!(r.ctl.is_powered());
            assert_eq!(r.ctl.injected_errors(), 0);
        });
    }

    // -- Randomized power-cut campaign ---------------------------------------

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            next_random(&mut self.0)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const CAMPAIGN_BLOCKS: u64 = 64;

    fn blk(v: &[u8], b: u64) -> &[u8] {
        &v[b as usize * BS..(b as usize + 1) * BS]
    }

    #[derive(Default)]
    struct Tally {
        cuts: u64,
        cuts_mid_flush: u64,
        partial_flushes: u64,
    }

    /// Reads the whole device through the fault bdev and the base; both must
    /// agree. Returns the data.
    fn read_all(ch: &mut BdevChannel, base: &mut BdevChannel, ctx: &str) -> Vec<u8> {
        let got = read(ch, 0, CAMPAIGN_BLOCKS).unwrap_or_else(|e| panic!("{ctx}: read {e:?}"));
        let on_base = read(base, 0, CAMPAIGN_BLOCKS).unwrap();
        assert!(
            got == on_base,
            "{ctx}: after power-on the base and the bdev differ"
        );
        got
    }

    /// One case: random writes (some FUA), flushes, write-zeroes, unmaps and
    /// reads on two channels, with power cuts between I/O and in the middle of
    /// a flush, checked against a model of what is durable.
    fn campaign_case(case: u64, tally: &mut Tally) {
        let mut rng = Rng(splitmix64(case ^ 0x5EED) | 1);
        let reg = BdevRegistry::new();
        malloc::create(&reg, "m0", CAMPAIGN_BLOCKS * BS as u64, BS as u32).unwrap();
        let opts = FaultOptions {
            volatile_cache: true,
            seed: case,
            ..Default::default()
        };
        let (_bdev, ctl) = create(&reg, "f0", "m0", opts).unwrap();
        let desc = reg.open("f0", true).unwrap();
        let mut chs = [desc.channel().unwrap(), desc.channel().unwrap()];
        let mut base = reg.open("m0", false).unwrap().channel().unwrap();
        let size = CAMPAIGN_BLOCKS as usize * BS;
        let mut current = vec![0u8; size];
        let mut durable = vec![0u8; size];
        let mut dirty = BTreeSet::new();
        let steps = 30 + rng.below(40);
        for step in 0..steps {
            let ctx = format!("case {case} step {step}");
            let c = rng.below(2) as usize;
            let off = rng.below(CAMPAIGN_BLOCKS);
            let n = 1 + rng.below(4.min(CAMPAIGN_BLOCKS - off));
            let range = off as usize * BS..(off + n) as usize * BS;
            match rng.below(100) {
                0..=44 => {
                    let data = pattern(rng.next(), n as usize * BS);
                    let fua = rng.below(8) == 0;
                    let st = if fua {
                        write_fua(&mut chs[c], off, &data)
                    } else {
                        write(&mut chs[c], off, &data)
                    };
                    assert_eq!(st, OK, "{ctx}: write");
                    current[range.clone()].copy_from_slice(&data);
                    for b in off..off + n {
                        if fua {
                            dirty.remove(&b);
                        } else {
                            dirty.insert(b);
                        }
                    }
                    if fua {
                        durable[range].copy_from_slice(&data);
                    }
                }
                45..=54 => {
                    assert_eq!(flush(&mut chs[c]), OK, "{ctx}: flush");
                    durable.copy_from_slice(&current);
                    dirty.clear();
                }
                55..=59 => {
                    let st = if rng.below(2) == 0 {
                        unmap(&mut chs[c], off, n)
                    } else {
                        write_zeroes(&mut chs[c], off, n)
                    };
                    assert_eq!(st, OK, "{ctx}: unmap/write-zeroes");
                    current[range.clone()].fill(0);
                    durable[range].fill(0);
                    for b in off..off + n {
                        dirty.remove(&b);
                    }
                }
                60..=71 => {
                    let got = read(&mut chs[c], off, n).unwrap();
                    assert!(
                        got[..] == current[range],
                        "{ctx}: read {off}+{n} differs from the model"
                    );
                }
                72..=87 => {
                    // A cut between I/O: exactly the dirty blocks are lost.
                    assert_eq!(ctl.dirty_blocks(), dirty.len() as u64, "{ctx}: dirty count");
                    let before = ctl.dropped_writes();
                    ctl.power_cut();
                    assert_eq!(
                        ctl.dropped_writes() - before,
                        dirty.len() as u64,
                        "{ctx}: dropped"
                    );
                    assert_eq!(
                        write(&mut chs[c], off, &vec![0xEE; n as usize * BS]),
                        POWER_LOSS
                    );
                    assert_eq!(read(&mut chs[1 - c], off, n), Err(POWER_LOSS));
                    ctl.power_on();
                    let got = read_all(&mut chs[c], &mut base, &ctx);
                    for b in 0..CAMPAIGN_BLOCKS {
                        assert!(
                            blk(&got, b) == blk(&durable, b),
                            "{ctx}: block {b} is not its last durable value after a cut"
                        );
                    }
                    current.copy_from_slice(&durable);
                    dirty.clear();
                    tally.cuts += 1;
                }
                _ => {
                    // Scatter writes so the flush has many runs, then cut the
                    // power at a random point of the flush.
                    for _ in 0..rng.below(16) {
                        let b = rng.below(CAMPAIGN_BLOCKS);
                        let data = pattern(rng.next(), BS);
                        assert_eq!(write(&mut chs[0], b, &data), OK, "{ctx}: scatter write");
                        current[b as usize * BS..(b as usize + 1) * BS].copy_from_slice(&data);
                        dirty.insert(b);
                    }
                    let snapshot = current.clone();
                    chs[0].submit(BdevIo::flush(500));
                    let mut status = None;
                    for _ in 0..rng.below(5) {
                        chs[0].poll(&mut |io| status = Some(io.status));
                        // Writes while the flush runs are not made durable by it.
                        if rng.below(2) == 0 {
                            let b = rng.below(CAMPAIGN_BLOCKS);
                            let data = pattern(rng.next(), BS);
                            assert_eq!(write(&mut chs[1], b, &data), OK, "{ctx}: racing write");
                        }
                    }
                    let done_before_cut = status;
                    ctl.power_cut();
                    let t0 = Instant::now();
                    while status.is_none() {
                        chs[0].poll(&mut |io| status = Some(io.status));
                        assert!(t0.elapsed() < Duration::from_secs(10), "{ctx}: flush lost");
                    }
                    ctl.power_on();
                    let got = read_all(&mut chs[0], &mut base, &ctx);
                    match done_before_cut {
                        Some(st) => {
                            assert_eq!(st, OK, "{ctx}: flush before the cut");
                            assert!(got == snapshot, "{ctx}: a completed flush was not durable");
                        }
                        None => {
                            assert_eq!(status, Some(POWER_LOSS), "{ctx}: flush across the cut");
                            let (mut old, mut new) = (false, false);
                            for b in 0..CAMPAIGN_BLOCKS {
                                let g = blk(&got, b);
                                assert!(
                                    g == blk(&durable, b) || g == blk(&snapshot, b),
                                    "{ctx}: block {b} is neither its durable nor its flushed value"
                                );
                                if blk(&durable, b) != blk(&snapshot, b) {
                                    old |= g == blk(&durable, b);
                                    new |= g == blk(&snapshot, b);
                                }
                            }
                            if old && new {
                                tally.partial_flushes += 1;
                            }
                            tally.cuts_mid_flush += 1;
                        }
                    }
                    durable.copy_from_slice(&got);
                    current.copy_from_slice(&got);
                    dirty.clear();
                    tally.cuts += 1;
                }
            }
        }
    }

    #[test]
    fn randomized_power_cuts_keep_exactly_the_durable_writes() {
        on_reactor(|| {
            let mut tally = Tally::default();
            for case in 0..250 {
                campaign_case(case, &mut tally);
            }
            assert!(tally.cuts >= 200, "only {} power cuts", tally.cuts);
            assert!(
                tally.cuts_mid_flush >= 50,
                "only {} cuts during a flush",
                tally.cuts_mid_flush
            );
            assert!(
                tally.partial_flushes > 0,
                "no cut ever landed in the middle of a write-back"
            );
        });
    }
}
