//! `hotcopy serve`: the appliance daemon.
//!
//! # Start
//!
//! 1. Read the config (`--config`, YAML; errors name the file, line and
//!    field) and add the flags: `--bdev NAME=SPEC` (a `bdevs:` entry),
//!    `--nbd NAME@HOST:PORT` / `--nbd NAME@unix:PATH` (an `exports:` entry),
//!    `--rpc-socket PATH` (over `rpc_socket:`, default
//!    [`hotcopy_config::DEFAULT_RPC_SOCKET`]). The whole is validated.
//! 2. Bind the RPC socket (mode 0600): a daemon already serving there
//!    stops this start before it opens any file of its bdevs.
//! 3. Catch SIGINT and SIGTERM (with `signal-hook`: its handler only writes
//!    to a self-pipe, so the rest of the stop runs on the main thread, not
//!    in a signal handler; it is the maintained, widely used crate for
//!    this, and needs no `unsafe` of ours).
//! 4. Start the reactors (`reactors:`).
//! 5. Create the bdevs, each after its base and after the bdev keeping its
//!    change tracking; a cow bdev with `tracking:` opens its store before it
//!    takes a write (intact after a clean stop, lost after a crash). The
//!    parent directory of a `uring` file with a `size` (and of the socket)
//!    is created first if missing, so an example config runs on a fresh
//!    scratch directory.
//! 6. Serve the exports over NBD ([`exports::start_exports`]): one server
//!    per listen address; more can be added and removed over RPC.
//! 7. Accept JSON-RPC connections ([`rpc`]); clients that connected during
//!    the start are served from now on.
//!
//! # Stop (SIGINT, SIGTERM)
//!
//! The RPC server stops (connections closed, the socket removed), then the
//! exports, then [`daemon::Daemon::shutdown`]: running backup jobs are
//! **cancelled** (their unfinished generations removed, their change
//! tracking marks given back) and waited for, instant restores stop
//! hydrating, every bdev is flushed, and every change-tracking store is
//! closed clean; then the reactors stop. Exit status 0.
//!
//! # Methods
//!
//! See [`methods::METHODS`]; errors carry JSON-RPC codes ([`error`]).
//!
//! | method | params |
//! |---|---|
//! | `rpc_get_methods` | |
//! | `bdev_get_bdevs` | `name`? |
//! | `bdev_get_iostat`, `bdev_reset_iostat` | `name`? |
//! | `bdev_malloc_create`, `bdev_null_create` | `name`, `size` or `num_blocks`, `block_size`? |
//! | `bdev_uring_create` | `name`, `filename`, `size`?, `block_size`?, `direct`?, `preallocate`? |
//! | `bdev_passthru_create` | `name`, `base_bdev_name` |
//! | `hotcopy_bdev_create` | `name`, `spec` |
//! | `hotcopy_cow_create` | `name`, `base_bdev_name`, `tracking_bdev`?, `tracking_offset`? |
//! | `bdev_{malloc,null,uring,passthru}_delete`, `hotcopy_cow_delete`, `hotcopy_snapshot_delete`, `hotcopy_bdev_delete` | `name` |
//! | `hotcopy_backup_start` | `volume`, `repo`, `incremental`?, `rate`?, `include`?, `exclude`?, `name`?, `chunk_size`?, `container_slots`?, `view`?, `min_share`?, `tolerance`? |
//! | `hotcopy_backup_view_create` | `volume`?, `name` |
//! | `hotcopy_backup_status` | `volume`?, `job`? |
//! | `hotcopy_backup_cancel` | `volume`?, `wait_s`? |
//! | `hotcopy_backup_prioritize` | `volume`?, `offset`, `length` |
//! | `hotcopy_backup_set_rate` | `volume`?, `rate` |
//! | `hotcopy_repo_format` | `repo`, `force`? |
//! | `hotcopy_repo_list` | `repo` |
//! | `hotcopy_repo_info` | `repo`, `generation`? |
//! | `hotcopy_repo_verify` | `repo`, `generation`? |
//! | `hotcopy_repo_prune` | `repo`, one of `keep`, `older_than`, `remove` |
//! | `hotcopy_repo_restore` | `repo`, `generation`? (id or `latest`), `to`, `source`? |
//! | `hotcopy_instant_restore_start` | `name`, `repo`, `generation`?, `target`, `source`? |
//! | `hotcopy_instant_restore_status` | `name`? |
//! | `hotcopy_instant_restore_cancel` | `name` |
//! | `hotcopy_snapshot_create` | `name`, `repo`, `generation`?, `source`?, `writable`?, `overlay`? (a bdev, or a spec made for it), `overlay_offset`?, `overlay_slots`? |
//! | `nbd_start_disk` | `bdev_name`, `name`?, `listen`?, `read_only`? |
//! | `nbd_stop_disk` | `name` |
//! | `nbd_get_disks` | `name`? |
//! | `hotcopy_get_stats` | |
//! | `save_config` | `format`? (`json` or `yaml`) |

