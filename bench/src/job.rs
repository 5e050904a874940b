//! One core's benchmark job: a poller that keeps `queue_depth` I/Os in flight
//! on its own channel and stamps each one with the TSC.
//!
//! Every slot owns one buffer for the whole run, so the loop allocates
//! nothing. A pass of the poller reads the clock once, reaps every completion,
//! records each latency and resubmits the slot at once.

use std::cell::RefCell;
use std::rc::Rc;

use hdrhistogram::Histogram;
use hotcopy_bdev::{BdevChannel, BdevIo, IoStatus, IoType};
use hotcopy_runtime::{clock, DmaBuf};

use crate::{Workload, MAX_LATENCY_TICKS_SECS};

/// What one slot is doing (verify mode alternates write then read).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Io,
    VerifyWrite,
    VerifyRead,
}

struct Slot {
    buf: Option<DmaBuf>,
    start: u64,
    phase: Phase,
    unit: u64,
    seq: u64,
}

/// Results of one core, moved back to the caller when the job ends.
pub struct CoreOutcome {
    pub core: usize,
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub verify_mismatches: u64,
    pub first_mismatch: Option<String>,
    pub hist_ticks: Histogram<u64>,
    pub elapsed_ticks: u64,
}

pub struct JobSpec {
    pub core: usize,
    pub cores: usize,
    pub workload: Workload,
    pub read_pct: u32,
    pub io_blocks: u64,
    pub block_size: u64,
    pub num_blocks: u64,
    pub duration_ticks: u64,
    pub verify: bool,
    pub seed: u64,
}

pub struct Job {
    spec: JobSpec,
    ch: BdevChannel,
    slots: Vec<Slot>,
    done_slots: Vec<u32>,
    rng: u64,
    /// I/O units (io_size each) on the device.
    units: u64,
    /// Sequential cursor (in units) and this core's range of units.
    cursor: u64,
    range: (u64, u64),
    start_tick: u64,
    end_tick: u64,
    stopping: bool,
    finished: bool,
    out: CoreOutcome,
}

impl Job {
    pub fn new(spec: JobSpec, ch: BdevChannel, bufs: Vec<DmaBuf>) -> Result<Job, String> {
        let units = spec.num_blocks / spec.io_blocks;
        if units == 0 {
            return Err("the I/O size is larger than the bdev".into());
        }
        let qd = bufs.len() as u64;
        if spec.verify && units < qd * spec.cores as u64 {
            return Err(format!(
                "--verify needs at least {} I/O units (queue depth x cores) on the bdev, it has {units}",
                qd * spec.cores as u64
            ));
        }
        // Sequential workloads give each core its own slice of the device.
        let per = units / spec.cores as u64;
        let range = (per * spec.core as u64, per * (spec.core as u64 + 1));
        let slots = bufs
            .into_iter()
            .map(|b| Slot {
                buf: Some(b),
                start: 0,
                phase: Phase::Idle,
                unit: 0,
                seq: 0,
            })
            .collect::<Vec<_>>();
        let rng = spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (spec.core as u64 + 1);
        let hist = Histogram::new_with_bounds(
            1,
            (MAX_LATENCY_TICKS_SECS * clock::ticks_per_us() * 1e6) as u64,
            3,
        )
        .map_err(|e| e.to_string())?;
        let core = spec.core;
        Ok(Job {
            done_slots: Vec::with_capacity(slots.len()),
            slots,
            rng: rng | 1,
            units,
            cursor: range.0,
            range,
            start_tick: 0,
            end_tick: 0,
            stopping: false,
            finished: false,
            ch,
            spec,
            out: CoreOutcome {
                core,
                ios: 0,
                reads: 0,
                writes: 0,
                bytes: 0,
                errors: 0,
                verify_mismatches: 0,
                first_mismatch: None,
                hist_ticks: hist,
                elapsed_ticks: 0,
            },
        })
    }

    #[inline(always)]
    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform number in 0..n without a division.
    #[inline(always)]
    fn below(&mut self, n: u64) -> u64 {
        ((self.rand() as u128 * n as u128) >> 64) as u64
    }

