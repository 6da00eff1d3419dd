//! libFuzzer entry point: `cargo +nightly fuzz run handle` (see docs/fuzzing.md).
#![no_main]

#[path = "../src/target.rs"]
mod target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    target::run(data);
});
