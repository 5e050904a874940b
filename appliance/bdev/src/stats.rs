//! Per-bdev I/O statistics: counters and latency percentiles for every bdev,
//! kept by the generic layer (SPDK's `bdev_get_iostat`), so every module gets
//! them without doing anything.
//!
//! # What is counted
//! Every I/O a [`BdevChannel`](crate::BdevChannel) hands back from `poll`:
//! successful completions by type ([`IoStats::ops`]), bytes read and written
//! by successful reads and writes, failed completions by type
//! ([`IoStats::errors`], including I/O the channel itself rejected), and the
//! latency of successful reads and of successful writes. Latency runs from
//! [`BdevChannel::submit`](crate::BdevChannel::submit) on this bdev's channel
//! to the `poll` of that channel that hands the I/O back (see "Clock reads"),
//! so in a stack each bdev shows its own latency: a `cow` bdev's includes the
//! time it held a write, its base's does not.
//!
//! # Where the submit time lives
//! In the [`BdevIo`] itself, which travels by value from submission to
//! completion: the I/O carries a small stack of submit timestamps, one per
//! channel it is in. A stacked module forwards the same `BdevIo` to its base,
//! so each channel pushes its timestamp in `submit` and pops it when the I/O
//! comes back through its `poll`. The stack holds [`STAMP_DEPTH`] entries: in
//! a stack of more bdevs than that, the innermost ones still count the I/O but
//! take no latency sample for it. An I/O a module completes with a different
//! `BdevIo` than it was given is counted, without a latency sample.
//!
//! # Shards
//! Each channel (one core's) writes its own shard: plain `AtomicU64`s,
//! updated with a relaxed load and a relaxed store (one writer, so no locked
//! read-modify-write), aligned to 128 bytes so that no other data shares its
//! cache lines. A shard is allocated when a channel is created and goes back
//! to the bdev's pool when the channel is dropped; the next channel reuses it
//! and keeps adding to it, so nothing counted is lost and the number of
//! shards is the largest number of channels ever open at once. Reading the
//! statistics (control path) takes the pool's lock and sums every shard;
//! values are read while channels keep writing, so counters read at one
//! instant may be one I/O apart.
//!
//! # Clock reads
//! The outermost `submit` running on a thread reads the clock
//! ([`hotcopy_runtime::clock::ticks`], the TSC) once; the submits it makes on
//! the way down a stack (a passthru forwarding to its base) stamp that same
//! value, kept in a thread-local, instead of reading it again. A channel's
//! `poll` reads the clock once per batch, at the first completion it times:
//! every I/O it hands back was submitted before the poll began, and the
//! batch shares that completion time, so the time the submitter spends on
//! the earlier completions of a batch does not count against the later ones
//! (the bench measures the same way). Per I/O that is one clock read plus one
//! per batch, the push and pop of the timestamp, one more indirect call on
//! the way back, and four relaxed load/store pairs on the completing core's
//! shard (ops, bytes, the histogram bucket and its sum) plus a load for the
//! maximum. No lock, no allocation, no syscall.
//!
//! # Histogram
//! Latencies are recorded in TSC ticks in a log-linear histogram: values
//! below 16 have a bucket each; above that, each power-of-two range
//! `[2^k, 2^(k+1))` is split into 16 equal buckets. That is [`BUCKETS`] = 976
//! buckets for the whole `u64` range, 7.6 KiB per histogram. A bucket at
//! `low` is at most `low / 16` wide, and a percentile is reported as the
//! midpoint of the bucket holding the value of that rank, capped at the
//! exact maximum: it is within **1/32 (3.1 %)** of the exact value of that
//! rank ([`Histogram::quantile`]). Converting ticks to microseconds adds the
//! TSC calibration's error (well under 1 %). The maximum is exact, the mean is
//! exact (sum of ticks over count); the sum of one shard wraps after 2^64
//! ticks of accumulated latency, over a year at queue depth 128 and 3 GHz.
//!
//! # Reset
//! [`Bdev::reset_io_stats`](crate::Bdev::reset_io_stats) takes a baseline of
//! every shard; reads subtract it. Counters, percentiles and the mean are then
//! as exact as before; the maximum since the reset is the exact maximum when
//! it was reached after the reset and the midpoint of the highest bucket
//! filled since the reset otherwise (within 1/32 of the true value).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hotcopy_runtime::clock;
use serde::Serialize;

use crate::io::{BdevIo, IoType};

/// How many nested channels' submit times one [`BdevIo`] carries. A stack of
/// four bdevs forwarding the same I/O (cow on passthru on fault on uring) is
/// the deepest the appliance builds; deeper stacks lose the innermost
/// latencies, not their counts.
pub const STAMP_DEPTH: usize = 4;

/// Values below `SUB` get one bucket each; every power-of-two range above is
/// split into `SUB` buckets, so a bucket is at most 1/16 of its lower bound
/// wide.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;

