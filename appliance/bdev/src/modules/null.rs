//! `null`: a bdev that completes every I/O at once and stores nothing.
//!
//! It measures the cost of the bdev layer itself. Reads leave the buffer as it
//! was. Completions are queued and returned by the next `poll`, like SPDK's
//! null bdev, so a submitter never re-enters itself.

use std::collections::VecDeque;

use crate::bdev::{BackendChannel, BdevBackend, BdevInfo, BdevRegistry};
use crate::io::{BdevIo, IoStatus, IoType};
use crate::{Bdev, BdevError};

/// Completions a channel can hold before its queue grows (it never needs to
/// at queue depths up to this).
const QUEUE_HINT: usize = 1024;

pub struct NullBdev;

impl BdevBackend for NullBdev {
    fn supports(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(NullChannel {
            done: VecDeque::with_capacity(QUEUE_HINT),
        }))
    }
}

struct NullChannel {
    done: VecDeque<BdevIo>,
}

impl BackendChannel for NullChannel {
    #[inline]
    fn submit(&mut self, io: BdevIo) {
        self.done.push_back(io.complete(IoStatus::Success));
    }

    #[inline]
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        crate::bdev::deliver(&mut self.done, done)
    }
}

/// Creates and registers a null bdev of `size_bytes` (rounded down to blocks).
pub fn create(
    reg: &BdevRegistry,
    name: &str,
    size_bytes: u64,
    block_size: u32,
) -> Result<Bdev, BdevError> {
    let info = BdevInfo::new(
        name,
        "null",
        block_size,
        size_bytes / block_size.max(1) as u64,
    );
    reg.register(info, NullBdev)
}
