//! `repo_format` and `repo_open`: the backup repository's on-disk format.

use std::ops::Range;
use std::sync::OnceLock;

use hotcopy_cow::repo::{self, BlockIo, GenSpec, MemIo, Repo, SourceIdent};

use crate::format::{
    chunk_size_ok, decode_index_block, encode_index_block, index_len, round_up, Catalog, GenState,
    Generation, IndexShape, RawEntry, SlotProblem, Superblock, ALLOC_UNIT, CATALOG_HEADER_BYTES,
    ENTRIES_PER_BLOCK, INDEX_BLOCK_BYTES, INDEX_HEADER_BYTES, INDEX_MAGIC, MAX_CATALOG_BYTES,
    MAX_GENERATION_ID, MAX_NAME_BYTES, META_START, MIN_NAMESPACE_BYTES, RECORD_FIXED_BYTES,
    SB_MAGIC, SLOT_BYTES,
};
use crate::Fields;

/// Where a superblock slot keeps its crc32c (of the bytes before it).
const SB_CRC_AT: usize = SLOT_BYTES - 4;

/// `repo_format`: the superblock, catalog and index-block decoders.
///
/// Input: byte 0 picks the decoder (its value mod 3) and switches (its value
/// div 3); the fields each decoder needs follow, then the structure's bytes.
/// The switches help the fuzzer past what it cannot guess: they recompute a
/// crc32c, copy the uuid the catalog holds into the expected one, or write
/// the expected index-block header.
///
/// * superblock (0): device size (u64; switch 1: unlimited), then the slot,
///   zero-padded to 4096 bytes (switch 2: as given, any length; switch 4:
///   with its crc recomputed). Accepted: the fields are in range, and the
///   slot re-encodes to bytes that decode equal (to the same bytes when its
///   reserved area was zero). Refused: an all-zero slot is `Blank`, and
///   `NoMagic` exactly when the magic is missing.
/// * catalog (1): namespace size (u64; switch 1: 1 TiB), uuid, then the
///   catalog bytes (switch 2: the uuid they hold is the expected one).
///   Accepted: every record is consistent with itself and the namespace,
///   and the catalog re-encodes to at most as many bytes, which decode equal.
/// * index block (2): generation (u32), chunks (u64; switch 1: below 1024),
///   block (u64, reduced to a block of that index, as the repository only
///   reads those), chunk size (u8: 4 KiB << n mod 13), namespace size (u64;
///   switch 2: 1 TiB), then the block, zero-padded to 4096 bytes (switch 4:
///   with the expected header; 8: crc recomputed; 16: as given, any length).
///   Accepted: as many entries as the block covers, each a valid location
///   stored by a generation up to this one, and the entries re-encode to
///   exactly the same block. Refused: nothing is appended.
pub fn repo_format(data: &[u8]) {
    let mut f = Fields::new(data);
    let sel = f.u8();
    let switches = sel / 3;
    match sel % 3 {
        0 => superblock(switches, f),
        1 => catalog(switches, f),
        _ => index_block(switches, f),
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

fn zero_padded(body: &[u8], len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    let n = body.len().min(len);
    b[..n].copy_from_slice(&body[..n]);
    b
}

fn superblock(switches: u8, mut f: Fields<'_>) {
    let dev = match f.u64() {
        _ if switches & 1 != 0 => u64::MAX,
        d => d,
    };
    let body = f.rest();
    let slot = if switches & 2 != 0 {
        body.to_vec()
    } else {
        let mut s = zero_padded(body, SLOT_BYTES);
        if switches & 4 != 0 {
            let crc = crc32c::crc32c(&s[..SB_CRC_AT]);
            put_u32(&mut s, SB_CRC_AT, crc);
        }
        s
    };
    match Superblock::decode(&slot, dev) {
        Ok(sb) => {
            assert_eq!(slot.len(), SLOT_BYTES);
            assert!(sb.ns_size.is_multiple_of(ALLOC_UNIT) && sb.ns_size >= MIN_NAMESPACE_BYTES);
            assert!(sb.ns_size <= dev);
            let c = sb.catalog;
            assert!((CATALOG_HEADER_BYTES as u64..=MAX_CATALOG_BYTES).contains(&c.len));
            assert!(c.offset.is_multiple_of(ALLOC_UNIT) && c.offset >= META_START);
            assert!(c
                .offset
                .checked_add(round_up(c.len))
                .is_some_and(|end| end <= sb.ns_size));
            let enc = sb.encode();
            assert_eq!(Superblock::decode(&enc, dev), Ok(sb.clone()));
            if slot[68..SB_CRC_AT].iter().all(|&b| b == 0) {
                assert_eq!(enc, slot, "an accepted slot re-encodes to itself");
            }
        }
        Err(p) => {
            assert!(!p.to_string().is_empty());
            if slot.len() == SLOT_BYTES {
                let blank = slot.iter().all(|&b| b == 0);
                assert_eq!(p == SlotProblem::Blank, blank, "{p}");
                let no_magic = &slot[..8] != SB_MAGIC && !blank;
                assert_eq!(p == SlotProblem::NoMagic, no_magic, "{p}");
                assert_eq!(p.has_magic(), &slot[..8] == SB_MAGIC, "{p}");
            }
        }
    }
}

fn catalog(switches: u8, mut f: Fields<'_>) {
    let ns = match f.u64() {
        _ if switches & 1 != 0 => 1 << 40,
        n => n,
    };
    let mut uuid: [u8; 16] = f.bytes();
    let body = f.rest();
    if switches & 2 != 0 && body.len() >= 24 {
        uuid.copy_from_slice(&body[8..24]);
    }
    match Catalog::decode(body, &uuid, ns) {
        Ok(cat) => {
            assert!((1..=MAX_GENERATION_ID + 1).contains(&cat.next_id));
            let mut prev = 0;
            for g in &cat.gens {
                assert!(
                    g.id > prev && g.id < cat.next_id,
                    "ids increase below next_id"
                );
                prev = g.id;
                generation_ok(g, ns);
            }
            let enc = cat.encode(&uuid);
            assert!(enc.len() <= body.len());
            assert_eq!(Catalog::decode(&enc, &uuid, ns), Ok(cat));
        }
        Err(why) => assert!(!why.is_empty()),
    }
}

/// What every record the catalog decoder accepts satisfies.
fn generation_ok(g: &Generation, ns: u64) {
    assert!(g.source.name.len() <= MAX_NAME_BYTES);
    assert!(g.parent.is_none_or(|p| p >= 1 && p < g.id));
    assert!(chunk_size_ok(g.chunk_size));
    assert!(g.source.size_bytes > 0);
    assert_eq!(
        g.chunks_total,
        Generation::chunks_for(g.source.size_bytes, g.chunk_size)
    );
    let counted =
        u128::from(g.chunks_stored) + u128::from(g.zero_chunks) + u128::from(g.chunks_absent);
    assert!(counted <= u128::from(g.chunks_total));
    match (g.state, g.index) {
        (GenState::InProgress, None) => {}
        (GenState::Complete, Some(idx)) => {
            assert_eq!(idx.len, index_len(g.chunks_total));
            assert!(idx.offset.is_multiple_of(ALLOC_UNIT) && idx.offset >= META_START);
            assert!(idx
                .offset
                .checked_add(round_up(idx.len))
                .is_some_and(|end| end <= ns));
        }
        (state, index) => panic!("generation {} is {state:?} with index {index:?}", g.id),
    }
}

fn index_block(switches: u8, mut f: Fields<'_>) {
    let gen = u64::from(f.u32());
    let chunks = match f.u64() {
        c if switches & 1 != 0 => c % 1024,
        c => c,
    };
    let blocks = chunks.div_ceil(ENTRIES_PER_BLOCK).max(1);
    let block = f.u64() % blocks;
    let chunk_size = (4096u32) << (f.u8() % 13);
    let ns = match f.u64() {
        _ if switches & 2 != 0 => 1 << 40,
        n => n,
    };
    let shape = IndexShape {
        gen,
        chunks,
        chunk_size,
        ns_size: ns,
    };
    let body = f.rest();
    let b = if switches & 16 != 0 {
        body.to_vec()
    } else {
        let mut b = zero_padded(body, INDEX_BLOCK_BYTES);
        if switches & 4 != 0 {
            b[..4].copy_from_slice(INDEX_MAGIC);
            put_u32(&mut b, 4, gen as u32);
            put_u32(&mut b, 8, block as u32);
        }
        if switches & 8 != 0 {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..12]), &b[INDEX_HEADER_BYTES..]);
            put_u32(&mut b, 12, crc);
        }
        b
    };
    // Entries already collected from earlier blocks stay as they are.
    let earlier = usize::from(switches >> 5);
    let mut out = vec![RawEntry::default(); earlier];
    match decode_index_block(&b, block, &shape, &mut out) {
        Ok(()) => {
            let first = block * ENTRIES_PER_BLOCK;
            let n = chunks.saturating_sub(first).min(ENTRIES_PER_BLOCK) as usize;
            assert!(out[..earlier].iter().all(|e| *e == RawEntry::default()));
            let entries = &out[earlier..];
            assert_eq!(
                entries.len(),
                n,
                "entries of block {block} of {chunks} chunks"
            );
            for e in entries {
                assert!(e.gen >= 1 && u64::from(e.gen) <= gen);
                if e.is_data() {
                    assert!(e.loc.is_multiple_of(ALLOC_UNIT) && e.loc >= META_START);
                    assert!(e
                        .loc
                        .checked_add(u64::from(chunk_size))
                        .is_some_and(|end| end <= ns));
                }
            }
            let enc = encode_index_block(gen, block, entries);
            assert_eq!(enc, b, "an accepted index block re-encodes to itself");
        }
        Err(why) => {
            assert!(!why.is_empty());
            assert_eq!(out.len(), earlier, "a refused block appended entries");
        }
    }
}

