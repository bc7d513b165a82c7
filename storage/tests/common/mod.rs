//! Helpers shared by the storage integration tests.

/// The seed of a randomised test: `CHATLOG_TEST_SEED` replays a run, otherwise the clock.
/// Callers print it (`seed=`) so any failure can be replayed.
pub fn seed() -> u64 {
    std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .map(|v| v.parse().expect("CHATLOG_TEST_SEED must be a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        })
}