/// Buckets of a histogram over the whole `u64` range: 16 exact ones for
/// 0..16, then 16 per power of two from 2^4 to 2^63.
pub const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// The bucket that holds `v`.
#[inline]
pub fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    // v >= 16, so k >= SUB_BITS and `v >> shift` is in [SUB, 2 * SUB).
    let k = 63 - v.leading_zeros();
    let shift = k - SUB_BITS;
    ((shift as usize + 1) << SUB_BITS) + ((v >> shift) as usize & (SUB - 1))
}

/// The smallest value in bucket `i`.
pub fn bucket_low(i: usize) -> u64 {
    if i < SUB {
        i as u64
    } else {
        ((SUB + i % SUB) as u64) << (i / SUB - 1)
    }
}

/// How many values bucket `i` holds.
pub fn bucket_width(i: usize) -> u64 {
    if i < SUB {
        1
    } else {
        1 << (i / SUB - 1)
    }
}

/// The value reported for bucket `i`: its midpoint (rounded down).
fn bucket_mid(i: usize) -> u64 {
    bucket_low(i) + bucket_width(i) / 2
}

thread_local! {
    /// The submit time of the outermost [`BdevChannel::submit`] running on
    /// this thread, 0 outside one; see [`submit_tick`].
    ///
    /// [`BdevChannel::submit`]: crate::BdevChannel::submit
    static SUBMIT_TICK: Cell<u64> = const { Cell::new(0) };
}

/// Runs `f` with the submit time to stamp on an I/O: a fresh clock read in
/// the outermost `submit` on this thread, and the same value in every
/// `submit` it makes on the way down a stack (a passthru's base channel
/// stamps the time its parent read, nanoseconds earlier, instead of reading
/// the clock again).
#[inline]
pub(crate) fn submit_tick<R>(f: impl FnOnce(u64) -> R) -> R {
    let outer = SUBMIT_TICK.get();
    if outer != 0 {
        return f(outer);
    }
    /// Clears the tick when the outermost submit returns, or unwinds.
    struct Clear;
    impl Drop for Clear {
        #[inline]
        fn drop(&mut self) {
            SUBMIT_TICK.set(0);
        }
    }
    // 0 means "none": a TSC that reads 0 is taken as 1.
    let now = clock::ticks().max(1);
    SUBMIT_TICK.set(now);
    let _clear = Clear;
    f(now)
}

/// Adds `n` to a counter that only the calling thread writes: a relaxed
/// load and a relaxed store, not a locked read-modify-write.
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// The latency histogram inside a shard: one writer, any number of readers.
struct AtomicHistogram {
    /// Sum of the recorded values (wrapping), for the mean.
    sum: AtomicU64,
    max: AtomicU64,
    counts: [AtomicU64; BUCKETS],
}

impl AtomicHistogram {
    fn new() -> Self {
        AtomicHistogram {
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
            counts: [const { AtomicU64::new(0) }; BUCKETS],
        }
    }

