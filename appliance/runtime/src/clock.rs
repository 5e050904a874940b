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
        let t0 = Instant::now();
        let c0 = ticks();
        std::thread::sleep(Duration::from_millis(20));
        let c1 = ticks();
        let us = t0.elapsed().as_secs_f64() * 1e6;
        ((c1.wrapping_sub(c0)) as f64 / us).max(1e-3)
    })
}

/// Converts a tick count to nanoseconds.
pub fn ticks_to_ns(t: u64) -> f64 {
    t as f64 * 1000.0 / ticks_per_us()
}

/// Converts a duration to ticks.
pub fn duration_to_ticks(d: Duration) -> u64 {
    (d.as_secs_f64() * 1e6 * ticks_per_us()) as u64
}
