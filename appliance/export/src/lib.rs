//! # hotcopy-export
//!
//! The appliance's block exports: how hosts reach a bdev over the network.
//! Today that is [`nbd`], an NBD server that real clients (qemu-img,
//! qemu-io, nbdcopy, nbdinfo, fio's nbd engine, the kernel's nbd-client)
//! use; the NVMe/TCP target follows in the same shape.
//!
//! Exports follow the data-path rules of the rest of hotcopy: every socket
//! is non-blocking and polled by a reactor's poller (no thread per
//! connection), every connection has its own bdev channel on its reactor and
//! its own preallocated DMA buffers, and nothing is allocated or locked per
//! request. The wire parsers are pure functions and state machines over
//! bytes, so they can be fuzzed.

pub mod nbd;

pub use nbd::{Listen, NbdConfig, NbdError, NbdExport, NbdOptions, NbdServer, NbdStats};
