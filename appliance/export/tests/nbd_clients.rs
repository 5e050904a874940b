//! The NBD server against real clients that hotcopy did not write: qemu-img,
//! qemu-io, nbdinfo and nbdcopy (libnbd), and fio's nbd engine. Each reads or
//! writes through the server, and the bdev's bytes are checked afterwards.

mod common;

use std::process::Command;

use common::*;
use hotcopy_bdev::modules::uring;
use hotcopy_bdev::testing::pattern;
use hotcopy_bdev::BdevRegistry;
use hotcopy_export::{Listen, NbdConfig, NbdExport, NbdServer};
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};

#[test]
fn qemu_img_info_convert_and_compare_over_tcp_and_unix() {
    require("qemu-img");
    let rig = Rig::start();
    let (ok, out) = run(Command::new("qemu-img").args(["info", "--output=json", &rig.uri("vol")]));
    assert!(ok, "qemu-img info: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info JSON");
    assert_eq!(v["virtual-size"], SIZE, "{out}");

    let img = rig.dir.path().join("out.img");
    for uri in [rig.uri("vol"), rig.unix_uri("vol")] {
        let _ = std::fs::remove_file(&img);
        let (ok, out) = run(Command::new("qemu-img").args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            img.to_str().unwrap(),
        ]));
        assert!(ok, "qemu-img convert {uri}: {out}");
        let got = std::fs::read(&img).unwrap();
        assert_eq!(got.len() as u64, SIZE);
        assert!(
            got == pattern(SEED, SIZE as usize),
            "converted image differs ({uri})"
        );
        let (ok, out) = run(Command::new("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &uri,
        ]));
        assert!(ok, "qemu-img compare {uri}: {out}");
    }
    // The read-only export serves the same bytes.
    let (ok, out) = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
        &rig.uri("ro"),
    ]));
    assert!(ok, "qemu-img compare ro: {out}");
}

#[test]
fn qemu_io_writes_reads_and_flushes() {
    require("qemu-io");
    let rig = Rig::start();
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &rig.uri("vol"),
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "write -f -P 0xcd 3M 512k",
        "-c",
        "write -z 5M 256k",
        "-c",
        "discard 6M 64k",
        "-c",
        "flush",
    ]));
    assert!(ok && !out.contains("failed"), "qemu-io: {out}");
    assert!(
        rig.read(0, 1 << 20).iter().all(|&b| b == 0xab),
        "write -P 0xab landed"
    );
    assert!(
        rig.read(3 << 20, 512 << 10).iter().all(|&b| b == 0xcd),
        "FUA write landed"
    );
    assert!(
        rig.read(5 << 20, 256 << 10).iter().all(|&b| b == 0),
        "write -z zeroed"
    );
    assert_eq!(
        rig.read(1 << 20, 1 << 20),
        pattern(SEED, 2 << 20)[1 << 20..].to_vec(),
        "neighbours untouched"
    );

    // Over the Unix socket too, and a write to the read-only export fails.
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &rig.unix_uri("vol"),
        "-c",
        "read -P 0xab 0 1M",
    ]));
    assert!(ok && !out.contains("failed"), "qemu-io over unix: {out}");
    let (_, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        &rig.uri("ro"),
        "-c",
        "read -P 0xab 0 1M",
    ]));
    assert!(!out.contains("failed"), "qemu-io read of ro: {out}");
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export writable.
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &rig.uri("ro"),
        "-c",
        "write -P 0x11 0 4k",
    ]));
    assert!(
        !ok || out.contains("failed"),
        "a write to the read-only export is refused: {out}"
    );
    assert!(
        out.contains("Permission denied") || out.contains("Operation not permitted"),
        "{out}"
    );
    assert!(
        rig.read(0, 4096).iter().all(|&b| b == 0xab),
        "ro export did not write"
    );
}