/// The namespace of the `repo_open` template.
pub(crate) const TEMPLATE_BYTES: usize = 128 << 10;
/// The template's repository uuid (a fixed one, so that inputs replay).
const TEMPLATE_UUID: [u8; 16] = *b"hotcopy-fuzz-rep";

/// A small repository: a full generation of `vol0` (with a zero chunk), an
/// incremental of it (one chunk changed, one out of scope), and a backup of
/// `vol1` left in progress; both superblock slots valid. The same bytes in
/// every process (see `normalize`), so that inputs replay.
pub(crate) fn template() -> &'static [u8] {
    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        build_template().unwrap_or_else(|e| panic!("building the repository template: {e}"))
    })
}

fn build_template() -> repo::Result<Vec<u8>> {
    const CS: u32 = 4096;
    let spec = |name: &str, parent| GenSpec {
        source: SourceIdent {
            name: name.into(),
            size_bytes: 4 * u64::from(CS),
        },
        chunk_size: CS,
        parent,
        compare_with_parent: false,
    };
    let mut io = MemIo::new(TEMPLATE_BYTES as u64, 512);
    let mut repo = Repo::format(&mut io, false)?;
    let w = repo.begin(&mut io, &spec("vol0", None))?;
    let mut data: Vec<u8> = (0..4 * CS).map(|i| (i % 251) as u8).collect();
    data[2 * CS as usize..3 * CS as usize].fill(0);
    w.write_run(&mut io, 0, 4, &mut data)?;
    let full = repo.commit(&mut io, w, 1_000_000)?;
    let w = repo.begin(&mut io, &spec("vol0", Some(full.id)))?;
    w.inherit(0, 1)?;
    let mut changed = vec![0x5au8; CS as usize];
    w.write_run(&mut io, 1, 1, &mut changed)?;
    w.inherit(2, 1)?;
    w.mark_absent(3, 1)?;
    repo.commit(&mut io, w, 2_000_000)?;
    let pending = repo.begin(&mut io, &spec("vol1", None))?;
    // Dropped uncommitted: recorded in progress, as after a crash.
    drop(pending);
    let mut image = io.data;
    normalize(&mut image);
    Ok(image)
}

