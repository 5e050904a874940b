//! The `cow` virtual bdev: passthrough while idle, interception during a job.
//!
//! # Idle
//! A cow channel forwards I/O to the source like passthru does. Per I/O it
//! adds one load of the consistency-point counter, one of the job
//! generation, and a store to its own in-flight counter (a cache line no
//! other core writes); per write, a compare-and-swap on its own gate and the
//! update of its own table of writes in flight per 64 KiB granule
//! ([`crate::fence::Tracking`]). Completed writes come off that table in
//! batches: by the next write, under the same gate, or by the poll once
//! `IDLE_FINISHED` have piled up (while a job runs or a consistency point
//! is being taken, at every poll).
//!
//! # Consistency point (quiesce)
//! 1. The controller, a poller on the job's home reactor, makes `point`
//!    odd: from then on a channel that reads it holds new I/O at channel
//!    entry.
//! 2. It registers every channel's writes in flight in the job's fence
//!    table, taking each channel's table through the channel's gate
//!    ([`crate::fence::Gate`]). A channel counts a write in its table, under its gate, only
//!    after checking there that `point` has not moved since it decided to
//!    forward the write, so once the controller has taken a channel's gate
//!    every write that channel forwarded without seeing the consistency
//!    point is registered, and every later one is held. The controller
//!    needs no other reactor to run: a reactor held up in a system call (a
//!    virtio doorbell that takes milliseconds while the host is busy) does
//!    not hold the consistency point up. (Unless a channel still has writes
//!    in flight from the previous consistency point: then it waits for that
//!    channel to reap them, see [`crate::fence`].) It does **not** wait for the
//!    registered writes to complete: they belong to the consistency point,
//!    and the granules they touch stay fenced (nothing reads their T0
//!    content from the source) until they have.
//! 3. It installs the job (bumping the generation) and makes `point` even.
//!    Channels pick up the job on their next I/O and release what they held.
//!    The time from 1 to 3 is the freeze time: one pass of the controller
//!    over the channels' gates, not a round trip through the reactors nor
//!    the slowest write in flight.
//! 4. The job's first I/O is a flush of the source, issued once the fence is
//!    empty. A flush covers every write completed before it was submitted,
//!    which then includes every write of the consistency point, so it need not
//!    hold I/O: keeping it out of the freeze takes the device's cache flush
//!    (milliseconds on a virtual disk) off the writers' critical path. If it
//!    fails, the job fails.
//!
//! # Interception (while a job runs)
//! A write, write-zeroes or unmap touching a chunk that is `Pending` (and not
//! fenced: then it waits until the fence clears) claims it
//! (`Pending` → `Saving`), takes a container slot and a bounce buffer, reads
//! the chunk's old content from the source and writes it to the slot; then the
//! chunk is `Saved`, goes on the drain queue, and the write proceeds. Writes to
//! chunks that are `Copying` or `Saving` wait for the read of old content to
//! finish (or, for a copy run written straight from a RAM source's memory,
//! for that target write); every other write goes straight through. Reads never wait. Held
//! writes are rechecked at every `poll` of the channel.
//!
//! # Credits
//! Free container slots are the credits. Above the soft watermark a capture is
//! admitted at most once per measured drain interval (shared by all writers
//! that need a slot, so admission matches the drain rate); with no free slot
//! the writer waits for one. Writes that need no slot are never slowed, and
//! the delay is accounted to the channel (the submitter) that waited.
//!
//! # Foreground meter
//! While a job runs (and while one is being started, to learn the
//! no-backup level), channels measure the latency of the hosts' I/O that
//! they hand to the source, by Little's law: each keeps the area under its
//! in-flight count over time, which over a window equals the sum of the
//! latencies of the I/Os completed in it, and publishes area and completions
//! to the shared [`FgMeter`] once per poll that completed something. The
//! job's scheduler divides the two. Time a write spent held is not counted:
//! the meter sees what the device does to hosts, which is what the backup
//! streams must not degrade. An idle channel does none of this.
//!
//! # Bystanders
//! A channel that has had no write held for [`BYSTANDER_QUIET`] is a
//! bystander: its hosts do not fill the container (they write outside the
//! scope, or to chunks already saved, or only read), so the backup should
//! not slow them. Each channel learns its own no-backup latency while the
//! job is being started (the calibration window), and while it is a
//! bystander it also publishes its latency area against that reference
//! (`completions × own reference`), so the scheduler can tell how much the
//! backup's forced I/O costs the hosts that are not causing it, whatever
//! each one's own latency level is. The streams bound the drain by it
//! while the container is pressed (see [`crate::job`]).
//!
//! Internal I/O uses tokens with the top bit set; submitters of a cow bdev
//! must keep that bit clear in their own tokens.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hotcopy_bdev::{
    BackendChannel, Bdev, BdevBackend, BdevChannel, BdevDesc, BdevError, BdevInfo, BdevIo,
    BdevRegistry, Claim, IoStatus, IoType,
};
use hotcopy_runtime::{clock, PollStatus, Poller, Reactor, ReactorHandle};

