//! The NBD exports: the hook the NBD server connects to.
//!
//! [`start_exports`] receives the validated export list (the config's
//! `exports:` plus every `--nbd` flag) once the bdevs exist, and
//! [`ExportsHandle::stop`] is called first thing in the clean stop, before
//! jobs are cancelled and bdevs flushed, so that no host writes after the
//! flush. Exports are recorded (`save_config` keeps them) and served by the
//! NBD server of `appliance/export` (`hotcopy_export::nbd`).

use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};

use hotcopy_config::{ExportConfig, Listen};
use hotcopy_export::nbd::{self, NbdConfig, NbdExport, NbdServer};
use hotcopy_runtime::Runtime;

use super::daemon::Daemon;
use super::error::{Result, ServeError};

/// The NBD servers, one per listen address; stopped at the clean stop.
pub struct ExportsHandle {
    servers: Arc<Mutex<Vec<(String, NbdServer)>>>,
}

impl ExportsHandle {
    /// Stops serving: closes the listeners and every connection, after the
    /// requests in flight complete and written exports are flushed.
    pub fn stop(self) {
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

/// Checks `exports` against the running bdevs, records them, and serves
/// them over NBD: one server per listen address, its connections polled by
/// the daemon's reactors.
pub fn start_exports(
    daemon: &Daemon,
    rt: &Runtime,
    exports: &[ExportConfig],
) -> Result<ExportsHandle> {
    for e in exports {
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
    }
    daemon.set_exports(exports.to_vec());
    // Group by listen address.
    let mut groups: Vec<(String, nbd::Listen, Vec<NbdExport>)> = Vec::new();
    for e in exports {
        let key = e.listen.to_string();
        let x = NbdExport {
            name: e.name.clone(),
            bdev: e.bdev.clone(),
            read_only: e.read_only,
            description: String::new(),
        };
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.2.push(x),
            None => groups.push((key, nbd_listen(&e.listen)?, vec![x])),
        }
    }
    let servers = Arc::new(Mutex::new(Vec::new()));
    for (key, listen, list) in groups {
        let names: Vec<String> = list.iter().map(|x| x.name.clone()).collect();
        match NbdServer::start(
            rt,
            &daemon.reg,
            NbdConfig {
                listen: vec![listen],
                exports: list,
            },
        ) {
            Ok(s) => {
                tracing::info!(listen = %key, exports = ?names, "NBD exports served");
                lock(&servers).push((key, s));
            }
            Err(e) => {
                // Undo what started, then fail the start.
                ExportsHandle { servers }.stop();
                return Err(ServeError::Failed(format!("NBD on {key}: {e}")));
            }
        }
    }
    // What `hotcopy_get_stats` shows under `exports`.
    let listed: Vec<(String, String, String, bool)> = exports
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.bdev.clone(),
                e.listen.to_string(),
                e.read_only,
            )
        })
        .collect();
    let stats_servers = servers.clone();
    daemon.add_stats_source(
        "exports",
        Box::new(move || {
            let servers = lock(&stats_servers);
            let per_listen: Vec<serde_json::Value> = servers
                .iter()
                .map(|(listen, s)| {
                    let st = s.stats();
                    serde_json::json!({
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
            serde_json::json!({
                "exports": listed
                    .iter()
                    .map(|(n, b, l, ro)| serde_json::json!({
                        "name": n, "bdev": b, "listen": l, "read_only": ro, "served": true,
                    }))
                    .collect::<Vec<_>>(),
                "servers": per_listen,
            })
        }),
    );
    Ok(ExportsHandle { servers })
}
