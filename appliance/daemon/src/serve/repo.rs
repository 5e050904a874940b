//! The repository through the daemon: format, list, verify, prune, restore,
//! instant restore and snapshots.
//!
//! `repo` parameters take a bdev name or a spec; a spec names the daemon's
//! bdev on the same file when there is one, else a new bdev is made for it
//! (`repoN`, kept and saved by `save_config`). Catalog reads, verify and
//! prune run on the RPC connection's thread through a channel of its own,
//! so a long verify never stalls a reactor; restores and hydration run on
//! the home reactor with the library's pipelined engines.

use std::time::Duration;

use hotcopy_cow::repo::{GenState, Generation, Repo, RepoError, RepoReader};
use hotcopy_cow::repo_bdev::{
    create_snapshot, restore_to_on, start_instant_restore, InstantRestore, InstantStatus,
    InstantTuning, OverlayConfig, RepoBdevError, SnapshotHandle,
};
use serde_json::{json, Value};

use super::daemon::{with_io, Daemon, Origin};
use super::error::{Result, ServeError};
use super::params::Params;
use crate::repo_cmd::{info_json, info_value, list_json, prune_json, restore_json, verify_value};

/// A snapshot bdev of a generation.
pub struct SnapRecord {
    pub repo: String,
    pub overlay: Option<String>,
    pub handle: SnapshotHandle,
}

/// An instant restore bdev.
pub struct InstantRecord {
    pub repo: String,
    pub target: String,
    pub handle: InstantRestore,
}

/// An instant restore's status, its state in lower case like a job's.
pub fn instant_json(s: &InstantStatus) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or_else(|_| json!({}));
    if let Some(state) = v["state"].as_str() {
        v["state"] = json!(state.to_ascii_lowercase());
    }
    v
}

/// Opens repository bdev `repo` (read-only unless `writable`) and runs `f`.
fn with_repo<T>(
    d: &Daemon,
    repo: &str,
    writable: bool,
    f: impl FnOnce(&mut dyn hotcopy_cow::repo::BlockIo, &mut Repo) -> Result<T>,
) -> Result<T> {
    let desc = d
        .reg
        .open(repo, writable)
        .map_err(|e| ServeError::from(e).context("repo"))?;
    with_io(desc, |io| {
        let mut r =
            Repo::open(io).map_err(|e| ServeError::from(e).context(&format!("repo {repo}")))?;
        f(io, &mut r)
    })
}

/// Opens repository bdev `repo` read-only for its catalog alone and runs
/// `f`: the superblocks and the current catalog, no generation's index
/// (see [`Repo::open_reader`]), for paths that only choose a generation.
/// Damage to an index is found by whoever then loads that index (see
/// [`gen_error`]).
fn with_reader<T>(
    d: &Daemon,
    repo: &str,
    f: impl FnOnce(&mut dyn hotcopy_cow::repo::BlockIo, &RepoReader) -> Result<T>,
) -> Result<T> {
    let desc = d
        .reg
        .open(repo, false)
        .map_err(|e| ServeError::from(e).context("repo"))?;
    with_io(desc, |io| {
        let r = Repo::open_reader(io)
            .map_err(|e| ServeError::from(e).context(&format!("repo {repo}")))?;
        f(io, &r)
    })
}

/// The error of a restore, snapshot or instant restore of a generation: a
/// damaged index, found when the engine loads it, is reported as a full
/// open reports it ("generation N is damaged: why"); anything else as is.
fn gen_error(e: RepoBdevError) -> ServeError {
    match e {
        RepoBdevError::Repo {
            source: RepoError::CorruptIndex { generation, why },
            ..
        } => ServeError::Repository(format!("generation {generation} is damaged: {why}")),
        e => ServeError::from(e),
    }
}