#[test]
fn nbdinfo_lists_and_describes_exports() {
    require("nbdinfo");
    let rig = Rig::start();
    let (ok, out) = run(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", rig.addr)]));
    assert!(ok, "nbdinfo --list: {out}");
    for name in ["vol", "ro", "k4", "the test volume"] {
        assert!(out.contains(name), "nbdinfo --list shows {name}: {out}");
    }
    let (ok, out) = run(Command::new("nbdinfo").args(["--json", &rig.uri("vol")]));
    assert!(ok, "nbdinfo --json: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], SIZE, "{out}");
    assert_eq!(e["export-name"], "vol", "{out}");
    assert_eq!(e["is_read_only"], false, "{out}");
    assert_eq!(e["can_flush"], true, "{out}");
    assert_eq!(e["can_fua"], true, "{out}");
    assert_eq!(e["can_trim"], true, "{out}");
    assert_eq!(e["can_zero"], true, "{out}");
    assert_eq!(e["can_multi_conn"], true, "{out}");
    assert_eq!(e["block_size_minimum"], 512, "{out}");
    assert_eq!(e["block_size_preferred"], 4096, "{out}");
    assert_eq!(e["block_size_maximum"], 32 << 20, "{out}");
    let (ok, out) = run(Command::new("nbdinfo").args(["--json", &rig.unix_uri("ro")]));
    assert!(ok, "nbdinfo --json ro: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true, "{out}");
    let (ok, out) = run(Command::new("nbdinfo").args([&rig.uri("missing")]));
    assert!(!ok, "nbdinfo of a missing export fails: {out}");
}

#[test]
fn nbdcopy_in_both_directions() {
    require("nbdcopy");
    let rig = Rig::start();
    // Out of the export.
    let out_img = rig.dir.path().join("copy-out.img");
    std::fs::write(&out_img, b"").unwrap();
    let (ok, out) = run(Command::new("nbdcopy").args([&rig.uri("vol"), out_img.to_str().unwrap()]));
    assert!(ok, "nbdcopy out: {out}");
    assert!(
        std::fs::read(&out_img).unwrap() == pattern(SEED, SIZE as usize),
        "copied out"
    );
    // Into the export, over the Unix socket, with several connections.
    let in_img = rig.dir.path().join("copy-in.img");
    let mut data = pattern(0xc0ffee, SIZE as usize);
    data[(10 << 20)..(12 << 20)].fill(0); // a zero run nbdcopy may send as write-zeroes
    std::fs::write(&in_img, &data).unwrap();
    let (ok, out) = run(Command::new("nbdcopy").args([
        "--connections=4",
        in_img.to_str().unwrap(),
        &rig.unix_uri("vol"),
    ]));
    assert!(ok, "nbdcopy in: {out}");
    assert!(rig.read(0, SIZE as usize) == data, "copied in");
    let st = rig.server().stats();
    assert!(st.bytes_written >= SIZE - (2 << 20), "{st:?}");
    assert!(st.bytes_read >= SIZE, "{st:?}");
    assert_eq!(st.errors, 0, "{st:?}");
}

#[test]
fn fio_nbd_engine_random_writes_with_verify() {
    require("fio");
    let rig = Rig::start();
    let (ok, out) = run(Command::new("fio").args([
        "--name=nbd-randwrite",
        "--ioengine=nbd",
        &format!("--uri={}", rig.uri("vol")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=json",
    ]));
    assert!(ok, "fio: {out}");
    let json_start = out.find('{').expect("fio JSON");
    let v: serde_json::Value =
        serde_json::from_str(&out[json_start..out.rfind('}').unwrap() + 1]).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let read = job["read"]["io_bytes"].as_u64().unwrap();
    assert_eq!(written, 32 << 20, "{out}");
    assert_eq!(read, 32 << 20, "verify read everything back: {out}");
    eprintln!(
        "fio over NBD: randwrite {:.0} IOPS, verify read {:.0} IOPS",
        job["write"]["iops"].as_f64().unwrap_or(0.0),
        job["read"]["iops"].as_f64().unwrap_or(0.0)
    );
    let st = rig.server().stats();
    assert_eq!(st.errors, 0, "{st:?}");
    assert!(st.requests >= 2 * 8192, "{st:?}");
}

#[test]
fn qemu_img_writes_into_a_file_backed_export_and_stop_flushes() {
    require("qemu-img");
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::SLEEP)).unwrap();
    let reg = BdevRegistry::new();
    let mut opts = uring::UringOptions::new(&disk);
    opts.size = Some(32 << 20);
    uring::create(&reg, "disk", &opts).unwrap();
    let server = NbdServer::start(
        &rt,
        &reg,
        NbdConfig {
            listen: vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
            exports: vec![NbdExport {
                name: "disk".into(),
                bdev: "disk".into(),
                read_only: false,
                description: "a file".into(),
            }],
        },
    )
    .unwrap();
    let uri = format!("nbd://{}/disk", server.tcp_addr().unwrap());
    let src = dir.path().join("src.img");
    let mut data = pattern(99, 32 << 20);
    data[(4 << 20)..(6 << 20)].fill(0);
    std::fs::write(&src, &data).unwrap();
    let (ok, out) = run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        "-t",
        "none",
        src.to_str().unwrap(),
        &uri,
    ]));
    assert!(ok, "qemu-img convert into the export: {out}");
    let (ok, out) = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &uri,
    ]));
    assert!(ok, "qemu-img compare: {out}");
    let st = server.stop().unwrap();
    assert_eq!(st.errors, 0, "{st:?}");
    assert_eq!(st.connections_active, 0, "{st:?}");
    rt.shutdown();
    assert!(
        std::fs::read(&disk).unwrap() == data,
        "the file holds what qemu-img wrote"
    );
}
