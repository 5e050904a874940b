//! Reactors: one per core, each running its pollers round-robin.
//!
//! A reactor is a thread-local event loop (the analogue of an SPDK reactor and
//! its `spdk_thread`). Each pass of [`Reactor::poll_once`]:
//! 1. runs up to [`MSG_BATCH`] messages from its inbox (a bounded lock-free
//!    ring other cores push closures into);
//! 2. runs every live poller once (timed pollers only when due);
//! 3. forgets dropped pollers; pollers registered during a pass start on the next.
//!
//! Nothing here blocks or takes a lock. Pollers and channels created on a
//! reactor are `!Send`: they live and die on that core. Cross-core work is a
//! message. Tests create a reactor on their own thread with [`Reactor::new`]
//! and step it with `poll_once`/`poll_times`, which makes the data path
//! deterministic.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crossbeam::queue::ArrayQueue;
use crossbeam::utils::CachePadded;

use crate::clock;

/// Messages a reactor handles per pass, so a flood of messages cannot starve
/// the pollers (and the reverse: the inbox is drained at every pass).
pub const MSG_BATCH: usize = 64;
/// Capacity of each reactor's inbox. Senders that find it full get
/// [`SendError::Full`] and retry; control traffic never comes close.
pub const INBOX_CAPACITY: usize = 4096;

/// A closure sent to run on another reactor.
pub type Message = Box<dyn FnOnce() + Send + 'static>;

/// Whether a poller (or a whole pass) found work to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    Busy,
    Idle,
}

impl PollStatus {
    pub fn from_count(n: usize) -> Self {
        if n > 0 {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

/// What a reactor does when a pass found nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdlePolicy {
    /// Spin: lowest latency, one core at 100% (production default).
    #[default]
    Poll,
    /// After a run of idle passes, sleep with exponential back-off up to
    /// `max`; a message to the reactor wakes it at once.
    Sleep { max: Duration },
}

impl IdlePolicy {
    /// The default sleep policy: back off to at most 1 ms.
    pub const SLEEP: IdlePolicy = IdlePolicy::Sleep {
        max: Duration::from_millis(1),
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("reactor inbox is full")]
    Full,
    #[error("reactor has stopped")]
    Stopped,
}

/// The part of a reactor other threads can reach: its inbox.
pub(crate) struct Inbox {
    queue: CachePadded<ArrayQueue<Message>>,
    /// Messages pushed and not yet taken. The reactor reads this with a plain
    /// load each pass instead of popping an empty queue (which fences).
    pending: CachePadded<AtomicUsize>,
    thread: OnceLock<Thread>,
    sleeping: CachePadded<AtomicBool>,
    stopped: AtomicBool,
}

/// A handle to send messages to a reactor from any thread.
#[derive(Clone)]
pub struct ReactorHandle {
    core: usize,
    inbox: Arc<Inbox>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReactorHandle(core {})", self.core)
    }
}

impl ReactorHandle {
    /// Index of the reactor (0-based, in configuration order).
    pub fn core(&self) -> usize {
        self.core
    }

    /// Whether two handles reach the same reactor.
    pub fn same(&self, other: &ReactorHandle) -> bool {
        Arc::ptr_eq(&self.inbox, &other.inbox)
    }

    /// Queues `f` to run on the reactor. Lock-free; wakes a sleeping reactor.
    pub fn send(&self, f: impl FnOnce() + Send + 'static) -> Result<(), SendError> {
        self.send_boxed(Box::new(f))
    }

    pub fn send_boxed(&self, msg: Message) -> Result<(), SendError> {
        if self.inbox.stopped.load(Ordering::Acquire) {
            return Err(SendError::Stopped);
        }
        self.inbox.queue.push(msg).map_err(|_| SendError::Full)?;
        self.inbox.pending.fetch_add(1, Ordering::Release);
        if self.inbox.sleeping.load(Ordering::Acquire) {
            if let Some(t) = self.inbox.thread.get() {
                t.unpark();
            }
        }
        Ok(())
    }

