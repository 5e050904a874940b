//! Test harness for hotcopy's integration tests.
//!
//! [`on_reactor`] runs a test body on a fresh thread with its own reactor, so
//! the body can create channels and pollers and step the data path
//! deterministically with `poll_once`. [`scratch_dir`] gives a temporary
//! directory on a filesystem that accepts `O_DIRECT` (not tmpfs).
//! [`Writers`] runs concurrent, logged writers on the reactors of a runtime.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hotcopy_bdev::{BdevChannel, BdevDesc, BdevIo, IoStatus};
use hotcopy_runtime::{clear_current, DmaBuf, IdlePolicy, PollStatus, Poller, Reactor, Runtime};

pub use hotcopy_bdev::testing::*;

/// Runs `f` on a new thread that owns a reactor (core index 0), and returns
/// its result. Panics in `f` fail the calling test.
pub fn on_reactor<T: Send + 'static>(f: impl FnOnce(&Reactor) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let r = Reactor::new(0, IdlePolicy::Poll);
        let out = f(&r);
        drop(r);
        clear_current();
        out
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A temporary directory under /var/tmp (disk-backed, so O_DIRECT works).
pub fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("HOTCOPY_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix("hotcopy-test-")
        .tempdir_in(base)
        .expect("create scratch dir")
}

// ---- Concurrent writers ----------------------------------------------------

/// One logged write: first block, block count, data seed.
pub type Write = (u64, u64, u64);

/// One xorshift64 step: advances `x` (which must not be 0) and returns it.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Applies logged writes, in order, to `image` (a device of `block_size`
/// byte blocks): each write's blocks take the data a [`Writers`] writer wrote.
pub fn apply_writes(image: &mut [u8], writes: &[Write], block_size: u64) {
    for &(s, n, seed) in writes {
        image[(s * block_size) as usize..((s + n) * block_size) as usize]
            .copy_from_slice(&pattern(seed, (n * block_size) as usize));
    }
}

/// How many writes the channels of the bdev `bdev` on reactor `core` had
/// forwarded at a backup job's consistency point, from the job's `t0_writes`
/// (channel name and count).
pub fn t0_count(t0: &[(String, u64)], bdev: &str, core: usize) -> u64 {
    let prefix = format!("{bdev}/core{core}/");
    t0.iter()
        .filter(|(n, _)| n.starts_with(&prefix))
        .map(|(_, k)| *k)
        .sum()
}

/// What [`Writers::start`] runs.
pub struct WriterSpec {
    /// One writer per entry, on the reactor of the same index, starting its
    /// xorshift generator from this (nonzero) state. Writer `i` of `n` writes
    /// only in the `i`-th of `n` equal shares of the device.
    pub rng_seeds: Vec<u64>,
    /// Writes each writer keeps in flight.
    pub qd: usize,
    /// The largest write, in blocks (each write is 1 to this many).
    pub max_blocks: u64,
    /// A drawn write `(first block, blocks)` for which this is true is not
    /// issued.
    pub skip: fn(u64, u64) -> bool,
}

/// What one writer did: its writes in submission order, and how many failed.
#[derive(Debug, Clone)]
pub struct WriterOutcome {
    pub log: Vec<Write>,
    pub errors: u64,
}

struct WriterState {
    ch: BdevChannel,
    core: usize,
    block_size: u64,
    region: (u64, u64),
    max_blocks: u64,
    skip: fn(u64, u64) -> bool,
    rng: u64,
    seq: u64,
    inflight: Vec<(u64, u64)>,
    log: Vec<Write>,
    errors: u64,
    stop: Arc<AtomicBool>,
}

impl WriterState {
    fn try_issue(&mut self) {
        let (lo, hi) = self.region;
        let n = 1 + xorshift(&mut self.rng) % self.max_blocks;
        let start = lo + xorshift(&mut self.rng) % (hi - lo - n);
        if (self.skip)(start, n)
            || self
                .inflight
                .iter()
                .any(|&(s, l)| start < s + l && s < start + n)
        {
            return;
        }
        self.seq += 1;
        let seed = ((self.core as u64) << 40) | self.seq;
        let data = pattern(seed, (n * self.block_size) as usize);
        let buf = DmaBuf::from_slice(&data).unwrap();
        self.inflight.push((start, n));
        self.log.push((start, n, seed));
        self.ch.submit(BdevIo::write(start, n, buf, start));
    }

