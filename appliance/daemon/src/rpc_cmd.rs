//! Clients of a running daemon: `hotcopy rpc METHOD [--param k=v ...]`, and
//! `hotcopy backup start|status|cancel` (the friendly forms of the
//! `hotcopy_backup_*` methods). `hotcopy backup run`, the offline one-shot
//! backup, is `backup_cmd`'s; [`BackupCmd`] carries both.
//!
//! The protocol is the daemon's: one JSON-RPC 2.0 request per line on its
//! Unix socket, one response line back (see `serve::rpc`).
//!
//! Exit status: 0 when the method succeeded (for `backup start --wait`, when
//! the backup completed), 1 when the daemon answered with an error (the
//! message and code on stderr) or the backup did not complete, 2 when the
//! daemon could not be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use hotcopy_config::ByteSize;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

/// `hotcopy backup`: offline (`run`) and through a daemon (`start`, `status`, `cancel`).
#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    #[command(flatten)]
    Offline(crate::backup_cmd::BackupSub),
    /// Start an online backup of a cow volume served by a running daemon.
    Start(StartArgs),
    /// Show the state of a daemon's backup job (the newest, or the volume's).
    Status(StatusArgs),
    /// Cancel a daemon's running backup (its unfinished generation is removed).
    Cancel(CancelArgs),
}

/// The daemon's socket, from `--rpc-socket`, `HOTCOPY_RPC_SOCKET`, or the default.
#[derive(Args, Debug, Clone)]
pub struct SocketArg {
    /// The daemon's JSON-RPC socket.
    #[arg(long = "rpc-socket", visible_alias = "socket", env = "HOTCOPY_RPC_SOCKET", default_value = hotcopy_config::DEFAULT_RPC_SOCKET)]
    pub rpc_socket: PathBuf,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Each --param KEY=VALUE sets one parameter. VALUE is JSON when it parses as JSON
(numbers, true/false, null, \"quoted strings\", [arrays], {objects}), else a string:
  hotcopy rpc bdev_malloc_create --param name=ram0 --param size=64M
  hotcopy rpc hotcopy_repo_list --param repo=uring:/var/tmp/repo.img
  hotcopy rpc save_config --param format=yaml > running.yaml
The result is printed as JSON (a string result as plain text). `rpc_get_methods`
lists the methods.")]
pub struct RpcArgs {
    /// The method, e.g. bdev_get_bdevs.
    pub method: String,
    /// A parameter, KEY=VALUE (repeat).
    #[arg(long = "param", short = 'p', value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// All parameters as one JSON object (merged under --param).
    #[arg(long = "params-json", value_name = "JSON")]
    pub params_json: Option<String>,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// The cow bdev to back up.
    #[arg(long)]
    pub volume: String,
    /// The repository: a bdev of the daemon, or a spec (uring:/var/tmp/repo.img).
    #[arg(long)]
    pub repo: String,
    /// Store only what changed since the newest complete generation of the volume.
    #[arg(long)]
    pub incremental: bool,
    /// Limit the copy stream to this many bytes per second (100M, 1G, ...).
    #[arg(long, value_name = "BYTES_PER_S")]
    pub rate: Option<ByteSize>,
    /// The backup's progress guarantee: the least share of time (0..1) its
    /// streams keep a chunk in flight however loaded the hosts are (daemon
    /// default 0.25). Raise it to finish sooner under a saturating load.
    #[arg(long, value_name = "SHARE")]
    pub min_share: Option<f64>,
    /// Hosts' latency, relative to its level without a backup, above which
    /// the backup streams back off (daemon default 1.1).
    #[arg(long, value_name = "FACTOR")]
    pub tolerance: Option<f64>,
    /// Back up only these byte ranges (START+LEN,...).
    #[arg(long)]
    pub include: Option<String>,
    /// Leave these byte ranges out (START+LEN,...).
    #[arg(long)]
    pub exclude: Option<String>,
    /// The source's name in the repository (default: the volume's).
    #[arg(long)]
    pub name: Option<String>,
    /// Also create a point-in-time view of the job: a read-only bdev NAME
    /// showing the volume as it was at the consistency point, which
    /// `nbd_start_disk` can export while the job runs (it goes when the job
    /// ends).
    #[arg(long, value_name = "NAME")]
    pub view: Option<String>,
    /// Show progress and return when the job ends.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON (with --wait, the final status).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// The volume whose newest job to show (default: the newest job of any volume).
    #[arg(long)]
    pub volume: Option<String>,
    /// Print the job's status as JSON (`state`: running, complete, failed, cancelled).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// The volume whose running backup to cancel (default: the only one running).
    #[arg(long)]
    pub volume: Option<String>,
    /// Print the job's final status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// An error the daemon answered with.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    path: PathBuf,
}

impl Client {
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        let s = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot reach the daemon at {} (is `hotcopy serve` running? --rpc-socket names its socket)",
                path.display()
            )
        })?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            next_id: 1,
            path: path.to_path_buf(),
        })
    }

    /// Calls `method`; the outer error is the connection's, the inner the daemon's.
    pub fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Result<Value, RpcError>> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let lost = || {
            format!(
                "the daemon at {} closed the connection",
                self.path.display()
            )
        };
        writeln!(self.writer, "{req}").with_context(lost)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).with_context(lost)? == 0 {
            return Err(anyhow!(lost()));
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("the daemon's answer is not JSON: {line:?}"))?;
        if v["id"] != json!(id) {
            return Err(anyhow!("the daemon answered another request: {line}"));
        }
        if let Some(e) = v.get("error") {
            return Ok(Err(RpcError {
                code: e["code"].as_i64().unwrap_or(0),
                message: e["message"].as_str().unwrap_or("").to_string(),
            }));
        }
        Ok(Ok(v.get("result").cloned().unwrap_or(Value::Null)))
    }
}

