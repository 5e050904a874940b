//! `cargo fuzz run nbd_handshake`: see `hotcopy_fuzz::nbd_handshake` for the input layout and
//! the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotcopy_fuzz::nbd_handshake(data));
