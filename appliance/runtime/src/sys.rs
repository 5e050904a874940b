//! The one place where hotcopy talks to the kernel or uses `unsafe`.
//!
//! Everything above this module is safe Rust. Each item here states the
//! invariant that makes it sound; callers get safe wrappers that own the
//! resources they hand to the kernel (memory regions, ring buffers in flight).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

/// Size of a base page; all DMA buffers are aligned to at least this.
pub const PAGE_SIZE: usize = 4096;
/// Size of an x86-64 huge page as used by `MAP_HUGETLB` without a size flag.
pub const HUGE_PAGE_SIZE: usize = 2 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Time stamp counter
// ---------------------------------------------------------------------------

/// Reads the CPU time stamp counter (the analogue of `spdk_get_ticks`).
///
/// On machines with `constant_tsc`/`nonstop_tsc` the TSC advances at a fixed
/// rate on every core, which is what [`crate::clock`] calibrates against.
#[inline(always)]
pub fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `_rdtsc` has no preconditions; it reads a register.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

// ---------------------------------------------------------------------------
// Memory regions for buffer pools and RAM disks
// ---------------------------------------------------------------------------

/// An anonymous, page-aligned memory mapping, optionally backed by huge pages.
///
/// Invariant: `ptr` points to `len` bytes mapped read-write for the lifetime of
/// the value, and nothing else unmaps them. The memory starts zeroed.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    hugepages: bool,
}

