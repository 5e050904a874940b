//! [`GenWriter`]: the generation being written, and the placement API the
//! backup streams use to put chunk data on the namespace.
//!
//! A writer holds the generation's complete index in memory as two atomics
//! per chunk (location; crc and storing generation), so any number of
//! threads can place runs through `&self` at once. The only lock is the
//! repository's space map, taken once per run to allocate the run's extent.
//! Each chunk must be placed (or zeroed, inherited, excluded) by one caller
//! at a time; placing a chunk again replaces its entry, and the space of the
//! replaced data is reclaimed when the generation commits or aborts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::error::{RepoError, Result};
use super::format::{RawEntry, SourceIdent, ALLOC_UNIT, LOC_ABSENT, LOC_ZERO};
use super::io::BlockIo;
use super::read::GenIndex;
use super::{lock, Shared};

/// In-memory marker of an entry nobody has set yet (never written to disk:
/// commit refuses while any is left).
const UNSET: u64 = u64::MAX - 2;

/// Zero detection looks at this many bytes at a time, so a chunk with data
/// near its start is rejected after one small pass.
const ZERO_PROBE: usize = 4096;

/// What to back up, as [`super::Repo::begin`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenSpec {
    pub source: SourceIdent,
    /// Power of two, 4 KiB to 16 MiB.
    pub chunk_size: u32,
    /// For an incremental: the complete generation it is taken against.
    pub parent: Option<u64>,
    /// For an incremental without change tracking: [`GenWriter::place_run`]
    /// compares each chunk's crc32c with the parent's entry and, when they
    /// are equal, shares the parent's data instead of storing the chunk.
    /// A changed chunk whose crc32c happens to equal the old one (a 2^-32
    /// chance per changed chunk) would be missed, so this is opt-in and the
    /// generation records that it was used.
    pub compare_with_parent: bool,
}

/// Where [`GenWriter::place_run`] put a run's stored chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataExtent {
    /// Byte offset on the namespace.
    pub offset: u64,
    /// Bytes to write: the front of the run's buffer after compaction.
    pub len: u64,
}

/// The outcome of [`GenWriter::place_run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Placement {
    /// The extent to write `data[..len]` to, or `None` when nothing in the
    /// run needs storing.
    pub write: Option<DataExtent>,
    /// Chunks to be stored (moved to the front of the buffer, in order).
    pub stored: u64,
    /// All-zero chunks, recorded as zero entries.
    pub zero: u64,
    /// Chunks equal (by crc32c) to the parent's, shared with it.
    pub unchanged: u64,
}

/// A generation being written. See the module docs.
pub struct GenWriter {
    pub(super) id: u64,
    pub(super) source: SourceIdent,
    pub(super) chunk_size: u32,
    pub(super) chunks: u64,
    pub(super) compare: bool,
    pub(super) parent: Option<GenIndex>,
    loc: Box<[AtomicU64]>,
    /// `crc | gen << 32`.
    meta: Box<[AtomicU64]>,
    /// Entries no longer `UNSET`.
    set: AtomicU64,
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for GenWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenWriter")
            .field("id", &self.id)
            .field("source", &self.source)
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.chunks)
            .field("parent", &self.parent.as_ref().map(|p| p.generation()))
            .field("unset", &self.unset_chunks())
            .finish()
    }
}