    /// Sends `f`, retrying while the inbox is full (control path).
    pub fn send_blocking(&self, f: impl FnOnce() + Send + 'static) -> Result<(), SendError> {
        let mut msg: Message = Box::new(f);
        loop {
            if self.inbox.stopped.load(Ordering::Acquire) {
                return Err(SendError::Stopped);
            }
            match self.inbox.queue.push(msg) {
                Ok(()) => {
                    self.inbox.pending.fetch_add(1, Ordering::Release);
                    break;
                }
                Err(m) => {
                    msg = m;
                    std::thread::yield_now();
                }
            }
        }
        if let Some(t) = self.inbox.thread.get() {
            t.unpark();
        }
        Ok(())
    }

    /// Runs `f` on the reactor and waits for its result (control path only:
    /// this blocks the calling thread, so never call it from a reactor).
    pub fn exec<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SendError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send_blocking(move || {
            let _ = tx.send(f());
        })?;
        rx.recv().map_err(|_| SendError::Stopped)
    }
}

struct PollerEntry {
    name: &'static str,
    func: Box<dyn FnMut() -> PollStatus>,
    alive: Rc<Cell<bool>>,
    period_ticks: u64,
    next_tick: u64,
}

struct ReactorInner {
    core: usize,
    inbox: Arc<Inbox>,
    pollers: RefCell<Vec<PollerEntry>>,
    added: RefCell<Vec<PollerEntry>>,
    idle: IdlePolicy,
    passes: Cell<u64>,
    busy_passes: Cell<u64>,
}

/// A reactor on the current thread. Cloning gives another handle to the same one.
#[derive(Clone)]
pub struct Reactor {
    inner: Rc<ReactorInner>,
}

thread_local! {
    static CURRENT: RefCell<Option<Reactor>> = const { RefCell::new(None) };
}

