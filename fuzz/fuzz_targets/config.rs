//! libFuzzer entry point for `tokengate::fuzzing::config` (the body and its
//! properties live there, so `cargo test` replays the corpus without this).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokengate::fuzzing::config(data));
