//! The NBD exports: the config's, the `--nbd` flags', and those added and
//! removed over RPC (`nbd_start_disk`, `nbd_stop_disk`, `nbd_get_disks`).
//!
//! [`Exports`] keeps one NBD server (`hotcopy_export::nbd`) per listen
//! address, its connections polled by the daemon's reactors. The first
//! export on an address starts its server; removing the last one stops it
//! (the port is free again). The start hands the config's list to
//! [`start_exports`], all or nothing; [`Exports::stop`] runs first thing in
//! the clean stop, before jobs are cancelled and bdevs flushed, so that no
//! host writes after the flush. Every export is recorded in the daemon's
//! state (`save_config` keeps them; a bdev exported cannot be deleted).

use std::net::ToSocketAddrs;
use std::sync::Mutex;

use hotcopy_config::{ExportConfig, Listen};
use hotcopy_export::nbd::{self, NbdConfig, NbdExport, NbdOptions, NbdServer};
use serde_json::{json, Value};

use super::daemon::Daemon;
use super::error::{Result, ServeError};
use super::params::Params;

/// The NBD servers of the daemon, by listen address (its `Display` form).
#[derive(Default)]
pub struct Exports {
    servers: Mutex<Vec<(String, NbdServer)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves a config listen address for the NBD server.
fn nbd_listen(l: &Listen) -> Result<nbd::Listen> {
    match l {
        Listen::Tcp { host, port } => (host.as_str(), *port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(nbd::Listen::Tcp)
            .ok_or_else(|| ServeError::Failed(format!("cannot resolve {host}:{port}"))),
        Listen::Unix(p) => Ok(nbd::Listen::Unix(p.clone())),
    }
}

impl Exports {
    /// Serves `e`: checks its bdev, adds it to the server of its listen
    /// address (starting that server if it is the first export there), and
    /// records it.
    pub fn add(&self, daemon: &Daemon, e: &ExportConfig) -> Result<()> {
        let b = daemon
            .reg
            .lookup(&e.bdev)
            .map_err(|err| ServeError::NotFound(format!("export {:?}: {err}", e.name)))?;
        if !e.read_only {
            if let Some(by) = b.claimed_by() {
                return Err(ServeError::Busy(format!(
                    "export {:?}: bdev {:?} is the base of {by:?}: export {by:?} instead, or \
                     make the export read-only",
                    e.name, e.bdev
                )));
            }
        }
        // Held across the add so that two requests cannot both start a
        // server on one address, or both take one export name.
        let mut servers = lock(&self.servers);
        if let Some(x) = daemon.state().exports.iter().find(|x| x.name == e.name) {
            return Err(ServeError::Exists(format!(
                "an export named {:?} exists (bdev {:?} on {})",
                e.name, x.bdev, x.listen
            )));
        }
        let key = e.listen.to_string();
        let x = NbdExport {
            name: e.name.clone(),
            bdev: e.bdev.clone(),
            read_only: e.read_only,
            description: String::new(),
        };
        match servers.iter().find(|(k, _)| *k == key) {
            Some((_, s)) => s
                .add_export(x)
                .map_err(|err| ServeError::Failed(format!("export {:?}: {err}", e.name)))?,
            None => {
                let s = NbdServer::start_on(
                    daemon.reactors(),
                    &daemon.reg,
                    NbdConfig {
                        listen: vec![nbd_listen(&e.listen)?],
                        exports: vec![x],
                    },
                    NbdOptions::default(),
                )
                .map_err(|err| ServeError::Failed(format!("NBD on {key}: {err}")))?;
                servers.push((key.clone(), s));
            }
        }
        daemon.state().exports.push(e.clone());
        tracing::info!(export = %e.name, bdev = %e.bdev, listen = %key, read_only = e.read_only, "NBD export served");
        Ok(())
    }

    /// Stops serving export `name`: its connections finish the requests in
    /// flight, flush and close; the server of its address stops if it was
    /// the last export there.
    pub fn remove(&self, daemon: &Daemon, name: &str) -> Result<()> {
        let mut servers = lock(&self.servers);
        let e = {
            let st = daemon.state();
            st.exports.iter().find(|x| x.name == name).cloned()
        };
        let Some(e) = e else {
            let known: Vec<String> = daemon
                .state()
                .exports
                .iter()
                .map(|x| x.name.clone())
                .collect();
            return Err(ServeError::NotFound(format!(
                "no NBD export named {name:?} (exports: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        let key = e.listen.to_string();
        if let Some(i) = servers.iter().position(|(k, _)| *k == key) {
            servers[i]
                .1
                .remove_export(name)
                .map_err(|err| ServeError::Failed(format!("export {name:?}: {err}")))?;
            if servers[i].1.exports().is_empty() {
                let (_, s) = servers.remove(i);
                if let Err(err) = s.stop() {
                    tracing::warn!(listen = %key, "stopping the NBD server: {err}");
                }
            }
        }
        daemon.state().exports.retain(|x| x.name != name);
        tracing::info!(export = %name, "NBD export removed");
        Ok(())
    }

    /// Stops serving: closes the listeners and every connection, after the
    /// requests in flight complete and written exports are flushed.
    pub fn stop(&self) {
        let servers = std::mem::take(&mut *lock(&self.servers));
        for (listen, s) in servers {
            match s.stop() {
                Ok(st) => tracing::info!(
                    listen = %listen,
                    requests = st.requests,
                    bytes_written = st.bytes_written,
                    "NBD server stopped"
                ),
                Err(e) => tracing::warn!(listen = %listen, "stopping the NBD server: {e}"),
            }
        }
    }

    /// Where each server listens, with a TCP port 0 resolved.
    fn bound(&self) -> Vec<(String, String)> {
        lock(&self.servers)
            .iter()
            .map(|(k, s)| {
                let real = s
                    .listening()
                    .first()
                    .map(|l| match l {
                        nbd::Listen::Tcp(a) => a.to_string(),
                        nbd::Listen::Unix(p) => format!("unix:{}", p.display()),
                    })
                    .unwrap_or_default();
                (k.clone(), real)
            })
            .collect()
    }

    /// What `hotcopy_get_stats` shows under `exports`: every export, and
    /// each server's counters.
    pub fn stats_json(&self, daemon: &Daemon) -> Value {
        let listed = daemon.state().exports.clone();
        let servers = lock(&self.servers);
        let per_listen: Vec<Value> = servers
            .iter()
            .map(|(listen, s)| {
                let st = s.stats();
                json!({
                    "listen": listen,
                    "connections_total": st.connections_total,
                    "connections_active": st.connections_active,
                    "requests": st.requests,
                    "bytes_read": st.bytes_read,
                    "bytes_written": st.bytes_written,
                    "errors": st.errors,
                    "protocol_errors": st.protocol_errors,
                })
            })
            .collect();
        json!({
            "exports": listed
                .iter()
                .map(|e| json!({
                    "name": e.name, "bdev": e.bdev, "listen": e.listen.to_string(),
                    "read_only": e.read_only, "served": true,
                }))
                .collect::<Vec<_>>(),
            "servers": per_listen,
        })
    }
}

/// Serves the config's exports (and the `--nbd` flags'), all or nothing.
pub fn start_exports(daemon: &Daemon, exports: &[ExportConfig]) -> Result<()> {
    for e in exports {
        if let Err(err) = daemon.nbd.add(daemon, e) {
            daemon.nbd.stop();
            daemon.state().exports.clear();
            return Err(err);
        }
    }
    Ok(())
}

/// `nbd_start_disk`: exports a bdev over NBD at run time. Params:
/// `bdev_name`; `name` (the export name; default the bdev's name);
/// `listen` (`HOST:PORT` or `unix:PATH`; default the address of the
/// first export, else 127.0.0.1:10809); `read_only` (default false).
/// Returns the export as `nbd_get_disks` lists it.
pub fn nbd_start_disk(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["bdev_name", "name", "listen", "read_only"])?;
    let bdev = p.str("bdev_name")?;
    let name = p.opt_str("name")?.unwrap_or_else(|| bdev.clone());
    let listen = p.opt_str("listen")?;
    let read_only = p.bool_or("read_only", false)?;
    p.done()?;
    d.check_running()?;
    let listen: Listen = match listen {
        Some(l) => l
            .parse()
            .map_err(|e: String| ServeError::param("listen", e))?,
        None => d
            .state()
            .exports
            .first()
            .map(|e| e.listen.clone())
            .unwrap_or_default(),
    };
    if name.is_empty() {
        return Err(ServeError::param("name", "the export name is empty"));
    }
    let e = ExportConfig {
        name: name.clone(),
        bdev,
        listen,
        read_only,
    };
    d.nbd.add(d, &e)?;
    Ok(disk_json(d, &e))
}

/// `nbd_stop_disk`: stops exporting `name` (its connections finish their
/// requests in flight, flush and close).
pub fn nbd_stop_disk(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name"])?;
    let name = p.str("name")?;
    p.done()?;
    d.nbd.remove(d, &name)?;
    Ok(Value::Bool(true))
}

/// `nbd_get_disks`: every export, or the one named `name`.
pub fn nbd_get_disks(d: &Daemon, params: Option<Value>) -> Result<Value> {
    let mut p = Params::new(params, &["name"])?;
    let name = p.opt_str("name")?;
    p.done()?;
    let list: Vec<ExportConfig> = d
        .state()
        .exports
        .iter()
        .filter(|e| name.as_ref().is_none_or(|n| e.name == *n))
        .cloned()
        .collect();
    if let (Some(n), true) = (&name, list.is_empty()) {
        return Err(ServeError::NotFound(format!("no NBD export named {n:?}")));
    }
    Ok(Value::Array(list.iter().map(|e| disk_json(d, e)).collect()))
}

/// One export: its name, bdev, the address asked for and the one bound
/// (a TCP port 0 resolved), an `nbd://` URI, and whether it is read-only.
fn disk_json(d: &Daemon, e: &ExportConfig) -> Value {
    let key = e.listen.to_string();
    let bound = d
        .nbd
        .bound()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, b)| b)
        .unwrap_or_else(|| key.clone());
    let uri = match bound.strip_prefix("unix:") {
        Some(path) => format!("nbd+unix:///{}?socket={path}", e.name),
        None => format!("nbd://{bound}/{}", e.name),
    };
    json!({
        "name": e.name,
        "bdev_name": e.bdev,
        "listen": key,
        "bound": bound,
        "uri": uri,
        "read_only": e.read_only,
    })
}