/// Makes the template the same in every process: a fixed uuid in both
/// superblock slots and their catalogs, and fixed creation times.
fn normalize(image: &mut [u8]) {
    for slot in 0..2 {
        let s = slot * SLOT_BYTES;
        let Ok(mut sb) = Superblock::decode(&image[s..s + SLOT_BYTES], image.len() as u64) else {
            continue;
        };
        let at = sb.catalog.offset as usize;
        let body = &image[at..at + sb.catalog.len as usize];
        let mut cat = Catalog::decode(body, &sb.uuid, sb.ns_size).expect("template catalog");
        for g in &mut cat.gens {
            g.created_us = g.id * 1_000_000;
        }
        let body = cat.encode(&TEMPLATE_UUID);
        assert_eq!(
            body.len() as u64,
            sb.catalog.len,
            "catalogs encode canonically"
        );
        image[at..at + body.len()].copy_from_slice(&body);
        sb.catalog.crc = crc32c::crc32c(&body);
        sb.uuid = TEMPLATE_UUID;
        image[s..s + SLOT_BYTES].copy_from_slice(&sb.encode());
    }
}

/// `offset..offset + len` when it lies inside a buffer of `size` bytes.
fn inside(size: usize, offset: u64, len: u64) -> Option<Range<usize>> {
    let end = offset.checked_add(len)?;
    (end <= size as u64).then_some(offset as usize..end as usize)
}