use crate::cbt::Cbt;
use crate::chunk_map::ChunkState;
use crate::fence::{self, FenceTable, Gate, Holder, Tracking};
use crate::job::{JobShared, JobState};

/// Tokens of the cow module's own I/O.
pub(crate) const INTERNAL: u64 = 1 << 63;

/// Per-channel counters the controller reads (written by the owner, except
/// the gate, which a consistency point's controller also takes).
pub struct ChannelCounters {
    pub name: String,
    pub inflight: AtomicU64,
    pub held: AtomicU64,
    pub paced_writes: AtomicU64,
    pub pace_delay_ticks: AtomicU64,
    pub slot_waits: AtomicU64,
    /// Mutating I/Os handed to the source, in submission order until the
    /// first one is held. The job records each channel's count at its
    /// consistency point: exactly those writes are in the backup.
    pub forwarded_writes: AtomicU64,
    /// The channel's writes in flight, handed over at a consistency point.
    pub(crate) gate: Gate,
}

/// What the channels of one cow bdev publish about their hosts' I/O.
#[derive(Default)]
pub struct FgMeter {
    /// Channels measure while this is set, or while a job is installed.
    pub measuring: AtomicBool,
    /// Sum over completed host I/Os of their latency, in ticks (Little's law).
    pub area: AtomicU64,
    /// Host I/Os completed.
    pub done: AtomicU64,
    /// Host I/Os held right now (so a window with no completions can be told
    /// apart from idle hosts).
    pub held: AtomicU64,
    /// Channels with host I/O in flight on the source right now: a window
    /// with few completions but busy channels is a slow device, not idle
    /// hosts. Channels update it only when their in-flight count leaves or
    /// reaches zero.
    pub busy: AtomicU64,
    /// Bystanders (see the module docs): the latency area of their
    /// completed I/O, the same completions weighted by each channel's own
    /// no-backup latency, and the completions.
    pub by_area: AtomicU64,
    pub by_ref_area: AtomicU64,
    pub by_done: AtomicU64,
}

impl FgMeter {
    /// (area, completions) so far.
    pub fn read(&self) -> (u64, u64) {
        (
            self.area.load(Ordering::Relaxed),
            self.done.load(Ordering::Relaxed),
        )
    }

    /// Bystanders' (area, reference area, completions) so far.
    pub fn read_bystanders(&self) -> (u64, u64, u64) {
        (
            self.by_area.load(Ordering::Relaxed),
            self.by_ref_area.load(Ordering::Relaxed),
            self.by_done.load(Ordering::Relaxed),
        )
    }
}

/// A channel with no write held for this long is a bystander.
pub const BYSTANDER_QUIET: Duration = Duration::from_millis(20);

/// Fewest completions in a channel's calibration for its own reference to count.
const OWN_REF_MIN_SAMPLES: u64 = 8;

pub(crate) struct CowShared {
    pub name: String,
    pub fg: Arc<FgMeter>,
    /// Changed-block tracking, when the bdev was created with it.
    pub cbt: Option<Arc<Cbt>>,
    pub source: BdevDesc,
    /// Consistency points: odd while one is being taken (the freeze: new
    /// I/O is held), even otherwise; it goes up by one at each start and
    /// end, so a channel that read it before deciding on a write can tell,
    /// by reading it again, whether a consistency point began since.
    pub point: AtomicU64,
    pub gen: AtomicU64,
    pub job: Mutex<Option<Arc<JobShared>>>,
    pub channels: Mutex<Vec<Weak<ChannelCounters>>>,
    pub chan_seq: AtomicU64,
    /// A job is being started: one at a time, so that consistency points
    /// never overlap (`point`'s parity depends on it).
    pub starting: AtomicBool,
}

/// The cow bdev module object (find it with `Bdev::backend::<CowBdev>()`).
pub struct CowBdev {
    pub(crate) shared: Arc<CowShared>,
    _claim: Claim,
}

