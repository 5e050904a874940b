//! `cargo fuzz run bdev_spec`: see `hotcopy_fuzz::bdev_spec` for the input layout and
//! the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotcopy_fuzz::bdev_spec(data));
