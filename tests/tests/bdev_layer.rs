//! The bdev layer: registry, claims, descriptors, per-core channels, and the
//! null, malloc and passthru modules, with data verification.

use std::sync::Arc;

use hotcopy_bdev::modules::{fault, malloc, null, passthru, uring};
use hotcopy_bdev::{BdevError, BdevIo, BdevRegistry, IoError, IoStatus, IoType};
use hotcopy_runtime::{DmaBuf, IdlePolicy, Runtime, RuntimeConfig};
use hotcopy_tests::*;

/// Exercises read, write, flush, unmap and write-zeroes on `name`, checking
/// data for every module that stores it.
fn exercise(reg: &BdevRegistry, name: &'static str, stores_data: bool) {
    let desc = reg.open(name, true).unwrap();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        let bs = ch.block_size() as usize;
        let last = ch.num_blocks() - 8;
        for (i, (lba, blocks)) in [(0u64, 1usize), (1, 8), (100, 256), (last, 8)]
            .into_iter()
            .enumerate()
        {
            let data = pattern(i as u64 + 1, blocks * bs);
            assert_eq!(write(&mut ch, lba, &data), IoStatus::Success);
            let back = read(&mut ch, lba, blocks as u64).unwrap();
            if stores_data {
                assert_eq!(back, data, "{name}: read-back at block {lba}");
            }
        }
        assert_eq!(flush(&mut ch), IoStatus::Success);
        assert_eq!(unmap(&mut ch, 100, 256), IoStatus::Success);
        assert_eq!(write_zeroes(&mut ch, 0, 1), IoStatus::Success);
        if stores_data {
            assert!(
                read(&mut ch, 100, 256).unwrap().iter().all(|b| *b == 0),
                "{name}: unmapped reads zero"
            );
            assert!(
                read(&mut ch, 0, 1).unwrap().iter().all(|b| *b == 0),
                "{name}: zeroed"
            );
            // Neighbours of the zeroed range are untouched.
            assert_eq!(read(&mut ch, 1, 8).unwrap(), pattern(2, 8 * bs));
        }
        let s = ch.stats();
        assert_eq!(s.ops[IoType::Write as usize], 4);
        assert_eq!(s.ops[IoType::Flush as usize], 1);
    });
}

#[test]
fn every_base_module_reads_writes_flushes_and_unmaps() {
    let reg = BdevRegistry::new();
    null::create(&reg, "null0", 64 << 20, 512).unwrap();
    malloc::create(&reg, "malloc0", 64 << 20, 512).unwrap();
    malloc::create(&reg, "malloc4k", 64 << 20, 4096).unwrap();
    malloc::create(&reg, "base", 64 << 20, 512).unwrap();
    passthru::create(&reg, "pt0", "base").unwrap();
    exercise(&reg, "null0", false);
    exercise(&reg, "malloc0", true);
    exercise(&reg, "malloc4k", true);
    exercise(&reg, "pt0", true);

    // uring on a real file, and the fault bdev (no faults armed) on malloc.
    let dir = scratch_dir();
    let opts = uring::UringOptions {
        size: Some(64 << 20),
        ..uring::UringOptions::new(dir.path().join("u.img"))
    };
    uring::create(&reg, "uring0", &opts).unwrap();
    malloc::create(&reg, "fbase", 64 << 20, 512).unwrap();
    fault::create(&reg, "fault0", "fbase", fault::FaultOptions::default()).unwrap();
    exercise(&reg, "uring0", true);
    exercise(&reg, "fault0", true);
}

#[test]
fn passthru_writes_land_on_its_base() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "m", 8 << 20, 512).unwrap();
    passthru::create(&reg, "p", "m").unwrap();
    let top = reg.open("p", true).unwrap();
    let base_ro = reg.open("m", false).unwrap();
    on_reactor(move |_| {
        let mut t = top.channel().unwrap();
        let mut b = base_ro.channel().unwrap();
        let data = pattern(9, 4096);
        assert_eq!(write(&mut t, 40, &data), IoStatus::Success);
        assert_eq!(read(&mut b, 40, 8).unwrap(), data);
        // Read-only descriptors refuse writes.
        assert_eq!(
            write(&mut b, 40, &data),
            IoStatus::Failed(IoError::ReadOnly)
        );
    });
}

#[test]
fn claims_are_exclusive_and_released_with_their_holder() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "m", 1 << 20, 512).unwrap();
    passthru::create(&reg, "p1", "m").unwrap();
    assert!(
        matches!(passthru::create(&reg, "p2", "m"), Err(BdevError::Claimed { by, .. }) if by == "p1")
    );
    assert!(matches!(
        reg.open("m", true),
        Err(BdevError::Claimed { .. })
    ));
    assert!(reg.open("m", false).is_ok(), "read-only opens are allowed");
    assert!(matches!(
        reg.unregister("m"),
        Err(BdevError::Claimed { .. })
    ));
    drop(reg.unregister("p1").unwrap());
    assert_eq!(
        reg.get("m").unwrap().claimed_by(),
        None,
        "removing p1 released its claim"
    );
    passthru::create(&reg, "p2", "m").unwrap();
    assert_eq!(reg.get("m").unwrap().claimed_by().as_deref(), Some("p2"));
}

