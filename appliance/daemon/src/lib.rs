//! The `hotcopy` appliance as a library: the daemon (`serve`) and the
//! commands of the `hotcopy` binary (`src/main.rs`, which only parses the
//! command line and calls them).
//!
//! It is a library so that other crates can link the daemon: the fuzz
//! crate (`fuzz/`, target `rpc_request`) builds a [`serve::daemon::Daemon`]
//! and drives its JSON-RPC request handling ([`serve::rpc::handle_line`])
//! without a socket. The API is the binary's internals, not a stable
//! interface.

// The modules' docs were written for the binary, whose docs include its
// private items; a few link to `pub(crate)` helpers (`repo_cmd`).
#![allow(rustdoc::private_intra_doc_links)]

pub mod backup_cmd;
pub mod bench_cmd;
pub mod construct;
pub mod cow_cmd;
pub mod demo_cmd;
pub mod repo_bench_cmd;
pub mod repo_cmd;
pub mod rpc_cmd;
pub mod serve;