/// Marks `repo` written by `what` for the duration of `f` (one writer per
/// repository), after checking that nothing reads generations from it.
fn writing<T>(d: &Daemon, repo: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    {
        let mut st = d.state();
        if let Some(w) = st.repo_writer.get(repo) {
            return Err(ServeError::Busy(format!(
                "repository {repo} is being written by {w}; one writer per repository at a time"
            )));
        }
        let readers: Vec<String> = st
            .snapshots
            .iter()
            .filter(|(_, s)| s.repo == repo)
            .map(|(n, _)| format!("snapshot {n}"))
            .chain(
                st.instants
                    .iter()
                    .filter(|(_, r)| r.repo == repo)
                    .map(|(n, _)| format!("instant restore {n}")),
            )
            .collect();
        if !readers.is_empty() {
            return Err(ServeError::Busy(format!(
                "repository {repo} is read by {}: delete them first",
                readers.join(", ")
            )));
        }
        st.repo_writer.insert(repo.to_string(), what.to_string());
    }
    let r = f();
    d.state().repo_writer.remove(repo);
    r
}

/// `hotcopy_repo_format`.
pub fn format(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["repo", "force"])?;
    let repo = p.str("repo")?;
    let force = p.bool_or("force", false)?;
    p.done()?;
    d.check_running()?;
    let name = d.resolve("repo", &repo, "repo", Origin::Spec)?;
    if let Some(why) = d.state().in_use(&name) {
        return Err(ServeError::Busy(why));
    }
    let info = writing(d, &name, "a format", || {
        let desc = d
            .reg
            .open(&name, true)
            .map_err(|e| ServeError::from(e).context("repo"))?;
        with_io(desc, |io| match Repo::format(io, force) {
            Ok(r) => Ok(r.info()),
            Err(hotcopy_cow::repo::RepoError::WouldOverwrite(why)) => Err(ServeError::Busy(
                format!("repo {name}: refusing to format: {why}; pass force: true to overwrite it"),
            )),
            Err(e) => Err(ServeError::from(e).context(&format!("repo {name}"))),
        })
    })?;
    tracing::info!(repo = %name, uuid = %info.uuid, "repository formatted");
    let mut v = info_json(&info);
    v["repo"] = json!(name);
    Ok(v)
}

/// `hotcopy_repo_list`: the repository and its generations, as `hotcopy
/// repo list --json` prints them (plus `repo`).
pub fn list(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["repo"])?;
    let repo = p.str("repo")?;
    p.done()?;
    let name = d.resolve("repo", &repo, "repo", Origin::Spec)?;
    let mut v = with_repo(d, &name, false, |_, r| Ok(list_json(r)))?;
    v["repo"] = json!(name);
    Ok(v)
}

/// The error for a generation that is not in repository `repo`.
fn no_generation(repo: &str, e: RepoError) -> ServeError {
    match e {
        RepoError::NoSuchGeneration(g) => ServeError::NotFound(format!(
            "generation: no generation {g} in repository {repo}"
        )),
        e => ServeError::from(e).context(&format!("repo {repo}")),
    }
}

/// `hotcopy_repo_info`: the repository's identity and space, and with
/// `generation` that generation in detail, as `hotcopy repo info --json`
/// prints them (plus `repo`).
pub fn info(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["repo", "generation"])?;
    let repo = p.str("repo")?;
    let only = p.opt_u64("generation")?;
    p.done()?;
    let name = d.resolve("repo", &repo, "repo", Origin::Spec)?;
    let mut v = with_repo(d, &name, false, |io, r| {
        info_value(io, r, only).map_err(|e| no_generation(&name, e))
    })?;
    v["repo"] = json!(name);
    Ok(v)
}

/// `hotcopy_repo_verify`: re-reads every chunk (of one generation, or all)
/// and checks every checksum. The result's `ok` says whether all is well;
/// damage, even a repository that cannot be opened (`opened: false`), is a
/// result, not an error.
pub fn verify(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["repo", "generation"])?;
    let repo = p.str("repo")?;
    let only = p.opt_u64("generation")?;
    p.done()?;
    let name = d.resolve("repo", &repo, "repo", Origin::Spec)?;
    let desc = d
        .reg
        .open(&name, false)
        .map_err(|e| ServeError::from(e).context("repo"))?;
    let mut v = with_io(desc, |io| {
        verify_value(io, only, &indicatif::ProgressBar::hidden())
            .map_err(|e| no_generation(&name, e))
    })?;
    v["repo"] = json!(name);
    Ok(v)
}

