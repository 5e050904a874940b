//! # The backup repository: generations on a backup namespace
//!
//! A self-describing, checksummed format on any bdev (the *namespace*),
//! holding many generations of many sources. This module is the synchronous
//! control-path library: format, open, begin / place / commit a generation,
//! list, index, read, verify, prune, restore. It talks to the namespace
//! through [`BlockIo`] ([`ChannelIo`] over a bdev channel on a reactor
//! thread). The live backup job writes chunk data itself, asynchronously, at
//! the places [`GenWriter::place_run`] gives it; everything else goes
//! through here.
//!
//! ## Using it
//!
//! ```
//! use hotcopy_cow::repo::{now_us, BlockIo, GenSpec, MemIo, Repo, SourceIdent};
//!
//! let mut ns = MemIo::new(4 << 20, 512); // any BlockIo: ChannelIo on a bdev
//! let mut repo = Repo::format(&mut ns, false)?;
//! let spec = GenSpec {
//!     source: SourceIdent { name: "vol0".into(), size_bytes: 256 << 10 },
//!     chunk_size: 64 << 10,
//!     parent: None,
//!     compare_with_parent: false,
//! };
//! let w = repo.begin(&mut ns, &spec)?; // committed as in progress
//! // A backup stream, on any thread: place a run of chunks, then write the
//! // stored ones (the live job does this write asynchronously).
//! let mut data = vec![7u8; 4 << 16];
//! let p = w.place_run(0, 4, &mut data)?;
//! if let Some(x) = p.write {
//!     ns.write(x.offset, &data[..x.len as usize])?;
//! }
//! let g = repo.commit(&mut ns, w, now_us())?; // index, catalog, superblock
//! let mut dst = MemIo::new(256 << 10, 512);
//! repo.restore(&mut ns, g.id, &mut dst, &mut |_done, _total| {})?;
//! assert!(dst.data.iter().all(|&b| b == 7));
//! assert!(repo.verify(&mut ns, None)?.is_ok());
//! # Ok::<(), hotcopy_cow::repo::RepoError>(())
//! ```
//!
//! A tool that only reads one generation (a restore, a snapshot) opens the
//! repository with [`Repo::open_reader`] instead: a [`RepoReader`] reads the
//! superblocks and the current catalog, not every index (see "Free space and
//! crash safety" for why [`Repo::open`] reads them all), and has no way to
//! change the repository. The index it loads is checked all the same.
//!
//! An incremental names its parent: chunks the job copies go through
//! `place_run`, the others are [`GenWriter::inherit`]ed (they share the
//! parent's data). Without change tracking, `compare_with_parent` makes
//! `place_run` share every chunk whose crc32c equals the parent's. Chunks
//! outside the job's scope are [`GenWriter::mark_absent`]; deallocated ones
//! may be [`GenWriter::mark_zero`]. Commit refuses while any chunk has none
//! of these.
//!
//! ## Layout
//!
//! All integers are little-endian. Every metadata structure carries a
//! crc32c (Castagnoli). Space is handed out in 4 KiB *allocation units*; the
//! namespace's block size must divide 4096 (512 and 4096 do), so every
//! structure is written with whole-block I/O.
//!
//! ```text
//! byte 0        4096          8192                                   namespace end
//! ┌────────────┬────────────┬──────────────────────────────────────────────┐
//! │ superblock │ superblock │ catalogs, indexes and chunk data, each in     │
//! │  slot 0    │  slot 1    │ an extent of whole 4 KiB units from free space│
//! └────────────┴────────────┴──────────────────────────────────────────────┘
//! ```
//!
//! ### Superblock slot (4096 bytes, at byte 0 or 4096)
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `HCREPO01` |
//! | 8..12 | format version, `1` |
//! | 12..16 | allocation unit in bytes, `4096` |
//! | 16..24 | sequence number: +1 per commit; the valid slot with the larger one is current |
//! | 24..40 | repository uuid (16 random bytes from `/dev/urandom`, set at format) |
//! | 40..48 | namespace size in bytes (the device may be larger, never smaller) |
//! | 48..56 | catalog byte offset |
//! | 56..64 | catalog length in bytes |
//! | 64..68 | crc32c of the catalog's bytes |
//! | 68..4092 | zero |
//! | 4092..4096 | crc32c of bytes 0..4092 |
//!
//! A slot is valid when its magic, crc, version and fields check out (the
//! catalog extent lies past byte 8192, 4 KiB-aligned, inside the recorded
//! namespace size, which is inside the device). Open uses the valid slot
//! with the larger sequence; a torn or corrupt slot is ignored when the
//! other is valid. With neither valid, open fails with "not a hotcopy
//! repository" when neither slot has the magic, with "corrupt superblock"
//! (naming each slot's problem) otherwise.
//!
//! ### Catalog (a 64-byte header, then one record per generation)
//!
//! | bytes | header field |
//! |---|---|
//! | 0..8 | magic `HCCATLG1` |
//! | 8..24 | repository uuid (must equal the superblock's) |
//! | 24..32 | id of the next generation |
//! | 32..36 | number of records |
//! | 36..64 | zero |
//!
//! Records follow back to back, in increasing id order:
//!
//! | bytes | record field |
//! |---|---|
//! | 0..4 | record length in bytes (120 + name length, rounded up to 8) |
//! | 4 | state: 1 in progress, 2 complete |
//! | 5 | kind: 1 full, 2 incremental |
//! | 6..8 | flags: bit 0 = unchanged chunks were found by comparing crcs with the parent |
//! | 8..16 | generation id (1 ≤ id < 2^32, increasing, never reused) |
//! | 16..24 | parent id, 0 for none (full) |
//! | 24..28 | chunk size in bytes (power of two, 4 KiB..16 MiB) |
//! | 28..30 | source name length in bytes (≤ 1024) |
//! | 30..32 | zero |
//! | 32..40 | source size in bytes |
//! | 40..48 | consistency point, µs since the Unix epoch (0 while in progress) |
//! | 48..56 | created, µs since the Unix epoch |
//! | 56..64 | index byte offset (0 while in progress) |
//! | 64..72 | index length in bytes (0 while in progress) |
//! | 72..76 | crc32c of the whole index |
//! | 76..80 | zero |
//! | 80..88 | chunks total: ceil(source size / chunk size) |
//! | 88..96 | chunks whose data this generation stored |
//! | 96..104 | zero chunks |
//! | 104..112 | bytes stored by this generation |
//! | 112..120 | chunks outside the backup's scope |
//! | 120.. | source name, UTF-8, then zero padding |
//!
//! The catalog's own checksum is the crc32c in the superblock.
//!
//! ### Index of a generation (complete: one entry per chunk of the source)
//!
//! A sequence of 4096-byte blocks; block *b* holds chunks 255·*b* ..
//! 255·*b* + 254, so resolving a chunk is one array lookup whatever the
//! generation's place in its chain.
//!
//! | bytes | index block field |
//! |---|---|
//! | 0..4 | magic `HCIX` |
//! | 4..8 | generation id |
//! | 8..12 | block number within the index |
//! | 12..16 | crc32c of bytes 0..12 followed by bytes 16..4096 |
//! | 16..4096 | 255 entries of 16 bytes; entries past the last chunk are zero |
//!
//! | bytes | entry field |
//! |---|---|
//! | 0..8 | data location: byte offset of the chunk's data, or `u64::MAX` = zero chunk (nothing stored), `u64::MAX - 1` = absent (out of scope: not backed up, not restored) |
//! | 8..12 | crc32c of the chunk's data (0 for zero and absent chunks) |
//! | 12..16 | id of the generation that stored the data (or recorded the chunk) |
//!
//! Each block's crc locates damage to a block; the whole-index crc in the
//! catalog record ties the index to the record. An incremental copies its
//! parent's entries for the chunks it did not store, so it shares their data
//! and never needs the parent again: removing the parent breaks nothing.
//!
//! ### Chunk data
//!
//! A chunk occupies `chunk size` bytes at a 4 KiB-aligned offset. The chunks
//! stored by one [`GenWriter::place_run`] are contiguous, in chunk order. The
//! source's last chunk, when the source size is not a multiple of the chunk
//! size, is stored padded with zeros; its checksum covers the padding.
//!
//! ## Free space and crash safety
//!
//! Free space is not written anywhere. At [`Repo::open`], the library
//! marks, in an in-memory bitmap of 4 KiB units, the superblocks and
//! everything the catalogs of **both** valid superblock slots reference: the
//! catalogs, the indexes of their complete generations, and every chunk
//! those indexes point to. Everything else is free. New structures only ever go to free
//! space (copy-on-write), so nothing either slot references is overwritten.
//! Reading every index is also how open finds damaged generations
//! ([`Repo::damage`]). [`Repo::open_reader`] does none of this: it never
//! allocates, and checks only the index it is asked for.
//!
//! Every change to the catalog is committed the same way:
//!
//! 1. write the data and the index (commit of a generation) and the new
//!    catalog to free space;
//! 2. flush;
//! 3. write the superblock slot not holding the current sequence, with
//!    sequence + 1 and the new catalog's location and crc;
//! 4. flush.
//!
//! The superblock write is the only commit point. A crash before it leaves
//! the previous state; a torn superblock write fails its crc and open falls
//! back to the other slot. An in-progress generation is recorded (with no
//! index) when it begins, so after a crash it is listed as incomplete; its
//! data was never referenced, so it is free at the next open, and
//! [`Repo::remove`] drops the record. Removals (remove, prune) commit twice,
//! writing both slots, so that the previous catalog no longer pins the
//! removed generations' space, and the space is free at once.
//!
//! A commit that fails after its superblock write was issued leaves the
//! outcome unknown until the next open; the [`Repo`] then refuses further
//! changes ([`RepoError::Poisoned`]).
//!
//! Everything read from the namespace is untrusted: sizes, offsets and
//! counts are bounds-checked against the namespace before use, and a damaged
//! structure is an error naming it, never a panic.

