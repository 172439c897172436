//! libFuzzer entry point for `tokengate::fuzzing::token_extraction` (the body and its
//! properties live there, so `cargo test` replays the corpus without this).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokengate::fuzzing::token_extraction(data));
