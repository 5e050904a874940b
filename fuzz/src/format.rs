//! The repository's on-disk format module, compiled here from its source.
//!
//! `hotcopy_cow::repo::format` is private to its crate (the public API is
//! `Repo`), so the decoders cannot be called from outside. Rather than widen
//! the crate's API, this includes the same source file: the module depends
//! on nothing but `std` and `crc32c`, and the checks then run exactly the
//! code the repository runs.

#[allow(
    dead_code,
    reason = "the fuzz checks use only the decoders, encoders and constants"
)]
#[path = "../../bdev-module/src/repo/format.rs"]
mod inner;

pub(crate) use inner::*;