impl CowBdev {
    /// The job running now, or the last one installed.
    pub fn job(&self) -> Option<Arc<JobShared>> {
        self.shared
            .job
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn source(&self) -> &BdevDesc {
        &self.shared.source
    }

    /// Its changed-block tracking, if it has one.
    pub fn cbt(&self) -> Option<Arc<Cbt>> {
        self.shared.cbt.clone()
    }

    /// The foreground meter of this bdev's channels.
    pub fn fg_meter(&self) -> &Arc<FgMeter> {
        &self.shared.fg
    }

    /// Makes every channel measure host latency (or stop, unless a job runs).
    pub(crate) fn set_measuring(&self, on: bool) {
        self.shared.fg.measuring.store(on, Ordering::SeqCst);
        self.shared.gen.fetch_add(1, Ordering::SeqCst);
    }

    /// Counters of every live channel.
    pub fn channels(&self) -> Vec<Arc<ChannelCounters>> {
        self.shared.channels()
    }

    /// Quiesces the source, runs `install` while it is frozen, and resumes;
    /// returns the freeze duration.
    ///
    /// The protocol runs as a poller on `home`, a reactor: the freeze should
    /// last one pass over the channels' gates and no longer, and a
    /// control thread that has to be scheduled between the steps (on a machine
    /// whose cores are all busy polling) would add its wake-up latency to
    /// every step. The caller only waits for the outcome. Control path: it
    /// blocks, so call it from a thread that is not a reactor.
    pub(crate) fn freeze_on(
        &self,
        home: &ReactorHandle,
        fence: Arc<FenceTable>,
        install: impl FnOnce() + Send + 'static,
    ) -> Result<Duration, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Duration, String>>(1);
        let shared = self.shared.clone();
        home.exec(move || {
            let mut fz = Freeze {
                shared,
                fence,
                point: 0,
                chans: Vec::new(),
                start: None,
                install: Some(Box::new(install)),
                tx,
            };
            let slot: Rc<RefCell<Option<Poller>>> = Rc::new(RefCell::new(None));
            let me = slot.clone();
            let p = Poller::builder().name("cow_freeze").register(move || {
                let finished = fz.step();
                if finished {
                    me.borrow_mut().take();
                }
                PollStatus::Busy
            });
            *slot.borrow_mut() = Some(p);
        })
        .map_err(|e| format!("reactor {} for the consistency point: {e}", home.core()))?;
        rx.recv_timeout(Duration::from_secs(60))
            .map_err(|_| "the consistency point did not finish within 60 s".to_string())?
    }
}

impl CowShared {
    pub(crate) fn channels(&self) -> Vec<Arc<ChannelCounters>> {
        let mut v = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.iter().filter_map(Weak::upgrade).collect()
    }
}

/// The consistency point as a state machine, stepped by a poller on the
/// job's home reactor.
struct Freeze {
    shared: Arc<CowShared>,
    fence: Arc<FenceTable>,
    /// The (odd) value of `CowShared::point` while this one is taken.
    point: u64,
    chans: Vec<Arc<ChannelCounters>>,
    start: Option<Instant>,
    install: Option<Box<dyn FnOnce() + Send>>,
    tx: std::sync::mpsc::SyncSender<Result<Duration, String>>,
}

impl Freeze {
    /// One step; returns true when the protocol has ended (either way).
    fn step(&mut self) -> bool {
        let s = &self.shared;
        if self.start.is_none() {
            // 1. From now on every channel that reads `point` holds new I/O.
            self.point = s.point.fetch_add(1, Ordering::SeqCst) + 1;
            debug_assert!(self.point & 1 == 1, "consistency points do not overlap");
            self.start = Some(Instant::now());
            // Taken after the announcement: a channel created since reads
            // the new point on its first I/O.
            self.chans = s.channels();
        }
        let start = self.start.expect("set above");
        // 2. Every channel's writes in flight go into the fence, taken here
        // through the channel's gate (see `crate::fence::Gate`); a channel
        // whose gate is taken right now is tried again on the next step.
        // Taking the gate also proves that the channel is not between deciding on a
        // write and counting it; it does not wait for the writes to
        // complete: they belong to the consistency point, and the granules
        // they touch stay fenced until they have.
        // A registered channel leaves `chans`; the others wait for the next step.
        let (point, fence) = (self.point, &self.fence);
        self.chans.retain(|c| {
            c.gate
                .try_with(Holder::Freezer, |t| t.register(fence, point))
                != Some(true)
        });
        let waiting = self.chans.len();
        if waiting > 0 {
            let timeout = start.elapsed() > Duration::from_secs(30);
            return timeout
                && self.end(Err(format!(
                    "{waiting} channel(s) could not register their writes in flight within 30 s"
                )));
        }
        // 3. Install and resume.
        if let Some(install) = self.install.take() {
            install();
        }
        s.gen.fetch_add(1, Ordering::SeqCst);
        self.end(Ok(start.elapsed()))
    }