/// `hotcopy_repo_prune`: exactly one of `keep` (complete generations per
/// source), `older_than` (a duration: `30d`, `12h`) or `remove` (an id).
pub fn prune(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["repo", "keep", "older_than", "remove"])?;
    let repo = p.str("repo")?;
    let keep = p.opt_u64("keep")?;
    let older = p.opt_str("older_than")?;
    let remove = p.opt_u64("remove")?;
    p.done()?;
    d.check_running()?;
    enum Rule {
        Keep(usize),
        Older(Duration),
        Remove(u64),
    }
    let rule = match (keep, older, remove) {
        (Some(n), None, None) => Rule::Keep(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, Some(s), None) => Rule::Older(
            crate::repo_cmd::parse_duration(&s).map_err(|e| ServeError::param("older_than", e))?,
        ),
        (None, None, Some(id)) => Rule::Remove(id),
        _ => {
            return Err(ServeError::InvalidParams(
                "keep, older_than, remove: give exactly one".into(),
            ))
        }
    };
    let name = d.resolve("repo", &repo, "repo", Origin::Spec)?;
    let (mut v, removed) = writing(d, &name, "a prune", || {
        with_repo(d, &name, true, |io, r| {
            let before = r.generations().to_vec();
            let report = match rule {
                Rule::Keep(n) => r.prune_keep(io, n),
                Rule::Older(age) => r.prune_older_than(io, age),
                Rule::Remove(id) => {
                    if r.generation(id).is_none() {
                        return Err(ServeError::NotFound(format!(
                            "remove: no generation {id} in repository {name}"
                        )));
                    }
                    r.remove(io, id)
                }
            }
            .map_err(ServeError::from)?;
            Ok((prune_json(&report, &before, &r.info()), report.removed))
        })
    })?;
    tracing::info!(repo = %name, removed = ?removed, "repository pruned");
    v["repo"] = json!(name);
    Ok(v)
}

/// The generation a `generation` parameter names: an id, or `"latest"`
/// (the newest complete one, of `source` if given); it must be complete.
/// Reads the catalog alone: whether its index is intact is checked when it
/// is loaded to restore or serve it.
fn pick_generation(
    d: &Daemon,
    repo: &str,
    sel: &Value,
    source: Option<&str>,
) -> Result<Generation> {
    let want = match sel {
        Value::String(s) if s == "latest" => None,
        v => Some(super::params::as_u64("generation", v).map_err(|_| {
            ServeError::param("generation", "expected a generation id or \"latest\"")
        })?),
    };
    // Only the catalog: a damaged index is reported when the caller's
    // engine loads it (see `gen_error`).
    with_reader(d, repo, |_, r| {
        let g = match want {
            Some(id) => r.generation(id).ok_or_else(|| {
                ServeError::NotFound(format!(
                    "generation: no generation {id} in repository {repo}"
                ))
            })?,
            None => r.latest(source).ok_or_else(|| {
                ServeError::NotFound(match source {
                    Some(s) => {
                        format!("generation: repository {repo} has no complete generation of {s:?}")
                    }
                    None => format!("generation: repository {repo} has no complete generation"),
                })
            })?,
        };
        if let Some(s) = source {
            if g.source.name != s {
                return Err(ServeError::param(
                    "source",
                    format!(
                        "generation {} is a backup of {:?}, not of {s:?}",
                        g.id, g.source.name
                    ),
                ));
            }
        }
        if g.state != GenState::Complete {
            return Err(ServeError::param(
                "generation",
                format!(
                    "generation {} is incomplete (its backup did not commit)",
                    g.id
                ),
            ));
        }
        Ok(g.clone())
    })
}

