//! The seed corpora: small valid (and a few typical invalid) inputs for each
//! target, so the fuzzer starts deep inside each format instead of
//! rediscovering magic numbers and checksums.
//!
//! `fuzz/corpus/<target>/` holds them, written by
//! `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_seeds`
//! (run it again after changing this file). The tests below run every check
//! over these seeds and over everything under `fuzz/corpus/`, so a crash
//! input copied there becomes a regression test that needs no fuzzer.

use hotcopy_export::nbd::handshake::MAX_OPTION_DATA;
use hotcopy_export::nbd::proto::*;

use crate::format::{Catalog, Superblock, SLOT_BYTES};
use crate::repo::{template, PATCH_UNIT};

/// One seed: its target, file name and bytes.
#[derive(Debug, Clone)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut v = Vec::new();
    let mut add = |target, name: &str, bytes: Vec<u8>| {
        v.push(Seed {
            target,
            name: name.to_string(),
            bytes,
        })
    };
    for (name, bytes) in handshakes() {
        add("nbd_handshake", name, bytes);
    }
    for (name, bytes) in requests() {
        add("nbd_request", name, bytes);
    }
    for (name, text) in configs() {
        add("config_yaml", name, text.into_bytes());
    }
    for (name, text) in specs() {
        add("bdev_spec", name, text.as_bytes().to_vec());
    }
    for (name, bytes) in repo_structures() {
        add("repo_format", name, bytes);
    }
    for (name, bytes) in repo_images() {
        add("repo_open", name, bytes);
    }
    for (name, text) in crate::rpc::seeds() {
        add("rpc_request", name, text.into_bytes());
    }
    v
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// A handshake input: the split mode, the client flags, then the options.
fn handshake(mode: u8, flags: u32, options: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![mode];
    b.extend_from_slice(&flags.to_be_bytes());
    for o in options {
        b.extend_from_slice(o);
    }
    b
}

fn handshakes() -> Vec<(&'static str, Vec<u8>)> {
    let both = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let session = [
        option(OPT_STRUCTURED_REPLY, &[]),
        option(OPT_LIST, &[]),
        option(OPT_INFO, &info_data("ro", &[INFO_NAME, INFO_DESCRIPTION])),
        option(OPT_STARTTLS, &[]),
        option(OPT_SET_META_CONTEXT, b"base:allocation"),
        option(OPT_GO, &info_data("vol", &[INFO_BLOCK_SIZE, INFO_NAME])),
    ];
    let mut with_tail = handshake(0, both, &session);
    with_tail.extend_from_slice(&encode_request(&Request {
        flags: 0,
        kind: CMD_READ,
        handle: 1,
        offset: 0,
        length: 4096,
    }));
    let oversize = {
        let mut o = option(OPT_LIST, &vec![0x5a; MAX_OPTION_DATA as usize + 1]);
        o.extend(option(OPT_GO, &info_data("", &[])));
        o
    };
    vec![
        ("go-session", with_tail),
        ("go-session-bytewise", handshake(1, both, &session)),
        ("go-session-pieces", handshake(2 | (9 << 2), both, &session)),
        (
            "export-name-old-style",
            handshake(3, 0, &[option(OPT_EXPORT_NAME, b"ro")]),
        ),
        (
            "export-name-unknown",
            handshake(0, both, &[option(OPT_EXPORT_NAME, b"nope")]),
        ),
        (
            "info-errors-then-abort",
            handshake(
                0,
                FLAG_C_FIXED_NEWSTYLE,
                &[
                    option(OPT_INFO, &info_data("nope", &[])),
                    option(OPT_INFO, &[0, 0, 0, 9, 0]),
                    option(OPT_LIST, b"x"),
                    option(OPT_STRUCTURED_REPLY, b"x"),
                    option(99, b"junk"),
                    option(OPT_ABORT, &[]),
                ],
            ),
        ),
        (
            "oversize-option",
            handshake(3 | (5 << 2), both, &[oversize]),
        ),
        ("bad-flags", handshake(0, 1 << 5, &[])),
        ("bad-option-magic", {
            let mut b = handshake(0, both, &[]);
            b.extend_from_slice(b"GARBAGE!\0\0\0\x07\0\0\0\0");
            b
        }),
    ]
}

/// A request input: header, then geometry (size, min block, max payload,
/// flags) and switches, as `nbd_request` reads them.
fn request(r: Request, size: u64, min_block_shift: u32, tflags: u16, switches: u8) -> Vec<u8> {
    let mut b = encode_request(&r).to_vec();
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&min_block_shift.to_le_bytes());
    b.extend_from_slice(&MAX_PAYLOAD.to_le_bytes());
    b.extend_from_slice(&tflags.to_le_bytes());
    b.push(switches);
    b
}

