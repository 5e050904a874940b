//! `uring`: a bdev backed by a regular file or a block device, through
//! io_uring with `O_DIRECT`.
//!
//! # One ring per core, shared
//!
//! Each uring bdev is an I/O device ([`IoDeviceId`]). The first channel a core
//! creates for the bdev sets up that core's ring (a [`UringQueue`] on the
//! bdev's file descriptor) with [`get_io_channel`]; every later channel of the
//! same bdev on the same core shares it, so a core never has more than one
//! ring per bdev however many descriptors and stacked modules use it. The
//! ring goes away when the core's last channel is dropped; its `Drop` waits
//! for the operations still in flight, because the kernel may still write into
//! their buffers.
//!
//! # Completion routing
//!
//! The shared per-core state (`CoreRing`, behind an `Rc<RefCell<_>>`: one
//! thread, no lock) holds one completion queue per channel, indexed by a slot
//! id the channel gets when it is created. Every submitted operation carries
//! its owner's slot id. Whichever channel polls reaps *all* posted completions
//! and files each one in its owner's queue; then it takes only its own. A
//! channel dropped with I/O in flight marks its slot dead: its completions are
//! dropped when they are reaped (their buffers go back to their pools), and the
//! slot is reused only once nothing of the old channel is left in the ring, so
//! a new channel never sees a stale completion. The queues are preallocated to
//! the ring's capacity, so routing does not allocate.
//!
//! # Batching
//!
//! `submit` only fills the submission ring. The one syscall, `io_uring_enter`,
//! happens at the end of `poll` for everything pushed since the last one, or
//! in `submit` once [`SUBMIT_BATCH`] operations are waiting, so that a long
//! burst of submissions starts on the device before the next poll. Reaping
//! reads the completion ring from shared memory, with no syscall. When the
//! ring is full, I/O waits in the channel's overflow queue and is pushed by a
//! later `poll` as completions free room: never dropped, never blocking.
//!
//! # Alignment
//!
//! With `O_DIRECT` the buffer address, the file offset and the length must be
//! multiples of the device's logical block size. [`DmaBuf`]s are 4 KiB aligned
//! and offsets and lengths are whole bdev blocks, and the bdev block size must
//! be a multiple of the logical block size (checked at creation), so every
//! request the channel layer lets through is aligned. Regular files report a
//! logical block size of 512.
//!
//! # Results and fallbacks
//!
//! A negative result fails the I/O with [`IoError::Device`] and the errno. A
//! read or write that moved fewer bytes than asked fails with `EIO`: a short
//! transfer is never reported as success (the queue reads into the start of
//! the buffer only, so the remainder cannot be resubmitted).
//!
//! * Filesystems that refuse `O_DIRECT` are opened buffered, with a warning;
//!   the page cache then holds written data until a flush.
//! * Flush is `fdatasync`; FUA writes use `RWF_DSYNC`.
//! * Unmap punches a hole (`FALLOC_FL_PUNCH_HOLE`), write-zeroes uses
//!   `FALLOC_FL_ZERO_RANGE`; a filesystem without zero-range support (tmpfs)
//!   gets a hole punch instead, which also reads back as zeros. Block devices
//!   support neither for now (`supports` says so, and the channel layer fails
//!   them as unsupported).
//! * [`BdevBackend::allocated_ranges`] walks `SEEK_DATA`/`SEEK_HOLE` on
//!   regular files; block devices report `None` (everything allocated).
//! * With [`UringOptions::preallocate`], the part of a file that `size`
//!   creates or extends is written with zeros at creation (through a buffered
//!   handle, then `fdatasync`), so the first writes find their blocks
//!   allocated; otherwise it stays sparse.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hotcopy_runtime::sys::{
    self,
    uring::{PushError, UringCtx, UringOp, UringQueue, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE},
};
use hotcopy_runtime::{get_io_channel, DmaBuf, IoChannel, IoDeviceId};

use crate::bdev::{BackendChannel, BdevBackend, BdevInfo, BdevRegistry};
use crate::io::{BdevIo, IoError, IoStatus, IoType};
use crate::{Bdev, BdevError};

/// Ring entries per core when the options do not say otherwise.
pub const DEFAULT_QUEUE_DEPTH: u32 = 256;
/// Largest accepted queue depth (the queue's own limit).
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// `submit` hands the ring to the kernel once this many operations wait, so a
/// long burst of submissions does not wait for the next `poll` to start.
pub const SUBMIT_BATCH: u32 = 32;
/// Largest single read or write: the kernel moves at most `MAX_RW_COUNT`
/// (`INT_MAX` rounded down to a page) bytes per call.
const MAX_TRANSFER: u64 = (i32::MAX as u64) & !4095;

/// How to create a uring bdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringOptions {
    /// A regular file or a block device.
    pub path: PathBuf,
    /// Minimum size in bytes: a missing file is created with this size, a
    /// smaller one is extended to it (files only; a block device must already
    /// be at least this large). A larger file keeps its size and the bdev
    /// covers all of it. Without a size, the path must exist.
    pub size: Option<u64>,
    /// Bytes per block; default: the device's logical block size (512 for
    /// files). Must be a multiple of the logical block size.
    pub block_size: Option<u32>,
    /// Use `O_DIRECT` (default). When the filesystem refuses it (older tmpfs),
    /// the file is opened buffered and a warning is logged.
    pub direct: bool,
    /// Ring entries per core (default [`DEFAULT_QUEUE_DEPTH`], at most
    /// [`MAX_QUEUE_DEPTH`]). Up to twice this many operations can be in flight
    /// per core; more wait in the submitting channel's overflow queue.
    pub queue_depth: u32,
    /// Write zeros over the part of a regular file that `size` creates or
    /// extends (like `qemu-img create -o preallocation=full`), so its blocks
    /// exist before the bdev's first writes reach them. Default false: that
    /// part stays sparse, and every first write to it allocates blocks on the
    /// I/O path. `fallocate` is not used because its unwritten extents cost as
    /// much to convert at the first write. Bytes the file already held are
    /// left alone, and a block device is never extended, so it is unaffected.
    pub preallocate: bool,
}

impl UringOptions {
    /// Options for `path` with every default: no size (the path must exist),
    /// detected block size, direct I/O, [`DEFAULT_QUEUE_DEPTH`], no
    /// preallocation.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UringOptions {
            path: path.into(),
            size: None,
            block_size: None,
            direct: true,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            preallocate: false,
        }
    }
}

/// What every core's ring of one bdev shares: the open file and its geometry.
#[derive(Debug)]
struct UringFile {
    file: File,
    /// The bdev's name, for errors.
    name: String,
    path: PathBuf,
    device: IoDeviceId,
    block_size: u32,
    num_blocks: u64,
    block_device: bool,
    direct: bool,
    queue_depth: u32,
    /// Cleared the first time the filesystem refuses `FALLOC_FL_ZERO_RANGE`;
    /// write-zeroes then punches holes.
    zero_range: AtomicBool,
}

/// The module's object behind a uring [`Bdev`] (reach it with
/// [`Bdev::backend`]).
#[derive(Debug)]
pub struct UringBdev {
    file: Arc<UringFile>,
}

impl UringBdev {
    /// The file or block device behind the bdev.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Whether I/O bypasses the page cache (`false` after the buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.file.direct
    }

    pub fn is_block_device(&self) -> bool {
        self.file.block_device
    }

    /// Ring entries per core.
    pub fn queue_depth(&self) -> u32 {
        self.file.queue_depth
    }
}

