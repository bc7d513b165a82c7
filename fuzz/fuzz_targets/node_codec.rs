//! The node-to-node decoders (`chatlog_raft::network::codec`, `chatlog_raft::codec::
//! decode_entry`) on arbitrary bytes: the first byte picks the decoder. Nothing may panic;
//! whatever decodes re-encodes to the input. Checks in `../raft_check.rs`, shared with
//! `raft/tests/fuzz_corpus.rs`. Run with
//! `cargo +nightly fuzz run node_codec fuzz/corpus/node_codec`.

#![no_main]

#[path = "../raft_check.rs"]
mod raft_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    raft_check::check_node_codec(data);
});
