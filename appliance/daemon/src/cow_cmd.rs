//! `hotcopy bench cow`: foreground writes with and without an online backup.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hotcopy_bdev::modules::fault;
use hotcopy_bdev::BdevRegistry;
use hotcopy_bench::cow::{self, CowBenchBdevs, CowBenchParams, CowBenchReport, WriteRate};
use hotcopy_config::{ByteSize, NamedBdev};
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};

use crate::construct;

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
With no options: a 2 GiB source and target as files under a temporary directory in /var/tmp
(the target written through with zeros first, like a namespace), a RAM container of 10% of the
source, 16 KiB chunks, 4 KiB random writes at QD32 for 5 s without a backup, then the same load
while a full backup runs, then 5 s without a backup again (the baseline is both runs without a
backup, which bracket the backup). Under a minute on a 2-core machine.

Examples:
  hotcopy bench cow --json
  hotcopy bench cow --fairness --plot cow.svg
  hotcopy bench cow --target 'fault:uring:/var/tmp/t.img@2G' --target-latency-us 500
  hotcopy bench cow --container 'uring:/var/tmp/container.img@256M'")]
pub struct CowArgs {
    /// Scratch directory for the default files (default: a new one under /var/tmp, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the source volume.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub size: u64,
    /// Source bdev spec (default: uring:DIR/source.img@SIZE).
    #[arg(long)]
    pub source: Option<String>,
    /// Backup target bdev spec (default: uring:DIR/target.img@SIZE). The bench writes zeros over
    /// the target once before the runs, so that its blocks exist before the backup writes them,
    /// as a namespace's do (see --sparse-target).
    #[arg(long)]
    pub target: Option<String>,
    /// Do not write the target through first: a file the bench creates stays sparse, and the
    /// backup's writes then also allocate its blocks, which costs the filesystem (extent
    /// changes, journal commits) on the disk the writers use. Measures a file-backed target
    /// rather than a namespace. (A file already in --dir keeps the blocks it has.)
    #[arg(long)]
    pub sparse_target: bool,
    /// Intermediate container bdev spec (default: malloc of 10% of the source: RAM).
    #[arg(long)]
    pub container: Option<String>,
    /// Container size as a fraction of the source, for the default RAM container.
    #[arg(long, default_value_t = 0.10)]
    pub container_fraction: f64,
    /// Extra latency for a `fault:` target, in microseconds (a slow backup namespace).
    #[arg(long, default_value_t = 0)]
    pub target_latency_us: u64,
    /// Chunk size: the unit of tracking and of copy-before-write. A writer's first write to a
    /// chunk waits for that chunk's old content to be read, so smaller chunks make first writes
    /// cheaper (16K keeps more of the foreground than 64K under random writes; see
    /// docs/BENCHMARKS.md); the copy stream still moves runs of up to 1 MiB.
    #[arg(long, default_value = "16K", value_parser = parse_size)]
    pub chunk: u64,
    /// Queue depth of each foreground writer.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 32)]
    pub queue_depth: usize,
    /// Foreground write size.
    #[arg(short = 'o', long = "io-size", default_value = "4096", value_parser = parse_size)]
    pub io_size: u64,
    /// Seconds of each baseline run (no backup): one before the backup and one after.
    #[arg(short = 't', long = "time", default_value_t = 5.0)]
    pub seconds: f64,
    /// Give up on the backup after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub max_backup: f64,
    /// Copy-stream rate limit in bytes per second (0: none; the scheduler shares the device by itself).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub rate: u64,
    /// Most backup I/Os in flight (copy + drain).
    #[arg(long, default_value_t = 16)]
    pub stream_qd: u32,
    /// Most drain I/Os kept in flight whatever the budget while the container is past its soft
    /// watermark (writers that need a slot are paced then); fewer while writers that never wait
    /// for the backup (bystanders) see their latency over the tolerance. The copy runs paid by
    /// captures (--copy-per-capture) keep within the same depth, pressed or not.
    #[arg(long, default_value_t = 16)]
    pub pressed_drain_depth: u32,
    /// The backup's progress guarantee: the least share of time (0..1) its streams keep a chunk
    /// in flight however loaded the hosts are.
    #[arg(long, default_value_t = 0.25)]
    pub min_share: f64,
    /// Hosts' latency, relative to their level without a backup, above which the backup streams
    /// back off.
    #[arg(long, default_value_t = hotcopy_cow::job::FG_TOLERANCE)]
    pub tolerance: f64,
    /// Container fill (0..1] past which writers that need a slot are paced at the drain's rate
    /// (and the drain runs at least at --pressed-drain-depth).
    #[arg(long, default_value_t = hotcopy_cow::JobTuning::default().soft_watermark)]
    pub soft_watermark: f64,
    /// Chunks (at most) the copy stream moves in runs, outside its budget, for every chunk a
    /// writer's first write forces into the container (0: none). A capture is a random
    /// chunk-sized read and write; a copied chunk is a share of a run of up to 256 KiB, and a
    /// chunk copied ahead is one writers can no longer force: the job ends sooner and the
    /// writers lose less work in all. The runs start at the chunk a writer reached last.
    #[arg(long, default_value_t = hotcopy_cow::JobTuning::default().copy_per_capture)]
    pub copy_per_capture: f64,
    /// Copy those chunks in order from the copy cursor, instead of from the chunk a writer's
    /// first write reached last (where the next captures are likely to be; session 12 of
    /// docs/BENCHMARKS.md compares the two).
    #[arg(long)]
    pub copy_ahead_in_order: bool,
    /// Turn off the latency-driven (AIMD) budget of the backup streams.
    #[arg(long)]
    pub no_adaptive: bool,
    /// Number of foreground writers (one channel each).
    #[arg(long, default_value_t = 1)]
    pub writers: usize,
    /// Skewed writes, WRITES/SPACE in per cent: e.g. 90/10 sends 90% of writes to 10% of the
    /// volume (fio's random_distribution=zoned:90/10), the hot zone at the end of the volume,
    /// where the copy stream arrives last. Default: uniform over the whole volume (the worst case).
    #[arg(long, value_parser = parse_hot)]
    pub hot: Option<(u32, u32)>,
    /// Cap the main writers' IOPS (all of them together) in the runs without and with the backup:
    /// N writes per second, or P% of what they reach uncapped (measured first, for up to 3 s, on
    /// the cow volume without a backup). The --fairness writer and the --freeze-samples load stay
    /// uncapped. A capped load leaves the device headroom, like a guest behind NBD or
    /// NVMe/TCP; the writers still keep at most --queue-depth writes in flight. Default: uncapped,
    /// the writers saturate the device (the worst case).
    #[arg(long, value_parser = parse_write_rate)]
    pub write_iops: Option<WriteRate>,
    /// Reactors (cores).
    #[arg(long, default_value_t = 2)]
    pub cores: usize,
    /// Add a writer confined to space excluded from the backup and report its IOPS ratio.
    #[arg(long)]
    pub fairness: bool,
    /// Then run full backups with no foreground load (--idle-backup-runs of them), with the
    /// target's sequential-write ceiling measured before each and after the last, then the
    /// source's sequential-read ceiling (1 MiB I/Os at the streams' queue depth). Reports the
    /// median backup and the median of each backup's ratio to the ceilings on either side.
    #[arg(long)]
    pub idle_backup: bool,
    /// Backups in --idle-backup (at least 1): a 2 GiB backup from RAM lasts half a second on a
    /// fast disk, whose speed moves by tens of per cent within a minute.
    #[arg(long, default_value_t = 3, requires = "idle_backup", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub idle_backup_runs: u32,
    /// Then start this many one-chunk jobs under the same write load and report the
    /// distribution of their freeze times.
    #[arg(long, default_value_t = 0)]
    pub freeze_samples: usize,
    /// Skip checking the backup against the source at the consistency point.
    #[arg(long)]
    pub no_verify: bool,
    /// Draw latency, container fill and progress over time into an SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also print the job's window in 100 ms rows: foreground IOPS and latency
    /// next to backup progress, container fill and the streams' budget.
    #[arg(long)]
    pub timeline: bool,
    /// Seed for the writers' offsets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn parse_hot(s: &str) -> Result<(u32, u32), String> {
    let (w, z) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected WRITES/SPACE in per cent, e.g. 90/10"))?;
    let p = |v: &str| -> Result<u32, String> {
        match v.trim().parse::<u32>() {
            Ok(n) if (1..=99).contains(&n) => Ok(n),
            _ => Err(format!("{v:?} in {s:?} is not a per cent between 1 and 99")),
        }
    };
    Ok((p(w)?, p(z)?))
}