/// `KEY=VALUE`: VALUE as JSON when it parses, else a string.
pub fn parse_param(s: &str) -> anyhow::Result<(String, Value)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--param {s:?}: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(anyhow!("--param {s:?}: the key is empty"));
    }
    let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

fn fail(method: &str, e: &RpcError) -> ExitCode {
    eprintln!(
        "hotcopy: {method} failed: {} (JSON-RPC error {})",
        e.message, e.code
    );
    ExitCode::from(1)
}

pub fn run_rpc(a: RpcArgs) -> anyhow::Result<ExitCode> {
    let mut params = match &a.params_json {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text)
            .with_context(|| format!("--params-json {text:?}"))?
        {
            Value::Object(m) => m,
            _ => return Err(anyhow!("--params-json: expected a JSON object")),
        },
    };
    for p in &a.params {
        let (k, v) = parse_param(p)?;
        params.insert(k, v);
    }
    let params = if params.is_empty() {
        Value::Null
    } else {
        Value::Object(params)
    };
    let mut c = Client::connect(&a.socket.rpc_socket)?;
    match c.call(&a.method, params)? {
        Ok(Value::String(s)) => {
            print!("{s}");
            if !s.ends_with('\n') {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(fail(&a.method, &e)),
    }
}

pub fn run_backup(cmd: BackupCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BackupCmd::Offline(sub) => crate::backup_cmd::run(sub),
        BackupCmd::Start(a) => start(a),
        BackupCmd::Status(a) => status(a),
        BackupCmd::Cancel(a) => cancel(a),
    }
}

fn pct(v: &Value) -> f64 {
    100.0 * v["progress"].as_f64().unwrap_or(0.0)
}

/// One line about a job.
fn describe(v: &Value) -> String {
    let kind = match (v["kind"].as_str(), v["parent"].as_u64()) {
        (Some("incremental"), Some(p)) => format!(
            "incremental from {p}, by {}",
            v["method"].as_str().unwrap_or("?")
        ),
        (Some(k), _) => k.to_string(),
        _ => "?".into(),
    };
    let mut s = format!(
        "job {} of {} into {}: generation {} ({kind}): {}",
        v["job"],
        v["volume"].as_str().unwrap_or("?"),
        v["repo"].as_str().unwrap_or("?"),
        v["generation"],
        v["state"].as_str().unwrap_or("?"),
    );
    match v["state"].as_str() {
        Some("running") => s.push_str(&format!(
            ", {:.0}% ({}/{} chunks), {:.0} MiB/s, container {}/{}",
            pct(v),
            v["chunks_done"],
            v["chunks_in_scope"],
            v["backup_mibps"].as_f64().unwrap_or(0.0),
            v["container_used"],
            v["container_slots"],
        )),
        Some("complete") => s.push_str(&format!(
            ", {} chunks in {:.1} s, {:.0} MiB/s, freeze {:.0} µs",
            v["chunks_done"],
            v["elapsed_s"].as_f64().unwrap_or(0.0),
            v["backup_mibps"].as_f64().unwrap_or(0.0),
            v["freeze_us"].as_f64().unwrap_or(0.0),
        )),
        _ => {
            if let Some(e) = v["error"].as_str() {
                s.push_str(&format!(": {e}"));
            }
        }
    }
    s
}

