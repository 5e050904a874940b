//! The one place that turns configuration into bdevs.
//!
//! Adding a module:
//! 1. write `modules/<name>.rs` with a `create(reg, name, …)` function that
//!    registers the bdev (virtual bdevs claim their base there);
//! 2. add its variant to `hotcopy_config::BdevConfig` (and the spec grammar);
//! 3. add its arm to [`create_one`] below (modules of other crates, like the
//!    cow module, are linked here, in the binary that uses them all);
//! 4. cover it in `tests/` (read, write, flush, unmap with data verification).

use hotcopy_bdev::modules::{fault, malloc, null, passthru, uring};
use hotcopy_bdev::{Bdev, BdevError, BdevRegistry};
use hotcopy_config::{BaseRef, BdevConfig, Config};

/// Creates `name` from `cfg`, creating inline bases first (an inline base of
/// `name` is registered as `name.base`, its own inline base as
/// `name.base.base`, and so on). Named bases must already exist.
pub fn create_one(reg: &BdevRegistry, name: &str, cfg: &BdevConfig) -> Result<Bdev, BdevError> {
    let base_name = |base: &BaseRef| -> Result<String, BdevError> {
        match base {
            BaseRef::Name(n) => Ok(n.clone()),
            BaseRef::Inline(inner) => {
                let n = format!("{name}.base");
                create_one(reg, &n, inner)?;
                Ok(n)
            }
        }
    };
    match cfg {
        BdevConfig::Null { size, block_size } => null::create(reg, name, size.0, *block_size),
        BdevConfig::Malloc { size, block_size } => malloc::create(reg, name, size.0, *block_size),
        BdevConfig::Uring {
            path,
            size,
            block_size,
            direct,
            preallocate,
        } => {
            let mut opts = uring::UringOptions::new(path.clone());
            opts.size = size.map(|s| s.0);
            opts.block_size = *block_size;
            opts.direct = *direct;
            opts.preallocate = *preallocate;
            uring::create(reg, name, &opts)
        }
        BdevConfig::Passthru { base } => {
            let base = base_name(base)?;
            passthru::create(reg, name, &base)
        }
        BdevConfig::Cow { base } => {
            let base = base_name(base)?;
            hotcopy_cow::create(reg, name, &base)
        }
        BdevConfig::Fault {
            base,
            read_error_rate,
            write_error_rate,
            latency_us,
            volatile_cache,
        } => {
            let base = base_name(base)?;
            let opts = fault::FaultOptions {
                read_error_rate: *read_error_rate,
                write_error_rate: *write_error_rate,
                latency_us: *latency_us,
                volatile_cache: *volatile_cache,
                seed: 0,
            };
            fault::create(reg, name, &base, opts).map(|(b, _)| b)
        }
    }
}

/// Creates every bdev of a config, bases before the bdevs stacked on them.
pub fn create_all(reg: &BdevRegistry, cfg: &Config) -> Result<Vec<Bdev>, BdevError> {
    cfg.build_order()
        .into_iter()
        .map(|b| create_one(reg, &b.name, &b.bdev))
        .collect()
}
