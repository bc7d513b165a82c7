//! The state machine's command apply against a model: arbitrary bytes become a sequence
//! of chat commands applied to `GroupState` and to the plain model in
//! `../apply_check.rs`; outcomes, heads, roles, bans and read markers must agree after
//! every command, and the checkpoint encoding must round-trip. The corpus also runs on
//! stable as `cargo test -p chatlog-raft --test apply_corpus`. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run chat_apply fuzz/corpus/chat_apply` (or `cargo +nightly`).

#![no_main]

#[path = "../apply_check.rs"]
mod apply_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    apply_check::check_chat_apply(data);
});
