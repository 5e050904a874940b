//! Online backups into a repository: full and incremental generations taken
//! while writers run restore to exactly the source at each consistency
//! point; change tracking survives a clean restart, and after a crash the
//! next backup must be full.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hotcopy_bdev::modules::{malloc, uring};
use hotcopy_bdev::{BdevDesc, BdevRegistry, IoStatus};
use hotcopy_cow::repo::{ChannelIo, GenSpec, MemIo, Repo, SourceIdent};
use hotcopy_cow::{
    start_backup, BackupConfig, Cbt, CbtOpen, CbtStore, ContainerConfig, CowError, JobState,
    JobTuning, RepoTarget, Scope,
};
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};
use hotcopy_tests::*;

const BS: u64 = 512;
const CHUNK: u64 = 64 << 10;
const SOURCE_BYTES: u64 = 4 << 20;
const CHUNKS: u64 = SOURCE_BYTES / CHUNK;

fn runtime() -> Runtime {
    Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::Poll)).unwrap()
}

fn read_all(rt: &Runtime, desc: &BdevDesc) -> Vec<u8> {
    let desc = desc.clone();
    rt.exec(0, move || {
        let mut ch = desc.channel().unwrap();
        let bs = ch.block_size() as u64;
        let bytes = ch.num_blocks() * bs;
        let mut out = Vec::with_capacity(bytes as usize);
        let mut off = 0;
        while off < bytes {
            let len = (1u64 << 20).min(bytes - off);
            out.extend(read(&mut ch, off / bs, len / bs).expect("read back"));
            off += len;
        }
        out
    })
    .unwrap()
}

fn write_at(rt: &Runtime, desc: &BdevDesc, offset: u64, data: Vec<u8>) {
    let desc = desc.clone();
    rt.exec(0, move || {
        let mut ch = desc.channel().unwrap();
        let bs = ch.block_size() as u64;
        assert_eq!(write(&mut ch, offset / bs, &data), IoStatus::Success);
    })
    .unwrap();
}

/// Runs `f` with the repository on `ns`, on reactor 0.
fn with_repo<T: Send + 'static>(
    rt: &Runtime,
    ns: &BdevDesc,
    f: impl FnOnce(&mut Repo, &mut ChannelIo) -> T + Send + 'static,
) -> T {
    let ns = ns.clone();
    rt.exec(0, move || {
        let mut io = ChannelIo::new(ns.channel().unwrap());
        let mut repo = Repo::open(&mut io).expect("repository opens");
        f(&mut repo, &mut io)
    })
    .unwrap()
}

fn format(rt: &Runtime, ns: &BdevDesc) {
    let ns = ns.clone();
    rt.exec(0, move || {
        let mut io = ChannelIo::new(ns.channel().unwrap());
        Repo::format(&mut io, true).expect("format");
    })
    .unwrap();
}

/// The content of generation `gen`, restored into memory.
fn restore(rt: &Runtime, ns: &BdevDesc, gen: u64) -> Vec<u8> {
    with_repo(rt, ns, move |repo, io| {
        let mut dst = MemIo::new(SOURCE_BYTES, BS as u32);
        repo.restore(io, gen, &mut dst, &mut |_, _| {})
            .expect("restore");
        dst.data
    })
}

fn container(reg: &BdevRegistry, name: &str, slots: u32) -> ContainerConfig {
    malloc::create(reg, name, CHUNK * slots as u64, BS as u32).unwrap();
    ContainerConfig {
        desc: reg.open(name, true).unwrap(),
        offset_blocks: 0,
        slots,
    }
}

fn spec(parent: Option<u64>) -> GenSpec {
    GenSpec {
        source: SourceIdent {
            name: "vol".into(),
            size_bytes: SOURCE_BYTES,
        },
        chunk_size: CHUNK as u32,
        parent,
        compare_with_parent: false,
    }
}

/// Starts a backup of `cow` into the repository on `ns` and waits for it.
fn backup(
    rt: &Runtime,
    reg: &BdevRegistry,
    cow_name: &str,
    ns: &BdevDesc,
    parent: Option<u64>,
    container_name: &str,
) -> Result<(hotcopy_cow::BackupJob, u64), CowError> {
    let cow = reg.lookup(cow_name).unwrap();
    let target = Arc::new(RepoTarget::begin(ns.clone(), rt.reactor(1), spec(parent))?);
    let gen = target.generation();
    let cfg = BackupConfig {
        target,
        container: container(reg, container_name, 8),
        chunk_size: CHUNK,
        scope: Scope::all(),
        tuning: JobTuning {
            max_queue_depth: 4,
            ..JobTuning::default()
        },
        changed_since: parent,
    };
    let job = start_backup(&cow, rt.reactor(1), cfg)?;
    Ok((job, gen))
}

