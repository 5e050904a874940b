//! The NBD exports: the hook the NBD server connects to.
//!
//! [`start_exports`] receives the validated export list (the config's
//! `exports:` plus every `--nbd` flag) once the bdevs exist, and
//! [`ExportsHandle::stop`] is called first thing in the clean stop, before
//! jobs are cancelled and bdevs flushed, so that no host writes after the
//! flush. Until the NBD server (`appliance/export`) is linked in here, the
//! exports are recorded (`save_config` keeps them) and a warning says they
//! are not served.

use hotcopy_config::ExportConfig;

use super::daemon::Daemon;
use super::error::{Result, ServeError};

/// What the NBD server needs to keep running; stopped at the clean stop.
pub struct ExportsHandle {
    count: usize,
}

impl ExportsHandle {
    /// Stops serving: closes the listeners and every connection, after the
    /// requests in flight complete.
    pub fn stop(self) {
        if self.count > 0 {
            tracing::info!(exports = self.count, "exports stopped");
        }
    }
}

/// Checks `exports` against the running bdevs, records them, and serves
/// them over NBD. The daemon's bdevs are `daemon.reg`; its reactors poll
/// the connections.
pub fn start_exports(daemon: &Daemon, exports: &[ExportConfig]) -> Result<ExportsHandle> {
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
    // What `hotcopy_get_stats` shows under `exports`; the NBD server replaces
    // it with its per-export I/O counters and latency percentiles.
    let listed: Vec<serde_json::Value> = exports
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name,
                "bdev": e.bdev,
                "listen": e.listen.to_string(),
                "read_only": e.read_only,
                "served": false,
            })
        })
        .collect();
    daemon.add_stats_source("exports", Box::new(move || serde_json::json!(listed)));
    for e in exports {
        tracing::warn!(
            export = %e.name,
            bdev = %e.bdev,
            listen = %e.listen,
            read_only = e.read_only,
            "NBD export not served: the NBD server is not linked into this build yet"
        );
    }
    Ok(ExportsHandle {
        count: exports.len(),
    })
}
