//! `rpc_request`: the daemon's JSON-RPC request handling
//! ([`hotcopy::serve::rpc::handle_line`]: framing checks, the request
//! envelope, the method table, parameter parsing and the methods' own
//! validation) on a real [`Daemon`].
//!
//! # The daemon
//!
//! One daemon is built on first use and kept for the whole run (a
//! `OnceLock`), the way `hotcopy serve` builds it: the config below goes
//! through [`hotcopy_config::parse_str`], the reactors start, and every bdev
//! is created in the config's creation order with [`Daemon::create_bdev`].
//! Unlike `serve` it binds no RPC socket and starts no NBD export, no reaper
//! and no signal handler; its one reactor sleeps when idle and is not pinned,
//! so it does not take a core from libFuzzer. `repo0` is then formatted as a
//! backup repository (through `handle_line` too), so that
//! `hotcopy_repo_list`, `hotcopy_repo_info` and `hotcopy_repo_verify` reach
//! a real repository.
//!
//! # The input
//!
//! The bytes are what one client writes on one connection. They are cut
//! into lines at `\n`, and each line is converted and trimmed as the
//! server's connection loop does (`String::from_utf8_lossy`, `trim`, empty
//! lines skipped) before it goes to `handle_line`. Lossy rather than
//! only-valid UTF-8 because that is what the daemon does with a client's
//! bytes: invalid sequences become U+FFFD, which the JSON parser must then
//! refuse or accept as text like anything else.
//!
//! # What the fuzzer may call
//!
//! Every method of [`METHODS`] is classified in [`SAFE`] (sent through) or
//! [`UNSAFE`] (a line that asks for it anywhere, alone or in a batch, is
//! skipped). A method in neither list is skipped too, and a test fails
//! until it is classified: a new method is fuzzed only once someone has
//! decided it cannot do lasting damage.
//! Unsafe are the methods that would change what later inputs see or make
//! them slow: every create and delete (a deleted `m0` makes every later
//! input meaningless; `bdev_malloc_create` of 1 TiB exhausts memory;
//! `bdev_uring_create` makes files at any path), backup starts, repository
//! writes (format, prune, restore), instant restores, snapshots and
//! `nbd_start_disk` (binds a socket). The safe ones read state, or act on a
//! backup job, instant restore or export, of which this daemon has none,
//! so they fail after their parameters are parsed. `hotcopy_repo_list`,
//! `hotcopy_repo_info` and `hotcopy_repo_verify` are safe when their `repo`
//! names a bdev; given a
//! spec (a string with a `:`) they create a bdev for it, so such a line is
//! skipped too. After each line the daemon must still have exactly its
//! bdevs and no job, export, restore or snapshot: a gap in these lists
//! fails there.
//!
//! # Properties
//!
//! Besides "never panics" (a method that panics is answered with -32603;
//! that counts as a crash here):
//!
//! * Text that is not JSON gets one error response with code -32700 and
//!   `id: null`. An empty batch gets one -32600 error.
//! * Every response is an object with `"jsonrpc": "2.0"`, an `id` and
//!   exactly one of `result` and `error`; an `error` is an object with an
//!   integer `code` and a non-empty string `message`, and nothing else
//!   besides an optional `data`.
//! * The `id` is the request's when the request is an object whose `id` is
//!   a string, a number or null; otherwise it is null.
//! * A request gets no response exactly when it is a notification: an
//!   object without `id` that is a valid request (`jsonrpc` "2.0", a
//!   string `method`, `params` absent, null, an object or an array).
//! * A batch (a non-empty array) gets an array holding the responses of its
//!   elements in order, or nothing when all are notifications.
//! * The error code is predicted from the envelope: -32600 for a request
//!   that is not an object, has an id of another type, a `jsonrpc` other
//!   than "2.0", a missing or non-string `method` or `params` of another
//!   type; -32601 for a method not in the table; for a method's own failure
//!   one of the daemon's codes (-32602, -32000 to -32005).

use std::sync::OnceLock;

use hotcopy::serve::daemon::{Daemon, Origin};
use hotcopy::serve::methods::METHODS;
use hotcopy::serve::rpc::handle_line;
use hotcopy_runtime::Runtime;
use serde_json::{json, Map, Value};

/// The daemon's config: small bdevs of each kind that needs no file.
const CONFIG: &str = "\
reactors:
  cores: 1
  idle: sleep
