//! `cargo fuzz run config_yaml`: see `hotcopy_fuzz::config_yaml` for the input layout and
//! the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotcopy_fuzz::config_yaml(data));
