//! Which chunks a job copies: the whole device, limited to `include` ranges
//! when any are given, minus `exclude` ranges, minus deallocated space when
//! the source can report it.
//!
//! Ranges are in source blocks, half-open `[start, start + len)`. Chunks are
//! the unit: a chunk is in scope when any of its blocks is included and not
//! every one of its blocks is excluded or deallocated. So an exclude range
//! smaller than a chunk excludes nothing, and a chunk partly in an include
//! range is copied whole.

use crate::chunk_map::{ChunkMap, ChunkState};
use crate::target::SkipReason;

/// A range of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockRange {
    pub start: u64,
    pub len: u64,
}

impl BlockRange {
    pub fn new(start: u64, len: u64) -> Self {
        BlockRange { start, len }
    }

    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// The user's choice of what to back up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub include: Vec<BlockRange>,
    pub exclude: Vec<BlockRange>,
    /// Skip chunks the source reports as wholly deallocated.
    pub skip_unallocated: bool,
}

/// How a scope was resolved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeSummary {
    pub chunks_total: u64,
    pub chunks_in_scope: u64,
    pub chunks_excluded: u64,
    pub chunks_unallocated: u64,
}

impl Scope {
    /// Everything.
    pub fn all() -> Scope {
        Scope {
            include: vec![],
            exclude: vec![],
            skip_unallocated: true,
        }
    }

    /// Marks chunks of `map` pending or out of scope. `allocated` are the
    /// source's allocated ranges (`None`: everything is allocated).
    pub fn apply(
        &self,
        map: &ChunkMap,
        chunk_blocks: u64,
        num_blocks: u64,
        allocated: Option<&[(u64, u64)]>,
    ) -> ScopeSummary {
        self.apply_with(map, chunk_blocks, num_blocks, allocated, &mut |_, _| {})
    }

    /// [`Scope::apply`], telling `on_skip` why each chunk left out is left out.
    pub fn apply_with(
        &self,
        map: &ChunkMap,
        chunk_blocks: u64,
        num_blocks: u64,
        allocated: Option<&[(u64, u64)]>,
        on_skip: &mut dyn FnMut(u64, SkipReason),
    ) -> ScopeSummary {
        let chunks = map.len();
        let chunk_range = |c: u64| (c * chunk_blocks, ((c + 1) * chunk_blocks).min(num_blocks));
        // Per-chunk coverage by sorted, merged ranges, computed with a sweep.
        let covered = |ranges: &[(u64, u64)]| -> Vec<u64> {
            // blocks of each chunk covered by `ranges`
            let mut v = vec![0u64; chunks as usize];
            for &(s, l) in ranges {
                let e = (s.saturating_add(l)).min(num_blocks);
                if s >= e {
                    continue;
                }
                let (c0, c1) = (s / chunk_blocks, (e - 1) / chunk_blocks);
                for c in c0..=c1 {
                    let (cs, ce) = chunk_range(c);
                    v[c as usize] += e.min(ce) - s.max(cs);
                }
            }
            v
        };
        let merge = |r: &[BlockRange]| -> Vec<(u64, u64)> {
            let mut v: Vec<(u64, u64)> = r.iter().map(|r| (r.start, r.end())).collect();
            v.sort_unstable();
            let mut out: Vec<(u64, u64)> = Vec::new();
            for (s, e) in v {
                match out.last_mut() {
                    Some((_, le)) if s <= *le => *le = (*le).max(e),
                    _ => out.push((s, e)),
                }
            }
            out.into_iter().map(|(s, e)| (s, e - s)).collect()
        };
        let inc = (!self.include.is_empty()).then(|| covered(&merge(&self.include)));
        let exc = covered(&merge(&self.exclude));
        let alloc = match (self.skip_unallocated, allocated) {
            (true, Some(a)) => Some(covered(a)),
            _ => None,
        };
        let mut s = ScopeSummary {
            chunks_total: chunks,
            ..Default::default()
        };
        for c in 0..chunks {
            let (cs, ce) = chunk_range(c);
            let size = ce - cs;
            let state =
                if inc.as_ref().is_some_and(|i| i[c as usize] == 0) || exc[c as usize] >= size {
                    s.chunks_excluded += 1;
                    on_skip(c, SkipReason::Excluded);
                    ChunkState::OutOfScope
                } else if alloc.as_ref().is_some_and(|a| a[c as usize] == 0) {
                    s.chunks_unallocated += 1;
                    on_skip(c, SkipReason::Unallocated);
                    ChunkState::OutOfScope
                } else {
                    s.chunks_in_scope += 1;
                    ChunkState::Pending
                };
            map.init(c, state);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(scope: &Scope, alloc: Option<&[(u64, u64)]>) -> Vec<bool> {
        let map = ChunkMap::new(10);
        scope.apply(&map, 8, 80, alloc);
        (0..10).map(|c| map.get(c) == ChunkState::Pending).collect()
    }

    #[test]
    fn include_exclude_and_unallocated_resolve_per_chunk() {
        let all = Scope::all();
        assert_eq!(states(&all, None), vec![true; 10]);
        let inc = Scope {
            include: vec![BlockRange::new(9, 10)],
            ..Scope::all()
        };
        assert_eq!(
            states(&inc, None),
            [false, true, true, false, false, false, false, false, false, false]
        );
        // An exclude smaller than a chunk excludes nothing; whole chunks go.
        let exc = Scope {
            exclude: vec![BlockRange::new(4, 2), BlockRange::new(16, 16)],
            ..Scope::all()
        };
        assert_eq!(
            states(&exc, None),
            [true, true, false, false, true, true, true, true, true, true]
        );
        // Overlapping excludes merge.
        let exc2 = Scope {
            exclude: vec![BlockRange::new(0, 6), BlockRange::new(4, 4)],
            ..Scope::all()
        };
        assert!(!states(&exc2, None)[0]);
        let alloc = [(0u64, 1u64), (40, 8)];
        assert_eq!(
            states(&all, Some(&alloc)),
            [true, false, false, false, false, true, false, false, false, false]
        );
        let keep = Scope {
            skip_unallocated: false,
            ..Scope::all()
        };
        assert_eq!(states(&keep, Some(&alloc)), vec![true; 10]);
    }
}
