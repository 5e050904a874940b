//! The method table, and the bdev methods.
//!
//! Names follow SPDK where SPDK has the method (`bdev_get_bdevs`,
//! `bdev_malloc_create`, `save_config`, `rpc_get_methods`); ours are
//! prefixed `hotcopy_`. A create method returns the new bdev's name and a
//! delete method `true`, as SPDK's do.

use std::path::PathBuf;

use hotcopy_config::{BaseRef, BdevConfig, ByteSize, TrackingConfig, DEFAULT_BLOCK_SIZE};
use serde_json::{json, Value};

use super::daemon::{bdev_json, tracking_json, Daemon, Origin};
use super::error::{Result, ServeError};
use super::params::Params;
use super::{exports, jobs, repo};

/// A method: the daemon and the request's `params`.
pub type Handler = fn(&Daemon, Option<Value>) -> Result<Value>;

/// Every method, in the order `rpc_get_methods` lists them.
pub const METHODS: &[(&str, Handler)] = &[
    ("rpc_get_methods", rpc_get_methods),
    ("bdev_get_bdevs", bdev_get_bdevs),
    ("bdev_get_iostat", bdev_get_iostat),
    ("bdev_reset_iostat", bdev_reset_iostat),
    ("bdev_malloc_create", bdev_malloc_create),
    ("bdev_malloc_delete", bdev_malloc_delete),
    ("bdev_null_create", bdev_null_create),
    ("bdev_null_delete", bdev_null_delete),
    ("bdev_uring_create", bdev_uring_create),
    ("bdev_uring_delete", bdev_uring_delete),
    ("bdev_passthru_create", bdev_passthru_create),
    ("bdev_passthru_delete", bdev_passthru_delete),
    ("hotcopy_bdev_create", hotcopy_bdev_create),
    ("hotcopy_bdev_delete", hotcopy_bdev_delete),
    ("hotcopy_cow_create", hotcopy_cow_create),
    ("hotcopy_cow_delete", hotcopy_cow_delete),
    ("hotcopy_backup_start", jobs::start),
    ("hotcopy_backup_status", jobs::status),
    ("hotcopy_backup_cancel", jobs::cancel),
    ("hotcopy_backup_prioritize", jobs::prioritize),
    ("hotcopy_backup_set_rate", jobs::set_rate),
    ("hotcopy_backup_view_create", jobs::view_create),
    ("hotcopy_repo_format", repo::format),
    ("hotcopy_repo_list", repo::list),
    ("hotcopy_repo_info", repo::info),
    ("hotcopy_repo_verify", repo::verify),
    ("hotcopy_repo_prune", repo::prune),
    ("hotcopy_repo_restore", repo::restore),
    ("hotcopy_instant_restore_start", repo::instant_start),
    ("hotcopy_instant_restore_status", repo::instant_status),
    ("hotcopy_instant_restore_cancel", repo::instant_cancel),
    ("hotcopy_snapshot_create", repo::snapshot_create),
    ("hotcopy_snapshot_delete", hotcopy_snapshot_delete),
    ("nbd_start_disk", exports::nbd_start_disk),
    ("nbd_stop_disk", exports::nbd_stop_disk),
    ("nbd_get_disks", exports::nbd_get_disks),
    ("hotcopy_get_stats", hotcopy_get_stats),
    ("save_config", save_config),
];

pub fn find(name: &str) -> Option<Handler> {
    METHODS.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
}

/// The bdevs `name` selects (all when absent).
fn selected(d: &Daemon, name: Option<String>) -> Result<Vec<hotcopy_bdev::Bdev>> {
    match name {
        Some(n) => Ok(vec![d
            .reg
            .lookup(&n)
            .map_err(|e| ServeError::NotFound(e.to_string()))?]),
        None => Ok(d.reg.list()),
    }
}

