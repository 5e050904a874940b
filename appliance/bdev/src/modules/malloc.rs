//! `malloc`: a RAM disk.
//!
//! The memory is one anonymous mapping, faulted in at creation (huge pages
//! when free ones exist), so I/O never page-faults. Reads and writes are a
//! `memcpy` and complete on the next `poll`. Unmap and write-zeroes zero the
//! range; unmap also records the blocks as deallocated, which the backup
//! module uses to skip them.
//!
//! Its blocks can also be lent in place ([`MemoryWindow`]): the backup's
//! copy stream then writes them to the target without reading them into a
//! buffer first.
//!
//! Concurrency: channels on different cores copy into the same memory without
//! a lock, as DMA engines do into a disk's cache. Racing writes to one block
//! leave torn data in that block (as on a disk); they cannot corrupt anything
//! else.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hotcopy_runtime::sys::{self, Region};
use hotcopy_runtime::LendingRegion;

use crate::bdev::{BackendChannel, BdevBackend, BdevInfo, BdevRegistry, MemoryWindow};
use crate::io::{BdevIo, IoStatus, IoType};
use crate::{Bdev, BdevError};

/// Allocation is tracked per group of blocks of this many bytes: one bit per
/// 64 KiB keeps the map tiny (2 KiB per GiB) and matches the backup chunk size.
pub const ALLOC_GRANULE: u64 = 64 * 1024;

struct MallocShared {
    /// The blocks, lendable for zero-copy reads ([`MemoryWindow`]).
    region: LendingRegion,
    block_size: u64,
    /// One bit per granule: set once any byte of it was written.
    allocated: Vec<AtomicU64>,
    granule_blocks: u64,
    num_blocks: u64,
}

pub struct MallocBdev {
    shared: Arc<MallocShared>,
}

impl BdevBackend for MallocBdev {
    fn supports(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(MallocChannel {
            shared: self.shared.clone(),
            done: VecDeque::with_capacity(1024),
        }))
    }

    fn allocated_ranges(&self) -> Option<Vec<(u64, u64)>> {
        let s = &self.shared;
        let granules = s.num_blocks.div_ceil(s.granule_blocks);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for g in 0..granules {
            if s.allocated[(g / 64) as usize].load(Ordering::Relaxed) & (1 << (g % 64)) == 0 {
                continue;
            }
            let start = g * s.granule_blocks;
            let len = s.granule_blocks.min(s.num_blocks - start);
            match out.last_mut() {
                Some((o, l)) if *o + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
        Some(out)
    }

    fn memory_window(&self) -> Option<MemoryWindow> {
        let s = &self.shared;
        MemoryWindow::new(s.region.clone(), s.block_size, s.num_blocks)
    }
}

impl MallocShared {
    #[inline]
    fn mark(&self, offset_blocks: u64, num_blocks: u64, allocated: bool) {
        if num_blocks == 0 {
            return;
        }
        let (first, last) = if allocated {
            (
                offset_blocks / self.granule_blocks,
                (offset_blocks + num_blocks - 1) / self.granule_blocks,
            )
        } else {
            // Only granules wholly inside the range become deallocated.
            let first = offset_blocks.div_ceil(self.granule_blocks);
            let end = (offset_blocks + num_blocks) / self.granule_blocks;
            if end == 0 || first >= end {
                return;
            }
            (first, end - 1)
        };
        for g in first..=last {
            let word = &self.allocated[(g / 64) as usize];
            let bit = 1u64 << (g % 64);
            if allocated {
                if word.load(Ordering::Relaxed) & bit == 0 {
                    word.fetch_or(bit, Ordering::Relaxed);
                }
            } else {
                word.fetch_and(!bit, Ordering::Relaxed);
            }
        }
    }
}

struct MallocChannel {
    shared: Arc<MallocShared>,
    done: VecDeque<BdevIo>,
}

impl BackendChannel for MallocChannel {
    #[inline]
    fn submit(&mut self, mut io: BdevIo) {
        let s = &*self.shared;
        let off = (io.offset_blocks * s.block_size) as usize;
        let len = (io.num_blocks * s.block_size) as usize;
        // The channel layer checked off + len against the device size and the
        // buffer length against len, so every copy below stays in bounds.
        match io.io_type {
            IoType::Read => {
                if let Some(buf) = io.buf.as_mut() {
                    // SAFETY: [off, off+len) is inside the region (checked by the
                    // channel layer); the buffer holds at least len bytes.
                    unsafe { sys::copy_raw(s.region.as_ptr().add(off), buf.as_mut_ptr(), len) }
                }
            }
            IoType::Write => {
                if let Some(buf) = io.buf.as_ref() {
                    // SAFETY: as for reads, in the other direction.
                    unsafe { sys::copy_raw(buf.as_ptr(), s.region.as_ptr().add(off), len) }
                    s.mark(io.offset_blocks, io.num_blocks, true);
                }
            }
            IoType::Unmap | IoType::WriteZeroes => {
                // SAFETY: [off, off+len) is inside the region.
                unsafe { sys::zero_raw(s.region.as_ptr().add(off), len) }
                let dealloc = io.io_type == IoType::Unmap;
                s.mark(io.offset_blocks, io.num_blocks, !dealloc);
            }
            IoType::Flush => {}
        }
        self.done.push_back(io.complete(IoStatus::Success));
    }

    #[inline]
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        crate::bdev::deliver(&mut self.done, done)
    }
}