    fn poll(&mut self, qd: usize) -> usize {
        let mut finished = Vec::new();
        let n = self.ch.poll(&mut |io| finished.push((io.token, io.status)));
        for (start, status) in finished {
            if status != IoStatus::Success {
                self.errors += 1;
            }
            self.inflight.retain(|&(s, _)| s != start);
        }
        if !self.stop.load(Ordering::Relaxed) {
            while self.inflight.len() < qd {
                let before = self.inflight.len();
                self.try_issue();
                if self.inflight.len() == before {
                    break;
                }
            }
        }
        n
    }
}

type WriterSlot = Option<(Rc<RefCell<WriterState>>, Poller)>;

thread_local! {
    /// This reactor's writer and the poller that drives it.
    static WRITER: RefCell<WriterSlot> = const { RefCell::new(None) };
}

/// Concurrent writers: pollers on the reactors of a runtime that keep several
/// writes of [`pattern`] data in flight (never two overlapping ones) through
/// their own channels of one bdev, and log every write in submission order.
/// The data of write `(s, n, seed)` is `pattern(seed, n * block_size)`.
pub struct Writers<'a> {
    rt: &'a Runtime,
    stop: Arc<AtomicBool>,
    cores: usize,
}

impl<'a> Writers<'a> {
    /// Starts the writers of `spec` on `rt`, writing through `desc`.
    pub fn start(rt: &'a Runtime, desc: &BdevDesc, spec: WriterSpec) -> Writers<'a> {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = spec.rng_seeds.len();
        let share = desc.bdev().num_blocks() / cores as u64;
        for (core, &rng) in spec.rng_seeds.iter().enumerate() {
            let (desc, stop, qd, max_blocks, skip) = (
                desc.clone(),
                stop.clone(),
                spec.qd,
                spec.max_blocks,
                spec.skip,
            );
            rt.exec(core, move || {
                let ch = desc.channel().unwrap();
                let w = Rc::new(RefCell::new(WriterState {
                    block_size: ch.block_size() as u64,
                    ch,
                    core,
                    region: (share * core as u64, share * (core as u64 + 1)),
                    max_blocks,
                    skip,
                    rng,
                    seq: 0,
                    inflight: Vec::new(),
                    log: Vec::new(),
                    errors: 0,
                    stop,
                }));
                let p = Poller::builder().name("writer").register({
                    let w = w.clone();
                    move || PollStatus::from_count(w.borrow_mut().poll(qd))
                });
                WRITER.with(|slot| {
                    let old = slot.borrow_mut().replace((w, p));
                    assert!(old.is_none(), "a writer already runs on reactor {core}");
                });
            })
            .unwrap();
        }
        Writers { rt, stop, cores }
    }

    /// Each writer's log so far, by core.
    pub fn logs(&self) -> Vec<Vec<Write>> {
        (0..self.cores)
            .map(|core| {
                self.rt
                    .exec(core, || {
                        WRITER.with(|s| s.borrow().as_ref().unwrap().0.borrow().log.clone())
                    })
                    .unwrap()
            })
            .collect()
    }

    /// Stops issuing writes, waits until none is in flight, removes the
    /// writers and returns what each did, by core.
    pub fn stop(self) -> Vec<WriterOutcome> {
        self.stop.store(true, Ordering::Relaxed);
        (0..self.cores)
            .map(|core| {
                let out = loop {
                    let r = self
                        .rt
                        .exec(core, || {
                            WRITER.with(|s| {
                                let s = s.borrow();
                                let w = s.as_ref().unwrap().0.borrow();
                                w.inflight.is_empty().then(|| WriterOutcome {
                                    log: w.log.clone(),
                                    errors: w.errors,
                                })
                            })
                        })
                        .unwrap();
                    if let Some(o) = r {
                        break o;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                self.rt
                    .exec(core, || drop(WRITER.with(|s| s.borrow_mut().take())))
                    .unwrap();
                out
            })
            .collect()
    }
}
