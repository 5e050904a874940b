//! The on-disk structures: constants, encoding, and checked decoding.
//!
//! The byte layout is documented in the parent module. Every decoder treats
//! its input as untrusted: it checks lengths before it reads a field, checks
//! the checksum before it believes a field, and checks every offset and
//! length it returns against the namespace, so nothing read from the device
//! can make the library index out of bounds or allocate without limit.

use std::fmt;

/// Space is allocated, and free space tracked, in units of this many bytes:
/// the largest block size the repository supports, so every structure can be
/// written with whole-block I/O on any supported namespace.
pub const ALLOC_UNIT: u64 = 4096;
/// Size of one superblock slot.
pub const SLOT_BYTES: usize = 4096;
/// First byte after the two superblock slots.
pub const META_START: u64 = 2 * SLOT_BYTES as u64;
/// Smallest namespace worth formatting: the superblocks, a catalog, an index
/// and a few chunks.
pub const MIN_NAMESPACE_BYTES: u64 = 64 * 1024;

pub const SB_MAGIC: &[u8; 8] = b"HCREPO01";
pub const FORMAT_VERSION: u32 = 1;
/// The superblock's crc32c covers bytes `[0, SB_CRC_AT)` and sits there.
const SB_CRC_AT: usize = SLOT_BYTES - 4;

pub const CATALOG_MAGIC: &[u8; 8] = b"HCCATLG1";
pub const CATALOG_HEADER_BYTES: usize = 64;
/// Fixed part of a generation record; the source name follows it.
pub const RECORD_FIXED_BYTES: usize = 120;
/// A catalog larger than this is corrupt (about 400,000 generations).
pub const MAX_CATALOG_BYTES: u64 = 64 << 20;
/// Longest source name a record may carry.
pub const MAX_NAME_BYTES: usize = 1024;

pub const INDEX_MAGIC: &[u8; 4] = b"HCIX";
pub const INDEX_BLOCK_BYTES: usize = 4096;
pub const INDEX_HEADER_BYTES: usize = 16;
pub const ENTRY_BYTES: usize = 16;
/// Entries per 4 KiB index block: (4096 - 16-byte header) / 16.
pub const ENTRIES_PER_BLOCK: u64 = 255;

/// Entry location of a chunk that is all zeros (no data stored).
pub const LOC_ZERO: u64 = u64::MAX;
/// Entry location of a chunk outside the backup's scope (not backed up).
pub const LOC_ABSENT: u64 = u64::MAX - 1;

pub const MIN_CHUNK_BYTES: u32 = 4096;
pub const MAX_CHUNK_BYTES: u32 = 16 << 20;
/// Index entries store the storing generation in 32 bits.
pub const MAX_GENERATION_ID: u64 = u32::MAX as u64;

const STATE_IN_PROGRESS: u8 = 1;
const STATE_COMPLETE: u8 = 2;
const KIND_FULL: u8 = 1;
const KIND_INCREMENTAL: u8 = 2;
const FLAG_CRC_COMPARED: u16 = 1;

/// Rounds `len` up to whole allocation units.
pub fn round_up(len: u64) -> u64 {
    len.div_ceil(ALLOC_UNIT) * ALLOC_UNIT
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Little-endian reads from a buffer whose length the caller has checked.
fn get_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Where a catalog (or an index) lives, and the crc32c of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Byte offset on the namespace (a multiple of [`ALLOC_UNIT`]).
    pub offset: u64,
    /// Bytes of content (the extent occupies `round_up(len)` bytes).
    pub len: u64,
    /// crc32c of the `len` bytes.
    pub crc: u32,
}

/// Whether `offset`/`len` is a well-formed metadata extent of a namespace
/// of `ns_size` bytes.
fn check_extent(what: &str, e: &Extent, ns_size: u64) -> Result<(), String> {
    if !e.offset.is_multiple_of(ALLOC_UNIT) || e.offset < META_START {
        return Err(format!(
            "{what} offset {} is not a 4 KiB-aligned offset past the superblocks",
            e.offset
        ));
    }
    match e.offset.checked_add(round_up(e.len)) {
        Some(end) if end <= ns_size && e.len > 0 => Ok(()),
        _ => Err(format!(
            "{what} of {} bytes at byte {} does not fit the {ns_size}-byte namespace",
            e.len, e.offset
        )),
    }
}