impl Reactor {
    /// Creates a reactor for this thread and makes it the thread's current one.
    /// Panics if the thread already has a reactor.
    pub fn new(core: usize, idle: IdlePolicy) -> Reactor {
        let inbox = Arc::new(Inbox {
            queue: CachePadded::new(ArrayQueue::new(INBOX_CAPACITY)),
            pending: CachePadded::new(AtomicUsize::new(0)),
            thread: OnceLock::new(),
            sleeping: CachePadded::new(AtomicBool::new(false)),
            stopped: AtomicBool::new(false),
        });
        let _ = inbox.thread.set(std::thread::current());
        let r = Reactor {
            inner: Rc::new(ReactorInner {
                core,
                inbox,
                pollers: RefCell::new(Vec::new()),
                added: RefCell::new(Vec::new()),
                idle,
                passes: Cell::new(0),
                busy_passes: Cell::new(0),
            }),
        };
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            assert!(c.is_none(), "this thread already has a reactor");
            *c = Some(r.clone());
        });
        r
    }

    /// The current thread's reactor. Panics when the thread has none: data-path
    /// objects (pollers, channels) must be created on a reactor.
    pub fn current() -> Reactor {
        Self::try_current().expect("no reactor on this thread: create one with Reactor::new")
    }

    pub fn try_current() -> Option<Reactor> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Index of this reactor.
    pub fn core(&self) -> usize {
        self.inner.core
    }

    pub fn handle(&self) -> ReactorHandle {
        ReactorHandle {
            core: self.inner.core,
            inbox: self.inner.inbox.clone(),
        }
    }

    /// Number of live pollers (registered and not dropped).
    pub fn poller_count(&self) -> usize {
        let live = |v: &Vec<PollerEntry>| v.iter().filter(|p| p.alive.get()).count();
        live(&self.inner.pollers.borrow()) + live(&self.inner.added.borrow())
    }

    /// Names of live pollers, for diagnostics.
    pub fn poller_names(&self) -> Vec<&'static str> {
        let p = self.inner.pollers.borrow();
        let a = self.inner.added.borrow();
        p.iter()
            .chain(a.iter())
            .filter(|e| e.alive.get())
            .map(|e| e.name)
            .collect()
    }

    /// (passes, busy passes) since the reactor started.
    pub fn pass_counts(&self) -> (u64, u64) {
        (self.inner.passes.get(), self.inner.busy_passes.get())
    }

    /// Runs one pass: messages, then pollers. Returns whether anything ran.
    pub fn poll_once(&self) -> PollStatus {
        let inner = &*self.inner;
        let mut busy = false;
        if inner.inbox.pending.load(Ordering::Acquire) > 0 {
            for _ in 0..MSG_BATCH {
                match inner.inbox.queue.pop() {
                    Some(msg) => {
                        inner.inbox.pending.fetch_sub(1, Ordering::AcqRel);
                        msg();
                        busy = true;
                    }
                    None => break,
                }
            }
        }
        {
            let mut pollers = inner.pollers.borrow_mut();
            // Pollers registered since the last pass start now.
            {
                let mut added = inner.added.borrow_mut();
                if !added.is_empty() {
                    pollers.extend(added.drain(..).filter(|p| p.alive.get()));
                }
            }
            let mut now = 0;
            let mut any_dead = false;
            for p in pollers.iter_mut() {
                if !p.alive.get() {
                    any_dead = true;
                    continue;
                }
                if p.period_ticks > 0 {
                    if now == 0 {
                        now = clock::ticks();
                    }
                    if now < p.next_tick {
                        continue;
                    }
                    p.next_tick = now + p.period_ticks;
                }
                if (p.func)() == PollStatus::Busy {
                    busy = true;
                }
            }
            if any_dead {
                pollers.retain(|p| p.alive.get());
            }
        }
        inner.passes.set(inner.passes.get() + 1);
        if busy {
            inner.busy_passes.set(inner.busy_passes.get() + 1);
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Runs `n` passes.
    pub fn poll_times(&self, n: usize) {
        for _ in 0..n {
            self.poll_once();
        }
    }

    /// Runs passes until `done()` is true or `max_passes` ran; returns whether
    /// `done()` became true. For tests that wait for a completion.
    pub fn poll_until(&self, max_passes: usize, mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..max_passes {
            if done() {
                return true;
            }
            if self.poll_once() == PollStatus::Idle {
                std::hint::spin_loop();
            }
        }
        done()
    }

    /// Runs until `stop` is set, following the idle policy between idle passes.
    pub fn run(&self, stop: &AtomicBool) {
        let mut idle_passes: u32 = 0;
        let mut backoff = Duration::from_micros(1);
        while !stop.load(Ordering::Relaxed) {
            if self.poll_once() == PollStatus::Busy {
                idle_passes = 0;
                backoff = Duration::from_micros(1);
                continue;
            }
            let IdlePolicy::Sleep { max } = self.inner.idle else {
                continue;
            };
            idle_passes += 1;
            // Sleep only after a run of idle passes, so that I/O in flight on a
            // device (which completes within microseconds) is not slowed.
            if idle_passes < 256 {
                continue;
            }
            self.inner.inbox.sleeping.store(true, Ordering::Release);
            if self.inner.inbox.queue.is_empty() {
                std::thread::park_timeout(backoff);
            }
            self.inner.inbox.sleeping.store(false, Ordering::Release);
            backoff = (backoff * 2).min(max);
        }
    }

    fn add_poller(&self, entry: PollerEntry) {
        self.inner.added.borrow_mut().push(entry);
    }
}

impl Drop for ReactorInner {
    fn drop(&mut self) {
        self.inbox.stopped.store(true, Ordering::Release);
        // Messages still queued are dropped unrun; their senders see `Stopped`
        // from exec() because the reply channel closes.
        while self.inbox.queue.pop().is_some() {}
    }
}

/// Removes the current thread's reactor (its pollers are dropped with it
/// once the last handle goes).
pub fn clear_current() {
    CURRENT.with(|c| c.borrow_mut().take());
}

/// A registered poller. Dropping it unregisters the function.
#[must_use = "a Poller unregisters itself when dropped"]
pub struct Poller {
    alive: Rc<Cell<bool>>,
    name: &'static str,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Poller({})", self.name)
    }
}

impl Poller {
    pub fn builder() -> PollerBuilder {
        PollerBuilder {
            name: "poller",
            period: None,
        }
    }