bdevs:
  - name: m0
    type: malloc
    size: 4MiB
  - name: pt0
    type: passthru
    base: m0
  - name: n0
    type: null
    size: 1GiB
    block_size: 4096
  - name: m1
    type: malloc
    size: 4MiB
  - name: cow0
    type: cow
    base: m1
  - name: repo0
    type: malloc
    size: 16MiB
";

/// The bdevs the daemon has, sorted; it must keep exactly these.
const BDEVS: &[&str] = &["cow0", "m0", "m1", "n0", "pt0", "repo0"];

/// Methods the fuzzer's requests go through to (see the module docs).
pub const SAFE: &[&str] = &[
    "rpc_get_methods",
    "bdev_get_bdevs",
    "bdev_get_iostat",
    "bdev_reset_iostat",
    "hotcopy_backup_status",
    "hotcopy_backup_cancel",
    "hotcopy_backup_prioritize",
    "hotcopy_backup_set_rate",
    "hotcopy_backup_view_create",
    "hotcopy_repo_list",
    "hotcopy_repo_info",
    "hotcopy_repo_verify",
    "hotcopy_instant_restore_status",
    "hotcopy_instant_restore_cancel",
    "nbd_stop_disk",
    "nbd_get_disks",
    "hotcopy_get_stats",
    "save_config",
];

/// Methods whose requests are skipped: they create or delete bdevs, write
/// repositories or files, start jobs or bind sockets.
pub const UNSAFE: &[&str] = &[
    "bdev_malloc_create",
    "bdev_malloc_delete",
    "bdev_null_create",
    "bdev_null_delete",
    "bdev_uring_create",
    "bdev_uring_delete",
    "bdev_passthru_create",
    "bdev_passthru_delete",
    "hotcopy_bdev_create",
    "hotcopy_bdev_delete",
    "hotcopy_cow_create",
    "hotcopy_cow_delete",
    "hotcopy_backup_start",
    "hotcopy_repo_format",
    "hotcopy_repo_prune",
    "hotcopy_repo_restore",
    "hotcopy_instant_restore_start",
    "hotcopy_snapshot_create",
    "hotcopy_snapshot_delete",
    "nbd_start_disk",
];

/// The methods whose `repo` parameter may be a spec, which creates a bdev.
const REPO_SPEC: &[&str] = &[
    "hotcopy_repo_list",
    "hotcopy_repo_info",
    "hotcopy_repo_verify",
];

/// The error codes a method's own failure may carry (`ServeError::code`).
const METHOD_CODES: &[i64] = &[-32602, -32000, -32001, -32002, -32003, -32004, -32005];

struct Fixture {
    /// Kept so that the reactor runs for the whole process.
    _rt: Runtime,
    d: Daemon,
}

/// The daemon, built once (see the module docs).
pub fn daemon() -> &'static Daemon {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    &FIXTURE.get_or_init(build).d
}

fn build() -> Fixture {
    let cfg = hotcopy_config::parse_str(CONFIG, "rpc_request's config")
        .unwrap_or_else(|e| panic!("the embedded config: {e}"));
    // Unlike `serve`: libFuzzer's thread must not share a pinned core.
    let rt = Runtime::start(hotcopy::serve::runtime_config(&cfg.reactors, false))
        .expect("starting the reactor");
    let base = hotcopy_config::Config {
        reactors: cfg.reactors.clone(),
        buffer_pool: cfg.buffer_pool.clone(),
        ..hotcopy_config::Config::default()
    };
    let d = Daemon::new(rt.reactors().to_vec(), base);
    for b in cfg.creation_order() {
        d.create_bdev(&b.name, &b.bdev, cfg.tracking.get(&b.name), Origin::Config)
            .unwrap_or_else(|e| panic!("bdev {}: {e}", b.name));
    }
    let format = json!({
        "jsonrpc": "2.0", "id": 1, "method": "hotcopy_repo_format",
        "params": { "repo": "repo0" },
    });
    let r = handle_line(&d, &format.to_string());
    assert!(
        matches!(&r, Some(v) if v.get("result").is_some()),
        "formatting repo0: {r:?}"
    );
    Fixture { _rt: rt, d }
}

pub fn rpc_request(data: &[u8]) {
    let d = daemon();
    for raw in data.split(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(raw);
        let line = text.trim();
        if line.is_empty() || !allowed(line) {
            continue;
        }
        let reply = handle_line(d, line);
        check_reply(line, reply.as_ref());
        check_intact(d);
    }
}