    fn end(&mut self, r: Result<Duration, String>) -> bool {
        // Even again: the freeze is over.
        self.shared.point.fetch_add(1, Ordering::SeqCst);
        let _ = self.tx.try_send(r);
        true
    }
}

impl BdevBackend for CowBdev {
    fn supports(&self, io_type: IoType) -> bool {
        self.shared.source.bdev().supports(io_type)
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let reactor = Reactor::try_current().ok_or_else(|| BdevError::Channel {
            name: self.shared.name.clone(),
            source: std::io::Error::other("cow channels must be created on a reactor"),
        })?;
        let seq = self.shared.chan_seq.fetch_add(1, Ordering::Relaxed);
        let counters = Arc::new(ChannelCounters {
            name: format!("{}/core{}/ch{}", self.shared.name, reactor.core(), seq),
            inflight: AtomicU64::new(0),
            held: AtomicU64::new(0),
            paced_writes: AtomicU64::new(0),
            pace_delay_ticks: AtomicU64::new(0),
            slot_waits: AtomicU64::new(0),
            forwarded_writes: AtomicU64::new(0),
            gate: Gate::new(Tracking::new(
                fence::CHANNEL_ENTRIES,
                fence::granule_shift(self.shared.source.bdev().block_size() as u64),
            )),
        });
        {
            let mut v = self
                .shared
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(&counters));
        }
        Ok(Box::new(CowChannel {
            base: self.shared.source.channel()?,
            cbt: self.shared.cbt.clone(),
            shared: self.shared.clone(),
            counters,
            inflight: 0,
            forwarded: 0,
            measure: false,
            m_last: 0,
            m_area: 0,
            cal: (0, 0),
            own_ref: 0,
            last_wait: 0,
            quiet_ticks: clock::duration_to_ticks(BYSTANDER_QUIET),
            gen: u64::MAX,
            job: None,
            jc: None,
            held: VecDeque::with_capacity(256),
            held_since: VecDeque::with_capacity(256),
            out: VecDeque::with_capacity(64),
            finished: Vec::with_capacity(1024),
        }))
    }

    fn allocated_ranges(&self) -> Option<Vec<(u64, u64)>> {
        self.shared.source.bdev().allocated_ranges()
    }
}

/// A capture in flight on a channel.
struct Capture {
    chunk: u64,
    slot: u32,
    writing: bool,
}

/// A channel's state for the job it is working with.
struct JobChannel {
    job: Arc<JobShared>,
    container: BdevChannel,
    caps: Vec<Option<Capture>>,
    free_caps: Vec<u32>,
}

/// Most captures one channel runs at once.
const MAX_CAPTURES: usize = 64;

/// Completed writes an idle channel keeps for its next write to take off
/// the tracking, before it takes the gate for them alone.
const IDLE_FINISHED: usize = 64;

struct CowChannel {
    base: BdevChannel,
    cbt: Option<Arc<Cbt>>,
    shared: Arc<CowShared>,
    counters: Arc<ChannelCounters>,
    inflight: u64,
    forwarded: u64,
    /// Foreground meter on: the tick of the last in-flight change, and the
    /// area under the in-flight count not yet published.
    measure: bool,
    m_last: u64,
    m_area: u64,
    /// Area and completions measured with no job installed (the
    /// calibration), this channel's own no-backup latency once a job is
    /// (ticks; 0: unknown), the last tick a write of it was held, and
    /// [`BYSTANDER_QUIET`] in ticks.
    cal: (u64, u64),
    own_ref: u64,
    last_wait: u64,
    quiet_ticks: u64,
    gen: u64,
    job: Option<Arc<JobShared>>,
    jc: Option<JobChannel>,
    held: VecDeque<BdevIo>,
    held_since: VecDeque<u64>,
    out: VecDeque<BdevIo>,
    /// Tracked writes completed and not yet taken off the tracking (block
    /// range and tag): see `IDLE_FINISHED`.
    finished: Vec<(u64, u64, u64)>,
}

enum Admit {
    Pass,
    Wait,
}

