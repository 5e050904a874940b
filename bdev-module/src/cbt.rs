//! Changed-block tracking: which chunks of a cow bdev were written since the
//! last backup, kept across restarts, and never trusted after a crash.
//!
//! # In memory
//! One bit per chunk in an array of atomic words. Every mutating write a cow
//! channel hands to the source sets the bits of the chunks it touches (a
//! relaxed load, and a `fetch_or` only when a bit is still clear, so a hot
//! chunk costs one shared read). At a backup's consistency point, while the
//! source is frozen, the job takes the bits (swapping each word with zero):
//! they are the chunks changed since the *base* generation, and the live bits
//! restart empty, recording what changes after the consistency point. When
//! the job commits generation *G*, *G* becomes the base; when it fails, the
//! taken bits are merged back, so no change is ever dropped.
//!
//! # On disk: the tracking store
//! A region of any bdev (4 KiB aligned): a 4 KiB header, then the bitmap
//! rounded up to 4 KiB. Little-endian:
//!
//! | bytes | header field |
//! |---|---|
//! | 0..8 | magic `HCCBT001` |
//! | 8..12 | version, `1` |
//! | 12..16 | state: `1` clean (the bitmap is exact), `2` in use |
//! | 16..24 | chunk size in bytes |
//! | 24..32 | chunks tracked |
//! | 32..40 | base generation (0: none) |
//! | 40..56 | repository uuid the base generation belongs to |
//! | 56..60 | crc32c of the bitmap bytes |
//! | 60..62 | source name length (≤ 1024) |
//! | 62..64 | zero |
//! | 64..64+n | source name, UTF-8 |
//! | … 4092 | zero |
//! | 4092..4096 | crc32c of bytes 0..4092 |
//!
//! The rule that makes a crash harmless: **the store says `clean` only while
//! nothing can write the source.** Opening the tracking reads the store,
//! keeps the bitmap and base only if the header is valid, `clean`, and of the
//! same source and geometry, and then writes the header back as `in use` (and
//! flushes) before the cow bdev accepts a write. A clean shutdown writes the
//! bitmap, flushes, and only then writes the header `clean`. After a crash,
//! a power cut, or any damage the store reads `in use` or invalid: the
//! tracking is declared lost, the base is dropped, and the next backup is a
//! full one. A torn shutdown write leaves either the old `in use` header or a
//! header whose crc fails, and both mean the same.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::repo::{BlockIo, RepoError};

const MAGIC: &[u8; 8] = b"HCCBT001";
const VERSION: u32 = 1;
const STATE_CLEAN: u32 = 1;
const STATE_IN_USE: u32 = 2;
const HEADER: usize = 4096;
const MAX_NAME: usize = 1024;

/// The generation changes are tracked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CbtBase {
    pub generation: u64,
    /// The repository's uuid, as [`crate::repo::Repo::uuid`] prints it.
    pub repository: String,
}

/// What opening the store found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CbtOpen {
    /// A clean store of this source: the bitmap is exact since `base`.
    Intact(Option<CbtBase>),
    /// Nothing usable (never written, another source or geometry): tracking
    /// starts now, with no base.
    Fresh,
    /// The last stop was not clean, or the store is damaged: changes may
    /// have been missed, so the next backup is full.
    Lost(String),
}

/// Where the tracking is kept.
pub struct CbtStore {
    /// Byte offset of the store on its bdev.
    pub offset: u64,
}

/// Changed-block tracking of one cow bdev (see the module docs).
pub struct Cbt {
    chunk_size: u64,
    /// log2 of source blocks per chunk.
    chunk_shift: u32,
    chunks: u64,
    source: String,
    bits: Box<[AtomicU64]>,
    base: Mutex<Option<CbtBase>>,
    /// How the tracking started (for status and logs).
    opened: Mutex<CbtOpen>,
}

