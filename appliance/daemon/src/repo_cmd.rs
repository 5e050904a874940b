//! `hotcopy repo`: the backup repository, offline (no daemon needed) or
//! through a running daemon (`--rpc-socket`).
//!
//! Offline, every subcommand builds the namespace bdev from its `--repo
//! SPEC` (and, for restore, the destination from `--to SPEC`), starts one
//! reactor, and runs the repository library (`hotcopy_cow::repo`) there
//! over a [`ChannelIo`]. Nothing is kept between invocations but what is on
//! the namespace, so a repository on a file (`uring:PATH`) persists from
//! one command to the next.
//!
//! With `--rpc-socket PATH` the same subcommand calls the daemon's method
//! instead (`hotcopy_repo_{format,list,info,verify,prune,restore}`; mount is
//! `hotcopy_snapshot_create` and `nbd_start_disk`, and `unmount` undoes
//! it). Each command's result is one JSON value, built by the same function
//! here offline and in the daemon (`list_json`, `info_value`,
//! `verify_value`, `prune_json`, `restore_json`), and one printer turns it
//! into the table, so the two paths print the same.
//!
//! Output is a human table by default and one JSON object with `--json`.
//! Exit codes: 0 success; 1 `verify` found damage; 2 any error (bad
//! arguments, not a repository, I/O failure, a generation that does not
//! exist).
//!
//! [`Offline`] (the bdevs of a command and its reactors: one, or two for a
//! restore) and [`open_repo`]
//! (errors that name the spec) can serve other offline commands too.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use hotcopy_bdev::{BdevDesc, BdevRegistry};
use hotcopy_config::{BaseRef, BdevConfig};
use hotcopy_cow::repo::{
    BlockIo, ChannelIo, ChunkLoc, GenState, Generation, PruneReport, Repo, RepoError, RepoInfo,
    VerifyReport,
};
use hotcopy_cow::repo_bdev::RestoreReport;
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::construct;

/// The bdev-spec lines of the help texts (a literal, for `concat!`).
macro_rules! spec_help {
    () => {
        "Bdev specs (SPEC): uring:PATH[@SIZE[:prealloc]]  malloc:SIZE[:BLOCK]  passthru:SPEC  fault:SPEC
  uring:PATH@SIZE creates the file (sparse) or extends it to SIZE; uring:PATH needs it to exist;
  uring:PATH@SIZE:prealloc also writes zeros over what SIZE creates or extends.
  A repository on a file persists between commands; one on malloc lasts one command."
    };
}

#[derive(Args, Debug)]
#[command(after_help = concat!("\
Examples:
  hotcopy repo format --repo uring:/var/tmp/backup.img@16G
  hotcopy repo list --repo uring:/var/tmp/backup.img
  hotcopy repo info --repo uring:/var/tmp/backup.img --generation 3
  hotcopy repo verify --repo uring:/var/tmp/backup.img
  hotcopy repo prune --repo uring:/var/tmp/backup.img --keep 7
  hotcopy repo restore --repo uring:/var/tmp/backup.img --generation latest --to uring:/dev/vdb

Through a running daemon (`hotcopy serve`), with --repo naming its bdev or a spec:
  hotcopy repo list --rpc-socket /run/hotcopy.sock --repo backup
  hotcopy repo mount --rpc-socket /run/hotcopy.sock --repo backup --generation 3 --name gen3
  hotcopy repo unmount --rpc-socket /run/hotcopy.sock --name gen3

Exit codes: 0 success, 1 verify found damage, 2 error.

", spec_help!()))]
pub struct RepoArgs {
    #[command(subcommand)]
    cmd: RepoCmd,
}

#[derive(Subcommand, Debug)]
enum RepoCmd {
    /// Write an empty repository to a namespace (refuses one that is not blank without --force).
    Format(FormatArgs),
    /// List the generations: id, state, kind, parent, source, consistency point, space.
    List(ListArgs),
    /// Show the repository's identity and space, or one generation in detail.
    Info(InfoArgs),
    /// Re-read every chunk and check every checksum (exit 1 when anything is damaged).
    Verify(VerifyArgs),
    /// Remove generations by count (--keep) or age (--older-than), or one by id (--remove).
    Prune(PruneArgs),
    /// Write a generation back to a bdev, byte for byte as it was at its consistency point.
    Restore(RestoreArgs),
    /// Serve a generation as a bdev over NBD (read-only, or writable into a private overlay).
    Mount(MountArgs),
    /// Stop serving a generation mounted through a daemon (`repo mount --rpc-socket`).
    Unmount(UnmountArgs),
}

#[derive(Args, Debug)]
#[command(after_help = "\
The generation is served as a bdev and exported over NBD until SIGINT or SIGTERM. Read-only by
default; --writable takes writes into a private overlay (RAM by default, or --overlay SPEC) that
neither the repository nor any source ever sees, and that is gone when the mount ends.
With --rpc-socket the daemon serves it instead (bdev and export --name), and it stays until
`hotcopy repo unmount --rpc-socket PATH --name NAME`.

Examples:
  hotcopy repo mount --repo uring:/var/tmp/backup.img --generation latest --nbd 127.0.0.1:10809
  qemu-img convert -f raw -O raw nbd://127.0.0.1:10809/backup out.img
  hotcopy repo mount --repo uring:/var/tmp/backup.img --generation 3 --writable --nbd unix:/tmp/g3.sock
