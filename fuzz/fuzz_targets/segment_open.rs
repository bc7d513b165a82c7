//! Opens the engine over a segment made of arbitrary bytes (and, in one input mode, a
//! checkpoint and an index file): it must not panic, and every entry it returns must come
//! from a record whose checksums match. The input layout and the properties are described
//! in `../segment_check.rs`, which the corpus test in `storage/tests/fuzz_corpus.rs` shares.

#![no_main]

#[path = "../segment_check.rs"]
mod segment_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    segment_check::check(data);
});
