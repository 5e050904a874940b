//! Online backups of cow bdevs into a repository: start, status, cancel,
//! prioritise, rate; and the reaper that tidies up after jobs end.
//!
//! # Full, incremental from tracking, incremental by checksum
//!
//! `hotcopy_backup_start` with `incremental` picks its parent in the
//! repository among the complete generations of the same source name (the
//! volume's name unless `name` says otherwise):
//!
//! * **tracking**: the cow bdev's change tracking is relative to a
//!   generation of this repository that is still there: that generation
//!   is the parent and only the chunks written since are read;
//! * **checksum**: no usable tracking (none configured, lost after a crash,
//!   or relative to another repository) but a complete generation of the
//!   same source, size and chunk size: every chunk is read and only those
//!   whose crc32c differs from the parent's are stored;
//! * **full**: neither; the result says why (`note`).
//!
//! The result and `hotcopy_backup_status` say which (`kind`, `method`).
//!
//! # One writer per repository
//!
//! A repository's free space is known only to the process that opened it,
//! so the daemon lets one operation at a time write a given repository (a
//! backup, a prune, a format); another gets `-32002` (busy) naming it.
//!
//! # After a job
//!
//! The reaper thread notices jobs that ended (every 100 ms), records their
//! final status, removes their container and releases their repository.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotcopy_config::ByteSize;
use hotcopy_cow::repo::{GenSpec, GenState, Repo, SourceIdent};
use hotcopy_cow::{
    start_backup, BackupConfig, BackupJob, BlockRange, ContainerConfig, CowBdev, JobState,
    JobStatus, JobTuning, RepoTarget, Scope, DEFAULT_CHUNK_SIZE,
};
use serde_json::{json, Value};

use super::daemon::{with_io, Daemon, Origin};
use super::error::{Result, ServeError};
use super::params::Params;

/// Container slots of a job when the request names none: 64 chunks (4 MiB
/// of RAM at the default chunk) absorb a burst of first writes while the
/// drain stream catches up, as in `hotcopy backup run`.
pub const DEFAULT_CONTAINER_SLOTS: u32 = 64;
/// Finished jobs kept for `hotcopy_backup_status`: a day of hourly backups
/// of a few volumes, while the records stay a few kilobytes each.
const KEEP_FINISHED: usize = 64;

/// One backup job and what it was asked to do.
pub struct JobRecord {
    pub id: u64,
    pub volume: String,
    /// The repository bdev.
    pub repo: String,
    pub generation: u64,
    pub kind: &'static str,
    pub parent: Option<u64>,
    /// `full`, `tracking` or `checksum` (see the module docs).
    pub method: &'static str,
    pub note: Option<String>,
    /// The job's container bdev (removed when the job ends).
    pub container: String,
    /// Its point-in-time views (removed, with their exports, when the job
    /// ends).
    pub views: Vec<String>,
    pub started_us: u64,
    /// While running (and until the reaper sees it end).
    job: Option<BackupJob>,
    /// The status when it ended.
    last: Option<JobStatus>,
}

impl JobRecord {
    pub fn is_running(&self) -> bool {
        self.job.as_ref().is_some_and(|j| !j.state().is_finished())
    }

    pub fn running_handle(&self) -> Option<BackupJob> {
        self.job.clone().filter(|j| !j.state().is_finished())
    }

    /// Drops the job handle (it keeps the cow bdev alive), keeping the
    /// last status.
    pub fn forget_handle(&mut self) {
        if let Some(j) = self.job.take() {
            self.last = Some(j.status());
        }
    }

    fn status(&self) -> Option<JobStatus> {
        self.job
            .as_ref()
            .map(BackupJob::status)
            .or(self.last.clone())
    }

    /// What `hotcopy_backup_status` shows: the job's status fields, and
    /// what the request made of it.
    pub fn to_json(&self) -> Value {
        let mut v = match self.status() {
            Some(s) => serde_json::to_value(s).unwrap_or_else(|_| json!({})),
            None => json!({ "id": self.id, "state": "running" }),
        };
        v["job"] = json!(self.id);
        v["volume"] = json!(self.volume);
        v["repo"] = json!(self.repo);
        v["generation"] = json!(self.generation);
        v["kind"] = json!(self.kind);
        v["parent"] = json!(self.parent);
        v["method"] = json!(self.method);
        v["note"] = json!(self.note);
        v["views"] = json!(self.views);
        v["started"] = json!(crate::repo_cmd::rfc3339_us(self.started_us));
        let done = v["chunks_done"].as_u64().unwrap_or(0);
        let total = v["chunks_in_scope"].as_u64().unwrap_or(0);
        v["progress"] = json!(if total == 0 {
            if v["state"] == "complete" {
                1.0
            } else {
                0.0
            }
        } else {
            done as f64 / total as f64
        });
        v
    }
}

