//! A cheap hash for maps keyed by [`LogId`](crate::LogId) (and segment ids): the index
//! looks up every op of every group commit in such maps, and std's SipHash was a visible
//! share of the write path's CPU (the profile in `benches/RESULTS.md`, session 6).
//!
//! What it owns: [`LogMap`] and its hasher, a splitmix64 finaliser over the u64 key (every
//! input bit reaches the high bits hashbrown's control bytes use and the low bits that
//! pick the bucket). What it must not do: hash keys an outsider picks to attack the table.
//! Log ids are assigned by this system (one per Raft group), never taken from a client, so
//! HashDoS resistance buys nothing here; maps keyed by client input keep std's hasher.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by a log (or segment) id, hashed with [`LogHasher`].
pub(crate) type LogMap<K, V> = HashMap<K, V, BuildHasherDefault<LogHasher>>;

/// See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LogHasher {
    state: u64,
}

impl Hasher for LogHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u64 keys; correct (if slower) for anything else hashed through it.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.state = mix(self.state.rotate_left(5) ^ n);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

/// splitmix64's finaliser: a bijection on u64 with full avalanche.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn dense_ids_spread_over_high_and_low_bits() {
        let b = BuildHasherDefault::<LogHasher>::default();
        let mut low = std::collections::HashSet::new();
        let mut high = std::collections::HashSet::new();
        for id in 0u64..1024 {
            let h = b.hash_one(id);
            low.insert(h & 1023);
            high.insert(h >> 57);
        }
        // 1,024 dense ids land in most of 1,024 low buckets and in all 128 top-7-bit tags.
        assert!(low.len() > 600, "low bits poorly spread: {}", low.len());
        assert_eq!(high.len(), 128);
    }

    #[test]
    fn map_works_as_a_map() {
        let mut m: LogMap<u64, u64> = LogMap::default();
        for id in 0..10_000u64 {
            m.insert(id * 7, id);
        }
        assert!((0..10_000u64).all(|id| m.get(&(id * 7)) == Some(&id)));
        assert_eq!(m.get(&1), None);
    }
}
