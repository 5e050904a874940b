//! `passthru`: the reference virtual bdev.
//!
//! It claims its base and forwards every I/O unchanged. It exists to measure
//! (and keep small) the cost of stacking one bdev on another, and as the
//! template for virtual bdev modules: claim the base, open it through the
//! claim, and create a base channel inside each of your own channels.

use crate::bdev::{
    BackendChannel, BdevBackend, BdevChannel, BdevDesc, BdevInfo, BdevRegistry, Claim,
};
use crate::io::{BdevIo, IoType};
use crate::{Bdev, BdevError};

pub struct PassthruBdev {
    base: BdevDesc,
    _claim: Claim,
}

impl BdevBackend for PassthruBdev {
    fn supports(&self, io_type: IoType) -> bool {
        self.base.bdev().supports(io_type)
    }

    fn create_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(PassthruChannel {
            base: self.base.channel()?,
        }))
    }

    fn allocated_ranges(&self) -> Option<Vec<(u64, u64)>> {
        self.base.bdev().allocated_ranges()
    }
}

struct PassthruChannel {
    base: BdevChannel,
}

impl BackendChannel for PassthruChannel {
    #[inline]
    fn submit(&mut self, io: BdevIo) {
        self.base.submit(io);
    }

    #[inline]
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        self.base.poll(done)
    }
}

/// Creates `name` on top of the bdev `base`, claiming it.
pub fn create(reg: &BdevRegistry, name: &str, base: &str) -> Result<Bdev, BdevError> {
    let base_bdev = reg.lookup(base)?;
    let claim = base_bdev.claim(name)?;
    let b = claim.bdev().info();
    let mut info = BdevInfo::new(name, "passthru", b.block_size, b.num_blocks);
    info.volatile_write_cache = b.volatile_write_cache;
    let desc = claim.open();
    reg.register(
        info,
        PassthruBdev {
            base: desc,
            _claim: claim,
        },
    )
}