/// Byte ranges `START+LEN,...` (as `hotcopy backup run` takes them) or a
/// list of such strings, into source blocks.
fn ranges(param: &str, v: Option<Value>, bs: u64, size: u64) -> Result<Vec<BlockRange>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let text = match v {
        Value::String(s) => s,
        Value::Array(items) => items
            .into_iter()
            .map(|i| super::params::as_str(param, i))
            .collect::<Result<Vec<_>>>()?
            .join(","),
        _ => {
            return Err(ServeError::param(
                param,
                "expected byte ranges START+LEN separated by commas, e.g. \"0+1G,4G+512M\"",
            ))
        }
    };
    let mut out = Vec::new();
    for p in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |why: String| ServeError::param(param, format!("{p:?}: {why}"));
        let (a, b) = p
            .split_once('+')
            .ok_or_else(|| bad("expected START+LEN, e.g. 0+1G".into()))?;
        let start = a
            .trim()
            .parse::<ByteSize>()
            .map_err(|e| bad(format!("start: {e}")))?
            .0;
        let len = b
            .trim()
            .parse::<ByteSize>()
            .map_err(|e| bad(format!("length: {e}")))?
            .0;
        if len == 0 {
            return Err(bad("empty range".into()));
        }
        if !start.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(bad(format!(
                "not a multiple of the volume's block size {bs}"
            )));
        }
        if start.saturating_add(len) > size {
            return Err(bad(format!("past the end of the volume ({size} bytes)")));
        }
        out.push(BlockRange::new(start / bs, len / bs));
    }
    Ok(out)
}

/// The cow bdev `volume`, or an invalid-params error saying what it is.
fn cow_of(d: &Daemon, volume: &str) -> Result<hotcopy_bdev::Bdev> {
    let b = d
        .reg
        .lookup(volume)
        .map_err(|e| ServeError::NotFound(format!("volume: {e}")))?;
    if b.backend::<CowBdev>().is_none() {
        return Err(ServeError::param(
            "volume",
            format!(
                "{volume:?} is a {} bdev, not a cow bdev: back up a cow bdev \
                 (hotcopy_cow_create puts one on a volume)",
                b.info().product
            ),
        ));
    }
    Ok(b)
}

/// Releases what a backup start reserved, if it did not start.
struct Reservation<'a> {
    d: &'a Daemon,
    volume: String,
    repo: Option<String>,
    container: Option<String>,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let container = {
            let mut st = self.d.state();
            st.starting.remove(&self.volume);
            if self.armed {
                if let Some(r) = &self.repo {
                    st.repo_writer.remove(r);
                }
                self.container.take()
            } else {
                None
            }
        };
        if let Some(c) = container {
            self.d.remove_internal(&c);
        }
    }
}