/// `bdev_get_iostat`: the I/O counters and latency percentiles of every
/// bdev, or of `name` (SPDK's method name; the figures are ours: counts,
/// errors and bytes by type, read and write latency p50/p90/p99/p99.9/max
/// and mean in µs, since the start or the last `bdev_reset_iostat`).
fn bdev_get_iostat(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name"])?;
    let name = p.opt_str("name")?;
    p.done()?;
    let bdevs = selected(d, name)?
        .iter()
        .map(|b| {
            let mut v = serde_json::to_value(b.io_stats()).unwrap_or_else(|_| json!({}));
            v["name"] = json!(b.name());
            v
        })
        .collect::<Vec<_>>();
    Ok(json!({ "bdevs": bdevs }))
}

/// `bdev_reset_iostat`: starts the figures of every bdev (or `name`) anew.
fn bdev_reset_iostat(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name"])?;
    let name = p.opt_str("name")?;
    p.done()?;
    for b in selected(d, name)? {
        b.reset_io_stats();
    }
    Ok(Value::Bool(true))
}

fn rpc_get_methods(_: &Daemon, params: Option<Value>) -> Result<Value> {
    Params::new(params, &[])?.done()?;
    Ok(json!(METHODS.iter().map(|(n, _)| *n).collect::<Vec<_>>()))
}

fn bdev_get_bdevs(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name"])?;
    let name = p.opt_str("name")?;
    p.done()?;
    let st = d.state();
    let one = |b: &hotcopy_bdev::Bdev| {
        let mut v = bdev_json(b);
        if let Some(t) = st.tracking.get(b.name()) {
            v["tracking"] = tracking_json(t);
        }
        v
    };
    match name {
        Some(n) => {
            let b = d.reg.lookup(&n)?;
            Ok(json!([one(&b)]))
        }
        None => Ok(Value::Array(d.reg.list().iter().map(one).collect())),
    }
}

/// `size` in bytes, or SPDK's `num_blocks` × `block_size`.
fn size_of(p: &mut Params) -> Result<(ByteSize, u32)> {
    let bs = match p.opt_u64("block_size")? {
        None => DEFAULT_BLOCK_SIZE,
        Some(b) => u32::try_from(b).map_err(|_| ServeError::param("block_size", "too large"))?,
    };
    let size = match (p.opt_size("size")?, p.opt_u64("num_blocks")?) {
        (Some(s), None) => s,
        (None, Some(n)) => n
            .checked_mul(bs as u64)
            .ok_or_else(|| ServeError::param("num_blocks", "too large"))?,
        (Some(_), Some(_)) => {
            return Err(ServeError::param(
                "size",
                "give size or num_blocks, not both",
            ))
        }
        (None, None) => {
            return Err(ServeError::param(
                "size",
                "missing required parameter (or num_blocks)",
            ))
        }
    };
    Ok((ByteSize(size), bs))
}