    /// Whether the poller is still registered.
    pub fn is_registered(&self) -> bool {
        self.alive.get()
    }

    /// Keeps the poller registered for the life of the reactor.
    pub fn detach(self) {
        std::mem::forget(self);
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.alive.set(false);
    }
}

/// Builds a [`Poller`] on the current reactor.
pub struct PollerBuilder {
    name: &'static str,
    period: Option<Duration>,
}

impl PollerBuilder {
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Runs the poller at most once per `period` instead of every pass.
    pub fn period(mut self, period: Duration) -> Self {
        self.period = Some(period);
        self
    }

    /// Registers `f` on the current reactor; it first runs on the next pass.
    pub fn register(self, f: impl FnMut() -> PollStatus + 'static) -> Poller {
        let reactor = Reactor::current();
        let alive = Rc::new(Cell::new(true));
        let period_ticks = self.period.map(clock::duration_to_ticks).unwrap_or(0);
        reactor.add_poller(PollerEntry {
            name: self.name,
            func: Box::new(f),
            alive: alive.clone(),
            period_ticks,
            next_tick: 0,
        });
        Poller {
            alive,
            name: self.name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_reactor(f: impl FnOnce(&Reactor) + Send + 'static) {
        std::thread::spawn(move || {
            let r = Reactor::new(0, IdlePolicy::Poll);
            f(&r);
            clear_current();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn pollers_run_each_pass_and_unregister_on_drop() {
        with_reactor(|r| {
            let n = Rc::new(Cell::new(0));
            let p = Poller::builder().name("count").register({
                let n = n.clone();
                move || {
                    n.set(n.get() + 1);
                    PollStatus::Busy
                }
            });
            assert_eq!(r.poller_names(), vec!["count"]);
            r.poll_times(3);
            assert_eq!(n.get(), 3);
            drop(p);
            r.poll_times(3);
            assert_eq!(n.get(), 3, "a dropped poller never runs again");
            assert_eq!(r.poller_count(), 0);
        });
    }

    #[test]
    fn a_poller_can_register_another_mid_pass() {
        with_reactor(|r| {
            let hits = Rc::new(Cell::new(0));
            let child: Rc<RefCell<Option<Poller>>> = Rc::new(RefCell::new(None));
            let _p = Poller::builder().register({
                let (hits, child) = (hits.clone(), child.clone());
                move || {
                    if child.borrow().is_none() {
                        let h = hits.clone();
                        *child.borrow_mut() = Some(Poller::builder().register(move || {
                            h.set(h.get() + 1);
                            PollStatus::Idle
                        }));
                    }
                    PollStatus::Idle
                }
            });
            r.poll_times(4);
            assert_eq!(
                hits.get(),
                3,
                "child starts on the pass after it was registered"
            );
        });
    }

    #[test]
    fn timed_pollers_wait_for_their_period() {
        with_reactor(|r| {
            let n = Rc::new(Cell::new(0));
            let _p = Poller::builder()
                .period(Duration::from_millis(50))
                .register({
                    let n = n.clone();
                    move || {
                        n.set(n.get() + 1);
                        PollStatus::Busy
                    }
                });
            r.poll_times(1000);
            assert_eq!(n.get(), 1, "only the first pass is due within 50 ms");
            std::thread::sleep(Duration::from_millis(60));
            r.poll_times(10);
            assert_eq!(n.get(), 2);
        });
    }

    #[test]
    fn messages_from_other_threads_run_on_the_reactor() {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let t = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let r = Reactor::new(3, IdlePolicy::Poll);
                tx.send(r.handle()).unwrap();
                r.run(&stop);
                clear_current();
            }
        });
        let h: ReactorHandle = rx.recv().unwrap();
        for i in 0..1000u64 {
            assert_eq!(
                h.exec(move || (Reactor::current().core(), i)).unwrap(),
                (3, i)
            );
        }
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert_eq!(
            h.send(|| {}),
            Err(SendError::Stopped),
            "a stopped reactor refuses messages"
        );
    }
}