/// `hotcopy_backup_start`.
pub fn start(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(
        params,
        &[
            "volume",
            "repo",
            "incremental",
            "rate",
            "include",
            "exclude",
            "name",
            "chunk_size",
            "container_slots",
            "view",
            "min_share",
            "tolerance",
        ],
    )?;
    let volume = p.str("volume")?;
    let repo_param = p.str("repo")?;
    let incremental = p.bool_or("incremental", false)?;
    let rate = p.opt_size("rate")?.unwrap_or(0);
    let include = p.opt_value("include");
    let exclude = p.opt_value("exclude");
    let name = p.opt_str("name")?.unwrap_or_else(|| volume.clone());
    let chunk_param = p.opt_size("chunk_size")?;
    let slots = p.opt_u64("container_slots")?;
    let view = p.opt_str("view")?;
    let defaults = JobTuning::default();
    let min_share = p.opt_f64("min_share")?.unwrap_or(defaults.min_share);
    let tolerance = p.opt_f64("tolerance")?.unwrap_or(defaults.fg_tolerance);
    p.done()?;
    if !(0.0..=1.0).contains(&min_share) {
        return Err(ServeError::param(
            "min_share",
            format!("{min_share} is not a share of time between 0 and 1"),
        ));
    }
    if tolerance < 1.0 {
        return Err(ServeError::param(
            "tolerance",
            format!("{tolerance} is below 1: the hosts' latency can never be below its own level"),
        ));
    }
    d.check_running()?;
    if name.is_empty() {
        return Err(ServeError::param("name", "the source name is empty"));
    }
    if let Some(v) = &view {
        check_view_name(d, v)?;
    }
    let slots = match slots {
        None => DEFAULT_CONTAINER_SLOTS,
        Some(0) => return Err(ServeError::param("container_slots", "at least 1")),
        Some(n) => {
            u32::try_from(n).map_err(|_| ServeError::param("container_slots", "too large"))?
        }
    };
    let cow = cow_of(d, &volume)?;
    let cb = cow.backend::<CowBdev>().expect("checked by cow_of");
    let bs = cow.block_size() as u64;
    let scope = Scope {
        include: ranges("include", include, bs, cow.size_bytes())?,
        exclude: ranges("exclude", exclude, bs, cow.size_bytes())?,
        skip_unallocated: true,
    };
    let cbt = cb.cbt();
    let chunk = match (chunk_param, &cbt) {
        (Some(c), Some(t)) if c != t.chunk_size() => {
            return Err(ServeError::param(
                "chunk_size",
                format!(
                    "{volume} tracks changes in chunks of {}; a backup of it uses that size",
                    ByteSize(t.chunk_size())
                ),
            ))
        }
        (_, Some(t)) => t.chunk_size(),
        (Some(c), None) => c,
        (None, None) => DEFAULT_CHUNK_SIZE,
    };
    let chunk32 = u32::try_from(chunk)
        .map_err(|_| ServeError::param("chunk_size", format!("{chunk} is too large")))?;
    // Reserve the volume before anything else can see it free.
    let mut resv = {
        let mut st = d.state();
        if let Some(j) = st
            .jobs
            .iter()
            .find(|j| j.volume == volume && j.is_running())
        {
            return Err(ServeError::Busy(format!(
                "a backup of {volume} is running (job {}); cancel it or wait",
                j.id
            )));
        }
        if !st.starting.insert(volume.clone()) {
            return Err(ServeError::Busy(format!(
                "a backup of {volume} is starting"
            )));
        }
        Reservation {
            d,
            volume: volume.clone(),
            repo: None,
            container: None,
            armed: true,
        }
    };
    // Jobs that just ended release their repository.
    reap(d);
    let repo = d.resolve("repo", &repo_param, "repo", Origin::Spec)?;
    if repo == volume {
        return Err(ServeError::param(
            "repo",
            "the repository cannot be the volume itself",
        ));
    }
    {
        let mut st = d.state();
        if let Some(w) = st.repo_writer.get(&repo) {
            return Err(ServeError::Busy(format!(
                "repository {repo} is being written by {w}; one writer per repository at a time"
            )));
        }
        for (n, s) in &st.snapshots {
            if s.overlay.as_deref() == Some(repo.as_str()) {
                return Err(ServeError::Busy(format!(
                    "bdev {repo} is the overlay of snapshot {n}"
                )));
            }
        }
        st.repo_writer
            .insert(repo.clone(), format!("the backup of {volume}"));
        resv.repo = Some(repo.clone());
    }
    let ns = d
        .reg
        .open(&repo, true)
        .map_err(|e| ServeError::from(e).context("repo"))?;
    // The parent, and how the incremental finds what changed.
    let size = cow.size_bytes();
    let (latest, tracked) = with_io(ns.clone(), |io| {
        let r = Repo::open(io).map_err(|e| ServeError::from(e).context(&format!("repo {repo}")))?;
        let latest = r
            .generations()
            .iter()
            .rev()
            .find(|g| g.source.name == name && g.state == GenState::Complete)
            .map(|g| (g.id, g.chunk_size, g.source.size_bytes));
        let uuid = r.uuid();
        let tracked = cbt.as_ref().and_then(|t| t.base()).filter(|b| {
            b.repository == uuid
                && r.generation(b.generation).is_some_and(|g| {
                    g.state == GenState::Complete
                        && g.source.size_bytes == size
                        && g.chunk_size == chunk32
                })
        });
        Ok((latest, tracked.map(|b| b.generation)))
    })?;
    let (parent, method, note): (Option<u64>, &'static str, Option<String>) = if !incremental {
        (None, "full", None)
    } else if let Some(g) = tracked {
        (
            Some(g),
            "tracking",
            Some(format!(
                "incremental from generation {g}: the change tracking lists the chunks written since"
            )),
        )
    } else {
        let why_no_tracking = match &cbt {
            None => format!("{volume} has no change tracking"),
            Some(t) => match (t.base(), t.opened()) {
                (_, hotcopy_cow::CbtOpen::Lost(why)) if t.base().is_none() => {
                    format!("the change tracking of {volume} was lost ({why})")
                }
                (None, _) => {
                    format!("the change tracking of {volume} is not relative to a backup yet")
                }
                (Some(b), _) => format!(
                    "the change tracking of {volume} is relative to generation {} of repository \
                     {}, which is not a complete generation of this one",
                    b.generation, b.repository
                ),
            },
        };
        match latest {
            Some((id, cs, sz)) if cs == chunk32 && sz == size => (
                Some(id),
                "checksum",
                Some(format!(
                    "incremental from generation {id}: {why_no_tracking}, so every chunk is read \
                     and compared by checksum with the parent; only chunks that differ are stored"
                )),
            ),
            Some((id, cs, sz)) => (
                None,
                "full",
                Some(format!(
                    "generation {id} of {name} does not match (chunk size {cs} against {chunk}, \
                     source size {sz} against {size}): running a full backup"
                )),
            ),
            None => (
                None,
                "full",
                Some(format!(
                    "no complete generation of {name} in repository {repo}: running a full backup"
                )),
            ),
        }
    };
    // The container: RAM, chunk-sized slots, removed when the job ends.
    let container = (0u64..)
        .map(|i| format!("{volume}.container{i}"))
        .find(|n| d.reg.get(n).is_none())
        .unwrap_or_else(|| format!("{volume}.container"));
    let ccfg = hotcopy_config::BdevConfig::Malloc {
        size: ByteSize(chunk * slots as u64),
        block_size: cow.block_size(),
    };
    d.create_bdev(&container, &ccfg, None, Origin::Internal)?;
    resv.container = Some(container.clone());
    let spec = GenSpec {
        source: SourceIdent {
            name: name.clone(),
            size_bytes: size,
        },
        chunk_size: chunk32,
        parent,
        compare_with_parent: method == "checksum",
    };
    let home = d.home().clone();
    let target = Arc::new(
        RepoTarget::begin(ns, &home, spec)
            .map_err(|e| ServeError::from(hotcopy_cow::CowError::from(e)))?,
    );
    let generation = target.generation();
    let cfg = BackupConfig {
        target,
        container: ContainerConfig {
            desc: d.reg.open(&container, true)?,
            offset_blocks: 0,
            slots,
        },
        chunk_size: chunk,
        scope,
        tuning: JobTuning {
            rate_limit: rate,
            min_share,
            fg_tolerance: tolerance,
            ..JobTuning::default()
        },
        changed_since: if method == "tracking" { parent } else { None },
    };
    let job = start_backup(&cow, &home, cfg)?;
    let mut views = Vec::new();
    if let Some(v) = view {
        if let Err(e) = make_view(d, &v, &job) {
            // Nothing half-made: the job goes (its generation with it), and
            // the reservation releases the repository and the container.
            job.cancel();
            let _ = job.wait(Duration::from_secs(10));
            return Err(e);
        }
        views.push(v);
    }
    let rec = JobRecord {
        id: job.status().id,
        volume: volume.clone(),
        repo: repo.clone(),
        generation,
        kind: if parent.is_some() {
            "incremental"
        } else {
            "full"
        },
        parent,
        method,
        note,
        container,
        views,
        started_us: hotcopy_cow::repo::now_us(),
        job: Some(job),
        last: None,
    };
    tracing::info!(
        job = rec.id,
        volume = %volume,
        repo = %repo,
        generation,
        kind = rec.kind,
        method,
        "backup started"
    );
    let out = rec.to_json();
    {
        let mut st = d.state();
        st.jobs.push(rec);
    }
    // Started: the reaper releases the repository and the container.
    resv.armed = false;
    Ok(out)
}