/// Recomputes the checksums the switches ask for, bottom up, following the
/// structures as far as they can be followed: index blocks and the catalog
/// records' index crcs (1), the catalogs' crcs in the superblocks (2), the
/// superblocks' own crcs (4).
fn fix_checksums(image: &mut [u8], switches: u8) {
    for slot in 0..2 {
        let s = slot * SLOT_BYTES;
        if &image[s..s + 8] != SB_MAGIC {
            continue;
        }
        let cat = inside(image.len(), le64(image, s + 48), le64(image, s + 56))
            .filter(|c| c.len() >= CATALOG_HEADER_BYTES);
        if let Some(cat) = cat {
            if switches & 1 != 0 {
                fix_indexes(image, cat.clone());
            }
            if switches & 2 != 0 {
                let crc = crc32c::crc32c(&image[cat]);
                put_u32(image, s + 64, crc);
            }
        }
        if switches & 4 != 0 {
            let crc = crc32c::crc32c(&image[s..s + SB_CRC_AT]);
            put_u32(image, s + SB_CRC_AT, crc);
        }
    }
}

fn fix_indexes(image: &mut [u8], cat: Range<usize>) {
    let count = le32(image, cat.start + 32);
    let mut at = cat.start + CATALOG_HEADER_BYTES;
    for _ in 0..count.min(64) {
        if at + RECORD_FIXED_BYTES > cat.end {
            break;
        }
        let len = le32(image, at) as usize;
        if len < RECORD_FIXED_BYTES || len > cat.end - at {
            break;
        }
        let idx = inside(image.len(), le64(image, at + 56), le64(image, at + 64));
        if let Some(idx) = idx.filter(|i| !i.is_empty()) {
            for b in idx.clone().step_by(INDEX_BLOCK_BYTES) {
                if b + INDEX_BLOCK_BYTES <= idx.end {
                    let crc = crc32c::crc32c_append(
                        crc32c::crc32c(&image[b..b + 12]),
                        &image[b + INDEX_HEADER_BYTES..b + INDEX_BLOCK_BYTES],
                    );
                    put_u32(image, b + 12, crc);
                }
            }
            let crc = crc32c::crc32c(&image[idx]);
            put_u32(image, at + 72, crc);
        }
        at += len;
    }
}

/// Patch offsets count in this many bytes: a u16 spans the template.
pub(crate) const PATCH_UNIT: usize = TEMPLATE_BYTES >> 16;

/// Largest source restored or chunk read per generation: keeps each run
/// fast whatever sizes a damaged catalog claims.
const MAX_READ_BYTES: u64 = 1 << 20;

