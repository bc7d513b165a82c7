//! Concurrency: writers (appends, purges, redactions), readers and background compaction
//! (every few milliseconds, aggressive) run at once on small segments, so segments are
//! sealed, rewritten, freed and recycled under the readers' feet.
//!
//! - `reads_never_see_wrong_data`: every read returns the entry's original or redacted
//!   payload, or `OutOfRange` for an index purged meanwhile; never other bytes, never
//!   another error.
//! - `final_state_is_exact`: once the writers are done, every entry holds exactly what was
//!   last written to it, before and after a reopen.
//!
//! Seeded: `CHATLOG_TEST_SEED=<n>` replays the writers' choices (thread timing is not
//! replayable); the seed is printed.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chatlog_storage::{Config, Engine, Error, IoMode, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WRITERS: u64 = 2;
const LOGS_PER_WRITER: u64 = 3;
const BATCHES_PER_WRITER: u64 = 250;

fn original(log: u64, index: u64) -> Vec<u8> {
    let mut v = format!("log {log} index {index} ").into_bytes();
    // Sizes vary from a few bytes to ~6 KiB so segments fill and records differ.
    let extra = ((log * 7919 + index * 104_729) % 6000) as usize;
    v.extend((0..extra).map(|i| (i as u64 ^ index ^ log) as u8));
    v
}

fn redacted(log: u64, index: u64) -> Vec<u8> {
    format!("redacted {log}/{index}").into_bytes()
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = 256 << 10;
    c.io_mode = IoMode::Auto;
    c.compaction_interval_ms = 5;
    c.compaction_live_ratio_max = 0.9;
    c.compaction_bytes_per_sec = 1 << 30;
    c.recycle_segments_max = 2;
    c
}

/// What one writer leaves behind: per log, its first index, next index and redactions.
type WriterState = BTreeMap<u64, (u64, u64, Vec<u64>)>;

fn writer(engine: &Engine, w: u64, seed: u64) -> WriterState {
    let mut rng = StdRng::seed_from_u64(seed ^ (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let logs: Vec<u64> = (0..LOGS_PER_WRITER)
        .map(|k| 1 + w * LOGS_PER_WRITER + k)
        .collect();
    let mut state: WriterState = logs.iter().map(|l| (*l, (1, 1, Vec::new()))).collect();
    for k in 0..BATCHES_PER_WRITER {
        let mut b = WriteBatch::new();
        let mut purge = Vec::new();
        let mut redact = Vec::new();
        for &log in &logs {
            let (first, next, _) = state[&log];
            let n = rng.random_range(1..6u64);
            for i in next..next + n {
                b.append(log, i, &original(log, i));
            }
            let mut lo = first;
            if k % 10 == 9 && next > first + 30 {
                let point = next - rng.random_range(5..30u64);
                b.purge_before(log, point);
                purge.push((log, point));
                lo = point;
            }
            if k % 3 == 0 && next > lo {
                let i = rng.random_range(lo..next);
                b.redact(log, i, &redacted(log, i));
                redact.push((log, i));
            }
            state.get_mut(&log).expect("own log").1 = next + n;
        }
        engine
            .write_blocking(&b)
            .unwrap_or_else(|e| panic!("seed={seed} writer {w} batch {k}: {e}"));
        for (log, point) in purge {
            let s = state.get_mut(&log).expect("own log");
            s.0 = point;
            s.2.retain(|i| *i >= point);
        }
        for (log, i) in redact {
            let s = state.get_mut(&log).expect("own log");
            if i >= s.0 {
                s.2.push(i);
            }
        }
    }
    state
}

fn reader(engine: &Engine, done: &AtomicBool, seed: u64, r: u64, reads: &AtomicU64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabcd ^ r);
    let logs = WRITERS * LOGS_PER_WRITER;
    while !done.load(Ordering::Acquire) {
        let log = rng.random_range(1..=logs);
        let Some(b) = engine.bounds(log) else {
            continue;
        };
        if b.is_empty() {
            continue;
        }
        let index = rng.random_range(b.first..b.next);
        let result = if rng.random_bool(0.2) {
            engine
                .read(log, index..b.next, 64 << 10)
                .map(|v| v.into_iter().enumerate().collect::<Vec<_>>())
        } else {
            engine.get(log, index).map(|p| vec![(0, p)])
        };
        match result {
            Ok(entries) => {
                for (k, p) in entries {
                    let i = index + k as u64;
                    assert!(
                        p[..] == original(log, i)[..] || p[..] == redacted(log, i)[..],
                        "seed={seed}: reads_never_see_wrong_data: log {log} entry {i} holds {} \
                         unexpected bytes",
                        p.len()
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Purged between the bounds and the read.
            Err(Error::OutOfRange { .. }) => {}
            Err(e) => {
                panic!("seed={seed}: reads_never_see_wrong_data: log {log} entry {index}: {e}")
            }
        }
    }
}

fn check_exact(engine: &Engine, states: &[WriterState], seed: u64, when: &str) {
    for state in states {
        for (&log, (first, next, redactions)) in state {
            let b = engine.bounds(log).expect("written log");
            assert_eq!(
                (b.first, b.next),
                (*first, *next),
                "seed={seed} {when}: final_state_is_exact: bounds of {log}"
            );
            for i in *first..*next {
                let want = if redactions.contains(&i) {
                    redacted(log, i)
                } else {
                    original(log, i)
                };
                let got = engine
                    .get(log, i)
                    .unwrap_or_else(|e| panic!("seed={seed} {when}: {log}/{i}: {e}"));
                assert!(
                    got[..] == want[..],
                    "seed={seed} {when}: final_state_is_exact: {log}/{i}"
                );
            }
        }
    }
}

#[test]
fn readers_writers_and_compaction_agree() {
    let seed = common::seed();
    eprintln!("concurrent: seed={seed} (CHATLOG_TEST_SEED)");
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(config(dir.path())).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (engine, done, reads) = (engine.clone(), done.clone(), reads.clone());
            std::thread::spawn(move || reader(&engine, &done, seed, r, &reads))
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let engine = engine.clone();
            std::thread::spawn(move || writer(&engine, w, seed))
        })
        .collect();
    let states: Vec<WriterState> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    // One more pass while the readers still run: it has dead segments to work on.
    let report = engine
        .compact_now()
        .unwrap_or_else(|e| panic!("seed={seed}: compact_now: {e}"));
    done.store(true, Ordering::Release);
    for r in readers {
        r.join().expect("reader");
    }
    let stats = engine.stats();
    eprintln!(
        "concurrent: seed={seed}: {} reads checked, {} bytes compacted, {} segments freed, last pass {report:?}",
        reads.load(Ordering::Relaxed),
        stats.compacted_bytes,
        stats.segments_freed
    );
    assert!(
        stats.compacted_bytes > 0,
        "seed={seed}: background compaction never ran"
    );
    assert!(
        stats.segments_freed > 0,
        "seed={seed}: no segment was freed"
    );
    check_exact(&engine, &states, seed, "before reopen");
    let engine = Arc::try_unwrap(engine).expect("only handle");
    engine.close().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    check_exact(&engine, &states, seed, "after reopen");
}
