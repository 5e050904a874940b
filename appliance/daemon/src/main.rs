//! The `hotcopy` command.

mod backup_cmd;
mod bench_cmd;
mod construct;
mod cow_cmd;
mod demo_cmd;
mod repo_bench_cmd;
mod repo_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Backups into a repository (`backup run`: one-shot, of a bdev no daemon serves).
    #[command(subcommand)]
    Backup(backup_cmd::BackupSub),
    /// The backup repository, offline: format, list, info, verify, prune, restore.
    Repo(repo_cmd::RepoArgs),
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
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = match cli.cmd {
        Cmd::Demo(a) => demo_cmd::run(a),
        Cmd::Backup(b) => backup_cmd::run(b),
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hotcopy: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
