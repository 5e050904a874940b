//! DMA-able buffers and the pools that hand them out.
//!
//! A [`BufferPool`] carves one preallocated [`Region`] into equal, page-aligned
//! buffers. The region is backed by huge pages when the machine has free ones
//! (`/proc/sys/vm/nr_hugepages` > 0) and the mode allows it, by ordinary pages
//! otherwise; the choice is made once, at creation, and reported by
//! [`BufferPool::is_hugepage`]. All memory is faulted in up front, so the data
//! path never page-faults and RSS shows the configured size from the start.
//!
//! A [`DmaBuf`] is the unique owner of one buffer: it can move between cores
//! with its I/O and returns itself to the pool on drop. The free list is a
//! lock-free bounded queue, so any core may return a buffer. Getting and
//! returning a buffer never allocates.
//!
//! Invariants: every `DmaBuf` points at `cap` bytes aligned to
//! [`crate::sys::PAGE_SIZE`] that no other live `DmaBuf` points at; `len <= cap`.
//!
//! The one exception is a buffer lent by a [`LendingRegion`]: a window onto
//! memory that something else manages (a RAM disk's blocks), handed to a
//! write of another device so the bytes need not be copied first (SPDK's
//! zero-copy I/O on malloc bdevs). It is not the only handle to its bytes
//! and it is read-only: `DerefMut` and `as_mut_ptr` panic on it. Lending is
//! `unsafe`: the lender promises that nobody writes the window while the
//! buffer lives. Dropping a lent buffer returns nothing.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use crossbeam::queue::ArrayQueue;

use crate::sys::{self, Region, PAGE_SIZE};

/// Whether a pool should use huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugepageMode {
    /// Use huge pages when enough are free, ordinary pages otherwise.
    #[default]
    Auto,
    /// Require huge pages; creating the pool fails without them.
    On,
    /// Never use huge pages.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("buffer pool of {count} x {size} bytes: {source}")]
    Map {
        size: usize,
        count: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "huge pages required but only {free} free (need {need}); set /proc/sys/vm/nr_hugepages"
    )]
    NoHugepages { free: u64, need: u64 },
    #[error("buffer size {0} must be a non-zero multiple of {PAGE_SIZE} below 4 GiB")]
    BadSize(usize),
}

struct PoolInner {
    region: Region,
    buf_size: usize,
    count: usize,
    free: ArrayQueue<u32>,
    /// The memory of a [`LendingRegion`]: its buffers are windows, and
    /// dropping one returns nothing.
    lending: bool,
}

/// A fixed set of equal, aligned buffers. Cloning shares the pool.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("buf_size", &self.inner.buf_size)
            .field("count", &self.inner.count)
            .field("free", &self.inner.free.len())
            .field("hugepage", &self.inner.region.is_hugepage())
            .finish()
    }
}

impl BufferPool {
    /// Creates `count` buffers of `buf_size` bytes (a multiple of 4 KiB).
    pub fn new(buf_size: usize, count: usize, mode: HugepageMode) -> Result<Self, PoolError> {
        if buf_size == 0 || !buf_size.is_multiple_of(PAGE_SIZE) || buf_size > u32::MAX as usize {
            return Err(PoolError::BadSize(buf_size));
        }
        let count = count.max(1);
        let bytes = buf_size * count;
        let need = bytes.div_ceil(sys::HUGE_PAGE_SIZE) as u64;
        let use_huge = match mode {
            HugepageMode::Off => false,
            HugepageMode::Auto => sys::free_hugepages() >= need,
            HugepageMode::On => {
                let free = sys::free_hugepages();
                if free < need {
                    return Err(PoolError::NoHugepages { free, need });
                }
                true
            }
        };
        let region = match Region::map(bytes, use_huge, true) {
            Ok(r) => r,
            // Huge pages can vanish between the check and the map; fall back.
            Err(_) if use_huge && mode == HugepageMode::Auto => Region::map(bytes, false, true)
                .map_err(|source| PoolError::Map {
                    size: buf_size,
                    count,
                    source,
                })?,
            Err(source) => {
                return Err(PoolError::Map {
                    size: buf_size,
                    count,
                    source,
                })
            }
        };
        let free = ArrayQueue::new(count);
        for i in 0..count as u32 {
            let _ = free.push(i);
        }
        Ok(BufferPool {
            inner: Arc::new(PoolInner {
                region,
                buf_size,
                count,
                free,
                lending: false,
            }),
        })
    }

