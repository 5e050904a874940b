//! `hotcopy bench repo`: what the backup repository costs and delivers.
//!
//! On a source with a cow bdev (with change tracking) and a repository on
//! the backup namespace, one run measures:
//!
//! * a full online backup, then incrementals after changing a given fraction
//!   of the chunks (time against the fraction changed);
//! * more small incrementals up to generation 50, then the cost of opening
//!   the repository (in full, and for reading as a restore does), loading
//!   generation 1's and generation 50's index and resolving every chunk,
//!   and the time to restore each of them (they should match: every index
//!   is complete, so a chain's length costs nothing, and the restore
//!   gathers a fragmented generation's chunks into 1 MiB writes), with each
//!   restore's wall time, copy time, reads and writes;
//! * restore MiB/s against the destination's sequential-write ceiling
//!   (1 MiB writes at QD16), measured in the same run around each pair of
//!   restores (before the first pair and after each), each pair's ratio
//!   taken to the mean of the two runs that bracket it;
//! * instant restore: the latency of first reads of chunks not yet hydrated,
//!   at QD1, while the hydrator runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hotcopy_bdev::{testing, BdevIo, BdevRegistry, IoStatus};
use hotcopy_cow::repo::{ChannelIo, GenSpec, Repo, SourceIdent};
use hotcopy_cow::repo_bdev::{restore_to_on, start_instant_restore, InstantTuning};
use hotcopy_cow::{BackupConfig, ContainerConfig, JobState, JobTuning, RepoTarget, Scope};
use hotcopy_runtime::{clock, DmaBuf, Runtime};
use serde::Serialize;

use crate::Latency;

/// Options of the run.
#[derive(Debug, Clone)]
pub struct RepoBenchParams {
    pub chunk_size: u64,
    /// Fractions of the chunks changed before each measured incremental.
    pub fractions: Vec<f64>,
    /// Generations to reach before comparing generation 1 with the last.
    pub generations: u64,
    /// First reads measured on the instant-restore bdev.
    pub first_reads: usize,
    pub seed: u64,
}

