//! The `chat_apply` fuzz target's check (`fuzz/apply_check.rs`: chat commands applied to
//! `GroupState` and to a plain model, outcomes and views compared after every command,
//! the checkpoint round-tripped) on stable Rust:
//! - `corpus_inputs_agree_with_the_model`: every file in `fuzz/corpus/chat_apply/`
//!   (seeds written by this test, fuzzer findings kept under other names).
//! - `random_inputs_agree_with_the_model`: seeded random inputs; prints `seed=`,
//!   `CHATLOG_TEST_SEED=<n>` replays, `CHATLOG_FUZZ_INPUTS=<n>` sets how many.
//!
//! `CHATLOG_BLESS_CORPUS=1` rewrites the `seed-` files.

#[path = "../../fuzz/apply_check.rs"]
mod apply_check;

use std::path::{Path, PathBuf};

use apply_check::check_chat_apply;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/chat_apply")
}

/// A splitmix64 byte stream.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// Seeds: random streams, and ones biased to create users and chats first so later
/// commands find members, admins and messages.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for k in 0..4u64 {
        out.push((format!("seed-random-{k}"), bytes(k, 600)));
    }
    for k in 0..4u64 {
        let mut v = Vec::new();
        for u in 0..6u8 {
            v.extend_from_slice(&[0, 2, u, 1]); // create users u0..u5
        }
        for c in 0..3u8 {
            v.extend_from_slice(&[2, 2 + c, 1 + c, 3]); // a group, a channel, …
        }
        v.extend(bytes(100 + k, 1200));
        out.push((format!("seed-setup-{k}"), v));
    }
    out
}

#[test]
fn corpus_inputs_agree_with_the_model() {
    if std::env::var("CHATLOG_BLESS_CORPUS").is_ok() {
        std::fs::create_dir_all(dir()).unwrap();
        for (name, data) in seeds() {
            std::fs::write(dir().join(name), data).unwrap();
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("the corpus folder")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 8, "the seeds are in {}", dir().display());
    let mut commands = 0;
    for f in &files {
        let data = std::fs::read(f).unwrap();
        commands += check_chat_apply(&data);
        // Every prefix is an input too.
        for cut in (0..data.len()).step_by(97) {
            check_chat_apply(&data[..cut]);
        }
    }
    eprintln!("{} corpus inputs, {commands} commands", files.len());
}

#[test]
fn random_inputs_agree_with_the_model() {
    let seed = std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .map(|v| v.parse().expect("CHATLOG_TEST_SEED must be a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let inputs: u64 = std::env::var("CHATLOG_FUZZ_INPUTS")
        .ok()
        .map(|v| v.parse().expect("CHATLOG_FUZZ_INPUTS must be a number"))
        .unwrap_or(200);
    eprintln!("seed={seed}");
    for k in 0..inputs {
        let len = 1 + (bytes(seed ^ k, 2)[0] as usize) * 6;
        check_chat_apply(&bytes(seed.wrapping_add(k), len));
    }
}