impl Cbt {
    /// In-memory tracking with no store and no base.
    pub fn new(source: &str, source_bytes: u64, block_size: u64, chunk_size: u64) -> Cbt {
        let chunks = source_bytes.div_ceil(chunk_size);
        Cbt {
            chunk_size,
            chunk_shift: (chunk_size / block_size).trailing_zeros(),
            chunks,
            source: source.to_string(),
            bits: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            base: Mutex::new(None),
            opened: Mutex::new(CbtOpen::Fresh),
        }
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Bytes the store needs on its bdev.
    pub fn store_bytes(&self) -> u64 {
        HEADER as u64 + bitmap_bytes(self.chunks)
    }

    /// Records a write of `num_blocks` source blocks at `offset_blocks`.
    #[inline]
    pub fn mark(&self, offset_blocks: u64, num_blocks: u64) {
        let first = offset_blocks >> self.chunk_shift;
        let last = (offset_blocks + num_blocks.max(1) - 1) >> self.chunk_shift;
        for c in first..=last.min(self.chunks.saturating_sub(1)) {
            let w = &self.bits[(c / 64) as usize];
            let m = 1u64 << (c % 64);
            if w.load(Ordering::Relaxed) & m == 0 {
                w.fetch_or(m, Ordering::Relaxed);
            }
        }
    }

    /// Whether `chunk` is marked.
    pub fn is_marked(&self, chunk: u64) -> bool {
        chunk < self.chunks
            && self.bits[(chunk / 64) as usize].load(Ordering::Relaxed) & (1 << (chunk % 64)) != 0
    }

    /// Chunks marked now.
    pub fn marked(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Takes every mark, leaving none (at a consistency point).
    pub fn take(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }

    /// Gives marks back (a job that took them failed).
    pub fn merge(&self, words: &[u64]) {
        for (w, m) in self.bits.iter().zip(words) {
            if *m != 0 {
                w.fetch_or(*m, Ordering::AcqRel);
            }
        }
    }

    pub fn base(&self) -> Option<CbtBase> {
        self.base.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_base(&self, base: Option<CbtBase>) {
        *self.base.lock().unwrap_or_else(|e| e.into_inner()) = base;
    }

    /// How the tracking started.
    pub fn opened(&self) -> CbtOpen {
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Opens the tracking kept at `store` on `io`: loads what a clean stop
    /// left, then marks the store in use (see the module docs). Call before
    /// the cow bdev takes writes.
    pub fn open(&self, io: &mut dyn BlockIo, store: &CbtStore) -> Result<CbtOpen, RepoError> {
        self.check_room(io, store)?;
        let mut head = vec![0u8; HEADER];
        io.read(store.offset, &mut head)?;
        let found = match decode_header(&head) {
            None if head.iter().all(|&b| b == 0) => CbtOpen::Fresh,
            None => CbtOpen::Lost("the tracking store's header is damaged".into()),
            Some(h) if h.source != self.source => CbtOpen::Fresh,
            Some(h) if h.chunk_size != self.chunk_size || h.chunks != self.chunks => {
                CbtOpen::Lost(format!(
                    "the tracking store has {} chunks of {} bytes; the source now has {} of {}",
                    h.chunks, h.chunk_size, self.chunks, self.chunk_size
                ))
            }
            Some(h) if h.state != STATE_CLEAN => CbtOpen::Lost(
                "the last stop was not clean (crash or power cut): changes may be missing".into(),
            ),
            Some(h) => {
                let mut map = vec![0u8; bitmap_bytes(self.chunks) as usize];
                io.read(store.offset + HEADER as u64, &mut map)?;
                if crc32c::crc32c(&map) != h.bitmap_crc {
                    CbtOpen::Lost("the tracking bitmap fails its checksum".into())
                } else {
                    for (w, b) in self.bits.iter().zip(map.chunks_exact(8)) {
                        w.fetch_or(
                            u64::from_le_bytes(b.try_into().expect("8 bytes")),
                            Ordering::Relaxed,
                        );
                    }
                    CbtOpen::Intact(h.base)
                }
            }
        };
        let base = match &found {
            CbtOpen::Intact(b) => b.clone(),
            _ => None,
        };
        self.set_base(base.clone());
        if let CbtOpen::Lost(why) = &found {
            tracing::warn!(source = %self.source, "change tracking lost: {why}; the next backup will be full");
        }
        // In use from now on: a crash before the next clean stop must read as lost.
        let head = encode_header(self, STATE_IN_USE, base.as_ref(), 0);
        io.write(store.offset, &head)?;
        io.flush()?;
        *self.opened.lock().unwrap_or_else(|e| e.into_inner()) = found.clone();
        Ok(found)
    }

    /// Saves the tracking for a clean stop: bitmap, flush, header `clean`,
    /// flush. Nothing may write the source from now on.
    pub fn close(&self, io: &mut dyn BlockIo, store: &CbtStore) -> Result<(), RepoError> {
        self.check_room(io, store)?;
        let mut map = vec![0u8; bitmap_bytes(self.chunks) as usize];
        for (w, b) in self.bits.iter().zip(map.chunks_exact_mut(8)) {
            b.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        io.write(store.offset + HEADER as u64, &map)?;
        io.flush()?;
        let head = encode_header(
            self,
            STATE_CLEAN,
            self.base().as_ref(),
            crc32c::crc32c(&map),
        );
        io.write(store.offset, &head)?;
        io.flush()
    }

    fn check_room(&self, io: &dyn BlockIo, store: &CbtStore) -> Result<(), RepoError> {
        let need = store.offset + self.store_bytes();
        if !store.offset.is_multiple_of(4096) || need > io.size_bytes() {
            return Err(RepoError::Invalid(format!(
                "the tracking store needs {} bytes from byte {} (4 KiB aligned); its bdev has {}",
                self.store_bytes(),
                store.offset,
                io.size_bytes()
            )));
        }
        Ok(())
    }
}

fn bitmap_bytes(chunks: u64) -> u64 {
    chunks.div_ceil(64).saturating_mul(8).div_ceil(4096) * 4096
}

struct Header {
    state: u32,
    chunk_size: u64,
    chunks: u64,
    base: Option<CbtBase>,
    bitmap_crc: u32,
    source: String,
}

fn encode_header(cbt: &Cbt, state: u32, base: Option<&CbtBase>, bitmap_crc: u32) -> Vec<u8> {
    let mut h = vec![0u8; HEADER];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&state.to_le_bytes());
    h[16..24].copy_from_slice(&cbt.chunk_size.to_le_bytes());
    h[24..32].copy_from_slice(&cbt.chunks.to_le_bytes());
    if let Some(b) = base {
        h[32..40].copy_from_slice(&b.generation.to_le_bytes());
        if let Some(u) = parse_uuid(&b.repository) {
            h[40..56].copy_from_slice(&u);
        }
    }
    h[56..60].copy_from_slice(&bitmap_crc.to_le_bytes());
    let name = cbt.source.as_bytes();
    let n = name.len().min(MAX_NAME);
    h[60..62].copy_from_slice(&(n as u16).to_le_bytes());
    h[64..64 + n].copy_from_slice(&name[..n]);
    let crc = crc32c::crc32c(&h[..HEADER - 4]);
    h[HEADER - 4..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn decode_header(h: &[u8]) -> Option<Header> {
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    if h.len() < HEADER || &h[0..8] != MAGIC || u32_at(8) != VERSION {
        return None;
    }
    if crc32c::crc32c(&h[..HEADER - 4]) != u32_at(HEADER - 4) {
        return None;
    }
    let n = u16::from_le_bytes([h[60], h[61]]) as usize;
    if n > MAX_NAME {
        return None;
    }
    let source = std::str::from_utf8(&h[64..64 + n]).ok()?.to_string();
    let generation = u64_at(32);
    let base = (generation != 0).then(|| CbtBase {
        generation,
        repository: hotcopy_bdev::format_uuid(u128::from_be_bytes(
            h[40..56].try_into().expect("16 bytes"),
        )),
    });
    Some(Header {
        state: u32_at(12),
        chunk_size: u64_at(16),
        chunks: u64_at(24),
        base,
        bitmap_crc: u32_at(56),
        source,
    })
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        out[i] = d(pair[0]) << 4 | d(pair[1]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::MemIo;

    fn cbt() -> Cbt {
        Cbt::new("vol", 10 << 20, 512, 64 << 10)
    }

    #[test]
    fn marks_cover_every_chunk_a_write_touches() {
        let c = cbt();
        c.mark(127, 2); // blocks 127..129 straddle chunks 0 and 1
        c.mark(150 * 128, 1);
        assert!(c.is_marked(0) && c.is_marked(1) && c.is_marked(150));
        assert_eq!(c.marked(), 3);
        let taken = c.take();
        assert_eq!(c.marked(), 0);
        c.merge(&taken);
        assert_eq!(c.marked(), 3);
    }

    #[test]
    fn a_clean_stop_keeps_marks_and_base_and_a_crash_loses_them() {
        let mut io = MemIo::new(1 << 20, 512);
        let store = CbtStore { offset: 8192 };
        let base = CbtBase {
            generation: 7,
            repository: hotcopy_bdev::format_uuid(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff),
        };
        let a = cbt();
        assert_eq!(a.open(&mut io, &store).unwrap(), CbtOpen::Fresh);
        a.mark(5 * 128, 1);
        a.set_base(Some(base.clone()));
        a.close(&mut io, &store).unwrap();
        let b = cbt();
        assert_eq!(
            b.open(&mut io, &store).unwrap(),
            CbtOpen::Intact(Some(base.clone()))
        );
        assert!(b.is_marked(5) && b.marked() == 1);
        assert_eq!(b.base(), Some(base));
        // No close: as after a crash. The store reads in use.
        let c = cbt();
        assert!(matches!(c.open(&mut io, &store).unwrap(), CbtOpen::Lost(_)));
        assert_eq!(c.base(), None);
    }

    #[test]
    fn damage_and_another_geometry_are_never_trusted() {
        let mut io = MemIo::new(1 << 20, 512);
        let store = CbtStore { offset: 0 };
        let a = cbt();
        a.open(&mut io, &store).unwrap();
        a.set_base(Some(CbtBase {
            generation: 1,
            repository: hotcopy_bdev::format_uuid(0),
        }));
        a.close(&mut io, &store).unwrap();
        // A flipped bit in the bitmap.
        io.data[HEADER] ^= 1;
        assert!(matches!(
            cbt().open(&mut io, &store).unwrap(),
            CbtOpen::Lost(_)
        ));
        // A clean store of a differently sized source.
        let a = cbt();
        a.open(&mut io, &store).unwrap();
        a.close(&mut io, &store).unwrap();
        let other = Cbt::new("vol", 20 << 20, 512, 64 << 10);
        assert!(matches!(
            other.open(&mut io, &store).unwrap(),
            CbtOpen::Lost(_)
        ));
        // Too small a bdev.
        let mut tiny = MemIo::new(4096, 512);
        assert!(cbt().open(&mut tiny, &store).is_err());
    }
}
