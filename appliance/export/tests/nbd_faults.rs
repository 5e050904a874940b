//! The NBD server over a `fault` bdev: bdev errors become NBD errors (simple
//! and structured), a read that fails after its simple reply header went out
//! ends the connection instead of delivering bad data, and writes the server
//! acknowledged as durable (FUA, or before a FLUSH reply) survive a power cut
//! of a disk with a volatile write cache.

mod common;

use std::net::SocketAddr;

use common::*;
use hotcopy_bdev::modules::{fault, malloc};
use hotcopy_bdev::testing::pattern;
use hotcopy_bdev::BdevRegistry;
use hotcopy_export::nbd::proto::*;
use hotcopy_export::{Listen, NbdConfig, NbdExport, NbdOptions, NbdServer};
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};

const FSIZE: u64 = 16 << 20;

struct FaultRig {
    server: Option<NbdServer>,
    ctl: fault::FaultControl,
    reg: BdevRegistry,
    rt: Option<Runtime>,
    addr: SocketAddr,
}

impl FaultRig {
    fn start(opts: NbdOptions) -> FaultRig {
        let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::SLEEP)).unwrap();
        let reg = BdevRegistry::new();
        malloc::create(&reg, "base", FSIZE, 512).unwrap();
        let (_, ctl) = fault::create(
            &reg,
            "f",
            "base",
            fault::FaultOptions {
                volatile_cache: true,
                seed: 7,
                ..Default::default()
            },
        )
        .unwrap();
        let server = NbdServer::start_with(
            &rt,
            &reg,
            NbdConfig {
                listen: vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
                exports: vec![NbdExport {
                    name: "f".into(),
                    bdev: "f".into(),
                    read_only: false,
                    description: String::new(),
                }],
            },
            opts,
        )
        .unwrap();
        let addr = server.tcp_addr().unwrap();
        FaultRig {
            server: Some(server),
            ctl,
            reg,
            rt: Some(rt),
            addr,
        }
    }

    /// The base bdev's bytes (what survives the fault bdev's cache).
    fn base(&self, offset: u64, len: usize) -> Vec<u8> {
        let desc = self.reg.open("base", false).unwrap();
        read(self.rt.as_ref().unwrap(), &desc, offset, len)
    }
}

impl Drop for FaultRig {
    fn drop(&mut self) {
        self.ctl.clear();
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown();
        }
    }
}

