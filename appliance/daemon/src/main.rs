//! The `hotcopy` command.

use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use hotcopy::{bench_cmd, cow_cmd, demo_cmd, repo_bench_cmd, repo_cmd, rpc_cmd, serve};

#[derive(Parser)]
#[command(
    name = "hotcopy",
    version,
    about = "An SPDK-style storage appliance: polled reactors, a stackable bdev layer, online copy-on-write backup",
    long_about = None
)]
struct Cli {
    /// Log filter for stderr (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, global = true, default_value = "warn", env = "HOTCOPY_LOG")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Back up a busy volume online and check the backup: the embedded default.
    Demo(demo_cmd::DemoArgs),
    /// Measure a bdev like SPDK's bdevperf, or (`bench cow`) what an online backup costs writers.
    Bench(Box<BenchCmd>),
    /// Backups into a repository (`backup run`: one-shot, of a bdev no daemon serves;
    /// `backup start|status|cancel`: through a running daemon).
    #[command(subcommand)]
    Backup(rpc_cmd::BackupCmd),
    /// The backup repository, offline: format, list, info, verify, prune, restore.
    Repo(repo_cmd::RepoArgs),
    /// Run the appliance daemon: bdevs from the config, NBD exports, JSON-RPC control.
    Serve(serve::ServeArgs),
    /// Call a method of a running daemon (JSON-RPC over its Unix socket).
    Rpc(rpc_cmd::RpcArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCmd {
    #[command(subcommand)]
    sub: Option<BenchSub>,
    #[command(flatten)]
    args: bench_cmd::BenchArgs,
}

#[derive(Subcommand)]
enum BenchSub {
    /// Foreground random writes on a cow volume, without and then during a full online backup.
    Cow(cow_cmd::CowArgs),
    /// Repository figures: incremental cost, restore speed at generation 1 and 50, instant restore.
    Repo(repo_bench_cmd::RepoBenchArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let log_given = !matches!(matches.value_source("log"), Some(ValueSource::DefaultValue));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The daemon logs what it does (info) unless told otherwise.
    let log = match (&cli.cmd, log_given) {
        (Cmd::Serve(_), false) => "info",
        _ => cli.log.as_str(),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = match cli.cmd {
        Cmd::Demo(a) => demo_cmd::run(a),
        Cmd::Backup(b) => rpc_cmd::run_backup(b),
        Cmd::Bench(b) => match *b {
            BenchCmd {
                sub: Some(BenchSub::Cow(a)),
                ..
            } => cow_cmd::run(a),
            BenchCmd {
                sub: Some(BenchSub::Repo(a)),
                ..
            } => repo_bench_cmd::run(a),
            BenchCmd { sub: None, args } => bench_cmd::run(args),
        },
        Cmd::Repo(a) => repo_cmd::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Rpc(a) => rpc_cmd::run_rpc(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hotcopy: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
