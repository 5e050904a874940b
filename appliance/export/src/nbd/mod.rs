//! The NBD server.
//!
//! # Protocol subset
//!
//! Handshake: fixed newstyle only (`NBDMAGIC`, `IHAVEOPT`, handshake flags
//! `FIXED_NEWSTYLE | NO_ZEROES`; client flags other than `FIXED_NEWSTYLE`
//! and `NO_ZEROES` drop the connection). Options (see [`handshake`]):
//!
//! | option | answer |
//! |---|---|
//! | `EXPORT_NAME` | old-style export reply (124 zero bytes unless `NO_ZEROES`); unknown export: hard disconnect |
//! | `ABORT` | `ACK`, then close |
//! | `LIST` | one `REP_SERVER` per export (name, then description), `ACK` |
//! | `INFO`, `GO` | `INFO_EXPORT`, `INFO_BLOCK_SIZE` (always), `INFO_NAME` and `INFO_DESCRIPTION` when asked, `ACK`; unknown export: `ERR_UNKNOWN` |
//! | `STRUCTURED_REPLY` | `ACK`: reads get structured replies from then on |
//! | anything else (`STARTTLS`, meta contexts, extended headers, …) | `ERR_UNSUP` |
//!
//! The empty export name selects the first export. Option data longer than
//! [`handshake::MAX_OPTION_DATA`] is skipped as it arrives and refused with
//! `ERR_TOO_BIG`.
//!
//! Transmission flags: `HAS_FLAGS`, `CAN_MULTI_CONN` (every connection
//! shares the bdev, and a bdev flush covers every write completed before
//! it), `READ_ONLY` for read-only exports; on writable exports `SEND_FLUSH`
//! and `SEND_FUA` when the bdev takes flushes, `SEND_TRIM` when it takes
//! unmaps, `SEND_WRITE_ZEROES` when it takes write-zeroes.
//!
//! Block sizes: minimum = the bdev's block size, preferred = max(4096, block
//! size), maximum = [`NbdOptions::max_payload`] (32 MiB).
//!
//! Commands:
//!
//! | command | bdev I/O | notes |
//! |---|---|---|
//! | `READ` | reads of at most one segment each | simple reply, or structured: one `OFFSET_DATA` chunk per segment (a failed segment: `ERROR_OFFSET`), `DONE` on the last |
//! | `WRITE` (+`FUA`) | writes of at most one segment each | with `FUA`: a flush after the writes, reply after it |
//! | `FLUSH` | flush | reply when the bdev's flush completed |
//! | `TRIM` (+`FUA`) | unmap | |
//! | `WRITE_ZEROES` (+`FUA`, `NO_HOLE`) | write-zeroes | the bdev's write-zeroes reads back as zeroes and keeps the range allocated where the backend can (malloc; uring uses `FALLOC_FL_ZERO_RANGE`), so `NO_HOLE` asks nothing more of it |
//! | `DISC` | — | stop reading, finish and reply to everything received, flush if written, close |
//!
//! Errors, as the protocol document asks: `EINVAL` for unknown commands,
//! unknown or unadvertised flags (`DF`, `FAST_ZERO`), unadvertised commands
//! (`CACHE`, `BLOCK_STATUS`), misaligned offsets or lengths, READ/WRITE
//! payloads over the maximum block size, reads past the end; `ENOSPC` for
//! writes, trims and write-zeroes past the end; `EPERM` for any of those on a
//! read-only export; `EIO` (or `ENOSPC` for a full device) when the bdev
//! fails an I/O. With structured replies, errors carry a message.
//!
//! Bad input:
//! * a bad magic, unknown client flags, or `EXPORT_NAME` of an unknown
//!   export during the handshake: the connection is dropped;
//! * a bad request magic: nothing more is read (the stream cannot be
//!   resynchronised); requests already received are finished and replied
//!   to, then the connection closes;
//! * a refused WRITE (read-only, misaligned, out of range) of at most 32 MiB:
//!   its payload is read and discarded, then the error is replied, and the
//!   connection goes on;
//! * a WRITE whose payload exceeds the maximum block size: the payload is
//!   not read; the server replies `EINVAL` to it, finishes the requests
//!   before it, and closes the connection (a hard disconnect, which the
//!   protocol allows for a payload this large);
//! * a client that disconnects mid-request: requests already submitted
//!   complete on the bdev (unacknowledged), the partial one is dropped;
//! * a simple-reply read split into segments whose later segment fails
//!   after the reply header went out (only reads larger than the
//!   connection's buffers): hard disconnect, as the protocol requires.
//!
//! A problem on one connection never affects another.
//!
//! # Architecture
//!
//! * [`NbdServer::start`] opens each export's bdev (read-only exports read-
//!   only), binds each listener (TCP, or a Unix socket), and registers one
//!   accept poller per listener on the reactors, round-robin. Accept pollers
//!   run every 500 µs and hand each new socket to the next reactor in turn,
//!   by message.
//! * On its reactor a connection is one poller over a state machine (see
//!   `conn.rs`): non-blocking `recv` into a staging buffer, the
//!   [`handshake::Handshake`] state machine, then request headers parsed by
//!   [`proto::parse_request`] and checked by [`proto::validate`] (both
//!   pure). After `GO` the connection creates its own
//!   [`hotcopy_bdev::BdevChannel`] on that reactor and preallocates its
//!   buffers (a [`hotcopy_runtime::BufferPool`]).
//! * Many requests are in flight per connection: the next request is parsed
//!   while earlier ones run, and replies go out as they complete (matched by
//!   handle), gathered into one `sendmsg` per batch straight from the DMA
//!   buffers. A connection that runs out of request slots or buffers stops
//!   reading its socket until some free up (backpressure, no allocation).
//! * Nothing acknowledged is lost: a write is replied to after the bdev
//!   completed it, a FUA write or a flush after the bdev's flush completed.
//! * [`NbdServer::stop`] and [`NbdServer::remove_export`] set a flag the
//!   connections poll: each stops reading, finishes what it received, sends
//!   the replies (giving the client [`NbdOptions::drain_timeout`]), flushes
//!   the bdev if it wrote to it, and closes.
//! * Counters ([`NbdStats`]) are per reactor, written by that reactor only,
//!   and summed when read.

mod conn;
pub mod handshake;
pub mod proto;
mod server;

pub use server::{Listen, NbdConfig, NbdError, NbdExport, NbdOptions, NbdServer, NbdStats};
