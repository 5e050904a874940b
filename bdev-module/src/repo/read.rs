//! Reading generations back: the index ([`GenIndex`]), single chunks,
//! [`Repo::verify`] and [`Repo::restore`], and the read-only
//! [`RepoReader`].

use std::collections::BTreeMap;
use std::fmt;

use super::error::{RepoError, Result};
use super::format::{
    decode_index_block, Catalog, GenState, Generation, IndexShape, RawEntry, SlotProblem,
    Superblock, ENTRIES_PER_BLOCK, INDEX_BLOCK_BYTES, LOC_ABSENT, LOC_ZERO, SLOT_BYTES,
};
use super::io::BlockIo;
use super::{read_catalog, Repo};

/// Index blocks read per request while scanning an index (1 MiB).
const SCAN_BATCH_BLOCKS: u64 = 256;
/// Verify and restore move data in requests of up to this many bytes.
const BATCH_BYTES: u64 = 4 << 20;
/// How many problems an error message lists before it counts the rest.
const PROBLEMS_SHOWN: usize = 3;

/// Joins a list of problems into one message.
pub(super) fn summarize(problems: &[String]) -> String {
    let mut s = problems
        .iter()
        .take(PROBLEMS_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > PROBLEMS_SHOWN {
        s += &format!(" (and {} more)", problems.len() - PROBLEMS_SHOWN);
    }
    s
}

/// Reads the index of complete generation `g` in batches, checking every
/// block, and hands the entries of each good block to `f` with the block's
/// first chunk. Returns the problems found (bad blocks, whole-index crc);
/// only an I/O failure is an error.
pub(super) fn scan_index(
    io: &mut dyn BlockIo,
    ns_size: u64,
    g: &Generation,
    f: &mut dyn FnMut(u64, &[RawEntry]),
) -> Result<Vec<String>> {
    let Some(idx) = g.index else {
        return Ok(vec![format!("generation {} has no index", g.id)]);
    };
    let shape = IndexShape {
        gen: g.id,
        chunks: g.chunks_total,
        chunk_size: g.chunk_size,
        ns_size,
    };
    let blocks = idx.len / INDEX_BLOCK_BYTES as u64;
    let mut problems = Vec::new();
    let mut crc = 0u32;
    let mut buf = Vec::new();
    let mut entries = Vec::with_capacity(ENTRIES_PER_BLOCK as usize);
    let mut b = 0;
    while b < blocks {
        let n = SCAN_BATCH_BLOCKS.min(blocks - b);
        buf.resize((n as usize) * INDEX_BLOCK_BYTES, 0);
        let at = idx.offset + b * INDEX_BLOCK_BYTES as u64;
        io.read(at, &mut buf)?;
        crc = crc32c::crc32c_append(crc, &buf);
        for (i, block) in buf.chunks(INDEX_BLOCK_BYTES).enumerate() {
            let block_no = b + i as u64;
            entries.clear();
            match decode_index_block(block, block_no, &shape, &mut entries) {
                Ok(()) => f(block_no * ENTRIES_PER_BLOCK, &entries),
                Err(why) => problems.push(format!(
                    "index block {block_no} (byte {}): {why}",
                    at + (i * INDEX_BLOCK_BYTES) as u64
                )),
            }
        }
        b += n;
    }
    if crc != idx.crc {
        problems.push(format!(
            "index at byte {} ({} bytes): crc32c expected {:#010x} (from the catalog), found {crc:#010x}",
            idx.offset, idx.len, idx.crc
        ));
    }
    Ok(problems)
}

/// Where a chunk's content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkLoc {
    /// Stored at this byte offset of the namespace.
    Data(u64),
    /// All zeros; nothing stored.
    Zero,
    /// Outside the backup's scope: not backed up.
    Absent,
}

/// A resolved index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    pub loc: ChunkLoc,
    /// crc32c of the stored data (0 for zero and absent chunks).
    pub crc: u32,
    /// The generation that stored the data (or recorded the chunk).
    pub stored_by: u64,
}

/// The complete chunk index of one generation, in memory: resolving a chunk
/// is one array lookup, whatever the length of the generation's chain.
#[derive(Debug, Clone)]
pub struct GenIndex {
    id: u64,
    chunk_size: u32,
    source_size: u64,
    entries: Vec<RawEntry>,
}

