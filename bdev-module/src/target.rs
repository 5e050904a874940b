//! Where a backup lands: the [`BackupTarget`] trait and the raw-image target.
//!
//! A target maps each chunk of the source to a place on the backup namespace
//! (any bdev) and is told when the job has written and flushed everything, so
//! that it can make the backup durable and visible. The raw image is the
//! simplest: chunk *i* lands at byte offset *i* × chunk size, so the target is
//! a plain image of the source. The repository format plugs in here too.

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

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("backup target {target}: {why}")]
    Invalid { target: String, why: String },
    #[error("backup target {target}: commit failed: {why}")]
    Commit { target: String, why: String },
}

/// A place for backups. Shared by the job's cores, so `Send + Sync`.
pub trait BackupTarget: Send + Sync + 'static {
    /// The bdev backups are written to (opened writable, normally claimed).
    fn desc(&self) -> &BdevDesc;

    /// Checks the target can hold a backup of `source` in chunks of `chunk_bytes`.
    fn prepare(&self, source: &Bdev, chunk_bytes: u64) -> Result<(), TargetError>;

    /// The first target block of `chunk`. Fixed for the life of a job.
    fn chunk_lba(&self, chunk: u64, chunk_bytes: u64) -> u64;

    /// Whether consecutive chunks land at consecutive target blocks, so the
    /// copy stream may write several in one I/O.
    fn contiguous(&self) -> bool {
        false
    }

    /// Called after every chunk is on the target and the target is flushed.
    fn commit(&self, info: &CommitInfo) -> Result<(), TargetError>;

    /// A short description for logs and status.
    fn describe(&self) -> String;
}

/// Chunk *i* at byte offset *i* × chunk size: the target becomes an image of the source.
pub struct RawImageTarget {
    desc: BdevDesc,
}

impl RawImageTarget {
    /// Uses `desc` (writable) as the image.
    pub fn new(desc: BdevDesc) -> Self {
        RawImageTarget { desc }
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
        Ok(())
    }

    fn chunk_lba(&self, chunk: u64, chunk_bytes: u64) -> u64 {
        chunk * chunk_bytes / self.desc.bdev().block_size() as u64
    }

    fn contiguous(&self) -> bool {
        true
    }

    fn commit(&self, _info: &CommitInfo) -> Result<(), TargetError> {
        // A raw image needs nothing beyond the flush the job already did.
        Ok(())
    }

    fn describe(&self) -> String {
        format!("raw image on {}", self.desc.bdev().name())
    }
}
