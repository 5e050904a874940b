//! The NBD server against a raw protocol client: handshake options, request
//! errors, bad input (wrong magic, unknown options, out-of-range and
//! oversize requests, abrupt disconnects), pipelining, structured replies,
//! requests larger than a connection's buffers, and stopping. Throughout, a
//! well-behaved client on another connection must keep being served.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hotcopy_bdev::testing::pattern;
use hotcopy_export::nbd::proto::*;
use hotcopy_export::{NbdError, NbdExport, NbdOptions};

/// A client that keeps writing and reading back its own region of `vol`
/// (the last MiB) until told to stop; returns how many round trips it made.
fn good_client(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let (mut c, _, _) = Raw::go(addr, "vol", false);
        let base = SIZE - (1 << 20);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) || n < 10 {
            let off = base + (n % 64) * 16384;
            let data = pattern(1000 + n, 16384);
            assert_eq!(c.write(2 * n, 0, off, &data), 0, "good client write {n}");
            assert_eq!(
                c.read(2 * n + 1, off, 16384).unwrap(),
                data,
                "good client read {n}"
            );
            n += 1;
        }
        c.request(CMD_DISC, 0, 0, 0, 0);
        assert!(c.closed(), "DISC closes the connection");
        n
    })
}

#[test]
fn handshake_options_and_their_errors() {
    let rig = Rig::start();
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(rig.addr, stop.clone());

    // Unknown client flags: dropped.
    let mut c = Raw::connect(rig.addr);
    c.put(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed(), "unknown client flags close the connection");

    // Garbage instead of IHAVEOPT: dropped.
    let mut c = Raw::connect(rig.addr);
    c.put(&1u32.to_be_bytes());
    c.put(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
    assert!(c.closed(), "a bad option magic closes the connection");

    // Unknown option, STARTTLS, meta contexts: ERR_UNSUP, and the session
    // goes on; LIST; INFO on a missing and an existing export; GO.
    let mut c = Raw::connect(rig.addr);
    c.put(&3u32.to_be_bytes());
    for opt in [
        0x1234u32,
        OPT_STARTTLS,
        OPT_SET_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
    ] {
        c.option(opt, b"whatever");
        let r = c.opt_reply();
        assert_eq!((r.option, r.kind), (opt, REP_ERR_UNSUP));
    }
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply();
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_SERVER);
        let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["vol", "ro", "k4"]);
    c.option(OPT_LIST, b"junk");
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    let info = |name: &str| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        d
    };
    c.option(OPT_INFO, &info("missing"));
    let r = c.opt_reply();
    assert_eq!(r.kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r.data).contains("missing"));
    c.option(OPT_INFO, &[0, 0, 0, 200, 0, 0]);
    assert_eq!(
        c.opt_reply().kind,
        REP_ERR_INVALID,
        "name length past the data"
    );
    c.option(OPT_INFO, &info("k4"));
    let mut seen = HashMap::new();
    loop {
        let r = c.opt_reply();
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_INFO);
        seen.insert(
            u16::from_be_bytes([r.data[0], r.data[1]]),
            r.data[2..].to_vec(),
        );
    }
    assert_eq!(
        u64::from_be_bytes(seen[&INFO_EXPORT][..8].try_into().unwrap()),
        8 << 20
    );
    assert_eq!(seen[&INFO_NAME], b"k4");
    assert_eq!(seen[&INFO_DESCRIPTION], b"4K blocks");
    let bs = &seen[&INFO_BLOCK_SIZE];
    let word = |i: usize| u32::from_be_bytes(bs[i..i + 4].try_into().unwrap());
    assert_eq!((word(0), word(4), word(8)), (4096, 4096, MAX_PAYLOAD));
    // Still in negotiation: ABORT gets an ACK and a close.
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    assert!(c.closed());

    // EXPORT_NAME of an unknown export: the protocol's only answer is a close.
    let mut c = Raw::connect(rig.addr);
    c.put(&3u32.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());

    // EXPORT_NAME of a known one (NO_ZEROES negotiated: size and flags only).
    let mut c = Raw::connect(rig.addr);
    c.put(&3u32.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"ro");
    let b = c.take(10);
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
    let flags = u16::from_be_bytes([b[8], b[9]]);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(c.read(1, 4096, 4096).unwrap(), rig.read(4096, 4096));

    // An oversize option is skipped (not buffered) and refused.
    let mut c = Raw::connect(rig.addr);
    c.put(&3u32.to_be_bytes());
    c.option(OPT_LIST, &vec![0u8; 1 << 20]);
    assert_eq!(c.opt_reply().kind, REP_ERR_TOO_BIG);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);

    // A client that vanishes mid-handshake.
    let mut c = Raw::connect(rig.addr);
    c.put(&3u32.to_be_bytes());
    c.put(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);

    stop.store(true, Ordering::Relaxed);
    assert!(good.join().unwrap() >= 10);
    let st = rig.server().stats();
    assert!(st.protocol_errors >= 3, "{st:?}");
}

