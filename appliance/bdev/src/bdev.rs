//! Bdevs, descriptors, claims and per-core channels.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hotcopy_runtime::{DmaBuf, LendingRegion};

use crate::io::{BdevIo, IoError, IoStatus, IoType};
use crate::stats::{self, IoStats, ShardHandle, StatsPool};
use crate::BdevError;

/// Static facts about a bdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevInfo {
    pub name: String,
    pub uuid: u128,
    /// Bytes per block: a power of two, 512..=65536.
    pub block_size: u32,
    pub num_blocks: u64,
    /// The module that implements it (`malloc`, `uring`, …).
    pub product: &'static str,
    /// Whether completed writes can be lost on power failure until a flush.
    pub volatile_write_cache: bool,
}

impl BdevInfo {
    pub fn new(
        name: impl Into<String>,
        product: &'static str,
        block_size: u32,
        num_blocks: u64,
    ) -> Self {
        BdevInfo {
            name: name.into(),
            uuid: new_uuid(),
            block_size,
            num_blocks,
            product,
            volatile_write_cache: false,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }
}

/// A random-enough v4-style UUID without a dependency: time, a counter and the
/// address of a stack slot, mixed with splitmix64.
fn new_uuid() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let local = 0u8;
    let mut x = t
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (&local as *const u8 as u64);
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let v = ((next() as u128) << 64) | next() as u128;
    (v & !(0xF000u128 << 64) | (0x4000u128 << 64)) & !(0xC0u128 << 56) | (0x80u128 << 56)
}