/// Whether `line` may go to the daemon: every method it asks for is
/// [`SAFE`] or not in the table (a typo, answered -32601), and it names no
/// repository by spec.
pub fn allowed(line: &str) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return true;
    };
    match &v {
        Value::Array(items) => items.iter().all(allowed_request),
        one => allowed_request(one),
    }
}

fn allowed_request(req: &Value) -> bool {
    let Some(Value::String(method)) = req.get("method") else {
        return true;
    };
    let m = method.as_str();
    // A method of the table in neither list (the test below fails then) is
    // skipped too, until it is classified.
    if UNSAFE.contains(&m) || (METHODS.iter().any(|(n, _)| *n == m) && !SAFE.contains(&m)) {
        return false;
    }
    if REPO_SPEC.contains(&m) {
        if let Some(Value::String(repo)) = req.get("params").and_then(|p| p.get("repo")) {
            return !repo.contains(':');
        }
    }
    true
}

/// What a request must be answered with.
#[derive(Debug, PartialEq)]
enum Expect {
    /// Nothing: a notification.
    Nothing,
    /// An error with this code.
    Error(i64),
    /// A method's answer: a result, or an error with one of [`METHOD_CODES`].
    Method,
}

fn check_reply(line: &str, reply: Option<&Value>) {
    let parsed: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => {
            let r = reply.unwrap_or_else(|| panic!("no reply to the non-JSON {line:?}"));
            check_response(r, &Value::Null, &Expect::Error(-32700), line);
            return;
        }
    };
    match parsed {
        Value::Array(items) if items.is_empty() => {
            let r = reply.unwrap_or_else(|| panic!("no reply to an empty batch {line:?}"));
            check_response(r, &Value::Null, &Expect::Error(-32600), line);
        }
        Value::Array(items) => {
            let expected: Vec<(Value, Expect)> = items
                .iter()
                .map(expect)
                .filter(|(_, e)| *e != Expect::Nothing)
                .collect();
            if expected.is_empty() {
                assert!(
                    reply.is_none(),
                    "{line:?}: a batch of notifications got {reply:?}"
                );
                return;
            }
            let Some(Value::Array(got)) = reply else {
                panic!("{line:?}: a batch got {reply:?}, not an array");
            };
            assert_eq!(
                got.len(),
                expected.len(),
                "{line:?}: {} responses for {} requests that are not notifications: {got:?}",
                got.len(),
                expected.len()
            );
            for (r, (id, e)) in got.iter().zip(&expected) {
                check_response(r, id, e, line);
            }
        }
        one => match expect(&one) {
            (_, Expect::Nothing) => {
                assert!(reply.is_none(), "{line:?}: a notification got {reply:?}")
            }
            (id, e) => {
                let r = reply.unwrap_or_else(|| panic!("{line:?}: no reply"));
                check_response(r, &id, &e, line);
            }
        },
    }
}

/// The id and the answer a request must get (an independent reading of
/// JSON-RPC 2.0, as the module docs state it).
fn expect(req: &Value) -> (Value, Expect) {
    let Value::Object(obj) = req else {
        return (Value::Null, Expect::Error(-32600));
    };
    let id = obj.get("id");
    let (id, id_ok) = match id {
        None => (Value::Null, true),
        Some(v @ (Value::Null | Value::String(_) | Value::Number(_))) => (v.clone(), true),
        Some(_) => (Value::Null, false),
    };
    let params_ok = matches!(
        obj.get("params"),
        None | Some(Value::Null | Value::Object(_) | Value::Array(_))
    );
    let method = match obj.get("method") {
        Some(Value::String(m)) => Some(m.as_str()),
        _ => None,
    };
    let valid = id_ok && obj.get("jsonrpc") == Some(&json!("2.0")) && method.is_some() && params_ok;
    if !valid {
        return (id, Expect::Error(-32600));
    }
    if !obj.contains_key("id") {
        return (id, Expect::Nothing);
    }
    let known = method.is_some_and(|m| METHODS.iter().any(|(n, _)| *n == m));
    (
        id,
        if known {
            Expect::Method
        } else {
            Expect::Error(-32601)
        },
    )
}

