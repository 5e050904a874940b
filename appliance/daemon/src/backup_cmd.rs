//! `hotcopy backup run`: a one-shot backup of a bdev that no daemon serves,
//! into a repository, through the same cow job the appliance runs online.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hotcopy_bdev::BdevRegistry;
use hotcopy_config::ByteSize;
use hotcopy_cow::repo::{ChannelIo, GenSpec, GenState, Repo, SourceIdent};
use hotcopy_cow::{
    BackupConfig, BlockRange, ContainerConfig, JobState, JobTuning, RepoTarget, Scope,
};
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::construct;

#[derive(Subcommand, Debug)]
pub enum BackupSub {
    /// Back up a bdev no daemon is serving into a repository (one generation).
    Run(RunArgs),
}

#[derive(Args, Debug)]
#[command(after_help = "\
RANGES are byte ranges START+LEN separated by commas, with k/m/g/t suffixes
(multiples of the source's block size): --include 0+1G,4G+512M.

The source's identity in the repository is --name, by default the path of a
uring: SPEC (without @SIZE) or the SPEC itself. --incremental backs up against
the newest complete generation of that name: with no change tracking on an
offline source, every chunk is read and compared by checksum with the parent,
and only chunks that differ are stored.

Examples:
  hotcopy repo format --repo uring:/var/tmp/repo.img@4G
  hotcopy backup run --source uring:/var/tmp/vol.img --repo uring:/var/tmp/repo.img
  hotcopy backup run --source uring:/var/tmp/vol.img --repo uring:/var/tmp/repo.img --incremental")]
pub struct RunArgs {
    /// The bdev to back up (bench spec grammar: `uring:PATH[@SIZE[:prealloc]]`, `malloc:SIZE`, ...).
    #[arg(long)]
    pub source: String,
    /// The repository's bdev spec.
    #[arg(long)]
    pub repo: String,
    /// Store only what changed since the newest complete generation of this source.
    #[arg(long)]
    pub incremental: bool,
    /// Back up only these byte ranges.
    #[arg(long, value_parser = parse_ranges)]
    pub include: Option<Ranges>,
    /// Leave these byte ranges out.
    #[arg(long, value_parser = parse_ranges)]
    pub exclude: Option<Ranges>,
    /// The source's name in the repository.
    #[arg(long)]
    pub name: Option<String>,
    /// Chunk size (tracking and dedup unit).
    #[arg(long, default_value = "64K")]
    pub chunk: ByteSize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `backup run --json` prints.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub generation: u64,
    pub kind: &'static str,
    pub parent: Option<u64>,
    pub source: String,
    pub size_bytes: u64,
    pub chunk_size: u64,
    pub chunks_total: u64,
    pub chunks_in_scope: u64,
    pub chunks_stored: u64,
    pub zero_chunks: u64,
    pub chunks_absent: u64,
    pub bytes_stored: u64,
    pub seconds: f64,
    pub read_mibps: f64,
    pub note: Option<String>,
}

/// Byte ranges (start, length) from `START+LEN,…`.
#[derive(Debug, Clone)]
pub struct Ranges(pub Vec<(u64, u64)>);

fn parse_ranges(s: &str) -> Result<Ranges, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (a, b) = p
                .split_once('+')
                .ok_or_else(|| format!("{p:?}: expected START+LEN, e.g. 0+1G"))?;
            let start = a
                .trim()
                .parse::<ByteSize>()
                .map_err(|e| format!("{p:?}: start: {e}"))?;
            let len = b
                .trim()
                .parse::<ByteSize>()
                .map_err(|e| format!("{p:?}: length: {e}"))?;
            if len.0 == 0 {
                return Err(format!("{p:?}: empty range"));
            }
            Ok((start.0, len.0))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Ranges)
}

/// The source's default name: the file of a `uring:` spec, else the spec.
pub fn source_name(spec: &str) -> String {
    match spec.strip_prefix("uring:") {
        Some(rest) => rest.rsplit_once('@').map_or(rest, |(p, _)| p).to_string(),
        None => spec.to_string(),
    }
}

pub fn run(sub: BackupSub) -> anyhow::Result<ExitCode> {
    match sub {
        BackupSub::Run(a) => run_once(a),
    }
}

