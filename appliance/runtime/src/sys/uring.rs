//! A polled io_uring queue pair that owns what it hands to the kernel.
//!
//! Submission queue entries point into buffers; the kernel may touch those
//! buffers until the matching completion is reaped. The queue therefore takes
//! ownership of each operation's context (which owns its [`DmaBuf`]) at `push`
//! and gives it back only from `reap`, and `Drop` waits for every operation in
//! flight before the buffers can be freed. That is what makes the API safe.
//!
//! Submissions are batched: `push` only fills the submission ring; `flush`
//! makes one `io_uring_enter` for everything pushed since the last flush.
//! Reaping reads the completion ring from shared memory with no syscall.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

use crate::sys::dma::DmaBuf;

/// What a queued operation carries: the buffer (if any) the kernel reads or fills.
pub trait UringCtx {
    fn dma_buf(&mut self) -> Option<&mut DmaBuf>;
}

/// One operation for the queue.
#[derive(Debug, Clone, Copy)]
pub enum UringOp {
    /// Read `len` bytes at `offset` into the context's buffer.
    Read { offset: u64, len: u32 },
    /// Write `len` bytes at `offset` from the context's buffer.
    Write { offset: u64, len: u32, fua: bool },
    /// `fdatasync` the file.
    Fsync,
    /// `fallocate(mode, offset, len)`: hole punch or zero range.
    Fallocate { offset: u64, len: u64, mode: i32 },
}

/// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate, keep the size.
pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`: read as zero, stay allocated.
pub const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Errors from pushing an operation.
#[derive(Debug)]
pub enum PushError<T> {
    /// The context has no buffer, or a buffer shorter than the operation.
    BadBuffer(T),
}

pub struct UringQueue<T: UringCtx> {
    ring: IoUring,
    fd: RawFd,
    /// In-flight contexts, indexed by the SQE's user_data.
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    unsubmitted: u32,
    /// `flush` calls in a row that had nothing to hand to the kernel while
    /// I/O was in flight.
    quiet_polls: u32,
}

/// See [`UringQueue::flush`]: empty polls before a precautionary enter.
pub const QUIET_POLLS: u32 = 32;
/// `IORING_ENTER_GETEVENTS`.
const GETEVENTS: u32 = 1;

impl<T: UringCtx> UringQueue<T> {
    /// Creates a ring of `depth` entries (rounded up to a power of two by the
    /// kernel) for operations on `fd`. The caller keeps `fd` open for the life
    /// of the queue.
    pub fn new(fd: RawFd, depth: u32) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096).next_power_of_two();
        // COOP_TASKRUN + TASKRUN_FLAG: the kernel does not interrupt a busy
        // polling reactor to post completions; it raises a flag in the shared
        // ring instead, and `flush` enters the kernel when it sees it. Older
        // kernels lack the flags: fall back to a plain ring.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(depth)
            .or_else(|_| IoUring::builder().setup_single_issuer().build(depth))
            .or_else(|_| IoUring::new(depth))?;
        let cap = depth as usize * 2;
        Ok(UringQueue {
            ring,
            fd,
            slots: (0..cap).map(|_| None).collect(),
            free: (0..cap as u32).rev().collect(),
            unsubmitted: 0,
            quiet_polls: 0,
        })
    }

    /// Operations pushed and not yet reaped.
    pub fn inflight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another operation can be pushed without waiting.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queues one operation; it is handed to the kernel at the next `flush`.
    /// When the queue is full the caller must reap first (`has_room`).
    pub fn push(&mut self, op: UringOp, mut ctx: T) -> Result<(), PushError<T>> {
        let Some(slot) = self.free.last().copied() else {
            // Callers check `has_room`; reaching this means a logic error upstream.
            panic!("uring queue overfilled: check has_room() before push");
        };
        let fd = types::Fd(self.fd);
        let entry = match op {
            UringOp::Read { offset, len } => {
                let Some(buf) = ctx.dma_buf().filter(|b| b.len() >= len as usize) else {
                    return Err(PushError::BadBuffer(ctx));
                };
                opcode::Read::new(fd, buf.as_mut_ptr(), len)
                    .offset(offset)
                    .build()
            }
            UringOp::Write { offset, len, fua } => {
                let Some(buf) = ctx.dma_buf().filter(|b| b.len() >= len as usize) else {
                    return Err(PushError::BadBuffer(ctx));
                };
                let mut w = opcode::Write::new(fd, buf.as_ptr(), len).offset(offset);
                if fua {
                    w = w.rw_flags(libc::RWF_DSYNC);
                }
                w.build()
            }
            UringOp::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            UringOp::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
        .user_data(slot as u64);
        if self.ring.submission().is_full() {
            // Hand what is queued to the kernel to make room; completions stay
            // in the completion ring until reaped.
            let _ = self.ring.submit();
            self.unsubmitted = 0;
        }
        // SAFETY: the entry points into `ctx`'s DmaBuf (or no memory at all).
        // We store `ctx` in `slots[slot]` below and only give it back from
        // `reap` after the kernel has posted the completion for `slot`, and
        // `Drop` waits for all completions, so the buffer outlives the I/O.
        // DmaBuf memory does not move when the DmaBuf value moves.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }
                .expect("submission queue has room right after submit");
        }
        self.free.pop();
        self.slots[slot as usize] = Some(ctx);
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands every pushed operation to the kernel: one syscall per batch.
    /// Also enters the kernel, with nothing to submit, when the ring flags
    /// completion work it is waiting to run for us (`IORING_SQ_TASKRUN`).
    /// As a safety net, with I/O in flight and no reason to enter seen for
    /// [`QUIET_POLLS`] calls, it enters with `GETEVENTS` anyway, so that a
    /// completion the kernel holds without raising the flag is never stuck.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 && self.inflight() > 0 && !self.ring.submission().taskrun() {
            self.quiet_polls += 1;
            if self.quiet_polls >= QUIET_POLLS && self.ring.completion().is_empty() {
                self.quiet_polls = 0;
                // SAFETY: an enter that submits nothing and waits for nothing
                // (min_complete 0, no argument) only runs pending completion
                // work; no memory is handed to the kernel.
                unsafe {
                    self.ring
                        .submitter()
                        .enter::<libc::sigset_t>(0, 0, GETEVENTS, None)?;
                }
            }
            return Ok(());
        }
        self.quiet_polls = 0;
        if self.unsubmitted > 0 || (self.inflight() > 0 && self.ring.submission().taskrun()) {
            let r = self.ring.submit();
            // Entries the kernel did not take stay queued for the next flush.
            self.unsubmitted = self.ring.submission().len() as u32;
            r?;
        }
        Ok(())
    }

    /// Calls `f(ctx, result)` for each posted completion (result is the
    /// syscall-style return: bytes or `-errno`). No syscall.
    pub fn reap(&mut self, mut f: impl FnMut(T, i32)) -> usize {
        let mut n = 0;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let slot = cqe.user_data() as usize;
            if let Some(ctx) = self.slots.get_mut(slot).and_then(Option::take) {
                self.free.push(slot as u32);
                n += 1;
                f(ctx, cqe.result());
            }
        }
        n
    }

    /// Blocks until at least `want` completions are posted (control path and drop only).
    pub fn wait(&mut self, want: usize) -> io::Result<()> {
        self.unsubmitted = 0;
        self.ring.submit_and_wait(want)?;
        Ok(())
    }
}

impl<T: UringCtx> Drop for UringQueue<T> {
    fn drop(&mut self) {
        // The kernel may still write into buffers owned by in-flight contexts:
        // wait for every completion before those buffers can be released.
        while self.inflight() > 0 {
            match self.wait(1) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The ring is unusable: leak what is in flight rather than
                    // free memory the kernel may still write to.
                    for slot in self.slots.iter_mut() {
                        if let Some(ctx) = slot.take() {
                            std::mem::forget(ctx);
                        }
                    }
                    return;
                }
            }
            self.reap(|_, _| {});
        }
    }
}