    /// Records `v`. Only the shard's owner calls this.
    #[inline]
    fn record(&self, v: u64) {
        bump(&self.counts[bucket_of(v)], 1);
        bump(&self.sum, v);
        if v > self.max.load(Ordering::Relaxed) {
            self.max.store(v, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Histogram {
        let mut h = Histogram::new();
        for (d, c) in h.counts.iter_mut().zip(&self.counts) {
            *d = c.load(Ordering::Relaxed);
        }
        h.count = h.counts.iter().sum();
        h.sum = self.sum.load(Ordering::Relaxed) as u128;
        h.max = self.max.load(Ordering::Relaxed);
        h
    }
}

/// One channel's counters. Written only by the thread that owns the channel
/// (see the module docs); 128-byte aligned so that it shares no cache line
/// with anything another core writes (two lines: adjacent-line prefetch).
#[repr(C, align(128))]
pub(crate) struct IoShard {
    /// Successful completions, indexed by `IoType as usize`.
    ops: [AtomicU64; 5],
    /// Failed completions, indexed by `IoType as usize`.
    errors: [AtomicU64; 5],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Latency in ticks of successful reads (0) and writes (1).
    lat: [AtomicHistogram; 2],
}

impl IoShard {
    fn new() -> Self {
        IoShard {
            ops: [const { AtomicU64::new(0) }; 5],
            errors: [const { AtomicU64::new(0) }; 5],
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            lat: [AtomicHistogram::new(), AtomicHistogram::new()],
        }
    }

    /// Counts a failed I/O (the channel's validation calls it directly).
    #[inline]
    pub(crate) fn error(&self, io_type: IoType) {
        bump(&self.errors[io_type as usize], 1);
    }

    /// Counts a completion and pops its submit time; see the module docs.
    /// `now` is the completion time of the poll batch, read on first need
    /// (0 until then).
    #[inline]
    pub(crate) fn complete(&self, io: &mut BdevIo, block_size: u64, now: &mut u64) {
        let submitted = io.pop_stamp();
        if !io.status.is_success() {
            self.error(io.io_type);
            return;
        }
        bump(&self.ops[io.io_type as usize], 1);
        let (bytes, hist) = match io.io_type {
            IoType::Read => (&self.bytes_read, &self.lat[0]),
            IoType::Write => (&self.bytes_written, &self.lat[1]),
            _ => return,
        };
        bump(bytes, io.num_blocks.wrapping_mul(block_size));
        if let Some(t0) = submitted {
            if *now == 0 {
                *now = clock::ticks();
            }
            hist.record(now.saturating_sub(t0));
        }
    }

    fn snapshot(&self) -> ShardSnapshot {
        let load = |a: &[AtomicU64; 5]| a.each_ref().map(|c| c.load(Ordering::Relaxed));
        ShardSnapshot {
            ops: load(&self.ops),
            errors: load(&self.errors),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            lat: [self.lat[0].snapshot(), self.lat[1].snapshot()],
        }
    }
}

/// A latency histogram in plain integers: the merge of shards, and what
/// percentiles are computed from (control path). See the module docs for the
/// bucket layout and the error bound.
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("sum", &self.sum)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            max: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.count += 1;
        self.sum += v as u128;
        self.max = self.max.max(v);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded (exact), `None` when empty.
    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    /// The exact mean, `None` when empty.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// The value of rank `ceil(q * count)` (at least 1) for `q` in `0..=1`,
    /// within 1/32 of the exact value of that rank: the midpoint of the
    /// bucket holding it, capped at the maximum; the top rank is the exact
    /// maximum. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        if rank == self.count {
            return Some(self.max);
        }
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_mid(i).min(self.max));
            }
        }
        // The shard was read while being written: counts summed to less than
        // `count` said. The top of the distribution is the maximum.
        Some(self.max)
    }

    /// The values recorded since `base` was taken from the same source
    /// (see "Reset" in the module docs).
    fn since(&self, base: &Histogram) -> Histogram {
        let mut h = Histogram::new();
        for ((d, a), b) in h
            .counts
            .iter_mut()
            .zip(self.counts.iter())
            .zip(base.counts.iter())
        {
            *d = a.saturating_sub(*b);
        }
        h.count = h.counts.iter().sum();
        // A shard's sum is a wrapping u64: subtract modulo 2^64.
        h.sum = (self.sum as u64).wrapping_sub(base.sum as u64) as u128;
        h.max = match h.counts.iter().rposition(|&c| c > 0) {
            None => 0,
            Some(top)
                if (bucket_low(top)..=bucket_low(top) + (bucket_width(top) - 1))
                    .contains(&self.max) =>
            {
                self.max
            }
            Some(top) => bucket_mid(top),
        };
        h
    }

    /// The summary in microseconds, given the TSC rate.
    fn summary_us(&self, ticks_per_us: f64) -> LatencySummary {
        let us = |t: u64| round_ns(t as f64 / ticks_per_us);
        LatencySummary {
            count: self.count,
            mean: self.mean().map(|t| round_ns(t / ticks_per_us)),
            p50: self.quantile(0.50).map(us),
            p90: self.quantile(0.90).map(us),
            p99: self.quantile(0.99).map(us),
            p999: self.quantile(0.999).map(us),
            max: self.max().map(us),
        }
    }
}

/// Microseconds to three decimals (nanoseconds): finer is noise.
fn round_ns(us: f64) -> f64 {
    (us * 1000.0).round() / 1000.0
}

/// One shard read at one time, in plain integers.
#[derive(Clone, Default)]
struct ShardSnapshot {
    ops: [u64; 5],
    errors: [u64; 5],
    bytes_read: u64,
    bytes_written: u64,
    lat: [Histogram; 2],
}

impl ShardSnapshot {
    fn since(&self, base: &ShardSnapshot) -> ShardSnapshot {
        let sub = |a: &[u64; 5], b: &[u64; 5]| std::array::from_fn(|i| a[i].wrapping_sub(b[i]));
        ShardSnapshot {
            ops: sub(&self.ops, &base.ops),
            errors: sub(&self.errors, &base.errors),
            bytes_read: self.bytes_read.wrapping_sub(base.bytes_read),
            bytes_written: self.bytes_written.wrapping_sub(base.bytes_written),
            lat: [
                self.lat[0].since(&base.lat[0]),
                self.lat[1].since(&base.lat[1]),
            ],
        }
    }

    fn merge(&mut self, other: &ShardSnapshot) {
        for i in 0..5 {
            self.ops[i] += other.ops[i];
            self.errors[i] += other.errors[i];
        }
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.lat[0].merge(&other.lat[0]);
        self.lat[1].merge(&other.lat[1]);
    }
}

struct PoolEntry {
    shard: Arc<IoShard>,
    /// The shard as it was at the last reset.
    baseline: Option<ShardSnapshot>,
}

#[derive(Default)]
struct PoolInner {
    entries: Vec<PoolEntry>,
    /// Entries whose channel was dropped, ready for the next channel.
    free: Vec<usize>,
}

/// Every shard of one bdev. Control path: it takes a lock, when a channel is
/// created or dropped and when statistics are read.
#[derive(Default)]
pub(crate) struct StatsPool {
    inner: Mutex<PoolInner>,
}

