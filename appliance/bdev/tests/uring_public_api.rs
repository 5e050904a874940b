//! The uring module through its public API only: options, `create`, a
//! passthru stacked on it, pooled buffers, and channels on real reactors.

use hotcopy_bdev::modules::{passthru, uring};
use hotcopy_bdev::testing::{flush, pattern, read, run_io, unmap, write};
use hotcopy_bdev::{BdevError, BdevIo, BdevRegistry, IoStatus, IoType};
use hotcopy_runtime::{BufferPool, HugepageMode, IdlePolicy, Runtime, RuntimeConfig};

const MIB: u64 = 1 << 20;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hotcopy-uring-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

#[test]
fn options_default_and_create_registers_a_uring_bdev() {
    let o = uring::UringOptions::new("/var/tmp/x.img");
    assert_eq!(o.size, None);
    assert_eq!(o.block_size, None);
    assert!(o.direct);
    assert_eq!(o.queue_depth, uring::DEFAULT_QUEUE_DEPTH);
    assert!(!o.preallocate);

    let dir = scratch();
    let mut o = uring::UringOptions::new(dir.path().join("disk.img"));
    o.size = Some(4 * MIB);
    let reg = BdevRegistry::new();
    let b = uring::create(&reg, "disk0", &o).unwrap();
    assert_eq!(reg.lookup("disk0").unwrap().info(), b.info());
    assert_eq!(b.info().product, "uring");
    assert_eq!(b.size_bytes(), 4 * MIB);
    assert!(b.supports(IoType::Unmap));
    let e = uring::create(
        &reg,
        "disk1",
        &uring::UringOptions::new(dir.path().join("nope")),
    )
    .unwrap_err();
    assert!(matches!(e, BdevError::Create { .. }), "{e:?}");
}

#[test]
fn passthru_on_uring_on_two_reactors() {
    let dir = scratch();
    let path = dir.path().join("disk.img");
    let mut o = uring::UringOptions::new(&path);
    o.size = Some(8 * MIB);
    o.queue_depth = 32;
    let reg = BdevRegistry::new();
    uring::create(&reg, "base", &o).unwrap();
    passthru::create(&reg, "top", "base").unwrap();
    let desc = reg.open("top", true).unwrap();

    let rt = Runtime::start(RuntimeConfig {
        cores: vec![0, 1],
        idle: IdlePolicy::Poll,
        pin: false,
    })
    .unwrap();
    let results = rt
        .exec_all(move |core| {
            let mut ch = desc.channel().unwrap();
            let pool = BufferPool::new(64 * 1024, 128, HugepageMode::Off).unwrap();
            let first = core as u64 * 4096; // blocks: 2 MiB apart
                                            // 128 writes of 64 KiB from pooled buffers, all in flight at once
                                            // (more than one core's ring holds at a depth of 32).
            for i in 0..128u64 {
                let mut buf = pool.get(64 * 1024).unwrap();
                buf.copy_from_slice(&pattern(core as u64 * 1000 + i, 64 * 1024));
                ch.submit(BdevIo::write(first + (i % 16) * 128, 128, buf, i));
            }
            let mut done = 0;
            while done < 128 {
                ch.poll(&mut |io| {
                    assert_eq!(io.status, IoStatus::Success, "write {}", io.token);
                    done += 1;
                });
            }
            assert_eq!(pool.available(), 128, "every buffer came back");
            assert_eq!(flush(&mut ch), IoStatus::Success);
            // The last write to each slot wins (same-channel writes to one
            // range may complete in any order, so compare with one of them).
            for slot in 0..16u64 {
                let got = read(&mut ch, first + slot * 128, 128).unwrap();
                let matches =
                    (0..8).any(|k| got == pattern(core as u64 * 1000 + slot + 16 * k, 64 * 1024));
                assert!(matches, "core {core} slot {slot} holds one of its writes");
            }
            assert_eq!(unmap(&mut ch, first, 128), IoStatus::Success);
            assert!(read(&mut ch, first, 128).unwrap().iter().all(|&x| x == 0));
            let d = pattern(99, 4096);
            assert_eq!(write(&mut ch, first + 2048, &d), IoStatus::Success);
            let io = run_io(
                &mut ch,
                BdevIo::read(first + 2048, 8, pool.get(4096).unwrap(), 7),
            );
            assert_eq!((io.status, io.token), (IoStatus::Success, 7));
            io.buf.map(|b| b.to_vec()) == Some(d)
        })
        .unwrap();
    assert_eq!(results, vec![true, true]);
    rt.shutdown();
}