// SAFETY: a Region is plain memory owned by this value; moving or sharing the
// handle between threads does not by itself access the memory. Users of the
// pointer (buffer pools, the malloc bdev) define how the bytes are shared.
unsafe impl Send for Region {}
// SAFETY: see `Send`; `&Region` only exposes the pointer and length.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` bytes (rounded up to a page, or a huge page when `hugepages`).
    ///
    /// With `populate`, pages are faulted in now so that the data path never
    /// takes a page fault and RSS reflects the configured size at once.
    ///
    /// Without `MAP_HUGETLB`, a mapping of at least one huge page asks for
    /// transparent huge pages (`MADV_HUGEPAGE`, honoured when THP is
    /// `madvise` or `always`) before it is populated: faulting 40 MiB in 2 MiB
    /// pages takes about half the time of 4 KiB pages and unmapping it a
    /// twentieth (measured on the CI machine's kernel), which is most of a
    /// restore's fixed cost, and the data path takes fewer TLB misses.
    pub fn map(len: usize, hugepages: bool, populate: bool) -> io::Result<Region> {
        let unit = if hugepages { HUGE_PAGE_SIZE } else { PAGE_SIZE };
        let len = len.max(1).div_ceil(unit) * unit;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if hugepages {
            flags |= libc::MAP_HUGETLB;
        }
        let thp = !hugepages && len >= HUGE_PAGE_SIZE;
        if populate && !thp {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: an anonymous mapping with a null hint has no preconditions;
        // the result is checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        let region = Region {
            ptr,
            len,
            hugepages,
        };
        if thp {
            // SAFETY: the whole range is our fresh private anonymous mapping;
            // MADV_HUGEPAGE only changes how it is backed, and a kernel that
            // does not know it (or has THP off) leaves it as it was.
            unsafe {
                libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
            }
            if populate {
                region.populate();
            }
        }
        Ok(region)
    }

    /// Faults every page in for writing: `MADV_POPULATE_WRITE` (Linux 5.14),
    /// or one write per page on older kernels.
    fn populate(&self) {
        // SAFETY: the range is this region's own mapping, read-write.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                self.len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            for off in (0..self.len).step_by(PAGE_SIZE) {
                // SAFETY: `off` < len, inside the mapping; the memory is
                // still zero (fresh anonymous pages), so writing zero keeps
                // the "starts zeroed" invariant and only faults the page in.
                unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off), 0) };
            }
        }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_hugepage(&self) -> bool {
        self.hugepages
    }

    /// Gives the range back to the kernel (zero on next touch), as `MADV_DONTNEED`.
    /// Used by the malloc bdev's unmap to keep RSS honest.
    pub fn discard(&self, offset: usize, len: usize) -> io::Result<()> {
        let start = offset.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let end = (offset + len) / PAGE_SIZE * PAGE_SIZE;
        if end <= start || self.hugepages {
            return Ok(());
        }
        assert!(end <= self.len, "discard past the end of a region");
        // SAFETY: [start, end) lies inside our private anonymous mapping; after
        // MADV_DONTNEED those pages read as zero, which is what callers want.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                end - start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Copies `len` bytes between two raw locations that do not overlap.
///
/// # Safety
/// `src` must be valid for `len` reads and `dst` for `len` writes, and the two
/// ranges must not overlap. Concurrent access to the same bytes from another
/// thread gives torn data (as a disk does for racing writes to one block), never
/// memory unsafety in the caller's own state.
#[inline(always)]
pub unsafe fn copy_raw(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

/// Fills `len` bytes at `dst` with zero.
///
/// # Safety
/// `dst` must be valid for `len` writes.
#[inline(always)]
pub unsafe fn zero_raw(dst: *mut u8, len: usize) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { std::ptr::write_bytes(dst, 0, len) }
}

/// Huge pages currently free in the default pool (`HugePages_Free`).
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Peak resident set size of this process in bytes (`VmHWM`).
pub fn peak_rss_bytes() -> u64 {
    read_status_kib("VmHWM:") * 1024
}

/// Current resident set size of this process in bytes (`VmRSS`).
pub fn rss_bytes() -> u64 {
    read_status_kib("VmRSS:") * 1024
}

fn read_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Files and block devices
// ---------------------------------------------------------------------------

/// Opens a file or block device for direct I/O (`O_DIRECT`), read-write or
/// read-only. Falls back to buffered I/O only when `allow_buffered` is set and
/// the filesystem rejects `O_DIRECT` (tmpfs does); the caller is told which.
pub fn open_direct(path: &Path, writable: bool, allow_buffered: bool) -> io::Result<(File, bool)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(writable);
    match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if allow_buffered && e.raw_os_error() == Some(libc::EINVAL) => {
            Ok((opts.open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Size in bytes of a regular file or a block device.
pub fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we pass,
        // which points at a live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

/// Logical block size of a block device (`BLKSSZGET`), or 512 for files.
pub fn logical_block_size(file: &File) -> io::Result<u32> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: libc::c_int = 0;
        const BLKSSZGET: libc::c_ulong = 0x1268;
        // SAFETY: BLKSSZGET writes one int through the pointer to a live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size as *mut libc::c_int) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size as u32)
    } else {
        Ok(512)
    }
}

/// Whether `file` is a block device (unmap then needs BLKDISCARD, not a hole punch).
pub fn is_block_device(file: &File) -> bool {
    file.metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Finds the next allocated byte at or after `offset` (`SEEK_DATA`), or `None`
/// when the rest of the file is a hole. Used to skip deallocated space.
pub fn seek_data(fd: RawFd, offset: u64) -> io::Result<Option<u64>> {
    seek(fd, offset, libc::SEEK_DATA)
}

/// Finds the next hole at or after `offset` (`SEEK_HOLE`); end of file counts as a hole.
pub fn seek_hole(fd: RawFd, offset: u64) -> io::Result<Option<u64>> {
    seek(fd, offset, libc::SEEK_HOLE)
}

fn seek(fd: RawFd, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we were handed has no memory-safety
    // preconditions; errors are reported through errno.
    let rc = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(Some(rc as u64))
}

// ---------------------------------------------------------------------------
// Thread placement
// ---------------------------------------------------------------------------

/// Pins the calling thread to `core`. Returns false when the core does not
/// exist on this machine (the reactor then runs unpinned and says so).
pub fn pin_current_thread(core: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: core })
}

/// Number of cores this process may run on.
pub fn online_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_zeroed_aligned_and_writable() {
        let r = Region::map(10_000, false, true).unwrap();
        assert_eq!(r.len(), 12_288);
        assert_eq!(r.as_ptr() as usize % PAGE_SIZE, 0);
        // SAFETY: the region is 12 KiB long and owned by this test.
        let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len()) };
        assert!(s.iter().all(|b| *b == 0));
        s[5000] = 7;
        r.discard(4096, 4096).unwrap();
        assert_eq!(s[5000], 0, "discarded page reads back as zero");
    }

    /// A large mapping goes the transparent-huge-page way (advice, then
    /// populate): it must come back zeroed, resident and writable, and a
    /// discard inside a huge page must still read back as zero.
    #[test]
    fn large_region_is_resident_zeroed_and_discardable() {
        let len = 4 * HUGE_PAGE_SIZE + 3 * PAGE_SIZE;
        let r = Region::map(len, false, true).unwrap();
        assert_eq!(r.len(), len);
        let mut vec = vec![0u8; len / PAGE_SIZE];
        // SAFETY: mincore writes one byte per page of the region into `vec`,
        // which has that many bytes.
        let rc = unsafe { libc::mincore(r.as_ptr().cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert!(vec.iter().all(|v| v & 1 == 1), "every page populated");
        // SAFETY: the region is `len` bytes long and owned by this test.
        let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len()) };
        assert!(s.iter().all(|b| *b == 0));
        s[HUGE_PAGE_SIZE + 100] = 9;
        s[HUGE_PAGE_SIZE + PAGE_SIZE + 1] = 8;
        r.discard(HUGE_PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(s[HUGE_PAGE_SIZE + 100], 0, "discarded page reads as zero");
        assert_eq!(s[HUGE_PAGE_SIZE + PAGE_SIZE + 1], 8, "its neighbour kept");
    }

    #[test]
    fn tsc_advances() {
        let a = rdtsc();
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(rdtsc() > a);
    }
}

pub mod dma;
pub mod sock;
pub mod uring;