fn check_response(r: &Value, id: &Value, e: &Expect, line: &str) {
    let Value::Object(obj) = r else {
        panic!("{line:?}: the response {r} is not an object");
    };
    assert_eq!(obj.get("jsonrpc"), Some(&json!("2.0")), "{line:?}: {r}");
    assert_eq!(obj.get("id"), Some(id), "{line:?}: {r}");
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    let code = match (obj.get("result"), obj.get("error")) {
        (Some(_), None) => {
            assert_eq!(sorted, ["id", "jsonrpc", "result"], "{line:?}: {r}");
            None
        }
        (None, Some(err)) => {
            assert_eq!(sorted, ["error", "id", "jsonrpc"], "{line:?}: {r}");
            Some(check_error(err, line))
        }
        _ => panic!("{line:?}: the response {r} has not exactly one of result and error"),
    };
    match (e, code) {
        (Expect::Nothing, _) => unreachable!("a notification has no response to check"),
        (Expect::Error(want), Some(got)) => assert_eq!(got, *want, "{line:?}: {r}"),
        (Expect::Error(want), None) => panic!("{line:?}: expected error {want}, got {r}"),
        (Expect::Method, None) => {}
        (Expect::Method, Some(got)) => assert!(
            METHOD_CODES.contains(&got),
            "{line:?}: a method failed with code {got} (-32603: it panicked): {r}"
        ),
    }
}

/// An error object: its code.
fn check_error(err: &Value, line: &str) -> i64 {
    let Value::Object(e) = err else {
        panic!("{line:?}: the error {err} is not an object");
    };
    let extra: Vec<&String> = e
        .keys()
        .filter(|k| !["code", "message", "data"].contains(&k.as_str()))
        .collect();
    assert!(extra.is_empty(), "{line:?}: the error {err} has {extra:?}");
    let code = e
        .get("code")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("{line:?}: the error {err} has no integer code"));
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{line:?}: the error {err} has no string message"));
    assert!(
        !message.is_empty(),
        "{line:?}: the error {err} has an empty message"
    );
    code
}

/// The daemon has its bdevs and nothing else (see the module docs).
fn check_intact(d: &Daemon) {
    let mut names = d.reg.names();
    names.sort();
    assert_eq!(names, BDEVS, "the daemon's bdevs changed");
    let st = d.state();
    assert_eq!(st.defs.len(), BDEVS.len(), "the daemon's records changed");
    assert!(st.jobs.is_empty(), "a backup job was started");
    assert!(st.exports.is_empty(), "an export was started");
    assert!(st.instants.is_empty() && st.snapshots.is_empty());
    assert!(st.repo_writer.is_empty() && st.starting.is_empty());
}

