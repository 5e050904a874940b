//! Helpers for tests and tools that drive a channel synchronously.
//!
//! They spin the channel's `poll` on the calling thread, so they suit tests
//! (on a reactor created by the test) and offline tools. Never call them from a
//! poller: they wait.

use std::time::{Duration, Instant};

use hotcopy_runtime::DmaBuf;

use crate::{BdevChannel, BdevIo, IoStatus};

/// How long [`run_io`] waits before declaring an I/O lost.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Submits `io` and polls until it comes back; panics if it never does.
pub fn run_io(ch: &mut BdevChannel, io: BdevIo) -> BdevIo {
    let token = io.token;
    ch.submit(io);
    let start = Instant::now();
    let mut out = None;
    while out.is_none() {
        ch.poll(&mut |done| {
            assert_eq!(
                done.token, token,
                "completion for a request that was not submitted"
            );
            out = Some(done);
        });
        if out.is_none() {
            assert!(
                start.elapsed() < IO_TIMEOUT,
                "I/O (token {token}) did not complete in {IO_TIMEOUT:?}"
            );
            std::hint::spin_loop();
        }
    }
    out.expect("loop exits with a completion")
}

/// Writes `data` at `offset_blocks`; returns the status.
pub fn write(ch: &mut BdevChannel, offset_blocks: u64, data: &[u8]) -> IoStatus {
    let bs = ch.block_size() as usize;
    let buf = DmaBuf::from_slice(data).expect("map buffer");
    run_io(
        ch,
        BdevIo::write(offset_blocks, (data.len() / bs) as u64, buf, 1),
    )
    .status
}

/// Reads `num_blocks` at `offset_blocks`; returns the data or the failed status.
pub fn read(
    ch: &mut BdevChannel,
    offset_blocks: u64,
    num_blocks: u64,
) -> Result<Vec<u8>, IoStatus> {
    let len = num_blocks as usize * ch.block_size() as usize;
    let buf = DmaBuf::alloc(len).expect("map buffer");
    let mut io = run_io(ch, BdevIo::read(offset_blocks, num_blocks, buf, 2));
    if io.status.is_success() {
        Ok(io.take_buf().map(|b| b.to_vec()).unwrap_or_default())
    } else {
        Err(io.status)
    }
}

/// Runs a flush; returns the status.
pub fn flush(ch: &mut BdevChannel) -> IoStatus {
    run_io(ch, BdevIo::flush(3)).status
}

/// Runs an unmap; returns the status.
pub fn unmap(ch: &mut BdevChannel, offset_blocks: u64, num_blocks: u64) -> IoStatus {
    run_io(ch, BdevIo::unmap(offset_blocks, num_blocks, 4)).status
}

/// Runs a write-zeroes; returns the status.
pub fn write_zeroes(ch: &mut BdevChannel, offset_blocks: u64, num_blocks: u64) -> IoStatus {
    run_io(ch, BdevIo::write_zeroes(offset_blocks, num_blocks, 5)).status
}

/// Deterministic test data: each byte depends on `seed` and its position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
