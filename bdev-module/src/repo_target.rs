//! The repository as a backup target: every job writes one generation.
//!
//! [`RepoTarget::begin`] opens the repository on the backup namespace and
//! records a generation *in progress* (committed, so a crash leaves it
//! recognisably incomplete). During the job the streams hand each run of
//! chunks they read to [`BackupTarget::place`], which checksums the chunks,
//! turns zero chunks into zero entries, shares chunks equal to the parent's
//! when asked to compare, packs what is left to the front of the buffer and
//! allocates one extent for it; the streams write that extent. Chunks the job
//! skips are recorded as absent (excluded), zero (deallocated) or inherited
//! from the parent (unchanged). After the job has flushed the namespace,
//! [`BackupTarget::commit`] writes the generation's index and catalog and
//! flips the superblock. A job that fails removes its generation.
//!
//! Metadata I/O is synchronous, once per job: begin on the home reactor
//! (from the control thread that starts the job), commit on a thread the
//! streams start for it, so that writing the index, the catalog and the
//! superblock never holds a reactor's host I/O, and abort where the job
//! ends. `place` takes one uncontended mutex and checksums the run once per
//! run, never per host I/O.

use std::sync::{Arc, Mutex};

use hotcopy_bdev::{Bdev, BdevDesc};
use hotcopy_runtime::ReactorHandle;

use crate::repo::{ChannelIo, ChunkLoc, GenSpec, GenWriter, Repo, RepoError};
use crate::target::{BackupTarget, CommitInfo, Placed, SkipReason, TargetError};

struct State {
    repo: Repo,
    /// Committed or aborted already.
    ended: bool,
}

/// A generation being written by a backup job (see the module docs).
pub struct RepoTarget {
    desc: BdevDesc,
    /// Where metadata I/O runs when the caller is not on a reactor.
    home: ReactorHandle,
    state: Arc<Mutex<State>>,
    /// The generation's writer: `place` and `locate` use it without the lock.
    writer: Arc<GenWriter>,
    block_size: u64,
    name: String,
    generation: u64,
    parent: Option<u64>,
    uuid: String,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RepoTarget {
    /// Opens the repository on `desc` (writable) and begins a generation of
    /// `spec`. The repository I/O runs on `home`; call from a control thread.
    pub fn begin(
        desc: BdevDesc,
        home: &ReactorHandle,
        spec: GenSpec,
    ) -> Result<RepoTarget, TargetError> {
        let name = desc.bdev().name().to_string();
        let err = |why: String| TargetError::Invalid {
            target: name.clone(),
            why,
        };
        if !desc.is_writable() {
            return Err(err("opened read-only".into()));
        }
        let d = desc.clone();
        let parent = spec.parent;
        let (repo, writer) = home
            .exec(move || -> Result<(Repo, GenWriter), RepoError> {
                let mut io = ChannelIo::new(
                    d.channel()
                        .map_err(|e| RepoError::Namespace(e.to_string()))?,
                );
                let mut repo = Repo::open(&mut io)?;
                let w = repo.begin(&mut io, &spec)?;
                Ok((repo, w))
            })
            .map_err(|e| err(format!("reactor: {e}")))?
            .map_err(|e| err(e.to_string()))?;
        let writer = Arc::new(writer);
        Ok(RepoTarget {
            home: home.clone(),
            block_size: desc.bdev().block_size() as u64,
            generation: writer.id(),
            uuid: repo.uuid(),
            parent,
            writer,
            state: Arc::new(Mutex::new(State { repo, ended: false })),
            name,
            desc,
        })
    }

    /// The generation this job writes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Its parent, for an incremental.
    pub fn parent(&self) -> Option<u64> {
        self.parent
    }

    /// The repository's uuid.
    pub fn repository(&self) -> &str {
        &self.uuid
    }

    fn io_err(&self, e: impl std::fmt::Display) -> TargetError {
        TargetError::Io {
            target: self.name.clone(),
            why: e.to_string(),
        }
    }

    /// Runs `f` with the repository on a channel opened on the current
    /// thread (a reactor, or the commit's thread).
    fn with_repo<T>(
        &self,
        f: impl FnOnce(&mut State, &mut ChannelIo) -> Result<T, RepoError>,
    ) -> Result<T, TargetError> {
        repo_io(&self.state, &self.desc, f).map_err(|e| self.io_err(e))
    }
}

/// Runs `f` with the repository and a channel of the namespace on the
/// current reactor.
fn repo_io<T>(
    state: &Mutex<State>,
    desc: &BdevDesc,
    f: impl FnOnce(&mut State, &mut ChannelIo) -> Result<T, RepoError>,
) -> Result<T, RepoError> {
    let ch = desc
        .channel()
        .map_err(|e| RepoError::Namespace(e.to_string()))?;
    let mut io = ChannelIo::new(ch);
    f(&mut lock(state), &mut io)
}

/// Removes the generation (once), with I/O on the current reactor.
fn abort_on_reactor(state: &Mutex<State>, desc: &BdevDesc, w: &GenWriter) -> Result<(), RepoError> {
    repo_io(state, desc, |st, io| {
        if std::mem::replace(&mut st.ended, true) {
            return Ok(());
        }
        st.repo.abort_ref(io, w)
    })
}

impl BackupTarget for RepoTarget {
    fn desc(&self) -> &BdevDesc {
        &self.desc
    }