/// The record for a `volume`/`job` selection: the newest job of the volume,
/// the job by id, or (neither) the newest job.
fn select<'a>(
    jobs: &'a mut [JobRecord],
    volume: Option<&str>,
    id: Option<u64>,
) -> Result<&'a mut JobRecord> {
    let found = jobs
        .iter_mut()
        .rev()
        .find(|j| volume.is_none_or(|v| j.volume == v) && id.is_none_or(|i| j.id == i));
    found.ok_or_else(|| {
        ServeError::NotFound(match (volume, id) {
            (Some(v), None) => format!("no backup job of volume {v:?}"),
            (_, Some(i)) => format!("no backup job {i}"),
            (None, None) => "no backup jobs yet".into(),
        })
    })
}

/// `hotcopy_backup_status`: one job (`volume` or `job`), or every job.
pub fn status(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["volume", "job"])?;
    let volume = p.opt_str("volume")?;
    let id = p.opt_u64("job")?;
    p.done()?;
    let mut st = d.state();
    if volume.is_none() && id.is_none() {
        return Ok(json!({
            "jobs": st.jobs.iter().map(JobRecord::to_json).collect::<Vec<_>>()
        }));
    }
    Ok(select(&mut st.jobs, volume.as_deref(), id)?.to_json())
}

