//! # hotcopy-bench
//!
//! A benchmark modelled on SPDK's bdevperf. One job per reactor: each opens
//! its own channel on the bdev, keeps `queue_depth` I/Os in flight, stamps
//! them with the TSC and records every latency in an hdrhistogram. The
//! per-core histograms are merged for the totals.
//!
//! * Random workloads pick uniformly over the whole bdev; sequential ones give
//!   each core its own slice and walk it.
//! * `verify` writes a pattern derived from block address and a sequence
//!   number, reads it back and compares; each I/O slot owns its own set of
//!   units so no two I/Os in flight overlap. A mismatch fails the run.
//! * Memory: one buffer per slot, allocated from a pool before the run; the
//!   histograms have fixed bounds. Nothing grows with run length.

pub mod cow;
mod job;
pub mod plot;
pub mod repo;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use hdrhistogram::Histogram;
use hotcopy_bdev::{BdevDesc, BdevRegistry, IoType};
use hotcopy_runtime::{clock, sys, BufferPool, HugepageMode, PollStatus, Poller, Runtime};
use serde::Serialize;

use job::{CoreOutcome, Job, JobSpec};

/// Latencies above this are clamped in the histogram.
pub const MAX_LATENCY_TICKS_SECS: f64 = 60.0;

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
    RandRw,
}