#[test]
fn request_errors_follow_the_protocol_and_the_connection_goes_on() {
    let rig = Rig::start();
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(rig.addr, stop.clone());
    let (mut c, size, flags) = Raw::go(rig.addr, "vol", false);
    assert_eq!(size, SIZE);
    for f in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} advertised");
    }
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    let check = |c: &mut Raw| assert_eq!(c.read(99, 8192, 4096).unwrap(), rig.read(8192, 4096));

    assert_eq!(c.read(1, SIZE, 512), Err(EINVAL), "read at the end");
    assert_eq!(
        c.read(2, SIZE - 512, 1024),
        Err(EINVAL),
        "read across the end"
    );
    assert_eq!(
        c.read(3, u64::MAX - 511, 512),
        Err(EINVAL),
        "offset overflow"
    );
    assert_eq!(c.read(4, 100, 512), Err(EINVAL), "misaligned offset");
    assert_eq!(c.read(5, 0, 100), Err(EINVAL), "misaligned length");
    check(&mut c);
    // A refused write's payload is consumed: the stream stays in sync.
    assert_eq!(
        c.write(6, 0, SIZE - 512, &[7u8; 1024]),
        ENOSPC,
        "write across the end"
    );
    assert_eq!(c.write(7, 0, 3, &[7u8; 512]), EINVAL, "misaligned write");
    assert_eq!(c.write(8, 0x40, 0, &[7u8; 512]), EINVAL, "unknown flag");
    check(&mut c);
    c.request(0x77, 0, 9, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 9), "unknown command");
    c.request(CMD_BLOCK_STATUS, 0, 10, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 10), "no metadata context negotiated");
    c.request(CMD_READ, CMD_FLAG_DF, 11, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 11), "DF was not advertised");
    c.request(CMD_TRIM, 0, 12, SIZE, 4096);
    assert_eq!(c.simple(), (ENOSPC, 12), "trim past the end");
    // Oversize read: refused, and the connection goes on.
    c.request(CMD_READ, 0, 13, 0, 64 << 20);
    assert_eq!(c.simple(), (EINVAL, 13), "read over the maximum block size");
    check(&mut c);
    // Zero-length requests are no-ops.
    assert_eq!(c.read(14, 0, 0), Ok(vec![]));
    assert_eq!(c.write(15, 0, 0, &[]), 0);

    // Writes, trims and write-zeroes on the read-only export: EPERM.
    let (mut ro, _, rflags) = Raw::go(rig.addr, "ro", false);
    assert_ne!(rflags & FLAG_READ_ONLY, 0);
    assert_eq!(rflags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(ro.write(1, 0, 0, &[1u8; 4096]), EPERM);
    ro.request(CMD_TRIM, 0, 2, 0, 4096);
    assert_eq!(ro.simple(), (EPERM, 2));
    ro.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
    assert_eq!(ro.simple(), (EPERM, 3));
    ro.request(CMD_FLUSH, 0, 4, 0, 0);
    assert_eq!(ro.simple(), (EINVAL, 4), "flush was not advertised");
    assert_eq!(ro.read(5, 0, 4096).unwrap(), rig.read(0, 4096));
    assert_eq!(
        rig.read(0, 4096),
        pattern(SEED, 4096),
        "nothing was written"
    );

    // A 4K-block export rejects 512-byte alignment.
    let (mut k4, _, _) = Raw::go(rig.addr, "k4", false);
    assert_eq!(k4.read(1, 512, 512), Err(EINVAL));
    assert_eq!(k4.write(2, 0, 4096, &[9u8; 4096]), 0);
    assert_eq!(k4.read(3, 4096, 4096).unwrap(), vec![9u8; 4096]);

    // Trim, write-zeroes (NO_HOLE, FUA), FUA write, flush: effects land.
    assert_eq!(c.write(20, CMD_FLAG_FUA, 1 << 20, &[0xeeu8; 65536]), 0);
    assert_eq!(rig.read(1 << 20, 65536), vec![0xeeu8; 65536]);
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        21,
        1 << 20,
        8192,
    );
    assert_eq!(c.simple(), (0, 21));
    assert_eq!(rig.read(1 << 20, 8192), vec![0u8; 8192]);
    c.request(CMD_TRIM, 0, 22, (1 << 20) + 8192, 8192);
    assert_eq!(c.simple(), (0, 22));
    assert_eq!(
        rig.read((1 << 20) + 8192, 8192),
        vec![0u8; 8192],
        "malloc trims to zero"
    );
    c.request(CMD_FLUSH, 0, 23, 0, 0);
    assert_eq!(c.simple(), (0, 23));

    // A bad request magic: nothing more is read, the connection closes.
    c.put(&[0xde, 0xad, 0xbe, 0xef]);
    c.put(&[0u8; 24]);
    assert!(c.closed(), "a bad request magic closes the connection");

    stop.store(true, Ordering::Relaxed);
    assert!(good.join().unwrap() >= 10);
    let st = rig.server().stats();
    assert!(st.errors >= 18, "{st:?}");
    assert!(st.protocol_errors >= 1, "{st:?}");
}