/// One superblock slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub seq: u64,
    pub uuid: [u8; 16],
    pub ns_size: u64,
    pub catalog: Extent,
}

/// Why a superblock slot is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotProblem {
    /// All zeros: never written.
    Blank,
    /// Not zeros, but no magic: foreign data.
    NoMagic,
    Checksum {
        stored: u32,
        computed: u32,
    },
    Version(u32),
    Field(String),
}

impl SlotProblem {
    pub fn has_magic(&self) -> bool {
        !matches!(self, SlotProblem::Blank | SlotProblem::NoMagic)
    }
}

impl fmt::Display for SlotProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotProblem::Blank => write!(f, "blank (all zeros)"),
            SlotProblem::NoMagic => write!(f, "no HCREPO01 magic (foreign data)"),
            SlotProblem::Checksum { stored, computed } => write!(
                f,
                "crc32c mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or corrupt"
            ),
            SlotProblem::Version(v) => write!(f, "format version {v}, expected {FORMAT_VERSION}"),
            SlotProblem::Field(why) => write!(f, "{why}"),
        }
    }
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT_BYTES];
        b[0..8].copy_from_slice(SB_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, ALLOC_UNIT as u32);
        put_u64(&mut b, 16, self.seq);
        b[24..40].copy_from_slice(&self.uuid);
        put_u64(&mut b, 40, self.ns_size);
        put_u64(&mut b, 48, self.catalog.offset);
        put_u64(&mut b, 56, self.catalog.len);
        put_u32(&mut b, 64, self.catalog.crc);
        let crc = crc32c::crc32c(&b[..SB_CRC_AT]);
        put_u32(&mut b, SB_CRC_AT, crc);
        b
    }

    /// Decodes one slot and checks it against a device of `dev_size` bytes.
    pub fn decode(b: &[u8], dev_size: u64) -> Result<Superblock, SlotProblem> {
        if b.len() != SLOT_BYTES {
            return Err(SlotProblem::Field(format!(
                "slot is {} bytes, not {SLOT_BYTES}",
                b.len()
            )));
        }
        if &b[0..8] != SB_MAGIC {
            return Err(if b.iter().all(|&x| x == 0) {
                SlotProblem::Blank
            } else {
                SlotProblem::NoMagic
            });
        }
        let stored = get_u32(b, SB_CRC_AT);
        let computed = crc32c::crc32c(&b[..SB_CRC_AT]);
        if stored != computed {
            return Err(SlotProblem::Checksum { stored, computed });
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(SlotProblem::Version(version));
        }
        let unit = get_u32(b, 12);
        if unit as u64 != ALLOC_UNIT {
            return Err(SlotProblem::Field(format!(
                "allocation unit {unit}, expected {ALLOC_UNIT}"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        let sb = Superblock {
            seq: get_u64(b, 16),
            uuid,
            ns_size: get_u64(b, 40),
            catalog: Extent {
                offset: get_u64(b, 48),
                len: get_u64(b, 56),
                crc: get_u32(b, 64),
            },
        };
        if !sb.ns_size.is_multiple_of(ALLOC_UNIT) || sb.ns_size < MIN_NAMESPACE_BYTES {
            return Err(SlotProblem::Field(format!(
                "recorded namespace size {} is not a multiple of 4 KiB of at least {MIN_NAMESPACE_BYTES}",
                sb.ns_size
            )));
        }
        if sb.ns_size > dev_size {
            return Err(SlotProblem::Field(format!(
                "recorded namespace size {} is larger than the device ({dev_size} bytes)",
                sb.ns_size
            )));
        }
        if sb.catalog.len < CATALOG_HEADER_BYTES as u64 || sb.catalog.len > MAX_CATALOG_BYTES {
            return Err(SlotProblem::Field(format!(
                "catalog length {} is out of range",
                sb.catalog.len
            )));
        }
        check_extent("catalog", &sb.catalog, sb.ns_size).map_err(SlotProblem::Field)?;
        Ok(sb)
    }
}

/// Whether a generation's backup committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GenState {
    /// Begun, not committed: no index, its data is not kept. Removable.
    InProgress,
    /// Committed: complete index, every chunk restorable.
    Complete,
}

impl GenState {
    pub fn as_str(self) -> &'static str {
        match self {
            GenState::InProgress => "in-progress",
            GenState::Complete => "complete",
        }
    }
}

/// Full (no parent) or incremental (chunks not copied come from the parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GenKind {
    Full,
    Incremental,
}