pub mod daemon;
pub mod error;
pub mod exports;
pub mod flags;
pub mod jobs;
pub mod methods;
pub mod params;
pub mod repo;
pub mod rpc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use hotcopy_config::{BdevConfig, Config, ExportConfig, IdleMode, NamedBdev, ReactorsConfig};
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use daemon::{Daemon, Origin};

/// The reactors a config's `reactors:` section asks for; `pin` pins each
/// to its core (the daemon does; a process that shares its cores with other
/// threads, like a fuzzer, should not).
pub fn runtime_config(r: &ReactorsConfig, pin: bool) -> RuntimeConfig {
    RuntimeConfig {
        cores: r.cores.cpus(),
        idle: match r.idle {
            IdleMode::Poll => IdlePolicy::Poll,
            IdleMode::Sleep => IdlePolicy::SLEEP,
        },
        pin,
    }
}

/// How long the stop waits for RPC connections busy in a method. Most
/// methods answer in milliseconds; one still running after this (a long
/// restore) is left to end with the process, and the jobs are cancelled
/// regardless, so a service manager's stop timeout (90 s for systemd) is
/// never reached.
const RPC_GRACE: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
#[command(after_help = "\
SPEC is the bdev spec grammar of `hotcopy bench` (malloc:64M, uring:/data/vol.img@1G,
cow:uring:/data/vol.img, ...). The flags add to the config file's entries.

Clients: `hotcopy rpc METHOD --param k=v` (rpc_get_methods lists the methods), and
`hotcopy backup start|status|cancel --rpc-socket PATH ...`.

Examples:
  hotcopy serve --config config/examples/appliance.yaml
  hotcopy serve --bdev vol0=cow:uring:/var/tmp/vol0.img@1G --nbd vol0@127.0.0.1:10809 \\
                --rpc-socket /var/tmp/hotcopy.sock")]
pub struct ServeArgs {
    /// The config file (YAML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A bdev from a spec, in addition to the config's.
    #[arg(long = "bdev", value_name = "NAME=SPEC", value_parser = flags::parse_bdev_flag)]
    pub bdevs: Vec<NamedBdev>,
    /// Export bdev NAME over NBD on a TCP address or a Unix socket.
    #[arg(long = "nbd", value_name = "NAME@HOST:PORT|NAME@unix:PATH", value_parser = flags::parse_nbd_flag)]
    pub nbd: Vec<ExportConfig>,
    /// The JSON-RPC socket (default: the config's rpc_socket, else /var/tmp/hotcopy.sock).
    #[arg(long)]
    pub rpc_socket: Option<PathBuf>,
}