impl GenIndex {
    /// Reads and checks the index of complete generation `g`.
    fn load(io: &mut dyn BlockIo, ns_size: u64, g: &Generation) -> Result<GenIndex> {
        if g.state != GenState::Complete {
            return Err(RepoError::Incomplete(g.id));
        }
        let mut entries = Vec::new();
        let problems = scan_index(io, ns_size, g, &mut |_, es| entries.extend_from_slice(es))?;
        if !problems.is_empty() {
            return Err(RepoError::CorruptIndex {
                generation: g.id,
                why: summarize(&problems),
            });
        }
        Ok(GenIndex {
            id: g.id,
            chunk_size: g.chunk_size,
            source_size: g.source.size_bytes,
            entries,
        })
    }

    pub fn generation(&self) -> u64 {
        self.id
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub fn chunks(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn source_size(&self) -> u64 {
        self.source_size
    }

    /// Bytes of the source in `chunk` (the last one may be short).
    pub fn chunk_len(&self, chunk: u64) -> u64 {
        let cs = self.chunk_size as u64;
        self.source_size.saturating_sub(chunk * cs).min(cs)
    }

    pub(super) fn raw(&self, chunk: u64) -> Option<RawEntry> {
        usize::try_from(chunk)
            .ok()
            .and_then(|i| self.entries.get(i))
            .copied()
    }

    /// Where `chunk`'s content is, or `None` past the end of the source.
    pub fn resolve(&self, chunk: u64) -> Option<Entry> {
        self.raw(chunk).map(|e| Entry {
            loc: match e.loc {
                LOC_ZERO => ChunkLoc::Zero,
                LOC_ABSENT => ChunkLoc::Absent,
                off => ChunkLoc::Data(off),
            },
            crc: e.crc,
            stored_by: e.gen as u64,
        })
    }
}

/// A chunk that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChunk {
    pub generation: u64,
    pub chunk: u64,
    /// Byte offset of its data on the namespace.
    pub offset: u64,
    pub expected: u32,
    /// The crc32c of what was read, or `None` when the read failed.
    pub found: Option<u32>,
    /// A read failure, when there was one.
    pub error: Option<String>,
}

impl fmt::Display for BadChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "generation {} chunk {} (data at byte {}): ",
            self.generation, self.chunk, self.offset
        )?;
        match (self.found, &self.error) {
            (Some(found), _) => write!(
                f,
                "crc32c expected {:#010x}, found {found:#010x}",
                self.expected
            ),
            (None, Some(e)) => write!(f, "unreadable: {e}"),
            (None, None) => write!(f, "unreadable"),
        }
    }
}

/// The verification of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenVerify {
    pub id: u64,
    pub state: GenState,
    /// Data chunks read and checked (zero and absent chunks need no read).
    pub chunks_checked: u64,
    pub bad_chunks: u64,
    /// Index problems (the chunks of bad index blocks cannot be checked).
    pub problems: Vec<String>,
}

impl GenVerify {
    pub fn is_ok(&self) -> bool {
        self.bad_chunks == 0 && self.problems.is_empty()
    }
}

/// What [`Repo::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// One per generation examined; in-progress ones are listed (state
    /// `InProgress`) but have nothing to check.
    pub generations: Vec<GenVerify>,
    pub bad_chunks: Vec<BadChunk>,
    /// Superblock and catalog problems.
    pub problems: Vec<String>,
    /// Not damage to any generation: a superblock slot that is torn or
    /// corrupt while the other one serves.
    pub warnings: Vec<String>,
    /// Distinct chunk extents read (shared chunks are read once).
    pub extents_read: u64,
    pub bytes_read: u64,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
            && self.bad_chunks.is_empty()
            && self.generations.iter().all(GenVerify::is_ok)
    }

    /// Every problem, one line each.
    pub fn messages(&self) -> Vec<String> {
        let mut out = self.problems.clone();
        for g in &self.generations {
            out.extend(
                g.problems
                    .iter()
                    .map(|p| format!("generation {}: {p}", g.id)),
            );
        }
        out.extend(self.bad_chunks.iter().map(|b| b.to_string()));
        out
    }
}

