//! Synchronous block I/O for the repository's control path.
//!
//! [`BlockIo`] is what the repository needs from a device: block-aligned
//! reads and writes at byte offsets, and a flush that makes every completed
//! write durable. [`ChannelIo`] implements it over a bdev channel by
//! submitting one request at a time and spinning the channel's `poll` (so it
//! belongs on a reactor thread that has nothing else to do meanwhile, or in an
//! offline tool, never inside a poller). [`MemIo`] keeps the device in a
//! `Vec`, for unit tests and tools.

use std::time::{Duration, Instant};

use hotcopy_bdev::{BdevChannel, BdevIo, IoError, IoStatus};
use hotcopy_runtime::DmaBuf;

use super::error::{RepoError, Result};

/// Largest single request [`ChannelIo`] submits; longer reads and writes are
/// split. 4 MiB keeps a sequential stream efficient on every backend while
/// bounding the one scratch buffer the channel keeps.
pub const MAX_IO_BYTES: usize = 4 << 20;

/// How long [`ChannelIo`] waits for one request before it fails the
/// operation with [`RepoError::Stalled`] (a device that never answers must
/// fail a backup's commit, not hang or panic the thread that waits).
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A block device as the repository uses it. Offsets and lengths are in
/// bytes and must be multiples of [`BlockIo::block_size`].
pub trait BlockIo {
    /// The device's block size in bytes.
    fn block_size(&self) -> u32;
    /// The device's size in bytes.
    fn size_bytes(&self) -> u64;
    /// Fills `buf` from byte `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at byte `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes every write that completed before this call durable.
    fn flush(&mut self) -> Result<()>;
}

/// Checks that `len` bytes at `offset` are block-aligned and on the device.
pub fn check_range(io: &dyn BlockIo, what: &'static str, offset: u64, len: u64) -> Result<()> {
    let bs = io.block_size();
    if !offset.is_multiple_of(bs as u64) || !len.is_multiple_of(bs as u64) {
        return Err(RepoError::Unaligned {
            what,
            offset,
            len,
            block_size: bs,
        });
    }
    let size = io.size_bytes();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(RepoError::OutOfRange {
            what,
            offset,
            len,
            size,
        }),
    }
}

/// [`BlockIo`] over a bdev channel (see the module docs).
pub struct ChannelIo {
    ch: BdevChannel,
    /// Reused for every request; grown on demand up to [`MAX_IO_BYTES`].
    scratch: Option<DmaBuf>,
    /// The token of the last request: a completion with another token is
    /// one of a request given up on (see [`IO_TIMEOUT`]), and is dropped.
    token: u64,
    timeout: Duration,
}

impl ChannelIo {
    pub fn new(ch: BdevChannel) -> Self {
        Self::with_timeout(ch, IO_TIMEOUT)
    }

    /// With another limit than the default (60 s) on each request.
    pub fn with_timeout(ch: BdevChannel, timeout: Duration) -> Self {
        ChannelIo {
            ch,
            scratch: None,
            token: 0,
            timeout,
        }
    }

    /// The channel, for I/O the repository does not do.
    pub fn channel_mut(&mut self) -> &mut BdevChannel {
        &mut self.ch
    }

    pub fn into_inner(self) -> BdevChannel {
        self.ch
    }

    /// A buffer of exactly `len` bytes (`len <= MAX_IO_BYTES`).
    fn buffer(&mut self, len: usize) -> Result<DmaBuf> {
        let mut buf = match self.scratch.take() {
            Some(b) if b.capacity() >= len => b,
            _ => DmaBuf::alloc(len).map_err(|source| RepoError::Buffer { len, source })?,
        };
        buf.set_len(len);
        Ok(buf)
    }

    fn run(&mut self, mut io: BdevIo, op: &'static str, offset: u64) -> Result<Option<DmaBuf>> {
        let len = io.num_blocks * self.ch.block_size() as u64;
        self.token = self.token.wrapping_add(1);
        let token = self.token;
        io.token = token;
        self.ch.submit(io);
        let start = Instant::now();
        let mut out = None;
        loop {
            // A completion with another token belongs to a request given up
            // on earlier: it has landed now, and is dropped with its buffer.
            self.ch.poll(&mut |done| {
                if done.token == token {
                    out = Some(done);
                }
            });
            if out.is_some() {
                break;
            }
            if start.elapsed() >= self.timeout {
                return Err(RepoError::Stalled {
                    op,
                    offset,
                    len,
                    ms: self.timeout.as_millis() as u64,
                });
            }
            std::hint::spin_loop();
        }
        let mut done = out.expect("the loop ends with a completion");
        let buf = done.take_buf();
        let source = match done.status {
            IoStatus::Success => return Ok(buf),
            IoStatus::Failed(e) => e,
            // A module that hands back an unfinished request has failed it.
            IoStatus::Pending => IoError::Aborted,
        };
        self.scratch = buf;
        Err(RepoError::Io {
            op,
            offset,
            len,
            source,
        })
    }
}

impl BlockIo for ChannelIo {
    fn block_size(&self) -> u32 {
        self.ch.block_size()
    }

    fn size_bytes(&self) -> u64 {
        self.ch.num_blocks() * self.ch.block_size() as u64
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self, "read", offset, buf.len() as u64)?;
        let bs = self.ch.block_size() as u64;
        for (i, piece) in buf.chunks_mut(MAX_IO_BYTES).enumerate() {
            let off = offset + (i * MAX_IO_BYTES) as u64;
            let dma = self.buffer(piece.len())?;
            let io = BdevIo::read(off / bs, piece.len() as u64 / bs, dma, 0);
            let dma = self.run(io, "read", off)?;
            if let Some(dma) = dma {
                piece.copy_from_slice(&dma[..piece.len()]);
                self.scratch = Some(dma);
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(self, "write", offset, data.len() as u64)?;
        let bs = self.ch.block_size() as u64;
        for (i, piece) in data.chunks(MAX_IO_BYTES).enumerate() {
            let off = offset + (i * MAX_IO_BYTES) as u64;
            let mut dma = self.buffer(piece.len())?;
            dma.copy_from_slice(piece);
            let io = BdevIo::write(off / bs, piece.len() as u64 / bs, dma, 0);
            self.scratch = self.run(io, "write", off)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.run(BdevIo::flush(0), "flush", 0).map(|_| ())
    }
}

/// [`BlockIo`] over memory: a device of `data.len()` bytes whose writes are
/// durable at once.
#[derive(Debug, Clone)]
pub struct MemIo {
    pub data: Vec<u8>,
    pub block_size: u32,
}

impl MemIo {
    /// A zeroed device of `size` bytes with `block_size`-byte blocks.
    pub fn new(size: u64, block_size: u32) -> Self {
        MemIo {
            data: vec![0; size as usize],
            block_size,
        }
    }
}

impl BlockIo for MemIo {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn size_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self, "read", offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(self, "write", offset, data.len() as u64)?;
        let o = offset as usize;
        self.data[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}