    fn prepare(&self, source: &Bdev, chunk_bytes: u64) -> Result<(), TargetError> {
        let w = &self.writer;
        let invalid = |why: String| TargetError::Invalid {
            target: self.name.clone(),
            why,
        };
        if w.chunk_size() as u64 != chunk_bytes {
            return Err(invalid(format!(
                "generation {} was begun with chunks of {} bytes; the job uses {chunk_bytes}",
                w.id(),
                w.chunk_size()
            )));
        }
        if w.source().size_bytes != source.size_bytes() {
            return Err(invalid(format!(
                "generation {} was begun for {} bytes; {} has {}",
                w.id(),
                w.source().size_bytes,
                source.name(),
                source.size_bytes()
            )));
        }
        if !chunk_bytes.is_multiple_of(self.block_size) {
            return Err(invalid(format!(
                "chunk size {chunk_bytes} is not a multiple of its block size {}",
                self.block_size
            )));
        }
        Ok(())
    }

    fn skip(&self, first: u64, count: u64, why: SkipReason) -> Result<(), TargetError> {
        let w = &self.writer;
        match why {
            SkipReason::Excluded => w.mark_absent(first, count),
            SkipReason::Unallocated => w.mark_zero(first, count),
            SkipReason::Unchanged => w.inherit(first, count),
        }
        .map_err(|e| self.io_err(e))
    }

    fn place(
        &self,
        first: u64,
        count: u64,
        data: &mut [u8],
        _valid: usize,
    ) -> Result<Option<(u64, usize)>, TargetError> {
        let p = self
            .writer
            .place_run(first, count, data)
            .map_err(|e| self.io_err(e))?;
        Ok(p.write
            .map(|x| (x.offset / self.block_size, x.len as usize)))
    }

    fn locate(&self, chunk: u64) -> Option<Placed> {
        match self.writer.location(chunk)? {
            ChunkLoc::Data(off) => Some(Placed::Block(off / self.block_size)),
            ChunkLoc::Zero => Some(Placed::Zero),
            ChunkLoc::Absent => None,
        }
    }

    fn contiguous(&self) -> bool {
        true
    }

    fn repository(&self) -> Option<String> {
        Some(self.uuid.clone())
    }

    fn commit(&self, info: &CommitInfo) -> Result<Option<u64>, TargetError> {
        let w = self.writer.clone();
        let g = self.with_repo(|st, io| {
            if std::mem::replace(&mut st.ended, true) {
                return Err(RepoError::Invalid(
                    "the generation has ended already".into(),
                ));
            }
            st.repo.commit_ref(io, &w, info.consistency_point_us)
        });
        g.map(|g| Some(g.id)).map_err(|e| TargetError::Commit {
            target: self.name.clone(),
            why: e.to_string(),
        })
    }

    fn abort(&self, why: &str) {
        let id = self.generation;
        let (st, d, w) = (self.state.clone(), self.desc.clone(), self.writer.clone());
        let r = if hotcopy_runtime::Reactor::try_current().is_some() {
            abort_on_reactor(&st, &d, &w)
        } else {
            // A control thread (a job that failed to start): the I/O runs on
            // the home reactor.
            self.home
                .exec(move || abort_on_reactor(&st, &d, &w))
                .map_err(|e| RepoError::Namespace(e.to_string()))
                .and_then(|r| r)
        };
        match r {
            Ok(()) => tracing::info!(generation = id, "backup failed ({why}): generation removed"),
            Err(e) => tracing::warn!(
                generation = id,
                "backup failed ({why}); generation left incomplete: {e}"
            ),
        }
    }

    fn describe(&self) -> String {
        format!(
            "repository {} on {}, generation {}{}",
            self.uuid,
            self.name,
            self.generation,
            match self.parent {
                Some(p) => format!(" (incremental from {p})"),
                None => " (full)".into(),
            }
        )
    }
}