/// `hotcopy_repo_restore`: copies a generation onto `to` (a bdev name, or a
/// spec for a file; a bdev made for a spec goes when the restore ends).
/// Returns when the restore is done, flushed and every checksum checked.
pub fn restore(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["repo", "generation", "to", "source"])?;
    let repo = p.str("repo")?;
    let sel = p.opt_value("generation").unwrap_or_else(|| json!("latest"));
    let to = p.str("to")?;
    let source = p.opt_str("source")?;
    p.done()?;
    d.check_running()?;
    let ns = d.resolve("repo", &repo, "repo", Origin::Spec)?;
    let gen = pick_generation(d, &ns, &sel, source.as_deref())?;
    // The destination: a bdev of the daemon, or a temporary one for a spec.
    let (dest, temporary) = if to.contains(':') {
        let cfg = hotcopy_config::parse_spec(&to).map_err(|e| ServeError::param("to", e))?;
        if let Some(existing) = d.find_by_file(&cfg) {
            (existing, false)
        } else {
            let name = (0u64..)
                .map(|i| format!("restore{i}"))
                .find(|n| d.reg.get(n).is_none())
                .unwrap_or_else(|| "restore".into());
            d.create_bdev(&name, &cfg, None, Origin::Internal)
                .map_err(|e| e.context("to"))?;
            (name, true)
        }
    } else {
        d.reg
            .lookup(&to)
            .map_err(|e| ServeError::NotFound(format!("to: {e}")))?;
        (to.clone(), false)
    };
    let result = (|| -> Result<hotcopy_cow::repo_bdev::RestoreReport> {
        if dest == ns {
            return Err(ServeError::param(
                "to",
                "the destination is the repository itself",
            ));
        }
        if let Some(why) = d.state().in_use(&dest) {
            return Err(ServeError::Busy(format!("to: {why}")));
        }
        // Spread over every reactor: one reactor's memcpy and crc32c fall
        // short of a fast destination's write bandwidth.
        let report = restore_to_on(&d.reg, &ns, gen.id, &dest, d.reactors(), 0, |_, _| {})
            .map_err(gen_error)?;
        Ok(report)
    })();
    if temporary {
        d.remove_internal(&dest);
    }
    let report = result?;
    tracing::info!(repo = %ns, generation = gen.id, to = %to, mibps = report.mibps, "restore done");
    let mut v = restore_json(&gen, &to, &report);
    v["repo"] = json!(ns);
    v["bytes_total"] = json!(report.bytes_total);
    v["gathered_runs"] = json!(report.gathered_runs);
    Ok(v)
}