/// What [`Repo::restore`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub bytes_written: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    /// Out-of-scope chunks, left as they were on the destination.
    pub absent_chunks: u64,
}

/// One chunk to check in [`Repo::verify`].
struct Ref {
    loc: u64,
    len: u64,
    crc: u32,
    gen: u64,
    chunk: u64,
}

impl Repo {
    /// Reads and checks the complete index of generation `id`.
    pub fn index(&self, io: &mut dyn BlockIo, id: u64) -> Result<GenIndex> {
        let g = self.generation(id).ok_or(RepoError::NoSuchGeneration(id))?;
        GenIndex::load(io, self.ns_size, g)
    }

    /// Reads `chunk` of the generation `index` belongs to into `buf` (one
    /// chunk size), checking its crc32c. Zero chunks read as zeros; absent
    /// ones too, and say so.
    pub fn read_chunk(
        &self,
        io: &mut dyn BlockIo,
        index: &GenIndex,
        chunk: u64,
        buf: &mut [u8],
    ) -> Result<ChunkLoc> {
        read_chunk(io, index, chunk, buf)
    }

    /// Re-reads the superblocks, the catalog, the index of every selected
    /// generation (one, or all when `None`) and every chunk they reference,
    /// and checks every checksum. Chunks shared by several generations are
    /// read once and reported for each generation that uses them.
    pub fn verify(&self, io: &mut dyn BlockIo, only: Option<u64>) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let gens: Vec<&Generation> = match only {
            Some(id) => vec![self.generation(id).ok_or(RepoError::NoSuchGeneration(id))?],
            None => self.generations().iter().collect(),
        };
        self.verify_metadata(io, &mut report)?;
        let mut refs = Vec::new();
        let mut slots = BTreeMap::new();
        for g in gens {
            slots.insert(g.id, report.generations.len());
            let mut gv = GenVerify {
                id: g.id,
                state: g.state,
                chunks_checked: 0,
                bad_chunks: 0,
                problems: Vec::new(),
            };
            if g.state == GenState::Complete {
                let cs = g.chunk_size as u64;
                gv.problems = scan_index(io, self.ns_size, g, &mut |first, entries| {
                    for (i, e) in entries.iter().enumerate() {
                        if e.is_data() {
                            refs.push(Ref {
                                loc: e.loc,
                                len: cs,
                                crc: e.crc,
                                gen: g.id,
                                chunk: first + i as u64,
                            });
                        }
                    }
                })?;
            }
            report.generations.push(gv);
        }
        refs.sort_by_key(|r| (r.loc, r.gen));
        // Group the references to one extent, and batch adjacent extents
        // into one read of up to BATCH_BYTES.
        let mut i = 0;
        while i < refs.len() {
            let start = i;
            let mut next = refs[i].loc;
            let mut bytes = 0u64;
            while i < refs.len() && refs[i].loc == next {
                let len = refs[i].len;
                if bytes > 0 && bytes + len > BATCH_BYTES {
                    break;
                }
                while i < refs.len() && refs[i].loc == next {
                    i += 1;
                }
                next += len;
                bytes += len;
            }
            self.verify_batch(io, &refs[start..i], &mut report, &slots);
        }
        Ok(report)
    }

    /// Reads the extents `refs` point to (adjacent, in order) in one request
    /// and checks each reference's crc; falls back to one read per extent
    /// when the batch read fails.
    fn verify_batch(
        &self,
        io: &mut dyn BlockIo,
        refs: &[Ref],
        report: &mut VerifyReport,
        slots: &BTreeMap<u64, usize>,
    ) {
        let Some(first) = refs.first() else { return };
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for r in refs {
            if extents.last().map(|e| e.0) != Some(r.loc) {
                extents.push((r.loc, r.len));
            }
        }
        let total: u64 = extents.iter().map(|e| e.1).sum();
        let mut buf = vec![0u8; total as usize];
        let whole = io.read(first.loc, &mut buf);
        report.extents_read += extents.len() as u64;
        let mut at = 0usize;
        for &(loc, len) in &extents {
            let piece = &mut buf[at..at + len as usize];
            at += len as usize;
            let outcome = match &whole {
                Ok(()) => Ok(()),
                Err(_) => io.read(loc, piece),
            };
            let found = match outcome {
                Ok(()) => {
                    report.bytes_read += len;
                    Ok(crc32c::crc32c(piece))
                }
                Err(e) => Err(e.to_string()),
            };
            for r in refs.iter().filter(|r| r.loc == loc) {
                let Some(&slot) = slots.get(&r.gen) else {
                    continue;
                };
                let gv = &mut report.generations[slot];
                gv.chunks_checked += 1;
                let bad = match &found {
                    Ok(c) if *c == r.crc && r.len == len => continue,
                    Ok(c) => BadChunk {
                        generation: r.gen,
                        chunk: r.chunk,
                        offset: loc,
                        expected: r.crc,
                        found: Some(*c),
                        error: (r.len != len)
                            .then(|| format!("extent also used with a chunk size of {len} bytes")),
                    },
                    Err(e) => BadChunk {
                        generation: r.gen,
                        chunk: r.chunk,
                        offset: loc,
                        expected: r.crc,
                        found: None,
                        error: Some(e.clone()),
                    },
                };
                gv.bad_chunks += 1;
                report.bad_chunks.push(bad);
            }
        }
    }

    /// The superblock and catalog part of [`Repo::verify`].
    fn verify_metadata(&self, io: &mut dyn BlockIo, report: &mut VerifyReport) -> Result<()> {
        let mut slots = vec![0u8; 2 * SLOT_BYTES];
        io.read(0, &mut slots)?;
        for slot in 0..2 {
            let bytes = &slots[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES];
            match Superblock::decode(bytes, io.size_bytes()) {
                Ok(sb) if slot == self.slot => {
                    if sb.seq != self.seq || sb.catalog != self.cur.loc || sb.uuid != self.uuid {
                        report.problems.push(format!(
                            "superblock slot {slot}: sequence {} with catalog at byte {}, expected sequence {} with catalog at byte {}",
                            sb.seq, sb.catalog.offset, self.seq, self.cur.loc.offset
                        ));
                    }
                }
                Ok(sb) if sb.seq > self.seq => report.warnings.push(format!(
                    "superblock slot {slot} (sequence {}) references an unreadable catalog; slot {} (sequence {}) serves",
                    sb.seq, self.slot, self.seq
                )),
                Ok(_) => {}
                Err(p) if slot == self.slot => report
                    .problems
                    .push(format!("superblock slot {slot} (the current one): {p}")),
                Err(SlotProblem::Blank) => {}
                Err(p) => report.warnings.push(format!(
                    "superblock slot {slot}: {p}; slot {} (sequence {}) serves",
                    self.slot, self.seq
                )),
            }
        }
        match read_catalog(io, &self.cur.loc, &self.uuid, self.ns_size) {
            Ok(c) if c == self.cur.catalog => {}
            Ok(_) => report
                .problems
                .push("the catalog on disk differs from the one in memory".into()),
            Err(RepoError::CorruptCatalog { offset, len, why }) => report
                .problems
                .push(format!("catalog at byte {offset} ({len} bytes): {why}")),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Writes every chunk of generation `id` to `dst` (zeros for zero
    /// chunks; out-of-scope chunks are skipped), in chunk order, in requests
    /// of up to 4 MiB, checking each chunk's crc32c on the way, then flushes
    /// `dst`. `progress(done, total)` is called in bytes of the source after
    /// each request.
    pub fn restore(
        &self,
        io: &mut dyn BlockIo,
        id: u64,
        dst: &mut dyn BlockIo,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RestoreStats> {
        let index = self.index(io, id)?;
        restore(io, &index, dst, progress)
    }
}

/// A repository opened for reading only, by [`Repo::open_reader`]: the
/// current catalog and nothing else.
///
/// It is what a reader of one generation needs (a restore, a snapshot, an
/// instant restore): opening reads the two superblock slots and one
/// catalog, not the index of every generation, so its cost does not grow
/// with the number of generations. It has no space map and no writer: it
/// offers no way to change the repository, and never writes to the
/// namespace. It does not know which generations are damaged (that takes
/// reading every index, as [`Repo::open`] does for [`Repo::damage`]);
/// [`RepoReader::index`] checks the index it reads exactly as
/// [`Repo::index`] does, and fails with the same
/// [`RepoError::CorruptIndex`] when it is damaged.
///
/// ```
/// use hotcopy_cow::repo::{now_us, GenSpec, MemIo, Repo, SourceIdent};
///
/// let mut ns = MemIo::new(4 << 20, 512);
/// let mut repo = Repo::format(&mut ns, false)?;
/// let spec = GenSpec {
///     source: SourceIdent { name: "vol0".into(), size_bytes: 64 << 10 },
///     chunk_size: 64 << 10,
///     parent: None,
///     compare_with_parent: false,
/// };
/// let w = repo.begin(&mut ns, &spec)?;
/// w.mark_zero(0, 1)?;
/// let g = repo.commit(&mut ns, w, now_us())?;
///
/// let reader = Repo::open_reader(&mut ns)?;
/// let index = reader.index(&mut ns, g.id)?;
/// assert_eq!(index.chunks(), 1);
/// # Ok::<(), hotcopy_cow::repo::RepoError>(())
/// ```
///
/// Changing the repository through it does not compile:
///
/// ```compile_fail
/// use hotcopy_cow::repo::{MemIo, Repo};
///
/// let mut ns = MemIo::new(4 << 20, 512);
/// Repo::format(&mut ns, false).unwrap();
/// let mut reader = Repo::open_reader(&mut ns).unwrap();
/// reader.remove(&mut ns, 1).unwrap();
/// ```
#[derive(Clone)]
pub struct RepoReader {
    pub(super) uuid: [u8; 16],
    pub(super) ns_size: u64,
    pub(super) seq: u64,
    pub(super) catalog: Catalog,
}

impl fmt::Debug for RepoReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RepoReader")
            .field("uuid", &self.uuid())
            .field("ns_size", &self.ns_size)
            .field("seq", &self.seq)
            .field("generations", &self.catalog.gens.len())
            .finish()
    }
}

impl RepoReader {
    /// The repository uuid, formatted.
    pub fn uuid(&self) -> String {
        hotcopy_bdev::format_uuid(u128::from_be_bytes(self.uuid))
    }

    /// Superblock sequence number of the state read.
    pub fn sequence(&self) -> u64 {
        self.seq
    }

    /// Every generation, oldest first.
    pub fn generations(&self) -> &[Generation] {
        &self.catalog.gens
    }

    pub fn generation(&self, id: u64) -> Option<&Generation> {
        self.catalog.find(id)
    }

    /// The newest complete generation of `source` (any source when `None`).
    pub fn latest(&self, source: Option<&str>) -> Option<&Generation> {
        self.catalog.latest(source)
    }

    /// Reads and checks the complete index of generation `id` (see
    /// [`Repo::index`]).
    pub fn index(&self, io: &mut dyn BlockIo, id: u64) -> Result<GenIndex> {
        let g = self.generation(id).ok_or(RepoError::NoSuchGeneration(id))?;
        GenIndex::load(io, self.ns_size, g)
    }

    /// See [`Repo::read_chunk`].
    pub fn read_chunk(
        &self,
        io: &mut dyn BlockIo,
        index: &GenIndex,
        chunk: u64,
        buf: &mut [u8],
    ) -> Result<ChunkLoc> {
        read_chunk(io, index, chunk, buf)
    }

    /// See [`Repo::restore`].
    pub fn restore(
        &self,
        io: &mut dyn BlockIo,
        id: u64,
        dst: &mut dyn BlockIo,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RestoreStats> {
        let index = self.index(io, id)?;
        restore(io, &index, dst, progress)
    }
}

/// [`Repo::read_chunk`] and [`RepoReader::read_chunk`].
fn read_chunk(
    io: &mut dyn BlockIo,
    index: &GenIndex,
    chunk: u64,
    buf: &mut [u8],
) -> Result<ChunkLoc> {
    if buf.len() != index.chunk_size as usize {
        return Err(RepoError::Invalid(format!(
            "read_chunk: a buffer of {} bytes for chunks of {}",
            buf.len(),
            index.chunk_size
        )));
    }
    let e = index.resolve(chunk).ok_or_else(|| {
        RepoError::Invalid(format!(
            "read_chunk: generation {} has no chunk {chunk} ({} chunks)",
            index.id,
            index.chunks()
        ))
    })?;
    match e.loc {
        ChunkLoc::Data(offset) => {
            io.read(offset, buf)?;
            let found = crc32c::crc32c(buf);
            if found != e.crc {
                return Err(RepoError::ChunkChecksum {
                    generation: index.id,
                    chunk,
                    offset,
                    expected: e.crc,
                    found,
                });
            }
        }
        ChunkLoc::Zero | ChunkLoc::Absent => buf.fill(0),
    }
    Ok(e.loc)
}

/// [`Repo::restore`] and [`RepoReader::restore`] of the generation
/// `index` belongs to.
fn restore(
    io: &mut dyn BlockIo,
    index: &GenIndex,
    dst: &mut dyn BlockIo,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RestoreStats> {
    let id = index.id;
    let total = index.source_size;
    if dst.size_bytes() < total {
        return Err(RepoError::Invalid(format!(
            "restore of generation {id}: the destination ({} bytes) is smaller than the source ({total} bytes)",
            dst.size_bytes()
        )));
    }
    if !total.is_multiple_of(dst.block_size() as u64) {
        return Err(RepoError::Invalid(format!(
            "restore of generation {id}: the source size {total} is not a multiple of the destination's {}-byte blocks",
            dst.block_size()
        )));
    }
    let cs = index.chunk_size as u64;
    let per_batch = (BATCH_BYTES / cs).max(1);
    let mut buf = vec![0u8; (per_batch * cs) as usize];
    let mut stats = RestoreStats::default();
    let n = index.chunks();
    let mut chunk = 0;
    while chunk < n {
        if let Some(Entry {
            loc: ChunkLoc::Absent,
            ..
        }) = index.resolve(chunk)
        {
            stats.absent_chunks += 1;
            chunk += 1;
            progress((chunk * cs).min(total), total);
            continue;
        }
        // A batch: consecutive chunks up to the next absent one.
        let first = chunk;
        while chunk < n
            && chunk - first < per_batch
            && !matches!(index.resolve(chunk).map(|e| e.loc), Some(ChunkLoc::Absent))
        {
            chunk += 1;
        }
        fill_batch(io, index, first, chunk, &mut buf, &mut stats)?;
        let len = (chunk * cs).min(total) - first * cs;
        dst.write(first * cs, &buf[..len as usize])?;
        stats.bytes_written += len;
        progress(first * cs + len, total);
    }
    dst.flush()?;
    Ok(stats)
}

/// Fills `buf` with chunks `first..end`, reading runs of chunks stored
/// back to back with one request each, and checks their crcs.
fn fill_batch(
    io: &mut dyn BlockIo,
    index: &GenIndex,
    first: u64,
    end: u64,
    buf: &mut [u8],
    stats: &mut RestoreStats,
) -> Result<()> {
    let cs = index.chunk_size as usize;
    let mut c = first;
    while c < end {
        let at = ((c - first) as usize) * cs;
        let Some(e) = index.resolve(c) else { break };
        let ChunkLoc::Data(offset) = e.loc else {
            buf[at..at + cs].fill(0);
            stats.zero_chunks += 1;
            c += 1;
            continue;
        };
        let mut run = 1;
        while c + run < end
            && index.resolve(c + run).map(|e| e.loc)
                == Some(ChunkLoc::Data(offset + run * cs as u64))
        {
            run += 1;
        }
        let piece = &mut buf[at..at + run as usize * cs];
        io.read(offset, piece)?;
        for k in 0..run {
            let bytes = &piece[k as usize * cs..(k as usize + 1) * cs];
            let found = crc32c::crc32c(bytes);
            let expected = index.raw(c + k).map(|e| e.crc).unwrap_or_default();
            if found != expected {
                return Err(RepoError::ChunkChecksum {
                    generation: index.id,
                    chunk: c + k,
                    offset: offset + k * cs as u64,
                    expected,
                    found,
                });
            }
        }
        stats.data_chunks += run;
        c += run;
    }
    Ok(())
}
