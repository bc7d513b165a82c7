//! The seeded generator of the chat module's randomised unit tests. The seed comes from
//! `CHATLOG_TEST_SEED`, or the clock, and is printed: a failing run is replayed with it.

/// The seed (printed) and an xorshift generator over it: `next(n)` is in `0..n`.
pub(crate) fn seeded() -> (u64, impl FnMut(u64) -> u64) {
    let seed = std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("seed {seed} (rerun with CHATLOG_TEST_SEED={seed})");
    let mut rng = seed | 1;
    let next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    };
    (seed, next)
}