#[test]
fn oversize_writes_and_abrupt_disconnects_leave_other_clients_alone() {
    let rig = Rig::start();
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(rig.addr, stop.clone());

    // An oversize write: EINVAL for it, replies for what came before, close.
    let (mut c, _, _) = Raw::go(rig.addr, "vol", false);
    c.request(CMD_READ, 0, 1, 0, 4096);
    c.request(CMD_WRITE, 0, 2, 0, 64 << 20);
    let mut got = HashMap::new();
    for _ in 0..2 {
        let (err, h) = c.simple();
        if h == 1 {
            assert_eq!(err, 0);
            assert_eq!(c.take(4096), rig.read(0, 4096));
        }
        got.insert(h, err);
    }
    assert_eq!(got[&2], EINVAL);
    assert!(c.closed(), "the oversize write's connection is closed");

    // Disconnect mid-header, mid-payload (with a full segment already
    // submitted), and after pipelining requests whose replies nobody reads.
    for case in 0..3 {
        let (mut c, _, _) = Raw::go(rig.addr, "vol", false);
        match case {
            0 => c.put(
                &encode_request(&Request {
                    flags: 0,
                    kind: CMD_READ,
                    handle: 1,
                    offset: 0,
                    length: 4096,
                })[..13],
            ),
            1 => {
                c.request(CMD_WRITE, 0, 1, 4 << 20, 1 << 20);
                c.put(&vec![0x42u8; 300 * 1024]);
            }
            _ => {
                for h in 0..100 {
                    c.request(CMD_READ, 0, h, 0, 1 << 20);
                }
            }
        }
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    // The partial write was never acknowledged; whatever landed, the rest of
    // the device is untouched.
    assert_eq!(
        rig.read(5 << 20, 1 << 20),
        pattern(SEED, 6 << 20)[5 << 20..].to_vec()
    );

    stop.store(true, Ordering::Relaxed);
    assert!(good.join().unwrap() >= 10);
    // Every connection is gone once the clients are.
    for _ in 0..500 {
        if rig.server().stats().connections_active == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = rig.server().stats();
    assert_eq!(st.connections_active, 0, "{st:?}");
    assert!(st.connections_total >= 5, "{st:?}");
}

#[test]
fn pipelined_requests_are_matched_by_handle() {
    let rig = Rig::start();
    let (mut c, _, _) = Raw::go(rig.addr, "vol", false);
    // 64 writes of distinct data, then 64 reads of the same places, all sent
    // before any reply is read.
    let mut expect = HashMap::new();
    for i in 0..64u64 {
        let data = pattern(77 + i, 8192);
        c.request(CMD_WRITE, 0, i, (8 << 20) + i * 8192, 8192);
        c.put(&data);
        expect.insert(1000 + i, data);
    }
    for i in 0..64u64 {
        c.request(CMD_FLUSH, 0, 500 + i, 0, 0);
    }
    let mut writes = 0;
    let mut flushes = 0;
    for _ in 0..128 {
        let (err, h) = c.simple();
        assert_eq!(err, 0, "handle {h}");
        if h < 64 {
            writes += 1;
        } else {
            assert!((500..564).contains(&h));
            flushes += 1;
        }
    }
    assert_eq!((writes, flushes), (64, 64));
    for i in 0..64u64 {
        c.request(CMD_READ, 0, 1000 + i, (8 << 20) + i * 8192, 8192);
    }
    for _ in 0..64 {
        let (err, h) = c.simple();
        assert_eq!(err, 0);
        let want = expect.remove(&h).expect("a reply per handle, once");
        assert_eq!(c.take(8192), want, "handle {h}");
    }
    assert!(expect.is_empty());
}

/// Sends a read and takes its structured reply, covering
/// `[offset, offset+len)`; returns the data, or the first error.
fn structured_read(c: &mut Raw, handle: u64, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
    c.request(CMD_READ, 0, handle, offset, len as u32);
    let mut data = vec![0u8; len];
    let mut covered = 0;
    let mut err = None;
    loop {
        let ch = c.chunk();
        assert_eq!(ch.handle, handle);
        match ch.kind {
            REPLY_TYPE_OFFSET_DATA => {
                let at = u64::from_be_bytes(ch.payload[..8].try_into().unwrap()) - offset;
                let body = &ch.payload[8..];
                data[at as usize..at as usize + body.len()].copy_from_slice(body);
                covered += body.len();
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let e = u32::from_be_bytes(ch.payload[..4].try_into().unwrap());
                err.get_or_insert(e);
            }
            REPLY_TYPE_NONE => assert!(ch.payload.is_empty()),
            k => panic!("unexpected chunk type {k:#x}"),
        }
        if ch.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    match err {
        Some(e) => Err(e),
        None => {
            assert_eq!(covered, len, "data chunks cover the request");
            Ok(data)
        }
    }
}

#[test]
fn structured_replies_for_reads_and_errors() {
    let rig = Rig::start();
    let (mut c, _, _) = Raw::go(rig.addr, "vol", true);
    // 300 KiB spans three segments: three OFFSET_DATA chunks.
    let got = structured_read(&mut c, 1, 4096, 300 * 1024).unwrap();
    assert_eq!(got, rig.read(4096, 300 * 1024));
    // Errors come as an ERROR chunk with a message, DONE set.
    c.request(CMD_READ, 0, 2, SIZE, 4096);
    let ch = c.chunk();
    assert_eq!(
        (ch.kind, ch.flags, ch.handle),
        (REPLY_TYPE_ERROR, REPLY_FLAG_DONE, 2)
    );
    assert_eq!(
        u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
        EINVAL
    );
    let msg_len = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
    assert!(String::from_utf8_lossy(&ch.payload[6..6 + msg_len]).contains("end of the export"));
    // A zero-length read: a NONE chunk with DONE.
    c.request(CMD_READ, 0, 3, 0, 0);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.flags), (REPLY_TYPE_NONE, REPLY_FLAG_DONE));
    // Other commands still get simple replies.
    assert_eq!(c.write(4, 0, 0, &[1u8; 512]), 0);
    // Pipelined structured reads.
    for i in 0..16u64 {
        c.request(CMD_READ, 0, 100 + i, i * 65536, 65536);
    }
    let mut seen = 0;
    while seen < 16 {
        let ch = c.chunk();
        assert_eq!(ch.kind, REPLY_TYPE_OFFSET_DATA);
        assert_ne!(ch.flags & REPLY_FLAG_DONE, 0, "one chunk per 64 KiB read");
        let i = ch.handle - 100;
        assert_eq!(ch.payload[8..], rig.read(i * 65536, 65536)[..]);
        seen += 1;
    }
}

#[test]
fn requests_larger_than_a_connections_buffers_stream_through_them() {
    // Four 64 KiB buffers per connection: a 32 MiB request is 512 segments.
    let rig = Rig::start_with(NbdOptions {
        segment_size: 64 * 1024,
        segments_per_connection: 4,
        ..NbdOptions::default()
    });
    let (mut c, _, _) = Raw::go(rig.addr, "vol", false);
    let big = pattern(4242, MAX_PAYLOAD as usize);
    assert_eq!(c.write(1, CMD_FLAG_FUA, 16 << 20, &big), 0);
    assert!(rig.read(16 << 20, big.len()) == big, "32 MiB write landed");
    assert!(
        c.read(2, 16 << 20, MAX_PAYLOAD).unwrap() == big,
        "32 MiB simple read"
    );
    // Mixed with small requests in the same pipeline.
    c.request(CMD_READ, 0, 3, 0, 4096);
    c.request(CMD_READ, 0, 4, 16 << 20, 8 << 20);
    c.request(CMD_READ, 0, 5, 4096, 4096);
    for _ in 0..3 {
        let (err, h) = c.simple();
        assert_eq!(err, 0);
        match h {
            3 => assert_eq!(c.take(4096), rig.read(0, 4096)),
            4 => assert!(c.take(8 << 20) == big[..8 << 20]),
            5 => assert_eq!(c.take(4096), rig.read(4096, 4096)),
            _ => panic!("handle {h}"),
        }
    }
    let (mut s, _, _) = Raw::go(rig.addr, "vol", true);
    let got = structured_read(&mut s, 9, 16 << 20, MAX_PAYLOAD as usize).unwrap();
    assert!(got == big, "32 MiB structured read");
}

#[test]
fn exports_come_and_go_and_stop_drains() {
    let mut rig = Rig::start();
    let server = rig.server();
    let err = server
        .add_export(NbdExport {
            name: "vol".into(),
            bdev: "vol".into(),
            read_only: true,
            description: String::new(),
        })
        .unwrap_err();
    assert!(matches!(err, NbdError::DuplicateExport { .. }), "{err}");
    let err = server
        .add_export(NbdExport {
            name: "x".into(),
            bdev: "nosuch".into(),
            read_only: false,
            description: String::new(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("nosuch"), "{err}");
    let err = server.remove_export("nosuch").unwrap_err();
    assert!(err.to_string().contains("vol, ro, k4"), "{err}");

    // Removing an export closes its connections (after their replies) and
    // refuses new ones; the others keep going.
    let (mut k4, _, _) = Raw::go(rig.addr, "k4", false);
    let (mut vol, _, _) = Raw::go(rig.addr, "vol", false);
    assert_eq!(k4.write(1, 0, 0, &[3u8; 4096]), 0);
    server.remove_export("k4").unwrap();
    assert!(k4.closed());
    let mut c = Raw::connect(rig.addr);
    c.put(&3u32.to_be_bytes());
    let mut d = 2u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"k4\0\0");
    c.option(OPT_GO, &d);
    assert_eq!(c.opt_reply().kind, REP_ERR_UNKNOWN);
    assert_eq!(vol.read(2, 0, 4096).unwrap(), rig.read(0, 4096));
    server
        .add_export(NbdExport {
            name: "k4".into(),
            bdev: "k4".into(),
            read_only: false,
            description: String::new(),
        })
        .unwrap();
    let (mut k4, _, _) = Raw::go(rig.addr, "k4", false);
    assert_eq!(k4.read(3, 0, 4096).unwrap(), vec![3u8; 4096]);

    // Stop with requests in flight: every acknowledged write is on the bdev,
    // and every connection is closed.
    let data = pattern(31337, 1 << 20);
    for i in 0..16u64 {
        vol.request(CMD_WRITE, 0, 100 + i, (32 << 20) + i * (1 << 20), 1 << 20);
        vol.put(&data);
    }
    let mut acked = Vec::new();
    for _ in 0..4 {
        let (err, h) = vol.simple();
        assert_eq!(err, 0);
        acked.push(h - 100);
    }
    let stats = rig.server.take().unwrap().stop().unwrap();
    assert_eq!(stats.connections_active, 0, "{stats:?}");
    // Writes the server had received when it stopped were finished and
    // replied to before the close; the rest were never read (and never
    // acknowledged).
    loop {
        let mut h = [0u8; 16];
        if std::io::Read::read_exact(&mut vol.s, &mut h).is_err() {
            break;
        }
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
        acked.push(u64::from_be_bytes(h[8..16].try_into().unwrap()) - 100);
    }
    assert!(acked.len() >= 4 && acked.len() <= 16, "{acked:?}");
    for i in acked {
        assert!(
            rig.read((32 << 20) + i * (1 << 20), 1 << 20) == data,
            "acknowledged write {i} is on the bdev"
        );
    }
    assert!(
        std::net::TcpStream::connect(rig.addr).is_err(),
        "the listener is closed"
    );
    assert!(!rig.unix.exists(), "the Unix socket file is removed");
}

/// xorshift64: the test's deterministic random source.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn random_requests_get_protocol_correct_replies_against_a_model() {
    let rig = Rig::start();
    let mut model = pattern(SEED, SIZE as usize);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut c, _, _) = Raw::go(rig.addr, "vol", false);
    let mut closes = 0;
    for handle in 0..3000u64 {
        let r = next(&mut rng);
        let kind = [
            CMD_READ,
            CMD_WRITE,
            CMD_READ,
            CMD_WRITE,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_WRITE_ZEROES,
        ][(r % 7) as usize];
        let kind = if r.is_multiple_of(97) {
            (r >> 8) as u16 % 12
        } else {
            kind
        };
        let flags = match (r >> 16) % 8 {
            0 => CMD_FLAG_FUA,
            1 => (r >> 24) as u16,
            2 => CMD_FLAG_NO_HOLE,
            _ => 0,
        };
        let offset = match (r >> 32) % 8 {
            0 => next(&mut rng),
            1 => SIZE - 512 * (next(&mut rng) % 4),
            2 => next(&mut rng) % SIZE,
            _ => (next(&mut rng) % (SIZE / 512)) * 512,
        };
        let length = match (r >> 40) % 8 {
            0 => (next(&mut rng) % 4096) as u32,
            1 => (64 << 20) + 512,
            2 => 0,
            _ => ((next(&mut rng) % 512) * 512) as u32,
        };
        let payload = if kind == CMD_WRITE && length <= 1 << 20 {
            pattern(handle, length as usize)
        } else {
            Vec::new()
        };
        if kind == CMD_WRITE && length > MAX_PAYLOAD {
            // Refused and closed; tested elsewhere. Keep the stream going.
            continue;
        }
        if kind == CMD_WRITE && length as usize != payload.len() {
            continue;
        }
        c.request(kind, flags, handle, offset, length);
        c.put(&payload);
        if kind == CMD_DISC {
            assert!(c.closed(), "DISC closes");
            closes += 1;
            c = Raw::go(rig.addr, "vol", false).0;
            continue;
        }
        let (err, h) = c.simple();
        assert_eq!(h, handle);
        assert!(
            [0, EINVAL, ENOSPC].contains(&err),
            "request {kind} {flags:#x} {offset:#x}+{length:#x}: error {err}"
        );
        let range = offset as usize..offset as usize + length as usize;
        if err != 0 {
            continue;
        }
        // Success must be for a valid request (a flush's offset and length
        // are reserved and ignored), and must have its effect.
        if kind != CMD_FLUSH {
            let what = format!("request {kind} {flags:#x} {offset:#x}+{length:#x}");
            assert!(
                offset.checked_add(length as u64).is_some_and(|e| e <= SIZE),
                "{what}: accepted out of range"
            );
            assert!(
                offset % 512 == 0 && length % 512 == 0,
                "{what}: accepted misaligned"
            );
        }
        match kind {
            CMD_READ => {
                let got = c.take(length as usize);
                assert!(got == model[range], "read {offset:#x}+{length:#x}");
            }
            CMD_WRITE => model[range].copy_from_slice(&payload),
            CMD_TRIM | CMD_WRITE_ZEROES => model[range].fill(0),
            CMD_FLUSH => {}
            k => panic!("command {k} succeeded"),
        }
    }
    assert!(
        rig.read(0, SIZE as usize) == model,
        "the device matches the model"
    );
    let st = rig.server().stats();
    assert!(
        st.errors > 100 && st.requests > 2000,
        "{st:?} ({closes} DISC)"
    );
}

