//! `cargo fuzz run rpc_request`: see `hotcopy_fuzz::rpc_request` for the input layout and
//! the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotcopy_fuzz::rpc_request(data));