/// The running job of `volume` (or the only running job), for the actions.
fn running(d: &Daemon, volume: Option<&str>) -> Result<(u64, String, BackupJob)> {
    let st = d.state();
    let mut runs = st
        .jobs
        .iter()
        .filter(|j| volume.is_none_or(|v| j.volume == v))
        .filter_map(|j| j.running_handle().map(|h| (j.id, j.volume.clone(), h)));
    let first = runs.next();
    match (first, volume) {
        (Some(r), Some(_)) => Ok(r),
        (Some(r), None) => match runs.next() {
            None => Ok(r),
            Some(_) => Err(ServeError::param(
                "volume",
                "several backups are running: name the volume",
            )),
        },
        (None, Some(v)) => Err(ServeError::NotFound(format!(
            "no backup of volume {v:?} is running"
        ))),
        (None, None) => Err(ServeError::NotFound("no backup is running".into())),
    }
}

/// `hotcopy_backup_cancel`: asks the job to stop and waits (up to `wait_s`,
/// default 30 s) for it to end; the unfinished generation is removed.
pub fn cancel(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["volume", "wait_s"])?;
    let volume = p.opt_str("volume")?;
    let wait = p.opt_u64("wait_s")?.unwrap_or(30);
    p.done()?;
    let (id, vol, job) = running(d, volume.as_deref())?;
    job.cancel();
    tracing::info!(job = id, volume = %vol, "backup cancel requested");
    let deadline = Instant::now() + Duration::from_secs(wait);
    while !job.state().is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut st = d.state();
    Ok(select(&mut st.jobs, None, Some(id))?.to_json())
}

/// `hotcopy_backup_prioritize`: moves a byte range of the volume to the
/// front of the copy schedule.
pub fn prioritize(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["volume", "offset", "length"])?;
    let volume = p.opt_str("volume")?;
    let offset = p.size("offset")?;
    let length = p.size("length")?;
    p.done()?;
    if length == 0 {
        return Err(ServeError::param("length", "the range is empty"));
    }
    let (id, vol, job) = running(d, volume.as_deref())?;
    let cow = cow_of(d, &vol)?;
    let bs = cow.block_size() as u64;
    if offset.saturating_add(length) > cow.size_bytes() {
        return Err(ServeError::param(
            "length",
            format!(
                "{offset}+{length} runs past the end of {vol} ({} bytes)",
                cow.size_bytes()
            ),
        ));
    }
    let first = offset / bs;
    let last = (offset + length).div_ceil(bs);
    job.prioritize(BlockRange::new(first, last - first));
    Ok(json!({ "job": id, "volume": vol, "offset": first * bs, "length": (last - first) * bs }))
}

/// `hotcopy_backup_set_rate`: the copy stream's limit in bytes per second
/// (0: none).
pub fn set_rate(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["volume", "rate"])?;
    let volume = p.opt_str("volume")?;
    let rate = p.size("rate")?;
    p.done()?;
    let (id, vol, job) = running(d, volume.as_deref())?;
    job.set_rate_limit(rate);
    Ok(json!({ "job": id, "volume": vol, "rate": rate }))
}

/// A free name for a view bdev.
fn check_view_name(d: &Daemon, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(ServeError::param("view", "the view's name is empty"));
    }
    if d.reg.get(name).is_some() || d.state().def(name).is_some() {
        return Err(ServeError::Exists(format!("a bdev named {name:?} exists")));
    }
    Ok(())
}

