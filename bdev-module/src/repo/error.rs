//! [`RepoError`]: everything that can go wrong with a repository, each
//! message naming the place (slot, block, generation, chunk) and, for
//! checksums, what was expected and what was found.

use hotcopy_bdev::IoError;

/// An error of the repository library.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The namespace failed an I/O.
    #[error("backup namespace: {op} of {len} bytes at byte {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: IoError,
    },
    /// The namespace did not complete an I/O within the limit
    /// (60 s by default): the request is given up on
    /// (its completion, if it ever comes, is dropped) and the operation
    /// fails instead of waiting for ever.
    #[error("backup namespace: {op} of {len} bytes at byte {offset} did not complete in {ms} ms")]
    Stalled {
        op: &'static str,
        offset: u64,
        len: u64,
        ms: u64,
    },
    /// A buffer for an I/O could not be mapped.
    #[error("backup namespace: cannot map an I/O buffer of {len} bytes: {source}")]
    Buffer {
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// An I/O that does not start and end on a block boundary (a caller bug).
    #[error(
        "{what}: {len} bytes at byte {offset} are not aligned to the {block_size}-byte block size"
    )]
    Unaligned {
        what: &'static str,
        offset: u64,
        len: u64,
        block_size: u32,
    },
    /// An I/O past the end of the device.
    #[error("{what}: {len} bytes at byte {offset} run past the end of the device ({size} bytes)")]
    OutOfRange {
        what: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// The namespace cannot hold a repository.
    #[error("backup namespace unusable: {0}")]
    Namespace(String),
    /// Neither superblock slot carries the repository magic.
    #[error("not a hotcopy repository: neither superblock slot (bytes 0..4096, 4096..8192) carries the magic HCREPO01")]
    NotARepository,
    /// Both superblock slots are unusable.
    #[error("corrupt superblock: slot 0: {slot0}; slot 1: {slot1}")]
    CorruptSuperblock { slot0: String, slot1: String },
    /// A superblock written by a newer (or unknown) format version.
    #[error(
        "unsupported repository format version {found} (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    /// `format` without `force` found something on the namespace.
    #[error("refusing to format: {0}; use force to overwrite it")]
    WouldOverwrite(String),
    /// The catalog referenced by the superblock is unreadable.
    #[error("corrupt catalog at byte {offset} ({len} bytes): {why}")]
    CorruptCatalog { offset: u64, len: u64, why: String },
    /// A generation's index is unreadable.
    #[error("corrupt index of generation {generation}: {why}")]
    CorruptIndex { generation: u64, why: String },
    /// A chunk's data does not match the checksum in its index entry.
    #[error("generation {generation} chunk {chunk} (data at byte {offset}): crc32c expected {expected:#010x}, found {found:#010x}")]
    ChunkChecksum {
        generation: u64,
        chunk: u64,
        offset: u64,
        expected: u32,
        found: u32,
    },
    /// No generation with this id.
    #[error("no generation {0} in the repository")]
    NoSuchGeneration(u64),
    /// The generation has no index yet (its backup never committed).
    #[error("generation {0} is incomplete (its backup did not commit); it can only be removed")]
    Incomplete(u64),
    /// The generation is being written, or is the parent of one being written.
    #[error("generation {generation} is in use: {why}")]
    InUse { generation: u64, why: String },
    /// A caller passed something the repository cannot accept.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Commit with chunks that were never placed, zeroed, inherited or excluded.
    #[error("generation {generation}: {missing} chunks were never written (first: chunk {first})")]
    Unwritten {
        generation: u64,
        missing: u64,
        first: u64,
    },
    /// No contiguous free extent is large enough.
    #[error("repository full: need {needed} contiguous bytes, largest free extent is {largest_free} bytes ({free} bytes free in all)")]
    NoSpace {
        needed: u64,
        largest_free: u64,
        free: u64,
    },
    /// A commit failed after the superblock write was issued: whether it
    /// took effect is unknown until the repository is opened again.
    #[error("a commit failed after its superblock write was issued; reopen the repository")]
    Poisoned,
}

/// Shorthand for results of this module.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;