fn requests() -> Vec<(&'static str, Vec<u8>)> {
    let all = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    let req = |kind, flags, offset, length| Request {
        flags,
        kind,
        handle: 0x1122_3344_5566_7788,
        offset,
        length,
    };
    let mib = 1 << 20;
    vec![
        (
            "read",
            request(req(CMD_READ, 0, 4096, 4096), mib, 9, all, 0),
        ),
        (
            "write-fua",
            request(req(CMD_WRITE, CMD_FLAG_FUA, 0, 512), mib, 9, all, 8),
        ),
        ("trim", request(req(CMD_TRIM, 0, 0, 65536), mib, 12, all, 0)),
        (
            "write-zeroes-no-hole",
            request(
                req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20),
                mib,
                9,
                all,
                0,
            ),
        ),
        ("flush", request(req(CMD_FLUSH, 0, 5, 7), mib, 9, all, 0)),
        ("disc", request(req(CMD_DISC, 0, 0, 0), mib, 9, all, 0)),
        (
            "read-past-end",
            request(req(CMD_READ, 0, mib - 512, 1024), mib, 9, all, 0),
        ),
        (
            "read-offset-overflow",
            request(req(CMD_READ, 0, u64::MAX - 511, 512), mib, 9, all, 0),
        ),
        (
            "write-read-only",
            request(
                req(CMD_WRITE, 0, 0, 512),
                mib,
                9,
                FLAG_HAS_FLAGS | FLAG_READ_ONLY,
                0,
            ),
        ),
        (
            "write-oversize",
            request(req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 512), 1 << 40, 9, all, 0),
        ),
        ("bad-magic", {
            let mut b = request(req(CMD_READ, 0, 0, 512), mib, 9, all, 0);
            b[0] = 0;
            b
        }),
        (
            "short",
            encode_request(&req(CMD_READ, 0, 0, 512))[..20].to_vec(),
        ),
    ]
}

fn configs() -> Vec<(&'static str, String)> {
    let example = |text: &str| text.to_string();
    vec![
        (
            "example-appliance.yaml",
            example(include_str!("../../config/examples/appliance.yaml")),
        ),
        (
            "example-malloc.yaml",
            example(include_str!("../../config/examples/malloc.yaml")),
        ),
        (
            "example-stack.yaml",
            example(include_str!("../../config/examples/stack.yaml")),
        ),
        (
            "example-uring.yaml",
            example(include_str!("../../config/examples/uring.yaml")),
        ),
        (
            "every-module.yaml",
            "reactors: {cores: [0, 1], idle: sleep}\n\
             buffer_pool: {hugepages: off, buffer_size: 64KiB, count: 16}\n\
             bdevs:\n\
             \x20 - {name: m, type: malloc, size: 64MiB, block_size: 4096}\n\
             \x20 - {name: n, type: null, size: 1G}\n\
             \x20 - {name: pt, type: passthru, base: m}\n\
             \x20 - name: f\n\
             \x20   type: fault\n\
             \x20   base: {type: malloc, size: 8M}\n\
             \x20   read_error_rate: 0.25\n\
             \x20   latency_us: 10\n\
             \x20   volatile_cache: true\n\
             \x20 - {name: c, type: cow, base: n, tracking: {bdev: malloc:1M, offset: 0}}\n\
             exports:\n\
             \x20 - {bdev: pt, name: vol, listen: \"[::1]:10809\", read_only: true}\n\
             \x20 - {bdev: c, listen: unix:/tmp/fuzz-nbd.sock}\n"
                .to_string(),
        ),
        (
            "errors-schema.yaml",
            "reactors:\n  idle: spin\nbdevs:\n  - {name: a, type: malloc, size: 12X, blok_size: 512}\n"
                .to_string(),
        ),
        (
            "errors-cycle.yaml",
            "bdevs:\n  - {name: a, type: passthru, base: b}\n  - {name: b, type: passthru, base: a}\n"
                .to_string(),
        ),
        (
            "errors-syntax.yaml",
            "bdevs:\n  - name: a\n   type: [malloc\n".to_string(),
        ),
        ("empty.yaml", String::new()),
    ]
}

fn specs() -> Vec<(&'static str, &'static str)> {
    vec![
        ("malloc", "malloc:1G"),
        ("null-block", "null:4G:4096"),
        ("uring-size", "uring:/var/tmp/x@dir/disk.img@4GiB"),
        ("uring-prealloc", "uring:/var/tmp/disk.img@4G:prealloc"),
        ("stack", "passthru:fault:cow:malloc:64M:4K"),
        ("size-spaced", " 512 MiB "),
        ("listen-v4", "127.0.0.1:10809"),
        ("listen-v6", "[::1]:10809"),
        ("listen-unix", "unix:/run/hotcopy/nbd.sock"),
        ("bad-type", "disk:1G"),
    ]
}

