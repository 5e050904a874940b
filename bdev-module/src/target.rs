//! Where a backup lands: the [`BackupTarget`] trait and the raw-image target.
//!
//! A target decides where each run of chunks the streams read goes on the
//! backup namespace (any bdev), learns which chunks the job will not copy and
//! why, and is told when the job has written and flushed everything, so that
//! it can make the backup durable and visible. The raw image is the simplest:
//! chunk *i* lands at byte offset *i* × chunk size, so the target is a plain
//! image of the source. The repository ([`crate::repo_target`]) is the other.

use std::sync::atomic::{AtomicU64, Ordering};

use hotcopy_bdev::{Bdev, BdevDesc};

/// What a finished job reports to its target at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub source: String,
    pub chunk_bytes: u64,
    pub chunks_total: u64,
    pub chunks_copied: u64,
    /// Microseconds since the Unix epoch at the consistency point.
    pub consistency_point_us: u64,
}

/// Why the job does not copy a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Outside the include ranges, or inside an exclude range.
    Excluded,
    /// The source reports it deallocated: it reads as zeros.
    Unallocated,
    /// Not written since the parent generation (incremental backups).
    Unchanged,
}

/// Where a chunk that is on the target can be read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// At this target block (the chunk's bytes follow contiguously).
    Block(u64),
    /// The target recorded it as all zeros and stored no data.
    Zero,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("backup target {target}: {why}")]
    Invalid { target: String, why: String },
    #[error("backup target {target}: commit failed: {why}")]
    Commit { target: String, why: String },
    #[error("backup target {target}: {why}")]
    Io { target: String, why: String },
}

/// A place for backups. Shared by the job's cores, so `Send + Sync`.
pub trait BackupTarget: Send + Sync + 'static {
    /// The bdev backups are written to (opened writable, normally claimed).
    fn desc(&self) -> &BdevDesc;

    /// Checks the target can hold a backup of `source` in chunks of `chunk_bytes`.
    fn prepare(&self, source: &Bdev, chunk_bytes: u64) -> Result<(), TargetError>;

    /// Chunks `first..first + count` will not be copied, for `why`. Called
    /// before the copy stream starts (and, for chunks found unchanged at the
    /// consistency point, just after it).
    fn skip(&self, first: u64, count: u64, why: SkipReason) -> Result<(), TargetError> {
        let _ = (first, count, why);
        Ok(())
    }

    /// Places a run of `count` consecutive chunks from `first`, read from the
    /// source into `data` (`count` × chunk size bytes; the first `valid` are
    /// the source's, the rest lies past its end). The target may reorder or
    /// drop chunks inside `data`. Returns the target block to write and how
    /// many bytes from the front of `data`, or `None` when nothing needs
    /// writing (the chunks are recorded already, e.g. as zeros). Runs on the
    /// streams' reactor once per run.
    fn place(
        &self,
        first: u64,
        count: u64,
        data: &mut [u8],
        valid: usize,
    ) -> Result<Option<(u64, usize)>, TargetError>;

    /// Where a run of `count` whole chunks from `first` goes when the target
    /// stores the source's bytes exactly as they are and never touches the
    /// buffer: its first block on the target bdev, written with `count`
    /// chunks' bytes. A copy run from a source whose memory can be lent
    /// (a RAM disk) is then written straight from that memory, with no read
    /// into a buffer first. `None` (the default) when the target may change
    /// or inspect the data (a repository): the copy stream reads into a
    /// buffer of its own and calls [`place`](Self::place).
    fn place_verbatim(&self, first: u64, count: u64) -> Option<u64> {
        let _ = (first, count);
        None
    }

    /// Where `chunk`, once placed and written, can be read back.
    fn locate(&self, chunk: u64) -> Option<Placed>;

    /// Whether runs of consecutive chunks may be placed together (else the
    /// copy stream places one chunk at a time).
    fn contiguous(&self) -> bool {
        false
    }

    /// Called after every chunk is on the target and the target is flushed,
    /// on a thread of its own (not a reactor: it may block on I/O through a
    /// channel it opens there). Returns the generation id when the target
    /// keeps generations.
    fn commit(&self, info: &CommitInfo) -> Result<Option<u64>, TargetError>;

    /// The uuid of the repository generations are committed to, if any.
    fn repository(&self) -> Option<String> {
        None
    }

    /// Called once when the job fails or is cancelled.
    fn abort(&self, why: &str) {
        let _ = why;
    }

    /// A short description for logs and status.
    fn describe(&self) -> String;
}

/// Chunk *i* at byte offset *i* × chunk size: the target becomes an image of the source.
pub struct RawImageTarget {
    desc: BdevDesc,
    /// Target blocks per chunk, set by `prepare`.
    chunk_blocks: AtomicU64,
}

impl RawImageTarget {
    /// Uses `desc` (writable) as the image.
    pub fn new(desc: BdevDesc) -> Self {
        RawImageTarget {
            desc,
            chunk_blocks: AtomicU64::new(0),
        }
    }
}

impl BackupTarget for RawImageTarget {
    fn desc(&self) -> &BdevDesc {
        &self.desc
    }

    fn prepare(&self, source: &Bdev, chunk_bytes: u64) -> Result<(), TargetError> {
        let t = self.desc.bdev();
        let invalid = |why: String| TargetError::Invalid {
            target: t.name().to_string(),
            why,
        };
        if !self.desc.is_writable() {
            return Err(invalid("opened read-only".into()));
        }
        if t.size_bytes() < source.size_bytes() {
            return Err(invalid(format!(
                "{} bytes is smaller than the source {} ({} bytes)",
                t.size_bytes(),
                source.name(),
                source.size_bytes()
            )));
        }
        if !chunk_bytes.is_multiple_of(t.block_size() as u64) {
            return Err(invalid(format!(
                "chunk size {chunk_bytes} is not a multiple of its block size {}",
                t.block_size()
            )));
        }
        self.chunk_blocks
            .store(chunk_bytes / t.block_size() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn place(
        &self,
        first: u64,
        _count: u64,
        _data: &mut [u8],
        valid: usize,
    ) -> Result<Option<(u64, usize)>, TargetError> {
        Ok(Some((
            first * self.chunk_blocks.load(Ordering::Relaxed),
            valid,
        )))
    }

    fn place_verbatim(&self, first: u64, _count: u64) -> Option<u64> {
        Some(first * self.chunk_blocks.load(Ordering::Relaxed))
    }

    fn locate(&self, chunk: u64) -> Option<Placed> {
        Some(Placed::Block(
            chunk * self.chunk_blocks.load(Ordering::Relaxed),
        ))
    }

    fn contiguous(&self) -> bool {
        true
    }

    fn commit(&self, _info: &CommitInfo) -> Result<Option<u64>, TargetError> {
        // A raw image needs nothing beyond the flush the job already did.
        Ok(None)
    }

    fn describe(&self) -> String {
        format!("raw image on {}", self.desc.bdev().name())
    }
}
