//! `hotcopy demo`: an online backup of a busy volume, start to finish.

use std::process::ExitCode;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cow_cmd::{self, CowArgs};

#[derive(Args, Debug)]
#[command(after_help = "\
On files under a scratch directory in /var/tmp: a 512 MiB source and backup namespace,
4 KiB random writes at QD32, an online full backup in the middle of the load, a byte-for-byte
check of the backup against the source at the consistency point, and a short table.")]
pub struct DemoArgs {
    /// Size of the source volume.
    #[arg(long, default_value = "512M")]
    size: String,
    /// Seconds of load before the backup (the baseline).
    #[arg(short = 't', long = "time", default_value_t = 3.0)]
    seconds: f64,
    /// Keep the scratch files in this directory instead of a temporary one.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut args = vec![
        "--size".to_string(),
        a.size.clone(),
        "-t".into(),
        a.seconds.to_string(),
    ];
    if let Some(d) = &a.dir {
        args.push("--dir".into());
        args.push(d.display().to_string());
    }
    let cow = <CowOnly as clap::Parser>::try_parse_from(args)?.args;
    println!(
        "hotcopy demo: {} source, random 4 KiB writes at QD32, online backup mid-load",
        a.size
    );
    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template("backup {bar:40.cyan/blue} {pos:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (report, _trace, _scratch) = cow_cmd::run_scenario(&cow, |s| {
        let pct = 100 * s.chunks_done / s.chunks_in_scope.max(1);
        bar.set_position(pct);
        bar.set_message(format!(
            "{:.0} MiB/s, container {}/{} slots",
            s.backup_mibps, s.container_used, s.container_slots
        ));
    })?;
    bar.finish();
    println!();
    println!("{:<34} {:>12} {:>12}", "", "without", "during");
    println!(
        "{:<34} {:>12.0} {:>12.0}",
        "foreground write IOPS", report.baseline.iops, report.during.iops
    );
    println!(
        "{:<34} {:>12.1} {:>12.1}",
        "foreground write p99 (us)", report.baseline.lat_us.p99, report.during.lat_us.p99
    );
    println!("{:<34} {:>25.1}", "backup MiB/s", report.backup_mibps);
    println!(
        "{:<34} {:>25.0}",
        "freeze at the consistency point (us)", report.freeze_us
    );
    println!(
        "{:<34} {:>25}",
        "container peak (slots)",
        format!("{} of {}", report.container_peak, report.container_slots)
    );
    let ok = report.verified == Some(true);
    println!(
        "{:<34} {:>25}",
        "backup == source at T0",
        if ok { "yes, byte for byte" } else { "NO" }
    );
    if !ok {
        eprintln!("hotcopy demo: {}", report.verify_detail.unwrap_or_default());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench cow` options parsed from a list, so the demo reuses their defaults.
#[derive(clap::Parser)]
#[command(no_binary_name = true)]
struct CowOnly {
    #[command(flatten)]
    args: CowArgs,
}