fn parse_write_rate(s: &str) -> Result<WriteRate, String> {
    let t = s.trim();
    if let Some(pct) = t.strip_suffix('%') {
        match pct.trim().parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 100.0 => Ok(WriteRate::Share(v / 100.0)),
            _ => Err(format!(
                "{s:?}: the share must be a per cent above 0 and at most 100"
            )),
        }
    } else {
        match t.parse::<f64>() {
            Ok(v) if v >= 1.0 && v.is_finite() => Ok(WriteRate::Iops(v)),
            _ => Err(format!(
                "{s:?}: expected writes per second (at least 1) or a per cent such as 70%"
            )),
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<ByteSize>()
        .map(|b| b.0)
        .map_err(|e| e.to_string())
}

/// Builds the bdevs, runs the scenario, and returns the report.
pub fn run_scenario(
    a: &CowArgs,
    mut progress: impl FnMut(&hotcopy_cow::JobStatus),
) -> anyhow::Result<(CowBenchReport, cow::CowRunTrace, Option<tempfile::TempDir>)> {
    if a.seconds <= 0.0 || a.max_backup <= 0.0 {
        bail!("-t and --max-backup must be positive");
    }
    if !(a.soft_watermark > 0.0 && a.soft_watermark <= 1.0) {
        bail!(
            "--soft-watermark {} is not above 0 and at most 1",
            a.soft_watermark
        );
    }
    if !(0.0..=64.0).contains(&a.copy_per_capture) {
        bail!(
            "--copy-per-capture {} is not between 0 and 64",
            a.copy_per_capture
        );
    }
    if !(0.0..=1.0).contains(&a.min_share) {
        bail!("--min-share {} is not between 0 and 1", a.min_share);
    }
    let (dir, scratch) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("hotcopy-cow-")
                .tempdir_in("/var/tmp")
                .context("creating a scratch directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let size = ByteSize(a.size);
    let source = a
        .source
        .clone()
        .unwrap_or_else(|| format!("uring:{}@{size}", dir.join("source.img").display()));
    let target = a
        .target
        .clone()
        .unwrap_or_else(|| format!("uring:{}@{size}", dir.join("target.img").display()));
    let chunks = a.size.div_ceil(a.chunk);
    let default_slots = ((chunks as f64 * a.container_fraction).ceil() as u64).max(1);
    let container = a
        .container
        .clone()
        .unwrap_or_else(|| format!("malloc:{}", ByteSize(default_slots * a.chunk)));
    let reg = BdevRegistry::new();
    let mk = |name: &str, spec: &str| -> anyhow::Result<()> {
        let bdev =
            hotcopy_config::parse_spec(spec).with_context(|| format!("{name} spec {spec:?}"))?;
        construct::create_one(&reg, name, &bdev)
            .with_context(|| format!("creating the {name} ({spec})"))?;
        let _ = NamedBdev {
            name: name.into(),
            bdev,
        };
        Ok(())
    };
    mk("source", &source)?;
    mk("target", &target)?;
    mk("container", &container)?;
    if a.target_latency_us > 0 {
        let t = reg.lookup("target")?;
        let ctl = fault::control(&t).context("--target-latency-us needs a fault: target spec")?;
        ctl.set_latency_us(a.target_latency_us);
    }
    let cont = reg.lookup("container")?;
    let slots = (cont.size_bytes() / a.chunk).min(u32::MAX as u64) as u32;
    let rt = Runtime::start(RuntimeConfig::with_cores(a.cores.max(1), IdlePolicy::Poll))?;
    let src_desc = reg.open("source", true)?;
    cow::fill_source(&rt, &src_desc, a.io_size as usize).map_err(anyhow::Error::msg)?;
    drop(src_desc);
    if !a.sparse_target {
        let tgt_desc = reg.open("target", true)?;
        cow::fill_zeros(&rt, &tgt_desc).map_err(anyhow::Error::msg)?;
    }
    hotcopy_cow::create(&reg, "vol", "source")?;
    let params = CowBenchParams {
        size: a.size,
        queue_depth: a.queue_depth,
        io_size: a.io_size as usize,
        baseline: Duration::from_secs_f64(a.seconds),
        max_backup: Duration::from_secs_f64(a.max_backup),
        chunk_size: a.chunk,
        container_slots: slots,
        rate_limit: a.rate,
        stream_qd: a.stream_qd,
        pressed_drain_depth: a.pressed_drain_depth,
        adaptive: !a.no_adaptive,
        min_share: a.min_share,
        tolerance: a.tolerance,
        soft_watermark: a.soft_watermark,
        copy_per_capture: a.copy_per_capture,
        copy_near_writers: !a.copy_ahead_in_order,
        fairness: a.fairness,
        verify: !a.no_verify,
        writers: a.writers,
        seed: a.seed,
        hot: a.hot,
        write_rate: a.write_iops,
    };
    let bdevs = CowBenchBdevs {
        cow: "vol".into(),
        source: "source".into(),
        target: "target".into(),
        container: "container".into(),
    };
    let (mut report, trace) =
        cow::run_cow(&rt, &reg, &bdevs, &params, &mut progress).map_err(anyhow::Error::msg)?;
    if a.freeze_samples > 0 {
        report.freeze_samples = Some(
            cow::run_freeze_samples(&rt, &reg, &bdevs, &params, a.freeze_samples)
                .map_err(anyhow::Error::msg)?,
        );
    }
    if a.idle_backup {
        report.idle_backup = Some(
            cow::run_idle_backup(&rt, &reg, &bdevs, &params, a.idle_backup_runs as usize)
                .map_err(anyhow::Error::msg)?,
        );
    }
    report.source = format!("vol (cow on {source})");
    report.target = target;
    report.container = format!("{container} ({slots} slots)");
    rt.shutdown();
    Ok((report, trace, scratch))
}

pub fn run(a: CowArgs) -> anyhow::Result<ExitCode> {
    let (report, trace, _scratch) = run_scenario(&a, |_| {})?;
    if let Some(path) = &a.plot {
        cow::plot(&report, &trace)
            .write_svg(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
        if a.timeline {
            print!("{}", cow::timeline_table(&trace));
        }
        if let Some(p) = &a.plot {
            println!("plot: {}", p.display());
        }
    }
    if report.verified == Some(false) || report.during.errors > 0 {
        eprintln!(
            "hotcopy: bench cow failed: {}",
            report
                .verify_detail
                .clone()
                .unwrap_or_else(|| "foreground write errors".into())
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human-readable summary.
pub fn table(r: &CowBenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "source {}; target {}; container {}",
        r.source, r.target, r.container
    );
    if let Some(cap) = r.write_iops_cap {
        let _ = match r.saturated_iops {
            Some(sat) => writeln!(
                s,
                "writers capped at {cap:.0} IOPS ({:.0}% of the {sat:.0} they reached uncapped)",
                100.0 * cap / sat.max(1e-9)
            ),
            None => writeln!(s, "writers capped at {cap:.0} IOPS"),
        };
    }
    let _ = writeln!(
        s,
        "{:<22} {:>12} {:>10} {:>10} {:>10}",
        "foreground writes", "IOPS", "avg us", "p99 us", "max us"
    );
    for (name, p) in [
        ("without backup", &r.baseline),
        ("during backup", &r.during),
    ] {
        let _ = writeln!(
            s,
            "{:<22} {:>12.0} {:>10.1} {:>10.1} {:>10.1}",
            name, p.iops, p.lat_us.avg, p.lat_us.p99, p.lat_us.max
        );
    }
    let _ = writeln!(
        s,
        "{:<22} {:>12} (before the backup {:.0}, after {:.0})",
        "", "", r.baseline_before_iops, r.baseline_after_iops
    );
    if r.baseline_spread > cow::BASELINE_SPREAD_WARN {
        let _ = writeln!(
            s,
            "note: the baselines before and after the backup differ {:.1}x: the device's own speed moved during the run, so read the ratios with care (repeat with other --seed values and take medians)",
            r.baseline_spread
        );
    }
    let _ = writeln!(
        s,
        "{:<22} {:>12.2} {:>21.2}",
        "ratio (during/without)", r.iops_ratio, r.p99_ratio
    );
    let _ = writeln!(
        s,
        "foreground work lost to the backup: {:.2} s at the baseline rate",
        r.foreground_lost_s
    );
    let _ = writeln!(
        s,
        "backup: {:.1} MiB/s over {:.2} s; freeze {:.0} us; container peak {} of {} slots; {} writes held, {} paced",
        r.backup_mibps, r.backup_s, r.freeze_us, r.container_peak, r.container_slots, r.held_writes, r.paced_writes
    );
    let _ = writeln!(
        s,
        "chunks: {} captured by writers, {} copied ({} of them ahead of captures, {} near the writers)",
        r.job.chunks_saved,
        r.job.chunks_copied,
        r.job.chunks_copied_ahead,
        r.job.chunks_copied_near_writers
    );
    if let Some(f) = &r.fairness {
        let _ = writeln!(
            s,
            "fairness: out-of-scope writer {:.0} -> {:.0} IOPS (ratio {:.2}), p99 {:.1} us during",
            f.baseline_iops, f.during_iops, f.ratio, f.during_p99_us
        );
    }
    if let Some(f) = &r.freeze_samples {
        let _ = writeln!(
            s,
            "freeze over {} jobs under load: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
            f.jobs, f.p50_us, f.p99_us, f.max_us
        );
    }
    if let Some(i) = &r.idle_backup {
        let fmt_list = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(" / ");
        let _ = writeln!(
            s,
            "backups with no foreground load: {} MiB/s (median {:.1}; the target's final flush {:.1} ms, median; in all {} copy runs written from the source's memory, {} read ahead); target seq-write ceilings {} MiB/s (before each, then after the last); ratio to the ceilings around each {} (median {:.2}); source seq-read ceiling {:.1} MiB/s (ratio to the lower {:.2})",
            fmt_list(&mut i.runs.iter().map(|x| format!("{:.0}", x.backup_mibps))),
            i.backup_mibps,
            i.target_flush_ms,
            i.zero_copy_runs,
            i.read_ahead_runs,
            fmt_list(&mut i.target_write_ceiling_runs_mibps.iter().map(|x| format!("{x:.0}"))),
            fmt_list(&mut i.runs.iter().map(|x| format!("{:.2}", x.ratio_to_target_ceiling))),
            i.ratio_to_target_ceiling,
            i.source_read_ceiling_mibps,
            i.ratio_to_ceiling
        );
    }
    match r.verified {
        Some(true) => {
            let _ = writeln!(
                s,
                "verify: OK, the backup equals the source at the consistency point"
            );
        }
        Some(false) => {
            let _ = writeln!(
                s,
                "verify: FAILED: {}",
                r.verify_detail.clone().unwrap_or_default()
            );
        }
        None => {}
    }
    let _ = writeln!(s, "peak RSS {:.1} MiB", r.peak_rss_mib);
    s
}
