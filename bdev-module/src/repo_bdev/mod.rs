//! # Generations as bdevs: snapshot access, instant restore, async restore
//!
//! The [`repo`](crate::repo) library reads a generation synchronously, for
//! tools. This module serves generations on the data path, asynchronously,
//! from the backup namespace (any bdev holding a repository):
//!
//! * [`create_snapshot`]: a bdev showing one generation, read-only or
//!   writable through a private overlay ([`snapshot`]);
//! * [`start_instant_restore`]: a bdev that serves reads and writes at once
//!   while a background poller copies the generation onto a target bdev,
//!   chunks the hosts touch first ([`instant`]);
//! * [`restore_to`]: a pipelined copy of a generation onto a bdev, checking
//!   every chunk's checksum, at the destination's sequential write speed
//!   ([`restore`]); [`restore_to_on`] spreads it over several reactors.
//!
//! ## The generation's index, once
//!
//! Each of them opens the repository for reading only
//! ([`Repo::open_reader`]: the superblocks and the catalog, not every
//! generation's index, so creating one costs the same however many
//! generations the repository holds) and loads the generation's complete
//! [`GenIndex`] once, when it is created, through a [`ChannelIo`] of its
//! own, on the calling thread (on a helper thread it waits for, for
//! [`restore_to`]). This is control path: it blocks until the index is read
//! and checked; a damaged index fails the creation with
//! [`RepoError::CorruptIndex`] inside [`RepoBdevError::Repo`]. From then
//! on, resolving a chunk is one array lookup: `Data(byte offset)`, `Zero`
//! or `Absent` (outside the backup's scope).
//! The namespace is only ever opened **read-only**: none of these can write
//! to it, whatever their hosts do.
//!
//! ## Block size
//!
//! A bdev here uses the largest block size of the devices it reads and
//! writes (the namespace, and the overlay or the target), so that every
//! byte offset it computes is whole blocks on each of them. The chunk size
//! and the generation's source size must be multiples of it; creation fails
//! with an error naming both otherwise.
//!
//! ## Data path
//!
//! Per-channel state (request, forward and piece slots, a pool of
//! chunk-sized bounce buffers, the channels to the namespace and the
//! overlay or target) is created with the channel, on its reactor. Per I/O
//! nothing is allocated (slot tables only grow past the deepest queue seen)
//! and no lock is taken; chunk states shared between cores are atomics with
//! compare-and-swap transitions. A host request that one device can serve
//! as is goes to it with only its offset translated (no copy); one that
//! spans chunks served from different places is split into one *piece* per
//! chunk, each read or written through a bounce buffer.
//!
//! Internal I/O carries tokens with the top bit set ([`INTERNAL`]); hosts of
//! these bdevs must keep that bit clear in their own tokens.

mod common;
pub mod instant;
pub mod restore;
pub mod snapshot;

use hotcopy_bdev::{BdevDesc, BdevError, IoError};

use crate::repo::{ChannelIo, GenIndex, Repo, RepoError};

pub use common::INTERNAL;
pub use instant::{
    start_instant_restore, HydState, InstantBdev, InstantRestore, InstantStatus, InstantTuning,
    RestoreState,
};
pub use restore::{restore_to, restore_to_on, RestoreReport};
pub use snapshot::{create_snapshot, OverlayConfig, RepoSnapshot, SnapshotHandle, SnapshotStats};

/// Linux `ENOSPC`: a write to a writable snapshot whose overlay is full
/// fails with `IoError::Device(ENOSPC)`.
pub const ENOSPC: i32 = 28;
/// Linux `EIO`: a chunk read from the namespace whose crc32c does not match
/// its index entry fails the host I/O that needed it with
/// `IoError::Device(EIO)`.
pub const EIO: i32 = 5;

/// What can go wrong creating or running these bdevs and engines.
#[derive(Debug, thiserror::Error)]
pub enum RepoBdevError {
    /// Looking up, claiming, registering or opening a bdev failed.
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// The repository or the generation's index could not be read.
    #[error("repository on {namespace:?}: {source}")]
    Repo {
        namespace: String,
        #[source]
        source: RepoError,
    },
    /// The request does not fit the devices (sizes, block sizes, overlay).
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    /// The home reactor could not run the engine's setup.
    #[error("reactor {core}: {why}")]
    Reactor { core: usize, why: String },
    /// A device failed an I/O of the restore.
    #[error("restore of generation {generation}: {op} of {len} bytes at byte {offset} of {device:?} failed: {source}")]
    Io {
        generation: u64,
        device: String,
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: IoError,
    },
    /// A chunk read from the namespace does not match its checksum.
    #[error("restore of generation {generation}: chunk {chunk} (data at byte {offset} of {namespace:?}): crc32c expected {expected:#010x}, found {found:#010x}")]
    Checksum {
        generation: u64,
        namespace: String,
        chunk: u64,
        offset: u64,
        expected: u32,
        found: u32,
    },
}

/// Opens the repository on `ns` for reading and loads the complete index
/// of `generation` (control path: synchronous I/O on the calling thread).
pub(crate) fn load_index(ns: &BdevDesc, generation: u64) -> Result<GenIndex, RepoBdevError> {
    let repo_err = |source| RepoBdevError::Repo {
        namespace: ns.bdev().name().to_string(),
        source,
    };
    let mut io = ChannelIo::new(ns.channel()?);
    let repo = Repo::open_reader(&mut io).map_err(repo_err)?;
    repo.index(&mut io, generation).map_err(repo_err)
}

/// The block size a bdev over devices of block sizes `sizes` uses (see the
/// module docs), after checking that chunks and the source are whole blocks.
pub(crate) fn common_block_size(
    what: &str,
    index: &GenIndex,
    sizes: &[u32],
) -> Result<u64, RepoBdevError> {
    let bs = sizes.iter().copied().max().unwrap_or(512).max(512) as u64;
    let cs = index.chunk_size() as u64;
    let size = index.source_size();
    if !cs.is_multiple_of(bs) || !size.is_multiple_of(bs) {
        return Err(RepoBdevError::Invalid {
            what: what.to_string(),
            why: format!(
                "generation {} (chunks of {cs} bytes, {size} bytes of source) is not whole {bs}-byte blocks of the devices it uses",
                index.generation()
            ),
        });
    }
    Ok(bs)
}
