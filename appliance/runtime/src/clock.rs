//! Cheap timestamps for the data path.
//!
//! The data path stamps every I/O, so a timestamp must cost a few nanoseconds.
//! [`ticks`] reads the TSC; [`ticks_per_us`] is calibrated once per process
//! against the monotonic clock (about 20 ms, the first time it is asked).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use crate::sys::rdtsc as ticks;

static TICKS_PER_US: OnceLock<f64> = OnceLock::new();

/// TSC ticks per microsecond, calibrated against `Instant`.
pub fn ticks_per_us() -> f64 {
    *TICKS_PER_US.get_or_init(|| {
        let (t0, c0) = paired_reading();
        std::thread::sleep(Duration::from_millis(20));
        let (t1, c1) = paired_reading();
        let us = t1.duration_since(t0).as_secs_f64() * 1e6;
        ((c1.wrapping_sub(c0)) as f64 / us).max(1e-3)
    })
}

/// A TSC reading and the monotonic time it was taken at: the TSC is read
/// between two clock reads, and of a few tries the tightest pair is kept, so
/// a preemption between the reads (on a loaded machine, easily tens of
/// microseconds, a part in a thousand of the calibration) cannot skew it.
fn paired_reading() -> (Instant, u64) {
    let mut best: Option<(Duration, Instant, u64)> = None;
    for _ in 0..5 {
        let a = Instant::now();
        let c = ticks();
        let b = Instant::now();
        let width = b.duration_since(a);
        if best.as_ref().is_none_or(|(w, _, _)| width < *w) {
            best = Some((width, a + width / 2, c));
        }
    }
    let (_, t, c) = best.expect("at least one try");
    (t, c)
}

/// Converts a tick count to nanoseconds.
pub fn ticks_to_ns(t: u64) -> f64 {
    t as f64 * 1000.0 / ticks_per_us()
}

/// Converts a duration to ticks.
pub fn duration_to_ticks(d: Duration) -> u64 {
    (d.as_secs_f64() * 1e6 * ticks_per_us()) as u64
}