    /// Starts the job: fills the queue.
    pub fn start(&mut self) {
        self.start_tick = clock::ticks();
        self.end_tick = self.start_tick + self.spec.duration_ticks;
        for i in 0..self.slots.len() {
            self.issue(i, self.start_tick);
        }
    }

    /// Picks the unit a slot works on next. In verify mode a slot only ever
    /// touches units congruent to its global index, so no two I/Os in flight
    /// overlap and a read sees exactly the slot's own last write.
    #[inline(always)]
    fn next_unit(&mut self, slot: usize) -> u64 {
        if self.spec.verify {
            let stride = self.slots.len() as u64 * self.spec.cores as u64;
            let me = (self.spec.core * self.slots.len() + slot) as u64;
            return me + stride * self.below(self.units / stride);
        }
        if self.spec.workload.is_random() {
            self.below(self.units)
        } else {
            let u = self.cursor;
            self.cursor += 1;
            if self.cursor >= self.range.1 {
                self.cursor = self.range.0;
            }
            u
        }
    }

    #[inline(always)]
    fn issue(&mut self, slot: usize, now: u64) {
        let unit = self.next_unit(slot);
        let is_read = if self.spec.verify {
            false
        } else {
            match self.spec.workload {
                Workload::Read | Workload::RandRead => true,
                Workload::Write | Workload::RandWrite => false,
                Workload::Rw | Workload::RandRw => (self.below(100) as u32) < self.spec.read_pct,
            }
        };
        let io_blocks = self.spec.io_blocks;
        let bs = self.spec.block_size;
        let s = &mut self.slots[slot];
        s.unit = unit;
        s.start = now;
        let mut buf = s.buf.take().expect("an idle slot holds its buffer");
        let io_type = if self.spec.verify {
            s.seq += 1;
            s.phase = Phase::VerifyWrite;
            fill_pattern(&mut buf, unit * io_blocks, s.seq, bs);
            IoType::Write
        } else {
            s.phase = Phase::Io;
            if is_read {
                IoType::Read
            } else {
                IoType::Write
            }
        };
        let mut io = BdevIo::new(io_type, unit * io_blocks, io_blocks, slot as u64);
        io.buf = Some(buf);
        self.ch.submit(io);
    }