/// Creates the parent directories of `uring` files the config creates and
/// of the RPC socket.
fn prepare_dirs(cfg: &Config, socket: &Path) -> anyhow::Result<()> {
    fn visit(b: &BdevConfig, out: &mut Vec<PathBuf>) {
        match b {
            BdevConfig::Uring {
                path,
                size: Some(_),
                ..
            } if !path.exists() => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    out.push(dir.to_path_buf());
                }
            }
            other => {
                if let Some(hotcopy_config::BaseRef::Inline(inner)) = other.base() {
                    visit(inner, out);
                }
            }
        }
    }
    let mut dirs = Vec::new();
    for b in &cfg.bdevs {
        visit(&b.bdev, &mut dirs);
    }
    for t in cfg.tracking.values() {
        if let hotcopy_config::BaseRef::Inline(inner) = &t.bdev {
            visit(inner, &mut dirs);
        }
    }
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        dirs.push(dir.to_path_buf());
    }
    for d in dirs {
        if !d.is_dir() {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("creating the directory {}", d.display()))?;
            tracing::info!(dir = %d.display(), "created a directory for bdev files");
        }
    }
    Ok(())
}

pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let (file, origin) = match &a.config {
        Some(p) => (
            hotcopy_config::load(p).map_err(|e| anyhow!("{e}"))?,
            p.display().to_string(),
        ),
        None => (Config::default(), "the default config".to_string()),
    };
    let cfg = flags::merge(file, &origin, a.bdevs, a.nbd, a.rpc_socket).map_err(|e| anyhow!(e))?;
    let socket = cfg
        .rpc_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(hotcopy_config::DEFAULT_RPC_SOCKET));
    prepare_dirs(&cfg, &socket)?;
    let listener = rpc::bind(&socket)?;
    // The socket is ours: it goes on every way out.
    let _socket_file = RemoveOnDrop(socket.clone());
    // Before anything that must be undone: a signal from now on stops cleanly.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("catching SIGINT and SIGTERM")?;
    let rt =
        Runtime::start(runtime_config(&cfg.reactors, true)).context("starting the reactors")?;
    let base = Config {
        reactors: cfg.reactors.clone(),
        buffer_pool: cfg.buffer_pool.clone(),
        rpc_socket: Some(socket.clone()),
        ..Config::default()
    };
    let d = Arc::new(Daemon::new(rt.reactors().to_vec(), base));
    let started = start(&d, &cfg, listener, &socket);
    let (server, reaper, reaper_stop) = match started {
        Ok(x) => x,
        Err(e) => {
            d.shutdown();
            rt.shutdown();
            return Err(e);
        }
    };
    tracing::info!(
        socket = %socket.display(),
        bdevs = d.reg.names().len(),
        reactors = rt.num_reactors(),
        "hotcopy serve: ready"
    );
    let sig = signals.forever().next();
    tracing::info!(
        signal = match sig {
            Some(SIGINT) => "SIGINT",
            Some(SIGTERM) => "SIGTERM",
            _ => "?",
        },
        "stopping"
    );
    server.stop(RPC_GRACE);
    d.nbd.stop();
    d.shutdown();
    reaper_stop.store(true, Ordering::Release);
    let _ = reaper.join();
    rt.shutdown();
    drop(d);
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

type Started = (rpc::RpcServer, std::thread::JoinHandle<()>, Arc<AtomicBool>);

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Steps 5 to 7 of the start (see the module docs).
fn start(
    d: &Arc<Daemon>,
    cfg: &Config,
    listener: std::os::unix::net::UnixListener,
    socket: &Path,
) -> anyhow::Result<Started> {
    for b in cfg.creation_order() {
        d.create_bdev(&b.name, &b.bdev, cfg.tracking.get(&b.name), Origin::Config)
            .map_err(|e| anyhow!("bdev {}: {e}", b.name))?;
    }
    exports::start_exports(d, &cfg.exports).map_err(|e| anyhow!("{e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let reaper = jobs::spawn_reaper(d.clone(), stop.clone()).context("starting the reaper")?;
    let server = match rpc::RpcServer::start(listener, socket, d.clone()) {
        Ok(s) => s,
        Err(e) => {
            stop.store(true, Ordering::Release);
            let _ = reaper.join();
            d.nbd.stop();
            return Err(e);
        }
    };
    Ok((server, reaper, stop))
}
