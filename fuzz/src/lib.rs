//! Fuzz checks for hotcopy's input parsers.
//!
//! Each `fuzz_targets/<name>.rs` is one line that hands libFuzzer's input to
//! the function of the same name here. The checks live in this library so
//! that they are ordinary Rust: `cargo test` in this directory runs every
//! check over the committed seed corpora on a stable toolchain (no libFuzzer
//! needed), and a crash found by the fuzzer can be replayed the same way.
//!
//! | target | parser | property beyond "never panics" |
//! |---|---|---|
//! | [`nbd_handshake`] | `hotcopy_export::nbd::handshake::Handshake::advance` | an independent model of the protocol predicts every reply, the bytes consumed and the outcome, whatever the split of the input |
//! | [`nbd_request`] | `proto::parse_request`, `proto::validate`, reply encoders | an accepted request fits the export (no overflow), is aligned and advertised; headers round-trip |
//! | [`config_yaml`] | `hotcopy_config::parse_str` | errors carry a message and a plausible position; an accepted config re-serialises to YAML that parses back equal |
//! | [`bdev_spec`] | `parse_spec`, `ByteSize`, `Listen` | every accepted value prints to text that parses back equal |
//! | [`repo_format`] | superblock, catalog and index-block decoders | a decoded structure re-encodes to bytes that decode equal (index blocks: to the same bytes) |
//! | [`repo_open`] | `Repo::open`, index, verify, restore on a damaged image | never panics; a repository that verifies clean survives a new commit and still verifies |
//! | [`rpc_request`] | `hotcopy::serve::rpc::handle_line` on a real daemon | every response is well-formed JSON-RPC 2.0 with the request's id and the error code the envelope predicts; no method panics; the daemon keeps its bdevs |
//!
//! See `docs/FUZZING.md` for how to run them.

mod config;
mod format;
mod handshake;
mod repo;
mod request;
mod rpc;
pub mod seeds;
mod spec;

pub use config::config_yaml;
pub use handshake::nbd_handshake;
pub use repo::{repo_format, repo_open};
pub use request::nbd_request;
pub use rpc::rpc_request;
pub use spec::bdev_spec;

/// A fuzz check: takes libFuzzer's input, panics when a property fails.
pub type Check = fn(&[u8]);

/// Every target: its name and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("nbd_handshake", nbd_handshake),
    ("nbd_request", nbd_request),
    ("config_yaml", config_yaml),
    ("bdev_spec", bdev_spec),
    ("repo_format", repo_format),
    ("repo_open", repo_open),
    ("rpc_request", rpc_request),
];

/// A small deterministic generator (xorshift64*), for choices a check makes
/// from a byte of its input (how to split a stream, say).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Reads fixed-size fields off the front of a fuzz input; past its end every
/// field reads as zero, so any input decodes to some parameters.
#[derive(Debug)]
pub(crate) struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Fields(b)
    }

    pub(crate) fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let n = N.min(self.0.len());
        a[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        a
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    /// What is left.
    pub(crate) fn rest(self) -> &'a [u8] {
        self.0
    }
}