impl GenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GenKind::Full => "full",
            GenKind::Incremental => "incremental",
        }
    }
}

/// What was backed up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceIdent {
    pub name: String,
    pub size_bytes: u64,
}

/// One generation: a record of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Increasing from 1, never reused.
    pub id: u64,
    pub state: GenState,
    pub kind: GenKind,
    pub source: SourceIdent,
    pub chunk_size: u32,
    /// The generation an incremental was taken against.
    pub parent: Option<u64>,
    /// Unchanged chunks were found by comparing checksums with the parent
    /// (no change tracking), rather than reported by the job.
    pub crc_compared: bool,
    /// Microseconds since the Unix epoch at the consistency point (0 while
    /// in progress).
    pub consistency_point_us: u64,
    /// Microseconds since the Unix epoch when the backup began.
    pub created_us: u64,
    /// The complete chunk index (`None` while in progress).
    pub index: Option<Extent>,
    /// Chunks of the source: `ceil(source size / chunk size)`.
    pub chunks_total: u64,
    /// Chunks whose data this generation wrote.
    pub chunks_stored: u64,
    /// Chunks recorded as zeros.
    pub zero_chunks: u64,
    /// Chunks outside the backup's scope.
    pub chunks_absent: u64,
    /// `chunks_stored * chunk_size`.
    pub bytes_stored: u64,
}

impl Generation {
    /// Chunks of a source of `size` bytes in chunks of `chunk_size`.
    pub fn chunks_for(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(chunk_size as u64)
    }
}

/// Whether `cs` is a chunk size the format accepts.
pub fn chunk_size_ok(cs: u32) -> bool {
    cs.is_power_of_two() && (MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&cs)
}

/// Bytes of the index of `chunks` chunks.
pub fn index_len(chunks: u64) -> u64 {
    chunks.div_ceil(ENTRIES_PER_BLOCK) * INDEX_BLOCK_BYTES as u64
}

/// The list of generations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    /// The id the next generation gets.
    pub next_id: u64,
    /// In increasing id order.
    pub gens: Vec<Generation>,
}

impl Catalog {
    pub fn empty() -> Catalog {
        Catalog {
            next_id: 1,
            gens: Vec::new(),
        }
    }

    pub fn find(&self, id: u64) -> Option<&Generation> {
        self.gens
            .binary_search_by_key(&id, |g| g.id)
            .ok()
            .map(|i| &self.gens[i])
    }

    /// The newest complete generation of `source` (any source when `None`).
    pub fn latest(&self, source: Option<&str>) -> Option<&Generation> {
        self.gens
            .iter()
            .rev()
            .find(|g| g.state == GenState::Complete && source.is_none_or(|s| g.source.name == s))
    }