mod error;
mod format;
mod io;
mod read;
mod space;
mod writer;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use error::{RepoError, Result};
pub use format::{
    Extent, GenKind, GenState, Generation, SourceIdent, ALLOC_UNIT, FORMAT_VERSION,
    MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, MIN_NAMESPACE_BYTES,
};
pub use io::{BlockIo, ChannelIo, MemIo, MAX_IO_BYTES};
pub use read::{
    BadChunk, ChunkLoc, Entry, GenIndex, GenVerify, RepoReader, RestoreStats, VerifyReport,
};
pub use writer::{DataExtent, GenSpec, GenWriter, Placement};

use format::{
    chunk_size_ok, index_len, round_up, Catalog, SlotProblem, Superblock, ENTRIES_PER_BLOCK,
    MAX_CATALOG_BYTES, MAX_GENERATION_ID, MAX_NAME_BYTES, META_START, SLOT_BYTES,
};
use space::SpaceMap;

/// `format` without `force` refuses a namespace whose first this-many bytes
/// are not all zero: it covers partition tables and the superblocks of the
/// common filesystems (btrfs keeps its own at 64 KiB).
pub const FORMAT_PROBE_BYTES: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state is plain data; a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the repository and its writers.
struct Shared {
    state: Mutex<SharedState>,
    /// Set when a commit failed after issuing its superblock write.
    poisoned: AtomicBool,
}