")]
pub struct MountArgs {
    /// The backup namespace (a bdev spec).
    #[arg(long, value_name = "SPEC")]
    repo: String,
    /// The generation: an id, or `latest` (the newest complete one).
    #[arg(long, value_name = "N|latest", value_parser = parse_gen_sel)]
    generation: GenSel,
    /// With `latest` in a repository of several sources: the source's name.
    #[arg(long, value_name = "NAME")]
    source: Option<String>,
    /// Take writes into a private overlay.
    #[arg(long)]
    writable: bool,
    /// The overlay's bdev spec (default: RAM as large as the generation's source).
    #[arg(long, value_name = "SPEC", requires = "writable")]
    overlay: Option<String>,
    /// Where to serve it: HOST:PORT or unix:PATH [default: 127.0.0.1:10809; through a daemon,
    /// the address of its first export, else 127.0.0.1:10809].
    #[arg(long, value_name = "HOST:PORT|unix:PATH")]
    nbd: Option<String>,
    /// The NBD export name (through a daemon, also the snapshot bdev's name).
    #[arg(long, default_value = "backup")]
    name: String,
    /// Print one JSON object once it is served: {"generation", "name", "uri", "writable", ...}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    via: Via,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  hotcopy repo mount --rpc-socket /run/hotcopy.sock --repo backup --generation 3 --name gen3
  hotcopy repo unmount --rpc-socket /run/hotcopy.sock --name gen3

Stops the NBD export NAME (its connections finish their requests and close) and deletes the
snapshot bdev NAME with its overlay.")]
pub struct UnmountArgs {
    /// The daemon's JSON-RPC socket (a mount without a daemon ends with its command).
    #[arg(long = "rpc-socket", value_name = "PATH")]
    rpc_socket: PathBuf,
    /// The name given to `repo mount --name`.
    #[arg(long, default_value = "backup")]
    name: String,
}

#[derive(Args, Debug)]
#[command(after_help = concat!("\
Examples:
  hotcopy repo format --repo uring:/var/tmp/backup.img@16G
  hotcopy repo format --repo uring:/dev/vdc --force      # overwrite what is there

Without --force, format refuses a namespace whose first MiB is not all zeros: an existing
repository, a filesystem, a partition table.

", spec_help!()))]
pub struct FormatArgs {
    #[command(flatten)]
    via: Via,
    /// The backup namespace (a bdev spec).
    #[arg(long, value_name = "SPEC")]
    repo: String,
    /// Overwrite whatever the namespace holds, including a repository.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  hotcopy repo list --repo uring:/var/tmp/backup.img
  hotcopy repo list --repo uring:/var/tmp/backup.img --json | jq '.generations[].id'

JSON: {\"uuid\", \"generations\": [{\"id\", \"state\" (complete|in_progress), \"kind\" (full|incremental),
\"parent\", \"source\": {\"name\", \"size_bytes\"}, \"chunk_size\", \"consistency_point\" (RFC 3339 UTC),
\"consistency_point_us\", \"created\", \"created_us\", \"chunks\": {\"total\", \"stored\", \"zero\", \"absent\"},
\"bytes_stored\", \"crc_compared\", \"damage\"}]}")]
pub struct ListArgs {
    #[command(flatten)]
    via: Via,
    /// The backup namespace (a bdev spec).
    #[arg(long, value_name = "SPEC")]
    repo: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  hotcopy repo info --repo uring:/var/tmp/backup.img
  hotcopy repo info --repo uring:/var/tmp/backup.img --generation 3 --json

JSON: {\"uuid\", \"size_bytes\", \"used_bytes\", \"free_bytes\", \"generation_count\", \"complete\",
\"in_progress\", \"sequence\"}, and with --generation a \"generation\" object: the fields of
`repo list --json` plus \"index\" and \"data_from\" (which generations stored its chunks).")]
pub struct InfoArgs {
    #[command(flatten)]
    via: Via,
    /// The backup namespace (a bdev spec).
    #[arg(long, value_name = "SPEC")]
    repo: String,
    /// Also describe this generation.
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  hotcopy repo verify --repo uring:/var/tmp/backup.img
  hotcopy repo verify --repo uring:/var/tmp/backup.img --generation 3 --json

Reads the superblocks, the catalog, every index and every chunk (a chunk shared by several
generations is read once) and checks every crc32c. Exit code 0 when everything is intact,
1 when anything is damaged (each problem is listed), 2 on an error. A progress bar is drawn
on stderr when it is a terminal.")]
pub struct VerifyArgs {
    #[command(flatten)]
    via: Via,
    /// The backup namespace (a bdev spec).
    #[arg(long, value_name = "SPEC")]
    repo: String,
    /// Check only this generation (default: all of them).
    #[arg(long, value_name = "N")]
    generation: Option<u64>,
    /// Print one JSON object: {"ok", "generations", "bad_chunks", "problems", "warnings", ...}.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(
    group = clap::ArgGroup::new("rule").required(true).multiple(false).args(["keep", "older_than", "remove"]),
    after_help = "\
Examples:
  hotcopy repo prune --repo uring:/var/tmp/backup.img --keep 7        # newest 7 of each source
  hotcopy repo prune --repo uring:/var/tmp/backup.img --older-than 30d
  hotcopy repo prune --repo uring:/var/tmp/backup.img --remove 12     # e.g. an incomplete one

Exactly one of --keep, --older-than and --remove. --keep and --older-than consider complete
generations only, per source, and --older-than always keeps the newest of each source.
Chunks a remaining generation shares are kept; the rest is free at once.
DURATION: a number and a unit: s, m, h, d or w (30s, 15m, 12h, 7d, 2w).")]
pub struct PruneArgs {
    #[command(flatten)]
    via: Via,
    /// The backup namespace (a bdev spec).
    #[arg(long, value_name = "SPEC")]
    repo: String,
    /// Keep the newest N complete generations of each source; remove the older ones.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep: Option<u64>,
    /// Remove complete generations whose consistency point is older than DURATION.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Remove the one generation N, complete or incomplete.
    #[arg(long, value_name = "N")]
    remove: Option<u64>,
    /// Print one JSON object: {"removed": [ids], "freed_bytes", "remaining"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(after_help = concat!("\
Examples:
  hotcopy repo restore --repo uring:/var/tmp/backup.img --generation 3 --to uring:/var/tmp/vol.img@1G
  hotcopy repo restore --repo uring:/var/tmp/backup.img --generation latest --to uring:/dev/vdb

The destination must hold at least the source's size; chunks outside the backup's scope are
left as they are on it. Every chunk's crc32c is checked on the way.

", spec_help!()))]
pub struct RestoreArgs {
    #[command(flatten)]
    via: Via,
    /// The backup namespace (a bdev spec).
    #[arg(long, value_name = "SPEC")]
    repo: String,
    /// The generation: an id, or `latest` (the newest complete one).
    #[arg(long, value_name = "N|latest", value_parser = parse_gen_sel)]
    generation: GenSel,
    /// With `latest` in a repository of several sources: the source's name.
    #[arg(long, value_name = "NAME")]
    source: Option<String>,
    /// The destination bdev (a bdev spec).
    #[arg(long, value_name = "SPEC")]
    to: String,
    /// Print one JSON object: {"generation", "source", "bytes_written", "seconds", "mibps", ...}.
    #[arg(long)]
    json: bool,
}

/// A `--generation` for restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenSel {
    Id(u64),
    Latest,
}

fn parse_gen_sel(s: &str) -> Result<GenSel, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("latest") {
        return Ok(GenSel::Latest);
    }
    match t.parse::<u64>() {
        Ok(n) if n > 0 => Ok(GenSel::Id(n)),
        _ => Err(format!(
            "{s:?} is not a generation: expected an id (1, 2, ...) or \"latest\""
        )),
    }
}

/// Parses `30s`, `15m`, `12h`, `7d`, `2w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let fail = || {
        format!("invalid duration {s:?}: expected a number and a unit s, m, h, d or w (30s, 15m, 12h, 7d)")
    };
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(fail());
    }
    let n: u64 = t[..digits].parse().map_err(|_| fail())?;
    let unit: u64 = match t[digits..].trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(fail()),
    };
    n.checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("invalid duration {s:?}: too large"))
}

pub fn run(a: RepoArgs) -> anyhow::Result<ExitCode> {
    match a.cmd {
        RepoCmd::Format(a) => format_repo(a),
        RepoCmd::List(a) => list(a),
        RepoCmd::Info(a) => info(a),
        RepoCmd::Verify(a) => verify(a),
        RepoCmd::Prune(a) => prune(a),
        RepoCmd::Restore(a) => restore(a),
        RepoCmd::Mount(a) => mount(a),
        RepoCmd::Unmount(a) => unmount(a),
    }
}

// ---- Offline bdevs and a reactor --------------------------------------------

/// The bdevs of one offline command and the reactors that drive them
/// (reactor 0 runs [`Offline::exec`]).
pub(crate) struct Offline {
    // Declared first: the reactor stops before the bdevs go away.
    rt: Runtime,
    reg: BdevRegistry,
}