    pub fn encode(&self, uuid: &[u8; 16]) -> Vec<u8> {
        let mut b = vec![0u8; CATALOG_HEADER_BYTES];
        b[0..8].copy_from_slice(CATALOG_MAGIC);
        b[8..24].copy_from_slice(uuid);
        put_u64(&mut b, 24, self.next_id);
        put_u32(&mut b, 32, self.gens.len() as u32);
        for g in &self.gens {
            let name = g.source.name.as_bytes();
            let len = (RECORD_FIXED_BYTES + name.len()).next_multiple_of(8);
            let mut r = vec![0u8; len];
            put_u32(&mut r, 0, len as u32);
            r[4] = match g.state {
                GenState::InProgress => STATE_IN_PROGRESS,
                GenState::Complete => STATE_COMPLETE,
            };
            r[5] = match g.kind {
                GenKind::Full => KIND_FULL,
                GenKind::Incremental => KIND_INCREMENTAL,
            };
            put_u16(
                &mut r,
                6,
                if g.crc_compared { FLAG_CRC_COMPARED } else { 0 },
            );
            put_u64(&mut r, 8, g.id);
            put_u64(&mut r, 16, g.parent.unwrap_or(0));
            put_u32(&mut r, 24, g.chunk_size);
            put_u16(&mut r, 28, name.len() as u16);
            put_u64(&mut r, 32, g.source.size_bytes);
            put_u64(&mut r, 40, g.consistency_point_us);
            put_u64(&mut r, 48, g.created_us);
            let idx = g.index.unwrap_or(Extent {
                offset: 0,
                len: 0,
                crc: 0,
            });
            put_u64(&mut r, 56, idx.offset);
            put_u64(&mut r, 64, idx.len);
            put_u32(&mut r, 72, idx.crc);
            put_u64(&mut r, 80, g.chunks_total);
            put_u64(&mut r, 88, g.chunks_stored);
            put_u64(&mut r, 96, g.zero_chunks);
            put_u64(&mut r, 104, g.bytes_stored);
            put_u64(&mut r, 112, g.chunks_absent);
            r[RECORD_FIXED_BYTES..RECORD_FIXED_BYTES + name.len()].copy_from_slice(name);
            b.extend_from_slice(&r);
        }
        b
    }

    /// Decodes a catalog whose crc the caller has checked, and checks every
    /// record for consistency with itself and with the namespace.
    pub fn decode(b: &[u8], uuid: &[u8; 16], ns_size: u64) -> Result<Catalog, String> {
        if b.len() < CATALOG_HEADER_BYTES {
            return Err(format!("{} bytes is shorter than its header", b.len()));
        }
        if &b[0..8] != CATALOG_MAGIC {
            return Err("no HCCATLG1 magic".into());
        }
        if &b[8..24] != uuid {
            return Err("it belongs to another repository (uuid mismatch)".into());
        }
        let next_id = get_u64(b, 24);
        let count = get_u32(b, 32) as usize;
        let mut gens: Vec<Generation> = Vec::new();
        let mut at = CATALOG_HEADER_BYTES;
        for i in 0..count {
            let rest = &b[at.min(b.len())..];
            if rest.len() < RECORD_FIXED_BYTES {
                return Err(format!(
                    "record {i} at byte {at} is cut short ({} bytes left)",
                    rest.len()
                ));
            }
            let g = decode_record(rest, ns_size).map_err(|why| format!("record {i}: {why}"))?;
            if let Some(prev) = gens.last() {
                if g.id <= prev.id {
                    return Err(format!(
                        "record {i}: generation id {} does not follow {}",
                        g.id, prev.id
                    ));
                }
            }
            if g.id >= next_id {
                return Err(format!(
                    "record {i}: generation id {} is not below the next id {next_id}",
                    g.id
                ));
            }
            at += get_u32(rest, 0) as usize;
            gens.push(g);
        }
        if at != b.len() {
            return Err(format!(
                "{} bytes of records, {} expected",
                at.saturating_sub(CATALOG_HEADER_BYTES),
                b.len() - CATALOG_HEADER_BYTES
            ));
        }
        if next_id == 0 || next_id > MAX_GENERATION_ID + 1 {
            return Err(format!("next generation id {next_id} is out of range"));
        }
        Ok(Catalog { next_id, gens })
    }
}

