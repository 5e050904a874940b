//! # hotcopy-bdev
//!
//! The block device layer, shaped like SPDK's:
//!
//! * a [`Bdev`] is a named device with a block size and block count,
//!   implemented by a module through [`BdevBackend`];
//! * [`Bdev::open`] gives a [`BdevDesc`] (`Send + Sync`); a virtual bdev first
//!   takes an exclusive [`Claim`] on its base, after which only the claim
//!   holder may write to it;
//! * [`BdevDesc::channel`] creates the calling core's [`BdevChannel`]. The
//!   channel checks each [`BdevIo`] (range, buffer, permission, support) and
//!   hands it to the module's [`BackendChannel`];
//! * completions are pulled: [`BdevChannel::poll`] hands back every finished
//!   I/O, by value, with its status and its buffer. The submitter's `token`
//!   says which request it was. Nothing is allocated per I/O and no callback
//!   is stored, so a stacked module adds one indirect call each way (and
//!   one more on the way back, where the channel counts the completion);
//! * every channel counts what completes through it, by type, with errors,
//!   bytes, and read and write latency from its `submit` to its `poll`, in a
//!   shard of its own; [`Bdev::io_stats`] sums the shards into [`IoStats`]
//!   with percentiles (SPDK's `bdev_get_iostat`). The submit time rides in
//!   the `BdevIo`; see [`stats`] for the layout and the error bound.
//!
//! Modules: `null`, `malloc`, `uring` (files and block devices through
//! io_uring), `passthru` (the cost of stacking), `fault` (error, latency and
//! power-cut injection for tests).

pub mod bdev;

pub mod io;
pub mod modules;
pub mod stats;
pub mod testing;

pub use bdev::{
    format_uuid, AsAny, BackendChannel, Bdev, BdevBackend, BdevChannel, BdevDesc, BdevInfo,
    BdevRegistry, ChannelStats, Claim, MemoryWindow,
};
pub use io::{BdevIo, IoError, IoStatus, IoType};
pub use stats::{IoStats, Latencies, LatencySummary, OpCounts};

/// Control-path errors of the bdev layer.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    #[error("no bdev named {name:?} (known: {known})")]
    NotFound { name: String, known: String },
    #[error("a bdev named {0:?} already exists")]
    Exists(String),
    #[error("invalid bdev name {0:?}: use 1-128 of A-Z a-z 0-9 _ . -")]
    InvalidName(String),
    #[error("bdev {name:?}: {why}")]
    InvalidGeometry { name: String, why: String },
    #[error("bdev {bdev:?} is claimed by {by:?}")]
    Claimed { bdev: String, by: String },
    #[error("cannot create bdev {name:?}: {why}")]
    Create {
        name: String,
        why: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("cannot create a channel for bdev {name:?}: {source}")]
    Channel {
        name: String,
        #[source]
        source: std::io::Error,
    },
}