#[test]
fn registry_rejects_bad_names_duplicates_and_geometry() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "m", 1 << 20, 512).unwrap();
    assert!(matches!(
        malloc::create(&reg, "m", 1 << 20, 512),
        Err(BdevError::Exists(_))
    ));
    assert!(matches!(
        malloc::create(&reg, "bad name", 1 << 20, 512),
        Err(BdevError::InvalidName(_))
    ));
    assert!(matches!(
        malloc::create(&reg, "odd", 1 << 20, 520),
        Err(BdevError::InvalidGeometry { .. })
    ));
    assert!(matches!(
        null::create(&reg, "empty", 100, 512),
        Err(BdevError::InvalidGeometry { .. })
    ));
    let e = reg.lookup("nope").unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("known: m"), "{e}");
}

#[test]
fn channel_validates_range_buffer_and_support() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "m", 1 << 20, 512).unwrap();
    let desc = reg.open("m", true).unwrap();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        let n = ch.num_blocks();
        let mut st = |io| run_io(&mut ch, io).status;
        let mut ch2 = desc.channel().unwrap();
        let mut st2 = |io| run_io(&mut ch2, io).status;
        let buf = || DmaBuf::alloc(4096).unwrap();
        assert_eq!(
            st(BdevIo::read(n - 7, 8, buf(), 1)),
            IoStatus::Failed(IoError::OutOfRange)
        );
        assert_eq!(
            st2(BdevIo::read(u64::MAX, 2, buf(), 1)),
            IoStatus::Failed(IoError::OutOfRange)
        );
        assert_eq!(
            st2(BdevIo::write(0, 16, buf(), 1)),
            IoStatus::Failed(IoError::BadBuffer)
        );
        assert_eq!(
            st2(BdevIo::new(IoType::Write, 0, 1, 1)),
            IoStatus::Failed(IoError::BadBuffer)
        );
        assert_eq!(
            st2(BdevIo::read(0, 0, buf(), 1)),
            IoStatus::Failed(IoError::BadBuffer)
        );
        assert_eq!(
            st2(BdevIo::unmap(n, 1, 1)),
            IoStatus::Failed(IoError::OutOfRange)
        );
        assert_eq!(st2(BdevIo::read(n - 8, 8, buf(), 1)), IoStatus::Success);
    });
}

#[test]
fn completions_keep_their_tokens_and_buffers_under_load() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "m", 16 << 20, 512).unwrap();
    let desc = reg.open("m", true).unwrap();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        // 256 writes in flight, each with its own pattern, then read all back.
        for i in 0..256u64 {
            let buf = DmaBuf::from_slice(&pattern(i, 4096)).unwrap();
            ch.submit(BdevIo::write(i * 8, 8, buf, i));
        }
        let mut seen = vec![false; 256];
        while ch.inflight() > 0 {
            ch.poll(&mut |io| {
                assert!(io.status.is_success());
                assert_eq!(io.buf.as_deref().unwrap(), &pattern(io.token, 4096)[..]);
                assert!(
                    !std::mem::replace(&mut seen[io.token as usize], true),
                    "token returned twice"
                );
            });
        }
        assert!(seen.iter().all(|s| *s));
        for i in 0..256u64 {
            assert_eq!(read(&mut ch, i * 8, 8).unwrap(), pattern(i, 4096));
        }
    });
}

#[test]
fn each_core_has_its_own_channel_and_sees_the_others_writes() {
    let reg = BdevRegistry::new();
    malloc::create(&reg, "shared", 8 << 20, 512).unwrap();
    let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::SLEEP)).unwrap();
    let desc = Arc::new(reg.open("shared", true).unwrap());
    // Each core writes its own region through its own channel.
    let cores = rt
        .exec_all({
            let desc = desc.clone();
            move |core| {
                let mut ch = desc.channel().unwrap();
                let data = pattern(100 + core as u64, 64 * 1024);
                assert_eq!(write(&mut ch, core as u64 * 128, &data), IoStatus::Success);
                hotcopy_runtime::Reactor::current().core()
            }
        })
        .unwrap();
    assert_eq!(cores, vec![0, 1]);
    // Then each core reads the other core's region.
    let ok = rt
        .exec_all({
            let desc = desc.clone();
            move |core| {
                let other = 1 - core;
                let mut ch = desc.channel().unwrap();
                read(&mut ch, other as u64 * 128, 128).unwrap()
                    == pattern(100 + other as u64, 64 * 1024)
            }
        })
        .unwrap();
    assert_eq!(ok, vec![true, true]);
    rt.shutdown();
}

#[test]
fn malloc_reports_allocated_ranges_for_skipping_free_space() {
    let reg = BdevRegistry::new();
    let m = malloc::create(&reg, "m", 4 << 20, 512).unwrap();
    assert_eq!(
        m.allocated_ranges(),
        Some(vec![]),
        "a fresh RAM disk holds no data"
    );
    let desc = reg.open("m", true).unwrap();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        write(&mut ch, 0, &pattern(1, 512));
        write(&mut ch, 1024, &pattern(2, 512)); // granule 8 (64 KiB granules)
        write(&mut ch, 1100, &pattern(3, 512)); // same granule
    });
    let g = malloc::ALLOC_GRANULE / 512;
    assert_eq!(m.allocated_ranges(), Some(vec![(0, g), (1024, g)]));
    let desc = reg.open("m", true).unwrap();
    on_reactor(move |_| {
        let mut ch = desc.channel().unwrap();
        assert_eq!(unmap(&mut ch, 1024, g), IoStatus::Success);
    });
    assert_eq!(m.allocated_ranges(), Some(vec![(0, g)]));
}
