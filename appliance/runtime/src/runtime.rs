//! The multi-core runtime: one pinned reactor thread per configured core.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::reactor::{clear_current, IdlePolicy, Reactor, ReactorHandle, SendError};
use crate::sys;

/// How to start the reactors.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// CPU ids to run reactors on, one reactor per entry.
    pub cores: Vec<usize>,
    pub idle: IdlePolicy,
    /// Pin each reactor thread to its CPU.
    pub pin: bool,
}

impl RuntimeConfig {
    /// `n` reactors on CPUs 0..n, pinned, with the given idle policy.
    pub fn with_cores(n: usize, idle: IdlePolicy) -> Self {
        RuntimeConfig {
            cores: (0..n.max(1)).collect(),
            idle,
            pin: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no cores configured")]
    NoCores,
    #[error("cannot start reactor thread for core {core}: {source}")]
    Spawn {
        core: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Running reactors. Dropping (or [`Runtime::shutdown`]) stops and joins them.
pub struct Runtime {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pinned: Vec<bool>,
}

impl Runtime {
    pub fn start(cfg: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        if cfg.cores.is_empty() {
            return Err(RuntimeError::NoCores);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let online = sys::online_cores();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        let mut pinned = Vec::new();
        for (idx, &cpu) in cfg.cores.iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let stop = stop.clone();
            let idle = cfg.idle;
            let pin = cfg.pin && cpu < online;
            let t = std::thread::Builder::new()
                .name(format!("reactor_{idx}"))
                .spawn(move || {
                    let ok = pin && sys::pin_current_thread(cpu);
                    let reactor = Reactor::new(idx, idle);
                    let _ = tx.send((reactor.handle(), ok));
                    reactor.run(&stop);
                    drop(reactor);
                    clear_current();
                })
                .map_err(|source| RuntimeError::Spawn { core: idx, source })?;
            let (h, ok) = rx.recv().expect("reactor thread reports its handle");
            if cfg.pin && !ok {
                tracing::warn!(reactor = idx, cpu, "reactor not pinned (CPU not available)");
            }
            handles.push(h);
            threads.push(t);
            pinned.push(ok);
        }
        Ok(Runtime {
            handles,
            threads,
            stop,
            pinned,
        })
    }

    pub fn reactors(&self) -> &[ReactorHandle] {
        &self.handles
    }

    pub fn reactor(&self, idx: usize) -> &ReactorHandle {
        &self.handles[idx]
    }

    pub fn num_reactors(&self) -> usize {
        self.handles.len()
    }

    /// Whether each reactor thread is pinned to its CPU.
    pub fn pinned(&self) -> &[bool] {
        &self.pinned
    }

    /// Runs `f` on reactor `idx` and waits for the result (control path).
    pub fn exec<T: Send + 'static>(
        &self,
        idx: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SendError> {
        self.handles[idx].exec(f)
    }

    /// Runs `f(idx)` on every reactor and collects the results in order.
    pub fn exec_all<T: Send + 'static>(
        &self,
        f: impl Fn(usize) -> T + Send + Sync + 'static,
    ) -> Result<Vec<T>, SendError> {
        let f = Arc::new(f);
        let rxs: Vec<_> = self
            .handles
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                let f = f.clone();
                h.send_blocking(move || {
                    let _ = tx.send(f(i));
                })
                .map(|_| rx)
            })
            .collect::<Result<_, _>>()?;
        rxs.into_iter()
            .map(|rx| rx.recv().map_err(|_| SendError::Stopped))
            .collect()
    }

    /// Stops every reactor after its current pass and joins the threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.iter() {
            t.thread().unpark();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