impl BdevBackend for UringBdev {
    fn supports(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::Unmap | IoType::WriteZeroes => !self.file.block_device,
        }
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        let f = &self.file;
        let channel_err = |source: io::Error| BdevError::Channel {
            name: f.name.clone(),
            source,
        };
        let core = get_io_channel(f.device, || CoreRing::new(f.clone()).map(RefCell::new));
        let ring = match &*core {
            Ok(ring) => ring,
            Err(e) => {
                let source = match e.raw_os_error() {
                    Some(errno) => io::Error::from_raw_os_error(errno),
                    None => io::Error::new(e.kind(), e.to_string()),
                };
                return Err(channel_err(source));
            }
        };
        let Some(owner) = ring.borrow_mut().attach() else {
            return Err(channel_err(io::Error::other(
                "too many channels on one core for this bdev",
            )));
        };
        let cap = ring_capacity(f.queue_depth);
        Ok(Box::new(UringChannel {
            core,
            owner,
            overflow: VecDeque::with_capacity(f.queue_depth as usize),
            ready: VecDeque::with_capacity(cap),
        }))
    }

    fn allocated_ranges(&self) -> Option<Vec<(u64, u64)>> {
        let f = &self.file;
        if f.block_device {
            return None;
        }
        let fd = f.file.as_raw_fd();
        let bs = f.block_size as u64;
        let end = f.num_blocks * bs;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0;
        while pos < end {
            // Any error: say nothing rather than something wrong (None means
            // every block counts as allocated).
            let data = match sys::seek_data(fd, pos) {
                Ok(Some(d)) if d < end => d,
                Ok(_) => break,
                Err(_) => return None,
            };
            let hole = match sys::seek_hole(fd, data) {
                Ok(h) => h.unwrap_or(end).min(end),
                Err(_) => return None,
            };
            if hole <= data {
                // A file changing under us; do not loop forever.
                return None;
            }
            let (first, last) = (data / bs, hole.div_ceil(bs));
            match out.last_mut() {
                Some((o, l)) if *o + *l >= first => *l = (*l).max(last - *o),
                _ => out.push((first, last - first)),
            }
            pos = hole;
        }
        Some(out)
    }
}

/// Slots in a ring of `depth` entries: what [`UringQueue`] keeps in flight.
fn ring_capacity(depth: u32) -> usize {
    depth.clamp(1, MAX_QUEUE_DEPTH).next_power_of_two() as usize * 2
}

/// One operation in the ring: the I/O, which channel it belongs to, and what a
/// full transfer returns.
struct Op {
    io: BdevIo,
    owner: u16,
    /// Bytes a read or write must move (0 for the others).
    expected: u32,
    /// What was pushed (to retry a refused zero-range as a hole punch).
    op: UringOp,
}

impl UringCtx for Op {
    fn dma_buf(&mut self) -> Option<&mut DmaBuf> {
        self.io.buf.as_mut()
    }
}

/// One channel's place in the per-core state.
struct Owner {
    /// False once the channel is dropped: its completions are discarded.
    live: bool,
    /// Operations in the ring (or waiting to be retried) for this owner.
    inflight: usize,
    /// Finished I/O waiting for the owner's next `poll`.
    done: VecDeque<BdevIo>,
}

/// What reaping decides for a completion.
enum Outcome {
    Done(IoStatus),
    Retry(UringOp),
}

/// This core's ring for one bdev, shared by all of its channels on the core.
struct CoreRing {
    /// Declared first so it drops first: its `Drop` waits for in-flight
    /// operations while `file` (below) still keeps the descriptor open.
    queue: UringQueue<Op>,
    owners: Vec<Owner>,
    free_owners: Vec<u16>,
    /// Operations to push again (a zero-range refused by the filesystem).
    retry: VecDeque<Op>,
    /// Operations pushed since the last `io_uring_enter`.
    unflushed: u32,
    file: Arc<UringFile>,
}

/// The per-core channel's content: the ring, or why it could not be set up.
type PerCore = io::Result<RefCell<CoreRing>>;

impl CoreRing {
    fn new(file: Arc<UringFile>) -> io::Result<CoreRing> {
        let queue = UringQueue::new(file.file.as_raw_fd(), file.queue_depth)?;
        let cap = ring_capacity(file.queue_depth);
        Ok(CoreRing {
            queue,
            owners: Vec::with_capacity(4),
            free_owners: Vec::with_capacity(4),
            retry: VecDeque::with_capacity(cap.min(64)),
            unflushed: 0,
            file,
        })
    }

    /// Gives a new channel its slot (control path: may allocate).
    fn attach(&mut self) -> Option<u16> {
        if let Some(i) = self.free_owners.pop() {
            let o = &mut self.owners[i as usize];
            debug_assert!(
                !o.live && o.inflight == 0 && o.done.is_empty(),
                "slot {i}: live {} inflight {} done {}",
                o.live,
                o.inflight,
                o.done.len()
            );
            o.live = true;
            return Some(i);
        }
        let idx = u16::try_from(self.owners.len()).ok()?;
        self.owners.push(Owner {
            live: true,
            inflight: 0,
            done: VecDeque::with_capacity(ring_capacity(self.file.queue_depth)),
        });
        // Freeing a slot (possibly while reaping) must not allocate.
        self.free_owners
            .reserve(self.owners.len() - self.free_owners.len());
        Some(idx)
    }

    /// A channel goes away: drop what it has not collected, and discard the
    /// rest of its I/O as it completes.
    fn detach(&mut self, owner: u16) {
        let o = &mut self.owners[owner as usize];
        o.live = false;
        o.done.clear();
        if o.inflight == 0 {
            self.free_owners.push(owner);
        }
    }

    #[inline]
    fn finish(&mut self, owner: u16, io: BdevIo, status: IoStatus) {
        self.owners[owner as usize]
            .done
            .push_back(io.complete(status));
    }

    /// Starts `io` for `owner`. The caller checked `queue.has_room()`.
    #[inline]
    fn start(&mut self, owner: u16, io: BdevIo) {
        let bs = self.file.block_size as u64;
        // The channel layer checked the range; checked math keeps a direct
        // caller of the backend from wrapping around.
        let (Some(offset), Some(len)) = (
            io.offset_blocks.checked_mul(bs),
            io.num_blocks.checked_mul(bs),
        ) else {
            return self.finish(owner, io, IoStatus::Failed(IoError::OutOfRange));
        };
        let op = match io.io_type {
            IoType::Read | IoType::Write if len > MAX_TRANSFER => {
                return self.finish(owner, io, IoStatus::Failed(IoError::Device(libc::EINVAL)));
            }
            IoType::Read => UringOp::Read {
                offset,
                len: len as u32,
            },
            IoType::Write => UringOp::Write {
                offset,
                len: len as u32,
                fua: io.fua,
            },
            IoType::Flush => UringOp::Fsync,
            IoType::Unmap | IoType::WriteZeroes if self.file.block_device => {
                return self.finish(owner, io, IoStatus::Failed(IoError::Unsupported));
            }
            IoType::Unmap | IoType::WriteZeroes if len == 0 => {
                return self.finish(owner, io, IoStatus::Success);
            }
            IoType::Unmap => UringOp::Fallocate {
                offset,
                len,
                mode: FALLOC_PUNCH_HOLE,
            },
            IoType::WriteZeroes => {
                let mode = if self.file.zero_range.load(Ordering::Relaxed) {
                    FALLOC_ZERO_RANGE
                } else {
                    FALLOC_PUNCH_HOLE
                };
                UringOp::Fallocate { offset, len, mode }
            }
        };
        let expected = match op {
            UringOp::Read { len, .. } | UringOp::Write { len, .. } => len,
            _ => 0,
        };
        match self.queue.push(
            op,
            Op {
                io,
                owner,
                expected,
                op,
            },
        ) {
            Ok(()) => {
                self.owners[owner as usize].inflight += 1;
                self.unflushed += 1;
            }
            Err(PushError::BadBuffer(op)) => {
                self.finish(owner, op.io, IoStatus::Failed(IoError::BadBuffer))
            }
        }
    }