#[test]
fn bdev_errors_become_nbd_errors() {
    let rig = FaultRig::start(NbdOptions::default());
    let (mut c, _, flags) = Raw::go(rig.addr, "f", false);
    assert_ne!(flags & FLAG_SEND_FUA, 0);
    let data = pattern(5, 65536);
    assert_eq!(c.write(1, 0, 0, &data), 0);
    rig.ctl.fail_next_reads(1);
    assert_eq!(c.read(2, 0, 65536), Err(EIO));
    rig.ctl.fail_next_writes(1);
    assert_eq!(c.write(3, 0, 0, &[0u8; 4096]), EIO);
    rig.ctl.fail_next_writes(1);
    c.request(CMD_WRITE_ZEROES, 0, 4, 0, 4096);
    assert_eq!(c.simple(), (EIO, 4));
    assert_eq!(
        c.read(5, 0, 65536).unwrap(),
        data,
        "failed writes changed nothing"
    );
    // A read of three segments whose first segment fails: a clean EIO.
    rig.ctl.fail_next_reads(1);
    assert_eq!(c.read(6, 0, 300 << 10), Err(EIO));
    assert_eq!(c.read(7, 0, 4096).unwrap(), data[..4096]);

    // Structured: the failed segment is an ERROR_OFFSET chunk, the others
    // still carry their data, DONE comes last.
    let (mut s, _, _) = Raw::go(rig.addr, "f", true);
    rig.ctl.fail_next_reads(1);
    s.request(CMD_READ, 0, 9, 0, 300 << 10);
    let (mut errors, mut data_chunks) = (Vec::new(), 0);
    loop {
        let ch = s.chunk();
        assert_eq!(ch.handle, 9);
        match ch.kind {
            REPLY_TYPE_ERROR_OFFSET => {
                let e = u32::from_be_bytes(ch.payload[..4].try_into().unwrap());
                let off = u64::from_be_bytes(ch.payload[6..14].try_into().unwrap());
                errors.push((e, off));
            }
            REPLY_TYPE_OFFSET_DATA => data_chunks += 1,
            k => panic!("chunk type {k:#x}"),
        }
        if ch.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(errors, [(EIO, 0)], "segment 0 failed");
    assert_eq!(data_chunks, 2);
    assert_eq!(rig.server.as_ref().unwrap().stats().errors, 5);
}

#[test]
fn a_simple_read_that_fails_after_its_header_never_delivers_bad_data() {
    // Two 64 KiB buffers per connection: a 1 MiB read streams its 16
    // segments, so its header leaves before the later segments are read.
    let rig = FaultRig::start(NbdOptions {
        segment_size: 64 << 10,
        segments_per_connection: 2,
        ..NbdOptions::default()
    });
    let (mut c, _, _) = Raw::go(rig.addr, "f", false);
    let data = pattern(11, 1 << 20);
    assert_eq!(c.write(1, CMD_FLAG_FUA, 0, &data), 0);
    let mut outcomes = [0usize; 3];
    rig.ctl.set_read_error_rate(0.05);
    for attempt in 0..20u64 {
        let (mut c, _, _) = Raw::go(rig.addr, "f", false);
        c.request(CMD_READ, 0, attempt, 0, 1 << 20);
        let (err, h) = c.simple();
        assert_eq!(h, attempt);
        if err != 0 {
            assert_eq!(err, EIO);
            outcomes[0] += 1; // the first segment failed: a clean error
            continue;
        }
        let mut got = vec![0u8; 1 << 20];
        match std::io::Read::read_exact(&mut c.s, &mut got) {
            Ok(()) => {
                assert!(got == data, "a read reported as good delivers good data");
                outcomes[1] += 1;
            }
            Err(_) => outcomes[2] += 1, // a later segment failed: cut off
        }
    }
    rig.ctl.set_read_error_rate(0.0);
    eprintln!("clean errors, good reads, cut-off reads: {outcomes:?}");
    assert!(outcomes[2] > 0, "some read failed mid-stream: {outcomes:?}");
    // The server is fine afterwards.
    assert_eq!(c.read(99, 0, 4096).unwrap(), data[..4096]);
}

#[test]
fn acknowledged_durable_writes_survive_a_power_cut() {
    let rig = FaultRig::start(NbdOptions::default());
    let (mut c, _, _) = Raw::go(rig.addr, "f", false);
    // Each phase ends with a power cut, so that no later flush can make up
    // for a missing one.
    let cut = || {
        rig.ctl.power_cut();
        rig.ctl.power_on();
    };

    // Plain writes, then FLUSH: they survive; a write after it does not.
    let a = pattern(1, 1 << 20);
    for i in 0..4usize {
        let part = &a[i << 18..(i + 1) << 18];
        assert_eq!(c.write(i as u64, 0, (i as u64) << 18, part), 0);
    }
    c.request(CMD_FLUSH, 0, 10, 0, 0);
    assert_eq!(c.simple(), (0, 10));
    assert_eq!(c.write(11, 0, 8 << 20, &[0x5au8; 65536]), 0);
    assert!(rig.ctl.dirty_blocks() > 0, "the cache holds the last write");
    cut();
    assert_eq!(rig.base(0, 1 << 20), a, "flushed writes survive");
    assert!(rig.ctl.dropped_writes() > 0, "the unflushed write was lost");
    assert_ne!(rig.base(8 << 20, 65536), vec![0x5au8; 65536]);

    // A FUA write survives on its own.
    let b = pattern(2, 256 << 10);
    assert_eq!(c.write(12, CMD_FLAG_FUA, 2 << 20, &b), 0);
    cut();
    assert_eq!(rig.base(2 << 20, 256 << 10), b, "FUA writes survive");

    // So does a FUA write-zeroes (over data that was flushed before). The
    // fault device makes write-zeroes write-through, so this checks the
    // result; the flush the server adds after it is not observable here.
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 13, 0, 32 << 10);
    assert_eq!(c.simple(), (0, 13));
    cut();
    let mut az = a[..64 << 10].to_vec();
    az[..32 << 10].fill(0);
    assert_eq!(rig.base(0, 64 << 10), az, "FUA write-zeroes survive");

    // A connection that wrote flushes when it closes.
    assert_eq!(c.write(15, 0, 9 << 20, &[0x77u8; 65536]), 0);
    c.request(CMD_DISC, 0, 16, 0, 0);
    assert!(c.closed());
    for _ in 0..200 {
        if rig.ctl.dirty_blocks() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    cut();
    assert_eq!(
        rig.base(9 << 20, 65536),
        vec![0x77u8; 65536],
        "flushed at disconnect"
    );
}