    /// Takes a buffer of `len` bytes (`len <= buf_size`), or `None` when the
    /// pool is empty or `len` is too large.
    #[inline]
    pub fn get(&self, len: usize) -> Option<DmaBuf> {
        if len > self.inner.buf_size {
            return None;
        }
        let idx = self.inner.free.pop()?;
        // SAFETY: idx < count, so the offset lies inside the region.
        let ptr = unsafe {
            self.inner
                .region
                .as_ptr()
                .add(idx as usize * self.inner.buf_size)
        };
        Some(DmaBuf {
            ptr: NonNull::new(ptr).expect("region pointer is non-null"),
            len: len as u32,
            cap: self.inner.buf_size as u32,
            pool: self.inner.clone(),
        })
    }

    pub fn buf_size(&self) -> usize {
        self.inner.buf_size
    }

    pub fn count(&self) -> usize {
        self.inner.count
    }

    pub fn available(&self) -> usize {
        self.inner.free.len()
    }

    pub fn is_hugepage(&self) -> bool {
        self.inner.region.is_hugepage()
    }

    /// Bytes of memory this pool holds.
    pub fn footprint(&self) -> usize {
        self.inner.region.len()
    }
}

/// An owned, page-aligned I/O buffer. See the module docs for its invariants.
///
/// 24 bytes: it travels inside every I/O, so it is kept small. A standalone
/// buffer ([`DmaBuf::alloc`]) is the only buffer of a pool of its own.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: u32,
    cap: u32,
    pool: Arc<PoolInner>,
}

// SAFETY: a DmaBuf is the only handle to its bytes (module invariant), so
// moving it to another thread moves exclusive access with it; a lent one
// only reads bytes that nobody writes while it lives (`LendingRegion::lend`).
unsafe impl Send for DmaBuf {}
// SAFETY: `&DmaBuf` only gives shared, read-only access to the bytes.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// Allocates a standalone buffer outside any pool (control path only:
    /// this maps memory).
    pub fn alloc(len: usize) -> std::io::Result<DmaBuf> {
        let size = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let pool = BufferPool::new(size, 1, HugepageMode::Off).map_err(|e| match e {
            PoolError::Map { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })?;
        Ok(pool.get(len).expect("a fresh pool of one has its buffer"))
    }

    /// Allocates a standalone buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> std::io::Result<DmaBuf> {
        let mut b = DmaBuf::alloc(data.len())?;
        b.copy_from_slice(data);
        Ok(b)
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes available without reallocation (the pool's buffer size).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    /// Changes the visible length, up to the capacity.
    #[inline]
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap as usize,
            "DmaBuf::set_len {len} beyond capacity {}",
            self.cap
        );
        self.len = len as u32;
    }

    #[inline]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// # Panics
    /// On a lent buffer (see the module docs): it is read-only.
    #[inline]
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        assert!(!self.pool.lending, "a lent DmaBuf is read-only");
        self.ptr.as_ptr()
    }

    /// Whether this buffer is a read-only window lent by a [`LendingRegion`].
    #[inline]
    pub fn is_lent(&self) -> bool {
        self.pool.lending
    }
}

impl Deref for DmaBuf {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, and either exclusively
        // ours or lent with the promise that nobody writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl DerefMut for DmaBuf {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        assert!(!self.pool.lending, "a lent DmaBuf is read-only");
        // SAFETY: as in Deref; not lent (checked), so exclusively ours, and
        // `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len as usize) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        if self.pool.lending {
            return;
        }
        let idx =
            (self.ptr.as_ptr() as usize - self.pool.region.as_ptr() as usize) / self.pool.buf_size;
        // The queue has room for every index, so this cannot fail.
        let _ = self.pool.free.push(idx as u32);
    }
}

/// Memory that lends windows of itself as [`DmaBuf`]s, without copying: a
/// RAM disk keeps its blocks in one, and a copy of its blocks to another
/// device can write straight from them. Cloning shares the memory, which
/// lives as long as the last clone or lent buffer.
#[derive(Clone)]
pub struct LendingRegion {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for LendingRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LendingRegion")
            .field("len", &self.inner.region.len())
            .field("hugepage", &self.inner.region.is_hugepage())
            .finish()
    }
}