    /// One poller pass. Returns the number of completions handled.
    ///
    /// Completions are handled inside the channel's callback: latency is
    /// recorded and the slot takes its buffer back; slots to restart are
    /// listed and resubmitted after the callback (the channel is busy in it).
    #[inline]
    pub fn poll(&mut self, now: u64) -> usize {
        if self.finished {
            return 0;
        }
        if now >= self.end_tick && !self.stopping {
            self.stopping = true;
            self.out.elapsed_ticks = now - self.start_tick;
        }
        let Job {
            ch,
            slots,
            out,
            spec,
            done_slots,
            ..
        } = self;
        // I/Os submitted in one pass and reaped in another share a latency:
        // record runs of equal values with one `record_n` (same histogram,
        // a fraction of the cost at high queue depth).
        let (mut run_lat, mut run_n) = (0u64, 0u64);
        let n = ch.poll(&mut |mut io| {
            let slot = io.token as usize;
            let s = &mut slots[slot];
            let lat = now.saturating_sub(s.start).max(1);
            if lat == run_lat {
                run_n += 1;
            } else {
                if run_n > 0 {
                    out.hist_ticks.saturating_record_n(run_lat, run_n);
                }
                (run_lat, run_n) = (lat, 1);
            }
            out.ios += 1;
            out.bytes += io.num_blocks * spec.block_size;
            if io.io_type == IoType::Read {
                out.reads += 1;
            } else {
                out.writes += 1;
            }
            if io.status != IoStatus::Success {
                out.errors += 1;
                s.phase = Phase::Idle;
            }
            let buf = io.buf.take().expect("read/write I/O returns its buffer");
            match s.phase {
                Phase::VerifyWrite => s.phase = Phase::VerifyRead,
                Phase::VerifyRead => {
                    if let Some(at) = check_pattern(&buf, io.offset_blocks, s.seq, spec.block_size) {
                        out.verify_mismatches += 1;
                        if out.first_mismatch.is_none() {
                            out.first_mismatch = Some(format!(
                                "core {} block {}: byte {} of the {}-byte I/O differs from what was written",
                                spec.core,
                                io.offset_blocks,
                                at,
                                buf.len()
                            ));
                        }
                    }
                    s.phase = Phase::Idle;
                }
                _ => s.phase = Phase::Idle,
            }
            s.buf = Some(buf);
            done_slots.push(slot as u32);
        });
        if run_n > 0 {
            self.out.hist_ticks.saturating_record_n(run_lat, run_n);
        }
        let mut restart = std::mem::take(&mut self.done_slots);
        for &slot in restart.iter() {
            let slot = slot as usize;
            if self.stopping {
                self.slots[slot].phase = Phase::Idle;
            } else if self.slots[slot].phase == Phase::VerifyRead {
                // Read back what was just written.
                let s = &mut self.slots[slot];
                s.start = now;
                let mut rio = BdevIo::new(
                    IoType::Read,
                    s.unit * self.spec.io_blocks,
                    self.spec.io_blocks,
                    slot as u64,
                );
                rio.buf = s.buf.take();
                self.ch.submit(rio);
            } else {
                self.issue(slot, now);
            }
        }
        restart.clear();
        self.done_slots = restart;
        if self.stopping && self.ch.inflight() == 0 {
            self.finished = true;
        }
        n
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Moves the results out (the job is finished; its poller may still hold it).
    pub fn take_outcome(&mut self) -> CoreOutcome {
        let empty = CoreOutcome {
            core: self.out.core,
            ios: 0,
            reads: 0,
            writes: 0,
            bytes: 0,
            errors: 0,
            verify_mismatches: 0,
            first_mismatch: None,
            hist_ticks: Histogram::new_from(&self.out.hist_ticks),
            elapsed_ticks: 0,
        };
        std::mem::replace(&mut self.out, empty)
    }
}

/// Fills `buf` with words derived from the block address and sequence number.
fn fill_pattern(buf: &mut [u8], first_block: u64, seq: u64, block_size: u64) {
    for (b, block) in buf.chunks_exact_mut(block_size as usize).enumerate() {
        let lba = first_block + b as u64;
        for (w, word) in block.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&pattern_word(lba, seq, w as u64).to_le_bytes());
        }
    }
}

/// Returns the byte offset of the first mismatch, if any.
fn check_pattern(buf: &[u8], first_block: u64, seq: u64, block_size: u64) -> Option<usize> {
    for (b, block) in buf.chunks_exact(block_size as usize).enumerate() {
        let lba = first_block + b as u64;
        for (w, word) in block.chunks_exact(8).enumerate() {
            let want = pattern_word(lba, seq, w as u64).to_le_bytes();
            if word != want {
                return Some(b * block_size as usize + w * 8);
            }
        }
    }
    None
}

#[inline(always)]
fn pattern_word(lba: u64, seq: u64, word: u64) -> u64 {
    let mut z = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.rotate_left(32) ^ word;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

/// A job shared with its poller closure.
pub type SharedJob = Rc<RefCell<Job>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_check_finds_the_first_changed_byte() {
        let mut buf = vec![0u8; 4096];
        fill_pattern(&mut buf, 80, 3, 512);
        assert_eq!(check_pattern(&buf, 80, 3, 512), None);
        assert_eq!(
            check_pattern(&buf, 81, 3, 512),
            Some(0),
            "another block's pattern"
        );
        assert_eq!(
            check_pattern(&buf, 80, 4, 512),
            Some(0),
            "a stale write's pattern"
        );
        buf[1500] ^= 1;
        assert_eq!(
            check_pattern(&buf, 80, 3, 512),
            Some(1496),
            "reported at word granularity"
        );
    }
}
