//! The chunk state map: one byte per chunk, every transition a single atomic
//! compare-and-swap, so every core sees the same truth without a lock.
//!
//! ```text
//!              copy stream                    copy stream
//!   Pending ─────────────► Copying ─(read done)─► Copied ─(target written)─► Done
//!      │                                                                    ▲
//!      │ first write (interceptor)                                          │
//!      └────────► Saving ─(old data in container)─► Saved ─(drained)────────┘
//!   OutOfScope: never copied, never intercepted.
//! ```
//!
//! A run the copy stream writes to the target straight from a RAM source's
//! memory (no read: see [`crate::job`]) stays `Copying` until that write has
//! landed, then passes through `Copied` to `Done` at once.
//!
//! Who may pass: a write to a chunk in `Pending` must capture it first; in
//! `Copying` or `Saving` it waits (the chunk's old content is being read);
//! in `Copied`, `Saved`, `Done` or `OutOfScope` the old content is safe and the
//! write goes straight to the source. Reads never wait.

use std::sync::atomic::{AtomicU8, Ordering};

/// The state of one chunk during a backup job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ChunkState {
    /// Not part of this backup (excluded, or deallocated on the source).
    OutOfScope = 0,
    /// To be copied; its content on the source is still the consistency point's.
    Pending = 1,
    /// The copy stream is reading it from the source (or writing it to the
    /// target straight from a RAM source's memory).
    Copying = 2,
    /// The copy stream holds its old content; the target write is in flight
    /// (a run written from the source's memory passes through at once).
    Copied = 3,
    /// A writer is saving its old content into the container.
    Saving = 4,
    /// Its old content is in a container slot, waiting to drain.
    Saved = 5,
    /// Its old content is on the backup target.
    Done = 6,
}

impl ChunkState {
    fn from_u8(v: u8) -> ChunkState {
        match v {
            0 => ChunkState::OutOfScope,
            1 => ChunkState::Pending,
            2 => ChunkState::Copying,
            3 => ChunkState::Copied,
            4 => ChunkState::Saving,
            5 => ChunkState::Saved,
            _ => ChunkState::Done,
        }
    }

    /// Whether a write to the chunk may go to the source now.
    #[inline]
    pub fn write_may_pass(self) -> bool {
        matches!(
            self,
            ChunkState::OutOfScope | ChunkState::Copied | ChunkState::Saved | ChunkState::Done
        )
    }

    /// Whether the chunk's old content is safe somewhere other than the source
    /// (or it is not part of the backup at all).
    #[inline]
    pub fn is_settled(self) -> bool {
        matches!(self, ChunkState::OutOfScope | ChunkState::Done)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChunkState::OutOfScope => "out-of-scope",
            ChunkState::Pending => "pending",
            ChunkState::Copying => "copying",
            ChunkState::Copied => "copied",
            ChunkState::Saving => "saving",
            ChunkState::Saved => "saved",
            ChunkState::Done => "done",
        }
    }
}

/// The per-chunk states of one job: exactly one byte per chunk.
pub struct ChunkMap {
    states: Box<[AtomicU8]>,
}

impl std::fmt::Debug for ChunkMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkMap({} chunks)", self.states.len())
    }
}

impl ChunkMap {
    /// A map of `chunks` chunks, all out of scope.
    pub fn new(chunks: u64) -> ChunkMap {
        ChunkMap {
            states: (0..chunks)
                .map(|_| AtomicU8::new(ChunkState::OutOfScope as u8))
                .collect(),
        }
    }

    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Bytes of memory the map holds (one per chunk).
    pub fn footprint(&self) -> usize {
        self.states.len()
    }

    #[inline]
    pub fn get(&self, chunk: u64) -> ChunkState {
        ChunkState::from_u8(self.states[chunk as usize].load(Ordering::Acquire))
    }

    /// Sets a state unconditionally (job setup only, before the job is visible).
    pub fn init(&self, chunk: u64, state: ChunkState) {
        self.states[chunk as usize].store(state as u8, Ordering::Relaxed);
    }

    /// Moves `chunk` from `from` to `to` if it is in `from`; returns whether it did.
    #[inline]
    pub fn transition(&self, chunk: u64, from: ChunkState, to: ChunkState) -> bool {
        self.states[chunk as usize]
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Counts chunks per state (control path: walks the whole map).
    pub fn census(&self) -> [u64; 7] {
        let mut c = [0u64; 7];
        for s in self.states.iter() {
            c[s.load(Ordering::Relaxed) as usize] += 1;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn transitions_are_exclusive_across_threads() {
        // Many threads race to claim each pending chunk for copy or capture;
        // exactly one wins each chunk.
        let map = Arc::new(ChunkMap::new(10_000));
        for c in 0..10_000 {
            map.init(c, ChunkState::Pending);
        }
        let wins: Vec<u64> = (0..4)
            .map(|t| {
                let map = map.clone();
                std::thread::spawn(move || {
                    let to = if t % 2 == 0 {
                        ChunkState::Copying
                    } else {
                        ChunkState::Saving
                    };
                    (0..10_000)
                        .filter(|&c| map.transition(c, ChunkState::Pending, to))
                        .count() as u64
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(wins.iter().sum::<u64>(), 10_000);
        let census = map.census();
        assert_eq!(census[ChunkState::Pending as usize], 0);
        assert_eq!(
            census[ChunkState::Copying as usize] + census[ChunkState::Saving as usize],
            10_000
        );
    }

    #[test]
    fn only_safe_states_let_writes_pass() {
        use ChunkState::*;
        for s in [OutOfScope, Pending, Copying, Copied, Saving, Saved, Done] {
            assert_eq!(
                s.write_may_pass(),
                matches!(s, OutOfScope | Copied | Saved | Done),
                "{s:?}"
            );
            assert_eq!(ChunkState::from_u8(s as u8), s);
        }
    }
}
