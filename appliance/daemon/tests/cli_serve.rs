//! `hotcopy serve` as a real process, driven with `hotcopy rpc`, the
//! friendly `hotcopy backup start|status|cancel`, and raw JSON-RPC on its
//! socket: bdevs made by RPC, full and incremental online backups into a
//! repository, a restore compared byte for byte, bad input of every kind
//! answered with the right code while the daemon keeps serving, and the
//! clean stop on SIGTERM that keeps the change tracking for the next start.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{client, fails, hotcopy, nbd_to_file, ok, ok_parsed, BIN};

fn scratch(tag: &str) -> tempfile::TempDir {
    common::scratch(&format!("serve-{tag}"))
}

/// A file of `mib` MiB of pseudo-random data, with a zero MiB every 8.
fn make_source(path: &Path, mib: usize, seed: u64) {
    common::make_source(path, mib, seed, 8, 3);
}

/// `hotcopy rpc METHOD -p PARAM… --socket SOCKET`.
fn rpc_args<'a>(socket: &'a str, method: &'a str, params: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["rpc", method];
    for p in params {
        args.extend(["-p", *p]);
    }
    args.extend(["--socket", socket]);
    args
}

/// `hotcopy backup start` of `volume` into `repo` through the daemon on
/// `socket`, with `extra` flags, waited for; must succeed; returns the job
/// as `--json` prints it.
fn backup_wait(socket: &str, volume: &str, repo: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "backup",
        "start",
        "--rpc-socket",
        socket,
        "--volume",
        volume,
        "--repo",
        repo,
    ];
    args.extend_from_slice(extra);
    args.extend(["--wait", "--json"]);
    ok_parsed(&args)
}

/// A running `hotcopy serve`; killed if a test fails before stopping it.
struct Serve {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Serve {
    fn start(args: &[&str], socket: &Path, log: &Path) -> Serve {
        let err = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .env("HOTCOPY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start hotcopy serve");
        let mut s = Serve {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        // The socket is placed before the bdevs and exports exist (requests
        // queue until the start is done), so a connect alone does not mean
        // ready: the first answer does.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.answers() {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "hotcopy serve exited ({st}) before serving:\n{}",
                    s.log_text()
                );
            }
            assert!(Instant::now() < deadline, "no answer:\n{}", s.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// Whether the daemon answers `rpc_get_methods` on its socket.
    fn answers(&self) -> bool {
        let Ok(w) = UnixStream::connect(&self.socket) else {
            return false;
        };
        let _ = w.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(r) = w.try_clone() else {
            return false;
        };
        let mut w = w;
        if w.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"rpc_get_methods\"}\n")
            .is_err()
        {
            return false;
        }
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).is_ok() && line.contains("\"result\"")
    }

    fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success());
    }

    /// SIGTERM; returns the exit code and the log.
    fn stop(mut self) -> (i32, String) {
        self.signal("-TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("hotcopy serve did not stop:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code().unwrap_or(-1), self.log_text())
    }

    /// SIGTERM, which must end it with exit code 0; returns the log.
    fn stop_ok(self) -> String {
        let (code, log) = self.stop();
        assert_eq!(code, 0, "hotcopy serve exited {code}:\n{log}");
        log
    }

    /// SIGKILL: as a crash.
    fn crash(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw JSON-RPC connection: lines out, lines in.
struct Raw {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Raw {
    fn new(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn ask(&mut self, line: &str) -> Value {
        self.send(line);
        self.recv()
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.ask(
            &json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string(),
        )
    }
}

#[track_caller]
fn assert_error(v: &Value, code: i64, starts: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.starts_with(starts), "{starts:?} in {v}");
}

fn config(dir: &Path) -> PathBuf {
    let d = dir.display();
    let text = format!(
        "\
reactors:
  cores: 2
  idle: sleep
bdevs:
  - name: disk
    type: uring
    path: {d}/vol.img
  - name: vol
    type: cow
    base: disk
    tracking:
      bdev: uring:{d}/vol.cbt@1M
rpc_socket: {d}/rpc.sock
"
    );
    let path = dir.join("hotcopy.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn serve_backs_up_restores_and_keeps_change_tracking_across_a_clean_restart() {
    let dir = scratch("main");
    let d = dir.path();
    let src = d.join("vol.img");
    make_source(&src, 16, 11);
    let repo_spec = format!("uring:{}@128M", d.join("repo.img").display());
    ok(&["repo", "format", "--repo", &repo_spec]);
    let cfg = config(d);
    let sock = d.join("rpc.sock");
    let serve = Serve::start(
        &["--config", cfg.to_str().unwrap()],
        &sock,
        &d.join("serve1.log"),
    );
    let s = serve.sock().to_string();
    let mode = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // Bdevs by RPC: a malloc bdev, a uring file, a cow bdev on it.
    assert_eq!(
        ok(&[
            "rpc",
            "bdev_malloc_create",
            "--param",
            "name=ram0",
            "--param",
            "size=8M",
            "--socket",
            &s
        ])
        .trim(),
        "ram0",
        "a string result prints as plain text"
    );
    let f2 = d.join("vol2.img");
    ok(&rpc_args(
        &s,
        "bdev_uring_create",
        &[
            "name=disk2",
            &format!("filename={}", f2.display()),
            "size=4M",
        ],
    ));
    ok(&rpc_args(
        &s,
        "hotcopy_cow_create",
        &["name=vol2", "base_bdev_name=disk2"],
    ));
    let bdevs = ok_parsed(&rpc_args(&s, "bdev_get_bdevs", &[]));
    let names: Vec<&str> = bdevs
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    for n in ["disk", "vol", "vol.tracking", "ram0", "disk2", "vol2"] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    let vol = ok_parsed(&rpc_args(&s, "bdev_get_bdevs", &["name=vol"]));
    assert_eq!(vol[0]["product_name"], "cow");
    assert_eq!(vol[0]["tracking"]["opened"], "fresh");
    assert_eq!(vol[0]["size_bytes"], 16 << 20);

    // A full online backup, waited for; then its status.
    let full = backup_wait(&s, "vol", &repo_spec, &[]);
    assert_eq!(full["state"], "complete", "{full}");
    assert_eq!(full["kind"], "full");
    let g1 = full["generation"].as_u64().unwrap();
    let st = ok_parsed(&[
        "backup",
        "status",
        "--rpc-socket",
        &s,
        "--volume",
        "vol",
        "--json",
    ]);
    assert_eq!(st["state"], "complete");
    assert_eq!(st["generation"], g1);
    let human = ok(&["backup", "status", "--rpc-socket", &s]);
    assert!(human.contains("complete"), "{human}");

    // The generation, listed; restored to a file; equal to the source.
    let list = ok_parsed(&rpc_args(
        &s,
        "hotcopy_repo_list",
        &[&format!("repo={repo_spec}")],
    ));
    let gens = list["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 1);
    assert_eq!(gens[0]["state"], "complete");
    assert_eq!(gens[0]["source"]["name"], "vol");
    assert_eq!(
        gens[0]["chunks"]["zero"], 32,
        "two zero MiB in 64 KiB chunks"
    );
    let out = d.join("out.img");
    let r = ok_parsed(&rpc_args(
        &s,
        "hotcopy_repo_restore",
        &[
            &format!("repo={repo_spec}"),
            "generation=latest",
            &format!("to=uring:{}@16M", out.display()),
        ],
    ));
    assert_eq!(r["generation"], g1);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap(),
        "restored bytes differ"
    );
    let v = ok_parsed(&rpc_args(
        &s,
        "hotcopy_repo_verify",
        &[&format!("repo={repo_spec}")],
    ));
    assert_eq!(v["ok"], true, "{v}");

    // An incremental right away: tracking says nothing changed.
    let inc = backup_wait(&s, "vol", &repo_spec, &["--incremental"]);
    assert_eq!(inc["state"], "complete", "{inc}");
    assert_eq!(
        (inc["kind"].as_str(), inc["method"].as_str()),
        (Some("incremental"), Some("tracking"))
    );
    assert_eq!(inc["parent"], g1);
    assert_eq!(inc["chunks_copied"], 0, "{inc}");

    // A backup of the cow bdev made by RPC, into the same repository, and a
    // cancel with nothing running.
    let b2 = backup_wait(&s, "vol2", "repo0", &[]);
    assert_eq!(b2["state"], "complete", "{b2}");
    let (code, _, err) = hotcopy(&["backup", "cancel", "--rpc-socket", &s, "--volume", "vol"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no backup of volume \"vol\" is running") && err.contains("-32001"),
        "{err}"
    );

    // Stats: per-bdev figures and the jobs.
    let stats = ok_parsed(&rpc_args(&s, "hotcopy_get_stats", &[]));
    assert_eq!(stats["jobs"].as_array().unwrap().len(), 3);
    let cow = stats["bdevs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "vol")
        .unwrap();
    assert_eq!(cow["cow"]["tracking"]["base_generation"], inc["generation"]);

    // The running state as a config; the next start uses it.
    let saved = ok(&rpc_args(&s, "save_config", &["format=yaml"]));
    assert!(
        saved.contains("name: ram0") && saved.contains("name: repo0"),
        "{saved}"
    );
    assert!(saved.contains("tracking:"), "{saved}");
    let saved_path = d.join("saved.yaml");
    std::fs::write(&saved_path, &saved).unwrap();

    let log = serve.stop_ok();
    assert!(log.contains("change tracking closed clean"), "{log}");
    assert!(!sock.exists(), "the socket is removed at the stop");

    // A second start on the same files, from the saved config: the tracking
    // is intact, so the incremental reads only what changed (nothing).
    let serve = Serve::start(
        &["--config", saved_path.to_str().unwrap()],
        &sock,
        &d.join("serve2.log"),
    );
    let s = serve.sock().to_string();
    let vol = ok_parsed(&rpc_args(&s, "bdev_get_bdevs", &["name=vol"]));
    assert_eq!(vol[0]["tracking"]["opened"], "intact");
    assert!(
        serve.log_text().contains("change tracking intact"),
        "{}",
        serve.log_text()
    );
    let inc2 = backup_wait(&s, "vol", "repo0", &["--incremental"]);
    assert_eq!(inc2["state"], "complete", "{inc2}");
    assert_eq!(inc2["method"], "tracking", "{inc2}");
    assert_eq!(inc2["parent"], inc["generation"]);
    let list = ok_parsed(&rpc_args(&s, "hotcopy_repo_list", &["repo=repo0"]));
    let last = list["generations"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["kind"], "incremental");
    assert_eq!(last["chunks"]["stored"], 0);

    // A crash: the tracking is not trusted on the next start; an
    // incremental falls back to comparing checksums, and says so.
    serve.crash();
    let serve = Serve::start(
        &["--config", saved_path.to_str().unwrap()],
        &sock,
        &d.join("serve3.log"),
    );
    let s = serve.sock().to_string();
    let inc3 = backup_wait(&s, "vol", "repo0", &["--incremental"]);
    assert_eq!(inc3["state"], "complete", "{inc3}");
    assert_eq!(inc3["method"], "checksum", "{inc3}");
    assert!(inc3["note"].as_str().unwrap().contains("lost"), "{inc3}");
    serve.stop_ok();
}

#[test]
fn bad_requests_get_json_rpc_errors_and_the_daemon_keeps_serving() {
    let dir = scratch("bad");
    let d = dir.path();
    let sock = d.join("s.sock");
    let serve = Serve::start(
        &[
            "--bdev",
            "ram=malloc:4M",
            "--bdev",
            &format!("cvol=cow:uring:{}@4M", d.join("c.img").display()),
            "--rpc-socket",
            sock.to_str().unwrap(),
        ],
        &sock,
        &d.join("serve.log"),
    );
    let mut c = Raw::new(&sock);
    // Not JSON; the same connection goes on.
    assert_error(&c.ask("{not json"), -32700, "parse error");
    assert_eq!(c.ask("{not json")["id"], Value::Null);
    let m = c.call("rpc_get_methods", Value::Null);
    assert!(m["result"]
        .as_array()
        .unwrap()
        .contains(&json!("hotcopy_backup_start")));
    // Not requests.
    assert_error(&c.ask("[]"), -32600, "invalid request: an empty batch");
    assert_error(&c.ask("42"), -32600, "invalid request");
    assert_error(
        &c.ask(r#"{"jsonrpc":"2.0","id":1}"#),
        -32600,
        "invalid request: method is missing",
    );
    assert_error(
        &c.ask(r#"{"jsonrpc":"1.0","id":1,"method":"rpc_get_methods"}"#),
        -32600,
        "invalid request: jsonrpc must be \"2.0\"",
    );
    assert_error(
        &c.ask(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#),
        -32600,
        "invalid request: id",
    );
    // Unknown method; the id comes back.
    let v = c.ask(r#"{"jsonrpc":"2.0","id":"abc","method":"bdev_frobnicate"}"#);
    assert_error(&v, -32601, "method not found: \"bdev_frobnicate\"");
    assert_eq!(v["id"], "abc");
    // Bad params name the parameter.
    assert_error(
        &c.call("bdev_malloc_create", json!({"name": "m", "size": "12X"})),
        -32602,
        "size: invalid size",
    );
    assert_error(
        &c.call("bdev_malloc_create", json!({"size": "1M"})),
        -32602,
        "name: missing required parameter",
    );
    assert_error(
        &c.call(
            "bdev_malloc_create",
            json!({"name": "m", "size": "1M", "colour": 1}),
        ),
        -32602,
        "colour: unknown parameter",
    );
    assert_error(
        &c.call("bdev_malloc_create", json!([1, 2])),
        -32602,
        "params must be an object",
    );
    assert_error(
        &c.call("bdev_malloc_create", json!({"name": "m", "size": 1000})),
        -32602,
        "size: size 1000 is not a multiple",
    );
    assert_error(
        &c.call(
            "hotcopy_backup_start",
            json!({"volume": "ram", "repo": "ram"}),
        ),
        -32602,
        "volume: \"ram\" is a malloc bdev, not a cow bdev",
    );
    assert_error(
        &c.call(
            "hotcopy_backup_start",
            json!({"volume": "cvol", "repo": "uring:/nonexistent-dir/r.img@64M"}),
        ),
        -32000,
        "repo: creating repo0",
    );
    assert_error(
        &c.call(
            "hotcopy_backup_start",
            json!({"volume": "cvol", "repo": "ram"}),
        ),
        -32004,
        "repo ram: not a hotcopy repository",
    );
    assert_error(
        &c.call(
            "hotcopy_backup_start",
            json!({"volume": "cvol", "repo": "ram", "min_share": 1.5}),
        ),
        -32602,
        "min_share: 1.5 is not a share of time between 0 and 1",
    );
    assert_error(
        &c.call(
            "hotcopy_backup_start",
            json!({"volume": "cvol", "repo": "ram", "tolerance": "fast"}),
        ),
        -32602,
        "tolerance: expected a number, got \"fast\"",
    );
    assert_error(
        &c.call(
            "hotcopy_backup_start",
            json!({"volume": "cvol", "repo": "ram", "tolerance": 0.5}),
        ),
        -32602,
        "tolerance: 0.5 is below 1",
    );
    assert_error(
        &c.call(
            "bdev_uring_create",
            json!({"name": "pre", "filename": d.join("pre.img"), "size": "4M", "preallocate": "maybe"}),
        ),
        -32602,
        "preallocate: expected true or false",
    );
    // Domain errors.
    assert_error(
        &c.call("bdev_malloc_create", json!({"name": "ram", "size": "1M"})),
        -32003,
        "a bdev named \"ram\" already exists",
    );
    assert_error(
        &c.call("hotcopy_backup_status", json!({"volume": "nope"})),
        -32001,
        "no backup job of volume \"nope\"",
    );
    assert_error(
        &c.call("bdev_malloc_delete", json!({"name": "cvol"})),
        -32602,
        "name: \"cvol\" is a cow bdev, not malloc",
    );
    assert_error(
        &c.call("hotcopy_bdev_delete", json!({"name": "cvol.base"})),
        -32002,
        "bdev \"cvol.base\" was created with \"cvol\"",
    );
    // A batch answers each request; a notification gets no answer.
    let v = c.ask(r#"[{"jsonrpc":"2.0","id":1,"method":"rpc_get_methods"},{"jsonrpc":"2.0","id":2,"method":"nope"},{"jsonrpc":"2.0","method":"rpc_get_methods"}]"#);
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2, "{v}");
    assert!(arr[0]["result"].is_array());
    assert_eq!(arr[1]["error"]["code"], -32601);
    c.send(r#"{"jsonrpc":"2.0","method":"bdev_get_bdevs"}"#);
    let v = c.call("bdev_get_bdevs", json!({"name": "ram"}));
    assert_eq!(
        v["result"][0]["name"], "ram",
        "the notification got no line"
    );
    // A line over the limit is refused and skipped.
    let huge = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"{}\"}}",
        "x".repeat(2 << 20)
    );
    assert_error(&c.ask(&huge), -32600, "request line longer than");
    assert!(c.call("rpc_get_methods", Value::Null)["result"].is_array());
    // A client that goes away mid-request does not disturb the others.
    {
        let mut gone = UnixStream::connect(&sock).unwrap();
        gone.write_all(br#"{"jsonrpc":"2.0","id":1,"meth"#).unwrap();
    }
    // The CLI shows the code and fails.
    let (code, _, err) = hotcopy(&["rpc", "nope", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("method not found") && err.contains("-32601"),
        "{err}"
    );
    let err = fails(&[
        "rpc",
        "rpc_get_methods",
        "--socket",
        d.join("none.sock").to_str().unwrap(),
    ]);
    assert!(err.contains("cannot reach the daemon"), "{err}");
    // A uring file preallocated at creation: written through with zeros, so
    // every block is allocated (without the option it would be sparse).
    let pre = d.join("pre.img");
    assert_eq!(
        c.call(
            "bdev_uring_create",
            json!({"name": "pre", "filename": pre, "size": "4M", "preallocate": true}),
        )["result"],
        "pre"
    );
    let meta = std::fs::metadata(&pre).unwrap();
    assert_eq!(meta.len(), 4 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 >= 4 << 20,
        "{} bytes allocated",
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512
    );
    // Still serving, on a new connection too.
    let mut c2 = Raw::new(&sock);
    assert_eq!(
        c2.call("bdev_malloc_create", json!({"name": "m2", "size": "1M"}))["result"],
        "m2"
    );
    assert_eq!(
        c.call("bdev_malloc_delete", json!({"name": "m2"}))["result"],
        true
    );
    // A second daemon on the same socket refuses to start.
    let err = fails(&["serve", "--rpc-socket", sock.to_str().unwrap()]);
    assert!(err.contains("another daemon is serving"), "{err}");
    serve.stop_ok();
}

#[test]
fn a_bad_config_or_flag_fails_at_start_with_a_clear_message() {
    let dir = scratch("cfg");
    let d = dir.path();
    let bad = d.join("bad.yaml");
    std::fs::write(
        &bad,
        "bdevs:\n  - name: v\n    type: malloc\n    size: 12X\n",
    )
    .unwrap();
    let err = fails(&["serve", "--config", bad.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "{}:4:11: bdevs[0].size: invalid size \"12X\"",
            bad.display()
        )),
        "{err}"
    );
    std::fs::write(
        &bad,
        "bdevs:\n  - {name: v, type: malloc, size: 1M}\nexports:\n  - bdev: w\n",
    )
    .unwrap();
    let err = fails(&["serve", "--config", bad.to_str().unwrap()]);
    assert!(
        err.contains(":4:11: exports[0].bdev: unknown bdev \"w\""),
        "{err}"
    );
    let err = fails(&["serve", "--nbd", "v@10809"]);
    assert!(err.contains("expected HOST:PORT"), "{err}");
    let err = fails(&[
        "serve",
        "--bdev",
        "v=malloc:1M",
        "--nbd",
        "w@127.0.0.1:10809",
        "--rpc-socket",
        d.join("x.sock").to_str().unwrap(),
    ]);
    assert!(err.contains("exports[0].bdev: unknown bdev \"w\""), "{err}");
}

#[test]
fn the_appliance_example_runs_on_a_scratch_directory() {
    let dir = scratch("example");
    let d = dir.path();
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/examples/appliance.yaml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace(
            "/var/tmp/hotcopy-appliance",
            &d.join("work").display().to_string(),
        )
        // Not the well-known port, which tests running at once would share.
        .replace(
            "listen: 127.0.0.1:10809",
            &format!("listen: unix:{}/nbd.sock", d.display()),
        );
    let cfg = d.join("appliance.yaml");
    std::fs::write(&cfg, text).unwrap();
    let sock = d.join("work/rpc.sock");
    let serve = Serve::start(
        &["--config", cfg.to_str().unwrap()],
        &sock,
        &d.join("serve.log"),
    );
    let s = serve.sock().to_string();
    let f = ok_parsed(&rpc_args(&s, "hotcopy_repo_format", &["repo=repo0"]));
    assert_eq!(f["repo"], "repo0");
    let b = backup_wait(&s, "vol0", "repo0", &[]);
    assert_eq!(b["state"], "complete", "{b}");
    serve.stop_ok();
}

/// A free TCP port on 127.0.0.1 (bound and released; the daemon binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The cow volume exported over NBD by `hotcopy serve`: qemu-io and fio's
/// nbd engine write to it, a backup is taken over RPC, qemu-img reads the
/// export back, and after a clean stop the restored generation, the export's
/// content and the source file are the same bytes.
#[test]
fn an_nbd_export_of_a_cow_volume_serves_real_clients_and_backs_up_exactly() {
    let dir = common::scratch("nbd");
    let d = dir.path();
    let src = d.join("src.img");
    let repo = format!("uring:{}@512M", d.join("repo.img").display());
    ok(&["repo", "format", "--repo", &repo]);
    let port = free_port();
    let sock = d.join("rpc.sock");
    let vol = format!("vol=cow:uring:{}@64M", src.display());
    let nbd = format!("vol@127.0.0.1:{port}");
    let serve = Serve::start(
        &[
            "--bdev",
            &vol,
            "--nbd",
            &nbd,
            "--rpc-socket",
            sock.to_str().unwrap(),
        ],
        &sock,
        &d.join("serve.log"),
    );
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    client(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x5a 0 4M", "-c", "flush"],
    );
    let out = client("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x5a 0 4M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    client(
        "fio",
        &[
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=64M",
            "--runtime=2",
            "--time_based",
        ],
    );
    let job = backup_wait(serve.sock(), "vol", &repo, &[]);
    assert_eq!(job["state"], "complete", "{job}");
    let via_nbd = d.join("via-nbd.img");
    nbd_to_file(&uri, &via_nbd);
    serve.stop_ok();
    let restored = d.join("restored.img");
    ok(&common::restore_args(
        &repo,
        "latest",
        &format!("uring:{}@64M", restored.display()),
    ));
    let source = std::fs::read(&src).unwrap();
    assert!(
        std::fs::read(&via_nbd).unwrap() == source,
        "the export's content differs from the file"
    );
    assert!(
        std::fs::read(&restored).unwrap() == source,
        "the backup differs from the source"
    );
}

/// What fio's `verify=crc32c` puts at the head of every 4 KiB block it
/// writes: its offset and its sequence number among the job's writes, which
/// is also its line among the `write` lines of `--write_iolog`. The layout
/// is fio's `struct verify_header` (magic 0xacca, type, len, seed, offset,
/// time, thread, numberio, header crc) followed by the crc32c of the block
/// past byte 44.
struct FioBlock {
    offset: u64,
    numberio: u16,
}

fn fio_block(b: &[u8]) -> Option<FioBlock> {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    if u16_at(0) != 0xacca || u32_at(4) as usize != b.len() {
        return None;
    }
    // fio's crc32c is the Castagnoli CRC without the final inversion.
    let fio_crc = |d: &[u8]| !crc32c::crc32c(d);
    assert_eq!(fio_crc(&b[..36]), u32_at(36), "fio's header checksum");
    // A block fio wrote whole: its data checksum holds (a torn block fails).
    assert_eq!(
        fio_crc(&b[44..]),
        u32_at(40),
        "a block with fio's header but a wrong data checksum: torn or mixed"
    );
    Some(FioBlock {
        offset: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        numberio: u16_at(34),
    })
}

/// Checks that `backup` is the volume at one instant of fio's write stream:
/// there is a cut `c` such that every block holds a write issued before `c`
/// (or its content in `before`, if none was) that no later write before `c`
/// surely overwrote, and no write issued after `c`. fio runs with
/// `serialize_overlap`, so a write to a block is issued only after the
/// earlier writes to that block completed; the bound below still allows two
/// writes to one block fewer than `qd` apart to land in either order (more
/// than fio does, never less). `log` is fio's `--write_iolog`. Returns the cut's bounds
/// (a range of write numbers) and how many blocks hold one of fio's writes.
fn assert_a_cut_of_the_write_stream(
    before: &[u8],
    backup: &[u8],
    log: &str,
    qd: usize,
) -> (usize, usize, usize) {
    const BS: usize = 4096;
    let writes: Vec<u64> = log
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[2] == "write").then(|| f[3].parse().unwrap())
        })
        .collect();
    assert!(
        writes.len() < 65536,
        "fio's numberio is 16 bits: keep the writes fewer"
    );
    let blocks = backup.len() / BS;
    // Each block's writes, in issue order.
    let mut per_block: Vec<Vec<usize>> = vec![Vec::new(); blocks];
    for (i, &off) in writes.iter().enumerate() {
        assert_eq!(off % BS as u64, 0);
        per_block[(off / BS as u64) as usize].push(i);
    }
    let (mut lower, mut upper, mut written) = (0usize, usize::MAX, 0usize);
    for (b, ws) in per_block.iter().enumerate() {
        let got = &backup[b * BS..(b + 1) * BS];
        // The version the backup holds: a write's number, or none.
        let version = match fio_block(got) {
            Some(h) if h.offset == (b * BS) as u64 => {
                let i = h.numberio as usize;
                assert!(
                    ws.contains(&i),
                    "block {b} holds fio write {i}, which the log does not put there"
                );
                written += 1;
                Some(i)
            }
            _ => {
                assert!(
                    got == &before[b * BS..(b + 1) * BS],
                    "block {b} is neither fio's nor the volume's content before the load"
                );
                None
            }
        };
        if let Some(i) = version {
            lower = lower.max(i + 1);
        }
        // The first write to the block that surely landed after its version.
        let next = ws
            .iter()
            .copied()
            .find(|&w| version.is_none_or(|v| w >= v + qd));
        if let Some(n) = next {
            upper = upper.min(n);
        }
    }
    assert!(
        lower <= upper,
        "no single instant: a block holds write {}, yet another misses write {upper}",
        lower - 1
    );
    (lower, upper, written)
}

/// fio (`ioengine=nbd`) writes to the exported cow volume while a backup is
/// started over RPC with a point-in-time view; `nbd_start_disk` exports the
/// view, qemu-img copies it while fio still writes, and the backup runs to
/// completion. Then the generation, restored, equals the view's copy
/// (`qemu-img compare`), and both are one instant of fio's write stream:
/// each block holds the last write issued before one cut (fio's verify
/// headers and its I/O log say which write each block holds).
#[test]
fn a_backup_taken_while_fio_writes_over_nbd_is_the_volume_at_its_consistency_point() {
    let dir = common::scratch("nbd-cut");
    let d = dir.path();
    let src = d.join("src.img");
    make_source(&src, 64, 31);
    let before = std::fs::read(&src).unwrap();
    let repo = format!("uring:{}@256M", d.join("repo.img").display());
    ok(&["repo", "format", "--repo", &repo]);
    let port = free_port();
    let sock = d.join("rpc.sock");
    let vol = format!("vol=cow:uring:{}", src.display());
    let nbd = format!("vol@127.0.0.1:{port}");
    let serve = Serve::start(
        &[
            "--bdev",
            &vol,
            "--nbd",
            &nbd,
            "--rpc-socket",
            sock.to_str().unwrap(),
        ],
        &sock,
        &d.join("serve.log"),
    );
    let s = serve.sock().to_string();
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    let iolog = d.join("fio.iolog");
    // 20 s of 4 KiB random writes at QD 32, rewriting blocks (no random
    // map), paced so that fio's 16-bit write numbers do not wrap (60 000
    // writes). 20 s, not less: on a loaded machine fio can take seconds to
    // get going, and it must still be writing when the backup runs.
    let fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=64M",
            "--norandommap",
            // A write to a block waits until fio's earlier writes to it have
            // completed. Without this, one write stalled in the device while
            // the other 31 slots cycle can be overtaken by a later write to
            // the same block, and land last: legal for a device, but not a
            // cut of the issue order (CI saw it once).
            "--serialize_overlap=1",
            "--randseed=11",
            "--rate_iops=3000",
            "--runtime=20",
            "--time_based",
            "--verify=crc32c",
            "--do_verify=0",
            "--verify_state_save=0",
            &format!("--write_iolog={}", iolog.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio (install fio)");
    // Until fio has written 2000 blocks (it starts slowly on a busy machine).
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut fio = fio;
    loop {
        if let Some(st) = fio.try_wait().unwrap() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(fio.stderr.as_mut().unwrap(), &mut err);
            panic!("fio exited ({st}) before the backup:\n{err}");
        }
        let st = ok_parsed(&rpc_args(&s, "hotcopy_get_stats", &[]));
        if st["exports"]["servers"][0]["bytes_written"]
            .as_u64()
            .unwrap_or(0)
            >= 2000 * 4096
        {
            break;
        }
        assert!(Instant::now() < deadline, "fio did not write: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The backup, paced so that it is still running while the view is read.
    let started = ok_parsed(&rpc_args(
        &s,
        "hotcopy_backup_start",
        &[
            "volume=vol",
            &format!("repo={repo}"),
            "rate=16M",
            "view=vol.t0",
        ],
    ));
    assert_eq!(started["views"], json!(["vol.t0"]), "{started}");
    let disk = ok_parsed(&rpc_args(
        &s,
        "nbd_start_disk",
        &["bdev_name=vol.t0", "read_only=true"],
    ));
    assert_eq!(
        disk["uri"],
        format!("nbd://127.0.0.1:{port}/vol.t0"),
        "{disk}"
    );
    // A writable export of a view is refused with a reason.
    let (code, _, refused) = hotcopy(&rpc_args(
        &s,
        "nbd_start_disk",
        &["bdev_name=vol.t0", "name=rw"],
    ));
    assert_eq!(code, 1, "{refused}");
    assert!(refused.contains("export it read-only"), "{refused}");
    let t0 = d.join("t0.img");
    nbd_to_file(disk["uri"].as_str().unwrap(), &t0);
    let status = ok_parsed(&rpc_args(&s, "hotcopy_backup_status", &["volume=vol"]));
    assert_eq!(
        status["state"], "running",
        "the view must be read while the backup runs (slow the backup): {status}"
    );
    // Completed over RPC, while fio still writes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let v = ok_parsed(&rpc_args(&s, "hotcopy_backup_status", &["volume=vol"]));
        if v["state"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "the backup did not end: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(job["state"], "complete", "{job}");
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The view went with its job, and its export with it.
    std::thread::sleep(Duration::from_millis(300));
    let disks = ok_parsed(&rpc_args(&s, "nbd_get_disks", &[]));
    assert_eq!(disks.as_array().unwrap().len(), 1, "{disks}");
    assert_eq!(disks[0]["name"], "vol", "{disks}");
    let (code, _, gone) = hotcopy(&rpc_args(&s, "bdev_get_bdevs", &["name=vol.t0"]));
    assert_eq!(code, 1, "{gone}");
    assert!(gone.contains("vol.t0"), "{gone}");
    serve.stop_ok();
    let restored = d.join("restored.img");
    ok(&common::restore_args(
        &repo,
        &job["generation"].to_string(),
        &format!("uring:{}@64M", restored.display()),
    ));
    client(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            t0.to_str().unwrap(),
            restored.to_str().unwrap(),
        ],
    );
    let backup = std::fs::read(&restored).unwrap();
    let log = std::fs::read_to_string(&iolog).unwrap();
    let (lower, upper, written) = assert_a_cut_of_the_write_stream(&before, &backup, &log, 32);
    let total = log.lines().filter(|l| l.contains(" write ")).count();
    // The cut fell inside the load: fio had written before it and went on after.
    assert!(written > 1000, "{written} blocks by fio in the backup");
    assert!(
        lower > 1000 && upper < total,
        "cut {lower}..={upper} of {total} writes"
    );
    // And the volume now differs from the backup (fio went on writing).
    assert!(std::fs::read(&src).unwrap() != backup);
}

/// NBD exports come and go at run time: `nbd_start_disk` on a Unix socket
/// and on TCP, served to qemu-io and listed by nbdinfo and `nbd_get_disks`;
/// a bdev exported cannot be deleted; `nbd_stop_disk` closes the export
/// (the socket goes with the last export on it); bad requests name what is
/// wrong and change nothing.
#[test]
fn nbd_exports_are_started_and_stopped_over_rpc() {
    let dir = scratch("nbd-rt");
    let d = dir.path();
    let sock = d.join("s.sock");
    let serve = Serve::start(
        &[
            "--bdev",
            "ram=malloc:8M",
            "--bdev",
            "two=malloc:4M",
            "--rpc-socket",
            sock.to_str().unwrap(),
        ],
        &sock,
        &d.join("serve.log"),
    );
    let mut c = Raw::new(&sock);
    let nbd_sock = d.join("nbd.sock");
    let listen = format!("unix:{}", nbd_sock.display());
    let r = c.call(
        "nbd_start_disk",
        json!({"bdev_name": "ram", "listen": listen}),
    );
    let disk = &r["result"];
    assert_eq!(disk["name"], "ram", "{r}");
    let uri = disk["uri"].as_str().unwrap().to_string();
    assert_eq!(
        uri,
        format!("nbd+unix:///ram?socket={}", nbd_sock.display())
    );
    client(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x3c 1M 64k"],
    );
    let out = client("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x3c 1M 64k"]);
    assert!(!out.contains("verification failed"), "{out}");
    let info = client("nbdinfo", &["--json", &uri]);
    assert!(info.contains("8388608"), "{info}");
    // A second export on TCP, read-only, under another name.
    let port = free_port();
    let r = c.call(
        "nbd_start_disk",
        json!({"bdev_name": "two", "name": "second", "listen": format!("127.0.0.1:{port}"), "read_only": true}),
    );
    assert_eq!(
        r["result"]["uri"],
        format!("nbd://127.0.0.1:{port}/second"),
        "{r}"
    );
    let (code, _, err) = hotcopy(&[
        "rpc",
        "bdev_malloc_delete",
        "-p",
        "name=ram",
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exported"), "{err}");
    // Bad requests name what is wrong and change nothing.
    assert_error(
        &c.call("nbd_start_disk", json!({"bdev_name": "nope"})),
        -32001,
        "export \"nope\"",
    );
    assert_error(
        &c.call(
            "nbd_start_disk",
            json!({"bdev_name": "two", "name": "ram", "listen": listen}),
        ),
        -32003,
        "an export named \"ram\" exists",
    );
    assert_error(
        &c.call(
            "nbd_start_disk",
            json!({"bdev_name": "two", "listen": "10809"}),
        ),
        -32602,
        "listen: invalid listen address",
    );
    assert_error(
        &c.call("nbd_start_disk", json!({"bdev_name": "two", "bogus": 1})),
        -32602,
        "bogus: unknown parameter",
    );
    assert_error(
        &c.call("nbd_stop_disk", json!({"name": "nope"})),
        -32001,
        "no NBD export named \"nope\"",
    );
    let disks = c.call("nbd_get_disks", Value::Null);
    assert_eq!(disks["result"].as_array().unwrap().len(), 2, "{disks}");
    // Stopped: the Unix socket goes with its last export; the TCP one stays.
    assert_eq!(
        c.call("nbd_stop_disk", json!({"name": "ram"}))["result"],
        true
    );
    assert!(
        !nbd_sock.exists(),
        "the NBD socket outlived its last export"
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read 0 4k"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a stopped export still served");
    let disks = c.call("nbd_get_disks", Value::Null);
    assert_eq!(disks["result"][0]["name"], "second", "{disks}");
    // Now deletable; and save_config keeps the export that remains.
    assert_eq!(
        c.call("bdev_malloc_delete", json!({"name": "ram"}))["result"],
        true
    );
    let cfg = c.call("save_config", Value::Null);
    assert_eq!(cfg["result"]["exports"][0]["name"], "second", "{cfg}");
    serve.stop_ok();
}

/// Runs qemu-io on `uri` with `cmds`; it must succeed without a failed
/// command.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    let text = client("qemu-io", &args);
    assert!(!text.contains("failed"), "qemu-io {args:?}:\n{text}");
    text
}

/// The `io` section of bdev `name` in `stats`.
fn io_of<'a>(stats: &'a Value, name: &str) -> &'a Value {
    let b = stats["bdevs"]
        .as_array()
        .expect("bdevs")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bdev {name} in {stats}"));
    &b["io"]
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `count` I/Os measured, with 0 < p50 <= p90 <= p99 <= p99.9 <= max and
/// 0 < mean <= max.
#[track_caller]
fn assert_latency(l: &Value, count: u64) {
    assert_eq!(u(&l["count"]), count, "{l}");
    let p: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|k| f(&l[*k]))
        .collect();
    assert!(p[0] > 0.0, "{l}");
    assert!(
        p.windows(2).all(|w| w[0] <= w[1]),
        "percentiles out of order: {l}"
    );
    let mean = f(&l["mean"]);
    assert!(mean > 0.0 && mean <= p[4], "{l}");
}

/// `hotcopy_get_stats` of a real `hotcopy serve`: every bdev's `io` section
/// (counters by type, bytes, errors, read and write latency percentiles)
/// reflects the I/O that qemu-io sent to an NBD export of a cow volume, at
/// the volume and at its base; `bdev_get_iostat` shows the same and
/// `bdev_reset_iostat` starts them anew.
#[test]
fn get_stats_shows_each_bdevs_io_counters_and_latency_percentiles() {
    const WRITES: u64 = 24;
    const READS: u64 = 9;
    let dir = common::scratch("stats");
    let d = dir.path();
    let port = free_port();
    let sock = d.join("rpc.sock");
    let nbd = format!("vol@127.0.0.1:{port}");
    let serve = Serve::start(
        &[
            "--bdev",
            "vol=cow:malloc:64M",
            "--nbd",
            &nbd,
            "--rpc-socket",
            sock.to_str().unwrap(),
        ],
        &sock,
        &d.join("serve.log"),
    );

    // Nothing has done I/O yet: every figure is there, and zero.
    let before = ok_parsed(&rpc_args(serve.sock(), "hotcopy_get_stats", &[]));
    for name in ["vol", "vol.base"] {
        let io = io_of(&before, name);
        assert_eq!(u(&io["ops"]["write"]) + u(&io["ops"]["read"]), 0, "{io}");
        assert_eq!(u(&io["errors"]["write"]), 0, "{io}");
        assert_eq!(u(&io["latency_us"]["write"]["count"]), 0, "{io}");
        assert!(io["latency_us"]["write"]["p99"].is_null(), "{io}");
    }

    // 4 KiB writes at distinct offsets, reads of some of them, a flush, a
    // trim and a write of zeroes: one NBD command, so one bdev I/O, each
    // (qemu-io may add flushes of its own).
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    let mut cmds: Vec<String> = (0..WRITES)
        .map(|i| format!("write -P 0x{:02x} {} 4k", 0x10 + i, i * 65536))
        .collect();
    cmds.extend((0..READS).map(|i| format!("read -P 0x{:02x} {} 4k", 0x10 + i, i * 65536)));
    cmds.extend(["flush", "discard 32M 64k", "write -z 48M 64k"].map(String::from));
    let out = qemu_io(&uri, &cmds);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let after = ok_parsed(&rpc_args(serve.sock(), "hotcopy_get_stats", &[]));
    for name in ["vol", "vol.base"] {
        let io = io_of(&after, name);
        assert_eq!(u(&io["ops"]["write"]), WRITES, "{name}: {io}");
        assert_eq!(u(&io["ops"]["read"]), READS, "{name}: {io}");
        assert!(u(&io["ops"]["flush"]) >= 1, "{name}: {io}");
        assert_eq!(u(&io["bytes_written"]), WRITES * 4096, "{name}: {io}");
        assert_eq!(u(&io["bytes_read"]), READS * 4096, "{name}: {io}");
        assert_eq!(u(&io["ops"]["unmap"]), 1, "{name}: {io}");
        assert_eq!(u(&io["ops"]["write_zeroes"]), 1, "{name}: {io}");
        for t in ["read", "write", "flush", "unmap", "write_zeroes"] {
            assert_eq!(u(&io["errors"][t]), 0, "{name}: {io}");
        }
        assert_latency(&io["latency_us"]["write"], WRITES);
        assert_latency(&io["latency_us"]["read"], READS);
    }
    // The cow volume's time for each I/O contains its base's.
    let (vol, base) = (io_of(&after, "vol"), io_of(&after, "vol.base"));
    for t in ["read", "write"] {
        for k in ["max", "mean"] {
            assert!(
                f(&vol["latency_us"][t][k]) >= f(&base["latency_us"][t][k]),
                "{t} {k}: vol {vol} base {base}"
            );
        }
    }

    // The daemon's other figures are still there.
    assert!(after["jobs"].is_array(), "{after}");
    // SPDK's method shows the same figures; a reset starts them anew.
    let io = ok_parsed(&rpc_args(serve.sock(), "bdev_get_iostat", &["name=vol"]));
    assert_eq!(io["bdevs"][0]["name"], "vol", "{io}");
    assert_eq!(u(&io["bdevs"][0]["ops"]["write"]), WRITES, "{io}");
    ok(&rpc_args(serve.sock(), "bdev_reset_iostat", &[]));
    let io = ok_parsed(&rpc_args(serve.sock(), "bdev_get_iostat", &[]));
    for b in io["bdevs"].as_array().unwrap() {
        assert_eq!(u(&b["ops"]["write"]) + u(&b["ops"]["read"]), 0, "{b}");
        assert_eq!(u(&b["latency_us"]["write"]["count"]), 0, "{b}");
    }
    let (code, _, err) = hotcopy(&rpc_args(serve.sock(), "bdev_get_iostat", &["name=nope"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nope"), "{err}");
    serve.stop_ok();
}

/// `hotcopy repo …` with `--rpc-socket`: every command through a running
/// daemon whose bdev holds the repository, with the same output as offline
/// (checked against the offline commands once the daemon has stopped), a
/// restore compared byte for byte, mounts served over NBD to qemu-img and
/// qemu-io (a writable one whose writes reach neither the repository nor
/// the source) and unmounted, and the daemon's errors carried through.
#[test]
fn repo_commands_run_through_the_daemon() {
    let dir = scratch("repo-via");
    let d = dir.path();
    let src = d.join("src.img");
    make_source(&src, 32, 41);
    let source = std::fs::read(&src).unwrap();
    let repo_file = d.join("repo.img");
    let sock = d.join("rpc.sock");
    let port = free_port();
    let vol = format!("vol=cow:uring:{}", src.display());
    let repo_bdev = format!("repo=uring:{}@256M", repo_file.display());
    let serve = Serve::start(
        &[
            "--bdev",
            &vol,
            "--bdev",
            &repo_bdev,
            "--rpc-socket",
            sock.to_str().unwrap(),
        ],
        &sock,
        &d.join("serve.log"),
    );
    let s = serve.sock().to_string();
    let via = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        v.extend(["--rpc-socket".into(), s.clone()]);
        v
    };
    let run_ok = |args: &[&str]| ok(&via(args).iter().map(String::as_str).collect::<Vec<_>>());
    let run_json = |args: &[&str]| -> Value {
        let out = run_ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    let run_fails =
        |args: &[&str]| fails(&via(args).iter().map(String::as_str).collect::<Vec<_>>());

    // format, and a second format refused with the CLI's advice.
    let out = run_ok(&["repo", "format", "--repo", "repo"]);
    assert!(out.starts_with("formatted repo: repository "), "{out}");
    let err = run_fails(&["repo", "format", "--repo", "repo"]);
    assert!(
        err.contains("refusing to format") && err.contains("add --force"),
        "{err}"
    );
    // Two generations: a full and an incremental that shares every chunk.
    assert_eq!(backup_wait(&s, "vol", "repo", &[])["state"], "complete");
    assert_eq!(
        backup_wait(&s, "vol", "repo", &["--incremental"])["state"],
        "complete"
    );

    // list, info, verify: JSON and tables.
    let list = run_json(&["repo", "list", "--repo", "repo", "--json"]);
    assert_eq!(list["repo"], "repo", "{list}");
    let gens = list["generations"].as_array().unwrap().clone();
    assert_eq!(gens.len(), 2, "{list}");
    assert_eq!(gens[0]["kind"], "full");
    assert_eq!(gens[1]["kind"], "incremental");
    assert_eq!(gens[1]["parent"], gens[0]["id"]);
    let (g1, g2) = (
        gens[0]["id"].as_u64().unwrap(),
        gens[1]["id"].as_u64().unwrap(),
    );
    let table = run_ok(&["repo", "list", "--repo", "repo"]);
    assert!(
        table.contains("2 generations") && table.contains("CONSISTENCY POINT (UTC)"),
        "{table}"
    );
    let info = run_json(&[
        "repo",
        "info",
        "--repo",
        "repo",
        "--generation",
        &g2.to_string(),
        "--json",
    ]);
    assert_eq!(info["generation_count"], 2, "{info}");
    assert_eq!(info["generation"]["id"], g2, "{info}");
    assert!(
        info["generation"]["data_from"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["generation"] == g1),
        "the incremental's data comes from the full: {info}"
    );
    let text = run_ok(&[
        "repo",
        "info",
        "--repo",
        "repo",
        "--generation",
        &g2.to_string(),
    ]);
    assert!(
        text.contains("data from") && text.contains("incremental"),
        "{text}"
    );
    let v = run_json(&["repo", "verify", "--repo", "repo", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        v["generations"][0]["source"], gens[0]["source"]["name"],
        "{v}"
    );
    let text = run_ok(&["repo", "verify", "--repo", "repo"]);
    assert!(text.contains("verify: OK: 2 generations"), "{text}");
    let err = run_fails(&["repo", "verify", "--repo", "repo", "--generation", "99"]);
    assert!(
        err.contains("hotcopy_repo_verify") && err.contains("no generation 99"),
        "{err}"
    );

    // restore to a file, byte for byte.
    let restored = d.join("restored.img");
    let r = run_json(&[
        "repo",
        "restore",
        "--repo",
        "repo",
        "--generation",
        &g1.to_string(),
        "--to",
        &format!("uring:{}@32M", restored.display()),
        "--json",
    ]);
    assert_eq!(r["generation"], g1, "{r}");
    assert_eq!(r["bytes_written"], source.len() as u64, "{r}");
    assert!(
        std::fs::read(&restored).unwrap() == source,
        "restored bytes differ"
    );

    // mount read-only and writable; the daemon serves both over NBD.
    let nbd = format!("127.0.0.1:{port}");
    let m = run_json(&[
        "repo",
        "mount",
        "--repo",
        "repo",
        "--generation",
        "latest",
        "--name",
        "g2",
        "--nbd",
        &nbd,
        "--json",
    ]);
    assert_eq!(m["generation"], g2, "{m}");
    assert_eq!(m["writable"], false, "{m}");
    let uri = m["uri"].as_str().unwrap().to_string();
    assert_eq!(uri, format!("nbd://{nbd}/g2"));
    let via_nbd = d.join("via-nbd.img");
    nbd_to_file(&uri, &via_nbd);
    assert!(
        std::fs::read(&via_nbd).unwrap() == source,
        "the mount differs"
    );
    let m = run_json(&[
        "repo",
        "mount",
        "--repo",
        "repo",
        "--generation",
        &g1.to_string(),
        "--writable",
        "--name",
        "g1w",
        "--json",
    ]);
    assert_eq!(m["writable"], true, "{m}");
    // Without --nbd: the address of the daemon's first export.
    let wuri = m["uri"].as_str().unwrap().to_string();
    assert_eq!(wuri, format!("nbd://{nbd}/g1w"));
    client(
        "qemu-io",
        &[
            "-f",
            "raw",
            &wuri,
            "-c",
            "write -P 0xa5 1M 2M",
            "-c",
            "flush",
        ],
    );
    let out = client("qemu-io", &["-f", "raw", &wuri, "-c", "read -P 0xa5 1M 2M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let bdevs = ok_parsed(&rpc_args(&s, "bdev_get_bdevs", &[]));
    assert!(
        bdevs
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == "g1w.overlay"),
        "the RAM overlay: {bdevs}"
    );
    // A repository read by mounts has no writer.
    let err = run_fails(&["repo", "prune", "--repo", "repo", "--keep", "1"]);
    assert!(
        err.contains("hotcopy_repo_prune") && err.contains("g1w"),
        "{err}"
    );
    for name in ["g2", "g1w"] {
        let out = run_ok(&["repo", "unmount", "--name", name]);
        assert!(out.contains("export stopped, snapshot deleted"), "{out}");
    }
    let disks = ok_parsed(&rpc_args(&s, "nbd_get_disks", &[]));
    assert_eq!(disks, json!([]), "{disks}");
    let bdevs = ok_parsed(&rpc_args(&s, "bdev_get_bdevs", &[]));
    for b in bdevs.as_array().unwrap() {
        assert!(
            !["g2", "g1w", "g1w.overlay"].contains(&b["name"].as_str().unwrap()),
            "{b} left behind"
        );
    }
    let err = run_fails(&["repo", "unmount", "--name", "g2"]);
    assert!(err.contains("hotcopy_snapshot_delete"), "{err}");

    // The writes went to the overlay: the generation is as it was.
    let v = run_json(&["repo", "verify", "--repo", "repo", "--json"]);
    assert_eq!(v["ok"], true, "{v}");

    // prune, through the daemon.
    let p = run_json(&["repo", "prune", "--repo", "repo", "--keep", "1", "--json"]);
    assert_eq!(p["removed"], json!([g1]), "{p}");
    assert_eq!(p["removed_generations"][0]["kind"], "full", "{p}");
    let text = run_ok(&["repo", "prune", "--repo", "repo", "--keep", "1"]);
    assert!(text.starts_with("nothing to remove"), "{text}");
    let after = run_json(&["repo", "list", "--repo", "repo", "--json"]);
    serve.stop_ok();

    // Offline, on the same file: the same generations, field for field.
    let spec = format!("uring:{}", repo_file.display());
    let off = common::ok_json(&["repo", "list", "--repo", &spec]);
    assert_eq!(off["generations"], after["generations"], "{off}\n{after}");
    assert_eq!(off["uuid"], after["uuid"]);
    let restored2 = d.join("restored2.img");
    ok(&common::restore_args(
        &spec,
        "latest",
        &format!("uring:{}@32M", restored2.display()),
    ));
    assert!(
        std::fs::read(&restored2).unwrap() == source,
        "offline restore differs"
    );
    // unmount needs a daemon.
    let err = fails(&["repo", "unmount", "--name", "g2"]);
    assert!(err.contains("--rpc-socket"), "{err}");
}

/// Names of the daemon's bdevs.
fn bdev_names(c: &mut Raw) -> Vec<String> {
    let v = c.call("bdev_get_bdevs", json!({}));
    v["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_damaged_generation_fails_restore_snapshot_and_instant_restore_and_leaves_nothing_behind() {
    use hotcopy_cow::repo::{ChunkLoc, GenSpec, MemIo, Repo, SourceIdent};
    const CS: u32 = 64 << 10;
    const SIZE: usize = 1 << 20;
    let dir = scratch("damaged");
    let d = dir.path();
    // Three full generations of different data, written with the library:
    // 2's index and 3's chunk 5 are then damaged on the file.
    let mut ns = MemIo::new(16 << 20, 512);
    let mut repo = Repo::format(&mut ns, false).unwrap();
    let now = hotcopy_cow::repo::now_us();
    let mut versions = Vec::new();
    for seed in 1..=3u64 {
        let p = d.join(format!("v{seed}.img"));
        common::make_source(&p, 1, seed, 1000, 999);
        let mut data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), SIZE);
        let spec = GenSpec {
            source: SourceIdent {
                name: "vol".into(),
                size_bytes: SIZE as u64,
            },
            chunk_size: CS,
            parent: None,
            compare_with_parent: false,
        };
        let w = repo.begin(&mut ns, &spec).unwrap();
        let chunks = (SIZE / CS as usize) as u64;
        w.write_run(&mut ns, 0, chunks, &mut data).unwrap();
        let g = repo.commit(&mut ns, w, now).unwrap();
        assert_eq!(g.id, seed);
        versions.push(std::fs::read(&p).unwrap());
    }
    let index2 = repo.generation(2).unwrap().index.unwrap().offset;
    let chunk5 = match repo.index(&mut ns, 3).unwrap().resolve(5).unwrap().loc {
        ChunkLoc::Data(at) => at,
        other => panic!("chunk 5 of generation 3 is {other:?}"),
    };
    let mut img = ns.data.clone();
    img[index2 as usize + 16 + 5 * 16 + 3] ^= 1;
    img[chunk5 as usize + 100] ^= 0x20;
    let repo_file = d.join("repo.img");
    std::fs::write(&repo_file, &img).unwrap();

    let sock = d.join("rpc.sock");
    let repo_bdev = format!("repo=uring:{}", repo_file.display());
    let serve = Serve::start(
        &["--bdev", &repo_bdev, "--rpc-socket", sock.to_str().unwrap()],
        &sock,
        &d.join("serve.log"),
    );
    let mut c = Raw::new(&sock);
    let before = bdev_names(&mut c);
    let dst = d.join("dst.img");
    let to = format!("uring:{}@1M", dst.display());
    let target = format!("uring:{}@1M", d.join("target.img").display());

    // The damaged index: each fails naming the generation, as the full
    // open reported it, and nothing is left registered.
    let damaged = "generation 2 is damaged: index block 0";
    for gen in [json!(2), json!("latest")] {
        let v = c.call(
            "hotcopy_repo_restore",
            json!({"repo": "repo", "generation": gen, "to": to}),
        );
        if gen == json!(2) {
            assert_error(&v, -32004, damaged);
        } else {
            // latest is 3: its index is whole, its chunk 5 is not.
            assert_error(&v, -32004, "restore of generation 3: chunk 5");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains("crc32c"), "{v}");
        }
        assert_eq!(bdev_names(&mut c), before, "after {gen}");
    }
    let v = c.call(
        "hotcopy_snapshot_create",
        json!({"name": "s2", "repo": "repo", "generation": 2, "writable": true}),
    );
    assert_error(&v, -32004, damaged);
    let v = c.call(
        "hotcopy_instant_restore_start",
        json!({"name": "i2", "repo": "repo", "generation": 2, "target": target}),
    );
    assert_error(&v, -32004, damaged);
    assert_eq!(bdev_names(&mut c), before);
    let v = c.call("hotcopy_instant_restore_status", json!({}));
    assert_eq!(v["result"]["restores"], json!([]), "{v}");
    // The index of a generation that does not exist is not damage.
    let v = c.call(
        "hotcopy_repo_restore",
        json!({"repo": "repo", "generation": 9, "to": to}),
    );
    assert_error(&v, -32001, "generation: no generation 9 in repository repo");

    // The same destination, target and names then work for generation 1.
    let v = c.call(
        "hotcopy_repo_restore",
        json!({"repo": "repo", "generation": 1, "to": to}),
    );
    assert_eq!(v["result"]["generation"], 1, "{v}");
    assert!(
        std::fs::read(&dst).unwrap() == versions[0],
        "generation 1 restored differs"
    );
    let v = c.call(
        "hotcopy_snapshot_create",
        json!({"name": "s2", "repo": "repo", "generation": 1, "writable": true}),
    );
    assert_eq!(v["result"]["generation"], 1, "{v}");
    let v = c.call("hotcopy_snapshot_delete", json!({"name": "s2"}));
    assert!(v["error"].is_null(), "{v}");
    let v = c.call(
        "hotcopy_instant_restore_start",
        json!({"name": "i2", "repo": "repo", "generation": 1, "target": target}),
    );
    assert!(v["error"].is_null(), "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.call("hotcopy_instant_restore_status", json!({"name": "i2"}));
        let state = v["result"]["state"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"));
        if state == "complete" {
            break;
        }
        assert_eq!(state, "running", "{v}");
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = c.call("hotcopy_bdev_delete", json!({"name": "i2"}));
    assert!(v["error"].is_null(), "{v}");
    assert!(
        std::fs::read(d.join("target.img")).unwrap() == versions[0],
        "generation 1 hydrated differs"
    );
    assert_eq!(bdev_names(&mut c), before);
    serve.stop_ok();
}
