//! AFL++ entry point: `cargo afl build --release --features afl --bin afl_handle` (see
//! docs/fuzzing.md).

#[path = "../target.rs"]
mod target;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        target::run(data);
    });
}