#[test]
fn start_errors_name_the_problem() {
    let rig = Rig::start();
    let export = |name: &str, bdev: &str| NbdExport {
        name: name.into(),
        bdev: bdev.into(),
        read_only: false,
        description: String::new(),
    };
    let start = |listen: Vec<hotcopy_export::Listen>, exports, opts| {
        hotcopy_export::NbdServer::start_with(
            rig.rt(),
            &rig.reg,
            hotcopy_export::NbdConfig { listen, exports },
            opts,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let tcp = |a: std::net::SocketAddr| vec![hotcopy_export::Listen::Tcp(a)];
    let any = tcp("127.0.0.1:0".parse().unwrap());
    let e = start(tcp(rig.addr), vec![], NbdOptions::default());
    assert!(
        e.contains(&rig.addr.to_string()) && e.contains("in use"),
        "{e}"
    );
    let e = start(
        vec![hotcopy_export::Listen::Unix(rig.unix.clone())],
        vec![],
        NbdOptions::default(),
    );
    assert!(
        e.contains("nbd.sock") && e.contains("another server"),
        "{e}"
    );
    let e = start(
        any.clone(),
        vec![export("x", "nope")],
        NbdOptions::default(),
    );
    assert!(e.contains("\"x\"") && e.contains("nope"), "{e}");
    let e = start(
        any.clone(),
        vec![export("a", "vol"), export("a", "k4")],
        NbdOptions::default(),
    );
    assert!(e.contains("second export"), "{e}");
    let e = start(any.clone(), vec![export("", "vol")], NbdOptions::default());
    assert!(e.contains("empty"), "{e}");
    let e = start(vec![], vec![], NbdOptions::default());
    assert!(e.contains("no listen address"), "{e}");
    let e = start(
        any,
        vec![],
        NbdOptions {
            segment_size: 1000,
            ..NbdOptions::default()
        },
    );
    assert!(e.contains("segment_size 1000"), "{e}");
    // The running server was not disturbed.
    let (mut c, _, _) = Raw::go(rig.addr, "vol", false);
    assert_eq!(c.read(1, 0, 512).unwrap(), rig.read(0, 512));
}