impl Shared {
    fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

struct SharedState {
    space: SpaceMap,
    /// Generations being written by this process.
    writers: BTreeMap<u64, WriterReg>,
}

struct WriterReg {
    parent: Option<u64>,
    /// Extents allocated by `place_run` (byte offset, length).
    extents: Vec<(u64, u64)>,
}

/// A catalog and where it is on the namespace.
#[derive(Debug, Clone)]
struct CatState {
    loc: Extent,
    catalog: Catalog,
}

/// Space and generation counts of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoInfo {
    pub uuid: String,
    /// Namespace size the repository uses.
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub generations: u64,
    pub complete: u64,
    pub in_progress: u64,
    /// Superblock sequence number of the current state.
    pub sequence: u64,
}

/// What a removal did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub removed: Vec<u64>,
    /// Generations the rule selected but a running backup uses (kept).
    pub kept_in_use: Vec<u64>,
    /// Space free after the removal that was not before.
    pub freed_bytes: u64,
}

/// An open repository. See the module docs.
pub struct Repo {
    uuid: [u8; 16],
    ns_size: u64,
    seq: u64,
    /// Slot (0 or 1) holding `seq`.
    slot: usize,
    cur: CatState,
    /// The catalog of the other slot, when it is valid and readable.
    other: Option<CatState>,
    shared: Arc<Shared>,
    /// Complete generations whose index could not be read at open.
    damaged: BTreeMap<u64, String>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field(
                "uuid",
                &hotcopy_bdev::format_uuid(u128::from_be_bytes(self.uuid)),
            )
            .field("ns_size", &self.ns_size)
            .field("seq", &self.seq)
            .field("slot", &self.slot)
            .field("generations", &self.cur.catalog.gens.len())
            .finish()
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// 16 random bytes: `/dev/urandom`, or, where it cannot be read, std's
/// randomly keyed hasher over the time.
fn random_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut u = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut u));
    if from_os.is_err() {
        for half in u.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    // Mark it as a random (version 4, variant 1) UUID.
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

/// Checks the device can hold a repository; returns the usable size.
fn check_device(io: &dyn BlockIo) -> Result<u64> {
    let bs = io.block_size() as u64;
    if bs == 0 || bs > ALLOC_UNIT || !ALLOC_UNIT.is_multiple_of(bs) {
        return Err(RepoError::Namespace(format!(
            "block size {bs} does not divide the 4096-byte allocation unit"
        )));
    }
    let size = io.size_bytes() / ALLOC_UNIT * ALLOC_UNIT;
    if size < MIN_NAMESPACE_BYTES {
        return Err(RepoError::Namespace(format!(
            "{} bytes is smaller than the {MIN_NAMESPACE_BYTES}-byte minimum",
            io.size_bytes()
        )));
    }
    Ok(size)
}

/// Reads and checks the catalog `loc` points to.
fn read_catalog(io: &mut dyn BlockIo, loc: &Extent, uuid: &[u8; 16], ns: u64) -> Result<Catalog> {
    let mut buf = vec![0u8; round_up(loc.len) as usize];
    io.read(loc.offset, &mut buf)?;
    let body = &buf[..loc.len as usize];
    let corrupt = |why: String| RepoError::CorruptCatalog {
        offset: loc.offset,
        len: loc.len,
        why,
    };
    let found = crc32c::crc32c(body);
    if found != loc.crc {
        return Err(corrupt(format!(
            "crc32c expected {:#010x} (from the superblock), found {found:#010x}",
            loc.crc
        )));
    }
    Catalog::decode(body, uuid, ns).map_err(corrupt)
}

/// What opening finds before any index is read: the current superblock's
/// state and, when asked for, the other slot's catalog.
struct Opened {
    uuid: [u8; 16],
    ns_size: u64,
    seq: u64,
    slot: usize,
    cur: CatState,
    other: Option<CatState>,
}

impl Opened {
    /// Reads both superblock slots and the catalog of the current one
    /// (falling back to the other slot's when that catalog is corrupt; see
    /// the module docs). With `with_other`, also the other slot's catalog,
    /// whose space a writer must keep.
    fn read(io: &mut dyn BlockIo, with_other: bool) -> Result<Opened> {
        check_device(io)?;
        let mut slots = vec![0u8; 2 * SLOT_BYTES];
        io.read(0, &mut slots)?;
        let dev = io.size_bytes();
        let decoded = [
            Superblock::decode(&slots[..SLOT_BYTES], dev),
            Superblock::decode(&slots[SLOT_BYTES..], dev),
        ];
        let (slot, sb) = match (&decoded[0], &decoded[1]) {
            (Ok(a), Ok(b)) if b.seq > a.seq => (1, b.clone()),
            (Ok(a), _) => (0, a.clone()),
            (Err(_), Ok(b)) => (1, b.clone()),
            (Err(p0), Err(p1)) => {
                for p in [p0, p1] {
                    if let SlotProblem::Version(found) = p {
                        return Err(RepoError::UnsupportedVersion {
                            found: *found,
                            supported: FORMAT_VERSION,
                        });
                    }
                }
                if !p0.has_magic() && !p1.has_magic() {
                    return Err(RepoError::NotARepository);
                }
                return Err(RepoError::CorruptSuperblock {
                    slot0: p0.to_string(),
                    slot1: p1.to_string(),
                });
            }
        };
        // The other slot, when valid and of the same repository: the state
        // before the last commit, whose space is kept too.
        let other_sb = decoded[1 - slot]
            .as_ref()
            .ok()
            .filter(|s| s.uuid == sb.uuid && s.ns_size == sb.ns_size)
            .map(|s| (1 - slot, s.clone()));
        let ns_size = sb.ns_size;
        let load = |io: &mut dyn BlockIo, s: &Superblock| -> Result<CatState> {
            Ok(CatState {
                loc: s.catalog,
                catalog: read_catalog(io, &s.catalog, &s.uuid, ns_size)?,
            })
        };
        let (slot, seq, cur, other) = match load(io, &sb) {
            Ok(cur) => {
                let other = match &other_sb {
                    Some((_, o)) if with_other => match load(io, o) {
                        Ok(c) => Some(c),
                        Err(RepoError::CorruptCatalog { .. }) => None,
                        Err(e) => return Err(e),
                    },
                    _ => None,
                };
                (slot, sb.seq, cur, other)
            }
            Err(e @ RepoError::CorruptCatalog { .. }) => match &other_sb {
                // The newest catalog is unreadable; the previous state is
                // still whole (nothing it references was overwritten).
                Some((i, o)) => match load(io, o) {
                    Ok(c) => {
                        tracing::warn!("repository: {e}; using superblock slot {i} instead");
                        (*i, o.seq, c, None)
                    }
                    Err(_) => return Err(e),
                },
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        Ok(Opened {
            uuid: sb.uuid,
            ns_size,
            seq,
            slot,
            cur,
            other,
        })
    }
}

impl Repo {
    /// Writes an empty repository to the namespace. Without `force` it
    /// refuses unless the first [`FORMAT_PROBE_BYTES`] are all zero (a blank
    /// namespace), so neither foreign data nor an existing repository is
    /// overwritten by accident.
    pub fn format(io: &mut dyn BlockIo, force: bool) -> Result<Repo> {
        let ns_size = check_device(io)?;
        if !force {
            let mut probe = vec![0u8; FORMAT_PROBE_BYTES.min(ns_size) as usize];
            io.read(0, &mut probe)?;
            let slots = [
                Superblock::decode(&probe[..SLOT_BYTES], io.size_bytes()),
                Superblock::decode(&probe[SLOT_BYTES..2 * SLOT_BYTES], io.size_bytes()),
            ];
            for (i, s) in slots.iter().enumerate() {
                match s {
                    Ok(sb) => {
                        return Err(RepoError::WouldOverwrite(format!(
                            "the namespace holds a hotcopy repository ({}, sequence {}, slot {i})",
                            hotcopy_bdev::format_uuid(u128::from_be_bytes(sb.uuid)),
                            sb.seq
                        )))
                    }
                    Err(p) if p.has_magic() => {
                        return Err(RepoError::WouldOverwrite(format!(
                            "the namespace holds a damaged hotcopy repository (slot {i}: {p})"
                        )))
                    }
                    Err(_) => {}
                }
            }
            let nonzero = probe
                .chunks(ALLOC_UNIT as usize)
                .position(|piece| !writer::is_zero(piece))
                .and_then(|i| {
                    let base = i * ALLOC_UNIT as usize;
                    probe[base..]
                        .iter()
                        .position(|&b| b != 0)
                        .map(|at| base + at)
                });
            if let Some(at) = nonzero {
                return Err(RepoError::WouldOverwrite(format!(
                    "the namespace holds data that is not a hotcopy repository (non-zero byte at offset {at})"
                )));
            }
        }
        let uuid = random_uuid();
        let catalog = Catalog::empty();
        let body = catalog.encode(&uuid);
        let loc = Extent {
            offset: META_START,
            len: body.len() as u64,
            crc: crc32c::crc32c(&body),
        };
        let mut padded = body;
        padded.resize(round_up(loc.len) as usize, 0);
        io.write(loc.offset, &padded)?;
        io.write(SLOT_BYTES as u64, &[0u8; SLOT_BYTES])?;
        io.flush()?;
        let sb = Superblock {
            seq: 1,
            uuid,
            ns_size,
            catalog: loc,
        };
        io.write(0, &sb.encode())?;
        io.flush()?;
        let mut space = SpaceMap::new(ns_size);
        space.mark_bytes(0, META_START);
        space.mark_bytes(loc.offset, loc.len);
        Ok(Repo {
            uuid,
            ns_size,
            seq: 1,
            slot: 0,
            cur: CatState { loc, catalog },
            other: None,
            shared: Arc::new(Shared {
                state: Mutex::new(SharedState {
                    space,
                    writers: BTreeMap::new(),
                }),
                poisoned: AtomicBool::new(false),
            }),
            damaged: BTreeMap::new(),
        })
    }

    /// Opens the repository on the namespace (see the module docs for how
    /// the superblock slot is chosen and how free space is found). This
    /// reads the index of every complete generation; a reader of one
    /// generation that changes nothing needs only [`Repo::open_reader`].
    pub fn open(io: &mut dyn BlockIo) -> Result<Repo> {
        let o = Opened::read(io, true)?;
        let mut repo = Repo {
            uuid: o.uuid,
            ns_size: o.ns_size,
            seq: o.seq,
            slot: o.slot,
            cur: o.cur,
            other: o.other,
            shared: Arc::new(Shared {
                state: Mutex::new(SharedState {
                    space: SpaceMap::new(o.ns_size),
                    writers: BTreeMap::new(),
                }),
                poisoned: AtomicBool::new(false),
            }),
            damaged: BTreeMap::new(),
        };
        repo.rebuild_space(io)?;
        Ok(repo)
    }

    /// Opens the repository for reading only: the superblocks and the
    /// current catalog, chosen as [`Repo::open`] chooses them, and no index.
    /// See [`RepoReader`].
    pub fn open_reader(io: &mut dyn BlockIo) -> Result<RepoReader> {
        let o = Opened::read(io, false)?;
        Ok(RepoReader {
            uuid: o.uuid,
            ns_size: o.ns_size,
            seq: o.seq,
            catalog: o.cur.catalog,
        })
    }

    /// The repository uuid, formatted.
    pub fn uuid(&self) -> String {
        hotcopy_bdev::format_uuid(u128::from_be_bytes(self.uuid))
    }

    /// Every generation, oldest first.
    pub fn generations(&self) -> &[Generation] {
        &self.cur.catalog.gens
    }

    pub fn generation(&self, id: u64) -> Option<&Generation> {
        self.cur.catalog.find(id)
    }

    /// The newest complete generation of `source` (any source when `None`).
    pub fn latest(&self, source: Option<&str>) -> Option<&Generation> {
        self.cur.catalog.latest(source)
    }

    /// Why a complete generation's index could not be read at open, if so.
    pub fn damage(&self, id: u64) -> Option<&str> {
        self.damaged.get(&id).map(String::as_str)
    }

    pub fn info(&self) -> RepoInfo {
        let used = lock(&self.shared.state).space.used_units() * ALLOC_UNIT;
        let gens = &self.cur.catalog.gens;
        let complete = gens
            .iter()
            .filter(|g| g.state == GenState::Complete)
            .count() as u64;
        RepoInfo {
            uuid: self.uuid(),
            size_bytes: self.ns_size,
            used_bytes: used,
            free_bytes: self.ns_size - used,
            generations: gens.len() as u64,
            complete,
            in_progress: gens.len() as u64 - complete,
            sequence: self.seq,
        }
    }

    fn check_poison(&self) -> Result<()> {
        if self.shared.is_poisoned() {
            Err(RepoError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Starts a generation: checks the request, loads the parent's index,
    /// and commits an in-progress record, so that a crash from here on
    /// leaves the generation listed as incomplete.
    pub fn begin(&mut self, io: &mut dyn BlockIo, spec: &GenSpec) -> Result<GenWriter> {
        self.check_poison()?;
        let cs = spec.chunk_size;
        if !chunk_size_ok(cs) {
            return Err(RepoError::Invalid(format!(
                "chunk size {cs} is not a power of two from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES}"
            )));
        }
        let name = &spec.source.name;
        if name.len() > MAX_NAME_BYTES {
            return Err(RepoError::Invalid(format!(
                "source name of {} bytes is longer than {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        let size = spec.source.size_bytes;
        if size == 0 {
            return Err(RepoError::Invalid(format!("source {name:?} is empty")));
        }
        let chunks = Generation::chunks_for(size, cs);
        if index_len(chunks) > self.ns_size {
            return Err(RepoError::Invalid(format!(
                "the index of {chunks} chunks would not fit the namespace"
            )));
        }
        let parent = match spec.parent {
            None if spec.compare_with_parent => {
                return Err(RepoError::Invalid(
                    "comparing checksums with the parent needs a parent".into(),
                ))
            }
            None => None,
            Some(p) => {
                let g = self.generation(p).ok_or(RepoError::NoSuchGeneration(p))?;
                if g.state != GenState::Complete {
                    return Err(RepoError::Incomplete(p));
                }
                if g.source.name != *name || g.chunk_size != cs {
                    return Err(RepoError::Invalid(format!(
                        "generation {p} is a backup of {:?} in chunks of {} bytes, not of {name:?} in chunks of {cs}",
                        g.source.name, g.chunk_size
                    )));
                }
                Some(self.index(io, p)?)
            }
        };
        let id = self.cur.catalog.next_id;
        if id > MAX_GENERATION_ID {
            return Err(RepoError::Invalid("generation ids are exhausted".into()));
        }
        let mut cat = self.cur.catalog.clone();
        cat.next_id = id + 1;
        cat.gens.push(Generation {
            id,
            state: GenState::InProgress,
            kind: if spec.parent.is_some() {
                GenKind::Incremental
            } else {
                GenKind::Full
            },
            source: spec.source.clone(),
            chunk_size: cs,
            parent: spec.parent,
            crc_compared: spec.compare_with_parent,
            consistency_point_us: 0,
            created_us: now_us(),
            index: None,
            chunks_total: chunks,
            chunks_stored: 0,
            zero_chunks: 0,
            chunks_absent: 0,
            bytes_stored: 0,
        });
        self.flip(io, cat, false)?;
        lock(&self.shared.state).writers.insert(
            id,
            WriterReg {
                parent: spec.parent,
                extents: Vec::new(),
            },
        );
        Ok(GenWriter::new(
            id,
            spec,
            chunks,
            parent,
            self.shared.clone(),
        ))
    }

    /// Checks that `w` is a live writer of this repository.
    fn check_writer(&self, w: &GenWriter) -> Result<()> {
        let ours = Arc::ptr_eq(&w.shared, &self.shared)
            && lock(&self.shared.state).writers.contains_key(&w.id)
            && self
                .generation(w.id)
                .is_some_and(|g| g.state == GenState::InProgress);
        if ours {
            Ok(())
        } else {
            Err(RepoError::Invalid(format!(
                "generation {} is not being written in this repository",
                w.id
            )))
        }
    }

    /// Commits a generation: writes its complete index, then the catalog
    /// with the generation complete, then the superblock (see the module
    /// docs). Every write returned by `place_run` must have completed.
    ///
    /// On failure the writer is dropped: its record stays in progress (as
    /// after a crash) and can be removed.
    pub fn commit(
        &mut self,
        io: &mut dyn BlockIo,
        w: GenWriter,
        consistency_point_us: u64,
    ) -> Result<Generation> {
        self.commit_ref(io, &w, consistency_point_us)
    }

    /// [`Repo::commit`] for a writer that is still shared (a backup target
    /// keeps one for the readers of its point-in-time view). Once it returns,
    /// successfully or not, the writer places nothing more.
    pub fn commit_ref(
        &mut self,
        io: &mut dyn BlockIo,
        w: &GenWriter,
        consistency_point_us: u64,
    ) -> Result<Generation> {
        self.check_poison()?;
        self.check_writer(w)?;
        if let Some(first) = w.first_unset() {
            return Err(RepoError::Unwritten {
                generation: w.id,
                missing: w.unset_chunks(),
                first,
            });
        }
        let (id, cs, n) = (w.id, w.chunk_size as u64, w.chunks);
        let blocks = n.div_ceil(ENTRIES_PER_BLOCK);
        let mut bytes = Vec::with_capacity(index_len(n) as usize);
        let mut entries = Vec::with_capacity(ENTRIES_PER_BLOCK as usize);
        let (mut stored, mut zero, mut absent) = (0u64, 0u64, 0u64);
        for b in 0..blocks {
            entries.clear();
            for c in b * ENTRIES_PER_BLOCK..n.min((b + 1) * ENTRIES_PER_BLOCK) {
                let e = w.entry(c).ok_or(RepoError::Unwritten {
                    generation: id,
                    missing: w.unset_chunks(),
                    first: c,
                })?;
                match e.loc {
                    format::LOC_ZERO => zero += 1,
                    format::LOC_ABSENT => absent += 1,
                    _ if e.gen as u64 == id => stored += 1,
                    _ => {}
                }
                entries.push(e);
            }
            bytes.extend_from_slice(&format::encode_index_block(id, b, &entries));
        }
        let index = Extent {
            offset: self.alloc_meta(bytes.len() as u64)?,
            len: bytes.len() as u64,
            crc: crc32c::crc32c(&bytes),
        };
        let free_index = |repo: &Repo| {
            if !repo.shared.is_poisoned() {
                lock(&repo.shared.state)
                    .space
                    .free_bytes(index.offset, index.len);
            }
        };
        if let Err(e) = io.write(index.offset, &bytes) {
            free_index(self);
            return Err(e);
        }
        let mut cat = self.cur.catalog.clone();
        let Some(rec) = cat.gens.iter_mut().find(|g| g.id == id) else {
            free_index(self);
            return Err(RepoError::NoSuchGeneration(id));
        };
        rec.state = GenState::Complete;
        rec.consistency_point_us = consistency_point_us;
        rec.index = Some(index);
        rec.chunks_stored = stored;
        rec.zero_chunks = zero;
        rec.chunks_absent = absent;
        rec.bytes_stored = stored * cs;
        let rec = rec.clone();
        if let Err(e) = self.flip(io, cat, false) {
            free_index(self);
            return Err(e);
        }
        // The writer's extents now hold either committed chunks or chunks
        // that were placed again elsewhere: keep exactly the first.
        let mut st = lock(&self.shared.state);
        if let Some(reg) = st.writers.remove(&id) {
            for (offset, len) in reg.extents {
                st.space.free_bytes(offset, len);
            }
        }
        for c in 0..n {
            if let Some(e) = w.entry(c) {
                if e.is_data() && e.gen as u64 == id {
                    st.space.mark_bytes(e.loc, cs);
                }
            }
        }
        Ok(rec)
    }

    /// Abandons a generation: its record is removed and its space freed.
    pub fn abort(&mut self, io: &mut dyn BlockIo, w: GenWriter) -> Result<()> {
        self.abort_ref(io, &w)
    }

    /// [`Repo::abort`] for a writer that is still shared: its space is freed
    /// when the last reference goes.
    pub fn abort_ref(&mut self, io: &mut dyn BlockIo, w: &GenWriter) -> Result<()> {
        self.check_poison()?;
        self.check_writer(w)?;
        let mut cat = self.cur.catalog.clone();
        cat.gens.retain(|g| g.id != w.id);
        self.flip(io, cat, false)
    }

    /// Removes one generation, complete or in progress (not one being
    /// written, nor the parent of one being written). Data it shares with
    /// other generations stays; the rest is free at once.
    pub fn remove(&mut self, io: &mut dyn BlockIo, id: u64) -> Result<PruneReport> {
        if self.generation(id).is_none() {
            return Err(RepoError::NoSuchGeneration(id));
        }
        if let Some(why) = self.in_use(id) {
            return Err(RepoError::InUse {
                generation: id,
                why,
            });
        }
        self.remove_many(io, &[id], Vec::new())
    }

    /// Keeps the newest `keep` complete generations of each source and
    /// removes the older complete ones. In-progress records are left alone
    /// (see [`Repo::remove`]).
    pub fn prune_keep(&mut self, io: &mut dyn BlockIo, keep: usize) -> Result<PruneReport> {
        let mut by_source: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for g in &self.cur.catalog.gens {
            if g.state == GenState::Complete {
                by_source.entry(&g.source.name).or_default().push(g.id);
            }
        }
        let victims: Vec<u64> = by_source
            .values()
            .flat_map(|ids| ids.iter().rev().skip(keep).copied())
            .collect();
        self.prune(io, victims)
    }

    /// Removes the complete generations whose consistency point is older
    /// than `age`, always keeping the newest complete generation of each
    /// source.
    pub fn prune_older_than(&mut self, io: &mut dyn BlockIo, age: Duration) -> Result<PruneReport> {
        let cutoff = now_us().saturating_sub(age.as_micros().min(u64::MAX as u128) as u64);
        let mut newest: BTreeMap<&str, u64> = BTreeMap::new();
        for g in &self.cur.catalog.gens {
            if g.state == GenState::Complete {
                newest.insert(&g.source.name, g.id);
            }
        }
        let victims: Vec<u64> = self
            .cur
            .catalog
            .gens
            .iter()
            .filter(|g| {
                g.state == GenState::Complete
                    && g.consistency_point_us < cutoff
                    && newest.get(g.source.name.as_str()) != Some(&g.id)
            })
            .map(|g| g.id)
            .collect();
        self.prune(io, victims)
    }

    fn prune(&mut self, io: &mut dyn BlockIo, victims: Vec<u64>) -> Result<PruneReport> {
        let (busy, free): (Vec<u64>, Vec<u64>) = victims
            .into_iter()
            .partition(|&id| self.in_use(id).is_some());
        if free.is_empty() {
            return Ok(PruneReport {
                kept_in_use: busy,
                ..PruneReport::default()
            });
        }
        self.remove_many(io, &free, busy)
    }

    /// Why `id` cannot be removed now, if it cannot.
    fn in_use(&self, id: u64) -> Option<String> {
        let st = lock(&self.shared.state);
        if st.writers.contains_key(&id) {
            return Some("its backup is being written".into());
        }
        st.writers
            .iter()
            .find(|(_, w)| w.parent == Some(id))
            .map(|(child, _)| format!("generation {child} is being written against it"))
    }

    fn remove_many(
        &mut self,
        io: &mut dyn BlockIo,
        ids: &[u64],
        kept_in_use: Vec<u64>,
    ) -> Result<PruneReport> {
        self.check_poison()?;
        let before = self.info().used_bytes;
        let gone: BTreeSet<u64> = ids.iter().copied().collect();
        let mut cat = self.cur.catalog.clone();
        cat.gens.retain(|g| !gone.contains(&g.id));
        self.flip(io, cat, true)?;
        for id in &gone {
            self.damaged.remove(id);
        }
        Ok(PruneReport {
            removed: gone.into_iter().collect(),
            kept_in_use,
            freed_bytes: before.saturating_sub(self.info().used_bytes),
        })
    }

    /// Allocates whole units for `len` bytes of metadata; returns the offset.
    fn alloc_meta(&self, len: u64) -> Result<u64> {
        let mut st = lock(&self.shared.state);
        let units = round_up(len) / ALLOC_UNIT;
        match st.space.alloc_meta(units) {
            Some(u) => Ok(u * ALLOC_UNIT),
            None => Err(RepoError::NoSpace {
                needed: units * ALLOC_UNIT,
                largest_free: st.space.largest_free() * ALLOC_UNIT,
                free: (st.space.units() - st.space.used_units()) * ALLOC_UNIT,
            }),
        }
    }

    /// Commits `catalog`: writes it to free space, flushes, writes the other
    /// superblock slot, flushes. With `both`, writes the remaining slot too,
    /// so that no slot references the previous catalog any more.
    fn flip(&mut self, io: &mut dyn BlockIo, catalog: Catalog, both: bool) -> Result<()> {
        self.check_poison()?;
        let body = catalog.encode(&self.uuid);
        if body.len() as u64 > MAX_CATALOG_BYTES {
            return Err(RepoError::Invalid(format!(
                "the catalog would grow to {} bytes, past its {MAX_CATALOG_BYTES}-byte limit; prune generations",
                body.len()
            )));
        }
        let loc = Extent {
            offset: self.alloc_meta(body.len() as u64)?,
            len: body.len() as u64,
            crc: crc32c::crc32c(&body),
        };
        let mut padded = body;
        padded.resize(round_up(loc.len) as usize, 0);
        if let Err(e) = io.write(loc.offset, &padded).and_then(|()| io.flush()) {
            lock(&self.shared.state)
                .space
                .free_bytes(loc.offset, round_up(loc.len));
            return Err(e);
        }
        let next = CatState { loc, catalog };
        self.write_superblock(io, &next)?;
        let dropped = self.other.replace(std::mem::replace(&mut self.cur, next));
        self.release_or_keep(io, dropped);
        if both {
            let again = self.cur.clone();
            self.write_superblock(io, &again)?;
            let dropped = self.other.replace(again);
            self.release_or_keep(io, dropped);
        }
        Ok(())
    }

    /// [`Repo::release`] after a commit point: the change is durable
    /// whatever happens here, so a failure to work out what became free
    /// (an index that cannot be read) only keeps the space in use until the
    /// next open.
    fn release_or_keep(&mut self, io: &mut dyn BlockIo, dropped: Option<CatState>) {
        if let Err(e) = self.release(io, dropped) {
            tracing::warn!("repository: space freed by a commit stays in use until reopen: {e}");
        }
    }

    /// Writes `state` to the slot not holding the current sequence, with the
    /// next sequence, and flushes. Any failure poisons the repository.
    fn write_superblock(&mut self, io: &mut dyn BlockIo, state: &CatState) -> Result<()> {
        // A sequence at its maximum (only a forged or corrupt superblock
        // gets there) cannot be superseded: wrapping to 0 would make the
        // next open pick the older slot and lose this change.
        let seq = self.seq.checked_add(1).ok_or_else(|| {
            RepoError::Invalid(
                "the superblock's sequence number is at its maximum: the repository cannot record a change"
                    .into(),
            )
        })?;
        let slot = 1 - self.slot;
        let sb = Superblock {
            seq,
            uuid: self.uuid,
            ns_size: self.ns_size,
            catalog: state.loc,
        };
        let r = io
            .write((slot * SLOT_BYTES) as u64, &sb.encode())
            .and_then(|()| io.flush());
        if r.is_err() {
            self.shared.poisoned.store(true, Ordering::Release);
        } else {
            self.seq = seq;
            self.slot = slot;
        }
        r
    }

    /// Frees what `dropped` (a catalog no slot references any more)
    /// referenced and nothing else does.
    fn release(&mut self, io: &mut dyn BlockIo, dropped: Option<CatState>) -> Result<()> {
        let Some(d) = dropped else { return Ok(()) };
        let live = [Some(&self.cur), self.other.as_ref()];
        let live_index: HashSet<u64> = live
            .iter()
            .flatten()
            .flat_map(|c| {
                c.catalog
                    .gens
                    .iter()
                    .filter_map(|g| g.index.map(|i| i.offset))
            })
            .collect();
        let lost_index = d
            .catalog
            .gens
            .iter()
            .filter_map(|g| g.index)
            .any(|i| !live_index.contains(&i.offset));
        if lost_index {
            // Generations went away: find what is still referenced.
            return self.rebuild_space(io);
        }
        if !live.iter().flatten().any(|c| c.loc.offset == d.loc.offset) {
            lock(&self.shared.state)
                .space
                .free_bytes(d.loc.offset, round_up(d.loc.len));
        }
        Ok(())
    }

    /// Recomputes the space map from both catalogs (reading every index) and
    /// the extents of the writers in flight.
    fn rebuild_space(&mut self, io: &mut dyn BlockIo) -> Result<()> {
        let mut space = SpaceMap::new(self.ns_size);
        space.mark_bytes(0, META_START);
        let mut seen = HashSet::new();
        let mut damaged = BTreeMap::new();
        let cats: Vec<(bool, CatState)> = [
            Some((true, self.cur.clone())),
            self.other.clone().map(|o| (false, o)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (is_cur, c) in &cats {
            space.mark_bytes(c.loc.offset, round_up(c.loc.len));
            for g in &c.catalog.gens {
                let Some(idx) = g.index else { continue };
                if !seen.insert(idx.offset) {
                    continue;
                }
                space.mark_bytes(idx.offset, idx.len);
                let cs = g.chunk_size as u64;
                let problems = read::scan_index(io, self.ns_size, g, &mut |_, entries| {
                    for e in entries.iter().filter(|e| e.is_data()) {
                        space.mark_bytes(e.loc, cs);
                    }
                })?;
                if *is_cur && !problems.is_empty() {
                    damaged.insert(g.id, read::summarize(&problems));
                }
            }
        }
        let mut st = lock(&self.shared.state);
        for reg in st.writers.values() {
            for &(offset, len) in &reg.extents {
                space.mark_bytes(offset, len);
            }
        }
        space.take_hint(&st.space);
        st.space = space;
        drop(st);
        self.damaged = damaged;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