impl StatsPool {
    fn lock(&self) -> MutexGuard<'_, PoolInner> {
        // Plain counters behind it: a panic elsewhere leaves them usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A shard for a new channel: a free one, else a new one.
    pub(crate) fn acquire(self: &Arc<Self>) -> ShardHandle {
        {
            let mut inner = self.lock();
            if let Some(idx) = inner.free.pop() {
                let shard = inner.entries[idx].shard.clone();
                return ShardHandle {
                    pool: self.clone(),
                    idx,
                    shard,
                };
            }
        }
        // Allocated outside the lock: 16 KiB, zeroed.
        let shard = Arc::new(IoShard::new());
        let mut inner = self.lock();
        inner.entries.push(PoolEntry {
            shard: shard.clone(),
            baseline: None,
        });
        ShardHandle {
            pool: self.clone(),
            idx: inner.entries.len() - 1,
            shard,
        }
    }

    /// The sum of every shard since the last reset, and how many channels
    /// are open.
    fn totals(&self) -> (ShardSnapshot, usize) {
        let inner = self.lock();
        let mut total = ShardSnapshot::default();
        for e in &inner.entries {
            let s = e.shard.snapshot();
            match &e.baseline {
                Some(b) => total.merge(&s.since(b)),
                None => total.merge(&s),
            }
        }
        (total, inner.entries.len() - inner.free.len())
    }

    /// [`IoStats`] since the bdev was created or last reset.
    pub(crate) fn read(&self) -> IoStats {
        let (total, open) = self.totals();
        IoStats::from_totals(&total, open, clock::ticks_per_us())
    }

    /// Makes every count start again from zero (see the module docs).
    pub(crate) fn reset(&self) {
        let mut inner = self.lock();
        for e in &mut inner.entries {
            e.baseline = Some(e.shard.snapshot());
        }
    }
}

/// A channel's hold on its shard; gives it back to the pool on drop.
pub(crate) struct ShardHandle {
    pool: Arc<StatsPool>,
    idx: usize,
    shard: Arc<IoShard>,
}

impl ShardHandle {
    #[inline]
    pub(crate) fn shard(&self) -> &IoShard {
        &self.shard
    }
}

impl Drop for ShardHandle {
    fn drop(&mut self) {
        // The lock orders this channel's last stores before the next owner's
        // first loads, so the shard keeps a single writer at every moment.
        self.pool.lock().free.push(self.idx);
    }
}

/// Counts by I/O type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpCounts {
    pub read: u64,
    pub write: u64,
    pub flush: u64,
    pub unmap: u64,
    pub write_zeroes: u64,
}

impl OpCounts {
    fn from_array(a: [u64; 5]) -> Self {
        OpCounts {
            read: a[IoType::Read as usize],
            write: a[IoType::Write as usize],
            flush: a[IoType::Flush as usize],
            unmap: a[IoType::Unmap as usize],
            write_zeroes: a[IoType::WriteZeroes as usize],
        }
    }

    pub fn total(&self) -> u64 {
        self.read + self.write + self.flush + self.unmap + self.write_zeroes
    }
}

/// Latency of one kind of I/O, in microseconds. Percentiles are within 1/32
/// of the exact value (see the module docs); every field but `count` is
/// `None` (JSON `null`) when nothing was measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// I/Os measured.
    pub count: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

/// Read and write latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latencies {
    pub read: LatencySummary,
    pub write: LatencySummary,
}

/// A bdev's I/O statistics since it was created or last reset: what
/// [`Bdev::io_stats`](crate::Bdev::io_stats) returns. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IoStats {
    /// Successful completions by type.
    pub ops: OpCounts,
    /// Failed completions by type, including I/O the channel rejected.
    pub errors: OpCounts,
    /// Bytes moved by successful reads and writes.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Latency of successful reads and writes, from submission at this
    /// bdev's channel to completion.
    pub latency_us: Latencies,
    /// Channels open on the bdev now.
    pub channels: usize,
}

