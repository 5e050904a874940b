//! The control side of the NBD server: configuration, listeners, the export
//! table, statistics, and stopping.

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam::utils::CachePadded;
use hotcopy_bdev::{BdevDesc, BdevError, BdevRegistry, IoType};
use hotcopy_runtime::{PollStatus, Poller, ReactorHandle, Runtime, SendError};

use super::conn::{self, ConnGuard, Sock};
use super::handshake::{ExportCatalog, ExportInfo};
use super::proto;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address; port 0 picks a free port (see [`NbdServer::listening`]).
    Tcp(SocketAddr),
    /// A Unix socket path. A stale socket file (nobody accepting) is replaced;
    /// the file is removed when the server stops.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "tcp {a}"),
            Listen::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

/// One export: a bdev offered to clients under a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExport {
    /// The name clients ask for (1..=4096 bytes of UTF-8, no NUL). The first
    /// export is also the default one (the empty name).
    pub name: String,
    /// The bdev to export.
    pub bdev: String,
    /// Refuse writes, trims and write-zeroes with `EPERM`; the bdev is opened
    /// read-only (so a claimed bdev can still be exported this way).
    pub read_only: bool,
    /// Shown to clients by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
}

/// What [`NbdServer::start`] serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NbdConfig {
    pub listen: Vec<Listen>,
    pub exports: Vec<NbdExport>,
}

/// Tuning knobs; [`Default`] suits most uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// Bytes of each preallocated I/O buffer, and the largest bdev I/O the
    /// server issues for one request (larger requests are split): a power of
    /// two from 64 KiB (the largest bdev block) to 32 MiB. Default 128 KiB.
    pub segment_size: usize,
    /// Buffers each connection preallocates once it enters transmission.
    /// Default 64 (8 MiB per connection with the default segment size).
    pub segments_per_connection: usize,
    /// Requests each connection keeps in flight before it stops reading the
    /// socket (1..=4096). Default 128.
    pub max_requests: usize,
    /// Largest READ/WRITE payload, advertised as the maximum block size:
    /// a multiple of 64 KiB up to [`proto::MAX_PAYLOAD`] (the default).
    pub max_payload: u32,
    /// How long [`NbdServer::stop`] and [`NbdServer::remove_export`] let a
    /// client take its last replies before its connection is cut. Default 10 s.
    pub drain_timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            segment_size: 128 * 1024,
            segments_per_connection: 64,
            max_requests: 128,
            max_payload: proto::MAX_PAYLOAD,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Server counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Connections accepted.
    pub connections_total: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Transmission requests received (valid or not).
    pub requests: u64,
    /// Bytes read from bdevs for clients.
    pub bytes_read: u64,
    /// Bytes written to bdevs for clients.
    pub bytes_written: u64,
    /// Requests answered with an error (invalid, or failed by the bdev).
    pub errors: u64,
    /// Connections dropped for breaking the protocol (bad magic, unknown
    /// flags, oversize writes, an unknown `EXPORT_NAME`).
    pub protocol_errors: u64,
}

/// Errors of the server's control path. Each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD server: no listen address configured")]
    NoListener,
    #[error("NBD server: cannot listen on {listen}: {source}")]
    Listen {
        listen: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD export {name:?}: {why}")]
    InvalidExport { name: String, why: String },
    #[error("NBD export {name:?}: a second export has this name")]
    DuplicateExport { name: String },
    #[error("NBD export {name:?}: {source}")]
    Bdev {
        name: String,
        #[source]
        source: BdevError,
    },
    #[error("no NBD export named {name:?} (exports: {known})")]
    NoSuchExport { name: String, known: String },
    #[error("NBD server options: {0}")]
    InvalidOptions(String),
    #[error("NBD server: reactor {core} is not accepting work: {source}")]
    Reactor {
        core: usize,
        #[source]
        source: SendError,
    },
    #[error("NBD server: {what}: {left} connection(s) still open after {waited:?}")]
    DrainTimeout {
        what: String,
        left: usize,
        waited: Duration,
    },
}

/// Per-reactor counters: each is written by connections of one reactor only,
/// so the data path never shares a cache line between cores.
#[derive(Default)]
pub(crate) struct StatShard {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub protocol_errors: AtomicU64,
}

