//! A latency histogram with fixed buckets and lock-free counters, for the node's metrics
//! (the engine's append and fdatasync latency here, the Raft groups' commit latency in
//! `chatlog-raft`, rendered as Prometheus `_bucket`/`_sum`/`_count` by the server).
//!
//! What it owns: the bucket bounds and the counters. What it must not do: allocate, lock
//! or take a clock on the recording path; the caller measures and hands in a `Duration`,
//! and a record is three relaxed atomic adds (the bucket, the sum, the count), done once
//! per batch, never per entry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (the last bucket, `+Inf`, is implied).
/// Why these: an fdatasync on an NVMe disk takes tens of microseconds, on a cloud volume
/// a few milliseconds, and a commit across nodes adds a network round trip; the send
/// budget is 100 ms (DESIGN.md), so the bounds are dense from 50 µs to 100 ms and sparse
/// up to 10 s, where anything slower is an outage, not a latency.
pub const LATENCY_BUCKETS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Buckets held: one per bound plus `+Inf`.
const BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

// The bounds must rise strictly, or a bucket would never be hit.
const _: () = {
    let mut i = 1;
    while i < LATENCY_BUCKETS_US.len() {
        assert!(LATENCY_BUCKETS_US[i - 1] < LATENCY_BUCKETS_US[i]);
        i += 1;
    }
};

/// Counts of observed durations per bucket, their sum and their number.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative; the snapshot sums them).
    buckets: [AtomicU64; BUCKETS],
    /// Sum of every observation, in nanoseconds (wraps after 584 years of latency).
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A copy of a [`Histogram`] at one moment, in Prometheus's shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, cumulative, ending with
    /// `f64::INFINITY` whose count equals [`HistogramSnapshot::count`] (up to records that
    /// raced the snapshot).
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Adds one observation.
    pub fn record(&self, elapsed: Duration) {
        let us = elapsed.as_micros();
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= u128::from(bound))
            .unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as they are now. Each counter is read once; a record racing the
    /// snapshot may show in some of them and not others, which Prometheus tolerates.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(BUCKETS);
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let bound = LATENCY_BUCKETS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((bound, cumulative));
        }
        HistogramSnapshot {
            buckets,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// The smallest bucket bound at or below which at least `quantile` (0..=1) of the
    /// observations fall, in seconds; `None` without observations. An upper estimate
    /// for a human (the status page); Prometheus computes its own from the buckets.
    pub fn quantile_bound(&self, quantile: f64) -> Option<f64> {
        let total = self.buckets.last().map_or(0, |b| b.1);
        if total == 0 {
            return None;
        }
        let wanted = (quantile.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= wanted)
            .map(|(bound, _)| *bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_add_up() {
        let h = Histogram::default();
        h.record(Duration::from_micros(50)); // on the first bound: first bucket
        h.record(Duration::from_micros(51)); // just above: second bucket
        h.record(Duration::from_millis(3)); // 5 ms bucket
        h.record(Duration::from_secs(60)); // past the last bound: +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS_US.len() + 1);
        assert_eq!(s.buckets[0], (50e-6, 1));
        assert_eq!(s.buckets[1], (100e-6, 2));
        let five_ms = s.buckets.iter().find(|b| b.0 == 0.005).expect("5 ms bound");
        assert_eq!(five_ms.1, 3);
        assert_eq!(s.buckets[LATENCY_BUCKETS_US.len() - 1].1, 3);
        assert_eq!(*s.buckets.last().expect("+Inf"), (f64::INFINITY, 4));
        let want = 60.0 + 0.003 + 51e-6 + 50e-6;
        assert!((s.sum_seconds - want).abs() < 1e-9, "{}", s.sum_seconds);
        assert_eq!(s.quantile_bound(0.5), Some(100e-6));
        assert_eq!(s.quantile_bound(0.75), Some(0.005));
        assert_eq!(s.quantile_bound(1.0), Some(f64::INFINITY));
        assert_eq!(Histogram::default().snapshot().quantile_bound(0.5), None);
    }
}