impl IoStats {
    fn from_totals(t: &ShardSnapshot, channels: usize, ticks_per_us: f64) -> Self {
        IoStats {
            ops: OpCounts::from_array(t.ops),
            errors: OpCounts::from_array(t.errors),
            bytes_read: t.bytes_read,
            bytes_written: t.bytes_written,
            latency_us: Latencies {
                read: t.lat[0].summary_us(ticks_per_us),
                write: t.lat[1].summary_us(ticks_per_us),
            },
            channels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The exact value of rank `ceil(q * n)` (at least 1) of `sorted`.
    fn exact(sorted: &[u64], q: f64) -> u64 {
        let n = sorted.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        sorted[rank as usize - 1]
    }

    const QS: [f64; 7] = [0.0, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0];

    /// Every quantile of `values` is within 1/32 of the exact one.
    fn check_bound(values: &[u64]) {
        let mut h = Histogram::new();
        for &v in values {
            h.record(v);
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        for q in QS {
            let want = exact(&sorted, q);
            let got = h.quantile(q).unwrap();
            let err = got.abs_diff(want);
            assert!(
                err <= want / 32,
                "q {q}: got {got}, exact {want}: error {err} > {}",
                want / 32
            );
        }
        assert_eq!(h.max(), sorted.last().copied());
        assert_eq!(h.quantile(1.0), sorted.last().copied(), "p100 is the max");
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        assert!((h.mean().unwrap() - mean).abs() <= mean * 1e-12);
    }

    #[test]
    fn buckets_tile_the_u64_range_with_widths_of_at_most_a_sixteenth() {
        // Every bucket starts where the previous one ends.
        assert_eq!(bucket_low(0), 0);
        for i in 1..BUCKETS {
            assert_eq!(
                bucket_low(i),
                bucket_low(i - 1) + bucket_width(i - 1),
                "bucket {i}"
            );
        }
        let last = BUCKETS - 1;
        assert_eq!(
            bucket_low(last).checked_add(bucket_width(last) - 1),
            Some(u64::MAX),
            "the last bucket ends at u64::MAX"
        );
        for i in SUB..BUCKETS {
            assert!(bucket_width(i) * 16 <= bucket_low(i), "bucket {i}");
        }
        // Values land in the bucket whose range holds them, edges included.
        let mut probes = vec![0, 1, 15, 16, 17, 31, 32, 33, u64::MAX];
        for k in 4..64 {
            probes.extend([(1u64 << k) - 1, 1 << k, (1 << k) + 1, 3 << (k - 1)]);
        }
        for v in probes {
            let b = bucket_of(v);
            assert!(b < BUCKETS);
            assert!(
                bucket_low(b) <= v && v - bucket_low(b) < bucket_width(b),
                "{v} in bucket {b} = [{}, +{})",
                bucket_low(b),
                bucket_width(b)
            );
        }
    }

    #[test]
    fn an_empty_histogram_has_no_percentiles() {
        let h = Histogram::new();
        assert_eq!(h.count(), 0);
        assert_eq!((h.quantile(0.5), h.max(), h.mean()), (None, None, None));
        let s = h.summary_us(1000.0);
        assert_eq!(s, LatencySummary::default());
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["count"], 0);
        assert!(json["p99"].is_null() && json["max"].is_null(), "{json}");
    }

    #[test]
    fn small_values_are_exact() {
        let values: Vec<u64> = (0..32).collect();
        let mut h = Histogram::new();
        for &v in &values {
            h.record(v);
        }
        // Below 32 every bucket is one value wide.
        for q in QS {
            assert_eq!(h.quantile(q), Some(exact(&values, q)), "q {q}");
        }
    }

    #[test]
    fn percentiles_of_known_distributions_are_within_a_thirty_second() {
        // Uniform over 1..=1e6.
        let uniform: Vec<u64> = (1..=1_000_000).collect();
        check_bound(&uniform);
        let mut h = Histogram::new();
        uniform.iter().for_each(|&v| h.record(v));
        let p50 = h.quantile(0.5).unwrap();
        assert!((484_375..=515_625).contains(&p50), "p50 {p50}");

        // Exponential-like (a latency distribution): xorshift, inverse CDF.
        let mut x = 0x1234_5678_9abc_def1u64;
        let expo: Vec<u64> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                (-(1.0 - u).ln() * 30_000.0) as u64 + 2_000
            })
            .collect();
        check_bound(&expo);

        // Bimodal with a far tail: 99% fast, 0.9% slow, 0.1% stuck.
        let mut bimodal = Vec::new();
        for i in 0..100_000u64 {
            bimodal.push(match i % 1000 {
                0 => 3_000_000_000 + i,
                1..=9 => 900_000 + i,
                _ => 5_000 + i % 700,
            });
        }
        check_bound(&bimodal);

        // One value, and values at the top of the range.
        check_bound(&[42_000]);
        check_bound(&[u64::MAX, u64::MAX - 1, 1 << 63, 0]);
    }

    proptest! {
        #[test]
        fn the_bound_holds_for_any_values(
            values in prop::collection::vec(
                prop_oneof![0u64..64, 0u64..100_000, 0u64..u64::MAX >> 20, any::<u64>()],
                1..400,
            )
        ) {
            check_bound(&values);
        }
    }

    #[test]
    fn nested_submits_share_the_outermost_tick_until_it_returns_or_unwinds() {
        let (outer, inner) = submit_tick(|t| (t, submit_tick(|u| u)));
        assert_eq!(outer, inner, "a submit inside a submit reuses its tick");
        assert_eq!(SUBMIT_TICK.get(), 0, "cleared on return");
        let later = submit_tick(|t| t);
        assert!(later >= outer, "a new outermost submit reads the clock");
        let r = std::panic::catch_unwind(|| submit_tick(|_| panic!("module bug")));
        assert!(r.is_err());
        assert_eq!(SUBMIT_TICK.get(), 0, "cleared on unwind");
    }

    fn fill(shard: &IoShard, values: impl Iterator<Item = u64>) {
        for v in values {
            shard.lat[0].record(v);
        }
    }

