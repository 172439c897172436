//! libFuzzer entry point for `tokengate::fuzzing::event_ids` (the body and its
//! properties live there, so `cargo test` replays the corpus without this).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokengate::fuzzing::event_ids(data));