/// `hotcopy_instant_restore_start`: registers bdev `name`, serving the
/// generation at once, while it is copied onto `target` (a bdev name, or a
/// spec: a bdev made for it goes with `name`).
pub fn instant_start(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name", "repo", "generation", "target", "source"])?;
    let name = p.str("name")?;
    let repo = p.str("repo")?;
    let sel = p.opt_value("generation").unwrap_or_else(|| json!("latest"));
    let target = p.str("target")?;
    let source = p.opt_str("source")?;
    p.done()?;
    d.check_running()?;
    if d.reg.get(&name).is_some() {
        return Err(ServeError::Exists(format!(
            "a bdev named {name:?} already exists"
        )));
    }
    let ns = d.resolve("repo", &repo, "repo", Origin::Spec)?;
    let gen = pick_generation(d, &ns, &sel, source.as_deref())?.id;
    let (tgt, owned) = if target.contains(':') {
        let cfg =
            hotcopy_config::parse_spec(&target).map_err(|e| ServeError::param("target", e))?;
        let n = format!("{name}.target");
        d.create_bdev(&n, &cfg, None, Origin::Internal)
            .map_err(|e| e.context("target"))?;
        (n, true)
    } else {
        (target.clone(), false)
    };
    let started = (|| -> Result<(hotcopy_bdev::Bdev, InstantRestore)> {
        if tgt == ns {
            return Err(ServeError::param(
                "target",
                "the target is the repository itself",
            ));
        }
        if let Some(why) = d.state().in_use(&tgt) {
            return Err(ServeError::Busy(format!("target: {why}")));
        }
        start_instant_restore(
            &d.reg,
            &name,
            &ns,
            gen,
            &tgt,
            d.home(),
            InstantTuning::default(),
        )
        .map_err(gen_error)
    })();
    let (_bdev, handle) = match started {
        Ok(x) => x,
        Err(e) => {
            if owned {
                d.remove_internal(&tgt);
            }
            return Err(e);
        }
    };
    if owned {
        // The target goes with the instant restore bdev, not on its own.
        let mut st = d.state();
        if let Some(i) = st.defs.iter().position(|x| x.name == tgt) {
            st.defs.remove(i);
        }
    }
    d.record(
        &name,
        Origin::Rpc,
        if owned { vec![tgt.clone()] } else { Vec::new() },
    );
    let status = instant_json(&handle.status());
    d.state().instants.insert(
        name.clone(),
        InstantRecord {
            repo: ns.clone(),
            target: tgt.clone(),
            handle,
        },
    );
    tracing::info!(bdev = %name, repo = %ns, generation = gen, target = %tgt, "instant restore started");
    let mut v = status;
    v["name"] = json!(name);
    v["repo"] = json!(ns);
    Ok(v)
}

/// `hotcopy_instant_restore_status`: one (`name`) or all.
pub fn instant_status(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name"])?;
    let name = p.opt_str("name")?;
    p.done()?;
    let st = d.state();
    let one = |n: &String, r: &InstantRecord| {
        let mut v = instant_json(&r.handle.status());
        v["name"] = json!(n);
        v["repo"] = json!(r.repo);
        v["target"] = json!(r.target);
        v
    };
    match name {
        Some(n) => st
            .instants
            .get(&n)
            .map(|r| one(&n, r))
            .ok_or_else(|| ServeError::NotFound(format!("name: no instant restore {n:?}"))),
        None => Ok(json!({
            "restores": st.instants.iter().map(|(n, r)| one(n, r)).collect::<Vec<_>>()
        })),
    }
}

/// `hotcopy_instant_restore_cancel`: stops the hydrator; the bdev keeps
/// serving (chunks not yet copied from the backup).
pub fn instant_cancel(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name"])?;
    let name = p.str("name")?;
    p.done()?;
    let h = d
        .state()
        .instants
        .get(&name)
        .map(|r| r.handle.clone())
        .ok_or_else(|| ServeError::NotFound(format!("name: no instant restore {name:?}")))?;
    h.cancel();
    h.wait(Duration::from_secs(30));
    let mut v = instant_json(&h.status());
    v["name"] = json!(name);
    Ok(v)
}

