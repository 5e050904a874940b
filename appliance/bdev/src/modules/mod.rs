//! The base and reference modules. Each file is one module; its `create`
//! function builds and registers a bdev.

pub mod fault;
pub mod malloc;
pub mod null;
pub mod passthru;
pub mod uring;