impl Offline {
    /// Builds each `(name, option, spec)` bdev, then starts one reactor.
    /// Errors name the option and the spec.
    pub(crate) fn start(bdevs: &[(&str, &str, &str)]) -> anyhow::Result<Offline> {
        Offline::start_with(bdevs, 1)
    }

    /// [`Offline::start`] with `reactors` reactors (at least one; reactor 0
    /// runs [`Offline::exec`]).
    pub(crate) fn start_with(
        bdevs: &[(&str, &str, &str)],
        reactors: usize,
    ) -> anyhow::Result<Offline> {
        let reg = BdevRegistry::new();
        for &(name, opt, spec) in bdevs {
            let cfg = hotcopy_config::parse_spec(spec).with_context(|| format!("{opt} {spec}"))?;
            construct::create_one(&reg, name, &cfg).with_context(|| format!("{opt} {spec}"))?;
        }
        let rt = Runtime::start(RuntimeConfig {
            cores: (0..reactors.max(1)).collect(),
            idle: IdlePolicy::SLEEP,
            pin: false,
        })
        .context("starting the reactors")?;
        Ok(Offline { rt, reg })
    }

    /// A descriptor of bdev `name`, to move into [`Offline::exec`].
    pub(crate) fn open(&self, name: &str, writable: bool) -> anyhow::Result<BdevDesc> {
        Ok(self.reg.open(name, writable)?)
    }

    /// Runs `f` on the reactor and waits for it. A panic in `f` becomes an
    /// error.
    pub(crate) fn exec<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        match self
            .rt
            .exec(0, move || std::panic::catch_unwind(AssertUnwindSafe(f)))
        {
            Ok(Ok(r)) => r,
            Ok(Err(p)) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                Err(anyhow!("internal error on the reactor: {msg}"))
            }
            Err(e) => Err(anyhow!("the reactor stopped: {e}")),
        }
    }
}

/// Turns a library error into one that names the namespace (and, for a
/// namespace that is not a repository, says how one is made).
pub(crate) fn repo_error(spec: &str, e: RepoError) -> anyhow::Error {
    match e {
        RepoError::NotARepository => anyhow!(
            "--repo {spec}: not a hotcopy repository (neither superblock slot carries the magic \
             HCREPO01); a blank namespace becomes one with `hotcopy repo format --repo {spec}`"
        ),
        e => anyhow::Error::new(e).context(format!("--repo {spec}")),
    }
}

/// Opens the repository on `io`, with errors that name `spec`.
pub(crate) fn open_repo(io: &mut dyn BlockIo, spec: &str) -> anyhow::Result<Repo> {
    Repo::open(io).map_err(|e| repo_error(spec, e))
}

/// Opens the namespace `spec` (read-only unless `writable`) and runs `f` on
/// the repository there, on the reactor.
fn with_repo<T: Send + 'static>(
    spec: &str,
    writable: bool,
    f: impl FnOnce(&mut ChannelIo, &mut Repo) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let off = Offline::start(&[("repo", "--repo", spec)])?;
    let desc = off.open("repo", writable)?;
    let spec = spec.to_string();
    off.exec(move || {
        let mut io = ChannelIo::new(desc.channel()?);
        let mut repo = open_repo(&mut io, &spec)?;
        f(&mut io, &mut repo)
    })
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
fn progress_bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40.cyan/blue}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

// ---- Formatting -------------------------------------------------------------

/// `1.5 GiB`, `64.0 KiB`, `512 B`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// RFC 3339 UTC with microseconds: `2026-11-22T06:10:50.123456Z`.
pub fn rfc3339_us(us: u64) -> String {
    let secs = us / 1_000_000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        us % 1_000_000
    )
}

/// To the second, for tables: `2026-11-22 06:10:50`.
fn short_time(us: u64) -> String {
    let full = rfc3339_us(us);
    full[..19].replace('T', " ")
}

fn state_str(s: GenState) -> &'static str {
    match s {
        GenState::Complete => "complete",
        GenState::InProgress => "in_progress",
    }
}

/// One generation as `repo list --json` prints it; the daemon's
/// `hotcopy_repo_list` answers with the same fields and names.
pub(crate) fn gen_json(g: &Generation, damage: Option<&str>) -> Value {
    let cp = (g.state == GenState::Complete).then_some(g.consistency_point_us);
    json!({
        "id": g.id,
        "state": state_str(g.state),
        "kind": g.kind.as_str(),
        "parent": g.parent,
        "source": { "name": g.source.name, "size_bytes": g.source.size_bytes },
        "chunk_size": g.chunk_size,
        "consistency_point": cp.map(rfc3339_us),
        "consistency_point_us": cp,
        "created": rfc3339_us(g.created_us),
        "created_us": g.created_us,
        "chunks": {
            "total": g.chunks_total,
            "stored": g.chunks_stored,
            "zero": g.zero_chunks,
            "absent": g.chunks_absent,
        },
        "bytes_stored": g.bytes_stored,
        "crc_compared": g.crc_compared,
        "damage": damage,
    })
}

/// A verify report as `repo verify --json` prints it; the daemon's
/// `hotcopy_repo_verify` answers with the same and the repository's name.
pub(crate) fn verify_json(report: &VerifyReport, gens: &[Generation], seconds: f64) -> Value {
    let source = |id: u64| {
        gens.iter()
            .find(|g| g.id == id)
            .map(|g| g.source.name.as_str())
    };
    json!({
        "ok": report.is_ok(),
        "opened": true,
        "generations": report.generations.iter().map(|g| json!({
            "id": g.id,
            "state": state_str(g.state),
            "source": source(g.id),
            "ok": g.is_ok(),
            "chunks_checked": g.chunks_checked,
            "bad_chunks": g.bad_chunks,
            "problems": g.problems,
        })).collect::<Vec<_>>(),
        "bad_chunks": report.bad_chunks.iter().map(|b| json!({
            "generation": b.generation,
            "chunk": b.chunk,
            "offset": b.offset,
            "expected_crc": b.expected,
            "found_crc": b.found,
            "error": b.error,
        })).collect::<Vec<_>>(),
        "problems": report.problems,
        "warnings": report.warnings,
        "messages": report.messages(),
        "extents_read": report.extents_read,
        "bytes_read": report.bytes_read,
        "seconds": seconds,
    })
}

/// The repository as `repo info --json` prints it, and the daemon too.
pub(crate) fn info_json(i: &RepoInfo) -> Value {
    json!({
        "uuid": i.uuid,
        "size_bytes": i.size_bytes,
        "used_bytes": i.used_bytes,
        "free_bytes": i.free_bytes,
        "generation_count": i.generations,
        "complete": i.complete,
        "in_progress": i.in_progress,
        "sequence": i.sequence,
    })
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = table_line(&widths, header.iter().copied());
    for r in rows {
        out += &table_line(&widths, r.iter().map(String::as_str));
    }
    out
}

fn table_line<'a>(widths: &[usize], cells: impl Iterator<Item = &'a str>) -> String {
    let mut s = String::new();
    for (i, c) in cells.enumerate() {
        if i > 0 {
            s.push_str("  ");
        }
        s.push_str(c);
        let pad = widths.get(i).copied().unwrap_or(0);
        s.extend(std::iter::repeat_n(
            ' ',
            pad.saturating_sub(c.chars().count()),
        ));
    }
    s.truncate(s.trim_end().len());
    s.push('\n');
    s
}

