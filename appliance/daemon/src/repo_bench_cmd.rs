//! `hotcopy bench repo`: backup, incremental, restore and instant-restore
//! figures of the repository, in one run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use hotcopy_bdev::BdevRegistry;
use hotcopy_bench::repo::{self, RepoBenchBdevs, RepoBenchParams, RepoBenchReport};
use hotcopy_config::ByteSize;
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};

use crate::construct;

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
With no options: a 1 GiB source, a 4 GiB repository and a 1 GiB restore destination, all files
in a temporary directory under /var/tmp. One full backup, incrementals after changing 1%, 5%,
10%, 25% and 50% of the chunks, 1% incrementals up to generation 50, restores of generation 1
and generation 50 next to the destination's sequential-write ceiling, and first reads of an
instant restore.

Examples:
  hotcopy bench repo --json
  hotcopy bench repo --size 4G --generations 100")]
pub struct RepoBenchArgs {
    /// Scratch directory for the files (default: a new one under /var/tmp, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the source.
    #[arg(long, default_value = "1G")]
    pub size: ByteSize,
    /// Chunk size.
    #[arg(long, default_value = "64K")]
    pub chunk: ByteSize,
    /// The repository's bdev spec instead of a file of 4× the source (e.g. malloc:4G, to measure
    /// restores against the destination's write ceiling alone).
    #[arg(long)]
    pub repo: Option<String>,
    /// Generations to reach before comparing the first with the last.
    #[arg(long, default_value_t = 50)]
    pub generations: u64,
    /// Per cent of the chunks changed before each measured incremental.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,25,50")]
    pub changed: Vec<f64>,
    /// First reads timed on the instant-restore bdev.
    #[arg(long, default_value_t = 2000)]
    pub first_reads: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(a: RepoBenchArgs) -> anyhow::Result<ExitCode> {
    let (dir, _scratch) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("hotcopy-repo-bench-")
                .tempdir_in("/var/tmp")
                .context("creating a scratch directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let reg = BdevRegistry::new();
    let size = a.size;
    for (name, file, bytes) in [
        ("source", "source.img", size.0),
        ("ns", "repo.img", size.0 * 4),
        ("dest", "dest.img", size.0),
    ] {
        let spec = match (&a.repo, name) {
            (Some(r), "ns") => r.clone(),
            _ => format!("uring:{}@{}", dir.join(file).display(), ByteSize(bytes)),
        };
        let cfg = hotcopy_config::parse_spec(&spec).with_context(|| spec.clone())?;
        construct::create_one(&reg, name, &cfg).with_context(|| format!("creating {spec}"))?;
    }
    let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::Poll))?;
    let params = RepoBenchParams {
        chunk_size: a.chunk.0,
        fractions: a.changed.iter().map(|p| p / 100.0).collect(),
        generations: a.generations,
        first_reads: a.first_reads,
        seed: a.seed,
    };
    let bdevs = RepoBenchBdevs {
        source: "source".into(),
        namespace: "ns".into(),
        dest: "dest".into(),
    };
    let json = a.json;
    let report = repo::run_repo(&rt, &reg, &bdevs, &params, |s| {
        if !json {
            eprintln!("bench repo: {s}");
        }
    })
    .map_err(anyhow::Error::msg)?;
    rt.shutdown();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn table(r: &RepoBenchReport) -> String {
    use std::fmt::Write;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "source {:.0} MiB in chunks of {} KiB",
        mib(r.source_bytes),
        r.chunk_size / 1024
    );
    let _ = writeln!(
        s,
        "{:<28} {:>10} {:>10} {:>10} {:>10}",
        "backup", "changed", "stored", "seconds", "MiB/s"
    );
    for b in std::iter::once(&r.full).chain(&r.incrementals) {
        let _ = writeln!(
            s,
            "{:<28} {:>9.0}% {:>10} {:>10.2} {:>10.0}",
            format!("generation {}", b.generation),
            b.fraction_changed * 100.0,
            b.chunks_stored,
            b.seconds,
            mib(r.source_bytes) / b.seconds.max(1e-9)
        );
    }
    let _ = writeln!(
        s,
        "{:<28} {:>12} {:>14} {:>10} {:>10}",
        "restore", "index ms", "resolve ns", "seconds", "MiB/s"
    );
    for g in [&r.first, &r.last] {
        let _ = writeln!(
            s,
            "{:<28} {:>12.2} {:>14.1} {:>10.2} {:>10.0}",
            format!("generation {}", g.generation),
            g.index_load_ms,
            g.resolve_ns_per_chunk,
            g.restore_s,
            g.restore_mibps
        );
    }
    let _ = writeln!(
        s,
        "restore time, last over first: {:.2}; destination write ceiling {:.0} MiB/s (median of {}); restore over the ceiling around it {:.2} (the copy alone {:.2})",
        r.restore_ratio,
        r.dest_write_ceiling_mibps,
        r.ceiling_runs_mibps
            .iter()
            .map(|c| format!("{c:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.restore_to_ceiling,
        r.restore_copy_to_ceiling
    );
    let i = &r.instant;
    let _ = writeln!(
        s,
        "instant restore of generation {}: {} first reads, p50 {:.0} us, p99 {:.0} us, max {:.0} us ({} of {} chunks hydrated by the end)",
        i.generation, i.first_reads, i.latency_us.p50, i.latency_us.p99, i.latency_us.max, i.chunks_done_at_end, i.chunks_total
    );
    s
}
