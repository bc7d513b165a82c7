//! A cheap, deterministic hasher for the fixed-width keys of the applied state's hot
//! maps (the dedupe window of recent sends, `state.rs`).
//!
//! What it owns: [`KeyHasher`] and its builder [`KeyHashBuilder`]. What it must not do:
//! draw a random seed (this module is deterministic like the rest of `chat/`), or be
//! used where a map's iteration order could reach an outcome or the checkpoint encoding
//! (the dedupe window is encoded from its insertion-ordered `VecDeque`, never from the
//! map).
//!
//! Why not std's `RandomState` (SipHash-1-3): a post looks up and inserts one
//! `(chat, sender, client message id)` key; SipHash was ~2.3% of the replicated core's
//! profile at ~40 posts per entry (`benches/RESULTS.md`, session 5). Three `u64` words
//! need a folded multiply each, as foldhash and ahash do without AES: the 128-bit product
//! of the running state (xored with the word) and an odd constant, high and low halves
//! xored, so every input bit reaches both the bucket bits (low) and hashbrown's tag
//! (high 7 bits).
//!
//! Flooding: the keys are chosen by authenticated senders (chat and sender ids are
//! assigned by the group; only the client message id is free), sends are rate limited
//! per session at the gateway, and the window holds at most
//! `state::DEDUPE_ENTRIES_MAX` keys, so a crafted set of colliding ids slows one group's
//! apply at worst; it cannot change any outcome.

use std::hash::{BuildHasherDefault, Hasher};

/// Odd multiplier of the fold (the 64-bit golden ratio, as in Fibonacci hashing).
const FOLD_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
/// Start value, so a key of zeros does not hash to zero.
const SEED: u64 = 0x243f_6a88_85a3_08d3;

/// `(a * b)` as 128 bits, the two halves xored.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// The hasher (see the module docs). Built by [`KeyHashBuilder`].
#[derive(Debug, Clone, Copy)]
pub struct KeyHasher {
    state: u64,
}

impl Default for KeyHasher {
    fn default() -> KeyHasher {
        KeyHasher { state: SEED }
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not the hot path (keys are written as u64 words); any length is folded in
        // 8-byte words, the last one zero-padded, then the length.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
        self.write_u64(bytes.len() as u64);
    }

    fn write_u64(&mut self, word: u64) {
        self.state = folded_multiply(self.state ^ word, FOLD_MULTIPLIER);
    }

    fn finish(&self) -> u64 {
        // One more round, so the last word is mixed as well as the others.
        folded_multiply(self.state, FOLD_MULTIPLIER ^ SEED)
    }
}

/// Builds [`KeyHasher`]s: the `S` of the state's hot `HashMap`s.
pub type KeyHashBuilder = BuildHasherDefault<KeyHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(v: &T) -> u64 {
        KeyHashBuilder::default().hash_one(v)
    }

    #[test]
    fn the_same_key_hashes_alike_in_every_hasher() {
        assert_eq!(hash(&(1u64, 2u64, 3u64)), hash(&(1u64, 2u64, 3u64)));
        assert_ne!(hash(&(1u64, 2u64, 3u64)), hash(&(1u64, 2u64, 4u64)));
        assert_ne!(hash(&(1u64, 2u64, 3u64)), hash(&(2u64, 1u64, 3u64)));
        // A fixed value: the hasher takes no seed from the process.
        assert_eq!(hash(&0u64), hash(&0u64));
        assert_ne!(hash(&0u64), 0);
    }

    #[test]
    fn sequential_ids_spread_over_buckets_and_tags() {
        // What the dedupe window sees: one sender counting its client message ids.
        let n = 1u64 << 16;
        let buckets = n as usize;
        let mut low = HashSet::new();
        let mut tags = HashSet::new();
        for id in 0..n {
            let h = hash(&((7u64 << 16) | 3, (9u64 << 16) | 3, id));
            low.insert(h as usize % buckets);
            tags.insert(h >> 57);
        }
        // A uniform hash fills ~63% of n buckets with n keys; far fewer means clustering.
        assert!(
            low.len() > buckets / 2,
            "{} of {buckets} buckets",
            low.len()
        );
        assert_eq!(tags.len(), 128, "every 7-bit tag is used");
    }
}