/// Decodes one record from the front of `r` (at least the fixed part).
fn decode_record(r: &[u8], ns_size: u64) -> Result<Generation, String> {
    let len = get_u32(r, 0) as usize;
    let name_len = get_u16(r, 28) as usize;
    if name_len > MAX_NAME_BYTES {
        return Err(format!("source name of {name_len} bytes is too long"));
    }
    if len < RECORD_FIXED_BYTES + name_len || len > r.len() || !len.is_multiple_of(8) {
        return Err(format!(
            "record length {len} is inconsistent (name {name_len} bytes, {} bytes left)",
            r.len()
        ));
    }
    let name = std::str::from_utf8(&r[RECORD_FIXED_BYTES..RECORD_FIXED_BYTES + name_len])
        .map_err(|_| "source name is not UTF-8".to_string())?
        .to_string();
    let id = get_u64(r, 8);
    if id == 0 || id > MAX_GENERATION_ID {
        return Err(format!("generation id {id} is out of range"));
    }
    let state = match r[4] {
        STATE_IN_PROGRESS => GenState::InProgress,
        STATE_COMPLETE => GenState::Complete,
        s => return Err(format!("generation {id}: unknown state {s}")),
    };
    let kind = match r[5] {
        KIND_FULL => GenKind::Full,
        KIND_INCREMENTAL => GenKind::Incremental,
        k => return Err(format!("generation {id}: unknown kind {k}")),
    };
    let parent = match get_u64(r, 16) {
        0 => None,
        p if p < id => Some(p),
        p => return Err(format!("generation {id}: parent {p} is not older")),
    };
    if (kind == GenKind::Incremental) != parent.is_some() {
        return Err(format!(
            "generation {id}: kind {} does not match parent {parent:?}",
            kind.as_str()
        ));
    }
    let chunk_size = get_u32(r, 24);
    if !chunk_size_ok(chunk_size) {
        return Err(format!(
            "generation {id}: chunk size {chunk_size} is invalid"
        ));
    }
    let size_bytes = get_u64(r, 32);
    let chunks_total = get_u64(r, 80);
    if size_bytes == 0 || chunks_total != Generation::chunks_for(size_bytes, chunk_size) {
        return Err(format!(
            "generation {id}: {chunks_total} chunks do not cover a source of {size_bytes} bytes"
        ));
    }
    let idx = Extent {
        offset: get_u64(r, 56),
        len: get_u64(r, 64),
        crc: get_u32(r, 72),
    };
    let index = match state {
        GenState::InProgress => {
            if idx.offset != 0 || idx.len != 0 {
                return Err(format!("generation {id} is in progress but has an index"));
            }
            None
        }
        GenState::Complete => {
            let want = index_len(chunks_total);
            if idx.len != want {
                return Err(format!(
                    "generation {id}: index of {} bytes, {want} expected for {chunks_total} chunks",
                    idx.len
                ));
            }
            check_extent(&format!("generation {id}: index"), &idx, ns_size)?;
            Some(idx)
        }
    };
    let g = Generation {
        id,
        state,
        kind,
        source: SourceIdent { name, size_bytes },
        chunk_size,
        parent,
        crc_compared: get_u16(r, 6) & FLAG_CRC_COMPARED != 0,
        consistency_point_us: get_u64(r, 40),
        created_us: get_u64(r, 48),
        index,
        chunks_total,
        chunks_stored: get_u64(r, 88),
        zero_chunks: get_u64(r, 96),
        bytes_stored: get_u64(r, 104),
        chunks_absent: get_u64(r, 112),
    };
    let counted = g
        .chunks_stored
        .checked_add(g.zero_chunks)
        .and_then(|n| n.checked_add(g.chunks_absent));
    if counted.is_none_or(|n| n > chunks_total) {
        return Err(format!(
            "generation {id}: chunk counts exceed its {chunks_total} chunks"
        ));
    }
    Ok(g)
}

/// One index entry as stored: 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawEntry {
    /// Byte offset of the chunk's data, or [`LOC_ZERO`] / [`LOC_ABSENT`].
    pub loc: u64,
    /// crc32c of the chunk's data (0 for zero and absent chunks).
    pub crc: u32,
    /// The generation that stored the data (or recorded the chunk).
    pub gen: u32,
}

impl RawEntry {
    pub fn is_data(&self) -> bool {
        self.loc != LOC_ZERO && self.loc != LOC_ABSENT
    }
}

