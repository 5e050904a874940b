//! The I/O request that travels through the bdev stack.
//!
//! A [`BdevIo`] is submitted to a channel and comes back, by value, from that
//! channel's `poll` with its status set. It owns its data buffer for the whole
//! trip, so no module can see a buffer freed under it, and nothing is allocated
//! per I/O. The `token` is the submitter's: modules pass it through untouched
//! (a virtual bdev that issues I/O of its own swaps in a token of its own and
//! restores the caller's before completing).
//!
//! The I/O also carries the submit times of the channels it is in (see
//! [`crate::stats`]): each [`BdevChannel`](crate::BdevChannel) pushes one in
//! `submit` and pops it when the I/O comes back from its `poll`. Modules never
//! touch them.

use hotcopy_runtime::DmaBuf;

use crate::stats::STAMP_DEPTH;

/// The operation a [`BdevIo`] performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoType {
    Read = 0,
    Write = 1,
    Flush = 2,
    Unmap = 3,
    WriteZeroes = 4,
}

impl IoType {
    pub const ALL: [IoType; 5] = [
        IoType::Read,
        IoType::Write,
        IoType::Flush,
        IoType::Unmap,
        IoType::WriteZeroes,
    ];

    /// Whether the operation changes the device (and so needs a writable descriptor).
    pub fn is_mutating(self) -> bool {
        !matches!(self, IoType::Read)
    }

    /// Whether the operation moves data through a buffer.
    pub fn needs_buffer(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
        }
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Why an I/O failed. Small and `Copy`: the data path completes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("I/O beyond the end of the device")]
    OutOfRange,
    #[error("missing or too small data buffer")]
    BadBuffer,
    #[error("operation not supported by this bdev")]
    Unsupported,
    #[error("descriptor is read-only")]
    ReadOnly,
    #[error("device error (errno {0})")]
    Device(i32),
    #[error("injected fault")]
    Injected,
    #[error("device lost power")]
    PowerLoss,
    #[error("aborted")]
    Aborted,
}

/// Completion status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Pending,
    Success,
    Failed(IoError),
}

impl IoStatus {
    pub fn is_success(self) -> bool {
        self == IoStatus::Success
    }
}

/// One I/O request. See the module docs.
#[derive(Debug)]
pub struct BdevIo {
    pub io_type: IoType,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks (for flush: the range to make durable).
    pub num_blocks: u64,
    /// Data for reads and writes: at least `num_blocks * block_size` bytes.
    pub buf: Option<DmaBuf>,
    /// The submitter's identifier, returned unchanged.
    pub token: u64,
    /// Scratch for the virtual bdev the I/O is submitted to: it may set
    /// this on submit and read it back on completion. The bdevs below pass
    /// it through untouched. (The cow bdev marks each write it counts with
    /// the consistency points it has seen.)
    pub tag: u64,
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
    pub status: IoStatus,
    /// Submit times (TSC ticks) of the channels the I/O is in, outermost
    /// first; `stamp_depth` may exceed `STAMP_DEPTH` (deeper ones untimed).
    stamps: [u64; STAMP_DEPTH],
    stamp_depth: u8,
}

impl BdevIo {
    pub fn new(io_type: IoType, offset_blocks: u64, num_blocks: u64, token: u64) -> Self {
        BdevIo {
            io_type,
            offset_blocks,
            num_blocks,
            buf: None,
            token,
            tag: 0,
            fua: false,
            status: IoStatus::Pending,
            stamps: [0; STAMP_DEPTH],
            stamp_depth: 0,
        }
    }

    pub fn read(offset_blocks: u64, num_blocks: u64, buf: DmaBuf, token: u64) -> Self {
        BdevIo {
            buf: Some(buf),
            ..Self::new(IoType::Read, offset_blocks, num_blocks, token)
        }
    }

    pub fn write(offset_blocks: u64, num_blocks: u64, buf: DmaBuf, token: u64) -> Self {
        BdevIo {
            buf: Some(buf),
            ..Self::new(IoType::Write, offset_blocks, num_blocks, token)
        }
    }

    /// Flush of the whole device: every completed write becomes durable.
    pub fn flush(token: u64) -> Self {
        Self::new(IoType::Flush, 0, 0, token)
    }

    pub fn unmap(offset_blocks: u64, num_blocks: u64, token: u64) -> Self {
        Self::new(IoType::Unmap, offset_blocks, num_blocks, token)
    }

    pub fn write_zeroes(offset_blocks: u64, num_blocks: u64, token: u64) -> Self {
        Self::new(IoType::WriteZeroes, offset_blocks, num_blocks, token)
    }

    /// Sets the status and hands the I/O back (for modules).
    #[inline]
    pub fn complete(mut self, status: IoStatus) -> Self {
        self.status = status;
        self
    }

    /// Records that a channel took the I/O at `ticks`.
    #[inline]
    pub(crate) fn push_stamp(&mut self, ticks: u64) {
        let d = self.stamp_depth as usize;
        if d < STAMP_DEPTH {
            self.stamps[d] = ticks;
        }
        self.stamp_depth = self.stamp_depth.saturating_add(1);
    }

    /// The submit time of the innermost channel the I/O is in, which it is
    /// leaving; `None` when that channel is too deep to be timed, or when the
    /// I/O never went through its `submit` (a module completed another one).
    #[inline]
    pub(crate) fn pop_stamp(&mut self) -> Option<u64> {
        let d = self.stamp_depth.checked_sub(1)?;
        self.stamp_depth = d;
        self.stamps.get(d as usize).copied()
    }

    /// Takes the buffer back out of a completed I/O.
    pub fn take_buf(&mut self) -> Option<DmaBuf> {
        self.buf.take()
    }
}