    /// Decides what a completion means.
    #[inline]
    fn outcome(file: &UringFile, op: &Op, res: i32) -> Outcome {
        if res < 0 {
            if res == -libc::EOPNOTSUPP {
                if let UringOp::Fallocate {
                    offset,
                    len,
                    mode: FALLOC_ZERO_RANGE,
                } = op.op
                {
                    // The filesystem cannot zero a range (tmpfs): a hole reads
                    // back as zeros too. Remember it for later write-zeroes.
                    if file.zero_range.swap(false, Ordering::Relaxed) {
                        tracing::info!(
                            path = %file.path.display(),
                            "filesystem refuses FALLOC_FL_ZERO_RANGE; write-zeroes punches holes instead"
                        );
                    }
                    return Outcome::Retry(UringOp::Fallocate {
                        offset,
                        len,
                        mode: FALLOC_PUNCH_HOLE,
                    });
                }
            }
            return Outcome::Done(IoStatus::Failed(IoError::Device(-res)));
        }
        match op.op {
            UringOp::Read { .. } | UringOp::Write { .. } if res as u32 != op.expected => {
                // A short transfer (end of a file shrunk under us, a device
                // error mid-way): never success.
                Outcome::Done(IoStatus::Failed(IoError::Device(libc::EIO)))
            }
            _ => Outcome::Done(IoStatus::Success),
        }
    }

    /// Reaps every posted completion and files it with its owner. No syscall,
    /// no allocation (owner queues hold the ring's capacity).
    fn reap(&mut self) -> usize {
        let CoreRing {
            queue,
            owners,
            free_owners,
            retry,
            file,
            ..
        } = self;
        queue.reap(|op, res| {
            let o = &mut owners[op.owner as usize];
            if !o.live {
                // The channel is gone: drop the I/O (its buffer goes back).
                o.inflight -= 1;
                if o.inflight == 0 {
                    free_owners.push(op.owner);
                }
                return;
            }
            match Self::outcome(file, &op, res) {
                Outcome::Done(status) => {
                    o.inflight -= 1;
                    o.done.push_back(op.io.complete(status));
                }
                Outcome::Retry(uop) => retry.push_back(Op { op: uop, ..op }),
            }
        })
    }

    /// Pushes operations that need a second attempt, while there is room.
    fn push_retries(&mut self) {
        while self.queue.has_room() {
            let Some(op) = self.retry.pop_front() else {
                break;
            };
            let owner = op.owner;
            if !self.owners[owner as usize].live {
                let o = &mut self.owners[owner as usize];
                o.inflight -= 1;
                if o.inflight == 0 {
                    self.free_owners.push(owner);
                }
                continue;
            }
            match self.queue.push(op.op, op) {
                Ok(()) => self.unflushed += 1,
                Err(PushError::BadBuffer(op)) => {
                    self.owners[owner as usize].inflight -= 1;
                    self.finish(owner, op.io, IoStatus::Failed(IoError::BadBuffer));
                }
            }
        }
    }

    /// Hands everything pushed since the last call to the kernel: one syscall.
    fn flush(&mut self) {
        // The queue enters the kernel when it has entries to hand over or the
        // kernel flags completion work for us; a failed enter leaves the
        // entries counted there, and the next flush retries them.
        let _ = self.queue.flush();
        self.unflushed = 0;
    }
}

/// A channel of a uring bdev on one core.
struct UringChannel {
    core: IoChannel<PerCore>,
    owner: u16,
    /// I/O submitted while the ring was full, oldest first.
    overflow: VecDeque<BdevIo>,
    /// This channel's completions being handed out (swapped with its queue in
    /// the shared state, so `done` runs without holding the borrow).
    ready: VecDeque<BdevIo>,
}

/// The ring inside a channel's per-core state.
#[inline]
fn ring(core: &IoChannel<PerCore>) -> &RefCell<CoreRing> {
    match &**core {
        Ok(ring) => ring,
        // create_channel only builds channels on a ring that was set up.
        Err(_) => unreachable!("uring channel without a ring"),
    }
}

impl BackendChannel for UringChannel {
    #[inline]
    fn submit(&mut self, io: BdevIo) {
        if !self.overflow.is_empty() {
            // Keep the order: older I/O waiting for room goes first.
            self.overflow.push_back(io);
            return;
        }
        let mut core = ring(&self.core).borrow_mut();
        if !core.queue.has_room() {
            drop(core);
            self.overflow.push_back(io);
            return;
        }
        core.start(self.owner, io);
        if core.unflushed >= SUBMIT_BATCH {
            core.flush();
        }
    }

    #[inline]
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        {
            let mut core = ring(&self.core).borrow_mut();
            core.reap();
            core.push_retries();
            while core.queue.has_room() {
                let Some(io) = self.overflow.pop_front() else {
                    break;
                };
                core.start(self.owner, io);
            }
            core.flush();
            // I/O that completes inline (buffered I/O often does) is posted by
            // the enter above: collect it now rather than on the next poll.
            core.reap();
            let mine = &mut core.owners[self.owner as usize].done;
            if self.ready.is_empty() {
                std::mem::swap(mine, &mut self.ready);
            } else {
                self.ready.append(mine);
            }
        }
        // The borrow is released: `done` may submit to another channel of
        // this bdev on this core.
        let n = self.ready.len();
        while let Some(io) = self.ready.pop_front() {
            done(io);
        }
        n
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // I/O still in the ring is discarded as it completes; the ring itself
        // (dropped with the core's last channel) waits for it before the
        // buffers can be freed. I/O in `overflow` never reached the kernel.
        if let Ok(mut core) = ring(&self.core).try_borrow_mut() {
            core.detach(self.owner);
        }
    }
}

/// Creates and registers a uring bdev on `opts.path`. See [`UringOptions`].
pub fn create(reg: &BdevRegistry, name: &str, opts: &UringOptions) -> Result<Bdev, BdevError> {
    create_inner(reg, name, opts).map(|(bdev, _)| bdev)
}