/// Encodes index block `block` of generation `gen` holding `entries`
/// (at most [`ENTRIES_PER_BLOCK`]); the unused tail stays zero.
pub fn encode_index_block(gen: u64, block: u64, entries: &[RawEntry]) -> Vec<u8> {
    let mut b = vec![0u8; INDEX_BLOCK_BYTES];
    b[0..4].copy_from_slice(INDEX_MAGIC);
    put_u32(&mut b, 4, gen as u32);
    put_u32(&mut b, 8, block as u32);
    for (i, e) in entries.iter().enumerate() {
        let at = INDEX_HEADER_BYTES + i * ENTRY_BYTES;
        put_u64(&mut b, at, e.loc);
        put_u32(&mut b, at + 8, e.crc);
        put_u32(&mut b, at + 12, e.gen);
    }
    let crc = index_block_crc(&b);
    put_u32(&mut b, 12, crc);
    b
}

/// crc32c of an index block without its crc field: bytes `[0, 12)` then
/// `[16, 4096)`.
fn index_block_crc(b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[..12]), &b[INDEX_HEADER_BYTES..])
}

/// What the decoder of an index block needs to know about its generation.
#[derive(Debug, Clone, Copy)]
pub struct IndexShape {
    pub gen: u64,
    pub chunks: u64,
    pub chunk_size: u32,
    pub ns_size: u64,
}

/// Decodes and checks index block `block`, appending its entries to `out`.
pub fn decode_index_block(
    b: &[u8],
    block: u64,
    shape: &IndexShape,
    out: &mut Vec<RawEntry>,
) -> Result<(), String> {
    if b.len() != INDEX_BLOCK_BYTES {
        return Err(format!("{} bytes, not {INDEX_BLOCK_BYTES}", b.len()));
    }
    let stored = get_u32(b, 12);
    let computed = index_block_crc(b);
    if stored != computed {
        return Err(format!(
            "crc32c expected {stored:#010x}, found {computed:#010x}"
        ));
    }
    if &b[0..4] != INDEX_MAGIC {
        return Err("no HCIX magic".into());
    }
    let (gen, blk) = (get_u32(b, 4), get_u32(b, 8));
    if gen as u64 != shape.gen || blk != block as u32 {
        return Err(format!(
            "header says generation {gen} block {blk}, expected generation {} block {block} (misplaced block)",
            shape.gen
        ));
    }
    let first = block * ENTRIES_PER_BLOCK;
    let n = shape.chunks.saturating_sub(first).min(ENTRIES_PER_BLOCK) as usize;
    let start = out.len();
    for i in 0..ENTRIES_PER_BLOCK as usize {
        let at = INDEX_HEADER_BYTES + i * ENTRY_BYTES;
        let raw = &b[at..at + ENTRY_BYTES];
        if i >= n {
            if raw.iter().any(|&x| x != 0) {
                out.truncate(start);
                return Err(format!("unused entry {i} is not zero"));
            }
            continue;
        }
        let e = RawEntry {
            loc: get_u64(raw, 0),
            crc: get_u32(raw, 8),
            gen: get_u32(raw, 12),
        };
        if let Err(why) = check_entry(&e, shape) {
            out.truncate(start);
            return Err(format!("chunk {}: {why}", first + i as u64));
        }
        out.push(e);
    }
    Ok(())
}

