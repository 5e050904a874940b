//! `cargo fuzz run repo_format`: see `hotcopy_fuzz::repo_format` for the input layout and
//! the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotcopy_fuzz::repo_format(data));