/// `repo_format` inputs: the selector byte (decoder + 3 × switches), the
/// decoder's fields, the structure.
fn repo_structures() -> Vec<(&'static str, Vec<u8>)> {
    let image = template();
    let dev = image.len() as u64;
    let sb = Superblock::decode(&image[..SLOT_BYTES], dev).expect("template superblock");
    let mut superblock = vec![0u8];
    superblock.extend_from_slice(&dev.to_le_bytes());
    superblock.extend_from_slice(&image[..SLOT_BYTES]);

    let c = sb.catalog;
    let body = &image[c.offset as usize..(c.offset + c.len) as usize];
    let cat = Catalog::decode(body, &sb.uuid, sb.ns_size).expect("template catalog");
    let mut catalog = vec![1u8];
    catalog.extend_from_slice(&sb.ns_size.to_le_bytes());
    catalog.extend_from_slice(&sb.uuid);
    catalog.extend_from_slice(body);

    let mut v = vec![("superblock", superblock), ("catalog", catalog)];
    // The first index block of each complete generation.
    for (name, g) in ["index-full", "index-incremental"]
        .into_iter()
        .zip(cat.gens.iter().filter(|g| g.index.is_some()))
    {
        let idx = g.index.expect("filtered");
        let mut b = vec![2u8];
        b.extend_from_slice(&(g.id as u32).to_le_bytes());
        b.extend_from_slice(&g.chunks_total.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.push(g.chunk_size.trailing_zeros() as u8 - 12);
        b.extend_from_slice(&sb.ns_size.to_le_bytes());
        b.extend_from_slice(&image[idx.offset as usize..(idx.offset + idx.len) as usize]);
        v.push((name, b));
    }
    v
}

/// `repo_open` inputs: switches, then patches.
fn repo_images() -> Vec<(&'static str, Vec<u8>)> {
    let patch = |offset: usize, bytes: &[u8]| {
        let mut p = ((offset / PATCH_UNIT) as u16).to_le_bytes().to_vec();
        p.push(bytes.len() as u8);
        p.extend_from_slice(bytes);
        p
    };
    // Slot 1's sequence damaged and its crc left alone: a torn write.
    let mut torn = vec![0x03];
    torn.extend(patch(SLOT_BYTES + 16, &[0xff; 8]));
    let mut source_size = vec![0x47];
    // The first catalog record's source size (record at 64, field at 32).
    let sb = Superblock::decode(&template()[..SLOT_BYTES], u64::MAX).expect("template");
    source_size.extend(patch(
        sb.catalog.offset as usize + 64 + 32,
        &(100u64 << 10).to_le_bytes(),
    ));
    vec![
        ("clean-then-backup", vec![0x47]),
        ("clean-4k-blocks", vec![0x4f]),
        ("torn-slot", torn),
        ("source-size", source_size),
        ("device-shrunk", vec![0x57]),
        ("crc-damage", {
            let mut b = vec![0x00];
            b.extend(patch(8192, &[1, 2, 3, 4]));
            b
        }),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn check(target: &str) -> crate::Check {
        crate::TARGETS
            .iter()
            .find(|(name, _)| *name == target)
            .map(|(_, f)| *f)
            .unwrap_or_else(|| panic!("no target {target}"))
    }

    fn corpus_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
    }

    #[test]
    fn every_seed_passes_its_check() {
        for s in all() {
            eprintln!("{}/{}", s.target, s.name);
            check(s.target)(&s.bytes);
        }
    }

    /// Everything committed under `corpus/` (seeds and regressions).
    #[test]
    fn committed_corpus_passes() {
        for (target, _) in crate::TARGETS {
            let Ok(dir) = std::fs::read_dir(corpus_dir().join(target)) else {
                continue;
            };
            for entry in dir {
                let path = entry.expect("corpus entry").path();
                eprintln!("{}", path.display());
                check(target)(&std::fs::read(&path).expect("corpus file"));
            }
        }
    }

    #[test]
    fn committed_seeds_are_current() {
        for s in all() {
            let path = corpus_dir().join(s.target).join(&s.name);
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == s.bytes,
                "{} is stale: run `cargo test -- --ignored write_seeds` in fuzz/",
                path.display()
            );
        }
    }

    #[test]
    #[ignore = "writes fuzz/corpus/; run by hand after changing the seeds"]
    fn write_seeds() {
        for s in all() {
            let dir = corpus_dir().join(s.target);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            std::fs::write(dir.join(&s.name), &s.bytes).expect("seed file");
        }
    }
}