fn check_entry(e: &RawEntry, shape: &IndexShape) -> Result<(), String> {
    if e.gen == 0 || e.gen as u64 > shape.gen {
        return Err(format!(
            "stored by generation {}, which is not in 1..={}",
            e.gen, shape.gen
        ));
    }
    if !e.is_data() {
        return Ok(());
    }
    let fits = e
        .loc
        .checked_add(shape.chunk_size as u64)
        .is_some_and(|end| end <= shape.ns_size);
    if !e.loc.is_multiple_of(ALLOC_UNIT) || e.loc < META_START || !fits {
        return Err(format!(
            "data location {} is not a 4 KiB-aligned extent of the namespace",
            e.loc
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_gen(id: u64, state: GenState) -> Generation {
        Generation {
            id,
            state,
            kind: if id == 1 {
                GenKind::Full
            } else {
                GenKind::Incremental
            },
            source: SourceIdent {
                name: format!("vol{id}"),
                size_bytes: 1 << 20,
            },
            chunk_size: 65536,
            parent: if id == 1 { None } else { Some(id - 1) },
            crc_compared: id.is_multiple_of(2),
            consistency_point_us: 10 * id,
            created_us: 9 * id,
            index: (state == GenState::Complete).then_some(Extent {
                offset: 8192 * id + 8192,
                len: 4096,
                crc: 7,
            }),
            chunks_total: 16,
            chunks_stored: 3,
            zero_chunks: 2,
            chunks_absent: 1,
            bytes_stored: 3 * 65536,
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock {
            seq: 42,
            uuid: [7; 16],
            ns_size: 1 << 20,
            catalog: Extent {
                offset: 8192,
                len: 64,
                crc: 5,
            },
        };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b, 1 << 20), Ok(sb.clone()));
        assert_eq!(
            Superblock::decode(&vec![0; SLOT_BYTES], 1 << 20),
            Err(SlotProblem::Blank)
        );
        let mut foreign = vec![0; SLOT_BYTES];
        foreign[100] = 1;
        assert_eq!(
            Superblock::decode(&foreign, 1 << 20),
            Err(SlotProblem::NoMagic)
        );
        for at in [8, 16, 30, 64, 2000, SLOT_BYTES - 1] {
            let mut bad = b.clone();
            bad[at] ^= 0x10;
            assert!(
                matches!(
                    Superblock::decode(&bad, 1 << 20),
                    Err(SlotProblem::Checksum { .. })
                ),
                "flip at {at}"
            );
        }
        assert!(matches!(
            Superblock::decode(&b, 1 << 19),
            Err(SlotProblem::Field(_))
        ));
    }

    #[test]
    fn catalog_round_trips() {
        let cat = Catalog {
            next_id: 5,
            gens: vec![
                sample_gen(1, GenState::Complete),
                sample_gen(2, GenState::Complete),
                sample_gen(4, GenState::InProgress),
            ],
        };
        let b = cat.encode(&[1; 16]);
        assert_eq!(Catalog::decode(&b, &[1; 16], 1 << 30), Ok(cat.clone()));
        assert!(Catalog::decode(&b, &[2; 16], 1 << 30)
            .unwrap_err()
            .contains("another repository"));
        assert!(Catalog::decode(&b[..b.len() - 8], &[1; 16], 1 << 30).is_err());
        assert_eq!(cat.find(2).map(|g| g.id), Some(2));
        assert_eq!(cat.find(3), None);
    }

    #[test]
    fn index_block_round_trips_and_checks_entries() {
        let shape = IndexShape {
            gen: 3,
            chunks: 300,
            chunk_size: 65536,
            ns_size: 1 << 30,
        };
        let entries: Vec<RawEntry> = (0..45)
            .map(|i| RawEntry {
                loc: if i % 3 == 0 {
                    LOC_ZERO
                } else {
                    8192 + i * 65536
                },
                crc: i as u32,
                gen: 1 + (i % 3) as u32,
            })
            .collect();
        let b = encode_index_block(3, 1, &entries);
        let mut out = Vec::new();
        decode_index_block(&b, 1, &shape, &mut out).unwrap();
        assert_eq!(out, entries);
        // Wrong block number: misplaced.
        assert!(decode_index_block(&b, 0, &shape, &mut out)
            .unwrap_err()
            .contains("misplaced"));
        // A bad location with a valid crc is still refused.
        let mut bad = entries.clone();
        bad[4].loc = 100;
        let b = encode_index_block(3, 1, &bad);
        let mut out = Vec::new();
        assert!(decode_index_block(&b, 1, &shape, &mut out)
            .unwrap_err()
            .contains("chunk 259"));
        assert!(out.is_empty());
    }
}