    #[test]
    fn merged_shards_equal_one_histogram_of_everything() {
        let (a, b) = (IoShard::new(), IoShard::new());
        let mut all = Histogram::new();
        fill(&a, (0..5_000).map(|i| i * 37 + 100));
        fill(&b, (0..3_000).map(|i| i * 1_013 + 7));
        (0..5_000).for_each(|i| all.record(i * 37 + 100));
        (0..3_000).for_each(|i| all.record(i * 1_013 + 7));
        let mut merged = a.snapshot();
        merged.merge(&b.snapshot());
        assert_eq!(merged.lat[0], all);
        assert_eq!(merged.lat[0].count(), 8_000);
        assert_eq!(merged.lat[0].max(), Some(2_999 * 1_013 + 7));
        for q in QS {
            assert_eq!(merged.lat[0].quantile(q), all.quantile(q));
        }
        assert_eq!(merged.lat[1].count(), 0, "writes untouched");
    }

    #[test]
    fn a_reset_starts_every_figure_again() {
        let pool = Arc::new(StatsPool::default());
        let h = pool.acquire();
        fill(h.shard(), [1_000_000, 2_000, 3_000].into_iter());
        bump(&h.shard().ops[0], 3);
        bump(&h.shard().bytes_read, 3 * 4096);
        // Push the sum to just below 2^64, so that it wraps after the reset.
        bump(&h.shard().lat[0].sum, u64::MAX - 100 - 1_005_000);
        pool.reset();
        let (t, _) = pool.totals();
        assert_eq!((t.ops[0], t.bytes_read, t.lat[0].count()), (0, 0, 0));
        assert_eq!(t.lat[0].max(), None);
        // After the reset the old maximum (1e6) must not show, and the mean
        // must not notice that the sum wrapped.
        fill(h.shard(), [4_000, 5_000].into_iter());
        let (t, _) = pool.totals();
        assert_eq!(t.lat[0].count(), 2);
        assert_eq!(t.lat[0].mean(), Some(4_500.0));
        let max = t.lat[0].max().unwrap();
        assert!(max.abs_diff(5_000) <= 5_000 / 32, "max since reset {max}");
        assert!(t.lat[0].quantile(0.99).unwrap() <= max);
        // A new maximum after the reset is exact.
        fill(h.shard(), [7_777_777].into_iter());
        let (t, _) = pool.totals();
        assert_eq!(t.lat[0].max(), Some(7_777_777));
        assert_eq!(t.lat[0].quantile(1.0), Some(7_777_777));
        assert_eq!(t.lat[0].quantile(0.5), Some(bucket_mid(bucket_of(5_000))));
    }

    #[test]
    fn a_dropped_channels_shard_is_reused_and_keeps_its_counts() {
        let pool = Arc::new(StatsPool::default());
        let a = pool.acquire();
        let b = pool.acquire();
        bump(&a.shard().ops[1], 5);
        bump(&b.shard().ops[1], 7);
        assert_eq!(pool.read().channels, 2);
        drop(a);
        assert_eq!(pool.read().channels, 1);
        assert_eq!(pool.read().ops.write, 12, "a closed channel's counts stay");
        let c = pool.acquire();
        assert_eq!(pool.lock().entries.len(), 2, "the free shard was reused");
        bump(&c.shard().ops[1], 1);
        assert_eq!(pool.read().ops.write, 13);
        assert_eq!(pool.read().channels, 2);
        drop((b, c));
    }
}