impl LendingRegion {
    pub fn new(region: Region) -> LendingRegion {
        LendingRegion {
            inner: Arc::new(PoolInner {
                buf_size: region.len(),
                region,
                count: 0,
                free: ArrayQueue::new(1),
                lending: true,
            }),
        }
    }

    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.region.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.inner.region.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.region.len() == 0
    }

    pub fn is_hugepage(&self) -> bool {
        self.inner.region.is_hugepage()
    }

    /// Lends the `len` bytes at `offset` as a buffer (no copy, no
    /// allocation), or `None` when the window is empty, not page-aligned,
    /// larger than a `DmaBuf` can describe, or not inside the region.
    ///
    /// The buffer is read-only: `DerefMut` and `as_mut_ptr` panic on it.
    ///
    /// # Safety
    /// While the returned buffer lives, nobody may write the window's bytes
    /// (through this region's memory or in any other way).
    #[inline]
    pub unsafe fn lend(&self, offset: usize, len: usize) -> Option<DmaBuf> {
        let end = offset.checked_add(len)?;
        if len == 0
            || len > u32::MAX as usize
            || !offset.is_multiple_of(PAGE_SIZE)
            || end > self.inner.region.len()
        {
            return None;
        }
        // SAFETY: offset + len lies inside the region (checked above).
        let ptr = unsafe { self.inner.region.as_ptr().add(offset) };
        Some(DmaBuf {
            ptr: NonNull::new(ptr)?,
            len: len as u32,
            cap: len as u32,
            pool: self.inner.clone(),
        })
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DmaBuf({} of {} bytes @ {:p})",
            self.len, self.cap, self.ptr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_distinct_aligned_buffers_and_takes_them_back() {
        let pool = BufferPool::new(8192, 4, HugepageMode::Off).unwrap();
        let mut bufs: Vec<_> = (0..4).map(|_| pool.get(4096).unwrap()).collect();
        assert!(pool.get(4096).is_none(), "pool of 4 gives out 4");
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
            b.fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|x| *x == i as u8), "buffers do not overlap");
        }
        assert!(pool.get(8193).is_none(), "too large");
        drop(bufs.pop());
        assert_eq!(pool.available(), 1);
        let b = std::thread::spawn({
            let pool = pool.clone();
            move || pool.get(100).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(b.len(), 100);
        drop(b);
        assert_eq!(pool.available(), 1, "returned from another thread");
    }

    #[test]
    fn a_lending_region_lends_windows_in_place_and_gets_nothing_back() {
        let region = Region::map(4 * PAGE_SIZE, false, true).unwrap();
        // SAFETY: nothing else refers to the fresh mapping yet.
        unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len()) }
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i / PAGE_SIZE) as u8);
        let mem = LendingRegion::new(region);
        // SAFETY: nothing writes the region while the windows live.
        let (a, b) = unsafe {
            (
                mem.lend(PAGE_SIZE, 2 * PAGE_SIZE).unwrap(),
                mem.lend(3 * PAGE_SIZE, PAGE_SIZE).unwrap(),
            )
        };
        assert_eq!(
            a.as_ptr(),
            mem.as_ptr().wrapping_add(PAGE_SIZE).cast_const()
        );
        assert_eq!((a.len(), a.capacity()), (2 * PAGE_SIZE, 2 * PAGE_SIZE));
        assert!(a[..PAGE_SIZE].iter().all(|&x| x == 1));
        assert!(a[PAGE_SIZE..].iter().all(|&x| x == 2));
        assert!(b.iter().all(|&x| x == 3));
        assert!(a.is_lent() && b.is_lent());
        let mut c = b;
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c[0] = 9;
        }));
        assert!(refused.is_err(), "a lent buffer is read-only");
        assert!(c.iter().all(|&x| x == 3));
        let b = c;
        // SAFETY: as above (these are refused before anything is lent).
        unsafe {
            assert!(mem.lend(100, PAGE_SIZE).is_none(), "unaligned");
            assert!(
                mem.lend(3 * PAGE_SIZE, 2 * PAGE_SIZE).is_none(),
                "past the end"
            );
            assert!(mem.lend(0, 0).is_none(), "empty");
            assert!(mem.lend(usize::MAX - 1, 2).is_none(), "overflow");
        }
        // The memory outlives its region handle while a window is out.
        drop(mem);
        drop(a);
        assert!(b.iter().all(|&x| x == 3));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(matches!(
            BufferPool::new(1000, 1, HugepageMode::Off),
            Err(PoolError::BadSize(1000))
        ));
    }
}
