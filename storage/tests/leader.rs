//! The leader/follower write path and segment preallocation.
//!
//! - `blocking_and_async_writers_interleave_in_order`: threads in `write_blocking` (which
//!   lead group commits on their own threads) and an async submitter (whose batches the
//!   I/O thread, or whichever writer leads, commits) run at once on small segments, so
//!   segments are sealed under every kind of leader. Every callback comes exactly once,
//!   `Ok`, in submission order; every entry reads back, before and after a reopen.
//! - `every_preallocation_writes_across_segments_and_reopens`: each
//!   `Preallocation` gives segments of the configured size whose unused part holds no
//!   record, across rotations and reopens.
//!
//! Seeded: `CHATLOG_TEST_SEED=<n>` replays the payload sizes; the seed is printed.

use std::sync::{Arc, Mutex};

use chatlog_storage::{Config, Engine, Preallocation, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn seed() -> u64 {
    let seed = std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed={seed} (CHATLOG_TEST_SEED)");
    seed
}

fn payload(log: u64, index: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{log}/{index}:").into_bytes();
    v.extend((0..len).map(|i| (i as u64 ^ index ^ log) as u8));
    v
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = 256 << 10;
    c.compaction_interval_ms = 3_600_000;
    c
}

const BLOCKING_WRITERS: u64 = 3;
const BATCHES: u64 = 200;
const ASYNC_LOG: u64 = 100;

#[test]
fn blocking_and_async_writers_interleave_in_order() {
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(config(dir.path())).unwrap());
    let len_of = move |log: u64, index: u64| {
        StdRng::seed_from_u64(seed ^ (log << 32) ^ index).random_range(0..3000usize)
    };
    let order = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for log in 0..BLOCKING_WRITERS {
            let engine = engine.clone();
            s.spawn(move || {
                for index in 1..=BATCHES {
                    let mut b = WriteBatch::new();
                    b.append(log, index, &payload(log, index, len_of(log, index)));
                    engine.write_blocking(&b).unwrap();
                    // Durable means readable, on this thread, at once.
                    assert_eq!(
                        engine.get(log, index).unwrap(),
                        payload(log, index, len_of(log, index))
                    );
                }
            });
        }
        let engine = engine.clone();
        let order = order.clone();
        s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                for index in 1..=BATCHES {
                    let mut b = WriteBatch::new();
                    let p = payload(ASYNC_LOG, index, len_of(ASYNC_LOG, index));
                    b.append(ASYNC_LOG, index, &p);
                    let order = order.clone();
                    engine
                        .submit(
                            &b,
                            Box::new(move |r| {
                                r.unwrap();
                                order.lock().unwrap().push(index);
                            }),
                        )
                        .await
                        .unwrap();
                }
                // The last one through `write`, so everything before it is durable too.
                let mut b = WriteBatch::new();
                b.put_meta(ASYNC_LOG, b"done", b"1");
                engine.write(&b).await.unwrap();
            });
        });
    });
    let got = order.lock().unwrap().clone();
    assert_eq!(
        got,
        (1..=BATCHES).collect::<Vec<_>>(),
        "async callbacks out of order or missing"
    );
    let check = |e: &Engine| {
        for log in (0..BLOCKING_WRITERS).chain([ASYNC_LOG]) {
            let all = e.read(log, 1..BATCHES + 1, usize::MAX).unwrap();
            assert_eq!(all.len() as u64, BATCHES, "log {log}");
            for (k, p) in all.iter().enumerate() {
                let index = k as u64 + 1;
                assert_eq!(p[..], payload(log, index, len_of(log, index))[..]);
            }
        }
        assert_eq!(e.meta(ASYNC_LOG, b"done").as_deref(), Some(&b"1"[..]));
    };
    check(&engine);
    let s = engine.stats();
    assert!(s.segments >= 3, "segments were sealed meanwhile: {s:?}");
    Arc::into_inner(engine).unwrap().close().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    check(&engine);
    engine.close().unwrap();
}

#[test]
fn every_preallocation_writes_across_segments_and_reopens() {
    let seed = seed();
    for prealloc in [
        Preallocation::ZeroFill,
        Preallocation::Fallocate,
        Preallocation::Sparse,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.preallocation = prealloc;
        let mut rng = StdRng::seed_from_u64(seed);
        let lens: Vec<usize> = (0..300).map(|_| rng.random_range(0..4000)).collect();
        let e = Engine::open(cfg.clone()).unwrap();
        for (k, len) in lens.iter().enumerate() {
            let mut b = WriteBatch::new();
            b.append(1, k as u64 + 1, &payload(1, k as u64 + 1, *len));
            e.write_blocking(&b).unwrap();
        }
        assert!(e.stats().segments >= 3, "{prealloc:?}: rotated");
        e.close().unwrap();
        // Every segment file has its full size: appends never change a file's size.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "seg") {
                let len = std::fs::metadata(&path).unwrap().len();
                assert_eq!(len, cfg.segment_bytes, "{prealloc:?}: {}", path.display());
            }
        }
        // Twice: the first reopen seals the recovered tail and starts a new segment.
        for extra in 0..2u64 {
            let e = Engine::open(cfg.clone()).unwrap();
            let all = e.read(1, 1..302, usize::MAX).unwrap();
            assert_eq!(all.len() as u64, 300 + extra, "{prealloc:?}");
            for (k, p) in all.iter().take(300).enumerate() {
                assert_eq!(p[..], payload(1, k as u64 + 1, lens[k])[..], "{prealloc:?}");
            }
            let mut b = WriteBatch::new();
            b.append(1, 301 + extra, b"after reopen");
            e.write_blocking(&b).unwrap();
            e.close().unwrap();
        }
    }
}