impl GenWriter {
    pub(super) fn new(
        id: u64,
        spec: &GenSpec,
        chunks: u64,
        parent: Option<GenIndex>,
        shared: Arc<Shared>,
    ) -> GenWriter {
        GenWriter {
            id,
            source: spec.source.clone(),
            chunk_size: spec.chunk_size,
            chunks,
            compare: spec.compare_with_parent,
            parent,
            loc: (0..chunks).map(|_| AtomicU64::new(UNSET)).collect(),
            meta: (0..chunks).map(|_| AtomicU64::new(0)).collect(),
            set: AtomicU64::new(0),
            shared,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Chunks of the source.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    pub fn source(&self) -> &SourceIdent {
        &self.source
    }

    pub fn parent(&self) -> Option<u64> {
        self.parent.as_ref().map(|p| p.generation())
    }

    /// Chunks not yet placed, zeroed, inherited or excluded.
    pub fn unset_chunks(&self) -> u64 {
        self.chunks - self.set.load(Ordering::Acquire)
    }

    fn check_run(&self, what: &str, first: u64, count: u64) -> Result<()> {
        match first.checked_add(count) {
            Some(end) if end <= self.chunks && count > 0 => Ok(()),
            _ => Err(RepoError::Invalid(format!(
                "{what}: chunks {first}+{count} are not within generation {}'s {} chunks",
                self.id, self.chunks
            ))),
        }
    }

    fn set_entry(&self, chunk: u64, e: RawEntry) {
        let i = chunk as usize;
        self.meta[i].store(e.crc as u64 | (e.gen as u64) << 32, Ordering::Relaxed);
        if self.loc[i].swap(e.loc, Ordering::AcqRel) == UNSET {
            self.set.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The entry of `chunk`, or `None` while unset.
    pub(super) fn entry(&self, chunk: u64) -> Option<RawEntry> {
        let i = chunk as usize;
        let loc = self.loc[i].load(Ordering::Acquire);
        let meta = self.meta[i].load(Ordering::Relaxed);
        (loc != UNSET).then_some(RawEntry {
            loc,
            crc: meta as u32,
            gen: (meta >> 32) as u32,
        })
    }

    /// Where `chunk` was put, once placed, zeroed, inherited or excluded.
    pub fn location(&self, chunk: u64) -> Option<super::ChunkLoc> {
        if chunk >= self.chunks {
            return None;
        }
        self.entry(chunk).map(|e| match e.loc {
            LOC_ZERO => super::ChunkLoc::Zero,
            LOC_ABSENT => super::ChunkLoc::Absent,
            off => super::ChunkLoc::Data(off),
        })
    }

    /// The first unset chunk, if any.
    pub(super) fn first_unset(&self) -> Option<u64> {
        (0..self.chunks).find(|&c| self.loc[c as usize].load(Ordering::Acquire) == UNSET)
    }

    fn own(&self, loc: u64, crc: u32) -> RawEntry {
        RawEntry {
            loc,
            crc,
            gen: self.id as u32,
        }
    }

    /// Places a run of `count` consecutive chunks starting at `first`, whose
    /// data is in `data` (`count * chunk_size` bytes; for the source's last
    /// chunk, the bytes past the end of the source are set to zero here).
    ///
    /// Each chunk is checksummed. All-zero chunks become zero entries; with
    /// [`GenSpec::compare_with_parent`], chunks whose crc32c equals the
    /// parent's entry share the parent's data. The chunks left are moved to
    /// the front of `data`, in chunk order, and get one contiguous extent;
    /// the caller writes `data[..len]` at the returned offset and must have
    /// finished that write before it commits the generation.
    pub fn place_run(&self, first: u64, count: u64, data: &mut [u8]) -> Result<Placement> {
        self.check_run("place_run", first, count)?;
        let cs = self.chunk_size as usize;
        if data.len() as u64 != count * cs as u64 {
            return Err(RepoError::Invalid(format!(
                "place_run: {} bytes of data for {count} chunks of {cs} bytes",
                data.len()
            )));
        }
        if first + count == self.chunks {
            let tail = (self.source.size_bytes - (self.chunks - 1) * cs as u64) as usize;
            data[(count as usize - 1) * cs + tail..].fill(0);
        }
        let mut out = Placement::default();
        let mut store: Vec<(u64, u32)> = Vec::new();
        for i in 0..count as usize {
            let chunk = first + i as u64;
            let bytes = &data[i * cs..(i + 1) * cs];
            if is_zero(bytes) {
                self.set_entry(chunk, self.own(LOC_ZERO, 0));
                out.zero += 1;
                continue;
            }
            let crc = crc32c::crc32c(bytes);
            if self.compare {
                if let Some(pe) = self.parent.as_ref().and_then(|p| p.raw(chunk)) {
                    if pe.is_data() && pe.crc == crc {
                        self.set_entry(chunk, pe);
                        out.unchanged += 1;
                        continue;
                    }
                }
            }
            let dst = store.len() * cs;
            if dst != i * cs {
                data.copy_within(i * cs..(i + 1) * cs, dst);
            }
            store.push((chunk, crc));
        }
        if store.is_empty() {
            return Ok(out);
        }
        let len = (store.len() * cs) as u64;
        let offset = {
            let mut st = lock(&self.shared.state);
            if self.shared.is_poisoned() {
                return Err(RepoError::Poisoned);
            }
            let Some(unit) = st.space.alloc_data(len / ALLOC_UNIT) else {
                return Err(RepoError::NoSpace {
                    needed: len,
                    largest_free: st.space.largest_free() * ALLOC_UNIT,
                    free: (st.space.units() - st.space.used_units()) * ALLOC_UNIT,
                });
            };
            let offset = unit * ALLOC_UNIT;
            match st.writers.get_mut(&self.id) {
                Some(reg) => reg.extents.push((offset, len)),
                None => {
                    // The repository no longer knows this writer (it was
                    // committed or aborted): give the space back.
                    st.space.free_bytes(offset, len);
                    return Err(RepoError::Invalid(format!(
                        "generation {} is no longer being written",
                        self.id
                    )));
                }
            }
            offset
        };
        for (k, &(chunk, crc)) in store.iter().enumerate() {
            self.set_entry(chunk, self.own(offset + (k * cs) as u64, crc));
        }
        out.stored = store.len() as u64;
        out.write = Some(DataExtent { offset, len });
        Ok(out)
    }

    /// [`GenWriter::place_run`], then writes the stored chunks through `io`
    /// (the synchronous path for tools and tests).
    pub fn write_run(
        &self,
        io: &mut dyn BlockIo,
        first: u64,
        count: u64,
        data: &mut [u8],
    ) -> Result<Placement> {
        let p = self.place_run(first, count, data)?;
        if let Some(w) = p.write {
            io.write(w.offset, &data[..w.len as usize])?;
        }
        Ok(p)
    }

    /// Chunks the job did not copy because they did not change since the
    /// parent: they share the parent's entries.
    pub fn inherit(&self, first: u64, count: u64) -> Result<()> {
        self.check_run("inherit", first, count)?;
        let Some(parent) = &self.parent else {
            return Err(RepoError::Invalid(format!(
                "inherit: generation {} has no parent",
                self.id
            )));
        };
        if first + count > parent.chunks() {
            return Err(RepoError::Invalid(format!(
                "inherit: chunks {first}+{count} are past the end of parent generation {} ({} chunks)",
                parent.generation(),
                parent.chunks()
            )));
        }
        for chunk in first..first + count {
            if let Some(e) = parent.raw(chunk) {
                self.set_entry(chunk, e);
            }
        }
        Ok(())
    }

    /// Equivalent to [`GenWriter::inherit`] for one chunk.
    pub fn mark_unchanged(&self, chunk: u64) -> Result<()> {
        self.inherit(chunk, 1)
    }

    /// Chunks known to be zero without reading them (deallocated space).
    pub fn mark_zero(&self, first: u64, count: u64) -> Result<()> {
        self.check_run("mark_zero", first, count)?;
        for chunk in first..first + count {
            self.set_entry(chunk, self.own(LOC_ZERO, 0));
        }
        Ok(())
    }

    /// Chunks outside the backup's scope: not backed up, not restored.
    pub fn mark_absent(&self, first: u64, count: u64) -> Result<()> {
        self.check_run("mark_absent", first, count)?;
        for chunk in first..first + count {
            self.set_entry(chunk, self.own(LOC_ABSENT, 0));
        }
        Ok(())
    }
}

impl Drop for GenWriter {
    /// A writer dropped without commit or abort is left as a crash leaves
    /// it: its record stays in progress, and the space it allocated is free
    /// again (nothing durable references it).
    fn drop(&mut self) {
        let mut st = lock(&self.shared.state);
        if let Some(reg) = st.writers.remove(&self.id) {
            for (offset, len) in reg.extents {
                st.space.free_bytes(offset, len);
            }
        }
    }
}

/// Whether `b` is all zeros, comparing [`ZERO_PROBE`] bytes at a time with
/// a block of zeros (a `memcmp`, vectorised in every build).
pub(super) fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; ZERO_PROBE] = [0; ZERO_PROBE];
    b.chunks(ZERO_PROBE)
        .all(|piece| piece == &ZEROS[..piece.len()])
}