impl StatShard {
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        // Single writer per shard: a load and a store, not a locked add.
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }
}

/// One export as the server keeps it.
pub(crate) struct ExportShared {
    pub info: ExportInfo,
    pub desc: BdevDesc,
    /// Set by `remove_export`: its connections drain and close.
    pub removed: AtomicBool,
    /// Connections in transmission on this export.
    pub conns: AtomicUsize,
    /// Whether the bdev takes flushes (and so FUA is emulated with a flush).
    pub can_flush: bool,
}

/// What the server's control path and every connection share.
pub(crate) struct ServerShared {
    exports: Mutex<Vec<Arc<ExportShared>>>,
    pub opts: NbdOptions,
    pub stopping: AtomicBool,
    shards: Box<[CachePadded<StatShard>]>,
    /// Connections accepted and not yet finished (handshake or transmission).
    pub live_conns: AtomicUsize,
    live_listeners: AtomicUsize,
    reactors: Vec<ReactorHandle>,
    next_reactor: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Control-path data only; a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ServerShared {
    /// The stats shard of reactor `core`.
    pub fn shard_at(&self, core: usize) -> &StatShard {
        &self.shards[core % self.shards.len()]
    }

    /// Hands an accepted socket to the next reactor, round-robin.
    fn dispatch(self: &Arc<Self>, sock: Sock) {
        let n = self.reactors.len();
        let idx = self.next_reactor.fetch_add(1, Ordering::Relaxed) % n;
        // Counted from here; a message that is never run drops the guard.
        let guard = ConnGuard::new(self.clone());
        if let Err(e) = self.reactors[idx].send(move || conn::spawn(sock, guard)) {
            tracing::warn!(reactor = idx, error = %e, "NBD: connection refused, reactor busy");
        }
    }
}

impl ExportCatalog for ServerShared {
    type Export = Arc<ExportShared>;

    fn find(&self, name: &str) -> Option<(Arc<ExportShared>, ExportInfo)> {
        let exports = lock(&self.exports);
        let e = if name.is_empty() {
            exports.first()
        } else {
            exports.iter().find(|e| e.info.name == name)
        }?;
        Some((e.clone(), e.info.clone()))
    }

    fn list(&self) -> Vec<(String, String)> {
        lock(&self.exports)
            .iter()
            .map(|e| (e.info.name.clone(), e.info.description.clone()))
            .collect()
    }
}

/// A running NBD server. See the [module docs](super) for the protocol and
/// the architecture. Dropping it stops it.
pub struct NbdServer {
    shared: Arc<ServerShared>,
    listening: Vec<Listen>,
    registry: BdevRegistry,
    stopped: bool,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("listening", &self.listening)
            .field("exports", &self.exports())
            .finish()
    }
}

impl NbdServer {
    /// Starts serving `cfg` on the reactors of `rt` with default options.
    pub fn start(rt: &Runtime, reg: &BdevRegistry, cfg: NbdConfig) -> Result<NbdServer, NbdError> {
        Self::start_with(rt, reg, cfg, NbdOptions::default())
    }

    /// Starts serving `cfg` with `opts`: opens every export's bdev, binds
    /// every listener, and registers one accept poller per listener on the
    /// reactors (round-robin). Nothing is left running on error.
    pub fn start_with(
        rt: &Runtime,
        reg: &BdevRegistry,
        cfg: NbdConfig,
        opts: NbdOptions,
    ) -> Result<NbdServer, NbdError> {
        Self::start_on(rt.reactors(), reg, cfg, opts)
    }