fn start(a: StartArgs) -> anyhow::Result<ExitCode> {
    let mut params = json!({
        "volume": a.volume,
        "repo": a.repo,
        "incremental": a.incremental,
    });
    if let Some(x) = a.min_share {
        params["min_share"] = json!(x);
    }
    if let Some(x) = a.tolerance {
        params["tolerance"] = json!(x);
    }
    if let Some(r) = a.rate {
        params["rate"] = json!(r.0);
    }
    if let Some(i) = &a.include {
        params["include"] = json!(i);
    }
    if let Some(e) = &a.exclude {
        params["exclude"] = json!(e);
    }
    if let Some(n) = &a.name {
        params["name"] = json!(n);
    }
    if let Some(v) = &a.view {
        params["view"] = json!(v);
    }
    let mut c = Client::connect(&a.socket.rpc_socket)?;
    let started = match c.call("hotcopy_backup_start", params)? {
        Ok(v) => v,
        Err(e) => return Ok(fail("hotcopy_backup_start", &e)),
    };
    if let (Some(n), false) = (started["note"].as_str(), a.json) {
        eprintln!("hotcopy: {n}");
    }
    if !a.wait {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!("started {}", describe(&started));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = started["job"].clone();
    let bar = (!a.json).then(|| {
        let b = ProgressBar::new(100);
        b.set_style(
            ProgressStyle::with_template("backup {bar:40.cyan/blue} {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let last = loop {
        let v = match c.call("hotcopy_backup_status", json!({ "job": id }))? {
            Ok(v) => v,
            Err(e) => return Ok(fail("hotcopy_backup_status", &e)),
        };
        if let Some(b) = &bar {
            b.set_position(pct(&v) as u64);
            b.set_message(format!(
                "{:.0} MiB/s",
                v["backup_mibps"].as_f64().unwrap_or(0.0)
            ));
        }
        if v["state"] != "running" {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&last)?);
    } else {
        println!("{}", describe(&last));
    }
    Ok(if last["state"] == "complete" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut c = Client::connect(&a.socket.rpc_socket)?;
    let params = match &a.volume {
        Some(v) => json!({ "volume": v }),
        None => Value::Null,
    };
    let v = match c.call("hotcopy_backup_status", params)? {
        Ok(v) => v,
        Err(e) => return Ok(fail("hotcopy_backup_status", &e)),
    };
    // Without --volume: every job; the newest is the one shown as JSON.
    let jobs: Vec<Value> = match v.get("jobs") {
        Some(Value::Array(all)) => all.clone(),
        _ => vec![v],
    };
    let Some(newest) = jobs.last() else {
        eprintln!("hotcopy: the daemon has run no backup jobs yet");
        return Ok(ExitCode::from(1));
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(newest)?);
    } else {
        for j in &jobs {
            println!("{}", describe(j));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cancel(a: CancelArgs) -> anyhow::Result<ExitCode> {
    let mut c = Client::connect(&a.socket.rpc_socket)?;
    let params = match &a.volume {
        Some(v) => json!({ "volume": v }),
        None => Value::Null,
    };
    let v = match c.call("hotcopy_backup_cancel", params)? {
        Ok(v) => v,
        Err(e) => return Ok(fail("hotcopy_backup_cancel", &e)),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", describe(&v));
    }
    Ok(if v["state"] == "running" {
        eprintln!("hotcopy: the job has not stopped yet; `hotcopy backup status` follows it");
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_json_when_they_parse() {
        assert_eq!(
            parse_param("size=64M").unwrap(),
            ("size".into(), json!("64M"))
        );
        assert_eq!(parse_param("n=5").unwrap(), ("n".into(), json!(5)));
        assert_eq!(parse_param("f=true").unwrap(), ("f".into(), json!(true)));
        assert_eq!(parse_param("s=\"5\"").unwrap(), ("s".into(), json!("5")));
        assert_eq!(parse_param("e=").unwrap(), ("e".into(), json!("")));
        assert_eq!(parse_param("a=b=c").unwrap(), ("a".into(), json!("b=c")));
        assert!(parse_param("novalue").is_err());
        assert!(parse_param("=x").is_err());
    }
}
