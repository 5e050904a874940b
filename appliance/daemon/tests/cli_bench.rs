//! `hotcopy bench` as a user runs it: the real binary, its output and exit codes.

mod common;

use common::{fails, hotcopy, scratch};

#[test]
fn bench_json_has_the_documented_keys() {
    let (code, out, err) = hotcopy(&[
        "bench",
        "--bdev-spec",
        "malloc:64M",
        "-q",
        "8",
        "-o",
        "4k",
        "-w",
        "randrw",
        "-M",
        "70",
        "-t",
        "0.5",
        "--cores",
        "2",
        "--json",
        "--idle",
        "sleep",
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert!(v["iops"].as_f64().unwrap() > 0.0);
    assert!(v["mibps"].as_f64().unwrap() > 0.0);
    for k in ["avg", "p50", "p99", "p999", "max"] {
        assert!(
            v["lat_us"][k].as_f64().is_some(),
            "lat_us.{k} missing: {out}"
        );
    }
    let cores = v["cores"].as_array().unwrap();
    assert_eq!(cores.len(), 2);
    assert!(cores.iter().all(|c| c["iops"].as_f64().unwrap() > 0.0));
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 0.0);
    assert!(v["buffers_hugepage"].is_boolean());
    assert_eq!(v["workload"], "randrw");
}

#[test]
fn bench_verify_passes_on_every_storing_module() {
    let dir = scratch("cli");
    let img = dir.path().join("disk.img");
    let uring = format!("uring:{}@64M", img.display());
    let fault = "fault:malloc:32M".to_string();
    for spec in [
        "malloc:32M",
        "malloc:32M:4096",
        "passthru:malloc:32M",
        &uring,
        &fault,
    ] {
        let (code, out, err) = hotcopy(&[
            "bench",
            "--bdev-spec",
            spec,
            "-q",
            "16",
            "-o",
            "8k",
            "-w",
            "randwrite",
            "-t",
            "0.5",
            "--verify",
        ]);
        assert_eq!(code, 0, "{spec}: {out}\n{err}");
        assert!(out.contains("verify: OK"), "{spec}: {out}");
    }
}

#[test]
fn a_uring_spec_can_ask_for_a_preallocated_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch("cli");
    let run = |spec: &str| {
        let args = ["bench", "--bdev-spec", spec, "-w", "randread", "-t", "0.2"];
        let (code, out, err) = hotcopy(&args);
        assert_eq!(code, 0, "{spec}: {out}\n{err}");
    };
    let sparse = dir.path().join("sparse.img");
    let full = dir.path().join("full.img");
    run(&format!("uring:{}@16M", sparse.display()));
    run(&format!("uring:{}@16M:prealloc", full.display()));
    let allocated = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks() * 512;
    // Reads allocate nothing: only the option fills the file.
    assert!(allocated(&sparse) < 1 << 20, "{}", allocated(&sparse));
    assert!(allocated(&full) >= 16 << 20, "{}", allocated(&full));
}

#[test]
fn bench_verify_fails_loudly_when_the_device_fails_writes() {
    let dir = scratch("cli");
    let cfg = dir.path().join("flaky.yaml");
    std::fs::write(
        &cfg,
        "bdevs:\n  - name: flaky\n    type: fault\n    base: { type: malloc, size: 16MiB }\n    write_error_rate: 0.5\n",
    )
    .unwrap();
    let (code, out, err) = hotcopy(&[
        "bench",
        "--config",
        cfg.to_str().unwrap(),
        "-q",
        "4",
        "-t",
        "0.3",
        "--verify",
    ]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("bench failed") && err.contains("I/O errors"),
        "{err}"
    );
}

