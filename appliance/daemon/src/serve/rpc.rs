//! The JSON-RPC 2.0 server on a Unix socket.
//!
//! # Framing
//!
//! Newline-delimited JSON: a client writes one request (an object) or one
//! batch (an array of requests) per line, and reads one response line per
//! request line, in order; notifications (requests without an `id`) get no
//! response, and a batch of notifications gets no line at all. A
//! connection carries as many requests as the client likes. A line that is
//! not JSON gets a `-32700` response (`id: null`) and the connection goes
//! on with the next line; so does a line longer than [`MAX_LINE`], which is
//! skipped up to its newline.
//!
//! # Threads
//!
//! One acceptor thread; each connection is served by a thread of its own
//! (at most [`MAX_CONNECTIONS`] at once), which runs the methods it is
//! asked for. These are control threads, never reactors: a method that
//! waits (a job start's freeze, a restore, a verify) holds up its own
//! client only. A method that panics is answered with `-32603` and the
//! server goes on.
//!
//! # The socket
//!
//! Bound under a temporary name next to the final path, set to mode 0600,
//! then renamed into place, so no other user can connect even briefly. A
//! stale socket (nothing accepts on it) is replaced; a live one means
//! another daemon serves there, and the start fails.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::daemon::Daemon;
use super::error::{INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR};
use super::methods;

/// Longest request line: 1 MiB is far beyond any request the methods take
/// and bounds what one client can make the daemon buffer.
pub const MAX_LINE: usize = 1 << 20;
/// Connections served at once; more are answered with an error and closed.
/// A control socket has a handful of clients (an operator, a scheduler, a
/// monitor); the bound keeps a runaway script from costing a thread per
/// connection without end.
pub const MAX_CONNECTIONS: usize = 64;

struct Conns {
    /// Open connections, to shut down at the stop.
    streams: HashMap<u64, UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

/// A running RPC server.
pub struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Conns>>,
}

fn lock(m: &Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds `path` with mode 0600 (see the module docs). Connections queue
/// until [`RpcServer::start`] accepts them.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "{}: another daemon is serving on this socket (stop it, or pass another --rpc-socket)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("{}: removing a stale socket", path.display()))?;
        }
        Ok(_) => bail!(
            "{}: exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "{}: the directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    let file = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .with_context(|| format!("binding the RPC socket {}", tmp.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("placing the RPC socket at {}", path.display()));
    }
    Ok(listener)
}