#[test]
fn online_full_and_incremental_generations_restore_to_each_consistency_point() {
    let rt = runtime();
    let reg = BdevRegistry::new();
    malloc::create(&reg, "src", SOURCE_BYTES, BS as u32).unwrap();
    malloc::create(&reg, "ns", 64 << 20, BS as u32).unwrap();
    let ns = reg.open("ns", true).unwrap();
    format(&rt, &ns);
    let mut image = pattern(0xBEEF, SOURCE_BYTES as usize);
    let src = reg.open("src", true).unwrap();
    write_at(&rt, &src, 0, image.clone());
    let cbt = Arc::new(Cbt::new("vol", SOURCE_BYTES, BS, CHUNK));
    hotcopy_cow::create_with(&reg, "vol", "src", Some(cbt.clone())).unwrap();
    let vol = reg.open("vol", true).unwrap();

    let mut expected = Vec::new();
    let mut parent = None;
    // Chunks written since the last consistency point.
    let mut changed: BTreeSet<u64> = BTreeSet::new();
    let chunks_of = |set: &mut BTreeSet<u64>, writes: &[Write]| {
        for &(s, n, _) in writes {
            set.extend((s * BS / CHUNK)..=((s + n) * BS - 1) / CHUNK);
        }
    };
    for round in 0..6u64 {
        // Writers touch a few chunks: small writes, some rounds skip half the device.
        let writers = Writers::start(
            &rt,
            &vol,
            WriterSpec {
                rng_seeds: vec![round * 31 + 7, round * 17 + 3],
                qd: 4,
                max_blocks: 16,
                skip: if round % 2 == 0 {
                    |_, _| false
                } else {
                    |s, _| s % 4096 >= 1024
                },
            },
        );
        std::thread::sleep(Duration::from_millis(20));
        let (job, gen) =
            backup(&rt, &reg, "vol", &ns, parent, &format!("cont{round}")).expect("the job starts");
        let state = job.wait(Duration::from_secs(60));
        let status = job.status();
        let outcomes = writers.stop();
        assert_eq!(state, JobState::Complete, "round {round}: {status:?}");
        assert_eq!(status.generation, Some(gen));
        for o in &outcomes {
            assert_eq!(o.errors, 0, "a foreground write failed");
        }
        let t0 = job.shared().t0_writes.lock().unwrap().clone();
        let mut at_t0 = image.clone();
        let mut after = BTreeSet::new();
        for (core, o) in outcomes.iter().enumerate() {
            let k = t0_count(&t0, "vol", core) as usize;
            apply_writes(&mut at_t0, &o.log[..k], BS);
            apply_writes(&mut image, &o.log, BS);
            chunks_of(&mut changed, &o.log[..k]);
            chunks_of(&mut after, &o.log[k..]);
        }
        // An incremental stores what changed since its parent's consistency
        // point, plus what writers captured while it ran (they are the
        // chunks written after this one's).
        let g = with_repo(&rt, &ns, move |r, _| r.generation(gen).cloned().unwrap());
        assert_eq!(g.parent, parent);
        if round > 0 {
            let bound = changed.union(&after).count() as u64;
            assert!(
                g.chunks_stored <= bound,
                "round {round}: stored {} chunks; only {bound} were written",
                g.chunks_stored
            );
        }
        changed = after;
        expected.push((gen, at_t0));
        parent = Some(gen);
        assert_eq!(read_all(&rt, &src), image, "a write was lost on the source");
    }
    for (gen, want) in &expected {
        assert!(
            restore(&rt, &ns, *gen) == *want,
            "generation {gen} is not the source at its consistency point"
        );
    }
    let report = with_repo(&rt, &ns, |r, io| r.verify(io, None).unwrap());
    assert!(report.is_ok(), "{:?}", report.messages());
    rt.shutdown();
}

struct Files<'a> {
    dir: &'a Path,
}