impl CowChannel {
    #[inline]
    fn refresh_job(&mut self) {
        let g = self.shared.gen.load(Ordering::Acquire);
        if g == self.gen {
            return;
        }
        self.gen = g;
        let job = self
            .shared
            .job
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let had_job = self.job.is_some();
        // An ended job still matters while a copy run is being written
        // from the source's memory: writes to its chunks wait (`admit`).
        self.job = job
            .filter(|j| j.state() == JobState::Running || j.lent_writes.load(Ordering::SeqCst) > 0);
        let measure = self.job.is_some() || self.shared.fg.measuring.load(Ordering::Acquire);
        if measure && !self.measure {
            self.m_last = clock::ticks();
            self.m_area = 0;
            self.cal = (0, 0);
        }
        self.measure = measure;
        if self.job.is_some() && !had_job {
            // What this channel measured before the job is its no-backup level.
            let (area, done) = self.cal;
            self.own_ref = if done >= OWN_REF_MIN_SAMPLES {
                area / done
            } else {
                0
            };
            self.cal = (0, 0);
        }
        // A new job needs a container channel; an old one's is kept until its
        // captures have finished.
        let stale = match (&self.jc, &self.job) {
            (Some(jc), Some(j)) => !Arc::ptr_eq(&jc.job, j),
            (Some(_), None) => true,
            _ => false,
        };
        if stale
            && self
                .jc
                .as_ref()
                .is_some_and(|jc| jc.free_caps.len() == MAX_CAPTURES)
        {
            self.jc = None;
        }
        if self.jc.is_none() {
            if let Some(j) = &self.job {
                match j.container.desc.channel() {
                    Ok(container) => {
                        self.jc = Some(JobChannel {
                            job: j.clone(),
                            container,
                            caps: (0..MAX_CAPTURES).map(|_| None).collect(),
                            free_caps: (0..MAX_CAPTURES as u32).rev().collect(),
                        })
                    }
                    Err(e) => {
                        j.finish(JobState::Failed, Some(format!("container channel: {e}")));
                        self.job = None;
                    }
                }
            }
        }
    }

    /// Decides whether a mutating I/O may go to the source now; starts the
    /// captures it needs. `arriving`: the I/O's first look, not a retry of a
    /// held one.
    fn admit(&mut self, io: &BdevIo, now: u64, arriving: bool) -> Admit {
        let Some(job) = self.job.clone() else {
            return Admit::Pass;
        };
        let (first, last) = job.chunk_span(io.offset_blocks, io.num_blocks.max(1));
        if job.state() != JobState::Running {
            // A copy run still being written from the source's own memory
            // keeps its chunks' writers out even now: the target is reading
            // those bytes until it lands (see `crate::job`).
            if job.lent_writes.load(Ordering::SeqCst) > 0
                && (first..=last).any(|c| job.map.get(c) == ChunkState::Copying)
            {
                return Admit::Wait;
            }
            return Admit::Pass;
        }
        let mut pass = true;
        for c in first..=last {
            match job.map.get(c) {
                s if s.write_may_pass() => {}
                ChunkState::Pending => {
                    pass = false;
                    // Where the copies ahead of captures start (see
                    // `crate::job`): once per arriving write, so that held
                    // writes retried at every poll do not rewrite it.
                    if arriving && job.wanted.load(Ordering::Relaxed) != c {
                        job.wanted.store(c, Ordering::Relaxed);
                    }
                    // A write of the consistency point is still landing
                    // there: its T0 content is not on the source yet.
                    if !job.fence.fenced(c << job.chunk_shift, job.chunk_blocks) {
                        self.start_capture(&job, c, now);
                    }
                }
                _ => pass = false,
            }
        }
        if pass {
            Admit::Pass
        } else {
            Admit::Wait
        }
    }