/// [`create`], also giving back the shared state (for tests: the ring's device id).
fn create_inner(
    reg: &BdevRegistry,
    name: &str,
    opts: &UringOptions,
) -> Result<(Bdev, Arc<UringFile>), BdevError> {
    let path = &opts.path;
    let shown = path.display();
    let fail = |why: String, source: Option<io::Error>| BdevError::Create {
        name: name.to_string(),
        why,
        source,
    };
    if reg.get(name).is_some() {
        return Err(BdevError::Exists(name.to_string()));
    }
    if !(1..=MAX_QUEUE_DEPTH).contains(&opts.queue_depth) {
        return Err(fail(
            format!(
                "{shown}: queue depth {} is not in 1..={MAX_QUEUE_DEPTH}",
                opts.queue_depth
            ),
            None,
        ));
    }
    if let Some(bs) = opts.block_size {
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(fail(
                format!("{shown}: block size {bs} is not a power of two in 512..=65536"),
                None,
            ));
        }
    }
    if opts.size == Some(0) {
        return Err(fail(format!("{shown}: size zero"), None));
    }

    match std::fs::metadata(path) {
        Ok(meta) => {
            let ft = meta.file_type();
            if ft.is_dir() {
                return Err(fail(
                    format!("{shown} is a directory, not a file or block device"),
                    None,
                ));
            }
            if !ft.is_file() && !ft.is_block_device() {
                return Err(fail(
                    format!("{shown} is not a regular file or block device"),
                    None,
                ));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if opts.size.is_none() {
                return Err(fail(
                    format!("{shown} does not exist (give a size to create it)"),
                    Some(e),
                ));
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| fail(format!("cannot create {shown}"), Some(e)))?;
        }
        Err(e) => return Err(fail(format!("cannot stat {shown}"), Some(e))),
    }

    let (file, direct) = if opts.direct {
        sys::open_direct(path, true, true)
    } else {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(|f| (f, false))
    }
    .map_err(|e| fail(format!("cannot open {shown} read-write"), Some(e)))?;
    if opts.direct && !direct {
        tracing::warn!(
            bdev = name,
            path = %shown,
            "the filesystem refuses O_DIRECT: falling back to buffered I/O \
             (the page cache holds written data until a flush)"
        );
    }
    let block_device = sys::is_block_device(&file);

    let mut size = sys::device_size(&file)
        .map_err(|e| fail(format!("cannot read the size of {shown}"), Some(e)))?;
    if let Some(want) = opts.size {
        if size < want {
            if block_device {
                return Err(fail(
                    format!(
                        "block device {shown} holds {size} bytes, less than the {want} asked for"
                    ),
                    None,
                ));
            }
            file.set_len(want)
                .map_err(|e| fail(format!("cannot extend {shown} to {want} bytes"), Some(e)))?;
            if opts.preallocate {
                tracing::info!(
                    bdev = name,
                    path = %shown,
                    from = size,
                    to = want,
                    "preallocating: writing zeros over the new part of the file \
                     (this can take a while for a large file)"
                );
                write_zeros(path, size, want).map_err(|e| {
                    // Give the new part back (best effort), so that a retry
                    // finds the file short and preallocates again rather than
                    // taking the half-written, sparse file as it is.
                    let _ = file.set_len(size);
                    fail(
                        format!(
                            "cannot preallocate {shown}: writing zeros over bytes {size}..{want}"
                        ),
                        Some(e),
                    )
                })?;
            }
            size = want;
        }
    }

    let logical = sys::logical_block_size(&file).map_err(|e| {
        fail(
            format!("cannot read the logical block size of {shown}"),
            Some(e),
        )
    })?;
    let block_size = opts.block_size.unwrap_or(logical);
    if block_size.checked_rem(logical) != Some(0) {
        return Err(fail(
            format!(
                "block size {block_size} is not a multiple of the logical block size {logical} of {shown}"
            ),
            None,
        ));
    }
    let num_blocks = size / block_size as u64;
    if num_blocks == 0 {
        let why = if size == 0 {
            format!("{shown} has size zero (give a size to extend it)")
        } else {
            format!("{shown} holds {size} bytes, less than one {block_size}-byte block")
        };
        return Err(fail(why, None));
    }
    if size % block_size as u64 != 0 {
        tracing::debug!(
            bdev = name,
            path = %shown,
            size,
            block_size,
            "size is not a whole number of blocks; the tail is not used"
        );
    }

    // Fail here, with a clear message, rather than at the first channel when
    // io_uring is unavailable (kernel.io_uring_disabled, seccomp).
    UringQueue::<Op>::new(file.as_raw_fd(), 1)
        .map_err(|e| fail(format!("{shown}: cannot set up an io_uring"), Some(e)))?;

    let file = Arc::new(UringFile {
        file,
        name: name.to_string(),
        path: path.clone(),
        device: IoDeviceId::new(),
        block_size,
        num_blocks,
        block_device,
        direct,
        queue_depth: opts.queue_depth,
        zero_range: AtomicBool::new(true),
    });
    let mut info = BdevInfo::new(name, "uring", block_size, num_blocks);
    // Completed writes may sit in a drive cache (or the page cache) until a flush.
    info.volatile_write_cache = true;
    let bdev = reg.register(info, UringBdev { file: file.clone() })?;
    Ok((bdev, file))
}

/// Bytes written per call by [`write_zeros`].
const ZERO_PIECE: usize = 1 << 20;