/// `repo_open`: [`Repo::open`] on a damaged repository, then what a user
/// does with it.
///
/// Input: a byte of switches, then patches applied to a small valid
/// repository (see [`template`]): each is an offset (u16, in 2-byte units),
/// a length (u8) and that many bytes. Then the checksums the switches ask
/// for are recomputed (see `fix_checksums`: 1, 2, 4), so that damage
/// reaches the decoders behind them; switch 8 makes the device's blocks
/// 4096 bytes (else 512); switches 16 and 32 shrink the device by 4, 16 or
/// 64 KiB; switch 64 takes a new backup when the repository verifies clean;
/// switch 128 also restores each small generation with [`Repo::restore`].
///
/// [`Repo::open_reader`] runs on the same image: whatever opens in full
/// opens for reading, with the same generations and the same outcome (and
/// entries) for every index.
///
/// Never panics: open either fails with a message or gives a repository
/// whose space adds up, whose generations' indexes load (or fail) and whose
/// chunks read, restore and verify (or fail); a restore gives what reading
/// the chunks gives. A repository that verifies
/// clean takes a new backup without disturbing the old ones: it reopens,
/// verifies clean again, and restores every old generation as before.
pub fn repo_open(data: &[u8]) {
    let mut f = Fields::new(data);
    let switches = f.u8();
    let mut image = template().to_vec();
    let mut rest = f.rest();
    while rest.len() >= 3 {
        let at = usize::from(u16::from_le_bytes([rest[0], rest[1]])) * PATCH_UNIT;
        let len = usize::from(rest[2]).min(rest.len() - 3);
        let end = (at + len).min(image.len());
        image[at..end].copy_from_slice(&rest[3..3 + (end - at)]);
        rest = &rest[3 + len..];
    }
    fix_checksums(&mut image, switches);
    let shrink = [0, 4 << 10, 16 << 10, 64 << 10][usize::from(switches >> 4) & 3];
    image.truncate(image.len() - shrink);
    let mut io = MemIo {
        data: image,
        block_size: if switches & 8 != 0 { 4096 } else { 512 },
    };
    // The reader (restores, snapshots, instant restores) reads the
    // superblocks and the current catalog only.
    let reader = Repo::open_reader(&mut io);
    let repo = match Repo::open(&mut io) {
        Ok(repo) => repo,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            // The reader may open what the full open refuses (it reads no
            // index); its index loads fail or succeed, never panic.
            if let Ok(r) = reader {
                for g in r.generations() {
                    let _ = r.index(&mut io, g.id);
                }
            }
            return;
        }
    };
    // What opens in full opens for reading, with the same generations and
    // the same outcome for each index.
    let reader = match reader {
        Ok(r) => r,
        Err(e) => panic!("the full open succeeds, the reader's fails: {e}"),
    };
    assert_eq!(reader.generations(), repo.generations());
    for g in repo.generations() {
        match (repo.index(&mut io, g.id), reader.index(&mut io, g.id)) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.chunks(), b.chunks());
                for c in 0..a.chunks() {
                    assert_eq!(a.resolve(c), b.resolve(c), "generation {} chunk {c}", g.id);
                }
            }
            (Err(_), Err(_)) => {}
            (a, b) => panic!(
                "generation {}: the full open's index {:?}, the reader's {:?}",
                g.id,
                a.err(),
                b.err()
            ),
        }
    }
    let info = repo.info();
    assert!(info.used_bytes <= info.size_bytes && info.size_bytes <= io.size_bytes());
    assert_eq!(info.generations, repo.generations().len() as u64);
    let before = restore_all(&repo, &mut io, switches & 128 != 0);
    let clean = matches!(repo.verify(&mut io, None), Ok(r) if r.is_ok());
    if clean && switches & 64 != 0 {
        new_backup(repo, io, &before);
    }
}

