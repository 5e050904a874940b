//! `hotcopy bench`: the bdevperf-like benchmark.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hotcopy_bdev::BdevRegistry;

use crate::construct;
use hotcopy_bench::{BenchParams, Workload};
use hotcopy_config::{ByteSize, Config, HugepagesMode, IdleMode};
use hotcopy_runtime::{HugepageMode, IdlePolicy, Runtime, RuntimeConfig};

/// The bdev the benchmark uses when neither --config nor --bdev-spec is given.
pub const DEFAULT_SPEC: &str = "malloc:1G";

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  hotcopy bench                                   # 5 s of 4 KiB randwrite QD128 on a 1 GiB malloc bdev
  hotcopy bench --bdev-spec null:1G -w randread -q 128 -o 4k -t 10
  hotcopy bench --bdev-spec passthru:malloc:1G -w randwrite -q 1 --json
  hotcopy bench --bdev-spec uring:/var/tmp/disk.img@4G -w randwrite -q 32 -t 10
  hotcopy bench --config config/examples/malloc.yaml --bdev pt0 -w randrw -M 70 --verify

Bdev specs: null:SIZE[:BLOCK]  malloc:SIZE[:BLOCK]  uring:PATH[@SIZE[:prealloc]]  passthru:SPEC  fault:SPEC")]
pub struct BenchArgs {
    /// YAML config describing reactors and the bdev stack.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Name of the bdev to measure (from --config; defaults to the last one defined).
    #[arg(long, short = 'b')]
    bdev: Option<String>,
    /// A bdev built from a one-line spec instead of a config file (e.g. passthru:malloc:1G).
    #[arg(long, conflicts_with = "config")]
    bdev_spec: Option<String>,
    /// Queue depth per core.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 128)]
    queue_depth: usize,
    /// I/O size in bytes (suffixes k, m: 4k, 128k).
    #[arg(short = 'o', long = "io-size", default_value = "4096", value_parser = parse_size)]
    io_size: u64,
    /// Workload.
    #[arg(short = 'w', long, value_enum, default_value_t = WorkloadArg::Randwrite)]
    workload: WorkloadArg,
    /// Percentage of reads for rw and randrw.
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    read_pct: u32,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", default_value_t = 5.0)]
    seconds: f64,
    /// Number of reactors (cores), one job each. Overrides the config's reactors.
    #[arg(long)]
    cores: Option<usize>,
    /// Write patterns and read them back; fail on any mismatch.
    #[arg(long)]
    verify: bool,
    /// Reactor idle policy (poll spins; sleep backs off when idle).
    #[arg(long, value_enum)]
    idle: Option<IdleArg>,
    /// Use hugepages for I/O buffers: auto uses them when free ones exist.
    #[arg(long, value_enum)]
    hugepages: Option<HugeArg>,
    /// Seed for the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum WorkloadArg {
    Read,
    Write,
    Randread,
    Randwrite,
    Rw,
    Randrw,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum IdleArg {
    Poll,
    Sleep,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum HugeArg {
    Auto,
    On,
    Off,
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<ByteSize>()
        .map(|b| b.0)
        .map_err(|e| e.to_string())
}

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if !(a.seconds > 0.0 && a.seconds <= 86_400.0) {
        bail!(
            "-t {} is not a run time in seconds (0 < t <= 86400)",
            a.seconds
        );
    }
    let (cfg, bdev_name) = match (&a.config, &a.bdev_spec) {
        (Some(path), _) => {
            let cfg = hotcopy_config::load(path)?;
            let name = match &a.bdev {
                Some(n) => n.clone(),
                None => cfg
                    .bdevs
                    .last()
                    .map(|b| b.name.clone())
                    .with_context(|| format!("{} defines no bdevs", path.display()))?,
            };
            (cfg, name)
        }
        (None, spec) => {
            let spec = spec.as_deref().unwrap_or(DEFAULT_SPEC);
            let bdev = hotcopy_config::parse_spec(spec)
                .with_context(|| format!("--bdev-spec {spec:?}"))?;
            let name = a.bdev.clone().unwrap_or_else(|| "bench0".to_string());
            let mut cfg = Config::default();
            cfg.bdevs.push(hotcopy_config::NamedBdev {
                name: name.clone(),
                bdev,
            });
            (cfg, name)
        }
    };
    let cores = a
        .cores
        .map(|n| (0..n.max(1)).collect())
        .unwrap_or_else(|| cfg.reactors.cores.cpus());
    let idle = match a
        .idle
        .map(|i| matches!(i, IdleArg::Sleep))
        .unwrap_or(cfg.reactors.idle == IdleMode::Sleep)
    {
        true => IdlePolicy::SLEEP,
        false => IdlePolicy::Poll,
    };
    let hugepages = match a.hugepages {
        Some(HugeArg::On) => HugepageMode::On,
        Some(HugeArg::Off) => HugepageMode::Off,
        Some(HugeArg::Auto) => HugepageMode::Auto,
        None => match cfg.buffer_pool.hugepages {
            HugepagesMode::On => HugepageMode::On,
            HugepagesMode::Off => HugepageMode::Off,
            HugepagesMode::Auto => HugepageMode::Auto,
        },
    };
    let reg = BdevRegistry::new();
    construct::create_all(&reg, &cfg).context("building the bdev stack")?;
    let rt = Runtime::start(RuntimeConfig {
        cores,
        idle,
        pin: true,
    })?;
    let params = BenchParams {
        bdev: bdev_name,
        queue_depth: a.queue_depth,
        io_size: a.io_size as usize,
        workload: match a.workload {
            WorkloadArg::Read => Workload::Read,
            WorkloadArg::Write => Workload::Write,
            WorkloadArg::Randread => Workload::RandRead,
            WorkloadArg::Randwrite => Workload::RandWrite,
            WorkloadArg::Rw => Workload::Rw,
            WorkloadArg::Randrw => Workload::RandRw,
        },
        read_pct: a.read_pct,
        duration: Duration::from_secs_f64(a.seconds),
        verify: a.verify,
        seed: a.seed,
        hugepages,
    };
    let report = hotcopy_bench::run(&rt, &reg, &params)?;
    rt.shutdown();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    if report.failed() {
        eprintln!(
            "hotcopy: bench failed: {} I/O errors{}",
            report.errors,
            report
                .verify
                .as_ref()
                .and_then(|v| v
                    .first_mismatch
                    .as_ref()
                    .map(|m| format!(", verify mismatch: {m}")))
                .unwrap_or_default()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
