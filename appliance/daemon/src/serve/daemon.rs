//! The daemon's state: the bdevs it made and how, change tracking, jobs,
//! restores and snapshots; bdev creation and deletion; `save_config`;
//! statistics; and the clean stop.
//!
//! Locking: one mutex guards the records ([`State`]); it is held only to
//! read or update them, never across I/O, a job start or a reactor round
//! trip. Operations that must not overlap reserve what they use in the
//! records first (a volume being started, a repository being written) and
//! release it when they end, so the lock stays short and a second caller
//! gets a clear "busy" error instead of waiting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hotcopy_bdev::{Bdev, BdevRegistry, IoType};
use hotcopy_config::{BaseRef, BdevConfig, Config, ExportConfig, TrackingConfig};
use hotcopy_cow::repo::{BlockIo, ChannelIo};
use hotcopy_cow::{Cbt, CbtOpen, CbtStore, CowBdev, DEFAULT_CHUNK_SIZE};
use hotcopy_runtime::ReactorHandle;
use serde_json::{json, Value};

use super::error::{error_chain, Result, ServeError};
use super::jobs::JobRecord;
use super::repo::{InstantRecord, SnapRecord};
use crate::construct;

/// How a bdev came to be, which decides whether `save_config` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From the config file or a `--bdev` flag.
    Config,
    /// From an RPC (`bdev_malloc_create`, `hotcopy_cow_create`, ...).
    Rpc,
    /// Made for a spec given as a parameter (a repository named by its
    /// spec): saved, so that the same spec finds it again after a restart.
    Spec,
    /// The daemon's own (a job's container, a restore's temporary target):
    /// never saved.
    Internal,
}

/// A bdev the daemon created.
pub struct Def {
    pub name: String,
    /// Its config entry; `None` for bdevs the config cannot describe
    /// (repository snapshots, instant restores).
    pub cfg: Option<BdevConfig>,
    pub origin: Origin,
    /// Bdevs created with it that go with it, in creation order: inline
    /// bases (`NAME.base`, `NAME.base.base`, ...), an inline tracking store
    /// (`NAME.tracking`), an instant restore's target made from a spec.
    pub owned: Vec<String>,
}

/// The change tracking of one cow bdev and where it is kept.
pub struct Tracking {
    pub cbt: Arc<Cbt>,
    /// The bdev holding the store.
    pub store: String,
    pub offset: u64,
    /// As configured (for `save_config`).
    pub cfg: TrackingConfig,
    /// What opening the store found.
    pub opened: CbtOpen,
}

/// Everything the daemon keeps about what it runs.
#[derive(Default)]
pub struct State {
    pub defs: Vec<Def>,
    /// By cow bdev name.
    pub tracking: BTreeMap<String, Tracking>,
    pub exports: Vec<ExportConfig>,
    /// Backup jobs, oldest first (finished ones stay for `status`).
    pub jobs: Vec<JobRecord>,
    /// Volumes whose backup is being started.
    pub starting: BTreeSet<String>,
    /// Repository bdev -> what writes it now (a backup, a prune, a format):
    /// one writer per repository at a time.
    pub repo_writer: BTreeMap<String, String>,
    pub instants: BTreeMap<String, InstantRecord>,
    pub snapshots: BTreeMap<String, SnapRecord>,
}

impl State {
    pub fn def(&self, name: &str) -> Option<&Def> {
        self.defs.iter().find(|d| d.name == name)
    }

    /// Why `name` cannot be deleted, written to, or formatted right now
    /// (besides being claimed, which the registry checks).
    pub fn in_use(&self, name: &str) -> Option<String> {
        if let Some(e) = self.exports.iter().find(|e| e.bdev == name) {
            return Some(format!("bdev {name:?} is exported as {:?}", e.name));
        }
        if let Some(w) = self.repo_writer.get(name) {
            return Some(format!(
                "bdev {name:?} is a repository being written by {w}"
            ));
        }
        if let Some(j) = self
            .jobs
            .iter()
            .find(|j| j.is_running() && (j.volume == name || j.repo == name || j.container == name))
        {
            return Some(format!(
                "bdev {name:?} is used by the running backup of {:?} (job {})",
                j.volume, j.id
            ));
        }
        if self.starting.contains(name) {
            return Some(format!("a backup of {name:?} is starting"));
        }
        for (n, s) in &self.snapshots {
            if s.repo == name || s.overlay.as_deref() == Some(name) {
                return Some(format!("bdev {name:?} is used by the snapshot {n:?}"));
            }
        }
        for (n, r) in &self.instants {
            if r.repo == name {
                return Some(format!(
                    "bdev {name:?} is read by the instant restore {n:?}"
                ));
            }
        }
        for (cow, t) in &self.tracking {
            if t.store == name && cow != name {
                return Some(format!(
                    "bdev {name:?} keeps the change tracking of {cow:?}"
                ));
            }
        }
        None
    }
}

