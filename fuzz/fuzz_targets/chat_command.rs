//! Chat command and batch decoding (`Command::decode`, `DecodedBatch::parse`) on arbitrary
//! bytes: the first byte picks a command (even) or a batch (odd). Nothing may panic;
//! whatever decodes re-encodes to a fixed point. Checks in `../raft_check.rs`, shared with
//! `raft/tests/fuzz_corpus.rs`. Run with
//! `cargo +nightly fuzz run chat_command fuzz/corpus/chat_command`.

#![no_main]

#[path = "../raft_check.rs"]
mod raft_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    raft_check::check_chat_command(data);
});