/// Requests for the seed corpus: valid ones of every safe method, and
/// typical invalid ones.
pub fn seeds() -> Vec<(&'static str, String)> {
    let req = |id: Value, method: &str, params: Value| {
        let mut m = Map::new();
        m.insert("jsonrpc".into(), json!("2.0"));
        m.insert("id".into(), id);
        m.insert("method".into(), json!(method));
        if !params.is_null() {
            m.insert("params".into(), params);
        }
        Value::Object(m).to_string()
    };
    let mut v = vec![
        ("get-methods", req(json!(1), "rpc_get_methods", Value::Null)),
        ("get-bdevs", req(json!("a"), "bdev_get_bdevs", json!({}))),
        (
            "get-bdevs-one",
            req(json!(2), "bdev_get_bdevs", json!({"name": "cow0"})),
        ),
        (
            "iostat",
            req(json!(3), "bdev_get_iostat", json!({"name": "m0"})),
        ),
        (
            "reset-iostat",
            req(json!(4), "bdev_reset_iostat", json!({})),
        ),
        (
            "backup-status",
            req(
                json!(5),
                "hotcopy_backup_status",
                json!({"volume": "cow0", "job": "7"}),
            ),
        ),
        (
            "backup-cancel",
            req(json!(6), "hotcopy_backup_cancel", json!({"wait_s": 0})),
        ),
        (
            "backup-prioritize",
            req(
                json!(7),
                "hotcopy_backup_prioritize",
                json!({"volume": "cow0", "offset": "1M", "length": 4096}),
            ),
        ),
        (
            "backup-set-rate",
            req(
                json!(8),
                "hotcopy_backup_set_rate",
                json!({"rate": "64MiB"}),
            ),
        ),
        (
            "view-create",
            req(
                json!(9),
                "hotcopy_backup_view_create",
                json!({"name": "v0"}),
            ),
        ),
        (
            "repo-list",
            req(json!(10), "hotcopy_repo_list", json!({"repo": "repo0"})),
        ),
        (
            "repo-verify",
            req(
                json!(11),
                "hotcopy_repo_verify",
                json!({"repo": "repo0", "generation": 1}),
            ),
        ),
        (
            "repo-list-not-a-repo",
            req(json!(12), "hotcopy_repo_list", json!({"repo": "m0"})),
        ),
        (
            "instant-status",
            req(
                json!(13),
                "hotcopy_instant_restore_status",
                json!({"name": "r"}),
            ),
        ),
        (
            "instant-cancel",
            req(
                json!(14),
                "hotcopy_instant_restore_cancel",
                json!({"name": "r"}),
            ),
        ),
        (
            "nbd-stop",
            req(json!(15), "nbd_stop_disk", json!({"name": "vol"})),
        ),
        ("nbd-disks", req(json!(16), "nbd_get_disks", Value::Null)),
        ("stats", req(json!(17), "hotcopy_get_stats", json!({}))),
        (
            "save-config-yaml",
            req(json!(18.5), "save_config", json!({"format": "yaml"})),
        ),
        (
            "unknown-param",
            req(json!(19), "bdev_get_bdevs", json!({"nmae": "m0"})),
        ),
        (
            "params-array",
            req(json!(20), "bdev_get_bdevs", json!(["m0"])),
        ),
        (
            "unknown-method",
            req(json!(null), "bdev_frobnicate", json!({})),
        ),
    ];
    let batch = format!(
        "[{},{},{},5,{}]",
        req(json!(1), "bdev_get_bdevs", Value::Null),
        r#"{"jsonrpc":"2.0","method":"hotcopy_get_stats"}"#,
        r#"{"jsonrpc":"2.0","id":{"x":1},"method":"rpc_get_methods"}"#,
        r#"{"jsonrpc":"1.0","id":"q","method":"save_config"}"#,
    );
    v.push(("batch", batch));
    v.push((
        "notification",
        r#"{"jsonrpc":"2.0","method":"bdev_reset_iostat","params":{"name":"n0"}}"#.into(),
    ));
    v.push((
        "connection",
        [
            r#"{"jsonrpc":"2.0","id":1,"method":"bdev_get_iostat"}"#,
            "",
            r#"  {"jsonrpc":"2.0","id":2,"method":"save_config"}  "#,
        ]
        .join("\n"),
    ));
    v.push(("empty-batch", "[]".into()));
    v.push(("not-json", r#"{"jsonrpc":"2.0","id":1,"method":"#.into()));
    v.push((
        "params-string",
        r#"{"jsonrpc":"2.0","id":1,"method":"save_config","params":"x"}"#.into(),
    ));
    v.push((
        "method-number",
        r#"{"jsonrpc":"2.0","id":1,"method":7}"#.into(),
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_classified_once() {
        for (m, _) in METHODS {
            let n = SAFE.contains(m) as usize + UNSAFE.contains(m) as usize;
            assert_eq!(
                n, 1,
                "{m}: add it to SAFE or UNSAFE in fuzz/src/rpc.rs (see the module docs)"
            );
        }
        for m in SAFE.iter().chain(UNSAFE) {
            assert!(METHODS.iter().any(|(n, _)| n == m), "{m} is not a method");
        }
    }

    #[test]
    fn unsafe_requests_are_skipped() {
        let create =
            r#"{"jsonrpc":"2.0","id":1,"method":"bdev_malloc_delete","params":{"name":"m0"}}"#;
        assert!(!allowed(create));
        assert!(!allowed(&format!("[1,{create}]")));
        assert!(!allowed(
            r#"{"jsonrpc":"2.0","id":1,"method":"hotcopy_repo_list","params":{"repo":"malloc:1T"}}"#
        ));
        assert!(allowed(
            r#"{"jsonrpc":"2.0","id":1,"method":"hotcopy_repo_list","params":{"repo":"repo0"}}"#
        ));
        assert!(allowed("not json"));
    }

    #[test]
    fn the_repository_is_there() {
        let r = handle_line(
            daemon(),
            r#"{"jsonrpc":"2.0","id":1,"method":"hotcopy_repo_verify","params":{"repo":"repo0"}}"#,
        )
        .unwrap();
        assert_eq!(r["result"]["ok"], json!(true), "{r}");
    }
}