    fn start_capture(&mut self, job: &Arc<JobShared>, chunk: u64, now: u64) {
        let Some(jc) = self.jc.as_mut().filter(|jc| Arc::ptr_eq(&jc.job, job)) else {
            return;
        };
        let Some(&cap_idx) = jc.free_caps.last() else {
            return;
        };
        // Credits: past the soft watermark, admit at the drain rate.
        if job.container.used() >= job.soft_slots {
            let interval = job.admit_interval.load(Ordering::Relaxed);
            if interval > 0 {
                let next = job.next_admit.load(Ordering::Relaxed);
                if now < next {
                    return;
                }
                if job
                    .next_admit
                    .compare_exchange(
                        next,
                        now.max(next) + interval,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_err()
                {
                    return;
                }
                self.counters.paced_writes.fetch_add(1, Ordering::Relaxed);
                job.counters.paced_writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(slot) = job.container.take() else {
            self.counters.slot_waits.fetch_add(1, Ordering::Relaxed);
            job.counters.slot_waits.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(mut buf) = job.capture_bufs.get(job.capture_bufs.buf_size()) else {
            job.container.give_back(slot);
            return;
        };
        if !job
            .map
            .transition(chunk, ChunkState::Pending, ChunkState::Saving)
        {
            // Another core or the copy stream got there first.
            job.container.give_back(slot);
            return;
        }
        job.container.assign(slot, chunk);
        job.note_container_use();
        jc.free_caps.pop();
        jc.caps[cap_idx as usize] = Some(Capture {
            chunk,
            slot,
            writing: false,
        });
        let blocks = job.chunk_len(chunk);
        buf.set_len((blocks * job.block_size) as usize);
        self.base.submit(BdevIo::read(
            chunk << job.chunk_shift,
            blocks,
            buf,
            INTERNAL | cap_idx as u64,
        ));
    }

    /// Takes the writes that completed since the last time off the
    /// channel's tracking; if the consistency point's controller holds it
    /// right now, they stay for the next poll.
    #[inline]
    fn untrack_finished(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        let finished = &mut self.finished;
        self.counters
            .gate
            .try_with(Holder::Owner, |t| t.untrack_all(finished));
    }

    /// Holds `io` at channel entry (a consistency point, or no room in the
    /// tracking), to be retried at every poll.
    fn hold(&mut self, io: BdevIo, now: u64) {
        self.shared.fg.held.fetch_add(1, Ordering::Relaxed);
        self.held.push_back(io);
        self.held_since.push_back(now);
    }

    /// Hands `io` to the source. `point` is the consistency-point counter
    /// read before the caller decided to forward it: a write is given back
    /// (to be held) if a consistency point has begun since, so that it
    /// meets the new job, or if the tracking has no room for it.
    fn forward(&mut self, mut io: BdevIo, point: u64) -> Result<(), BdevIo> {
        #[cfg(debug_assertions)]
        if io.io_type.is_mutating() && io.io_type != IoType::Flush {
            // The invariant's guard: with a job running, a write reaches the
            // source only when every chunk it touches has its old content safe.
            if let Some(job) = self.job.as_ref().filter(|j| j.state() == JobState::Running) {
                let (first, last) = job.chunk_span(io.offset_blocks, io.num_blocks.max(1));
                for c in first..=last {
                    let st = job.map.get(c);
                    assert!(
                        st.write_may_pass(),
                        "write to chunk {c} forwarded in state {st:?}"
                    );
                }
            }
        }
        if tracks(&io) {
            // Counted in the tracking, and in the changed blocks and the
            // forwarded writes, all while holding the gate: once the
            // controller has taken it, this write is either registered in
            // the fence (and in the consistency point's counts) or sees the
            // new point and waits.
            let (shared, cbt, counters, forwarded) =
                (&self.shared, &self.cbt, &self.counters, &mut self.forwarded);
            let (off, n) = (io.offset_blocks, io.num_blocks);
            let finished = &mut self.finished;
            let counted = counters.gate.count_write(
                || shared.point.load(Ordering::Acquire),
                point,
                (off, n),
                |t| t.untrack_all(finished),
                || {
                    if let Some(c) = cbt {
                        c.mark(off, n);
                    }
                    *forwarded += 1;
                    counters
                        .forwarded_writes
                        .store(*forwarded, Ordering::Release);
                },
            );
            match counted {
                Some(tag) => io.tag = tag,
                None => return Err(io),
            }
        }
        if self.measure {
            let now = clock::ticks();
            self.m_area += self.inflight * now.saturating_sub(self.m_last);
            self.m_last = now;
        }
        if self.inflight == 0 {
            self.shared.fg.busy.fetch_add(1, Ordering::Relaxed);
        }
        self.inflight += 1;
        self.counters
            .inflight
            .store(self.inflight, Ordering::Release);
        self.base.submit(io);
        Ok(())
    }

    /// Handles completions of the channel's own capture I/O.
    fn capture_done(jc: &mut JobChannel, base_is_read: bool, mut io: BdevIo) {
        let idx = (io.token & !INTERNAL) as usize;
        let Some(cap) = jc.caps[idx].as_mut() else {
            return;
        };
        let job = jc.job.clone();
        let ok = io.status == IoStatus::Success;
        if base_is_read && !cap.writing {
            if !ok {
                job.finish(
                    JobState::Failed,
                    Some(format!(
                        "capturing chunk {}: source read {:?}",
                        cap.chunk, io.status
                    )),
                );
                job.container.give_back(cap.slot);
                jc.caps[idx] = None;
                jc.free_caps.push(idx as u32);
                return;
            }
            cap.writing = true;
            let mut buf = io.take_buf().expect("capture read carries its buffer");
            let slot_bytes = job.container.slot_blocks * jc.container.block_size() as u64;
            buf.set_len(slot_bytes as usize);
            let lba = job.container.slot_lba(cap.slot);
            jc.container
                .submit(BdevIo::write(lba, job.container.slot_blocks, buf, io.token));
            return;
        }
        // Container write finished.
        let (chunk, slot) = (cap.chunk, cap.slot);
        jc.caps[idx] = None;
        jc.free_caps.push(idx as u32);
        drop(io.take_buf());
        if !ok {
            job.finish(
                JobState::Failed,
                Some(format!(
                    "saving chunk {chunk} to the container: {:?}",
                    io.status
                )),
            );
            job.container.give_back(slot);
            return;
        }
        job.map
            .transition(chunk, ChunkState::Saving, ChunkState::Saved);
        job.counters.chunks_saved.fetch_add(1, Ordering::Relaxed);
        if job.saved.push((chunk, slot)).is_err() {
            // Cannot happen: the queue holds as many entries as there are slots.
            job.finish(JobState::Failed, Some("drain queue overflow".into()));
        }
    }

    /// Retries held I/O; returns how many were released.
    fn release_held(&mut self) -> usize {
        let point = self.shared.point.load(Ordering::Acquire);
        if point & 1 == 1 {
            return 0;
        }
        // The freeze may have ended since the caller last looked at the job:
        // the job is installed before `freeze` clears, so refreshing after
        // seeing it clear is what guarantees held writes meet the new job.
        // (Releasing with a stale "no job" here let writes held at the
        // consistency point reach the source before their chunks were saved.)
        if self.shared.gen.load(Ordering::Acquire) != self.gen {
            self.refresh_job();
        }
        let now = clock::ticks();
        let mut released = 0;
        for _ in 0..self.held.len() {
            let Some(io) = self.held.pop_front() else {
                break;
            };
            let since = self.held_since.pop_front().unwrap_or(now);
            let pass =
                !io.io_type.is_mutating() || matches!(self.admit(&io, now, false), Admit::Pass);
            let io = if pass {
                match self.forward(io, point) {
                    Ok(()) => {
                        let waited = now.saturating_sub(since);
                        self.counters
                            .pace_delay_ticks
                            .fetch_add(waited, Ordering::Relaxed);
                        released += 1;
                        continue;
                    }
                    Err(io) => io,
                }
            } else {
                io
            };
            self.held.push_back(io);
            self.held_since.push_back(since);
        }
        if released > 0 {
            self.shared
                .fg
                .held
                .fetch_sub(released as u64, Ordering::Relaxed);
        }
        self.counters
            .held
            .store(self.held.len() as u64, Ordering::Relaxed);
        released
    }
}

impl BackendChannel for CowChannel {
    #[inline]
    fn submit(&mut self, io: BdevIo) {
        let point = self.shared.point.load(Ordering::Acquire);
        if point & 1 == 1 {
            // Consistency point in progress: hold at channel entry.
            self.hold(io, clock::ticks());
            return;
        }
        if self.shared.gen.load(Ordering::Acquire) != self.gen {
            self.refresh_job();
        }
        if self.job.is_some() && io.io_type.is_mutating() && io.io_type != IoType::Flush {
            let now = clock::ticks();
            if matches!(self.admit(&io, now, true), Admit::Wait) {
                if let Some(j) = &self.job {
                    j.counters.held_writes.fetch_add(1, Ordering::Relaxed);
                }
                self.last_wait = now;
                self.hold(io, now);
                return;
            }
        }
        if let Err(io) = self.forward(io, point) {
            // A consistency point began, or more writes are in flight than
            // the tracking holds: wait.
            self.hold(io, clock::ticks());
        }
    }

    #[inline]
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let point = self.shared.point.load(Ordering::Acquire);
        if self.jc.is_none()
            && !self.measure
            && self.held.is_empty()
            && self.shared.gen.load(Ordering::Relaxed) == self.gen
        {
            // Idle: no internal I/O exists, so every completion is the caller's.
            let CowChannel { base, finished, .. } = self;
            let n = base.poll(&mut |io| {
                if tracks(&io) {
                    finished.push((io.offset_blocks, io.num_blocks, io.tag));
                }
                done(io);
            });
            if n > 0 {
                self.inflight -= n as u64;
                if self.inflight == 0 {
                    self.shared.fg.busy.fetch_sub(1, Ordering::Relaxed);
                }
                self.counters
                    .inflight
                    .store(self.inflight, Ordering::Release);
            }
            // Idle: the next write takes these off under the gate it takes
            // anyway (see `forward`), unless they pile up or a consistency
            // point is being taken.
            if self.finished.len() >= IDLE_FINISHED || point & 1 == 1 {
                self.untrack_finished();
            }
            return n;
        }
        let waiting = !self.held.is_empty();
        let CowChannel {
            base,
            jc,
            job,
            inflight,
            counters,
            out,
            measure,
            m_last,
            m_area,
            cal,
            own_ref,
            last_wait,
            quiet_ticks,
            shared,
            finished,
            ..
        } = self;
        let mut n = 0;
        let mut user = 0;
        base.poll(&mut |io| {
            if io.token & INTERNAL != 0 {
                if let Some(jc) = jc.as_mut() {
                    Self::capture_done(jc, true, io);
                }
            } else {
                if tracks(&io) {
                    finished.push((io.offset_blocks, io.num_blocks, io.tag));
                }
                user += 1;
                done(io);
            }
        });
        if user > 0 {
            if *measure {
                let now = clock::ticks();
                let area = *m_area + *inflight * now.saturating_sub(*m_last);
                *m_last = now;
                *m_area = 0;
                shared.fg.area.fetch_add(area, Ordering::Relaxed);
                shared.fg.done.fetch_add(user, Ordering::Relaxed);
                match job {
                    None => {
                        cal.0 += area;
                        cal.1 += user;
                    }
                    Some(j) => {
                        if waiting {
                            *last_wait = now;
                        } else if now.saturating_sub(*last_wait) > *quiet_ticks {
                            // A bystander: against its own no-backup level,
                            // or the job's when it had none.
                            let r = match *own_ref {
                                0 => j.counters.fg_ref_ticks.load(Ordering::Relaxed),
                                r => r,
                            };
                            if r > 0 {
                                let fg = &shared.fg;
                                fg.by_area.fetch_add(area, Ordering::Relaxed);
                                fg.by_ref_area.fetch_add(user * r, Ordering::Relaxed);
                                fg.by_done.fetch_add(user, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            *inflight -= user;
            if *inflight == 0 {
                shared.fg.busy.fetch_sub(1, Ordering::Relaxed);
            }
            counters.inflight.store(*inflight, Ordering::Release);
            n += user as usize;
        }
        if let Some(jc) = jc.as_mut() {
            let c = &mut jc.container;
            let mut writes = std::mem::take(out);
            c.poll(&mut |io| writes.push_back(io));
            for io in writes.drain(..) {
                Self::capture_done(jc, false, io);
            }
            *out = writes;
        }
        self.untrack_finished();
        if !self.held.is_empty() || self.shared.gen.load(Ordering::Relaxed) != self.gen {
            self.refresh_job();
            self.release_held();
        }
        n
    }
}

impl Drop for CowChannel {
    fn drop(&mut self) {
        // Registered writes whose completions this channel will not see:
        // the fence must not wait for them for ever. (The controller may be
        // registering this channel this very moment: wait for it.)
        self.counters.gate.with_spin(Holder::Owner, Tracking::close);
        if self.inflight > 0 {
            self.shared.fg.busy.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Whether `io` is a write the fence tables count.
#[inline]
fn tracks(io: &BdevIo) -> bool {
    io.io_type.is_mutating() && io.io_type != IoType::Flush
}

/// Creates the cow bdev `name` on `source`, claiming it.
pub fn create(reg: &BdevRegistry, name: &str, source: &str) -> Result<Bdev, BdevError> {
    create_with(reg, name, source, None)
}

/// [`create`], with changed-block tracking: every write the bdev passes to
/// the source is marked in `cbt` (see [`crate::cbt`]; open its store before
/// hosts write, and close it after they stop).
pub fn create_with(
    reg: &BdevRegistry,
    name: &str,
    source: &str,
    cbt: Option<Arc<Cbt>>,
) -> Result<Bdev, BdevError> {
    let base = reg.lookup(source)?;
    let claim = base.claim(name)?;
    let b = claim.bdev().info();
    let mut info = BdevInfo::new(name, "cow", b.block_size, b.num_blocks);
    info.volatile_write_cache = b.volatile_write_cache;
    let shared = Arc::new(CowShared {
        name: name.to_string(),
        fg: Arc::new(FgMeter::default()),
        cbt,
        source: claim.open(),
        point: AtomicU64::new(0),
        gen: AtomicU64::new(0),
        job: Mutex::new(None),
        channels: Mutex::new(Vec::new()),
        chan_seq: AtomicU64::new(0),
        starting: AtomicBool::new(false),
    });
    reg.register(
        info,
        CowBdev {
            shared,
            _claim: claim,
        },
    )
}