/// The statistics through real channels: a malloc bdev driven from two
/// reactors, and stacks whose layers must each time their own part.
#[cfg(test)]
mod channel_tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use hotcopy_runtime::{clock, DmaBuf, IdlePolicy, Runtime, RuntimeConfig};

    use crate::bdev::{deliver, BackendChannel, BdevBackend, BdevChannel, BdevDesc, BdevInfo};
    use crate::modules::{malloc, passthru};
    use crate::testing::{self, run_io};
    use crate::{
        Bdev, BdevError, BdevIo, BdevRegistry, Claim, IoError, IoStats, IoStatus, LatencySummary,
    };

    const BS: u64 = 512;

    /// A virtual bdev that holds each I/O for `hold` before passing it to its
    /// base (so the time is spent *before* the base's submit), or fails every
    /// write without passing it on.
    struct Delay {
        base: BdevDesc,
        _claim: Claim,
        hold_ticks: u64,
        fail_writes: bool,
    }

    struct DelayChannel {
        base: BdevChannel,
        hold_ticks: u64,
        fail_writes: bool,
        held: VecDeque<(u64, BdevIo)>,
        failed: VecDeque<BdevIo>,
    }

    impl BdevBackend for Delay {
        fn supports(&self, io_type: crate::IoType) -> bool {
            self.base.bdev().supports(io_type)
        }

        fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
            Ok(Box::new(DelayChannel {
                base: self.base.channel()?,
                hold_ticks: self.hold_ticks,
                fail_writes: self.fail_writes,
                held: VecDeque::new(),
                failed: VecDeque::new(),
            }))
        }
    }

    impl BackendChannel for DelayChannel {
        fn submit(&mut self, io: BdevIo) {
            if self.fail_writes && io.io_type == crate::IoType::Write {
                self.failed
                    .push_back(io.complete(IoStatus::Failed(IoError::Device(5))));
            } else {
                self.held.push_back((clock::ticks() + self.hold_ticks, io));
            }
        }

        fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
            let now = clock::ticks();
            while self.held.front().is_some_and(|(at, _)| *at <= now) {
                let (_, io) = self.held.pop_front().expect("front checked");
                self.base.submit(io);
            }
            deliver(&mut self.failed, done) + self.base.poll(done)
        }
    }

    fn delay(reg: &BdevRegistry, name: &str, base: &str, hold: Duration, fail: bool) -> Bdev {
        let claim = reg.lookup(base).unwrap().claim(name).unwrap();
        let b = claim.bdev().info().clone();
        reg.register(
            BdevInfo::new(name, "delay", b.block_size, b.num_blocks),
            Delay {
                base: claim.open(),
                _claim: claim,
                hold_ticks: clock::duration_to_ticks(hold),
                fail_writes: fail,
            },
        )
        .unwrap()
    }

    fn write_io(off: u64, token: u64) -> BdevIo {
        BdevIo::write(off, 8, DmaBuf::from_slice(&[7; 4096]).unwrap(), token)
    }

    fn read_io(off: u64, token: u64) -> BdevIo {
        BdevIo::read(off, 8, DmaBuf::alloc(4096).unwrap(), token)
    }

    /// p50 <= p90 <= p99 <= p99.9 <= max, all present and positive, mean
    /// within (0, max].
    #[track_caller]
    fn assert_ordered(l: &LatencySummary) {
        let v = [l.p50, l.p90, l.p99, l.p999, l.max].map(|x| x.expect("measured"));
        assert!(v[0] > 0.0, "{l:?}");
        assert!(v.windows(2).all(|w| w[0] <= w[1]), "{l:?}");
        let mean = l.mean.expect("measured");
        assert!(mean > 0.0 && mean <= v[4], "{l:?}");
    }

    fn stats(reg: &BdevRegistry, name: &str) -> IoStats {
        reg.lookup(name).unwrap().io_stats()
    }

    #[test]
    fn a_malloc_bdev_driven_from_two_reactors_counts_every_io() {
        let reg = BdevRegistry::new();
        let bdev = malloc::create(&reg, "m0", 4 << 20, BS as u32).unwrap();
        assert_eq!(bdev.io_stats(), IoStats::default(), "nothing yet");
        let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::SLEEP)).unwrap();
        // (writes, reads) per reactor.
        let plan = [(100u64, 50u64), (30, 70)];
        let open = rt
            .exec_all(move |core| {
                let (writes, reads) = plan[core];
                let mut ch = bdev.open(true).unwrap().channel().unwrap();
                let base = core as u64 * 2048;
                for i in 0..writes {
                    let io = run_io(&mut ch, write_io(base + i % 64 * 8, i));
                    assert_eq!(io.status, IoStatus::Success);
                }
                for i in 0..reads {
                    assert_eq!(
                        run_io(&mut ch, read_io(base + i % 64 * 8, i)).status,
                        IoStatus::Success
                    );
                }
                for _ in 0..2 {
                    assert!(testing::flush(&mut ch).is_success());
                }
                for _ in 0..3 {
                    assert!(testing::unmap(&mut ch, base, 16).is_success());
                }
                assert!(testing::write_zeroes(&mut ch, base, 8).is_success());
                // Rejected by the channel (beyond the end): an error.
                let io = run_io(&mut ch, read_io(8192 - 4, 99));
                assert_eq!(io.status, IoStatus::Failed(IoError::OutOfRange));
                let open = bdev.io_stats().channels;
                drop(ch);
                open
            })
            .unwrap();
        assert!(open.iter().all(|&n| (1..=2).contains(&n)), "{open:?}");
        let bdev = reg.lookup("m0").unwrap();
        let s = bdev.io_stats();
        assert_eq!(s.channels, 0, "both channels are closed");
        assert_eq!(
            (
                s.ops.write,
                s.ops.read,
                s.ops.flush,
                s.ops.unmap,
                s.ops.write_zeroes
            ),
            (130, 120, 4, 6, 2)
        );
        assert_eq!(s.errors.read, 2);
        assert_eq!(s.errors.total(), 2);
        assert_eq!((s.bytes_written, s.bytes_read), (130 * 4096, 120 * 4096));
        assert_eq!(s.latency_us.write.count, 130);
        assert_eq!(s.latency_us.read.count, 120);
        assert_ordered(&s.latency_us.write);
        assert_ordered(&s.latency_us.read);

        // The JSON the daemon shows.
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["ops"]["write_zeroes"], 2);
        assert_eq!(j["latency_us"]["read"]["count"], 120);
        assert!(
            j["latency_us"]["write"]["p999"].as_f64().unwrap() > 0.0,
            "{j}"
        );

        // A reset starts from zero; what follows counts.
        bdev.reset_io_stats();
        assert_eq!(bdev.io_stats(), IoStats::default());
        let b = bdev.clone();
        rt.exec(1, move || {
            let mut ch = b.open(true).unwrap().channel().unwrap();
            assert!(testing::write(&mut ch, 0, &[1; 1024]).is_success());
        })
        .unwrap();
        let s = bdev.io_stats();
        assert_eq!((s.ops.write, s.bytes_written, s.ops.read), (1, 1024, 0));
        assert_eq!(s.latency_us.write.count, 1);
        assert_eq!(s.latency_us.write.p50, s.latency_us.write.max);
        rt.shutdown();
    }

    #[test]
    fn each_bdev_of_a_stack_times_its_own_part() {
        // top (passthru) -> slow (holds 2 ms before its base) -> m0 (malloc)
        let reg = BdevRegistry::new();
        malloc::create(&reg, "m0", 1 << 20, BS as u32).unwrap();
        delay(&reg, "slow", "m0", Duration::from_millis(2), false);
        passthru::create(&reg, "top", "slow").unwrap();
        let mut ch = reg.open("top", true).unwrap().channel().unwrap();
        for i in 0..20 {
            assert!(run_io(&mut ch, write_io(i * 8, i)).status.is_success());
            assert!(run_io(&mut ch, read_io(i * 8, i)).status.is_success());
        }
        let (top, slow, m0) = (stats(&reg, "top"), stats(&reg, "slow"), stats(&reg, "m0"));
        for s in [&top, &slow, &m0] {
            assert_eq!((s.ops.write, s.ops.read), (20, 20));
            assert_eq!((s.bytes_written, s.bytes_read), (20 * 4096, 20 * 4096));
            assert_eq!(
                (s.latency_us.write.count, s.latency_us.read.count),
                (20, 20)
            );
        }
        for (t, s, m) in [
            (
                top.latency_us.write,
                slow.latency_us.write,
                m0.latency_us.write,
            ),
            (
                top.latency_us.read,
                slow.latency_us.read,
                m0.latency_us.read,
            ),
        ] {
            // The 2 ms are spent above m0's submit: the two upper bdevs show
            // them (less the histogram's 1/32 and the clock calibration's
            // error), m0 does not (it completes on its next poll).
            assert!(
                t.p50.unwrap() >= 1900.0 && s.p50.unwrap() >= 1900.0,
                "{t:?} {s:?}"
            );
            assert!(m.p50.unwrap() < 1000.0, "m0 {m:?}");
            // Each I/O's time at an outer bdev contains its time at the
            // inner one.
            assert!(t.mean >= s.mean && s.mean >= m.mean, "{t:?} {s:?} {m:?}");
            assert!(t.max >= s.max && s.max >= m.max, "{t:?} {s:?} {m:?}");
            assert!(t.p99 >= s.p99 && s.p99 >= m.p99, "{t:?} {s:?} {m:?}");
        }
    }

    #[test]
    fn failed_io_counts_as_errors_with_no_latency() {
        let reg = BdevRegistry::new();
        malloc::create(&reg, "m0", 1 << 20, BS as u32).unwrap();
        delay(&reg, "bad", "m0", Duration::ZERO, true);
        passthru::create(&reg, "top", "bad").unwrap();
        let mut ch = reg.open("top", true).unwrap().channel().unwrap();
        for i in 0..5 {
            let io = run_io(&mut ch, write_io(i * 8, i));
            assert_eq!(io.status, IoStatus::Failed(IoError::Device(5)));
        }
        assert!(run_io(&mut ch, read_io(0, 9)).status.is_success());
        for name in ["top", "bad"] {
            let s = stats(&reg, name);
            assert_eq!(
                (s.errors.write, s.ops.write, s.bytes_written),
                (5, 0, 0),
                "{name}"
            );
            assert_eq!(s.latency_us.write, LatencySummary::default(), "{name}");
            assert_eq!((s.ops.read, s.latency_us.read.count), (1, 1), "{name}");
        }
        let m0 = stats(&reg, "m0");
        assert_eq!((m0.errors.total(), m0.ops.write, m0.ops.read), (0, 0, 1));
    }

    #[test]
    fn a_stack_deeper_than_the_stamps_counts_all_and_times_the_outer_four() {
        // p5 -> p4 -> p3 -> p2 -> p1 -> m0: six channels per I/O.
        let reg = BdevRegistry::new();
        malloc::create(&reg, "m0", 1 << 20, BS as u32).unwrap();
        let mut below = "m0".to_string();
        for i in 1..=5 {
            let name = format!("p{i}");
            passthru::create(&reg, &name, &below).unwrap();
            below = name;
        }
        let mut ch = reg.open("p5", true).unwrap().channel().unwrap();
        // One BdevIo reused for every write: its stamps must come back empty.
        let mut io = write_io(0, 1);
        for _ in 0..10 {
            io = run_io(&mut ch, io);
            assert!(io.status.is_success());
            io.status = IoStatus::Pending;
        }
        for name in ["p5", "p4", "p3", "p2", "p1", "m0"] {
            let s = stats(&reg, name);
            assert_eq!(s.ops.write, 10, "{name}");
            let timed = if ["p1", "m0"].contains(&name) { 0 } else { 10 };
            assert_eq!(s.latency_us.write.count, timed, "{name}");
        }
    }
}