fn run_once(a: RunArgs) -> anyhow::Result<ExitCode> {
    let reg = BdevRegistry::new();
    let mk = |name: &str, spec: &str| -> anyhow::Result<()> {
        let cfg = hotcopy_config::parse_spec(spec).with_context(|| format!("{name} {spec:?}"))?;
        construct::create_one(&reg, name, &cfg)
            .with_context(|| format!("opening the {name} ({spec})"))?;
        Ok(())
    };
    mk("source", &a.source)?;
    mk("repo", &a.repo)?;
    let source = reg.lookup("source")?;
    let bs = source.block_size() as u64;
    let chunk = a.chunk.0;
    let name = a.name.clone().unwrap_or_else(|| source_name(&a.source));
    let ranges = |r: &Option<Ranges>, what: &str| -> anyhow::Result<Vec<BlockRange>> {
        r.iter()
            .flat_map(|r| r.0.iter())
            .map(|&(s, l)| {
                if !s.is_multiple_of(bs) || !l.is_multiple_of(bs) {
                    bail!("--{what} {s}+{l}: not a multiple of the source's block size {bs}");
                }
                if s.saturating_add(l) > source.size_bytes() {
                    bail!(
                        "--{what} {s}+{l}: past the end of the source ({} bytes)",
                        source.size_bytes()
                    );
                }
                Ok(BlockRange::new(s / bs, l / bs))
            })
            .collect()
    };
    let scope = Scope {
        include: ranges(&a.include, "include")?,
        exclude: ranges(&a.exclude, "exclude")?,
        skip_unallocated: true,
    };
    let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::SLEEP))?;
    let home = rt.reactor(1).clone();
    // The parent: the newest complete generation of this source.
    let repo_desc = reg.open("repo", true)?;
    let (parent, note) = if a.incremental {
        let d = repo_desc.clone();
        let n = name.clone();
        let latest = rt
            .exec(0, move || -> Result<Option<(u64, u32, u64)>, String> {
                let mut io = ChannelIo::new(d.channel().map_err(|e| e.to_string())?);
                let repo = Repo::open(&mut io).map_err(|e| e.to_string())?;
                Ok(repo
                    .generations()
                    .iter()
                    .rev()
                    .find(|g| g.source.name == n && g.state == GenState::Complete)
                    .map(|g| (g.id, g.chunk_size, g.source.size_bytes)))
            })?
            .map_err(anyhow::Error::msg)
            .context("reading the repository")?;
        match latest {
            Some((id, cs, size)) if cs as u64 == chunk && size == source.size_bytes() => (
                Some(id),
                Some(format!(
                    "incremental from generation {id}: no change tracking on an offline source, so every chunk is read and compared by checksum with the parent; only chunks that differ are stored"
                )),
            ),
            Some((id, cs, _)) => (
                None,
                Some(format!(
                    "generation {id} of {name} does not match (chunk size {cs}, or another source size): running a full backup"
                )),
            ),
            None => (
                None,
                Some(format!(
                    "no complete generation of {name} in the repository: running a full backup"
                )),
            ),
        }
    } else {
        (None, None)
    };
    let spec = GenSpec {
        source: SourceIdent {
            name: name.clone(),
            size_bytes: source.size_bytes(),
        },
        chunk_size: u32::try_from(chunk).context("chunk size")?,
        parent,
        compare_with_parent: parent.is_some(),
    };
    let target = Arc::new(RepoTarget::begin(repo_desc, &home, spec)?);
    let generation = target.generation();
    hotcopy_cow::create(&reg, "vol", "source")?;
    let cow = reg.lookup("vol")?;
    hotcopy_bdev::modules::malloc::create(&reg, "container", 64 * chunk, bs as u32)?;
    let cfg = BackupConfig {
        target: target.clone(),
        container: ContainerConfig {
            desc: reg.open("container", true)?,
            offset_blocks: 0,
            slots: 64,
        },
        chunk_size: chunk,
        scope,
        tuning: JobTuning::default(),
        changed_since: None,
    };
    if let Some(n) = &note {
        if !a.json {
            eprintln!("hotcopy: {n}");
        }
    }
    let started = Instant::now();
    let job = hotcopy_cow::start_backup(&cow, &home, cfg)?;
    let bar = (!a.json).then(|| {
        let b = ProgressBar::new(100);
        b.set_style(
            ProgressStyle::with_template("backup {bar:40.cyan/blue} {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    while !job.state().is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(b) = &bar {
            let s = job.status();
            b.set_position(100 * s.chunks_done / s.chunks_in_scope.max(1));
            b.set_message(format!("{:.0} MiB/s", s.backup_mibps));
        }
    }
    let state = job.wait(Duration::from_secs(60));
    let st = job.status();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if state != JobState::Complete {
        bail!(
            "the backup {}: {}; generation {generation} was removed",
            format!("{state:?}").to_lowercase(),
            st.error.unwrap_or_default()
        );
    }
    let secs = started.elapsed().as_secs_f64();
    // What the repository recorded.
    let d = reg.open("repo", false)?;
    let g = rt
        .exec(0, move || -> Result<_, String> {
            let mut io = ChannelIo::new(d.channel().map_err(|e| e.to_string())?);
            let repo = Repo::open(&mut io).map_err(|e| e.to_string())?;
            repo.generation(generation)
                .cloned()
                .ok_or_else(|| format!("generation {generation} is not in the repository"))
        })?
        .map_err(anyhow::Error::msg)?;
    rt.shutdown();
    let report = RunReport {
        generation,
        kind: if parent.is_some() {
            "incremental"
        } else {
            "full"
        },
        parent,
        source: name,
        size_bytes: g.source.size_bytes,
        chunk_size: chunk,
        chunks_total: g.chunks_total,
        chunks_in_scope: st.chunks_in_scope,
        chunks_stored: g.chunks_stored,
        zero_chunks: g.zero_chunks,
        chunks_absent: g.chunks_absent,
        bytes_stored: g.bytes_stored,
        seconds: secs,
        read_mibps: st.copy_mibps + st.drain_mibps,
        note,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "generation {} ({}{}) of {}: {} chunks, {} stored ({}), {} zero, {} outside the scope; {:.1} s, {:.0} MiB/s read",
            report.generation,
            report.kind,
            parent.map(|p| format!(" from {p}")).unwrap_or_default(),
            report.source,
            report.chunks_total,
            report.chunks_stored,
            ByteSize(report.bytes_stored),
            report.zero_chunks,
            report.chunks_absent,
            report.seconds,
            report.read_mibps
        );
    }
    Ok(ExitCode::SUCCESS)
}