/// Bdevs the run uses, registered already: `source` (with nothing on it),
/// `namespace` for the repository, `dest` for restores (as large as the
/// source), and the cow bdev `cow` is created on `source` by the run.
pub struct RepoBenchBdevs {
    pub source: String,
    pub namespace: String,
    pub dest: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupTiming {
    pub generation: u64,
    pub fraction_changed: f64,
    pub chunks_changed: u64,
    pub chunks_stored: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationCost {
    pub generation: u64,
    /// Opening the repository for reading (`Repo::open_reader`: the
    /// superblocks and the catalog), on its own, as `restore_to` does
    /// before loading the index.
    pub repo_open_ms: f64,
    /// Opening it in full (`Repo::open`, which reads every generation's
    /// index), as the tools that change or verify it do.
    pub repo_open_full_ms: f64,
    pub index_load_ms: f64,
    pub resolve_ns_per_chunk: f64,
    /// Median of the restores' wall times (`restore_to_on` over every
    /// reactor, from opening the repository to the destination's flush).
    pub restore_s: f64,
    pub restore_mibps: f64,
    /// Each restore's wall time, in the order they ran.
    pub restore_runs_s: Vec<f64>,
    /// Median of the restores' copy times (the engine alone: without
    /// opening the repository and loading the index).
    pub restore_copy_s: f64,
    /// Namespace reads and destination writes of one restore, and its data
    /// runs gathered from several reads.
    pub restore_reads: u64,
    pub restore_writes: u64,
    pub restore_gathered_runs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstantReport {
    pub generation: u64,
    pub first_reads: u64,
    pub latency_us: Latency,
    /// Reads served by the backup (chunk not yet hydrated when read).
    pub chunks_done_at_end: u64,
    pub chunks_total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepoBenchReport {
    pub source_bytes: u64,
    pub chunk_size: u64,
    pub full: BackupTiming,
    pub incrementals: Vec<BackupTiming>,
    pub first: GenerationCost,
    pub last: GenerationCost,
    /// Last generation's restore time over the first's.
    pub restore_ratio: f64,
    /// The median of `ceiling_runs_mibps`.
    pub dest_write_ceiling_mibps: f64,
    /// The destination's sequential-write ceiling, measured before the
    /// first pair of restores and after each pair (2 s each).
    pub ceiling_runs_mibps: Vec<f64>,
    /// Each pair's better restore MiB/s over the ceiling that brackets it
    /// (the mean of the runs just before and just after the pair); the
    /// median over the pairs. The disk's speed drifts by tens of per cent
    /// over seconds, so a ceiling measured once, away from the restores,
    /// can move the ratio more than the restore does.
    pub restore_to_ceiling: f64,
    /// The same for the copy alone (see `GenerationCost::restore_copy_s`).
    pub restore_copy_to_ceiling: f64,
    pub instant: InstantReport,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Runs everything; `say` gets a line per step (for a progress display).
pub fn run_repo(
    rt: &Runtime,
    reg: &BdevRegistry,
    b: &RepoBenchBdevs,
    p: &RepoBenchParams,
    mut say: impl FnMut(&str),
) -> Result<RepoBenchReport, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let src = reg.open(&b.source, true).map_err(|x| e(&x))?;
    let size = src.bdev().size_bytes();
    let bs = src.bdev().block_size() as u64;
    let chunks = size.div_ceil(p.chunk_size);
    say("filling the source");
    crate::cow::fill_source(rt, &src, 4096)?;
    drop(src);
    let ns = reg.open(&b.namespace, true).map_err(|x| e(&x))?;
    {
        let ns = ns.clone();
        rt.exec(0, move || -> Result<(), String> {
            let mut io = ChannelIo::new(ns.channel().map_err(|x| x.to_string())?);
            Repo::format(&mut io, true).map_err(|x| x.to_string())?;
            Ok(())
        })
        .map_err(|x| e(&x))??;
    }
    let cbt = Arc::new(hotcopy_cow::Cbt::new("vol", size, bs, p.chunk_size));
    let cow =
        hotcopy_cow::create_with(reg, "vol", &b.source, Some(cbt.clone())).map_err(|x| e(&x))?;
    hotcopy_bdev::modules::malloc::create(reg, "repo_bench_cont", 64 * p.chunk_size, bs as u32)
        .map_err(|x| e(&x))?;
    let home = rt.reactor(rt.num_reactors() - 1).clone();
    let backup = |parent: Option<u64>| -> Result<(u64, f64), String> {
        let spec = GenSpec {
            source: SourceIdent {
                name: "vol".into(),
                size_bytes: size,
            },
            chunk_size: p.chunk_size as u32,
            parent,
            compare_with_parent: false,
        };
        let t = Instant::now();
        let target = Arc::new(RepoTarget::begin(ns.clone(), &home, spec).map_err(|x| e(&x))?);
        let gen = target.generation();
        let cfg = BackupConfig {
            target,
            container: ContainerConfig {
                desc: reg.open("repo_bench_cont", true).map_err(|x| e(&x))?,
                offset_blocks: 0,
                slots: 64,
            },
            chunk_size: p.chunk_size,
            scope: Scope::all(),
            tuning: JobTuning::default(),
            changed_since: parent,
        };
        let job = hotcopy_cow::start_backup(&cow, &home, cfg).map_err(|x| e(&x))?;
        let st = job.wait(Duration::from_secs(3600));
        if st != JobState::Complete {
            return Err(format!(
                "backup of generation {gen}: {st:?} {}",
                job.status().error.unwrap_or_default()
            ));
        }
        Ok((gen, t.elapsed().as_secs_f64()))
    };
    let stored = |gen: u64| -> Result<u64, String> {
        let ns = ns.clone();
        rt.exec(0, move || -> Result<u64, String> {
            let mut io = ChannelIo::new(ns.channel().map_err(|x| x.to_string())?);
            let r = Repo::open(&mut io).map_err(|x| x.to_string())?;
            r.generation(gen)
                .map(|g| g.chunks_stored)
                .ok_or_else(|| format!("no generation {gen}"))
        })
        .map_err(|x| e(&x))?
    };
    let vol = reg.open("vol", true).map_err(|x| e(&x))?;
    let mut rng = p.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    // Writes 4 KiB into `n` distinct random chunks through the cow bdev.
    let mut change = |n: u64, round: u64| -> Result<u64, String> {
        let mut picked = vec![false; chunks as usize];
        let mut list = Vec::with_capacity(n as usize);
        while (list.len() as u64) < n.min(chunks) {
            let c = xorshift(&mut rng) % chunks;
            if !std::mem::replace(&mut picked[c as usize], true) {
                list.push(c);
            }
        }
        let vol = vol.clone();
        let cs = p.chunk_size;
        rt.exec(0, move || -> Result<(), String> {
            let mut ch = vol.channel().map_err(|x| x.to_string())?;
            let bs = ch.block_size() as u64;
            let mut buf = DmaBuf::alloc(4096).map_err(|x| x.to_string())?;
            for c in list {
                buf.fill((round as u8).wrapping_add(c as u8) | 1);
                let mut io =
                    testing::run_io(&mut ch, BdevIo::write(c * cs / bs, 4096 / bs, buf, 0));
                if io.status != IoStatus::Success {
                    return Err(format!("changing chunk {c}: {:?}", io.status));
                }
                buf = io.take_buf().ok_or("the write kept its buffer")?;
            }
            Ok(())
        })
        .map_err(|x| e(&x))??;
        Ok(n.min(chunks))
    };
    say("full backup");
    let (g1, secs) = backup(None)?;
    let full = BackupTiming {
        generation: g1,
        fraction_changed: 1.0,
        chunks_changed: chunks,
        chunks_stored: stored(g1)?,
        seconds: secs,
    };
    let mut last = g1;
    let mut incrementals = Vec::new();
    for (i, f) in p.fractions.iter().enumerate() {
        let n = ((chunks as f64 * f).round() as u64).max(1);
        say(&format!(
            "incremental after changing {:.0}% of the chunks",
            f * 100.0
        ));
        let changed = change(n, i as u64 + 1)?;
        let (g, secs) = backup(Some(last))?;
        incrementals.push(BackupTiming {
            generation: g,
            fraction_changed: *f,
            chunks_changed: changed,
            chunks_stored: stored(g)?,
            seconds: secs,
        });
        last = g;
    }
    let mut round = 100;
    while last < p.generations.max(2) {
        say(&format!("incremental {}", last + 1));
        change((chunks / 100).max(1), round)?;
        round += 1;
        last = backup(Some(last))?.0;
    }
    let cost = |gen: u64| -> Result<GenerationCost, String> {
        let ns = ns.clone();
        let (open_ms, open_full_ms, load_ms, per_chunk) = rt
            .exec(0, move || -> Result<(f64, f64, f64, f64), String> {
                let mut io = ChannelIo::new(ns.channel().map_err(|x| x.to_string())?);
                let t = Instant::now();
                Repo::open(&mut io).map_err(|x| x.to_string())?;
                let open_full = t.elapsed().as_secs_f64() * 1e3;
                let t = Instant::now();
                let r = Repo::open_reader(&mut io).map_err(|x| x.to_string())?;
                let open = t.elapsed().as_secs_f64() * 1e3;
                let t = Instant::now();
                let idx = r.index(&mut io, gen).map_err(|x| x.to_string())?;
                let load = t.elapsed().as_secs_f64() * 1e3;
                let t = Instant::now();
                let mut data = 0u64;
                for _ in 0..10 {
                    for c in 0..idx.chunks() {
                        if let Some(e) = idx.resolve(std::hint::black_box(c)) {
                            data += matches!(e.loc, hotcopy_cow::repo::ChunkLoc::Data(_)) as u64;
                        }
                    }
                }
                std::hint::black_box(data);
                let ns_per = t.elapsed().as_nanos() as f64 / (10 * idx.chunks()) as f64;
                Ok((open, open_full, load, ns_per))
            })
            .map_err(|x| e(&x))??;
        Ok(GenerationCost {
            generation: gen,
            repo_open_ms: open_ms,
            repo_open_full_ms: open_full_ms,
            index_load_ms: load_ms,
            resolve_ns_per_chunk: per_chunk,
            restore_s: 0.0,
            restore_mibps: 0.0,
            restore_runs_s: Vec::new(),
            restore_copy_s: 0.0,
            restore_reads: 0,
            restore_writes: 0,
            restore_gathered_runs: 0,
        })
    };
    let restore_secs = |gen: u64, c: &mut GenerationCost, copy: &mut Vec<f64>| {
        let t = Instant::now();
        let r = restore_to_on(reg, &b.namespace, gen, &b.dest, rt.reactors(), 0, |_, _| {})
            .map_err(|x| format!("restoring generation {gen}: {x}"))?;
        c.restore_runs_s.push(t.elapsed().as_secs_f64());
        copy.push(r.elapsed.as_secs_f64());
        (c.restore_reads, c.restore_writes) = (r.reads, r.writes);
        c.restore_gathered_runs = r.gathered_runs;
        Ok::<(), String>(())
    };
    say("restoring the first and the last generation");
    let mut first = cost(g1)?;
    let mut lastc = cost(last)?;
    // One restore to warm the destination (its first writes allocate the
    // file's blocks), then alternate, three each; medians.
    restore_secs(last, &mut lastc.clone(), &mut Vec::new())?;
    // The destination's sequential-write ceiling, before the pairs and
    // after each, so that each pair's ratio is to the ceiling around it.
    let ceiling_run = || {
        crate::seq_ceiling(
            rt,
            reg,
            &b.dest,
            crate::Workload::Write,
            16,
            Duration::from_secs(2),
        )
    };
    say("restoring, with the destination's write ceiling measured around each pair");
    let mut ceilings = vec![ceiling_run()?];
    let (mut c1, mut c2) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        restore_secs(g1, &mut first, &mut c1)?;
        restore_secs(last, &mut lastc, &mut c2)?;
        ceilings.push(ceiling_run()?);
    }
    use crate::median;
    let mib = size as f64 / (1024.0 * 1024.0);
    for (c, copy) in [(&mut first, &c1), (&mut lastc, &c2)] {
        c.restore_s = median(&c.restore_runs_s);
        c.restore_mibps = mib / c.restore_s.max(1e-9);
        c.restore_copy_s = median(copy);
    }
    // Per pair: the better restore (wall, and copy alone) over the mean
    // of the ceilings before and after it.
    let pair_ratio = |a: &[f64], b: &[f64]| -> f64 {
        let r: Vec<f64> = (0..a.len().min(b.len()))
            .map(|i| {
                let bracket = (ceilings[i] + ceilings[i + 1]) / 2.0;
                mib / a[i].min(b[i]).max(1e-9) / bracket.max(1e-9)
            })
            .collect();
        median(&r)
    };
    let restore_to_ceiling = pair_ratio(&first.restore_runs_s, &lastc.restore_runs_s);
    let restore_copy_to_ceiling = pair_ratio(&c1, &c2);
    let ceiling = median(&ceilings);
    say("instant restore: first reads");
    let instant = first_reads(rt, reg, b, p, last, &home)?;
    Ok(RepoBenchReport {
        source_bytes: size,
        chunk_size: p.chunk_size,
        full,
        incrementals,
        restore_ratio: lastc.restore_s / first.restore_s.max(1e-9),
        restore_to_ceiling,
        restore_copy_to_ceiling,
        first,
        last: lastc,
        dest_write_ceiling_mibps: ceiling,
        ceiling_runs_mibps: ceilings,
        instant,
    })
}

/// Starts an instant restore of `gen` onto the destination and reads 4 KiB
/// from distinct random chunks at QD1 while it hydrates.
fn first_reads(
    rt: &Runtime,
    reg: &BdevRegistry,
    b: &RepoBenchBdevs,
    p: &RepoBenchParams,
    gen: u64,
    home: &hotcopy_runtime::ReactorHandle,
) -> Result<InstantReport, String> {
    let (bdev, ir) = start_instant_restore(
        reg,
        "instant",
        &b.namespace,
        gen,
        &b.dest,
        home,
        InstantTuning::default(),
    )
    .map_err(|x| x.to_string())?;
    let desc = bdev.open(false).map_err(|x| x.to_string())?;
    let cs = p.chunk_size;
    let n = p.first_reads;
    let seed = p.seed;
    let hist = rt
        .exec(0, move || -> Result<(Histogram<u64>, u64), String> {
            let mut ch = desc.channel().map_err(|x| x.to_string())?;
            let bs = ch.block_size() as u64;
            let chunks = ch.num_blocks() * bs / cs;
            let mut rng = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
            let mut seen = vec![false; chunks as usize];
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
                .map_err(|x| x.to_string())?;
            let mut buf = DmaBuf::alloc(4096).map_err(|x| x.to_string())?;
            let mut done = 0;
            while done < n.min(chunks as usize) {
                let c = xorshift(&mut rng) % chunks;
                if std::mem::replace(&mut seen[c as usize], true) {
                    continue;
                }
                let t = clock::ticks();
                let mut io = testing::run_io(&mut ch, BdevIo::read(c * cs / bs, 4096 / bs, buf, 0));
                h.saturating_record(clock::ticks() - t);
                if io.status != IoStatus::Success {
                    return Err(format!("first read of chunk {c}: {:?}", io.status));
                }
                buf = io.take_buf().ok_or("the read kept its buffer")?;
                done += 1;
            }
            Ok((h, done as u64))
        })
        .map_err(|x| x.to_string())??;
    let st = ir.status();
    ir.cancel();
    ir.wait(Duration::from_secs(60));
    Ok(InstantReport {
        generation: gen,
        first_reads: hist.1,
        latency_us: Latency::from_ticks(&hist.0),
        chunks_done_at_end: st.chunks_done,
        chunks_total: st.chunks_total,
    })
}