    /// [`start_with`](Self::start_with) on the reactors `reactors` (for a
    /// caller that keeps the reactors' handles, not the runtime: a daemon
    /// adding a listener at run time).
    pub fn start_on(
        reactors: &[ReactorHandle],
        reg: &BdevRegistry,
        cfg: NbdConfig,
        opts: NbdOptions,
    ) -> Result<NbdServer, NbdError> {
        check_options(&opts)?;
        if reactors.is_empty() {
            return Err(NbdError::Reactor {
                core: 0,
                source: SendError::Stopped,
            });
        }
        if cfg.listen.is_empty() {
            return Err(NbdError::NoListener);
        }
        let shards = (0..reactors.len())
            .map(|_| CachePadded::new(StatShard::default()))
            .collect();
        let shared = Arc::new(ServerShared {
            exports: Mutex::new(Vec::new()),
            opts,
            stopping: AtomicBool::new(false),
            shards,
            live_conns: AtomicUsize::new(0),
            live_listeners: AtomicUsize::new(0),
            reactors: reactors.to_vec(),
            next_reactor: AtomicUsize::new(0),
        });
        let mut server = NbdServer {
            shared,
            listening: Vec::new(),
            registry: reg.clone(),
            stopped: false,
        };
        for e in cfg.exports {
            server.add_export(e)?;
        }
        let mut bound = Vec::new();
        for l in &cfg.listen {
            let b = bind(l).map_err(|source| NbdError::Listen {
                listen: l.to_string(),
                source,
            })?;
            server.listening.push(b.listen());
            bound.push(b);
        }
        for (i, b) in bound.into_iter().enumerate() {
            let core = i % reactors.len();
            let shared = server.shared.clone();
            server.shared.live_listeners.fetch_add(1, Ordering::AcqRel);
            let started = reactors[core].exec(move || start_listener(b, shared));
            if let Err(source) = started {
                server.shared.live_listeners.fetch_sub(1, Ordering::AcqRel);
                return Err(NbdError::Reactor { core, source });
            }
        }
        tracing::info!(
            listen = ?server.listening,
            exports = ?server.exports(),
            "NBD server started"
        );
        Ok(server)
    }

    /// Where the server listens, with TCP port 0 resolved to the real port.
    pub fn listening(&self) -> &[Listen] {
        &self.listening
    }