impl Files<'_> {
    /// A fresh registry on the same files: a restart of the appliance.
    fn registry(&self) -> BdevRegistry {
        let reg = BdevRegistry::new();
        for (name, file, size) in [
            ("src", "src.img", SOURCE_BYTES),
            ("ns", "repo.img", 32 << 20),
            ("cbt", "cbt.img", 1 << 20),
        ] {
            let opts = uring::UringOptions {
                size: Some(size),
                ..uring::UringOptions::new(self.dir.join(file))
            };
            uring::create(&reg, name, &opts).unwrap();
        }
        reg
    }
}

fn open_tracking(rt: &Runtime, reg: &BdevRegistry) -> (Arc<Cbt>, CbtOpen) {
    let cbt = Arc::new(Cbt::new("vol", SOURCE_BYTES, BS, CHUNK));
    let store = reg.open("cbt", true).unwrap();
    let c = cbt.clone();
    let opened = rt
        .exec(0, move || {
            let mut io = ChannelIo::new(store.channel().unwrap());
            c.open(&mut io, &CbtStore { offset: 0 }).unwrap()
        })
        .unwrap();
    (cbt, opened)
}

fn close_tracking(rt: &Runtime, reg: &BdevRegistry, cbt: &Arc<Cbt>) {
    let store = reg.open("cbt", true).unwrap();
    let c = cbt.clone();
    rt.exec(0, move || {
        let mut io = ChannelIo::new(store.channel().unwrap());
        c.close(&mut io, &CbtStore { offset: 0 }).unwrap();
    })
    .unwrap();
}

fn touch(rt: &Runtime, vol: &BdevDesc, chunks: &[u64], seed: u64) {
    for &c in chunks {
        write_at(rt, vol, c * CHUNK + 4096, pattern(seed ^ c, 4096));
    }
}

