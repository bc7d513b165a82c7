//! Rate limits: token buckets per user (message-creating requests) and per connection
//! (every request), answered with `RATE_LIMITED` and a retry-after, never by dropping.
//!
//! What it owns: the buckets and their bounds. What it must not do: sleep or queue; a
//! request over its limit is refused at once with the time after which a retry fits.
//!
//! Defaults follow Telegram's published limit of about 30 messages per second per user,
//! with a burst of as many again; a connection may make 1,000 requests per second (it
//! can carry several users' worth of reads). `chatlog serve --user-sends-per-sec` and
//! `--conn-requests-per-sec` change them; 0 turns a limit off (load generators).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default sends per second per user.
pub const USER_SENDS_PER_SEC: f64 = 30.0;
/// Default requests per second per connection.
pub const CONN_REQUESTS_PER_SEC: f64 = 1000.0;
/// Buckets kept per kind; beyond it, full (idle) buckets are forgotten first, which
/// loses nothing: a full bucket is what a new one starts as.
pub const BUCKETS_MAX: usize = 1 << 20;

/// The limits of one node.
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    /// Message-creating requests per second per user (0 = unlimited).
    pub user_sends_per_sec: f64,
    /// Requests per second per connection (0 = unlimited).
    pub conn_requests_per_sec: f64,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            user_sends_per_sec: USER_SENDS_PER_SEC,
            conn_requests_per_sec: CONN_REQUESTS_PER_SEC,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets of one kind: each key refills at `rate` per second up to `rate` tokens (a
/// burst of one second's worth).
#[derive(Debug)]
struct Buckets {
    rate: f64,
    map: Mutex<HashMap<u64, Bucket>>,
}

impl Buckets {
    fn new(rate: f64) -> Buckets {
        Buckets {
            rate,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`, or says how long until one is there.
    fn take(&self, key: u64, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let cap = self.rate.max(1.0);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= BUCKETS_MAX && !map.contains_key(&key) {
            let rate = self.rate;
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < cap);
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.rate;
        b.tokens = (b.tokens + refill).min(cap);
        b.at = now;
        // The epsilon absorbs rounding: a retry at exactly the advertised time fits.
        if b.tokens >= 1.0 - 1e-9 {
            b.tokens = (b.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            // Rounded up, so waiting exactly this long is always enough.
            Err(Duration::from_nanos(
                ((1.0 - b.tokens) / self.rate * 1e9).ceil() as u64,
            ))
        }
    }

    fn forget(&self, key: u64) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }
}

/// The node's rate limiter.
#[derive(Debug)]
pub struct Limiter {
    users: Buckets,
    conns: Buckets,
}

impl Limiter {
    /// A limiter with these limits.
    pub fn new(limits: RateLimits) -> Limiter {
        Limiter {
            users: Buckets::new(limits.user_sends_per_sec),
            conns: Buckets::new(limits.conn_requests_per_sec),
        }
    }

    /// One message-creating request of `user`; `Err(retry_after)` when over the limit.
    pub fn user_send(&self, user: u64) -> Result<(), Duration> {
        self.users.take(user, Instant::now())
    }

    /// One request on connection `conn`; `Err(retry_after)` when over the limit.
    pub fn conn_request(&self, conn: u64) -> Result<(), Duration> {
        self.conns.take(conn, Instant::now())
    }

    /// Forgets a closed connection's bucket.
    pub fn conn_closed(&self, conn: u64) {
        self.conns.forget(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_with_the_time_to_wait() {
        let b = Buckets::new(30.0);
        let t0 = Instant::now();
        for i in 0..30 {
            assert!(b.take(7, t0).is_ok(), "request {i} of the burst");
        }
        let wait = b.take(7, t0).expect_err("over the limit");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(34),
            "{wait:?}"
        );
        // Another key is not affected.
        assert!(b.take(8, t0).is_ok());
        // After the wait, one more fits; a second later, a full burst again.
        assert!(b.take(7, t0 + wait).is_ok());
        let later = t0 + Duration::from_secs(2);
        for _ in 0..30 {
            assert!(b.take(7, later).is_ok());
        }
        assert!(b.take(7, later).is_err());
    }

    #[test]
    fn zero_means_unlimited_and_forget_resets() {
        let b = Buckets::new(0.0);
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert!(b.take(1, t0).is_ok());
        }
        let c = Buckets::new(1.0);
        assert!(c.take(1, t0).is_ok());
        assert!(c.take(1, t0).is_err());
        c.forget(1);
        assert!(c.take(1, t0).is_ok());
    }
}