/// A field of a JSON object as a number (0 when absent).
fn vu(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// A field of a JSON object as a string ("" when absent).
fn vs<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// One line about a generation, from its JSON (`gen_json`, or a restore's
/// result, which has the same `kind`, `source`, `consistency_point` and
/// `bytes_stored`).
fn describe(g: &Value) -> String {
    if vs(g, "state") == "in_progress" {
        format!(
            "{} of {:?}, incomplete (begun {})",
            vs(g, "kind"),
            vs(&g["source"], "name"),
            vs(g, "created")
        )
    } else {
        format!(
            "{} of {:?}, consistency point {}, {} stored",
            vs(g, "kind"),
            vs(&g["source"], "name"),
            vs(g, "consistency_point"),
            human_bytes(vu(g, "bytes_stored"))
        )
    }
}

// ---- Through the daemon -----------------------------------------------------

/// `--rpc-socket`: run the command through a running daemon instead of
/// opening the namespace here.
#[derive(Args, Debug, Clone, Default)]
pub struct Via {
    /// Run it through the daemon (`hotcopy serve`) on this JSON-RPC socket instead of opening
    /// the namespace here; --repo (and --to) may then also name one of the daemon's bdevs.
    #[arg(long = "rpc-socket", value_name = "PATH")]
    rpc_socket: Option<PathBuf>,
}

/// Calls `method` on the daemon at `socket`; the daemon's error becomes
/// this command's, with the method and the JSON-RPC code.
fn remote(socket: &Path, method: &str, params: Value) -> anyhow::Result<Value> {
    let mut c = crate::rpc_cmd::Client::connect(socket)?;
    call(&mut c, method, params)
}

fn call(c: &mut crate::rpc_cmd::Client, method: &str, params: Value) -> anyhow::Result<Value> {
    c.call(method, params)?
        .map_err(|e| anyhow!("{method}: {} (JSON-RPC error {})", e.message, e.code))
}

/// A `--generation` as the daemon takes it.
fn gen_param(sel: GenSel) -> Value {
    match sel {
        GenSel::Id(id) => json!(id),
        GenSel::Latest => json!("latest"),
    }
}

/// A spinner on stderr (when it is a terminal) while the daemon works.
fn spinner(what: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(what);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

// ---- format -----------------------------------------------------------------

fn format_repo(a: FormatArgs) -> anyhow::Result<ExitCode> {
    let info = if let Some(sock) = &a.via.rpc_socket {
        remote(
            sock,
            "hotcopy_repo_format",
            json!({ "repo": a.repo, "force": a.force }),
        )
        .map_err(|e| {
            anyhow!(
                "{}",
                e.to_string().replace("pass force: true", "add --force")
            )
        })?
    } else {
        let off = Offline::start(&[("repo", "--repo", a.repo.as_str())])?;
        let desc = off.open("repo", true)?;
        let (spec, force) = (a.repo.clone(), a.force);
        off.exec(move || {
            let mut io = ChannelIo::new(desc.channel()?);
            match Repo::format(&mut io, force) {
                Ok(repo) => Ok(info_json(&repo.info())),
                Err(RepoError::WouldOverwrite(why)) => Err(anyhow!(
                    "--repo {spec}: refusing to format: {why}; add --force to overwrite it"
                )),
                Err(e) => Err(repo_error(&spec, e)),
            }
        })?
    };
    let size = vu(&info, "size_bytes");
    println!(
        "formatted {}: repository {}, {} ({size} bytes) usable",
        a.repo,
        vs(&info, "uuid"),
        human_bytes(size),
    );
    Ok(ExitCode::SUCCESS)
}

// ---- list -------------------------------------------------------------------

/// The repository and its generations, as `repo list --json` prints them;
/// the daemon's `hotcopy_repo_list` answers the same, with `repo`.
pub(crate) fn list_json(repo: &Repo) -> Value {
    json!({
        "uuid": repo.uuid(),
        "info": info_json(&repo.info()),
        "generations": repo
            .generations()
            .iter()
            .map(|g| gen_json(g, repo.damage(g.id)))
            .collect::<Vec<_>>(),
    })
}

fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    let v = match &a.via.rpc_socket {
        Some(sock) => remote(sock, "hotcopy_repo_list", json!({ "repo": a.repo }))?,
        None => with_repo(&a.repo, false, |_, repo| Ok(list_json(repo)))?,
    };
    if a.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let empty = Vec::new();
    let gens = v["generations"].as_array().unwrap_or(&empty);
    let n = gens.len() as u64;
    println!(
        "repository {} on {}: {n} generation{}, {} used of {}",
        vs(&v, "uuid"),
        a.repo,
        plural(n),
        human_bytes(vu(&v["info"], "used_bytes")),
        human_bytes(vu(&v["info"], "size_bytes"))
    );
    if gens.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = gens
        .iter()
        .map(|g| {
            let complete = vs(g, "state") == "complete";
            let chunks = &g["chunks"];
            vec![
                vu(g, "id").to_string(),
                if g["damage"].is_null() {
                    vs(g, "state").into()
                } else {
                    "DAMAGED".into()
                },
                vs(g, "kind").into(),
                g["parent"].as_u64().map_or("-".into(), |p| p.to_string()),
                vs(&g["source"], "name").into(),
                human_bytes(vu(&g["source"], "size_bytes")),
                human_bytes(vu(g, "chunk_size")),
                match g["consistency_point_us"].as_u64() {
                    Some(us) if complete => short_time(us),
                    _ => "-".into(),
                },
                if complete {
                    format!(
                        "{} ({}/{} chunks, {} zero)",
                        human_bytes(vu(g, "bytes_stored")),
                        vu(chunks, "stored"),
                        vu(chunks, "total"),
                        vu(chunks, "zero")
                    )
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "ID",
                "STATE",
                "KIND",
                "PARENT",
                "SOURCE",
                "SIZE",
                "CHUNK",
                "CONSISTENCY POINT (UTC)",
                "STORED",
            ],
            &rows
        )
    );
    for g in gens {
        if let Some(d) = g["damage"].as_str() {
            println!("generation {} is damaged: {d}", vu(g, "id"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---- info -------------------------------------------------------------------

/// The repository as `repo info --json` prints it, and with `only` a
/// `generation` object: its `gen_json` plus `index` and `data_from` (which
/// generations stored its chunks). The daemon's `hotcopy_repo_info`
/// answers the same.
pub(crate) fn info_value(
    io: &mut dyn BlockIo,
    repo: &Repo,
    only: Option<u64>,
) -> Result<Value, RepoError> {
    let mut v = info_json(&repo.info());
    let Some(id) = only else { return Ok(v) };
    let g = repo.generation(id).ok_or(RepoError::NoSuchGeneration(id))?;
    let mut damage = repo.damage(id).map(str::to_string);
    let mut data_from: BTreeMap<u64, u64> = BTreeMap::new();
    if g.state == GenState::Complete && damage.is_none() {
        match repo.index(io, id) {
            Ok(idx) => {
                for c in 0..idx.chunks() {
                    if let Some(e) = idx.resolve(c) {
                        if matches!(e.loc, ChunkLoc::Data(_)) {
                            *data_from.entry(e.stored_by).or_default() += 1;
                        }
                    }
                }
            }
            Err(e) => damage = Some(e.to_string()),
        }
    }
    let mut gv = gen_json(g, damage.as_deref());
    gv["index"] = match g.index {
        Some(i) => json!({ "offset": i.offset, "len": i.len }),
        None => Value::Null,
    };
    gv["data_from"] = data_from
        .into_iter()
        .map(|(gen, chunks)| json!({ "generation": gen, "chunks": chunks }))
        .collect();
    v["generation"] = gv;
    Ok(v)
}

fn info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let only = a.generation;
    let v = match &a.via.rpc_socket {
        Some(sock) => {
            let mut p = json!({ "repo": a.repo });
            if let Some(g) = only {
                p["generation"] = json!(g);
            }
            remote(sock, "hotcopy_repo_info", p)?
        }
        None => with_repo(&a.repo, false, move |io, repo| {
            Ok(info_value(io, repo, only)?)
        })?,
    };
    if a.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let kv = |k: &str, v: String| println!("{k:<22} {v}");
    let bytes = |n: u64| format!("{} ({n} bytes)", human_bytes(n));
    kv("repository", vs(&v, "uuid").into());
    kv("namespace", a.repo.clone());
    kv("size", bytes(vu(&v, "size_bytes")));
    kv("used", bytes(vu(&v, "used_bytes")));
    kv("free", bytes(vu(&v, "free_bytes")));
    kv(
        "generations",
        format!(
            "{} ({} complete, {} in progress)",
            vu(&v, "generation_count"),
            vu(&v, "complete"),
            vu(&v, "in_progress")
        ),
    );
    kv("sequence", vu(&v, "sequence").to_string());
    let g = &v["generation"];
    if g.is_null() {
        return Ok(ExitCode::SUCCESS);
    }
    println!();
    kv("generation", vu(g, "id").to_string());
    kv("state", vs(g, "state").into());
    kv("kind", vs(g, "kind").into());
    kv(
        "parent",
        g["parent"].as_u64().map_or("-".into(), |p| p.to_string()),
    );
    kv("source", vs(&g["source"], "name").into());
    kv("source size", bytes(vu(&g["source"], "size_bytes")));
    kv("chunk size", bytes(vu(g, "chunk_size")));
    kv(
        "consistency point",
        match g["consistency_point_us"].as_u64() {
            Some(us) => format!("{} ({us} us)", vs(g, "consistency_point")),
            None => "- (incomplete)".into(),
        },
    );
    kv("created", vs(g, "created").into());
    let c = &g["chunks"];
    let (total, stored, zero, absent) = (
        vu(c, "total"),
        vu(c, "stored"),
        vu(c, "zero"),
        vu(c, "absent"),
    );
    kv(
        "chunks",
        format!(
            "{total} total: {stored} stored, {zero} zero, {absent} out of scope, {} from earlier generations",
            total.saturating_sub(stored + zero + absent)
        ),
    );
    kv("bytes stored", bytes(vu(g, "bytes_stored")));
    if g["crc_compared"].as_bool() == Some(true) {
        kv(
            "unchanged chunks",
            "found by comparing checksums with the parent".into(),
        );
    }
    if !g["index"].is_null() {
        kv(
            "index",
            format!(
                "{} bytes at byte {}",
                vu(&g["index"], "len"),
                vu(&g["index"], "offset")
            ),
        );
    }
    if let Some(from) = g["data_from"].as_array().filter(|f| !f.is_empty()) {
        kv(
            "data from",
            from.iter()
                .map(|f| {
                    format!(
                        "generation {}: {} chunks",
                        vu(f, "generation"),
                        vu(f, "chunks")
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    if let Some(dmg) = g["damage"].as_str() {
        kv("DAMAGE", dmg.into());
    }
    Ok(ExitCode::SUCCESS)
}

// ---- verify -----------------------------------------------------------------

/// A [`BlockIo`] that advances a progress bar by the bytes it reads.
struct ProgressIo<'a> {
    io: &'a mut dyn BlockIo,
    bar: &'a ProgressBar,
}

impl BlockIo for ProgressIo<'_> {
    fn block_size(&self) -> u32 {
        self.io.block_size()
    }
    fn size_bytes(&self) -> u64 {
        self.io.size_bytes()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), RepoError> {
        let r = self.io.read(offset, buf);
        self.bar.inc(buf.len() as u64);
        if let Some(len) = self.bar.length() {
            if self.bar.position() > len {
                self.bar.set_length(self.bar.position());
            }
        }
        r
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RepoError> {
        self.io.write(offset, data)
    }
    fn flush(&mut self) -> Result<(), RepoError> {
        self.io.flush()
    }
}

/// Opens the repository on `io` and verifies it (one generation, or all),
/// advancing `bar` by the bytes read. A repository whose superblocks,
/// catalog or an index cannot be read is a failed verify (`"opened":
/// false`, the reason in `problems`), not an error. Returns what `repo
/// verify --json` prints; the daemon's `hotcopy_repo_verify` answers the
/// same, with `repo`.
pub(crate) fn verify_value(
    io: &mut dyn BlockIo,
    only: Option<u64>,
    bar: &ProgressBar,
) -> Result<Value, RepoError> {
    let started = Instant::now();
    let repo = match Repo::open(io) {
        Ok(r) => r,
        Err(
            e @ (RepoError::CorruptSuperblock { .. }
            | RepoError::CorruptCatalog { .. }
            | RepoError::CorruptIndex { .. }),
        ) => {
            let why = e.to_string();
            return Ok(json!({
                "ok": false,
                "opened": false,
                "generations": [],
                "bad_chunks": [],
                "problems": [why],
                "warnings": [],
                "messages": [why],
                "extents_read": 0,
                "bytes_read": 0,
                "seconds": started.elapsed().as_secs_f64(),
            }));
        }
        Err(e) => return Err(e),
    };
    // What the reads will add up to, about: everything in use, or one
    // generation's data and index.
    let estimate = match only {
        None => repo.info().used_bytes,
        Some(id) => {
            let g = repo.generation(id).ok_or(RepoError::NoSuchGeneration(id))?;
            let data = g
                .chunks_total
                .saturating_sub(g.zero_chunks + g.chunks_absent)
                * g.chunk_size as u64;
            data + g.index.map_or(0, |i| i.len)
        }
    };
    bar.set_length(estimate.max(1));
    let mut pio = ProgressIo { io, bar };
    let report = repo.verify(&mut pio, only)?;
    Ok(verify_json(
        &report,
        repo.generations(),
        started.elapsed().as_secs_f64(),
    ))
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let v = match &a.via.rpc_socket {
        Some(sock) => {
            let mut p = json!({ "repo": a.repo });
            if let Some(g) = a.generation {
                p["generation"] = json!(g);
            }
            let bar = spinner(format!("verifying {} through the daemon", a.repo));
            let v = remote(sock, "hotcopy_repo_verify", p);
            bar.finish_and_clear();
            v?
        }
        None => {
            let off = Offline::start(&[("repo", "--repo", a.repo.as_str())])?;
            let desc = off.open("repo", false)?;
            let (spec, only) = (a.repo.clone(), a.generation);
            let bar = progress_bar(0, "verify");
            let v = off.exec({
                let bar = bar.clone();
                move || {
                    let mut io = ChannelIo::new(desc.channel()?);
                    verify_value(&mut io, only, &bar).map_err(|e| repo_error(&spec, e))
                }
            });
            bar.finish_and_clear();
            v?
        }
    };
    let ok = v["ok"].as_bool() == Some(true);
    let code = if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    if a.json {
        print_json(&v)?;
        return Ok(code);
    }
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let messages = strings("messages");
    if v["opened"].as_bool() == Some(false) {
        println!(
            "verify: FAILED: the repository cannot be opened: {}",
            messages.join("; ")
        );
        return Ok(code);
    }
    let empty = Vec::new();
    let gens = v["generations"].as_array().unwrap_or(&empty);
    if !gens.is_empty() {
        let rows: Vec<Vec<String>> = gens
            .iter()
            .map(|g| {
                let complete = vs(g, "state") == "complete";
                let count = |k: &str| {
                    if complete {
                        vu(g, k).to_string()
                    } else {
                        "-".into()
                    }
                };
                vec![
                    vu(g, "id").to_string(),
                    vs(g, "state").into(),
                    vs(g, "source").into(),
                    count("chunks_checked"),
                    count("bad_chunks"),
                    match (complete, g["ok"].as_bool() == Some(true)) {
                        (false, _) => "incomplete: nothing to check".into(),
                        (true, true) => "OK".into(),
                        (true, false) => "DAMAGED".into(),
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &["ID", "STATE", "SOURCE", "CHECKED", "BAD", "RESULT"],
                &rows
            )
        );
    }
    const SHOWN: usize = 50;
    if !messages.is_empty() {
        println!("problems:");
        for m in messages.iter().take(SHOWN) {
            println!("  {m}");
        }
        if messages.len() > SHOWN {
            println!(
                "  ... and {} more (--json lists them all)",
                messages.len() - SHOWN
            );
        }
    }
    let warnings = strings("warnings");
    if !warnings.is_empty() {
        println!("warnings:");
        for w in &warnings {
            println!("  {w}");
        }
    }
    let checked: u64 = gens.iter().map(|g| vu(g, "chunks_checked")).sum();
    let read = format!(
        "{} read in {:.2} s",
        human_bytes(vu(&v, "bytes_read")),
        v["seconds"].as_f64().unwrap_or(0.0)
    );
    let n = gens.len() as u64;
    if ok {
        println!(
            "verify: OK: {n} generation{}, {checked} chunk checks, superblocks and catalog intact; {read}",
            plural(n),
        );
    } else {
        let damaged = gens
            .iter()
            .filter(|g| g["ok"].as_bool() != Some(true))
            .count();
        println!(
            "verify: FAILED: {} problem{} ({damaged} of {n} generations damaged); {read}",
            messages.len(),
            plural(messages.len() as u64),
        );
    }
    Ok(code)
}

// ---- prune ------------------------------------------------------------------

/// A prune's result as `repo prune --json` prints it; the daemon's
/// `hotcopy_repo_prune` answers the same, with `repo`. `before` is the
/// catalog before the prune, to describe what went.
pub(crate) fn prune_json(report: &PruneReport, before: &[Generation], after: &RepoInfo) -> Value {
    json!({
        "removed": report.removed,
        "removed_generations": report
            .removed
            .iter()
            .filter_map(|id| before.iter().find(|g| g.id == *id))
            .map(|g| gen_json(g, None))
            .collect::<Vec<_>>(),
        "kept_in_use": report.kept_in_use,
        "freed_bytes": report.freed_bytes,
        "remaining": after.generations,
        "free_bytes": after.free_bytes,
    })
}

fn prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    #[derive(Clone, Copy)]
    enum Rule {
        Keep(u64),
        OlderThan(Duration),
        Remove(u64),
    }
    let rule = match (a.keep, a.older_than, a.remove) {
        (Some(n), None, None) => Rule::Keep(n),
        (None, Some(d), None) => Rule::OlderThan(d),
        (None, None, Some(id)) => Rule::Remove(id),
        // clap's group enforces this; keep the message for other callers.
        _ => bail!("give exactly one of --keep N, --older-than DURATION and --remove N"),
    };
    let v = match &a.via.rpc_socket {
        Some(sock) => {
            let mut p = json!({ "repo": a.repo });
            match rule {
                Rule::Keep(n) => p["keep"] = json!(n),
                Rule::OlderThan(d) => p["older_than"] = json!(format!("{}s", d.as_secs())),
                Rule::Remove(id) => p["remove"] = json!(id),
            }
            remote(sock, "hotcopy_repo_prune", p)?
        }
        None => with_repo(&a.repo, true, move |io, repo| {
            let before = repo.generations().to_vec();
            let report = match rule {
                Rule::Keep(n) => repo.prune_keep(io, usize::try_from(n).unwrap_or(usize::MAX)),
                Rule::OlderThan(d) => repo.prune_older_than(io, d),
                Rule::Remove(id) => repo.remove(io, id),
            }?;
            Ok(prune_json(&report, &before, &repo.info()))
        })?,
    };
    if a.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let ids = |k: &str| -> Vec<u64> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let removed = ids("removed");
    if removed.is_empty() {
        let why = match rule {
            Rule::Keep(n) => format!(
                "no source has more than {n} complete generation{}",
                plural(n)
            ),
            Rule::OlderThan(_) => "no complete generation is older than that \
                                   (the newest of each source is always kept)"
                .into(),
            Rule::Remove(_) => "the generation is already gone".into(),
        };
        println!("nothing to remove: {why}");
    }
    let empty = Vec::new();
    let described = v["removed_generations"].as_array().unwrap_or(&empty);
    for id in removed {
        match described.iter().find(|g| vu(g, "id") == id) {
            Some(g) => println!("removed generation {id}: {}", describe(g)),
            None => println!("removed generation {id}"),
        }
    }
    for id in ids("kept_in_use") {
        println!("kept generation {id}: a backup is using it");
    }
    let (freed, left) = (vu(&v, "freed_bytes"), vu(&v, "remaining"));
    println!(
        "reclaimed {} ({freed} bytes); {left} generation{} left, {} free",
        human_bytes(freed),
        plural(left),
        human_bytes(vu(&v, "free_bytes"))
    );
    Ok(ExitCode::SUCCESS)
}

// ---- restore ----------------------------------------------------------------

/// The file or device at the bottom of a spec's stack, if it has one.
fn backing_path(cfg: &BdevConfig) -> Option<PathBuf> {
    match cfg {
        BdevConfig::Uring { path, .. } => Some(path.clone()),
        BdevConfig::Passthru { base }
        | BdevConfig::Cow { base }
        | BdevConfig::Fault { base, .. } => match base {
            BaseRef::Inline(inner) => backing_path(inner),
            BaseRef::Name(_) => None,
        },
        BdevConfig::Null { .. } | BdevConfig::Malloc { .. } => None,
    }
}

/// Picks the generation `sel` names, or says why none fits.
fn select_generation(repo: &Repo, sel: GenSel, source: Option<&str>) -> anyhow::Result<Generation> {
    let g = match sel {
        GenSel::Id(id) => repo
            .generation(id)
            .ok_or_else(|| {
                anyhow!("no generation {id} in the repository (`hotcopy repo list` shows them)")
            })?
            .clone(),
        GenSel::Latest => {
            if source.is_none() {
                let mut names: Vec<&str> = repo
                    .generations()
                    .iter()
                    .filter(|g| g.state == GenState::Complete)
                    .map(|g| g.source.name.as_str())
                    .collect();
                names.sort_unstable();
                names.dedup();
                if names.len() > 1 {
                    bail!(
                        "--generation latest is ambiguous: the repository holds backups of {} sources ({}); name one with --source",
                        names.len(),
                        names.join(", ")
                    );
                }
            }
            repo.latest(source)
                .ok_or_else(|| match source {
                    Some(s) => anyhow!("the repository has no complete generation of source {s:?}"),
                    None => anyhow!("the repository has no complete generation"),
                })?
                .clone()
        }
    };
    if let Some(s) = source {
        if g.source.name != s {
            bail!(
                "generation {} is a backup of {:?}, not of {s:?}",
                g.id,
                g.source.name
            );
        }
    }
    if g.state != GenState::Complete {
        bail!(
            "generation {} is incomplete (its backup did not commit): it cannot be restored, only removed (`hotcopy repo prune --remove {}`)",
            g.id,
            g.id
        );
    }
    Ok(g)
}

/// A restore's result as `repo restore --json` prints it; the daemon's
/// `hotcopy_repo_restore` answers the same, with `repo`.
pub(crate) fn restore_json(g: &Generation, to: &str, r: &RestoreReport) -> Value {
    json!({
        "generation": g.id,
        "kind": g.kind.as_str(),
        "source": { "name": g.source.name, "size_bytes": g.source.size_bytes },
        "consistency_point": rfc3339_us(g.consistency_point_us),
        "consistency_point_us": g.consistency_point_us,
        "bytes_stored": g.bytes_stored,
        "to": to,
        "bytes_written": r.bytes_written,
        "data_chunks": r.data_chunks,
        "zero_chunks": r.zero_chunks,
        "absent_chunks": r.absent_chunks,
        "reads": r.reads,
        "writes": r.writes,
        "seconds": r.elapsed.as_secs_f64(),
        "mibps": r.mibps,
    })
}

/// Reactors an offline restore runs on, at most (as many CPUs as there
/// are, up to this): two reach a fast local disk's write bandwidth.
const RESTORE_REACTORS: usize = 2;

fn restore(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let v = match &a.via.rpc_socket {
        Some(sock) => {
            let mut p =
                json!({ "repo": a.repo, "generation": gen_param(a.generation), "to": a.to });
            if let Some(s) = &a.source {
                p["source"] = json!(s);
            }
            let bar = spinner(format!("restoring to {} through the daemon", a.to));
            let v = remote(sock, "hotcopy_repo_restore", p);
            bar.finish_and_clear();
            v?
        }
        None => restore_offline(&a)?,
    };
    if a.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "restored generation {} ({}) to {}",
        vu(&v, "generation"),
        describe(&v),
        a.to
    );
    let absent = vu(&v, "absent_chunks");
    println!(
        "{} written in {:.2} s: {:.1} MiB/s ({} data chunks, {} zero chunks{})",
        human_bytes(vu(&v, "bytes_written")),
        v["seconds"].as_f64().unwrap_or(0.0),
        v["mibps"].as_f64().unwrap_or(0.0),
        vu(&v, "data_chunks"),
        vu(&v, "zero_chunks"),
        if absent > 0 {
            format!(", {absent} out-of-scope chunks left as they were")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn restore_offline(a: &RestoreArgs) -> anyhow::Result<Value> {
    let repo_cfg =
        hotcopy_config::parse_spec(&a.repo).with_context(|| format!("--repo {}", a.repo))?;
    let to_cfg = hotcopy_config::parse_spec(&a.to).with_context(|| format!("--to {}", a.to))?;
    if let (Some(r), Some(t)) = (backing_path(&repo_cfg), backing_path(&to_cfg)) {
        let same =
            r == t || matches!((r.canonicalize(), t.canonicalize()), (Ok(x), Ok(y)) if x == y);
        if same {
            bail!(
                "--to {} is the repository's own namespace ({}); restore to another file or device",
                a.to,
                r.display()
            );
        }
    }
    // Two reactors share the copy: one reactor's memcpy and crc32c fall
    // short of a fast destination's write bandwidth.
    let reactors =
        std::thread::available_parallelism().map_or(1, |n| n.get().min(RESTORE_REACTORS));
    let off = Offline::start_with(
        &[
            ("repo", "--repo", a.repo.as_str()),
            ("dest", "--to", a.to.as_str()),
        ],
        reactors,
    )?;
    let repo_desc = off.open("repo", false)?;
    let dst_desc = off.open("dest", true)?;
    let (dst_size, dst_bs) = (dst_desc.bdev().size_bytes(), dst_desc.bdev().block_size());
    let (spec, to, sel, source) = (a.repo.clone(), a.to.clone(), a.generation, a.source.clone());
    let bar = progress_bar(0, "restore");
    let result = off.exec({
        move || {
            let mut io = ChannelIo::new(repo_desc.channel()?);
            let repo = open_repo(&mut io, &spec)?;
            // Pick and check the generation before anything is written.
            let g = select_generation(&repo, sel, source.as_deref())?;
            let need = g.source.size_bytes;
            if dst_size < need {
                bail!(
                    "--to {to}: the destination holds {} ({dst_size} bytes); generation {} of {:?} needs {} ({need} bytes)",
                    human_bytes(dst_size),
                    g.id,
                    g.source.name,
                    human_bytes(need)
                );
            }
            if !need.is_multiple_of(dst_bs as u64) {
                bail!(
                    "--to {to}: the source size {need} is not a multiple of the destination's {dst_bs}-byte blocks"
                );
            }
            if let Some(d) = repo.damage(g.id) {
                bail!("generation {} is damaged: {d}", g.id);
            }
            drop(dst_desc);
            Ok(g)
        }
    });
    // The copy: a pipelined engine on each reactor, over a part of the
    // generation each (16 reads and 16 writes of up to 1 MiB in flight in
    // all), checking every chunk's crc32c as it reads.
    let result = result.and_then(|g| {
        bar.set_length(g.source.size_bytes);
        let report = hotcopy_cow::repo_bdev::restore_to_on(
            &off.reg,
            "repo",
            g.id,
            "dest",
            off.rt.reactors(),
            0,
            |done, _| bar.set_position(done),
        )
        .with_context(|| format!("restoring generation {} from {}", g.id, a.repo))?;
        Ok(restore_json(&g, &a.to, &report))
    });
    bar.finish_and_clear();
    result
}

// ---- mount ------------------------------------------------------------------

/// The NBD address mount serves on without `--nbd` (offline; the daemon
/// uses the address of its first export, else this one).
const DEFAULT_NBD: &str = "127.0.0.1:10809";

fn mount(a: MountArgs) -> anyhow::Result<ExitCode> {
    if let Some(sock) = &a.via.rpc_socket {
        return mount_remote(sock, &a);
    }
    use hotcopy_export::nbd::{Listen, NbdConfig, NbdExport, NbdServer};
    let nbd = a.nbd.as_deref().unwrap_or(DEFAULT_NBD);
    let listen = match nbd.strip_prefix("unix:") {
        Some(p) => Listen::Unix(PathBuf::from(p)),
        None => Listen::Tcp(
            std::net::ToSocketAddrs::to_socket_addrs(nbd)
                .ok()
                .and_then(|mut x| x.next())
                .ok_or_else(|| anyhow!("--nbd {nbd:?}: expected HOST:PORT or unix:PATH"))?,
        ),
    };
    let off = Offline::start(&[("repo", "--repo", a.repo.as_str())])?;
    let repo_desc = off.open("repo", false)?;
    let (spec, sel, source) = (a.repo.clone(), a.generation, a.source.clone());
    let g = off.exec(move || {
        let mut io = ChannelIo::new(repo_desc.channel()?);
        let repo = open_repo(&mut io, &spec)?;
        let g = select_generation(&repo, sel, source.as_deref())?;
        if let Some(d) = repo.damage(g.id) {
            bail!("generation {} is damaged: {d}", g.id);
        }
        Ok(g)
    })?;
    let overlay = if a.writable {
        let spec = a
            .overlay
            .clone()
            .unwrap_or_else(|| format!("malloc:{}", g.source.size_bytes));
        let cfg = hotcopy_config::parse_spec(&spec).with_context(|| format!("--overlay {spec}"))?;
        crate::construct::create_one(&off.reg, "overlay", &cfg)
            .with_context(|| format!("--overlay {spec}"))?;
        let desc = off.open("overlay", true)?;
        let slots = (desc.bdev().size_bytes() / g.chunk_size as u64).min(u32::MAX as u64) as u32;
        Some(hotcopy_cow::repo_bdev::OverlayConfig {
            desc,
            offset_blocks: 0,
            slots,
        })
    } else {
        None
    };
    let (_bdev, _handle) =
        hotcopy_cow::repo_bdev::create_snapshot(&off.reg, "snapshot", "repo", g.id, overlay)
            .with_context(|| format!("serving generation {}", g.id))?;
    let server = NbdServer::start(
        &off.rt,
        &off.reg,
        NbdConfig {
            listen: vec![listen],
            exports: vec![NbdExport {
                name: a.name.clone(),
                bdev: "snapshot".into(),
                read_only: !a.writable,
                description: format!("generation {} of {}", g.id, g.source.name),
            }],
        },
    )
    .with_context(|| format!("serving NBD on {nbd}"))?;
    let uri = match server.tcp_addr() {
        Some(x) => format!("nbd://{x}/{}", a.name),
        None => format!(
            "nbd+unix:///{}?socket={}",
            a.name,
            nbd.strip_prefix("unix:").unwrap_or(nbd)
        ),
    };
    if a.json {
        print_json(&json!({
            "generation": g.id,
            "source": { "name": g.source.name, "size_bytes": g.source.size_bytes },
            "name": a.name,
            "uri": uri,
            "writable": a.writable,
        }))?;
    } else {
        println!(
            "generation {} of {:?} ({}, {}) served at {uri}; Ctrl-C to stop",
            g.id,
            g.source.name,
            human_bytes(g.source.size_bytes),
            if a.writable {
                "writable, private overlay"
            } else {
                "read-only"
            }
        );
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("catching SIGINT and SIGTERM")?;
    let _ = signals.forever().next();
    let st = server.stop().context("stopping the NBD server")?;
    eprintln!(
        "stopped: {} requests, {} read, {} written into the overlay",
        st.requests,
        human_bytes(st.bytes_read),
        human_bytes(st.bytes_written)
    );
    Ok(ExitCode::SUCCESS)
}

/// `mount --rpc-socket`: the daemon serves the generation as bdev NAME
/// (`hotcopy_snapshot_create`) and exports it as NAME (`nbd_start_disk`);
/// the mount outlives this command, until `repo unmount`.
fn mount_remote(sock: &Path, a: &MountArgs) -> anyhow::Result<ExitCode> {
    let mut c = crate::rpc_cmd::Client::connect(sock)?;
    let mut p = json!({
        "name": a.name,
        "repo": a.repo,
        "generation": gen_param(a.generation),
        "writable": a.writable,
    });
    if let Some(s) = &a.source {
        p["source"] = json!(s);
    }
    if let Some(o) = &a.overlay {
        p["overlay"] = json!(o);
    }
    let snap = call(&mut c, "hotcopy_snapshot_create", p)?;
    let mut e = json!({ "bdev_name": a.name, "name": a.name, "read_only": !a.writable });
    if let Some(l) = &a.nbd {
        e["listen"] = json!(l);
    }
    let disk = match call(&mut c, "nbd_start_disk", e) {
        Ok(d) => d,
        Err(err) => {
            // Leave nothing behind: the snapshot goes with the failed export.
            if let Err(e2) = call(&mut c, "hotcopy_snapshot_delete", json!({ "name": a.name })) {
                eprintln!("hotcopy: removing snapshot {:?} again: {e2}", a.name);
            }
            return Err(err);
        }
    };
    if a.json {
        print_json(&json!({
            "generation": snap["generation"],
            "name": a.name,
            "uri": disk["uri"],
            "writable": a.writable,
            "size_bytes": snap["size_bytes"],
            "snapshot": snap,
            "export": disk,
        }))?;
    } else {
        println!(
            "generation {} ({}, {}) served by the daemon as bdev {:?} at {}",
            vu(&snap, "generation"),
            human_bytes(vu(&snap, "size_bytes")),
            if a.writable {
                "writable, private overlay"
            } else {
                "read-only"
            },
            a.name,
            vs(&disk, "uri"),
        );
        println!(
            "stop it with: hotcopy repo unmount --rpc-socket {} --name {}",
            sock.display(),
            a.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn unmount(a: UnmountArgs) -> anyhow::Result<ExitCode> {
    let mut c = crate::rpc_cmd::Client::connect(&a.rpc_socket)?;
    // The export first: a bdev that is exported cannot be deleted.
    let exported = match c.call("nbd_stop_disk", json!({ "name": a.name }))? {
        Ok(_) => true,
        // -32001: not exported (any more); the snapshot may still be there.
        Err(e) if e.code == -32001 => false,
        Err(e) => bail!("nbd_stop_disk: {} (JSON-RPC error {})", e.message, e.code),
    };
    call(&mut c, "hotcopy_snapshot_delete", json!({ "name": a.name }))?;
    println!(
        "unmounted {}: {}snapshot deleted",
        a.name,
        if exported { "export stopped, " } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339_us(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_us(1_700_000_000_123_456),
            "2023-11-14T22:13:20.123456Z"
        );
        // A leap day and the turn of a century.
        assert_eq!(
            rfc3339_us(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(
            rfc3339_us(4_107_542_399_000_000),
            "2100-02-28T23:59:59.000000Z"
        );
        assert_eq!(short_time(1_700_000_000_123_456), "2023-11-14 22:13:20");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(1_209_600)));
        for bad in ["", "7", "d", "7x", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generation_selectors() {
        assert_eq!(parse_gen_sel("latest"), Ok(GenSel::Latest));
        assert_eq!(parse_gen_sel("7"), Ok(GenSel::Id(7)));
        assert!(parse_gen_sel("0").is_err());
        assert!(parse_gen_sel("newest").is_err());
    }

    #[test]
    fn sizes_and_tables() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 10), "64.0 KiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(
            table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]),
            "A    BB\nxyz  1\n"
        );
    }
}
