//! Batch timestamps that survive a jumping wall clock.
//!
//! What it owns: the wall clock the proposers read ([`wall_ms`], with a fault-injection
//! offset for tests), and [`BatchClock`], which turns it into the timestamp stamped on
//! each Raft entry of one group. What it must not do: be read by the state machine (it
//! applies the timestamp in the entry, so replicas agree whatever their clocks say).
//!
//! Why: applied timestamps drive the de-duplication window (a retried send within
//! `DEDUPE_WINDOW_MS` returns the original seq) and what clients see as message times.
//! A leader whose wall clock jumps an hour ahead would, if its reading were stamped as
//! is, expire every de-duplication entry at the next send, so a retry sent a second
//! later posts twice; a clock that jumps back would stamp messages earlier than their
//! predecessors. So:
//! - the process reads a *smoothed* wall clock ([`now_ms`]): it never goes back, and goes
//!   forward at most [`SLEW_FACTOR`] times as fast as the monotonic clock, so a jump
//!   ahead is absorbed gradually (like NTP slewing) and a jump back is waited out. A
//!   correction that was real is caught up with at `SLEW_FACTOR - 1` seconds per second.
//!   The de-duplication window then lasts at least `DEDUPE_WINDOW_MS / SLEW_FACTOR` of
//!   real time whatever the wall clock does.
//! - a group's timestamps never go back either, across leader changes: a new leader
//!   stamps at least the last timestamp it applied ([`BatchClock`]); if its clock is behind
//!   the old leader's, timestamps stand still until it catches up.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How many times faster than real time the smoothed clock may advance while it catches
/// up with a wall clock that jumped ahead.
pub const SLEW_FACTOR: u64 = 2;

/// Fault injection: milliseconds added to the wall clock (tests make a node's clock jump
/// with it; `chatlog serve` sets it from `CHATLOG_FAULT_CLOCK_OFFSET_FILE`).
static FAULT_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Sets the fault-injection offset of the wall clock.
pub fn set_fault_offset_ms(offset_ms: i64) {
    FAULT_OFFSET_MS.store(offset_ms, Ordering::Relaxed);
}

/// The raw wall clock in microseconds since the Unix epoch, plus the fault offset.
fn wall_us() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    real.saturating_add_signed(FAULT_OFFSET_MS.load(Ordering::Relaxed).saturating_mul(1000))
}

/// The wall clock smoothed against jumps (see the module docs).
#[derive(Debug)]
struct Smoothed {
    /// The last reading (µs) and when (monotonic) it was taken.
    last: Mutex<Option<(u64, Instant)>>,
}

impl Smoothed {
    fn next_at(&self, wall_us: u64, now: Instant) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let us = match *last {
            None => wall_us,
            Some((prev, at)) => {
                let elapsed = now.saturating_duration_since(at).as_micros() as u64;
                wall_us.clamp(
                    prev,
                    prev.saturating_add(elapsed.saturating_mul(SLEW_FACTOR)),
                )
            }
        };
        *last = Some((us, now));
        us
    }
}

static SMOOTHED: Smoothed = Smoothed {
    last: Mutex::new(None),
};

/// The smoothed wall clock, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SMOOTHED.next_at(wall_us(), Instant::now()) / 1000
}

/// One group's batch timestamps: the smoothed clock, never below what the group applied.
#[derive(Debug, Default)]
pub struct BatchClock {
    floor: AtomicU64,
}

impl BatchClock {
    /// A clock that has seen nothing.
    pub fn new() -> BatchClock {
        BatchClock::default()
    }

    /// Records a timestamp the group applied (stamped by whichever node led then).
    pub fn observe(&self, ts: u64) {
        self.floor.fetch_max(ts, Ordering::Relaxed);
    }

    /// The timestamp for the next batch.
    pub fn next(&self) -> u64 {
        let ts = now_ms().max(self.floor.load(Ordering::Relaxed));
        self.floor.fetch_max(ts, Ordering::Relaxed);
        ts
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fresh() -> Smoothed {
        Smoothed {
            last: Mutex::new(None),
        }
    }

    const S: u64 = 1_000_000; // one second in µs

    #[test]
    fn follows_a_steady_wall_clock() {
        let c = fresh();
        let t0 = Instant::now();
        assert_eq!(c.next_at(1_000 * S, t0), 1_000 * S);
        let later = t0 + Duration::from_millis(500);
        assert_eq!(c.next_at(1_000 * S + S / 2, later), 1_000 * S + S / 2);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(c.next_at(1_010 * S, later), 1_010 * S);
    }

    #[test]
    fn a_jump_back_never_moves_the_clock_back() {
        let c = fresh();
        let t0 = Instant::now();
        assert_eq!(c.next_at(5_000 * S, t0), 5_000 * S);
        // The wall clock jumps an hour back: the reading stands still...
        let back = 5_000 * S - 3_600 * S;
        assert_eq!(c.next_at(back + S, t0 + Duration::from_secs(1)), 5_000 * S);
        // ...until the wall clock is past it again.
        let later = t0 + Duration::from_secs(3_602);
        assert_eq!(c.next_at(5_000 * S + S, later), 5_000 * S + S);
    }

    #[test]
    fn a_jump_ahead_is_slewed_in_however_often_it_is_read() {
        let c = fresh();
        let t0 = Instant::now();
        assert_eq!(c.next_at(5_000 * S, t0), 5_000 * S);
        let ahead = 5_000 * S + 3_600 * S;
        // Read every millisecond for a second after the jump: the clock moves at most
        // SLEW_FACTOR seconds, not an hour, and never back.
        let mut prev = 5_000 * S;
        for ms in 1..=1_000u64 {
            let now = t0 + Duration::from_millis(ms);
            let us = c.next_at(ahead + ms * 1_000, now);
            assert!(us >= prev, "never back");
            assert!(
                us <= 5_000 * S + SLEW_FACTOR * ms * 1_000,
                "slewed at {ms} ms"
            );
            prev = us;
        }
        assert_eq!(prev, 5_000 * S + SLEW_FACTOR * S);
        // It catches up at (SLEW_FACTOR - 1) s/s, then follows the wall clock again.
        let mut caught = None;
        for s in 2..10_000u64 {
            let us = c.next_at(ahead + s * S, t0 + Duration::from_secs(s));
            if us == ahead + s * S {
                caught = Some(s);
                break;
            }
        }
        let caught = caught.expect("caught up");
        assert!(
            (3_599..=3_602).contains(&caught),
            "caught up after {caught} s"
        );
    }

    #[test]
    fn applied_timestamps_of_another_leader_are_a_floor() {
        let c = BatchClock::new();
        let far = now_ms() + 3_600_000;
        c.observe(far);
        assert_eq!(c.next(), far);
        c.observe(100); // older: ignored
        assert!(c.next() >= far);
    }

    #[test]
    fn the_fault_offset_moves_the_raw_wall_clock() {
        let before = wall_us();
        set_fault_offset_ms(3_600_000);
        let ahead = wall_us();
        set_fault_offset_ms(0);
        assert!(ahead >= before + 3_600 * S, "{before} then {ahead}");
    }
}