/// Loads every generation's index and reads the small complete generations
/// chunk by chunk: (id, content) of those whose every chunk read. With
/// `restore`, also restores each through [`Repo::restore`] (which zeroes a
/// 4 MiB buffer per call: most runs leave it out) and checks that it gives
/// the same content.
fn restore_all(repo: &Repo, io: &mut MemIo, restore: bool) -> Vec<(u64, Vec<u8>)> {
    let mut restored = Vec::new();
    for g in repo.generations() {
        let Ok(index) = repo.index(io, g.id) else {
            continue;
        };
        assert_eq!(g.state, repo::GenState::Complete);
        assert_eq!(index.chunks(), g.chunks_total);
        for chunk in 0..index.chunks() {
            let e = index.resolve(chunk);
            assert!(e.is_some_and(|e| e.stored_by >= 1 && e.stored_by <= g.id));
        }
        if g.source.size_bytes > MAX_READ_BYTES || u64::from(g.chunk_size) > MAX_READ_BYTES {
            continue;
        }
        let cs = index.chunk_size() as usize;
        let mut content = vec![0u8; index.chunks() as usize * cs];
        let read_all = content
            .chunks_mut(cs)
            .enumerate()
            .all(|(chunk, buf)| repo.read_chunk(io, &index, chunk as u64, buf).is_ok());
        content.truncate(g.source.size_bytes as usize);
        if restore {
            let mut dst = MemIo::new(g.source.size_bytes, 1);
            let done = repo.restore(io, g.id, &mut dst, &mut |_, _| {});
            if read_all && done.is_ok() {
                // Out-of-scope chunks are left as they were: zeros here.
                assert_eq!(dst.data, content, "restore of generation {}", g.id);
            }
        }
        if read_all {
            restored.push((g.id, content));
        }
    }
    restored
}

/// Takes a small full backup into a clean repository, then checks that the
/// repository still opens, verifies and restores as before.
fn new_backup(mut repo: Repo, mut io: MemIo, before: &[(u64, Vec<u8>)]) {
    let spec = GenSpec {
        source: SourceIdent {
            name: "fuzz".into(),
            size_bytes: 12 << 10,
        },
        chunk_size: 4096,
        parent: None,
        compare_with_parent: false,
    };
    let Ok(w) = repo.begin(&mut io, &spec) else {
        return;
    };
    let data: Vec<u8> = (0..12u32 << 10).map(|i| (i % 253) as u8 ^ 0xc3).collect();
    // `write_run` compacts its buffer in place: give it a copy.
    if w.write_run(&mut io, 0, 3, &mut data.clone()).is_err() {
        return;
    }
    let Ok(g) = repo.commit(&mut io, w, 3_000_000) else {
        return;
    };
    drop(repo);
    let repo = match Repo::open(&mut io) {
        Ok(r) => r,
        Err(e) => panic!("a clean repository does not reopen after a commit: {e}"),
    };
    match repo.verify(&mut io, None) {
        Ok(r) if r.is_ok() => {}
        Ok(r) => panic!("a commit damaged a clean repository: {:?}", r.messages()),
        Err(e) => panic!("verify after a commit: {e}"),
    }
    let after = restore_all(&repo, &mut io, false);
    for (id, bytes) in before {
        let again = after.iter().find(|(i, _)| i == id);
        assert!(
            again.is_some_and(|(_, b)| b == bytes),
            "generation {id} restores differently after the commit of {}",
            g.id
        );
    }
    assert!(after.iter().any(|(i, b)| *i == g.id && *b == data));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_a_clean_repository_with_room_for_a_backup() {
        let mut io = MemIo {
            data: template().to_vec(),
            block_size: 512,
        };
        let repo = Repo::open(&mut io).expect("template opens");
        let states: Vec<_> = repo.generations().iter().map(|g| g.state).collect();
        use repo::GenState::*;
        assert_eq!(states, [Complete, Complete, InProgress]);
        assert!(repo.verify(&mut io, None).expect("verify").is_ok());
        let before = restore_all(&repo, &mut io, true);
        assert_eq!(before.len(), 2);
        let gens = repo.generations().len();
        new_backup(repo, io.clone(), &before);
        // new_backup gives up quietly when the backup cannot be taken: make
        // sure it was, on the template.
        let spec = GenSpec {
            source: SourceIdent {
                name: "room".into(),
                size_bytes: 12 << 10,
            },
            chunk_size: 4096,
            parent: None,
            compare_with_parent: false,
        };
        let mut repo = Repo::open(&mut io).expect("reopen");
        let w = repo.begin(&mut io, &spec).expect("begin");
        w.write_run(&mut io, 0, 3, &mut vec![1u8; 12 << 10])
            .expect("write");
        repo.commit(&mut io, w, 1).expect("commit");
        assert_eq!(repo.generations().len(), gens + 1);
    }
}