/// Formats a UUID in the usual 8-4-4-4-12 form.
pub fn format_uuid(u: u128) -> String {
    let h = format!("{u:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What a module implements for each bdev it creates (SPDK's fn_table).
///
/// Adding a module: implement this and [`BackendChannel`], register instances
/// with [`BdevRegistry::register`], and add the config variant and its arm in
/// the daemon's `construct` module (`appliance/daemon/src/construct.rs`).
pub trait BdevBackend: AsAny + Send + Sync + 'static {
    /// Whether the bdev can perform `io_type`. Unsupported I/O is failed by the
    /// channel before it reaches the module.
    fn supports(&self, io_type: IoType) -> bool;

    /// Creates the per-core channel. Called on the reactor that will use it.
    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError>;

    /// Ranges of blocks that hold data, as `(offset_blocks, num_blocks)`, in
    /// order, when the module can tell which blocks are deallocated (`None`
    /// when it cannot: then every block counts as allocated). Control path.
    fn allocated_ranges(&self) -> Option<Vec<(u64, u64)>> {
        None
    }

    /// The memory holding the bdev's blocks, when they live in this
    /// process (a RAM disk): see [`MemoryWindow`]. Control path.
    fn memory_window(&self) -> Option<MemoryWindow> {
        None
    }
}

/// The blocks of a RAM-backed bdev, lent in place for zero-copy reads: a
/// copy of them to another device writes straight from the bdev's memory
/// instead of reading into a buffer first (SPDK's zcopy on malloc bdevs).
/// The reads bypass the bdev's channels, so they do not show in its I/O
/// statistics.
#[derive(Clone, Debug)]
pub struct MemoryWindow {
    mem: LendingRegion,
    block_size: u64,
    num_blocks: u64,
}

impl MemoryWindow {
    /// The window onto `mem`, which holds `num_blocks` blocks of
    /// `block_size` bytes from its start.
    pub fn new(mem: LendingRegion, block_size: u64, num_blocks: u64) -> Option<MemoryWindow> {
        let bytes = block_size.checked_mul(num_blocks)?;
        (block_size > 0 && bytes <= mem.len() as u64).then_some(MemoryWindow {
            mem,
            block_size,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Blocks `[offset_blocks, offset_blocks + num_blocks)` as a buffer that
    /// points into the bdev's memory, or `None` when the range is empty,
    /// past the end, or not page-aligned in memory.
    ///
    /// The buffer is read-only (`DerefMut` and `as_mut_ptr` panic on it).
    ///
    /// # Safety
    /// While the buffer lives nothing may write those blocks (no write to
    /// the bdev may touch them).
    #[inline]
    pub unsafe fn lend(&self, offset_blocks: u64, num_blocks: u64) -> Option<DmaBuf> {
        let end = offset_blocks.checked_add(num_blocks)?;
        if end > self.num_blocks {
            return None;
        }
        let off = usize::try_from(offset_blocks * self.block_size).ok()?;
        let len = usize::try_from(num_blocks * self.block_size).ok()?;
        // SAFETY: the caller's promise is the one `lend` asks for.
        unsafe { self.mem.lend(off, len) }
    }
}

/// Lets the control path reach a module's own type behind a [`Bdev`]
/// (for example a fault bdev's control knobs): see [`Bdev::backend`].
pub trait AsAny {
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<T: std::any::Any> AsAny for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A module's per-core queue: submit I/O, reap completions. `!Send`.
pub trait BackendChannel {
    /// Starts an I/O. It always comes back through `poll`, failed or not.
    /// The layer above has already checked range, buffer and permissions.
    fn submit(&mut self, io: BdevIo);

    /// Hands every completed I/O to `done`; returns how many.
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize;
}

/// Hands every queued completion to `done`, oldest first; returns how many.
/// For modules that finish I/O during `submit` and deliver it on `poll`.
#[inline]
pub fn deliver(queue: &mut VecDeque<BdevIo>, done: &mut dyn FnMut(BdevIo)) -> usize {
    let n = queue.len();
    for _ in 0..n {
        if let Some(io) = queue.pop_front() {
            done(io);
        }
    }
    n
}

struct BdevShared {
    info: BdevInfo,
    backend: Box<dyn BdevBackend>,
    claimed_by: Mutex<Option<String>>,
    /// The I/O statistics of every channel (see [`crate::stats`]).
    io_stats: Arc<StatsPool>,
}

/// A registered block device. Cloning shares it.
#[derive(Clone)]
pub struct Bdev(Arc<BdevShared>);

impl fmt::Debug for Bdev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bdev").field("info", &self.0.info).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these control-path locks leaves plain data
    // behind; keep going with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bdev {
    pub fn info(&self) -> &BdevInfo {
        &self.0.info
    }

    pub fn name(&self) -> &str {
        &self.0.info.name
    }

    pub fn block_size(&self) -> u32 {
        self.0.info.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.0.info.num_blocks
    }

    pub fn size_bytes(&self) -> u64 {
        self.0.info.size_bytes()
    }

    pub fn supports(&self, io_type: IoType) -> bool {
        self.0.backend.supports(io_type)
    }

    /// See [`BdevBackend::allocated_ranges`].
    pub fn allocated_ranges(&self) -> Option<Vec<(u64, u64)>> {
        self.0.backend.allocated_ranges()
    }

    /// See [`BdevBackend::memory_window`].
    pub fn memory_window(&self) -> Option<MemoryWindow> {
        self.0.backend.memory_window()
    }

    /// Counters and latency percentiles of the I/O through this bdev's
    /// channels since it was created or last reset (SPDK's
    /// `bdev_get_iostat`). Control path: takes a lock and reads every
    /// channel's shard (and the first call in a process calibrates the
    /// clock, 20 ms). See [`crate::stats`].
    pub fn io_stats(&self) -> IoStats {
        self.0.io_stats.read()
    }

    /// Starts [`io_stats`](Self::io_stats) again from zero.
    pub fn reset_io_stats(&self) {
        self.0.io_stats.reset()
    }

    /// The module's object behind this bdev, if it is a `T`.
    pub fn backend<T: BdevBackend>(&self) -> Option<&T> {
        // Deref the box first: `Box<dyn BdevBackend>` is itself `Any`.
        (*self.0.backend).as_any().downcast_ref::<T>()
    }

    /// Who holds the exclusive claim, if anyone.
    pub fn claimed_by(&self) -> Option<String> {
        lock(&self.0.claimed_by).clone()
    }

    /// Takes the exclusive claim a virtual bdev needs on its base. While it is
    /// held, nobody else can open the bdev for writing or claim it.
    pub fn claim(&self, owner: &str) -> Result<Claim, BdevError> {
        let mut c = lock(&self.0.claimed_by);
        if let Some(by) = c.as_ref() {
            return Err(BdevError::Claimed {
                bdev: self.name().to_string(),
                by: by.clone(),
            });
        }
        *c = Some(owner.to_string());
        Ok(Claim { bdev: self.clone() })
    }

    /// Opens a descriptor. A claimed bdev opens read-only only; its writer is
    /// the claim holder ([`Claim::open`]).
    pub fn open(&self, writable: bool) -> Result<BdevDesc, BdevError> {
        if writable {
            if let Some(by) = self.claimed_by() {
                return Err(BdevError::Claimed {
                    bdev: self.name().to_string(),
                    by,
                });
            }
        }
        Ok(BdevDesc {
            bdev: self.clone(),
            writable,
        })
    }

    fn same(&self, other: &Bdev) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// An exclusive claim on a bdev; released on drop.
pub struct Claim {
    bdev: Bdev,
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Claim({})", self.bdev.name())
    }
}

impl Claim {
    pub fn bdev(&self) -> &Bdev {
        &self.bdev
    }

    /// A writable descriptor for the claim holder.
    pub fn open(&self) -> BdevDesc {
        BdevDesc {
            bdev: self.bdev.clone(),
            writable: true,
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        *lock(&self.bdev.0.claimed_by) = None;
    }
}

/// An open bdev. `Send + Sync`: create one channel per core from it.
#[derive(Clone, Debug)]
pub struct BdevDesc {
    bdev: Bdev,
    writable: bool,
}

impl BdevDesc {
    pub fn bdev(&self) -> &Bdev {
        &self.bdev
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Creates this core's channel for the bdev. Call it on the reactor that
    /// will submit through it.
    pub fn channel(&self) -> Result<BdevChannel, BdevError> {
        let info = self.bdev.info();
        let inner = self.bdev.0.backend.create_channel()?;
        let mut supported = 0u8;
        for t in IoType::ALL {
            if self.bdev.supports(t) {
                supported |= t.bit();
            }
        }
        Ok(BdevChannel {
            inner,
            num_blocks: info.num_blocks,
            block_size: info.block_size as u64,
            writable: self.writable,
            supported,
            rejected: VecDeque::with_capacity(16),
            inflight: 0,
            stats: ChannelStats::default(),
            io_stats: self.bdev.0.io_stats.acquire(),
        })
    }
}

/// Counts of I/O submitted on one channel (no atomics: the channel is per
/// core). The bdev-wide figures, counted at completion with statuses and
/// latencies, are [`Bdev::io_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Submitted I/O that passed validation, indexed by `IoType as usize`.
    pub ops: [u64; 5],
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// I/O failed by validation (range, buffer, permission, support).
    pub rejected: u64,
}

/// A per-core channel to a bdev: validates each I/O, then hands it to the
/// module. I/O that fails validation comes back from the next `poll`.
pub struct BdevChannel {
    inner: Box<dyn BackendChannel>,
    num_blocks: u64,
    block_size: u64,
    writable: bool,
    supported: u8,
    rejected: VecDeque<BdevIo>,
    inflight: usize,
    stats: ChannelStats,
    /// This channel's share of the bdev's [`IoStats`].
    io_stats: ShardHandle,
}

impl BdevChannel {
    #[inline]
    fn check(&self, io: &BdevIo) -> Result<(), IoError> {
        if self.supported & io.io_type.bit() == 0 {
            return Err(IoError::Unsupported);
        }
        if io.io_type.is_mutating() && !self.writable {
            return Err(IoError::ReadOnly);
        }
        match io.offset_blocks.checked_add(io.num_blocks) {
            Some(end) if end <= self.num_blocks => {}
            _ => return Err(IoError::OutOfRange),
        }
        if io.io_type.needs_buffer() {
            let need = io
                .num_blocks
                .checked_mul(self.block_size)
                .ok_or(IoError::BadBuffer)?;
            match &io.buf {
                Some(b) if b.len() as u64 >= need && io.num_blocks > 0 => {}
                _ => return Err(IoError::BadBuffer),
            }
        }
        Ok(())
    }

    /// Submits an I/O. It comes back through [`BdevChannel::poll`].
    #[inline]
    pub fn submit(&mut self, mut io: BdevIo) {
        self.inflight += 1;
        match self.check(&io) {
            Ok(()) => {
                let st = &mut self.stats;
                st.ops[io.io_type as usize] += 1;
                match io.io_type {
                    IoType::Read => st.bytes_read += io.num_blocks * self.block_size,
                    IoType::Write => st.bytes_written += io.num_blocks * self.block_size,
                    _ => {}
                }
                let inner = &mut self.inner;
                stats::submit_tick(|now| {
                    io.push_stamp(now);
                    inner.submit(io)
                })
            }
            Err(e) => {
                self.stats.rejected += 1;
                self.io_stats.shard().error(io.io_type);
                self.rejected.push_back(io.complete(IoStatus::Failed(e)))
            }
        }
    }

    /// Hands completed I/O to `done`; returns how many.
    #[inline]
    pub fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut n = 0;
        while let Some(io) = self.rejected.pop_front() {
            n += 1;
            done(io);
        }
        let (shard, bs) = (self.io_stats.shard(), self.block_size);
        // One clock read per batch, at its first timed completion: every I/O
        // of the batch was submitted before this poll began.
        let mut now = 0;
        n += self.inner.poll(&mut |mut io| {
            shard.complete(&mut io, bs, &mut now);
            done(io)
        });
        self.inflight -= n;
        n
    }

    /// I/O submitted and not yet returned by `poll`.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    pub fn block_size(&self) -> u32 {
        self.block_size as u32
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
}

/// Every bdev of one appliance, by name. Control path only (it takes a lock).
#[derive(Clone, Default)]
pub struct BdevRegistry {
    bdevs: Arc<Mutex<BTreeMap<String, Bdev>>>,
}

impl fmt::Debug for BdevRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(lock(&self.bdevs).keys()).finish()
    }
}

impl BdevRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a bdev built by a module.
    pub fn register(&self, info: BdevInfo, backend: impl BdevBackend) -> Result<Bdev, BdevError> {
        validate_name(&info.name)?;
        if !info.block_size.is_power_of_two() || !(512..=65536).contains(&info.block_size) {
            return Err(BdevError::InvalidGeometry {
                name: info.name.clone(),
                why: format!(
                    "block size {} is not a power of two in 512..=65536",
                    info.block_size
                ),
            });
        }
        if info.num_blocks == 0 {
            return Err(BdevError::InvalidGeometry {
                name: info.name.clone(),
                why: "size is zero blocks".into(),
            });
        }
        let mut map = lock(&self.bdevs);
        if map.contains_key(&info.name) {
            return Err(BdevError::Exists(info.name.clone()));
        }
        let bdev = Bdev(Arc::new(BdevShared {
            info,
            backend: Box::new(backend),
            claimed_by: Mutex::new(None),
            io_stats: Arc::default(),
        }));
        map.insert(bdev.name().to_string(), bdev.clone());
        tracing::debug!(
            bdev = bdev.name(),
            product = bdev.info().product,
            "bdev registered"
        );
        Ok(bdev)
    }

    pub fn get(&self, name: &str) -> Option<Bdev> {
        lock(&self.bdevs).get(name).cloned()
    }

    /// Like [`get`](Self::get), with an error that lists what exists.
    pub fn lookup(&self, name: &str) -> Result<Bdev, BdevError> {
        let map = lock(&self.bdevs);
        map.get(name).cloned().ok_or_else(|| BdevError::NotFound {
            name: name.to_string(),
            known: map.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn open(&self, name: &str, writable: bool) -> Result<BdevDesc, BdevError> {
        self.lookup(name)?.open(writable)
    }

    pub fn names(&self) -> Vec<String> {
        lock(&self.bdevs).keys().cloned().collect()
    }

    pub fn list(&self) -> Vec<Bdev> {
        lock(&self.bdevs).values().cloned().collect()
    }

    /// Removes a bdev. Fails while another bdev claims it; a virtual bdev's
    /// removal releases its claim on its base once every handle to it is gone.
    pub fn unregister(&self, name: &str) -> Result<Bdev, BdevError> {
        let mut map = lock(&self.bdevs);
        let bdev = map.get(name).cloned().ok_or_else(|| BdevError::NotFound {
            name: name.to_string(),
            known: map.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        if let Some(by) = bdev.claimed_by() {
            return Err(BdevError::Claimed {
                bdev: name.to_string(),
                by,
            });
        }
        let removed = map.remove(name).expect("present: checked above");
        debug_assert!(removed.same(&bdev));
        Ok(removed)
    }
}

fn validate_name(name: &str) -> Result<(), BdevError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BdevError::InvalidName(name.to_string()))
    }
}