impl RpcServer {
    /// Starts accepting on `listener`, bound at `path` by [`bind`].
    pub fn start(
        listener: UnixListener,
        path: &Path,
        daemon: Arc<Daemon>,
    ) -> anyhow::Result<RpcServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Conns {
            streams: HashMap::new(),
            threads: Vec::new(),
        }));
        let acceptor = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::Builder::new()
                .name("hotcopy-rpc".into())
                .spawn(move || accept_loop(listener, daemon, stop, conns))
                .context("starting the RPC thread")?
        };
        Ok(RpcServer {
            path: path.to_path_buf(),
            stop,
            acceptor: Some(acceptor),
            conns,
        })
    }

    /// Stops accepting, closes every connection (a method running finishes
    /// first, its answer unsent), waits up to `grace` for the connection
    /// threads, and removes the socket.
    pub fn stop(mut self, grace: Duration) {
        self.stop.store(true, Ordering::Release);
        // Wake the acceptor.
        let _ = UnixStream::connect(&self.path);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let threads = {
            let mut c = lock(&self.conns);
            for s in c.streams.values() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            std::mem::take(&mut c.threads)
        };
        let deadline = Instant::now() + grace;
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Conns>>,
) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("RPC accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut c = lock(&conns);
        c.threads.retain(|t| !t.is_finished());
        if c.streams.len() >= MAX_CONNECTIONS {
            drop(c);
            let msg = error_response(
                Value::Null,
                -32000,
                &format!("too many RPC connections (at most {MAX_CONNECTIONS}); try again"),
            );
            let _ = writeln!(stream, "{msg}");
            continue;
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        c.streams.insert(id, clone);
        let (d, conns2) = (daemon.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("hotcopy-rpc-{id}"))
            .spawn(move || {
                serve_connection(stream, &d);
                lock(&conns2).streams.remove(&id);
            });
        match spawned {
            Ok(t) => c.threads.push(t),
            Err(e) => {
                c.streams.remove(&id);
                tracing::warn!("RPC connection thread: {e}");
            }
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)` at the end of
/// the stream; `Ok(Some(Err(())))` for a line that was too long (skipped).
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<Result<(), ()>>> {
    buf.clear();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_LINE && buf.last() != Some(&b'\n') {
        // Skip the rest of the line.
        loop {
            let avail = r.fill_buf()?;
            if avail.is_empty() {
                break;
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    r.consume(i + 1);
                    break;
                }
                None => {
                    let n = avail.len();
                    r.consume(n);
                }
            }
        }
        return Ok(Some(Err(())));
    }
    Ok(Some(Ok(())))
}

fn serve_connection(stream: UnixStream, d: &Daemon) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        let reply = match read_line(&mut reader, &mut buf) {
            Ok(None) | Err(_) => break,
            Ok(Some(Err(()))) => Some(error_response(
                Value::Null,
                INVALID_REQUEST,
                &format!("request line longer than {MAX_LINE} bytes"),
            )),
            Ok(Some(Ok(()))) => {
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim();
                if line.is_empty() {
                    continue;
                }
                handle_line(d, line)
            }
        };
        if let Some(r) = reply {
            if writeln!(out, "{r}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
    }
}

fn error_response(id: Value, code: i32, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

/// Answers one request line: a request, a batch, or garbage.
pub fn handle_line(d: &Daemon, line: &str) -> Option<Value> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_response(
                Value::Null,
                PARSE_ERROR,
                &format!("parse error: {e}"),
            ))
        }
    };
    match v {
        Value::Array(items) if items.is_empty() => Some(error_response(
            Value::Null,
            INVALID_REQUEST,
            "invalid request: an empty batch",
        )),
        Value::Array(items) => {
            let out: Vec<Value> = items.into_iter().filter_map(|r| handle_one(d, r)).collect();
            (!out.is_empty()).then_some(Value::Array(out))
        }
        other => handle_one(d, other),
    }
}

/// Answers one request object (`None` for a notification).
fn handle_one(d: &Daemon, req: Value) -> Option<Value> {
    let Value::Object(mut obj) = req else {
        return Some(error_response(
            Value::Null,
            INVALID_REQUEST,
            "invalid request: expected an object with jsonrpc, method, params and id",
        ));
    };
    let id = obj.remove("id");
    let id_ok = matches!(
        id,
        None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Number(_))
    );
    let reply_id = if id_ok {
        id.clone().unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let invalid = |why: &str| {
        Some(error_response(
            reply_id.clone(),
            INVALID_REQUEST,
            &format!("invalid request: {why}"),
        ))
    };
    if !id_ok {
        return invalid("id must be a string, a number or null");
    }
    if obj.get("jsonrpc") != Some(&json!("2.0")) {
        return invalid("jsonrpc must be \"2.0\"");
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => return invalid("method must be a string"),
        None => return invalid("method is missing"),
    };
    let params = obj.remove("params");
    if !matches!(
        params,
        None | Some(Value::Null) | Some(Value::Object(_)) | Some(Value::Array(_))
    ) {
        return invalid("params must be an object or an array");
    }
    let notification = id.is_none();
    let outcome = match methods::find(&method) {
        None => Err((
            METHOD_NOT_FOUND,
            format!("method not found: {method:?} (rpc_get_methods lists the methods)"),
        )),
        Some(handler) => {
            let started = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(d, params)));
            let r = match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err((e.code(), e.to_string())),
                Err(p) => {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    tracing::error!(method = %method, "RPC handler panicked: {what}");
                    Err((
                        INTERNAL_ERROR,
                        format!("internal error in {method}: {what}"),
                    ))
                }
            };
            match &r {
                Ok(_) => {
                    tracing::debug!(method = %method, ms = started.elapsed().as_millis() as u64, "rpc")
                }
                Err((code, msg)) => tracing::info!(method = %method, code, "rpc failed: {msg}"),
            }
            r
        }
    };
    if notification {
        return None;
    }
    Some(match outcome {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": reply_id, "result": result }),
        Err((code, message)) => error_response(reply_id, code, &message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_skipped_to_their_newline() {
        let mut data = vec![b'x'; MAX_LINE + 10];
        data.push(b'\n');
        data.extend_from_slice(b"{\"a\":1}\n");
        let mut r = BufReader::new(&data[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf).unwrap(), Some(Err(())));
        assert_eq!(read_line(&mut r, &mut buf).unwrap(), Some(Ok(())));
        assert_eq!(buf, b"{\"a\":1}\n");
        assert_eq!(read_line(&mut r, &mut buf).unwrap(), None);
    }
}