/// `hotcopy_snapshot_create`: bdev `name` showing a generation, read-only,
/// or writable (`writable: true`) through an overlay: `overlay` names a bdev
/// (`overlay_offset` bytes into it; `overlay_slots` chunks, default as many
/// as fit), or is a spec for one made with the snapshot and deleted with
/// it; a writable snapshot without `overlay` gets one in RAM as large as
/// the generation's source.
pub fn snapshot_create(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(
        params,
        &[
            "name",
            "repo",
            "generation",
            "source",
            "writable",
            "overlay",
            "overlay_offset",
            "overlay_slots",
        ],
    )?;
    let name = p.str("name")?;
    let repo = p.str("repo")?;
    let sel = p.opt_value("generation").unwrap_or_else(|| json!("latest"));
    let source = p.opt_str("source")?;
    let writable = p.opt_bool("writable")?;
    let overlay = p.opt_str("overlay")?;
    let offset = p.opt_size("overlay_offset")?.unwrap_or(0);
    let slots = p.opt_u64("overlay_slots")?;
    p.done()?;
    d.check_running()?;
    if writable == Some(false) && overlay.is_some() {
        return Err(ServeError::param(
            "writable",
            "an overlay makes the snapshot writable: drop writable: false or the overlay",
        ));
    }
    let writable = writable.unwrap_or(overlay.is_some());
    if overlay.is_none() && (slots.is_some() || offset != 0) {
        return Err(ServeError::param(
            "overlay",
            "overlay_offset and overlay_slots need an overlay bdev",
        ));
    }
    if d.reg.get(&name).is_some() {
        return Err(ServeError::Exists(format!(
            "a bdev named {name:?} already exists"
        )));
    }
    let ns = d.resolve("repo", &repo, "repo", Origin::Spec)?;
    let gen = pick_generation(d, &ns, &sel, source.as_deref())?;
    // The overlay: a bdev of the daemon's, or one made for this snapshot.
    let owned_spec = match &overlay {
        None if writable => Some(format!("malloc:{}", gen.source.size_bytes)),
        Some(o) if o.contains(':') => Some(o.clone()),
        _ => None,
    };
    let ov_name = match &owned_spec {
        Some(spec) => {
            let cfg =
                hotcopy_config::parse_spec(spec).map_err(|e| ServeError::param("overlay", e))?;
            let n = format!("{name}.overlay");
            d.create_bdev(&n, &cfg, None, Origin::Internal)
                .map_err(|e| e.context("overlay"))?;
            Some(n)
        }
        None => overlay.clone(),
    };
    let made = (|| {
        let ov = match &ov_name {
            None => None,
            Some(o) => {
                if o == &ns {
                    return Err(ServeError::param(
                        "overlay",
                        "the overlay is the repository itself",
                    ));
                }
                if let Some(why) = d.state().in_use(o) {
                    return Err(ServeError::Busy(format!("overlay: {why}")));
                }
                let desc = d
                    .reg
                    .open(o, true)
                    .map_err(|e| ServeError::from(e).context("overlay"))?;
                let bs = desc.bdev().block_size() as u64;
                if !offset.is_multiple_of(bs) {
                    return Err(ServeError::param(
                        "overlay_offset",
                        format!("{offset} is not a multiple of the overlay's block size {bs}"),
                    ));
                }
                let cs = (gen.chunk_size as u64).max(1);
                let fit = desc.bdev().size_bytes().saturating_sub(offset) / cs;
                Some(OverlayConfig {
                    desc,
                    offset_blocks: offset / bs,
                    slots: u32::try_from(slots.unwrap_or(fit))
                        .map_err(|_| ServeError::param("overlay_slots", "too large"))?,
                })
            }
        };
        create_snapshot(&d.reg, &name, &ns, gen.id, ov).map_err(gen_error)
    })();
    let (bdev, handle) = match made {
        Ok(x) => x,
        Err(e) => {
            if let (Some(n), Some(_)) = (&ov_name, &owned_spec) {
                d.remove_internal(n);
            }
            return Err(e);
        }
    };
    let owned: Vec<String> = match (&ov_name, &owned_spec) {
        (Some(n), Some(_)) => {
            // The overlay goes with the snapshot, not on its own.
            let mut st = d.state();
            if let Some(i) = st.defs.iter().position(|x| &x.name == n) {
                st.defs.remove(i);
            }
            vec![n.clone()]
        }
        _ => Vec::new(),
    };
    d.record(&name, Origin::Rpc, owned);
    d.state().snapshots.insert(
        name.clone(),
        SnapRecord {
            repo: ns.clone(),
            overlay: ov_name.clone(),
            handle: handle.clone(),
        },
    );
    tracing::info!(bdev = %name, repo = %ns, generation = gen.id, writable = handle.is_writable(), "snapshot created");
    Ok(json!({
        "name": name,
        "repo": ns,
        "generation": gen.id,
        "source": gen.source.name,
        "writable": handle.is_writable(),
        "overlay": ov_name,
        "size_bytes": bdev.size_bytes(),
        "block_size": bdev.block_size(),
        "chunk_size": handle.chunk_size(),
    }))
}