/// Writes zeros over bytes `start..end` of the regular file at `path` through
/// an ordinary buffered handle of its own (the bdev's may be `O_DIRECT`, which
/// needs aligned buffers), then waits until they are on the disk, so that the
/// filesystem allocates those blocks now rather than at the bdev's first
/// writes.
fn write_zeros(path: &Path, start: u64, end: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;

    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let zeros = vec![0u8; ZERO_PIECE];
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(ZERO_PIECE as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    use hotcopy_runtime::{clear_current, IdlePolicy, Reactor};

    use crate::testing::{flush, pattern, read, run_io, unmap, write, write_zeroes};
    use crate::{BdevChannel, BdevDesc};

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    /// Runs `f` on a thread of its own with a reactor (a thread holds at most
    /// one), passing on its panic.
    fn on_reactor(f: impl FnOnce() + Send + 'static) {
        let t = std::thread::spawn(move || {
            let r = Reactor::new(0, IdlePolicy::Poll);
            f();
            drop(r);
            clear_current();
        });
        if let Err(panic) = t.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// A scratch directory on a disk filesystem (/tmp may be tmpfs).
    fn scratch() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("hotcopy-uring-")
            .tempdir_in("/var/tmp")
            .expect("temporary directory in /var/tmp")
    }

    fn sized(path: &Path, size: u64) -> UringOptions {
        let mut o = UringOptions::new(path);
        o.size = Some(size);
        o
    }

    /// A registry holding a new uring bdev `u0`, the bdev, a writable
    /// descriptor, and the bdev's shared state.
    fn open(opts: &UringOptions) -> (BdevRegistry, Bdev, BdevDesc, Arc<UringFile>) {
        let reg = BdevRegistry::new();
        let (bdev, file) = create_inner(&reg, "u0", opts).expect("create uring bdev");
        let desc = bdev.open(true).expect("open");
        (reg, bdev, desc, file)
    }

    /// This core's shared ring for `bdev`; panics when the core has none.
    fn core_of(file: &UringFile) -> IoChannel<PerCore> {
        get_io_channel::<PerCore>(file.device, || panic!("no ring for this bdev on this core"))
    }

    fn ring_inflight(file: &UringFile) -> usize {
        ring(&core_of(file)).borrow().queue.inflight()
    }

    /// Polls until `n` completions came back.
    fn collect(ch: &mut BdevChannel, n: usize) -> Vec<BdevIo> {
        let mut out = Vec::with_capacity(n);
        let start = Instant::now();
        while out.len() < n {
            ch.poll(&mut |io| out.push(io));
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "only {} of {n} completions after 30 s",
                out.len()
            );
        }
        out
    }

    fn create_err(reg: &BdevRegistry, opts: &UringOptions) -> String {
        match create(reg, "bad", opts) {
            Ok(b) => panic!("created {b:?} from {opts:?}"),
            Err(e @ BdevError::Create { .. }) => e.to_string(),
            Err(e) => panic!("expected a Create error, got {e:?}"),
        }
    }

    #[test]
    fn create_with_size_makes_the_file_and_reopen_finds_it() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        let reg = BdevRegistry::new();
        let (b, f) = create_inner(&reg, "u0", &sized(&path, 8 * MIB)).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            8 * MIB,
            "file created at the size"
        );
        let info = b.info();
        assert_eq!(
            (info.product, info.block_size, info.num_blocks),
            ("uring", 512, 8 * MIB / 512)
        );
        assert!(info.volatile_write_cache);
        // Through the backend object (Bdev::backend cannot reach it yet, see
        // the report) the accessors read the shared state.
        let ub = UringBdev { file: f };
        assert!(ub.is_direct(), "ext4 takes O_DIRECT");
        assert!(!ub.is_block_device());
        assert_eq!(ub.path(), path);
        assert_eq!(ub.queue_depth(), DEFAULT_QUEUE_DEPTH);
        for t in IoType::ALL {
            assert!(b.supports(t), "files support {}", t.as_str());
        }
        reg.unregister("u0").unwrap();
        drop(b);

        // Reopen without a size: the file's size.
        let b = create(&reg, "u0", &UringOptions::new(&path)).unwrap();
        assert_eq!(b.num_blocks(), 8 * MIB / 512);
        // A smaller size does not shrink the file; a larger one extends it.
        let b1 = create(&reg, "u1", &sized(&path, 4 * MIB)).unwrap();
        assert_eq!(b1.num_blocks(), 8 * MIB / 512);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
        let b2 = create(&reg, "u2", &sized(&path, 16 * MIB)).unwrap();
        assert_eq!(b2.num_blocks(), 16 * MIB / 512);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB);
        // An explicit block size.
        let mut o = UringOptions::new(&path);
        o.block_size = Some(4096);
        let b3 = create(&reg, "u3", &o).unwrap();
        assert_eq!((b3.block_size(), b3.num_blocks()), (4096, 16 * MIB / 4096));
        // The name is taken.
        assert!(matches!(create(&reg, "u3", &o), Err(BdevError::Exists(_))));
    }

    /// `sized`, with preallocation.
    fn preallocated(path: &Path, size: u64) -> UringOptions {
        let mut o = sized(path, size);
        o.preallocate = true;
        o
    }

    /// Bytes of disk space the file at `path` holds (`st_blocks` counts
    /// 512-byte units whatever the filesystem's block size).
    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn preallocate_writes_the_created_file_through_with_zeros() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        let reg = BdevRegistry::new();
        let b = create(&reg, "u0", &preallocated(&path, 8 * MIB)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
        assert_eq!(b.num_blocks(), 8 * MIB / 512);
        let file = File::open(&path).unwrap();
        assert_eq!(
            sys::seek_hole(file.as_raw_fd(), 0).unwrap(),
            Some(8 * MIB),
            "no hole before the end of the file"
        );
        assert!(
            allocated_bytes(&path) >= 8 * MIB,
            "every block allocated: {} bytes",
            allocated_bytes(&path)
        );
        assert_eq!(
            b.allocated_ranges(),
            Some(vec![(0, 8 * MIB / 512)]),
            "allocated_ranges sees the whole file"
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len() as u64, 8 * MIB);
        assert!(on_disk.iter().all(|&x| x == 0), "reads back zeros");
    }

    #[test]
    fn without_preallocate_the_created_file_is_sparse() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        let reg = BdevRegistry::new();
        let b = create(&reg, "u0", &sized(&path, 8 * MIB)).unwrap();
        assert!(!UringOptions::new(&path).preallocate, "off by default");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
        let file = File::open(&path).unwrap();
        assert_eq!(
            sys::seek_hole(file.as_raw_fd(), 0).unwrap(),
            Some(0),
            "one hole from the start"
        );
        assert_eq!(sys::seek_data(file.as_raw_fd(), 0).unwrap(), None);
        assert!(
            allocated_bytes(&path) < MIB,
            "nothing written: {} bytes allocated",
            allocated_bytes(&path)
        );
        assert_eq!(b.allocated_ranges(), Some(vec![]));
    }

    #[test]
    fn preallocate_zero_fills_only_the_extended_tail() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        // An existing 3 MiB file: data in its first MiB and a bit (an odd
        // length, so the tail starts mid-page), then a hole up to 3 MiB.
        let old = pattern(7, (MIB + 100) as usize);
        std::fs::write(&path, &old).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(3 * MIB)
            .unwrap();

        let reg = BdevRegistry::new();
        let b = create(&reg, "u0", &preallocated(&path, 8 * MIB)).unwrap();
        assert_eq!(b.num_blocks(), 8 * MIB / 512);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len() as u64, 8 * MIB);
        assert_eq!(&on_disk[..old.len()], &old[..], "the old bytes are kept");
        assert!(
            on_disk[old.len()..].iter().all(|&x| x == 0),
            "the rest reads back zeros"
        );
        let fd = File::open(&path).unwrap();
        let fd = fd.as_raw_fd();
        let hole = sys::seek_hole(fd, 0).unwrap().unwrap();
        assert!(
            (MIB..3 * MIB).contains(&hole),
            "the old part's hole is left alone (found at {hole})"
        );
        assert_eq!(
            sys::seek_data(fd, 3 * MIB).unwrap(),
            Some(3 * MIB),
            "the new tail is allocated from its start"
        );
        assert_eq!(
            sys::seek_hole(fd, 3 * MIB).unwrap(),
            Some(8 * MIB),
            "and has no hole"
        );
        reg.unregister("u0").unwrap();
        drop(b);

        // A file already at least the size is not written at all.
        let sparse = dir.path().join("sparse.img");
        File::create(&sparse).unwrap().set_len(8 * MIB).unwrap();
        let b = create(&reg, "u1", &preallocated(&sparse, 4 * MIB)).unwrap();
        assert_eq!(b.num_blocks(), 8 * MIB / 512);
        assert_eq!(b.allocated_ranges(), Some(vec![]), "still sparse");
    }

    #[test]
    fn write_then_read_back_at_several_offsets_and_sizes() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, b, desc, _) = open(&sized(&path, 8 * MIB));
            let mut ch = desc.channel().unwrap();
            let nb = b.num_blocks();
            // (offset in blocks, bytes): disjoint ranges, 4 KiB-aligned and not.
            let cases = [
                (0, 4 * KIB),
                (8, 128 * KIB),
                (300, 512),
                (301, 12 * KIB + 512),
                (nb - 9, 4 * KIB),
                (nb - 1, 512),
            ];
            for (i, &(off, len)) in cases.iter().enumerate() {
                let data = pattern(i as u64 + 1, len as usize);
                assert_eq!(
                    write(&mut ch, off, &data),
                    IoStatus::Success,
                    "write {len} B at block {off}"
                );
                assert_eq!(
                    read(&mut ch, off, len / 512).unwrap(),
                    data,
                    "read {len} B at block {off}"
                );
            }
            // Again once everything is written: nothing landed in the wrong place.
            for (i, &(off, len)) in cases.iter().enumerate() {
                let got = read(&mut ch, off, len / 512).unwrap();
                assert!(
                    got == pattern(i as u64 + 1, len as usize),
                    "block {off} changed"
                );
            }
            let untouched = read(&mut ch, 400, 8).unwrap();
            assert!(
                untouched.iter().all(|&x| x == 0),
                "blocks never written read as zero"
            );
            let total: u64 = cases.iter().map(|c| c.1).sum();
            assert_eq!(ch.stats().bytes_written, total);
            assert_eq!(ch.stats().rejected, 0);
        });
    }

    #[test]
    fn data_reaches_the_file_and_survives_reopen() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (reg, b, desc, _) = open(&sized(&path, 4 * MIB));
            let mut ch = desc.channel().unwrap();
            let a = pattern(7, 8 * KIB as usize);
            assert_eq!(write(&mut ch, 16, &a), IoStatus::Success);
            // A FUA write (RWF_DSYNC).
            let f = pattern(8, 4 * KIB as usize);
            let mut io = BdevIo::write(64, 8, DmaBuf::from_slice(&f).unwrap(), 77);
            io.fua = true;
            let io = run_io(&mut ch, io);
            assert_eq!((io.status, io.token), (IoStatus::Success, 77));
            assert_eq!(flush(&mut ch), IoStatus::Success);

            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(on_disk.len() as u64, 4 * MIB);
            assert!(
                on_disk[16 * 512..16 * 512 + a.len()] == a[..],
                "write reached the file"
            );
            assert!(
                on_disk[64 * 512..64 * 512 + f.len()] == f[..],
                "FUA write reached the file"
            );
            assert!(on_disk[..16 * 512].iter().all(|&x| x == 0));

            drop(ch);
            drop(desc);
            reg.unregister("u0").unwrap();
            drop(b);
            let (_reg, _b, desc, _) = open(&UringOptions::new(&path));
            let mut ch = desc.channel().unwrap();
            assert_eq!(read(&mut ch, 16, 16).unwrap(), a, "data survives a reopen");
            assert_eq!(read(&mut ch, 64, 8).unwrap(), f);
        });
    }

    #[test]
    fn unmap_reads_zeros_and_leaves_a_hole() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, b, desc, _) = open(&sized(&path, 8 * MIB));
            let mut ch = desc.channel().unwrap();
            let mib_blocks = MIB / 512;
            assert_eq!(
                b.allocated_ranges(),
                Some(vec![]),
                "a new sparse file holds no data"
            );
            let data: Vec<Vec<u8>> = (0..4).map(|i| pattern(100 + i, MIB as usize)).collect();
            for (i, d) in data.iter().enumerate() {
                assert_eq!(write(&mut ch, i as u64 * mib_blocks, d), IoStatus::Success);
            }
            assert_eq!(flush(&mut ch), IoStatus::Success);
            assert_eq!(b.allocated_ranges(), Some(vec![(0, 4 * mib_blocks)]));

            // Unmap the second MiB.
            assert_eq!(unmap(&mut ch, mib_blocks, mib_blocks), IoStatus::Success);
            assert!(read(&mut ch, mib_blocks, mib_blocks)
                .unwrap()
                .iter()
                .all(|&x| x == 0));
            assert_eq!(
                read(&mut ch, 0, mib_blocks).unwrap(),
                data[0],
                "before the hole intact"
            );
            assert_eq!(
                read(&mut ch, 2 * mib_blocks, mib_blocks).unwrap(),
                data[2],
                "after intact"
            );
            let file = File::open(&path).unwrap();
            assert_eq!(
                sys::seek_hole(file.as_raw_fd(), 0).unwrap(),
                Some(MIB),
                "SEEK_HOLE sees it"
            );
            assert_eq!(
                sys::seek_data(file.as_raw_fd(), MIB).unwrap(),
                Some(2 * MIB)
            );
            assert_eq!(
                b.allocated_ranges(),
                Some(vec![(0, mib_blocks), (2 * mib_blocks, 2 * mib_blocks)]),
                "allocated_ranges leaves the hole out"
            );

            // A sub-page unmap zeroes just its blocks.
            let base = 3 * mib_blocks;
            assert_eq!(unmap(&mut ch, base + 1, 3), IoStatus::Success);
            let got = read(&mut ch, base, 8).unwrap();
            let want = &data[3][..8 * 512];
            assert!(got[..512] == want[..512], "block before the range intact");
            assert!(
                got[512..4 * 512].iter().all(|&x| x == 0),
                "unmapped blocks read zero"
            );
            assert!(
                got[4 * 512..] == want[4 * 512..],
                "blocks after the range intact"
            );
        });
    }

    #[test]
    fn write_zeroes_reads_back_zeros() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, _b, desc, _) = open(&sized(&path, 4 * MIB));
            let mut ch = desc.channel().unwrap();
            let d = pattern(5, 128 * KIB as usize);
            assert_eq!(write(&mut ch, 100, &d), IoStatus::Success);
            assert_eq!(write_zeroes(&mut ch, 108, 64), IoStatus::Success);
            let got = read(&mut ch, 100, 256).unwrap();
            assert!(got[..8 * 512] == d[..8 * 512]);
            assert!(
                got[8 * 512..72 * 512].iter().all(|&x| x == 0),
                "zeroed range reads zero"
            );
            assert!(got[72 * 512..] == d[72 * 512..]);
            assert_eq!(
                write_zeroes(&mut ch, 0, 0),
                IoStatus::Success,
                "empty range"
            );
        });
    }

    #[test]
    fn out_of_range_io_fails() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, b, desc, _) = open(&sized(&path, MIB));
            let mut ch = desc.channel().unwrap();
            let nb = b.num_blocks();
            let oor = IoStatus::Failed(IoError::OutOfRange);
            assert_eq!(read(&mut ch, nb - 1, 2), Err(oor));
            assert_eq!(read(&mut ch, u64::MAX, 1), Err(oor));
            assert_eq!(write(&mut ch, nb, &[0u8; 512]), oor);
            assert_eq!(unmap(&mut ch, nb - 4, 8), oor);
            assert_eq!(write_zeroes(&mut ch, nb + 1, 1), oor);
            assert!(
                read(&mut ch, nb - 1, 1).is_ok(),
                "the last block is in range"
            );
            assert_eq!(ch.inflight(), 0);
        });
    }

    #[test]
    fn many_ios_in_flight_overflow_the_ring_and_all_complete() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let mut opts = sized(&path, 4 * MIB);
            opts.queue_depth = 64;
            let (_reg, _b, desc, uf) = open(&opts);
            let mut ch = desc.channel().unwrap();
            const N: u64 = 512;
            let data = |i: u64| pattern(1000 + i, 4 * KIB as usize);
            for i in 0..N {
                ch.submit(BdevIo::write(
                    i * 8,
                    8,
                    DmaBuf::from_slice(&data(i)).unwrap(),
                    i,
                ));
            }
            // A queue depth of 64 keeps 128 operations in the ring; the rest
            // wait in the channel's overflow queue.
            assert_eq!(ring_inflight(&uf), ring_capacity(64));
            assert_eq!(ch.inflight(), N as usize);
            let done = collect(&mut ch, N as usize);
            let tokens: HashSet<u64> = done.iter().map(|io| io.token).collect();
            assert_eq!(tokens, (0..N).collect(), "every write came back once");
            assert!(done.iter().all(|io| io.status == IoStatus::Success));

            for i in 0..N {
                ch.submit(BdevIo::read(
                    i * 8,
                    8,
                    DmaBuf::alloc(4 * KIB as usize).unwrap(),
                    i,
                ));
            }
            let done = collect(&mut ch, N as usize);
            assert_eq!(done.len(), N as usize);
            for io in done {
                assert_eq!(io.status, IoStatus::Success);
                let buf = io.buf.as_ref().unwrap();
                assert!(
                    buf[..] == data(io.token)[..],
                    "read {} returned other data",
                    io.token
                );
            }
            assert_eq!(ch.inflight(), 0);
            assert_eq!(ring_inflight(&uf), 0);
        });
    }

    #[test]
    fn two_channels_on_one_core_share_a_ring_and_get_their_own_completions() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, _b, desc, uf) = open(&sized(&path, 4 * MIB));
            let mut a = desc.channel().unwrap();
            let mut c = desc.channel().unwrap();
            {
                let core = core_of(&uf);
                assert_eq!(
                    IoChannel::ref_count(&core),
                    3,
                    "both channels and this probe hold one ring"
                );
                assert_eq!(ring(&core).borrow().owners.len(), 2);
            }
            let da = |i: u64| pattern(100 + i, 4096);
            let dc = |i: u64| pattern(200 + i, 4096);
            for i in 0..20 {
                a.submit(BdevIo::write(
                    i * 8,
                    8,
                    DmaBuf::from_slice(&da(i)).unwrap(),
                    100 + i,
                ));
                c.submit(BdevIo::write(
                    1000 + i * 8,
                    8,
                    DmaBuf::from_slice(&dc(i)).unwrap(),
                    200 + i,
                ));
            }
            // Only `c` polls: it reaps everything, and keeps only its own.
            let got = collect(&mut c, 20);
            assert!(
                got.iter().all(|io| (200..220).contains(&io.token)),
                "c got only c's I/O"
            );
            let start = Instant::now();
            while ring_inflight(&uf) > 0 {
                assert_eq!(c.poll(&mut |io| panic!("c got token {}", io.token)), 0);
                assert!(start.elapsed() < Duration::from_secs(30));
            }
            // `a`'s completions were routed to it while `c` polled.
            let mut mine = Vec::new();
            assert_eq!(
                a.poll(&mut |io| mine.push(io)),
                20,
                "a's completions waited for it"
            );
            let tokens: HashSet<u64> = mine.iter().map(|io| io.token).collect();
            assert_eq!(tokens, (100..120).collect());
            assert!(mine.iter().all(|io| io.status == IoStatus::Success));
            // Each reads what the other wrote.
            for i in 0..20 {
                assert_eq!(read(&mut a, 1000 + i * 8, 8).unwrap(), dc(i));
                assert_eq!(read(&mut c, i * 8, 8).unwrap(), da(i));
            }
        });
    }

    #[test]
    fn done_callback_may_submit_to_a_sibling_channel() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, _b, desc, _) = open(&sized(&path, MIB));
            let mut a = desc.channel().unwrap();
            let mut c = desc.channel().unwrap();
            let d = pattern(3, 4096);
            a.submit(BdevIo::write(0, 8, DmaBuf::from_slice(&d).unwrap(), 1));
            let mut forwarded = 0;
            let start = Instant::now();
            while forwarded == 0 {
                a.poll(&mut |io| {
                    assert!(io.status.is_success());
                    // Completing on `a` starts a read on `c`, on the same ring.
                    c.submit(BdevIo::read(0, 8, io.buf.unwrap(), 2));
                    forwarded += 1;
                });
                assert!(start.elapsed() < Duration::from_secs(30));
            }
            let mut back = collect(&mut c, 1);
            let io = back.pop().unwrap();
            assert_eq!((io.token, io.status), (2, IoStatus::Success));
            assert_eq!(io.buf.unwrap()[..], d[..]);
        });
    }

    #[test]
    fn channel_dropped_with_io_in_flight_is_safe() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, _b, desc, uf) = open(&sized(&path, 16 * MIB));
            let mut a = desc.channel().unwrap();
            let mut c = desc.channel().unwrap();
            for i in 0..100 {
                let buf = DmaBuf::from_slice(&pattern(i, 64 * KIB as usize)).unwrap();
                a.submit(BdevIo::write(i * 128, 128, buf, 1000 + i));
            }
            assert_eq!(ring_inflight(&uf), 100);
            drop(a);
            // A channel made now must not inherit a's slot: a's completions
            // would reach it (run_io checks every token it gets back).
            let mut e = desc.channel().unwrap();
            assert_eq!(
                ring(&core_of(&uf)).borrow().owners.len(),
                3,
                "a's slot stays taken"
            );
            let d = pattern(9, 4096);
            assert_eq!(write(&mut e, 30_000, &d), IoStatus::Success);
            assert_eq!(read(&mut e, 30_000, 8).unwrap(), d);
            // `c` polls the ring too: a's completions are discarded.
            assert_eq!(read(&mut c, 30_000, 8).unwrap(), d);
            let start = Instant::now();
            while ring_inflight(&uf) > 0 {
                assert_eq!(c.poll(&mut |io| panic!("stale completion {}", io.token)), 0);
                assert_eq!(e.poll(&mut |io| panic!("stale completion {}", io.token)), 0);
                assert!(start.elapsed() < Duration::from_secs(30));
            }
            assert_eq!(
                ring(&core_of(&uf)).borrow().free_owners,
                vec![0],
                "a's slot is free again"
            );
            // Once a's I/O is gone, a new channel takes its slot and works.
            let mut g = desc.channel().unwrap();
            assert_eq!(ring(&core_of(&uf)).borrow().owners.len(), 3, "slot reused");
            assert_eq!(read(&mut g, 30_000, 8).unwrap(), d);
            drop(g);

            // Drop every channel with I/O in flight: the ring waits for it.
            for i in 0..50 {
                let buf = DmaBuf::from_slice(&pattern(i, 64 * KIB as usize)).unwrap();
                e.submit(BdevIo::write(i * 128, 128, buf, i));
                c.submit(BdevIo::read(
                    i * 128,
                    128,
                    DmaBuf::alloc(64 * KIB as usize).unwrap(),
                    i,
                ));
            }
            drop(e);
            drop(c);
            // The ring is gone with the last channel; a new one works.
            let mut f = desc.channel().unwrap();
            assert_eq!(ring(&core_of(&uf)).borrow().owners.len(), 1, "a fresh ring");
            assert_eq!(read(&mut f, 30_000, 8).unwrap(), d);
        });
    }

    #[test]
    fn each_core_has_its_own_ring() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        let (_reg, b, desc, uf) = open(&sized(&path, 4 * MIB));
        let both = Arc::new(std::sync::Barrier::new(2));
        let workers: Vec<_> = (0..2u64)
            .map(|core| {
                let (desc, uf, both) = (desc.clone(), uf.clone(), both.clone());
                std::thread::spawn(move || {
                    let r = Reactor::new(core as usize, IdlePolicy::Poll);
                    let mut ch = desc.channel().unwrap();
                    // Both cores hold a channel now, each on a ring of its own.
                    both.wait();
                    assert_eq!(ring(&core_of(&uf)).borrow().owners.len(), 1);
                    for i in 0..32 {
                        let d = pattern(core * 1000 + i, 4096);
                        let off = core * 2048 + i * 8;
                        assert_eq!(write(&mut ch, off, &d), IoStatus::Success);
                        assert_eq!(read(&mut ch, off, 8).unwrap(), d);
                    }
                    drop(ch);
                    drop(r);
                    clear_current();
                })
            })
            .collect();
        for w in workers {
            if let Err(p) = w.join() {
                std::panic::resume_unwind(p);
            }
        }
        on_reactor(move || {
            let mut ch = desc.channel().unwrap();
            for core in 0..2u64 {
                for i in 0..32 {
                    let off = core * 2048 + i * 8;
                    assert_eq!(
                        read(&mut ch, off, 8).unwrap(),
                        pattern(core * 1000 + i, 4096)
                    );
                }
            }
            drop(b);
        });
    }

    #[test]
    fn short_transfer_fails_with_eio() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, b, desc, _) = open(&sized(&path, MIB));
            let mut ch = desc.channel().unwrap();
            let nb = b.num_blocks();
            assert_eq!(
                write(&mut ch, nb - 16, &pattern(1, 8192)),
                IoStatus::Success
            );
            // Someone shrinks the file under the bdev by 4 KiB.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(MIB - 4096)
                .unwrap();
            let eio = IoStatus::Failed(IoError::Device(libc::EIO));
            assert_eq!(read(&mut ch, nb - 8, 8), Err(eio), "read at end of file");
            assert_eq!(
                read(&mut ch, nb - 16, 16),
                Err(eio),
                "read half past the end"
            );
            assert_eq!(read(&mut ch, nb - 16, 8).unwrap(), pattern(1, 8192)[..4096]);
        });
    }

    #[test]
    fn block_size_option_is_used() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let mut o = sized(&path, 8 * MIB);
            o.block_size = Some(4096);
            let (_reg, b, desc, _) = open(&o);
            assert_eq!((b.block_size(), b.num_blocks()), (4096, 2048));
            let mut ch = desc.channel().unwrap();
            let d = pattern(4, 8192);
            assert_eq!(write(&mut ch, 2046, &d), IoStatus::Success);
            assert_eq!(read(&mut ch, 2046, 2).unwrap(), d);
            let on_disk = std::fs::read(&path).unwrap();
            assert!(on_disk[2046 * 4096..] == d[..]);
        });
    }

    #[test]
    fn buffered_io_when_direct_is_off() {
        let dir = scratch();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let mut o = sized(&path, 4 * MIB);
            o.direct = false;
            let (_reg, _b, desc, uf) = open(&o);
            assert!(!uf.direct);
            let mut ch = desc.channel().unwrap();
            let d = pattern(6, 64 * KIB as usize);
            assert_eq!(write(&mut ch, 8, &d), IoStatus::Success);
            assert_eq!(read(&mut ch, 8, 128).unwrap(), d);
            assert_eq!(flush(&mut ch), IoStatus::Success);
            assert!(std::fs::read(&path).unwrap()[8 * 512..8 * 512 + d.len()] == d[..]);
        });
    }

    #[test]
    fn tmpfs_works_with_direct_or_the_buffered_fallback() {
        if !Path::new("/dev/shm").is_dir() {
            eprintln!("no /dev/shm: skipped");
            return;
        }
        let dir = tempfile::Builder::new()
            .prefix("hotcopy-uring-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, _b, desc, uf) = open(&sized(&path, 4 * MIB));
            // Older tmpfs refuses O_DIRECT (buffered fallback, with a warning);
            // since Linux 6.6 it accepts it. Either way I/O must work.
            eprintln!("tmpfs direct: {}", uf.direct);
            let mut ch = desc.channel().unwrap();
            let d = pattern(11, 128 * KIB as usize);
            assert_eq!(write(&mut ch, 0, &d), IoStatus::Success);
            assert_eq!(read(&mut ch, 0, 256).unwrap(), d);
            assert_eq!(flush(&mut ch), IoStatus::Success);
            // tmpfs cannot zero a range: write-zeroes falls back to a hole punch.
            assert_eq!(write_zeroes(&mut ch, 8, 8), IoStatus::Success);
            assert!(
                !uf.zero_range.load(Ordering::Relaxed),
                "the zero-range refusal is remembered"
            );
            assert_eq!(write_zeroes(&mut ch, 32, 8), IoStatus::Success);
            assert_eq!(unmap(&mut ch, 64, 64), IoStatus::Success);
            let got = read(&mut ch, 0, 256).unwrap();
            for blk in 0..256usize {
                let zero =
                    (8..16).contains(&blk) || (32..40).contains(&blk) || (64..128).contains(&blk);
                let want: &[u8] = if zero {
                    &[0; 512]
                } else {
                    &d[blk * 512..(blk + 1) * 512]
                };
                assert!(got[blk * 512..(blk + 1) * 512] == *want, "block {blk}");
            }
        });
    }

    /// Needs a filesystem that refuses `O_DIRECT` (ramfs; tmpfs before Linux
    /// 6.6): set `HOTCOPY_TEST_NODIRECT_DIR` to a directory on one, e.g.
    /// `mount -t ramfs ramfs /mnt/nodirect`.
    #[test]
    fn refused_o_direct_falls_back_to_buffered_io() {
        let Some(dir) = std::env::var_os("HOTCOPY_TEST_NODIRECT_DIR") else {
            eprintln!("HOTCOPY_TEST_NODIRECT_DIR not set: skipped");
            return;
        };
        let dir = tempfile::Builder::new()
            .prefix("hotcopy-uring-")
            .tempdir_in(dir)
            .unwrap();
        let path = dir.path().join("disk.img");
        on_reactor(move || {
            let (_reg, _b, desc, uf) = open(&sized(&path, MIB));
            assert!(!uf.direct, "O_DIRECT was refused: buffered I/O");
            let mut ch = desc.channel().unwrap();
            let d = pattern(12, 8 * KIB as usize);
            assert_eq!(write(&mut ch, 3, &d), IoStatus::Success);
            assert_eq!(flush(&mut ch), IoStatus::Success);
            assert_eq!(read(&mut ch, 3, 16).unwrap(), d);
        });
    }

    #[test]
    fn bad_paths_and_options_fail_with_clear_errors() {
        let dir = scratch();
        let reg = BdevRegistry::new();
        let missing = dir.path().join("missing.img");
        let e = create_err(&reg, &UringOptions::new(&missing));
        assert!(
            e.contains(&*missing.to_string_lossy()) && e.contains("does not exist"),
            "{e}"
        );
        assert!(!missing.exists());

        let e = create_err(&reg, &UringOptions::new(dir.path()));
        assert!(
            e.contains(&*dir.path().to_string_lossy()) && e.contains("directory"),
            "{e}"
        );
        let e = create_err(&reg, &sized(dir.path(), MIB));
        assert!(e.contains("directory"), "{e}");

        let e = create_err(&reg, &UringOptions::new("/dev/null"));
        assert!(
            e.contains("/dev/null") && e.contains("not a regular file or block device"),
            "{e}"
        );

        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let e = create_err(&reg, &UringOptions::new(&empty));
        assert!(e.contains("size zero"), "{e}");
        let e = create_err(&reg, &sized(&empty, 0));
        assert!(e.contains("size zero"), "{e}");

        let tiny = dir.path().join("tiny.img");
        std::fs::write(&tiny, [1u8; 100]).unwrap();
        let e = create_err(&reg, &UringOptions::new(&tiny));
        assert!(e.contains("less than one 512-byte block"), "{e}");

        let img = dir.path().join("disk.img");
        for bs in [256, 1000, 131072] {
            let mut o = sized(&img, MIB);
            o.block_size = Some(bs);
            let e = create_err(&reg, &o);
            assert!(e.contains(&format!("block size {bs}")), "{e}");
        }
        let mut o = sized(&img, MIB);
        o.queue_depth = 0;
        assert!(create_err(&reg, &o).contains("queue depth 0"));
        assert!(reg.names().is_empty());
    }

    /// A loop device over a scratch file, detached on drop.
    struct Loop(String);

    impl Loop {
        fn attach(backing: &Path) -> Option<Loop> {
            let out = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(backing)
                .output()
                .ok()?;
            let dev = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (out.status.success() && !dev.is_empty()).then_some(Loop(dev))
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn block_device_through_a_loop_device() {
        let dir = scratch();
        let backing = dir.path().join("backing.img");
        File::create(&backing).unwrap().set_len(16 * MIB).unwrap();
        let Some(lo) = Loop::attach(&backing) else {
            eprintln!("cannot attach a loop device (needs root): skipped");
            return;
        };
        let dev = PathBuf::from(&lo.0);
        let reg = BdevRegistry::new();
        let e = create_err(&reg, &sized(&dev, 32 * MIB));
        assert!(e.contains("less than"), "a block device cannot grow: {e}");
        let (reg2, b, desc, uf) = open(&UringOptions::new(&dev));
        assert_eq!((b.block_size(), b.num_blocks()), (512, 16 * MIB / 512));
        assert!(uf.block_device);
        assert!(!b.supports(IoType::Unmap) && !b.supports(IoType::WriteZeroes));
        assert_eq!(b.allocated_ranges(), None);
        on_reactor(move || {
            let mut ch = desc.channel().unwrap();
            let d = pattern(21, 64 * KIB as usize);
            assert_eq!(write(&mut ch, 1024, &d), IoStatus::Success);
            assert_eq!(flush(&mut ch), IoStatus::Success);
            assert_eq!(read(&mut ch, 1024, 128).unwrap(), d);
            assert_eq!(unmap(&mut ch, 0, 8), IoStatus::Failed(IoError::Unsupported));
            assert_eq!(
                write_zeroes(&mut ch, 0, 8),
                IoStatus::Failed(IoError::Unsupported)
            );
        });
        drop((reg2, b));
        drop(lo);
        let on_disk = std::fs::read(&backing).unwrap();
        assert!(on_disk[1024 * 512..1024 * 512 + 64 * 1024] == pattern(21, 64 * 1024)[..]);
    }
}