/// Creates `name` from `cfg` after the config's own checks, so that bad
/// sizes and block sizes get the same messages as in a config file.
fn create(
    d: &Daemon,
    name: &str,
    cfg: BdevConfig,
    tracking: Option<TrackingConfig>,
) -> Result<Value> {
    if let Some(why) = check_name(name) {
        return Err(ServeError::param("name", why));
    }
    let mut probe = hotcopy_config::Config::default();
    // Named bases must exist: the config check only sees this bdev.
    if let Some(base) = cfg.base_name() {
        d.reg
            .lookup(base)
            .map_err(|e| ServeError::NotFound(format!("base_bdev_name: {e}")))?;
        probe.bdevs.push(hotcopy_config::NamedBdev {
            name: base.to_string(),
            bdev: BdevConfig::Null {
                size: ByteSize(1 << 20),
                block_size: DEFAULT_BLOCK_SIZE,
            },
        });
    }
    probe.bdevs.push(hotcopy_config::NamedBdev {
        name: name.to_string(),
        bdev: cfg.clone(),
    });
    if let Some(t) = &tracking {
        if let BaseRef::Name(s) = &t.bdev {
            d.reg
                .lookup(s)
                .map_err(|e| ServeError::NotFound(format!("tracking_bdev: {e}")))?;
            if probe.bdev(s).is_none() {
                probe.bdevs.push(hotcopy_config::NamedBdev {
                    name: s.clone(),
                    bdev: BdevConfig::Null {
                        size: ByteSize(1 << 20),
                        block_size: DEFAULT_BLOCK_SIZE,
                    },
                });
            }
        }
        probe.tracking.insert(name.to_string(), t.clone());
    }
    if let Err(e) = probe.validate() {
        let last = e
            .field
            .rsplit_once('.')
            .map_or(e.field.as_str(), |(_, f)| f);
        let field = if e.field.contains(".tracking.") {
            format!("tracking_{last}")
        } else {
            last.to_string()
        };
        return Err(ServeError::param(
            if field.is_empty() { "params" } else { &field },
            e.message,
        ));
    }
    d.create_bdev(name, &cfg, tracking.as_ref(), Origin::Rpc)?;
    Ok(json!(name))
}

fn check_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    (!ok).then(|| format!("invalid bdev name {name:?}: use 1-128 of A-Z a-z 0-9 _ . -"))
}

fn bdev_malloc_create(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name", "size", "num_blocks", "block_size"])?;
    let name = p.str("name")?;
    let (size, block_size) = size_of(&mut p)?;
    p.done()?;
    create(d, &name, BdevConfig::Malloc { size, block_size }, None)
}

fn bdev_null_create(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name", "size", "num_blocks", "block_size"])?;
    let name = p.str("name")?;
    let (size, block_size) = size_of(&mut p)?;
    p.done()?;
    create(d, &name, BdevConfig::Null { size, block_size }, None)
}

fn bdev_uring_create(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(
        params,
        &[
            "name",
            "filename",
            "size",
            "block_size",
            "direct",
            "preallocate",
        ],
    )?;
    let name = p.str("name")?;
    let filename = p.str("filename")?;
    let size = p.opt_size("size")?.map(ByteSize);
    let block_size = p
        .opt_u64("block_size")?
        .map(|b| u32::try_from(b).map_err(|_| ServeError::param("block_size", "too large")))
        .transpose()?;
    let direct = p.bool_or("direct", true)?;
    let preallocate = p.bool_or("preallocate", false)?;
    p.done()?;
    create(
        d,
        &name,
        BdevConfig::Uring {
            path: PathBuf::from(filename),
            size,
            block_size,
            direct,
            preallocate,
        },
        None,
    )
}

fn bdev_passthru_create(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name", "base_bdev_name"])?;
    let name = p.str("name")?;
    let base = p.str("base_bdev_name")?;
    p.done()?;
    create(
        d,
        &name,
        BdevConfig::Passthru {
            base: BaseRef::Name(base),
        },
        None,
    )
}

/// `hotcopy_bdev_create`: any bdev from a spec (`cow:uring:/data/v.img`),
/// inline bases included.
fn hotcopy_bdev_create(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name", "spec"])?;
    let name = p.str("name")?;
    let spec = p.str("spec")?;
    p.done()?;
    let cfg = hotcopy_config::parse_spec(&spec).map_err(|e| ServeError::param("spec", e))?;
    create(d, &name, cfg, None)
}