/// The running appliance: reactors, bdevs and records. Shared by the RPC
/// server's threads and the reaper.
pub struct Daemon {
    reactors: Vec<ReactorHandle>,
    pub reg: BdevRegistry,
    /// The config's global sections and the RPC socket, for `save_config`.
    base: Config,
    st: Mutex<State>,
    /// Serialises bdev creation, so that two requests naming one spec make
    /// one bdev.
    create: Mutex<()>,
    stopping: AtomicBool,
    /// The NBD servers and their exports.
    pub nbd: super::exports::Exports,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The records are plain data; a panicking handler leaves them usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    pub fn new(reactors: Vec<ReactorHandle>, base: Config) -> Daemon {
        Daemon {
            reactors,
            reg: BdevRegistry::new(),
            base,
            st: Mutex::new(State::default()),
            create: Mutex::new(()),
            stopping: AtomicBool::new(false),
            nbd: super::exports::Exports::default(),
        }
    }

    /// Every reactor, in core order.
    pub fn reactors(&self) -> &[ReactorHandle] {
        &self.reactors
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.st)
    }

    /// Reactor 0: where the daemon's own small synchronous I/O runs.
    pub fn reactor0(&self) -> &ReactorHandle {
        &self.reactors[0]
    }

    /// The reactor backup jobs, restores and hydrators run their streams
    /// on: the last one (with one reactor, the only one).
    pub fn home(&self) -> &ReactorHandle {
        self.reactors.last().unwrap_or(&self.reactors[0])
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Refuses new work once the stop has begun.
    pub fn check_running(&self) -> Result<()> {
        if self.is_stopping() {
            Err(ServeError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Runs `f` on reactor 0 and waits (control path). A panic in `f`
    /// becomes an error.
    pub fn exec<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match self
            .reactor0()
            .exec(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
        {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ServeError::Failed(
                "internal error: a control operation panicked on reactor 0".into(),
            )),
            Err(e) => Err(ServeError::Failed(format!("reactor 0: {e}"))),
        }
    }

    // ---- Creating bdevs -------------------------------------------------

    /// Creates `name` from `cfg` (and its inline bases), with change
    /// tracking kept as `tracking` says for a cow bdev, and records it.
    pub fn create_bdev(
        &self,
        name: &str,
        cfg: &BdevConfig,
        tracking: Option<&TrackingConfig>,
        origin: Origin,
    ) -> Result<Bdev> {
        self.check_running()?;
        let _serial = lock(&self.create);
        self.create_locked(name, cfg, tracking, origin)
    }

    fn create_locked(
        &self,
        name: &str,
        cfg: &BdevConfig,
        tracking: Option<&TrackingConfig>,
        origin: Origin,
    ) -> Result<Bdev> {
        if tracking.is_some() && !matches!(cfg, BdevConfig::Cow { .. }) {
            return Err(ServeError::InvalidParams(format!(
                "tracking: change tracking belongs to cow bdevs; {name:?} is a {} bdev",
                cfg.type_name()
            )));
        }
        // Every name this creates must be free, so that a failure can
        // remove exactly what it made.
        let mut owned = inline_names(name, cfg);
        let store_inline = matches!(tracking.map(|t| &t.bdev), Some(BaseRef::Inline(_)));
        if store_inline {
            owned.push(format!("{name}.tracking"));
        }
        for n in std::iter::once(name).chain(owned.iter().map(String::as_str)) {
            if self.reg.get(n).is_some() {
                return Err(ServeError::Exists(format!(
                    "a bdev named {n:?} already exists"
                )));
            }
        }
        self.check_files(cfg)?;
        if let Some(BaseRef::Inline(store)) = tracking.map(|t| &t.bdev) {
            self.check_files(store)?;
        }
        let made = self.build(name, cfg, tracking);
        match made {
            Ok((bdev, tr)) => {
                let mut st = self.state();
                if let Some(tr) = tr {
                    st.tracking.insert(name.to_string(), tr);
                }
                st.defs.push(Def {
                    name: name.to_string(),
                    cfg: Some(cfg.clone()),
                    origin,
                    owned,
                });
                tracing::info!(bdev = name, product = bdev.info().product, "bdev created");
                Ok(bdev)
            }
            Err(e) => {
                for n in std::iter::once(name.to_string())
                    .chain(owned.iter().cloned())
                    .collect::<Vec<_>>()
                {
                    let _ = self.reg.unregister(&n);
                }
                Err(e)
            }
        }
    }

    fn build(
        &self,
        name: &str,
        cfg: &BdevConfig,
        tracking: Option<&TrackingConfig>,
    ) -> Result<(Bdev, Option<Tracking>)> {
        let (BdevConfig::Cow { base }, Some(t)) = (cfg, tracking) else {
            let b = construct::create_one(&self.reg, name, cfg)
                .map_err(|e| ServeError::from(e).context(&format!("creating {name}")))?;
            return Ok((b, None));
        };
        // A cow bdev with tracking: its base, the store, the tracking
        // opened from the store, then the cow bdev (which takes writes
        // only from then on).
        let base_name = match base {
            BaseRef::Name(n) => n.clone(),
            BaseRef::Inline(inner) => {
                let n = format!("{name}.base");
                construct::create_one(&self.reg, &n, inner)
                    .map_err(|e| ServeError::from(e).context(&format!("creating {n}")))?;
                n
            }
        };
        let store = match &t.bdev {
            BaseRef::Name(n) => n.clone(),
            BaseRef::Inline(inner) => {
                let n = format!("{name}.tracking");
                construct::create_one(&self.reg, &n, inner)
                    .map_err(|e| ServeError::from(e).context(&format!("creating {n}")))?;
                n
            }
        };
        let source = self.reg.lookup(&base_name)?;
        let cbt = Arc::new(Cbt::new(
            name,
            source.size_bytes(),
            source.block_size() as u64,
            DEFAULT_CHUNK_SIZE,
        ));
        let offset = t.offset.0;
        let desc = self
            .reg
            .open(&store, true)
            .map_err(|e| ServeError::from(e).context("tracking.bdev"))?;
        let c = cbt.clone();
        let opened = self.exec(move || {
            let mut io = ChannelIo::new(desc.channel()?);
            c.open(&mut io, &CbtStore { offset })
                .map_err(|e| ServeError::Failed(format!("opening the change tracking: {e}")))
        })?;
        match &opened {
            CbtOpen::Intact(base) => tracing::info!(
                bdev = name,
                store = %store,
                base = ?base.as_ref().map(|b| b.generation),
                marked = cbt.marked(),
                "change tracking intact since the last clean stop"
            ),
            CbtOpen::Fresh => tracing::info!(bdev = name, store = %store, "change tracking starts"),
            CbtOpen::Lost(why) => tracing::warn!(
                bdev = name,
                store = %store,
                "change tracking lost ({why}): the next backup is full"
            ),
        }
        let bdev = match hotcopy_cow::create_with(&self.reg, name, &base_name, Some(cbt.clone())) {
            Ok(b) => b,
            Err(e) => {
                // Leave the store as a clean stop would: nothing was written.
                let _ = self.close_store(&cbt, &store, offset);
                return Err(ServeError::from(e).context(&format!("creating {name}")));
            }
        };
        Ok((
            bdev,
            Some(Tracking {
                cbt,
                store,
                offset,
                cfg: t.clone(),
                opened,
            }),
        ))
    }

    /// Refuses a second bdev on a file another bdev of the daemon has open.
    fn check_files(&self, cfg: &BdevConfig) -> Result<()> {
        let Some(path) = backing_file(cfg) else {
            return Ok(());
        };
        let st = self.state();
        for d in &st.defs {
            if let Some(other) = d.cfg.as_ref().and_then(backing_file) {
                if same_file(&path, &other) {
                    return Err(ServeError::Busy(format!(
                        "{} is already open as bdev {:?}: name that bdev instead",
                        path.display(),
                        d.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// A bdev of the daemon on the file of `cfg` (a `uring:` spec), if any.
    pub fn find_by_file(&self, cfg: &BdevConfig) -> Option<String> {
        let path = backing_file(cfg)?;
        let st = self.state();
        st.defs
            .iter()
            .find(|d| {
                matches!(d.cfg.as_ref(), Some(c) if c.base().is_none())
                    && d.cfg
                        .as_ref()
                        .and_then(backing_file)
                        .is_some_and(|p| same_file(&path, &p))
            })
            .map(|d| d.name.clone())
    }

    /// The bdev a parameter names: a bdev name, or a spec (it has a ':'),
    /// for which the bdev of the daemon on the same file is used or else a
    /// new one is made, named `PREFIXn`.
    pub fn resolve(
        &self,
        param: &str,
        value: &str,
        prefix: &str,
        origin: Origin,
    ) -> Result<String> {
        if !value.contains(':') {
            self.reg
                .lookup(value)
                .map_err(|e| ServeError::NotFound(format!("{param}: {e}")))?;
            return Ok(value.to_string());
        }
        let cfg = hotcopy_config::parse_spec(value).map_err(|e| ServeError::param(param, e))?;
        let _serial = lock(&self.create);
        if cfg.base().is_none() {
            if let Some(existing) = self.find_by_file(&cfg) {
                return Ok(existing);
            }
        }
        let name = (0u64..)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| self.reg.get(n).is_none() && self.state().def(n).is_none())
            .unwrap_or_else(|| prefix.to_string());
        self.create_locked(&name, &cfg, None, origin)
            .map_err(|e| e.context(param))?;
        Ok(name)
    }

    /// Records a bdev made outside [`Daemon::create_bdev`] (a snapshot, an
    /// instant restore).
    pub fn record(&self, name: &str, origin: Origin, owned: Vec<String>) {
        self.state().defs.push(Def {
            name: name.to_string(),
            cfg: None,
            origin,
            owned,
        });
    }

    // ---- Deleting bdevs ---------------------------------------------------

    /// Deletes `name` and what was created with it. `product` checks the
    /// module (`bdev_malloc_delete` deletes malloc bdevs only).
    pub fn delete_bdev(&self, name: &str, product: Option<&[&str]>) -> Result<()> {
        self.check_running()?;
        let _serial = lock(&self.create);
        let bdev = self.reg.lookup(name)?;
        if let Some(p) = product {
            if !p.contains(&bdev.info().product) {
                return Err(ServeError::InvalidParams(format!(
                    "name: {name:?} is a {} bdev, not {}",
                    bdev.info().product,
                    p.join(" or ")
                )));
            }
        }
        {
            let st = self.state();
            let Some(def) = st.def(name) else {
                let owner = st
                    .defs
                    .iter()
                    .find(|d| d.owned.iter().any(|o| o == name))
                    .map(|d| d.name.clone());
                return Err(match owner {
                    Some(o) => ServeError::Busy(format!(
                        "bdev {name:?} was created with {o:?}; delete {o:?}"
                    )),
                    None => ServeError::NotFound(format!("no bdev {name:?} made by the daemon")),
                });
            };
            if def.origin == Origin::Internal {
                return Err(ServeError::Busy(format!(
                    "bdev {name:?} belongs to the daemon (a job's container or a restore's \
                     target) and goes when its job ends"
                )));
            }
            if let Some(why) = st.in_use(name) {
                return Err(ServeError::Busy(why));
            }
        }
        if let Some(by) = bdev.claimed_by() {
            return Err(ServeError::Busy(format!(
                "bdev {name:?} is the base of {by:?}; delete {by:?} first"
            )));
        }
        // Flush what it holds before it goes (best effort: a snapshot
        // without an overlay takes no flush).
        if let Err(e) = self.flush(name) {
            tracing::warn!(bdev = name, "flush before delete: {e}");
        }
        // Handles that keep the bdev (and its claim on its base) alive.
        let (tracking, owned, snap, inst) = {
            let mut st = self.state();
            for j in st.jobs.iter_mut().filter(|j| j.volume == name) {
                j.forget_handle();
            }
            let snap = st.snapshots.remove(name);
            let inst = st.instants.remove(name);
            let tracking = st.tracking.remove(name);
            let owned = st
                .defs
                .iter()
                .position(|d| d.name == name)
                .map(|i| st.defs.remove(i).owned)
                .unwrap_or_default();
            (tracking, owned, snap, inst)
        };
        drop(snap);
        if let Some(r) = &inst {
            r.handle.cancel();
        }
        drop(bdev);
        self.reg.unregister(name)?;
        drop(inst);
        if let Some(t) = tracking {
            self.close_store(&t.cbt, &t.store, t.offset)?;
            tracing::info!(bdev = name, store = %t.store, "change tracking closed clean");
        }
        for n in owned {
            // The bdev above released its claim when its last handle went.
            if let Err(e) = self.reg.unregister(&n) {
                tracing::warn!(bdev = %n, "removing a bdev created with {name}: {e}");
            }
        }
        tracing::info!(bdev = name, "bdev deleted");
        Ok(())
    }

    /// Removes a bdev of the daemon's own (a container, a temporary target).
    pub fn remove_internal(&self, name: &str) {
        let owned = {
            let mut st = self.state();
            st.defs
                .iter()
                .position(|d| d.name == name)
                .map(|i| st.defs.remove(i).owned)
                .unwrap_or_default()
        };
        if let Err(e) = self.reg.unregister(name) {
            tracing::warn!(bdev = name, "removing: {e}");
        }
        for n in owned {
            let _ = self.reg.unregister(&n);
        }
    }

    /// Flushes `name` through its stack, on reactor 0. A bdev that takes no
    /// flush, or that is claimed (its owner flushes it), is skipped.
    pub fn flush(&self, name: &str) -> Result<()> {
        let bdev = self.reg.lookup(name)?;
        if !bdev.supports(IoType::Flush) || bdev.claimed_by().is_some() {
            return Ok(());
        }
        let desc = bdev.open(true)?;
        self.exec(move || {
            let mut io = ChannelIo::new(desc.channel()?);
            io.flush()
                .map_err(|e| ServeError::Failed(format!("flush: {e}")))
        })
    }

    /// Saves `cbt` to its store for a clean stop (see `hotcopy_cow::cbt`).
    fn close_store(&self, cbt: &Arc<Cbt>, store: &str, offset: u64) -> Result<()> {
        let desc = self.reg.open(store, true)?;
        let c = cbt.clone();
        self.exec(move || {
            let mut io = ChannelIo::new(desc.channel()?);
            c.close(&mut io, &CbtStore { offset })
                .map_err(|e| ServeError::Failed(format!("closing the change tracking: {e}")))
        })
    }

    // ---- save_config --------------------------------------------------------

    /// The running state as a config that reproduces it: the global
    /// sections as started, every bdev made from the config, a flag, an RPC
    /// or a spec parameter (in creation order, with its change tracking),
    /// the RPC socket and the exports. Bdevs the schema cannot describe
    /// (snapshots, instant restores) are left out and listed in the second
    /// value.
    pub fn running_config(&self) -> (Config, Vec<String>) {
        let st = self.state();
        let mut cfg = Config {
            reactors: self.base.reactors.clone(),
            buffer_pool: self.base.buffer_pool.clone(),
            rpc_socket: self.base.rpc_socket.clone(),
            exports: st.exports.clone(),
            ..Config::default()
        };
        let mut left_out = Vec::new();
        for d in &st.defs {
            match (&d.cfg, d.origin) {
                (_, Origin::Internal) => {}
                (Some(c), _) => cfg.bdevs.push(hotcopy_config::NamedBdev {
                    name: d.name.clone(),
                    bdev: c.clone(),
                }),
                (None, _) => {
                    let product = self
                        .reg
                        .get(&d.name)
                        .map(|b| b.info().product)
                        .unwrap_or("bdev");
                    left_out.push(format!(
                        "{} ({product}): not expressible in the config; recreate it by RPC",
                        d.name
                    ));
                }
            }
        }
        for (cow, t) in &st.tracking {
            cfg.tracking.insert(cow.clone(), t.cfg.clone());
        }
        (cfg, left_out)
    }

    // ---- Stats --------------------------------------------------------------

    /// Per-bdev figures: geometry and claims for every bdev, and its I/O
    /// counters and latency percentiles (`io`, see `hotcopy_bdev::stats`);
    /// for a cow bdev its submitters' counters, the hosts' mean latency it
    /// measured, and its change tracking; for snapshots and instant
    /// restores their counters. (`hotcopy_get_stats` adds the NBD servers'
    /// counters and the jobs.)
    pub fn bdev_stats(&self) -> Value {
        let st = self.state();
        let mut out = Vec::new();
        for b in self.reg.list() {
            let mut v = bdev_json(&b);
            v["io"] = serde_json::to_value(b.io_stats()).unwrap_or(Value::Null);
            if let Some(cow) = b.backend::<CowBdev>() {
                let (area, done) = cow.fg_meter().read();
                let ticks_per_us = hotcopy_runtime::clock::ticks_per_us();
                v["cow"] = json!({
                    "job_installed": cow.job().is_some_and(|j| !j.state().is_finished()),
                    "host_ios_measured": done,
                    "host_latency_mean_us": (done > 0)
                        .then(|| area as f64 / done as f64 / ticks_per_us),
                    "submitters": cow.channels().iter().map(|c| json!({
                        "name": c.name,
                        "writes_forwarded": c.forwarded_writes.load(Ordering::Relaxed),
                        "inflight": c.inflight.load(Ordering::Relaxed),
                        "held": c.held.load(Ordering::Relaxed),
                        "paced_writes": c.paced_writes.load(Ordering::Relaxed),
                        "slot_waits": c.slot_waits.load(Ordering::Relaxed),
                        "pace_delay_us": c.pace_delay_ticks.load(Ordering::Relaxed) as f64
                            / ticks_per_us,
                    })).collect::<Vec<_>>(),
                });
                if let Some(t) = st.tracking.get(b.name()) {
                    v["cow"]["tracking"] = tracking_json(t);
                }
            }
            if let Some(s) = st.snapshots.get(b.name()) {
                v["snapshot"] = serde_json::to_value(s.handle.stats()).unwrap_or(Value::Null);
            }
            if let Some(r) = st.instants.get(b.name()) {
                v["instant_restore"] = super::repo::instant_json(&r.handle.status());
            }
            out.push(v);
        }
        drop(st);
        json!({ "bdevs": out })
    }

    // ---- The clean stop -----------------------------------------------------

    /// Stops everything that writes, then leaves every device consistent:
    ///
    /// 1. refuse new work;
    /// 2. cancel running backup jobs and wait for them: a cancelled job
    ///    removes its unfinished generation and gives its change tracking
    ///    marks back, so the next incremental still copies everything
    ///    changed (waiting for a job could take hours; a stop must not);
    /// 3. stop instant restores' hydrators (their bdevs keep what they
    ///    hydrated on the target);
    /// 4. flush every bdev (each stack from its top);
    /// 5. close every change-tracking store clean, so the next start finds
    ///    the tracking intact.
    ///
    /// The caller stops the exports before and the reactors after.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let running: Vec<_> = {
            let st = self.state();
            st.jobs
                .iter()
                .filter_map(|j| j.running_handle().map(|h| (j.id, j.volume.clone(), h)))
                .collect()
        };
        for (id, volume, job) in &running {
            tracing::info!(job = id, volume = %volume, "cancelling the backup for the stop");
            job.cancel();
        }
        for (id, volume, job) in &running {
            let state = job.wait(Duration::from_secs(60));
            tracing::info!(job = id, volume = %volume, state = ?state, "backup ended");
        }
        super::jobs::reap(self);
        let instants: Vec<_> = self
            .state()
            .instants
            .values()
            .map(|r| r.handle.clone())
            .collect();
        for h in &instants {
            h.cancel();
        }
        for h in &instants {
            h.wait(Duration::from_secs(30));
        }
        for b in self.reg.list() {
            if let Err(e) = self.flush(b.name()) {
                tracing::warn!(bdev = b.name(), "flush at stop: {e}");
            }
        }
        let stores: Vec<(String, Arc<Cbt>, String, u64)> = self
            .state()
            .tracking
            .iter()
            .map(|(n, t)| (n.clone(), t.cbt.clone(), t.store.clone(), t.offset))
            .collect();
        for (cow, cbt, store, offset) in stores {
            match self.close_store(&cbt, &store, offset) {
                Ok(()) => tracing::info!(
                    bdev = %cow,
                    store = %store,
                    marked = cbt.marked(),
                    "change tracking closed clean"
                ),
                Err(e) => tracing::error!(
                    bdev = %cow,
                    "closing the change tracking failed ({e}): the next backup will be full"
                ),
            }
        }
    }
}

impl ServeError {
    /// The same error, its message prefixed with `what: `.
    pub fn context(self, what: &str) -> ServeError {
        let p = |m: String| format!("{what}: {m}");
        match self {
            ServeError::InvalidParams(m) => ServeError::InvalidParams(p(m)),
            ServeError::NotFound(m) => ServeError::NotFound(p(m)),
            ServeError::Busy(m) => ServeError::Busy(p(m)),
            ServeError::Exists(m) => ServeError::Exists(p(m)),
            ServeError::Failed(m) => ServeError::Failed(p(m)),
            ServeError::Repository(m) => ServeError::Repository(p(m)),
            ServeError::ShuttingDown => ServeError::ShuttingDown,
        }
    }
}

/// The names `construct::create_one` gives the inline bases of `name`.
fn inline_names(name: &str, cfg: &BdevConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = cfg;
    let mut n = name.to_string();
    while let Some(BaseRef::Inline(inner)) = cur.base() {
        n = format!("{n}.base");
        out.push(n.clone());
        cur = inner;
    }
    out
}

/// The file at the bottom of an inline stack, if it is a `uring` bdev.
pub fn backing_file(cfg: &BdevConfig) -> Option<PathBuf> {
    match cfg {
        BdevConfig::Uring { path, .. } => Some(path.clone()),
        other => match other.base()? {
            BaseRef::Inline(inner) => backing_file(inner),
            BaseRef::Name(_) => None,
        },
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// A bdev as `bdev_get_bdevs` shows it (SPDK's field names where they exist).
pub fn bdev_json(b: &Bdev) -> Value {
    let info = b.info();
    let types: Vec<&str> = IoType::ALL
        .iter()
        .filter(|t| b.supports(**t))
        .map(|t| io_type_name(*t))
        .collect();
    json!({
        "name": info.name,
        "product_name": info.product,
        "uuid": hotcopy_bdev::format_uuid(info.uuid),
        "block_size": info.block_size,
        "num_blocks": info.num_blocks,
        "size_bytes": info.size_bytes(),
        "claimed": b.claimed_by().is_some(),
        "claimed_by": b.claimed_by(),
        "volatile_write_cache": info.volatile_write_cache,
        "supported_io_types": types,
    })
}

fn io_type_name(t: IoType) -> &'static str {
    match t {
        IoType::Read => "read",
        IoType::Write => "write",
        IoType::Flush => "flush",
        IoType::Unmap => "unmap",
        IoType::WriteZeroes => "write_zeroes",
    }
}

pub fn tracking_json(t: &Tracking) -> Value {
    let base = t.cbt.base();
    json!({
        "store": t.store,
        "offset": t.offset,
        "chunk_size": t.cbt.chunk_size(),
        "chunks": t.cbt.chunks(),
        "chunks_changed": t.cbt.marked(),
        "base_generation": base.as_ref().map(|b| b.generation),
        "base_repository": base.as_ref().map(|b| b.repository.clone()),
        "opened": match &t.opened {
            CbtOpen::Intact(_) => "intact".to_string(),
            CbtOpen::Fresh => "fresh".to_string(),
            CbtOpen::Lost(why) => format!("lost: {why}"),
        },
    })
}

/// Runs `f` with a [`ChannelIo`] on bdev `name`, on the calling thread (a
/// control thread: uring and malloc channels work on any thread, and the
/// reactors stay free while a long verify reads).
pub fn with_io<T>(
    desc: hotcopy_bdev::BdevDesc,
    f: impl FnOnce(&mut dyn BlockIo) -> Result<T>,
) -> Result<T> {
    let ch = desc
        .channel()
        .map_err(|e| ServeError::Failed(error_chain(&e)))?;
    let mut io = ChannelIo::new(ch);
    f(&mut io)
}
