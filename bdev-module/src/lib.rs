//! # hotcopy-cow: online backup by copy-on-write interception
//!
//! A `cow` virtual bdev sits on a source bdev. While no job runs it forwards
//! I/O unchanged. A backup job copies the source, as it was at one instant
//! (the *consistency point*), to a backup target while hosts keep writing:
//!
//! * **Consistency point**: new I/O is held at channel entry while the
//!   writes in flight are registered (not waited for), the job is
//!   installed, I/O resumes, and the source is flushed once those writes
//!   have landed ([`vbdev`] documents the protocol, [`fence`] the
//!   registration). The freeze is measured.
//! * **Scope** ([`scope`]): the whole device, include/exclude ranges, minus
//!   space the source reports as deallocated.
//! * **Chunk states** ([`chunk_map`]): one byte per chunk; every transition a
//!   compare-and-swap, so the copy stream and writers on every core agree on
//!   who captures each chunk.
//! * **Copy stream** ([`job`]): reads pending chunks in schedule order (which
//!   can be changed while running) and writes them to the target.
//! * **Interception**: the first write to a pending chunk saves the chunk's
//!   old content into a container slot before it proceeds; later writes, and
//!   writes to chunks already captured or out of scope, pass straight through.
//!   Reads never wait.
//! * **Drain stream**: saved chunks go from the container to the target; a
//!   slot is reused only after its chunk is on the target.
//! * **Credits**: free slots. Above a soft watermark, captures are admitted at
//!   the drain rate; with none free, the writer that needs one waits. Only the
//!   writers that need a slot are slowed, and each one's delay is accounted.
//! * **Scheduling** ([`job`]): the streams share a budget of chunks in
//!   flight that an AIMD controller shrinks when the hosts' latency on the
//!   source rises above its no-backup level (measured just before the
//!   consistency point) and grows otherwise, down to a duty-cycled floor that
//!   still guarantees progress; drain goes first, at full depth once the
//!   container passes its soft watermark.
//! * **Failure**: if the target fails, the job fails, held writes are released
//!   and foreground I/O carries on.
//!
//! The invariant every test checks: **the target holds exactly the source's
//! content at the consistency point, for every chunk in scope, whatever writes
//! ran during the job.** It holds because a chunk's content on the source can
//! only change after the chunk leaves `Pending` and its old content has been
//! read (by the copy stream or a capture), and that read content is what
//! reaches the target.

pub mod backup;
pub mod cbt;
pub mod chunk_map;
pub mod fence;
pub mod job;
pub mod repo;
pub mod repo_bdev;
pub mod repo_target;
pub mod scope;
pub mod target;
pub mod vbdev;
pub mod view;

pub use backup::{
    start_backup, BackupConfig, BackupJob, ContainerConfig, CowError, JobStatus, SubmitterStats,
    DEFAULT_CHUNK_SIZE,
};
pub use cbt::{Cbt, CbtBase, CbtOpen, CbtStore};
pub use chunk_map::{ChunkMap, ChunkState};
pub use job::{JobState, JobTuning};
pub use repo_target::RepoTarget;
pub use scope::{BlockRange, Scope, ScopeSummary};
pub use target::{BackupTarget, CommitInfo, Placed, RawImageTarget, SkipReason, TargetError};
pub use vbdev::{create, create_with, CowBdev};
pub use view::{create_view, CowView, ViewStats};