/// `hotcopy_cow_create`: the copy-on-write backup module on
/// `base_bdev_name`, with change tracking kept on `tracking_bdev` (a bdev
/// name or a spec) at `tracking_offset` if given.
fn hotcopy_cow_create(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(
        params,
        &["name", "base_bdev_name", "tracking_bdev", "tracking_offset"],
    )?;
    let name = p.str("name")?;
    let base = p.str("base_bdev_name")?;
    let tbdev = p.opt_str("tracking_bdev")?;
    let toff = p.opt_size("tracking_offset")?;
    p.done()?;
    let tracking = match (tbdev, toff) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ServeError::param(
                "tracking_offset",
                "needs tracking_bdev, the bdev that keeps the tracking",
            ))
        }
        (Some(t), off) => Some(TrackingConfig {
            bdev: if t.contains(':') {
                BaseRef::Inline(Box::new(
                    hotcopy_config::parse_spec(&t)
                        .map_err(|e| ServeError::param("tracking_bdev", e))?,
                ))
            } else {
                BaseRef::Name(t)
            },
            offset: ByteSize(off.unwrap_or(0)),
        }),
    };
    create(
        d,
        &name,
        BdevConfig::Cow {
            base: BaseRef::Name(base),
        },
        tracking,
    )
}

fn delete_as(d: &Daemon, params: Option<Value>, products: Option<&[&str]>) -> Result<Value> {
    let mut p = Params::new(params, &["name"])?;
    let name = p.str("name")?;
    p.done()?;
    d.delete_bdev(&name, products)?;
    Ok(json!(true))
}

fn bdev_malloc_delete(d: &Daemon, params: Option<Value>) -> Result<Value> {
    delete_as(d, params, Some(&["malloc"]))
}

fn bdev_null_delete(d: &Daemon, params: Option<Value>) -> Result<Value> {
    delete_as(d, params, Some(&["null"]))
}

fn bdev_uring_delete(d: &Daemon, params: Option<Value>) -> Result<Value> {
    delete_as(d, params, Some(&["uring"]))
}

fn bdev_passthru_delete(d: &Daemon, params: Option<Value>) -> Result<Value> {
    delete_as(d, params, Some(&["passthru"]))
}

fn hotcopy_cow_delete(d: &Daemon, params: Option<Value>) -> Result<Value> {
    delete_as(d, params, Some(&["cow"]))
}

fn hotcopy_snapshot_delete(d: &Daemon, params: Option<Value>) -> Result<Value> {
    delete_as(d, params, Some(&["repo_snapshot"]))
}

fn hotcopy_bdev_delete(d: &Daemon, params: Option<Value>) -> Result<Value> {
    delete_as(d, params, None)
}

/// `hotcopy_get_stats`: per-bdev figures (see `Daemon::bdev_stats`) and
/// every backup job's figures.
fn hotcopy_get_stats(d: &Daemon, params: Option<Value>) -> Result<Value> {
    Params::new(params, &[])?.done()?;
    let mut v = d.bdev_stats();
    v["exports"] = d.nbd.stats_json(d);
    v["jobs"] = json!(d
        .state()
        .jobs
        .iter()
        .map(jobs::JobRecord::to_json)
        .collect::<Vec<_>>());
    Ok(v)
}

/// `save_config`: the running state as a config (`format`: `json`, the
/// default, an object; `yaml`, a string). Either can be given to
/// `hotcopy serve --config` (JSON is YAML). What the config cannot express
/// is listed in YAML comments and in the log.
fn save_config(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["format"])?;
    let format = p.opt_str("format")?.unwrap_or_else(|| "json".into());
    p.done()?;
    let (cfg, left_out) = d.running_config();
    if let Err(e) = cfg.validate() {
        tracing::warn!("save_config: the running state does not validate as a config: {e}");
    }
    for l in &left_out {
        tracing::warn!("save_config leaves out {l}");
    }
    match format.as_str() {
        "json" => serde_json::to_value(&cfg).map_err(|e| ServeError::Failed(e.to_string())),
        "yaml" => {
            let mut text = String::from("# hotcopy save_config: the running state\n");
            for l in &left_out {
                text.push_str(&format!("# left out: {l}\n"));
            }
            text.push_str(&cfg.to_yaml());
            Ok(Value::String(text))
        }
        other => Err(ServeError::param(
            "format",
            format!("{other:?}: expected \"json\" or \"yaml\""),
        )),
    }
}