#[test]
fn change_tracking_survives_a_clean_restart_and_a_crash_forces_a_full_backup() {
    let dir = scratch_dir();
    let files = Files { dir: dir.path() };

    // First run: a full backup, then writes to three chunks, then a clean stop.
    let g1 = {
        let rt = runtime();
        let reg = files.registry();
        let ns = reg.open("ns", true).unwrap();
        format(&rt, &ns);
        write_at(
            &rt,
            &reg.open("src", true).unwrap(),
            0,
            pattern(1, SOURCE_BYTES as usize),
        );
        let (cbt, opened) = open_tracking(&rt, &reg);
        assert_eq!(opened, CbtOpen::Fresh);
        hotcopy_cow::create_with(&reg, "vol", "src", Some(cbt.clone())).unwrap();
        let (job, g1) = backup(&rt, &reg, "vol", &ns, None, "c1").unwrap();
        assert_eq!(job.wait(Duration::from_secs(60)), JobState::Complete);
        assert_eq!(cbt.base().map(|b| b.generation), Some(g1));
        assert_eq!(
            cbt.marked(),
            0,
            "tracking restarts at the consistency point"
        );
        touch(&rt, &reg.open("vol", true).unwrap(), &[3, 17, 40], 9);
        drop(job);
        close_tracking(&rt, &reg, &cbt);
        rt.shutdown();
        g1
    };

    // Second run: the tracking is intact; the incremental stores exactly the
    // three chunks. Then more writes, and no clean stop (a crash).
    let g2 = {
        let rt = runtime();
        let reg = files.registry();
        let ns = reg.open("ns", true).unwrap();
        let (cbt, opened) = open_tracking(&rt, &reg);
        let CbtOpen::Intact(Some(base)) = opened else {
            panic!("tracking after a clean stop: {opened:?}");
        };
        assert_eq!(base.generation, g1);
        let marked: BTreeSet<u64> = (0..CHUNKS).filter(|&c| cbt.is_marked(c)).collect();
        assert_eq!(marked, BTreeSet::from([3, 17, 40]));
        hotcopy_cow::create_with(&reg, "vol", "src", Some(cbt.clone())).unwrap();
        let (job, g2) = backup(&rt, &reg, "vol", &ns, Some(g1), "c2").unwrap();
        assert_eq!(job.wait(Duration::from_secs(60)), JobState::Complete);
        let g = with_repo(&rt, &ns, move |r, _| r.generation(g2).cloned().unwrap());
        assert_eq!(g.parent, Some(g1));
        assert_eq!(
            g.chunks_stored, 3,
            "the incremental stores the changed chunks only"
        );
        let src = reg.open("src", false).unwrap();
        assert!(restore(&rt, &ns, g2) == read_all(&rt, &src));
        touch(&rt, &reg.open("vol", true).unwrap(), &[5], 11);
        drop(job);
        rt.shutdown(); // no close_tracking: the store still says "in use"
        g2
    };

    // Third run: the tracking is lost; an incremental is refused, a full works.
    let rt = runtime();
    let reg = files.registry();
    let ns = reg.open("ns", true).unwrap();
    let (cbt, opened) = open_tracking(&rt, &reg);
    assert!(matches!(opened, CbtOpen::Lost(_)), "{opened:?}");
    assert_eq!(cbt.base(), None);
    hotcopy_cow::create_with(&reg, "vol", "src", Some(cbt.clone())).unwrap();
    match backup(&rt, &reg, "vol", &ns, Some(g2), "c3") {
        Err(CowError::Config(why)) => assert!(why.contains("full backup"), "{why}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("an incremental ran on lost tracking"),
    }
    // The refused job's generation was removed, not left in progress.
    let gens = with_repo(&rt, &ns, |r, _| r.generations().to_vec());
    assert!(
        gens.iter()
            .all(|g| g.state == hotcopy_cow::repo::GenState::Complete),
        "{gens:?}"
    );
    let (job, g3) = backup(&rt, &reg, "vol", &ns, None, "c4").unwrap();
    assert_eq!(job.wait(Duration::from_secs(60)), JobState::Complete);
    let src = reg.open("src", false).unwrap();
    assert!(restore(&rt, &ns, g3) == read_all(&rt, &src));
    let report = with_repo(&rt, &ns, |r, io| r.verify(io, None).unwrap());
    assert!(report.is_ok(), "{:?}", report.messages());
    rt.shutdown();
}

/// Power cuts of the backup namespace at random moments of online backups
/// (full and incremental, from change tracking): after each one the
/// repository opens, every generation a job saw complete restores to that
/// job's consistency point, an interrupted one is either complete and exact
/// or listed in progress and removable, and verify passes.
#[test]
fn power_cuts_during_online_backups_never_lose_a_committed_generation() {
    const SRC: u64 = 2 << 20;
    let rt = runtime();
    let reg = BdevRegistry::new();
    malloc::create(&reg, "src", SRC, BS as u32).unwrap();
    malloc::create(&reg, "ns_base", 48 << 20, BS as u32).unwrap();
    let (_, ctl) = hotcopy_bdev::modules::fault::create(
        &reg,
        "ns",
        "ns_base",
        hotcopy_bdev::modules::fault::FaultOptions {
            volatile_cache: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ns = reg.open("ns", true).unwrap();
    format(&rt, &ns);
    // A slow namespace, so that cuts land inside jobs and commits.
    ctl.set_latency_us(40);
    let src = reg.open("src", true).unwrap();
    let mut image = pattern(0xFEED, SRC as usize);
    write_at(&rt, &src, 0, image.clone());
    let cbt = Arc::new(Cbt::new("vol", SRC, BS, CHUNK));
    let cow = hotcopy_cow::create_with(&reg, "vol", "src", Some(cbt.clone())).unwrap();
    let vol = reg.open("vol", true).unwrap();
    malloc::create(&reg, "cont", CHUNK * 4, BS as u32).unwrap();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    // Generations a job reported complete, with the image they must restore to.
    let mut committed: Vec<(u64, Vec<u8>)> = Vec::new();
    let (mut cut_mid_job, mut completed) = (0, 0);
    let mut history: Vec<String> = Vec::new();
    // At least 200 rounds, and more (up to 800) until at least 20 cuts
    // landed inside jobs and 20 after: on a loaded machine the sleep before
    // a cut overshoots and more jobs finish first.
    for round in 0..800u64 {
        if round >= 200 && cut_mid_job >= 20 && completed >= 20 {
            break;
        }
        // Change a few chunks (no job runs: the image is the consistency point).
        let mut touched = Vec::new();
        for _ in 0..1 + xorshift(&mut rng) % 4 {
            let c = xorshift(&mut rng) % (SRC / CHUNK);
            touched.push(c);
            let data = pattern(round << 8 | c, 8192);
            let off = c * CHUNK + (xorshift(&mut rng) % 8) * 8192;
            image[off as usize..off as usize + 8192].copy_from_slice(&data);
            write_at(&rt, &vol, off, data);
        }
        let parent = cbt.base().map(|b| b.generation);
        let spec = GenSpec {
            source: SourceIdent {
                name: "vol".into(),
                size_bytes: SRC,
            },
            ..spec(parent)
        };
        let target = match RepoTarget::begin(ns.clone(), rt.reactor(1), spec) {
            Ok(t) => Arc::new(t),
            Err(e) => panic!("round {round}: begin: {e}"),
        };
        let cfg = BackupConfig {
            target,
            container: ContainerConfig {
                desc: reg.open("cont", true).unwrap(),
                offset_blocks: 0,
                slots: 4,
            },
            chunk_size: CHUNK,
            scope: Scope::all(),
            tuning: JobTuning {
                max_queue_depth: 2,
                ..JobTuning::default()
            },
            changed_since: parent,
        };
        let job = start_backup(&cow, rt.reactor(1), cfg).expect("job starts");
        // Cut somewhere in the job; every fourth round, after it (between
        // jobs, which must not touch what was committed).
        if round % 4 == 3 {
            job.wait(Duration::from_secs(30));
        } else {
            std::thread::sleep(Duration::from_micros(xorshift(&mut rng) % 8_000));
        }
        ctl.power_cut();
        let state = job.wait(Duration::from_secs(30));
        ctl.power_on();
        let gen = job.status().generation;
        history.push(format!(
            "r{round}:{touched:?}->{:?}/{state:?}/p{parent:?}/{:?}",
            gen,
            job.status().error
        ));
        match state {
            JobState::Complete => {
                completed += 1;
                committed.push((
                    gen.expect("a complete job names its generation"),
                    image.clone(),
                ));
            }
            _ => cut_mid_job += 1,
        }
        // After the power comes back: open, check, tidy.
        let (gens, report) = with_repo(&rt, &ns, move |r, io| {
            let gens = r.generations().to_vec();
            for g in &gens {
                if g.state != hotcopy_cow::repo::GenState::Complete {
                    r.remove(io, g.id)
                        .expect("an incomplete generation is removable");
                }
            }
            let report = (round % 10 == 9).then(|| r.verify(io, None).unwrap());
            (gens, report)
        });
        if let Some(report) = report {
            assert!(report.is_ok(), "round {round}: {:?}", report.messages());
        }
        for (g, _) in &committed {
            assert!(
                gens.iter()
                    .any(|x| x.id == *g && x.state == hotcopy_cow::repo::GenState::Complete),
                "round {round}: committed generation {g} is gone: {gens:?}"
            );
        }
        // Every few rounds, restore a committed generation and compare.
        if round % 20 == 19 {
            for (g, want) in committed.iter().rev().take(3) {
                let got = with_repo(&rt, &ns, {
                    let g = *g;
                    move |r, io| {
                        let mut dst = MemIo::new(SRC, BS as u32);
                        r.restore(io, g, &mut dst, &mut |_, _| {}).unwrap();
                        dst.data
                    }
                });
                if got != *want {
                    let bad: Vec<u64> = (0..SRC / CHUNK)
                        .filter(|&c| {
                            let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
                            got[r.clone()] != want[r]
                        })
                        .collect();
                    let g2 = *g;
                    let b2 = bad.clone();
                    let info = with_repo(&rt, &ns, move |r, io| {
                        let idx = r.index(io, g2).unwrap();
                        let gens: Vec<String> = r
                            .generations()
                            .iter()
                            .map(|x| format!("{}:{:?}:p{:?}", x.id, x.state, x.parent))
                            .collect();
                        (
                            b2.iter()
                                .map(|&c| format!("{c}:{:?}", idx.resolve(c)))
                                .collect::<Vec<_>>(),
                            gens,
                        )
                    });
                    panic!(
                        "round {round}: generation {g} restores wrong in chunks {bad:?}: {info:?}; committed {:?}\n{}",
                        committed.iter().map(|x| x.0).collect::<Vec<_>>(),
                        history.join("\n")
                    );
                }
            }
        }
    }
    assert!(
        cut_mid_job >= 20 && completed >= 20,
        "the cuts should land both inside and after jobs: {cut_mid_job} inside, {completed} after"
    );
    rt.shutdown();
}

/// A `bytes`-byte RAM namespace `ns` behind a fault bdev (on `ns_base`),
/// and the fault bdev's control.
fn fault_ns(reg: &BdevRegistry, bytes: u64) -> hotcopy_bdev::modules::fault::FaultControl {
    malloc::create(reg, "ns_base", bytes, BS as u32).unwrap();
    let (_, ctl) = hotcopy_bdev::modules::fault::create(
        reg,
        "ns",
        "ns_base",
        hotcopy_bdev::modules::fault::FaultOptions::default(),
    )
    .unwrap();
    ctl
}

/// The commit's metadata I/O (the index, the catalog, the superblock and
/// their flushes) runs off the job's reactor: on a namespace that takes
/// 400 ms per I/O, reads of the volume on that reactor keep answering
/// while the commit takes several of those I/Os. Before, the commit ran on
/// the reactor and held every host I/O there until it was done (about 1 s
/// at 200 ms per I/O, so about 2 s here). The bound, 800 ms, leaves room
/// for a loaded machine's scheduling: at 200 ms per I/O and a 400 ms bound,
/// one CI run saw a read wait 538 ms while the test binary's other tests
/// ran beside it.
#[test]
fn the_commit_does_not_hold_the_jobs_reactor() {
    let rt = runtime();
    let reg = BdevRegistry::new();
    malloc::create(&reg, "src", SOURCE_BYTES, BS as u32).unwrap();
    let ctl = fault_ns(&reg, 64 << 20);
    let ns = reg.open("ns", true).unwrap();
    format(&rt, &ns);
    let image = pattern(0xC0DE, SOURCE_BYTES as usize);
    write_at(&rt, &reg.open("src", true).unwrap(), 0, image.clone());
    hotcopy_cow::create(&reg, "vol", "src").unwrap();
    let vol = reg.open("vol", true).unwrap();
    ctl.set_latency_us(400_000);
    let (job, gen) = backup(&rt, &reg, "vol", &ns, None, "cont").unwrap();
    // Host reads on the job's home reactor (1) until the job ends.
    let started = std::time::Instant::now();
    let (mut worst, mut samples) = (Duration::ZERO, 0);
    while !job.state().is_finished() {
        let t = std::time::Instant::now();
        let v = vol.clone();
        let ok = rt
            .exec(1, move || {
                let mut ch = v.channel().unwrap();
                read(&mut ch, 0, 8).is_ok()
            })
            .unwrap();
        assert!(ok, "a host read failed");
        worst = worst.max(t.elapsed());
        samples += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = started.elapsed();
    assert_eq!(job.state(), JobState::Complete, "{:?}", job.status());
    // The commit alone is several namespace I/Os of 400 ms each.
    assert!(took >= Duration::from_millis(1200), "the job took {took:?}");
    assert!(
        worst < Duration::from_millis(800),
        "a host read on the job's reactor waited {worst:?} ({samples} reads over {took:?})"
    );
    ctl.set_latency_us(0);
    assert!(restore(&rt, &ns, gen) == image, "the generation differs");
    rt.shutdown();
}

/// A namespace that stops answering fails the repository's operation with a
/// clear error instead of hanging or panicking the reactor, and the channel
/// keeps working once the device answers again (the late completion of the
/// request given up on is dropped, not taken for a later one).
#[test]
fn a_stalled_namespace_fails_the_operation_and_the_channel_recovers() {
    let rt = runtime();
    let reg = BdevRegistry::new();
    let ctl = fault_ns(&reg, 8 << 20);
    let ns = reg.open("ns", true).unwrap();
    format(&rt, &ns);
    let ctl2 = ctl.clone();
    let (stalled, listed) = rt
        .exec(0, move || {
            use hotcopy_cow::repo::BlockIo;
            let mut io = ChannelIo::with_timeout(ns.channel().unwrap(), Duration::from_millis(100));
            ctl2.set_latency_us(400_000);
            // The end of the namespace, which the repository does not use yet.
            let stalled = io
                .write((8 << 20) - 4096, &[0xAB; 4096])
                .unwrap_err()
                .to_string();
            ctl2.set_latency_us(0);
            // Let the given-up write land, then use the channel again.
            std::thread::sleep(Duration::from_millis(500));
            let listed = Repo::open(&mut io).map(|r| r.generations().len());
            (stalled, listed.map_err(|e| e.to_string()))
        })
        .unwrap();
    assert!(
        stalled.contains("write of 4096 bytes at byte 8384512 did not complete in 100 ms"),
        "{stalled}"
    );
    assert_eq!(listed, Ok(0));
    let _ = ctl;
}