/// Creates the point-in-time view `name` of `job` (a read-only bdev that
/// shows the volume as it was at the job's consistency point; see
/// `hotcopy_cow::view`). The daemon owns it: it goes when the job ends.
fn make_view(d: &Daemon, name: &str, job: &BackupJob) -> Result<()> {
    hotcopy_cow::create_view(&d.reg, name, job).map_err(|e| ServeError::from(e).context("view"))?;
    d.record(name, Origin::Internal, Vec::new());
    tracing::info!(
        view = name,
        job = job.status().id,
        "point-in-time view created"
    );
    Ok(())
}

/// Removes a view of a job that ended: first the NBD exports of it (their
/// connections finish what is in flight and close), then the bdev.
fn remove_view(d: &Daemon, name: &str) {
    let exports: Vec<String> = d
        .state()
        .exports
        .iter()
        .filter(|e| e.bdev == name)
        .map(|e| e.name.clone())
        .collect();
    for e in exports {
        if let Err(err) = d.nbd.remove(d, &e) {
            tracing::warn!(export = %e, view = name, "stopping the export of a view: {err}");
        }
    }
    d.remove_internal(name);
    tracing::info!(view = name, "point-in-time view removed: its job ended");
}

/// `hotcopy_backup_view_create`: a point-in-time view of a running job
/// (`volume`, or the only running job), named `name`. Read-only; it shows
/// the volume exactly as it was at the job's consistency point for every
/// chunk in the job's scope, and goes (with its NBD exports) when the job
/// ends.
pub fn view_create(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["volume", "name"])?;
    let volume = p.opt_str("volume")?;
    let name = p.str("name")?;
    p.done()?;
    d.check_running()?;
    check_view_name(d, &name)?;
    let (id, vol, job) = running(d, volume.as_deref())?;
    make_view(d, &name, &job)?;
    let ended = {
        let mut st = d.state();
        match st.jobs.iter_mut().find(|j| j.id == id && j.job.is_some()) {
            Some(rec) => {
                rec.views.push(name.clone());
                false
            }
            None => true,
        }
    };
    if ended {
        // The reaper took the job meanwhile: the view would outlive it.
        remove_view(d, &name);
        return Err(ServeError::NotFound(format!(
            "the backup of {vol:?} ended while its view was made"
        )));
    }
    Ok(json!({ "name": name, "job": id, "volume": vol }))
}

/// Records the end of every job that ended: final status, views and
/// container removed, repository released.
pub fn reap(d: &Daemon) {
    let ended: Vec<(u64, BackupJob)> = {
        let st = d.state();
        st.jobs
            .iter()
            .filter_map(|j| {
                j.job
                    .as_ref()
                    .filter(|h| h.state().is_finished())
                    .map(|h| (j.id, h.clone()))
            })
            .collect()
    };
    for (id, job) in ended {
        // Until the streams have uninstalled the job and let go of the container.
        let state = job.wait(Duration::from_secs(10));
        let status = job.status();
        drop(job);
        let (container, repo, volume, views) = {
            let mut st = d.state();
            let Some(rec) = st.jobs.iter_mut().find(|j| j.id == id && j.job.is_some()) else {
                // Reaped by another caller meanwhile.
                continue;
            };
            rec.job = None;
            rec.last = Some(status.clone());
            let out = (
                rec.container.clone(),
                rec.repo.clone(),
                rec.volume.clone(),
                std::mem::take(&mut rec.views),
            );
            st.repo_writer.remove(&out.1);
            out
        };
        for v in views {
            remove_view(d, &v);
        }
        d.remove_internal(&container);
        match state {
            JobState::Complete => tracing::info!(
                job = id,
                volume = %volume,
                repo = %repo,
                generation = ?status.generation,
                chunks = status.chunks_done,
                seconds = status.elapsed_s,
                "backup complete"
            ),
            JobState::Cancelled => tracing::info!(job = id, volume = %volume, "backup cancelled"),
            s => tracing::warn!(
                job = id,
                volume = %volume,
                state = ?s,
                error = status.error.as_deref().unwrap_or(""),
                "backup did not complete"
            ),
        }
    }
    let mut st = d.state();
    let finished = st.jobs.iter().filter(|j| j.job.is_none()).count();
    if finished > KEEP_FINISHED {
        let mut drop_n = finished - KEEP_FINISHED;
        st.jobs.retain(|j| {
            if drop_n > 0 && j.job.is_none() {
                drop_n -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The reaper: [`reap`] every 100 ms until `stop`.
pub fn spawn_reaper(
    d: Arc<Daemon>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("hotcopy-reaper".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
                reap(&d);
            }
        })
}