impl Workload {
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Workload::Read,
            "write" => Workload::Write,
            "randread" => Workload::RandRead,
            "randwrite" => Workload::RandWrite,
            "rw" => Workload::Rw,
            "randrw" => Workload::RandRw,
            other => {
                return Err(format!(
                    "unknown workload {other:?}: use read, write, randread, randwrite, rw or randrw"
                ))
            }
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchParams {
    pub bdev: String,
    pub queue_depth: usize,
    pub io_size: usize,
    pub workload: Workload,
    /// Share of reads in percent, for `rw` and `randrw`.
    pub read_pct: u32,
    pub duration: Duration,
    pub verify: bool,
    pub seed: u64,
    pub hugepages: HugepageMode,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Bdev(#[from] hotcopy_bdev::BdevError),
    #[error("invalid parameters: {0}")]
    Params(String),
    #[error("buffer pool: {0}")]
    Pool(#[from] hotcopy_runtime::PoolError),
    #[error("reactor stopped during the run")]
    Reactor,
    #[error("core {core}: {why}")]
    Job { core: usize, why: String },
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Latency {
    pub avg: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn from_ticks(h: &Histogram<u64>) -> Latency {
        let us = |t: f64| t / clock::ticks_per_us();
        if h.is_empty() {
            return Latency {
                avg: 0.0,
                p50: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            };
        }
        Latency {
            avg: us(h.mean()),
            p50: us(h.value_at_quantile(0.50) as f64),
            p99: us(h.value_at_quantile(0.99) as f64),
            p999: us(h.value_at_quantile(0.999) as f64),
            max: us(h.max() as f64),
        }
    }
}

/// One core's figures.
#[derive(Debug, Clone, Serialize)]
pub struct CoreReport {
    pub core: usize,
    pub iops: f64,
    pub mibps: f64,
    pub ios: u64,
    pub errors: u64,
    pub lat_us: Latency,
}

/// The whole run. `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub bdev: String,
    pub product: String,
    pub workload: Workload,
    pub read_pct: u32,
    pub queue_depth: usize,
    pub io_size: usize,
    pub duration_s: f64,
    pub iops: f64,
    pub mibps: f64,
    pub ios: u64,
    pub errors: u64,
    pub lat_us: Latency,
    pub cores: Vec<CoreReport>,
    pub verify: Option<VerifyReport>,
    pub peak_rss_mib: f64,
    pub buffers_hugepage: bool,
    pub buffer_pool_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub mismatches: u64,
    pub first_mismatch: Option<String>,
}

impl BenchReport {
    /// Whether the run saw an I/O error or a verify mismatch.
    pub fn failed(&self) -> bool {
        self.errors > 0 || self.verify.as_ref().is_some_and(|v| v.mismatches > 0)
    }

    /// The human-readable table.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "bdev {} ({}), {} {}B QD{}{} for {:.1} s on {} core(s)",
            self.bdev,
            self.product,
            self.workload.as_str(),
            self.io_size,
            self.queue_depth,
            if matches!(self.workload, Workload::Rw | Workload::RandRw) {
                format!(" {}% reads", self.read_pct)
            } else {
                String::new()
            },
            self.duration_s,
            self.cores.len()
        );
        let _ = writeln!(
            s,
            "{:>6} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "core", "IOPS", "MiB/s", "avg us", "p50 us", "p99 us", "p99.9 us", "max us"
        );
        let mut row = |name: String, iops: f64, mibps: f64, l: &Latency| {
            let _ = writeln!(
                s,
                "{:>6} {:>12.0} {:>10.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                name, iops, mibps, l.avg, l.p50, l.p99, l.p999, l.max
            );
        };
        for c in &self.cores {
            row(c.core.to_string(), c.iops, c.mibps, &c.lat_us);
        }
        row("total".into(), self.iops, self.mibps, &self.lat_us);
        if self.errors > 0 {
            let _ = writeln!(s, "I/O errors: {}", self.errors);
        }
        if let Some(v) = &self.verify {
            match &v.first_mismatch {
                None => {
                    let _ = writeln!(s, "verify: OK, every block read back as written");
                }
                Some(m) => {
                    let _ = writeln!(
                        s,
                        "verify: FAILED, {} mismatching I/Os; first: {m}",
                        v.mismatches
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "peak RSS {:.1} MiB; I/O buffers {:.1} MiB, {}",
            self.peak_rss_mib,
            self.buffer_pool_mib,
            if self.buffers_hugepage {
                "hugepage-backed"
            } else {
                "ordinary pages (no free hugepages)"
            }
        );
        s
    }
}

/// Runs the benchmark on every reactor of `rt` against the bdev named in
/// `params`, registered in `reg`.
pub fn run(
    rt: &Runtime,
    reg: &BdevRegistry,
    params: &BenchParams,
) -> Result<BenchReport, BenchError> {
    let bdev = reg.lookup(&params.bdev)?;
    let bs = bdev.block_size() as usize;
    if params.queue_depth == 0 || params.queue_depth > 4096 {
        return Err(BenchError::Params(format!(
            "queue depth {} is not in 1..=4096",
            params.queue_depth
        )));
    }
    if params.io_size == 0 || !params.io_size.is_multiple_of(bs) {
        return Err(BenchError::Params(format!(
            "I/O size {} is not a positive multiple of the block size {bs}",
            params.io_size
        )));
    }
    if params.read_pct > 100 {
        return Err(BenchError::Params(format!(
            "read percentage {} is over 100",
            params.read_pct
        )));
    }
    if params.verify && bdev.info().product == "null" {
        return Err(BenchError::Params(
            "a null bdev stores nothing, so --verify cannot pass: use malloc, uring or a stack on them".into(),
        ));
    }
    let writes = params.verify || !matches!(params.workload, Workload::Read | Workload::RandRead);
    if writes && !bdev.supports(IoType::Write) {
        return Err(BenchError::Params(format!(
            "bdev {} does not support writes",
            bdev.name()
        )));
    }
    let desc: BdevDesc = bdev.open(writes)?;
    let cores = rt.num_reactors();
    let buf_size = params.io_size.div_ceil(sys::PAGE_SIZE) * sys::PAGE_SIZE;
    let pool = BufferPool::new(buf_size, params.queue_depth * cores, params.hugepages)?;
    let ticks_per_us = clock::ticks_per_us();
    let duration_ticks = (params.duration.as_secs_f64() * 1e6 * ticks_per_us) as u64;

    // Set up one job per reactor, then start them all together.
    let jobs_ready = rt.exec_all({
        let desc = desc.clone();
        let pool = pool.clone();
        let p = params.clone();
        let (block_size, num_blocks) = (bdev.block_size() as u64, bdev.num_blocks());
        move |core| -> Result<(), String> {
            let ch = desc.channel().map_err(|e| e.to_string())?;
            let bufs = (0..p.queue_depth)
                .map(|_| pool.get(p.io_size).ok_or("buffer pool exhausted"))
                .collect::<Result<Vec<_>, _>>()?;
            let spec = JobSpec {
                core,
                cores,
                workload: p.workload,
                read_pct: p.read_pct,
                io_blocks: (p.io_size as u64) / block_size,
                block_size,
                num_blocks,
                duration_ticks,
                verify: p.verify,
                seed: p.seed,
            };
            let job = Rc::new(RefCell::new(Job::new(spec, ch, bufs)?));
            JOB.with(|j| *j.borrow_mut() = Some(job));
            Ok(())
        }
    });
    for (core, r) in jobs_ready
        .map_err(|_| BenchError::Reactor)?
        .into_iter()
        .enumerate()
    {
        r.map_err(|why| BenchError::Job { core, why })?;
    }
    rt.exec_all(|_| {
        JOB.with(|j| {
            let job = j.borrow().clone().expect("job was set up on this reactor");
            job.borrow_mut().start();
            let poller = Poller::builder()
                .name("bench")
                .register(move || PollStatus::from_count(job.borrow_mut().poll(clock::ticks())));
            POLLER.with(|p| *p.borrow_mut() = Some(poller));
        })
    })
    .map_err(|_| BenchError::Reactor)?;

    std::thread::sleep(params.duration);
    // Wait for every job to drain its queue, then collect.
    let outcomes: Vec<CoreOutcome> = loop {
        let done = rt
            .exec_all(|_| {
                JOB.with(|j| {
                    j.borrow()
                        .as_ref()
                        .is_none_or(|job| job.borrow().is_finished())
                })
            })
            .map_err(|_| BenchError::Reactor)?;
        if done.iter().all(|d| *d) {
            let outs = rt
                .exec_all(|_| {
                    POLLER.with(|p| p.borrow_mut().take());
                    JOB.with(|j| j.borrow_mut().take())
                        .map(|job| job.borrow_mut().take_outcome())
                })
                .map_err(|_| BenchError::Reactor)?;
            break outs.into_iter().flatten().collect();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(summarize(params, &bdev, outcomes, &pool))
}

thread_local! {
    static JOB: RefCell<Option<job::SharedJob>> = const { RefCell::new(None) };
    static POLLER: RefCell<Option<Poller>> = const { RefCell::new(None) };
}

fn summarize(
    params: &BenchParams,
    bdev: &hotcopy_bdev::Bdev,
    outcomes: Vec<CoreOutcome>,
    pool: &BufferPool,
) -> BenchReport {
    let tpu = clock::ticks_per_us();
    let mut total_hist: Option<Histogram<u64>> = None;
    let mut cores = Vec::new();
    let (mut ios, mut bytes, mut errors, mut mism) = (0u64, 0u64, 0u64, 0u64);
    let mut first_mismatch = None;
    let mut max_secs: f64 = 0.0;
    for o in &outcomes {
        let secs = (o.elapsed_ticks as f64 / tpu / 1e6).max(1e-9);
        max_secs = max_secs.max(secs);
        cores.push(CoreReport {
            core: o.core,
            iops: o.ios as f64 / secs,
            mibps: o.bytes as f64 / secs / (1024.0 * 1024.0),
            ios: o.ios,
            errors: o.errors,
            lat_us: Latency::from_ticks(&o.hist_ticks),
        });
        match total_hist.as_mut() {
            None => total_hist = Some(o.hist_ticks.clone()),
            Some(h) => {
                let _ = h.add(&o.hist_ticks);
            }
        }
        ios += o.ios;
        bytes += o.bytes;
        errors += o.errors;
        mism += o.verify_mismatches;
        if first_mismatch.is_none() {
            first_mismatch.clone_from(&o.first_mismatch);
        }
    }
    let iops: f64 = cores.iter().map(|c| c.iops).sum();
    let mibps: f64 = cores.iter().map(|c| c.mibps).sum();
    let _ = bytes;
    BenchReport {
        bdev: bdev.name().to_string(),
        product: bdev.info().product.to_string(),
        workload: params.workload,
        read_pct: params.read_pct,
        queue_depth: params.queue_depth,
        io_size: params.io_size,
        duration_s: max_secs,
        iops,
        mibps,
        ios,
        errors,
        lat_us: total_hist
            .as_ref()
            .map(Latency::from_ticks)
            .unwrap_or(Latency {
                avg: 0.0,
                p50: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            }),
        cores,
        verify: params.verify.then_some(VerifyReport {
            mismatches: mism,
            first_mismatch,
        }),
        peak_rss_mib: sys::peak_rss_bytes() as f64 / (1024.0 * 1024.0),
        buffers_hugepage: pool.is_hugepage(),
        buffer_pool_mib: pool.footprint() as f64 / (1024.0 * 1024.0),
    }
}

/// A device's sequential ceiling: 1 MiB I/Os of `workload` on `bdev` for
/// `duration`, `qd` in flight in all (split across the reactors); MiB/s.
pub(crate) fn seq_ceiling(
    rt: &Runtime,
    reg: &BdevRegistry,
    bdev: &str,
    workload: Workload,
    qd: usize,
    duration: Duration,
) -> Result<f64, String> {
    let r = run(
        rt,
        reg,
        &BenchParams {
            bdev: bdev.to_string(),
            queue_depth: qd.div_ceil(rt.num_reactors()).max(1),
            io_size: 1 << 20,
            workload,
            read_pct: 0,
            duration,
            verify: false,
            seed: 1,
            hugepages: HugepageMode::Auto,
        },
    )
    .map_err(|e| format!("measuring {bdev}: {e}"))?;
    Ok(r.mibps)
}

/// The median of `v` (the mean of the middle two for an even count; 0 for
/// none).
pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
    use hotcopy_bdev::modules::{malloc, null, passthru};
    use hotcopy_runtime::{IdlePolicy, RuntimeConfig};

    fn params(bdev: &str, workload: Workload, verify: bool) -> BenchParams {
        BenchParams {
            bdev: bdev.into(),
            queue_depth: 16,
            io_size: 4096,
            workload,
            read_pct: 50,
            duration: Duration::from_millis(300),
            verify,
            seed: 7,
            hugepages: HugepageMode::Off,
        }
    }

    #[test]
    fn bench_runs_every_workload_on_two_cores_and_verify_passes() {
        let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::Poll)).unwrap();
        let reg = BdevRegistry::new();
        malloc::create(&reg, "m0", 64 << 20, 512).unwrap();
        passthru::create(&reg, "pt0", "m0").unwrap();
        null::create(&reg, "n0", 1 << 30, 512).unwrap();
        for w in [
            Workload::Read,
            Workload::Write,
            Workload::RandRead,
            Workload::RandWrite,
            Workload::Rw,
            Workload::RandRw,
        ] {
            let r = run(&rt, &reg, &params("n0", w, false)).unwrap();
            assert!(r.ios > 1000, "{w:?}: {} I/Os", r.ios);
            assert_eq!(r.cores.len(), 2);
            assert_eq!(r.errors, 0);
        }
        let r = run(&rt, &reg, &params("pt0", Workload::RandWrite, true)).unwrap();
        assert!(!r.failed(), "{}", r.to_table());
        let v = r.verify.as_ref().unwrap();
        assert_eq!(v.mismatches, 0);
        assert!(r.ios > 100);
        assert!(r.lat_us.p99 >= r.lat_us.p50 && r.lat_us.max >= r.lat_us.p999);
        rt.shutdown();
    }

    #[test]
    fn bad_parameters_are_rejected_with_a_reason() {
        let rt = Runtime::start(RuntimeConfig::with_cores(1, IdlePolicy::SLEEP)).unwrap();
        let reg = BdevRegistry::new();
        null::create(&reg, "n0", 1 << 20, 512).unwrap();
        let mut p = params("n0", Workload::RandRead, true);
        let e = run(&rt, &reg, &p).unwrap_err().to_string();
        assert!(e.contains("null bdev stores nothing"), "{e}");
        p.verify = false;
        p.io_size = 1000;
        assert!(run(&rt, &reg, &p)
            .unwrap_err()
            .to_string()
            .contains("multiple of the block size"));
        p.io_size = 4096;
        p.bdev = "nope".into();
        assert!(run(&rt, &reg, &p)
            .unwrap_err()
            .to_string()
            .contains("no bdev named \"nope\""));
    }
}