/// Creates and registers a RAM bdev of `size_bytes` (rounded down to blocks).
pub fn create(
    reg: &BdevRegistry,
    name: &str,
    size_bytes: u64,
    block_size: u32,
) -> Result<Bdev, BdevError> {
    let bs = block_size.max(1) as u64;
    let num_blocks = size_bytes / bs;
    let bytes = (num_blocks * bs) as usize;
    let huge = sys::free_hugepages() as usize * sys::HUGE_PAGE_SIZE >= bytes && bytes > 0;
    let region = Region::map(bytes, huge, true)
        .or_else(|_| Region::map(bytes, false, true))
        .map_err(|source| BdevError::Create {
            name: name.to_string(),
            why: format!("cannot map {bytes} bytes"),
            source: Some(source),
        })?;
    let granule_blocks = (ALLOC_GRANULE / bs).max(1);
    let granules = num_blocks.div_ceil(granule_blocks);
    let allocated = (0..granules.div_ceil(64))
        .map(|_| AtomicU64::new(0))
        .collect();
    let shared = Arc::new(MallocShared {
        region: LendingRegion::new(region),
        block_size: bs,
        allocated,
        granule_blocks,
        num_blocks,
    });
    reg.register(
        BdevInfo::new(name, "malloc", block_size, num_blocks),
        MallocBdev { shared },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn lent_blocks_are_the_bdev_s_own_memory() {
        let reg = BdevRegistry::new();
        let bdev = create(&reg, "m", 1 << 20, 512).unwrap();
        let mut ch = bdev.open(true).unwrap().channel().unwrap();
        let data = testing::pattern(7, 64 << 10);
        assert!(testing::write(&mut ch, 256, &data).is_success());
        let win = bdev.memory_window().expect("a RAM disk lends its blocks");
        assert_eq!((win.block_size(), win.num_blocks()), (512, 2048));
        // SAFETY: nothing writes blocks 256..384 while `lent` lives.
        let lent = unsafe { win.lend(256, 128) }.unwrap();
        assert_eq!(&lent[..], &data[..], "the bytes written, in place");
        // SAFETY: refused ranges lend nothing.
        unsafe {
            assert!(win.lend(2000, 49).is_none(), "past the end");
            assert!(win.lend(1, 8).is_none(), "not page-aligned");
            assert!(win.lend(0, 0).is_none(), "empty");
        }
        drop(lent);
        // A disk that is not in memory lends nothing.
        let null = crate::modules::null::create(&reg, "n", 1 << 20, 512).unwrap();
        assert!(null.memory_window().is_none());
    }
}