    /// The first TCP address the server listens on, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.listening.iter().find_map(|l| match l {
            Listen::Tcp(a) => Some(*a),
            Listen::Unix(_) => None,
        })
    }

    /// Export names, in listing order.
    pub fn exports(&self) -> Vec<String> {
        lock(&self.shared.exports)
            .iter()
            .map(|e| e.info.name.clone())
            .collect()
    }

    /// Adds an export; new connections can use it at once.
    pub fn add_export(&self, e: NbdExport) -> Result<(), NbdError> {
        let invalid = |why: &str| NbdError::InvalidExport {
            name: e.name.clone(),
            why: why.to_string(),
        };
        if e.name.is_empty() {
            return Err(invalid(
                "the name is empty (the empty name selects the default export)",
            ));
        }
        if e.name.len() > proto::MAX_STRING || e.name.contains('\0') {
            return Err(invalid("the name must be at most 4096 bytes, without NUL"));
        }
        if e.description.len() > proto::MAX_STRING || e.description.contains('\0') {
            return Err(invalid(
                "the description must be at most 4096 bytes, without NUL",
            ));
        }
        let desc = self
            .registry
            .open(&e.bdev, !e.read_only)
            .map_err(|source| NbdError::Bdev {
                name: e.name.clone(),
                source,
            })?;
        let bdev = desc.bdev().clone();
        let opts = &self.shared.opts;
        if bdev.block_size() as usize > opts.segment_size {
            return Err(invalid(&format!(
                "bdev {:?} has {}-byte blocks, larger than the segment size {}",
                e.bdev,
                bdev.block_size(),
                opts.segment_size
            )));
        }
        if !e.read_only && !bdev.supports(IoType::Write) {
            return Err(invalid(&format!(
                "bdev {:?} takes no writes: export it read-only",
                e.bdev
            )));
        }
        let can_flush = bdev.supports(IoType::Flush);
        let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_CAN_MULTI_CONN;
        if e.read_only {
            flags |= proto::FLAG_READ_ONLY;
        } else {
            if can_flush {
                flags |= proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_FUA;
            }
            if bdev.supports(IoType::Unmap) {
                flags |= proto::FLAG_SEND_TRIM;
            }
            if bdev.supports(IoType::WriteZeroes) {
                flags |= proto::FLAG_SEND_WRITE_ZEROES;
            }
        }
        let info = ExportInfo {
            name: e.name.clone(),
            description: e.description.clone(),
            size: bdev.size_bytes(),
            flags,
            min_block: bdev.block_size(),
            preferred_block: bdev.block_size().max(proto::PREFERRED_BLOCK),
            max_block: opts.max_payload,
        };
        let mut exports = lock(&self.shared.exports);
        if exports.iter().any(|x| x.info.name == e.name) {
            return Err(NbdError::DuplicateExport { name: e.name });
        }
        exports.push(Arc::new(ExportShared {
            info,
            desc,
            removed: AtomicBool::new(false),
            conns: AtomicUsize::new(0),
            can_flush,
        }));
        tracing::info!(export = %e.name, bdev = %e.bdev, read_only = e.read_only, "NBD export added");
        Ok(())
    }

    /// Removes an export: new clients can no longer choose it, and its
    /// connections stop reading requests, finish those in flight, send their
    /// replies, flush, and close. Returns once they have (control path:
    /// never call it from a reactor).
    pub fn remove_export(&self, name: &str) -> Result<(), NbdError> {
        let export = {
            let mut exports = lock(&self.shared.exports);
            let Some(i) = exports.iter().position(|e| e.info.name == name) else {
                return Err(NbdError::NoSuchExport {
                    name: name.to_string(),
                    known: exports
                        .iter()
                        .map(|e| e.info.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            exports.remove(i)
        };
        export.removed.store(true, Ordering::Release);
        let waited = self.wait(|| export.conns.load(Ordering::Acquire) == 0);
        let left = export.conns.load(Ordering::Acquire);
        if left > 0 {
            return Err(NbdError::DrainTimeout {
                what: format!("removing export {name:?}"),
                left,
                waited,
            });
        }
        tracing::info!(export = %name, "NBD export removed");
        Ok(())
    }

    /// The counters so far.
    pub fn stats(&self) -> NbdStats {
        let mut s = NbdStats {
            connections_active: self.shared.live_conns.load(Ordering::Acquire) as u64,
            ..NbdStats::default()
        };
        for sh in self.shared.shards.iter() {
            s.connections_total += sh.connections.load(Ordering::Relaxed);
            s.requests += sh.requests.load(Ordering::Relaxed);
            s.bytes_read += sh.bytes_read.load(Ordering::Relaxed);
            s.bytes_written += sh.bytes_written.load(Ordering::Relaxed);
            s.errors += sh.errors.load(Ordering::Relaxed);
            s.protocol_errors += sh.protocol_errors.load(Ordering::Relaxed);
        }
        s
    }

    /// Stops the server: closes the listeners, lets every connection finish
    /// the requests it has started (replies included; nothing new is read),
    /// flushes the bdevs that were written, and closes the connections.
    /// Returns the final counters. Control path: never call it from a reactor.
    pub fn stop(mut self) -> Result<NbdStats, NbdError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<NbdStats, NbdError> {
        if self.stopped {
            return Ok(self.stats());
        }
        self.stopped = true;
        self.shared.stopping.store(true, Ordering::Release);
        let waited = self.wait(|| {
            self.shared.live_conns.load(Ordering::Acquire) == 0
                && self.shared.live_listeners.load(Ordering::Acquire) == 0
        });
        for l in &self.listening {
            if let Listen::Unix(p) = l {
                let _ = std::fs::remove_file(p);
            }
        }
        let left = self.shared.live_conns.load(Ordering::Acquire);
        if left > 0 {
            return Err(NbdError::DrainTimeout {
                what: "stopping".into(),
                left,
                waited,
            });
        }
        lock(&self.shared.exports).clear();
        tracing::info!(stats = ?self.stats(), "NBD server stopped");
        Ok(self.stats())
    }

    /// Waits for `done` up to the drain timeout plus a margin for the last
    /// I/O and flush; returns how long it waited.
    fn wait(&self, done: impl Fn() -> bool) -> Duration {
        let start = Instant::now();
        let limit = self.shared.opts.drain_timeout + Duration::from_secs(5);
        while !done() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
        start.elapsed()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!(error = %e, "NBD server did not stop cleanly");
        }
    }
}

fn check_options(o: &NbdOptions) -> Result<(), NbdError> {
    let bad = |s: String| Err(NbdError::InvalidOptions(s));
    if !o.segment_size.is_power_of_two()
        || o.segment_size < 64 * 1024
        || o.segment_size > proto::MAX_PAYLOAD as usize
    {
        return bad(format!(
            "segment_size {} is not a power of two from 64 KiB to 32 MiB",
            o.segment_size
        ));
    }
    if !(1..=4096).contains(&o.segments_per_connection) {
        return bad(format!(
            "segments_per_connection {} is not in 1..=4096",
            o.segments_per_connection
        ));
    }
    if !(1..=4096).contains(&o.max_requests) {
        return bad(format!(
            "max_requests {} is not in 1..=4096",
            o.max_requests
        ));
    }
    if o.max_payload == 0
        || o.max_payload > proto::MAX_PAYLOAD
        || !o.max_payload.is_multiple_of(64 * 1024)
    {
        return bad(format!(
            "max_payload {} is not a multiple of 64 KiB up to 32 MiB",
            o.max_payload
        ));
    }
    Ok(())
}

/// A bound, non-blocking listening socket.
enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    fn listen(&self) -> Listen {
        match self {
            Bound::Tcp(l) => Listen::Tcp(
                l.local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            ),
            Bound::Unix(_, p) => Listen::Unix(p.clone()),
        }
    }

    /// Accepts one pending connection, if any.
    fn accept(&self) -> io::Result<Option<Sock>> {
        let r = match self {
            Bound::Tcp(l) => l.accept().map(|(s, _)| Sock::Tcp(s)),
            Bound::Unix(l, _) => l.accept().map(|(s, _)| Sock::Unix(s)),
        };
        match r {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn bind(l: &Listen) -> io::Result<Bound> {
    match l {
        Listen::Tcp(addr) => {
            let t = TcpListener::bind(addr)?;
            t.set_nonblocking(true)?;
            Ok(Bound::Tcp(t))
        }
        Listen::Unix(path) => {
            remove_stale_socket(path)?;
            let u = UnixListener::bind(path)?;
            u.set_nonblocking(true)?;
            Ok(Bound::Unix(u, path.clone()))
        }
    }
}

/// Removes `path` if it is a socket nobody accepts on (left by a process
/// that died); refuses to touch a live socket or any other kind of file.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another server is listening on this socket",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

/// How often an accept poller looks for new connections. Accepting is rare;
/// polling it every reactor pass would cost a syscall per pass for nothing.
const ACCEPT_PERIOD: Duration = Duration::from_micros(500);
/// Connections accepted per accept poll, so a connection storm cannot stall
/// the reactor's other pollers.
const ACCEPT_BATCH: usize = 16;

/// The accept poller's state; its drop tells `stop` the listener is closed.
struct ListenerState {
    bound: Option<Bound>,
    shared: Arc<ServerShared>,
}

impl Drop for ListenerState {
    fn drop(&mut self) {
        if self.bound.take().is_some() {
            self.shared.live_listeners.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Registers the accept poller for `bound` on the current reactor. The poller
/// owns its handle, and drops it (closing the socket) once the server stops.
fn start_listener(bound: Bound, shared: Arc<ServerShared>) {
    let me: Rc<RefCell<Option<Poller>>> = Rc::new(RefCell::new(None));
    let mut st = ListenerState {
        bound: Some(bound),
        shared,
    };
    let handle = me.clone();
    let poller = Poller::builder()
        .name("nbd_accept")
        .period(ACCEPT_PERIOD)
        .register(move || {
            if st.shared.stopping.load(Ordering::Acquire) {
                if st.bound.take().is_some() {
                    st.shared.live_listeners.fetch_sub(1, Ordering::AcqRel);
                }
                handle.borrow_mut().take();
                return PollStatus::Idle;
            }
            let Some(bound) = st.bound.as_ref() else {
                return PollStatus::Idle;
            };
            let mut n = 0;
            while n < ACCEPT_BATCH {
                match bound.accept() {
                    Ok(Some(sock)) => {
                        n += 1;
                        if let Err(e) = sock.prepare() {
                            tracing::warn!(error = %e, "NBD: cannot set up accepted socket");
                            continue;
                        }
                        st.shared.dispatch(sock);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // EMFILE and friends: try again next period.
                        tracing::warn!(error = %e, "NBD: accept failed");
                        break;
                    }
                }
            }
            PollStatus::from_count(n)
        });
    *me.borrow_mut() = Some(poller);
}