#[test]
fn bench_reads_a_config_file_and_picks_the_named_bdev() {
    let dir = scratch("cli");
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "reactors:\n  cores: 1\n  idle: sleep\nbdevs:\n  - name: m\n    type: malloc\n    size: 32MiB\n  - name: p\n    type: passthru\n    base: m\n",
    )
    .unwrap();
    let (code, out, err) = hotcopy(&[
        "bench",
        "-c",
        cfg.to_str().unwrap(),
        "-b",
        "p",
        "-q",
        "4",
        "-t",
        "0.3",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["bdev"], "p");
    assert_eq!(v["product"], "passthru");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = scratch("cli");
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "bdevs:\n  - name: m\n    type: malloc\n    size: 12X\n",
    )
    .unwrap();
    let err = fails(&["bench", "-c", cfg.to_str().unwrap()]);
    assert!(
        err.contains("bad.yaml:4") && err.contains("size"),
        "names file, line and field: {err}"
    );

    let err = fails(&["bench", "--bdev-spec", "floppy:1G"]);
    assert!(err.contains("floppy"), "{err}");

    let err = fails(&["bench", "--bdev-spec", "null:1G", "--verify", "-t", "0.1"]);
    assert!(err.contains("null bdev stores nothing"), "{err}");

    let err = fails(&[
        "bench",
        "--bdev-spec",
        "malloc:1M",
        "-o",
        "3000",
        "-t",
        "0.1",
    ]);
    assert!(err.contains("multiple of the block size"), "{err}");

    let err = fails(&["bench", "-w", "sideways"]);
    assert!(err.contains("sideways"), "{err}");
}

/// `hotcopy bench cow --json` on a 64 MiB volume at QD 8 in `dir`, with
/// `extra` options; the JSON object it prints, and that text.
fn small_bench_cow(dir: &std::path::Path, extra: &[&str]) -> (serde_json::Value, String) {
    let d = dir.to_str().unwrap();
    let mut args = vec![
        "bench", "cow", "--dir", d, "--size", "64M", "-q", "8", "--json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = hotcopy(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    let v = serde_json::from_str(&out).expect("one JSON object");
    (v, out)
}

#[test]
fn bench_cow_reports_both_phases_and_verifies_the_backup() {
    let dir = scratch("cli");
    let svg = dir.path().join("cow.svg");
    let (v, out) = small_bench_cow(
        dir.path(),
        &["-t", "0.5", "--fairness", "--plot", svg.to_str().unwrap()],
    );
    for k in [
        "iops_ratio",
        "p99_ratio",
        "backup_mibps",
        "freeze_us",
        "container_peak",
        "paced_writes",
    ] {
        assert!(v[k].is_number(), "{k} missing: {out}");
    }
    assert!(v["baseline"]["iops"].as_f64().unwrap() > 0.0);
    assert!(v["during"]["iops"].as_f64().unwrap() > 0.0);
    // The lost work is the job's window less the time the writes done in
    // it would have taken at the baseline rate.
    let lost = v["foreground_lost_s"].as_f64().expect("foreground_lost_s");
    let secs = v["during"]["secs"].as_f64().unwrap();
    let at_baseline =
        v["during"]["ios"].as_f64().unwrap() / v["baseline"]["iops"].as_f64().unwrap();
    assert!(
        (lost - (secs - at_baseline)).abs() < 1e-6,
        "{lost} != {secs} - {at_baseline}: {out}"
    );
    assert!(lost < secs, "{out}");
    // How far the device's speed moved: the larger baseline over the smaller.
    let (b0, b1) = (
        v["baseline_before_iops"].as_f64().unwrap(),
        v["baseline_after_iops"].as_f64().unwrap(),
    );
    let spread = v["baseline_spread"].as_f64().expect("baseline_spread");
    assert!((spread - b0.max(b1) / b0.min(b1)).abs() < 1e-9, "{out}");
    assert_eq!(v["verified"], true, "{out}");
    assert!(v["fairness"]["ratio"].is_number());
    assert_eq!(v["job"]["state"], "complete");
    let svg = std::fs::read_to_string(dir.path().join("cow.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("backup start"));
}

#[test]
fn demo_backs_up_a_busy_volume_and_checks_it() {
    let dir = scratch("cli");
    let (code, out, err) = hotcopy(&[
        "demo",
        "--size",
        "64M",
        "-t",
        "0.5",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("backup == source at T0") && out.contains("yes, byte for byte"),
        "{out}"
    );
    assert!(
        out.contains("foreground write IOPS") && out.contains("freeze"),
        "{out}"
    );
}

#[test]
fn bench_cow_caps_the_writers_and_still_verifies_the_backup() {
    let dir = scratch("cli");
    let d = dir.path().to_str().unwrap();
    let run = |rate: &str| {
        let (code, out, err) = hotcopy(&[
            "bench",
            "cow",
            "--dir",
            d,
            "--size",
            "64M",
            "--source",
            "malloc:64M",
            "--target",
            "malloc:64M",
            "-t",
            "0.5",
            "-q",
            "8",
            "--write-iops",
            rate,
            "--json",
        ]);
        assert_eq!(code, 0, "{rate}: {out}\n{err}");
        serde_json::from_str::<serde_json::Value>(&out).expect("one JSON object")
    };
    // A fixed cap: RAM could take hundreds of thousands of writes a second,
    // so the writers only stay under the cap if they keep to it.
    let v = run("2000");
    assert_eq!(v["write_iops_cap"], 2000.0);
    assert!(v["saturated_iops"].is_null());
    for phase in ["baseline", "during"] {
        let iops = v[phase]["iops"].as_f64().unwrap();
        assert!(iops > 0.0 && iops < 2000.0 * 1.15, "{phase}: {iops} IOPS");
    }
    assert_eq!(v["verified"], true, "{v}");
    // A share of the uncapped rate, measured first. The calibration run's
    // writes land on the volume before the backup, so the check of the
    // backup must count them too.
    let v = run("10%");
    let sat = v["saturated_iops"].as_f64().unwrap();
    let cap = v["write_iops_cap"].as_f64().unwrap();
    assert!(sat > 0.0 && (cap - sat * 0.1).abs() < 1e-6 * sat, "{v}");
    assert!(v["baseline"]["iops"].as_f64().unwrap() < cap * 1.15, "{v}");
    assert_eq!(v["verified"], true, "{v}");

    for bad in ["0%", "150%", "fast", "0"] {
        let err = fails(&["bench", "cow", "--write-iops", bad]);
        assert!(
            err.contains("--write-iops") && err.contains(bad),
            "{bad}: {err}"
        );
    }
}

#[test]
fn bench_cow_idle_backups_each_sit_between_two_ceilings() {
    let dir = scratch("cli");
    let (v, _) = small_bench_cow(
        dir.path(),
        &[
            "--source",
            "malloc:64M",
            "-t",
            "0.3",
            "--no-verify",
            "--idle-backup",
            "--idle-backup-runs",
            "2",
        ],
    );
    let ib = &v["idle_backup"];
    let runs = ib["runs"].as_array().expect("runs");
    let ceilings: Vec<f64> = ib["target_write_ceiling_runs_mibps"]
        .as_array()
        .expect("ceilings")
        .iter()
        .map(|c| c.as_f64().unwrap())
        .collect();
    assert_eq!(runs.len(), 2, "{ib}");
    assert_eq!(
        ceilings.len(),
        3,
        "one before each backup, one after the last: {ib}"
    );
    let mut ratios = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let mibps = r["backup_mibps"].as_f64().unwrap();
        assert!(mibps > 0.0, "{ib}");
        let ratio = r["ratio_to_target_ceiling"].as_f64().unwrap();
        let around = (ceilings[i] + ceilings[i + 1]) / 2.0;
        assert!((ratio - mibps / around).abs() < 1e-9, "run {i}: {ib}");
        ratios.push(ratio);
    }
    // Two runs: the median is the mean of the two.
    let median = (ratios[0] + ratios[1]) / 2.0;
    assert!(
        (ib["ratio_to_target_ceiling"].as_f64().unwrap() - median).abs() < 1e-9,
        "{ib}"
    );
    let mean = ceilings.iter().sum::<f64>() / 3.0;
    assert!((ib["target_write_ceiling_mibps"].as_f64().unwrap() - mean).abs() < 1e-9);

    let err = fails(&["bench", "cow", "--idle-backup", "--idle-backup-runs", "0"]);
    assert!(err.contains("--idle-backup-runs"), "{err}");
    let err = fails(&["bench", "cow", "--idle-backup-runs", "2"]);
    assert!(err.contains("--idle-backup"), "{err}");
}
