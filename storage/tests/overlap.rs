//! Overlapped group commits (session 6): while one group's write and fdatasync are in
//! flight the committer gathers the next, submits it as soon as the first is durable, and
//! only then applies the first and calls back.
//!
//! - `pipelined_submits_are_durable_readable_and_in_order`: on each backend (io_uring,
//!   where the ring really overlaps, and the syscall backend), an async submitter keeps
//!   hundreds of multi-log batches queued while a blocking writer leads now and then, on
//!   small segments so seals land between overlapped groups. Every callback comes once,
//!   `Ok`, in submission order; the batch is readable from inside its own callback; every
//!   entry reads back before and after a reopen.
//! - `failed_fdatasync_under_pipelining_refuses_all_later_batches`: a failed fdatasync in
//!   the middle of a pipelined stream (seeded point) stops the engine: every batch is
//!   answered once, acknowledgements come in submission order, the acknowledged batches
//!   are a prefix and everything after is `Err(Stopped)` (fail-stop), and a reopen holds
//!   every acknowledged entry.
//!
//! - `batches_queued_during_a_flight_join_the_next_group`: on a slow device (fault
//!   injection) and with `Config::top_up_groups`, batches queued while a group is in
//!   flight go out with the very next group, not one group later (as they do without).
//!
//! Seeded: `CHATLOG_TEST_SEED=<n>` replays a run; the seed is printed.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chatlog_storage::fault::FaultyFileSystem;
use chatlog_storage::{Config, Engine, Error, IoMode, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BATCHES: u64 = 600;
const LOGS_PER_BATCH: u64 = 4;
/// Logs of the async submitter are `0..ASYNC_LOGS`; the blocking writer uses `BLOCKING_LOG`.
const ASYNC_LOGS: u64 = 16;
const BLOCKING_LOG: u64 = 1_000;

fn config(dir: &Path, mode: IoMode) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = 256 << 10;
    c.compaction_interval_ms = 3_600_000;
    c.io_mode = mode;
    c
}

fn payload(log: u64, index: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{log}/{index}:").into_bytes();
    v.extend((0..len).map(|i| (i as u64 ^ index ^ log.rotate_left(7)) as u8));
    v
}

/// Batch `k` of the async submitter: `LOGS_PER_BATCH` logs, one entry each, plus what it
/// appended (log, index, payload).
type Items = Vec<(u64, u64, Vec<u8>)>;

fn async_batch(k: u64, next: &mut [u64], rng: &mut StdRng) -> (WriteBatch, Items) {
    let mut b = WriteBatch::new();
    let mut items = Vec::new();
    for j in 0..LOGS_PER_BATCH {
        let log = (k * LOGS_PER_BATCH + j) % ASYNC_LOGS;
        let index = next[log as usize];
        next[log as usize] += 1;
        let p = payload(log, index, rng.random_range(0..2_000usize));
        b.append(log, index, &p);
        items.push((log, index, p));
    }
    (b, items)
}

fn check_items(engine: &Engine, items: &[(u64, u64, Vec<u8>)]) {
    for (log, index, p) in items {
        let got = engine
            .get(*log, *index)
            .unwrap_or_else(|e| panic!("log {log} index {index}: {e}"));
        assert_eq!(&got[..], &p[..], "log {log} index {index}");
    }
}

fn run_pipelined(mode: IoMode, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let engine = match Engine::open(config(dir.path(), mode)) {
        Ok(e) => Arc::new(e),
        Err(e) if mode == IoMode::Uring => {
            println!("io_uring unavailable here ({e}); that backend is not exercised");
            return;
        }
        Err(e) => panic!("open: {e}"),
    };
    println!("backend {}", engine.io_backend());
    let weak: Weak<Engine> = Arc::downgrade(&engine);
    // (batch number, whether its entries were readable inside the callback)
    let order: Arc<Mutex<Vec<(u64, bool)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut all: Items = Vec::new();
    let blocking_items = std::thread::scope(|s| {
        let blocker = {
            let engine = engine.clone();
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ 0xb10c);
                let mut items = Vec::new();
                for index in 1..=BATCHES / 4 {
                    let p = payload(BLOCKING_LOG, index, rng.random_range(0..3_000usize));
                    let mut b = WriteBatch::new();
                    b.append(BLOCKING_LOG, index, &p);
                    engine.write_blocking(&b).unwrap();
                    assert_eq!(engine.get(BLOCKING_LOG, index).unwrap(), p);
                    items.push((BLOCKING_LOG, index, p));
                }
                items
            })
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut next = vec![1u64; ASYNC_LOGS as usize];
            for k in 0..BATCHES {
                let (b, items) = async_batch(k, &mut next, &mut rng);
                let order = order.clone();
                let weak = weak.clone();
                let expect = items.clone();
                engine
                    .submit(
                        &b,
                        Box::new(move |r| {
                            r.unwrap_or_else(|e| panic!("batch {k}: {e}"));
                            // The test holds a strong reference until every callback ran.
                            let e = weak.upgrade().expect("engine alive");
                            let readable = expect
                                .iter()
                                .all(|(log, index, p)| e.get(*log, *index).is_ok_and(|g| g == *p));
                            drop(e);
                            order.lock().unwrap().push((k, readable));
                        }),
                    )
                    .await
                    .unwrap();
                all.extend(items);
            }
        });
        blocker.join().unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while order.lock().unwrap().len() < BATCHES as usize {
        assert!(Instant::now() < deadline, "callbacks missing");
        std::thread::sleep(Duration::from_millis(5));
    }
    let order = order.lock().unwrap().clone();
    let numbers: Vec<u64> = order.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        numbers,
        (0..BATCHES).collect::<Vec<_>>(),
        "callbacks out of order"
    );
    let unreadable: Vec<u64> = order.iter().filter(|(_, r)| !r).map(|(k, _)| *k).collect();
    assert!(
        unreadable.is_empty(),
        "durable but not readable in its callback: {unreadable:?}"
    );
    let stats = engine.stats();
    println!(
        "{} batches + {} blocking in {} syncs, {} segments",
        BATCHES,
        blocking_items.len(),
        stats.syncs,
        stats.segments
    );
    assert!(stats.segments > 2, "small segments must have been sealed");
    check_items(&engine, &all);
    check_items(&engine, &blocking_items);
    Arc::into_inner(engine)
        .expect("no other holder")
        .close()
        .unwrap();
    let engine = Engine::open(config(dir.path(), mode)).unwrap();
    check_items(&engine, &all);
    check_items(&engine, &blocking_items);
}

#[test]
fn pipelined_submits_are_durable_readable_and_in_order() {
    let seed = common::seed();
    println!("seed={seed} (CHATLOG_TEST_SEED)");
    run_pipelined(IoMode::Uring, seed);
    run_pipelined(IoMode::Syscall, seed);
}

#[test]
fn failed_fdatasync_under_pipelining_refuses_all_later_batches() {
    let seed = common::seed();
    println!("seed={seed} (CHATLOG_TEST_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultyFileSystem::new();
    let engine =
        Engine::open_with(config(dir.path(), IoMode::Syscall), Arc::new(fs.clone())).unwrap();
    // Let open's own background syncs pass (segment preparation, first checkpoint).
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs.plan().syncs.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "open's background I/O never finished"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    let fail_after = rng.random_range(0..4u64);
    println!("fdatasync fails after {fail_after} more");
    type Answers = Arc<Mutex<Vec<(u64, Result<(), String>)>>>;
    let results: Answers = Arc::new(Mutex::new(Vec::new()));
    let mut submitted: Vec<(u64, Items)> = Vec::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut next = vec![1u64; ASYNC_LOGS as usize];
        for k in 0..BATCHES / 2 {
            if k == 10 {
                // The first ten are durable by now (the test thread may block here: the
                // runtime runs nothing else).
                std::thread::sleep(Duration::from_millis(200));
                fs.plan()
                    .fail_sync_after
                    .store(fail_after, Ordering::SeqCst);
            }
            let (b, items) = async_batch(k, &mut next, &mut rng);
            let results = results.clone();
            let r = engine
                .submit(
                    &b,
                    Box::new(move |r| {
                        let r = r.map_err(|e| {
                            assert!(matches!(e, Error::Stopped { .. }), "batch {k}: {e:?}");
                            e.to_string()
                        });
                        results.lock().unwrap().push((k, r));
                    }),
                )
                .await;
            match r {
                Ok(()) => submitted.push((k, items)),
                // Refused at submit once the engine stopped: no callback comes.
                Err(Error::Stopped { .. }) => break,
                Err(e) => panic!("batch {k}: {e}"),
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while results.lock().unwrap().len() < submitted.len() {
        assert!(Instant::now() < deadline, "callbacks missing");
        std::thread::sleep(Duration::from_millis(5));
    }
    let results = results.lock().unwrap().clone();
    // Every batch is answered once.
    let mut numbers: Vec<u64> = results.iter().map(|(k, _)| *k).collect();
    numbers.sort_unstable();
    let expected: Vec<u64> = submitted.iter().map(|(k, _)| *k).collect();
    assert_eq!(numbers, expected, "a callback is missing or came twice");
    // Durability is reported in submission order. (A refusal is answered at once, so it
    // may overtake acknowledgements of earlier batches still in flight.)
    let acked: Vec<u64> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(k, _)| *k)
        .collect();
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "acknowledged out of order: {acked:?}"
    );
    // Fail-stop: acknowledged batches are a prefix; after the first refusal nothing is
    // acknowledged.
    let mut by_number = results.clone();
    by_number.sort_by_key(|(k, _)| *k);
    let first_err = by_number
        .iter()
        .position(|(_, r)| r.is_err())
        .expect("the armed fdatasync failure never reached a batch");
    assert!(
        by_number[first_err..].iter().all(|(_, r)| r.is_err()),
        "a batch was acknowledged after a failed fdatasync"
    );
    println!(
        "{} acknowledged, {} refused after the failure",
        first_err,
        by_number.len() - first_err
    );
    assert!(engine.stopped().is_some());
    let _ = engine.close();
    let engine = Engine::open(config(dir.path(), IoMode::Syscall)).unwrap();
    for (_, items) in &submitted[..first_err] {
        check_items(&engine, items);
    }
}

/// The io_uring backend takes the ring only when a group has company to overlap with: a
/// lone blocking writer's rounds are plain pwritev + fdatasync (`ring_syncs` stays put),
/// a stream of queued async batches goes through the ring (`ring_syncs` grows), and
/// everything both wrote reads back after a reopen. On the syscall backend the ring is
/// never used.
#[test]
fn a_lone_writer_skips_the_ring_and_queued_batches_take_it() {
    for mode in [IoMode::Uring, IoMode::Syscall] {
        let dir = tempfile::tempdir().unwrap();
        let engine = match Engine::open(config(dir.path(), mode)) {
            Ok(e) => e,
            Err(e) if mode == IoMode::Uring => {
                println!("io_uring unavailable here ({e}); that backend is not exercised");
                continue;
            }
            Err(e) => panic!("open: {e}"),
        };
        println!("backend {}", engine.io_backend());
        let mut all: Items = Vec::new();
        let lone = 40;
        let before = engine.stats();
        for index in 1..=lone {
            let p = payload(BLOCKING_LOG, index, 300);
            let mut b = WriteBatch::new();
            b.append(BLOCKING_LOG, index, &p);
            engine.write_blocking(&b).unwrap();
            all.push((BLOCKING_LOG, index, p));
        }
        let after_lone = engine.stats();
        assert!(
            after_lone.syncs >= before.syncs + lone,
            "{mode:?}: one sync per lone batch"
        );
        assert_eq!(
            after_lone.ring_syncs, before.ring_syncs,
            "{mode:?}: a lone writer's rounds must not go through the ring"
        );
        // Async batches submitted back to back: each group has batches queued behind it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut rng = StdRng::seed_from_u64(7);
            let mut next = vec![1u64; ASYNC_LOGS as usize];
            let mut waits = Vec::new();
            for k in 0..BATCHES {
                let (b, items) = async_batch(k, &mut next, &mut rng);
                let (tx, rx) = tokio::sync::oneshot::channel();
                engine
                    .submit(
                        &b,
                        Box::new(move |r| {
                            let _ = tx.send(r.map_err(|e| e.to_string()));
                        }),
                    )
                    .await
                    .unwrap();
                waits.push(rx);
                all.extend(items);
            }
            for (k, rx) in waits.into_iter().enumerate() {
                rx.await
                    .expect("callback")
                    .unwrap_or_else(|e| panic!("batch {k}: {e}"));
            }
        });
        let after_queued = engine.stats();
        if mode == IoMode::Uring {
            assert!(
                after_queued.ring_syncs > after_lone.ring_syncs,
                "queued batches must overlap on the ring: {after_queued:?}"
            );
        } else {
            assert_eq!(
                after_queued.ring_syncs, 0,
                "the syscall backend has no ring"
            );
        }
        check_items(&engine, &all);
        drop(engine);
        let engine = Engine::open(config(dir.path(), mode)).unwrap();
        check_items(&engine, &all);
    }
}

/// Session 11: the committer gathers a group just after the one before it went out; with
/// `top_up_groups` it takes in what was queued meanwhile just before sending it (a small
/// group, a few batches). On a device held 300 ms
/// after each group starts and again before it is awaited (`slow_device_for_tests`):
/// batch A goes out alone; B is queued while A's group is starting, so it is gathered
/// right after; C and D are queued while A's group is awaited. B, C and D then go out as
/// one group: two fdatasyncs for the four batches. Without it (the default) B goes out
/// alone and C and D one group later: three, and C and D wait out B's flight too. Every
/// batch is acknowledged once, in order, and reads back.
#[test]
fn batches_queued_during_a_flight_join_the_next_group() {
    const SLOW: Duration = Duration::from_millis(300);
    for (mode, top_up) in [
        (IoMode::Uring, true),
        (IoMode::Syscall, true),
        (IoMode::Uring, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), mode);
        c.slow_device_for_tests = SLOW;
        c.top_up_groups = top_up;
        let engine = match Engine::open(c) {
            Ok(e) => e,
            Err(e) if mode == IoMode::Uring => {
                println!("io_uring unavailable here ({e}); that backend is not exercised");
                continue;
            }
            Err(e) => panic!("open: {e}"),
        };
        let syncs_before = engine.stats().syncs;
        let acked: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // A at 0, B at 100 ms (A's group is starting until 300 ms), C and D at 400 and
        // 450 ms (A's group is awaited until 600 ms).
        let start = Instant::now();
        for (k, at_ms) in [(1u64, 0u64), (2, 100), (3, 400), (4, 450)] {
            let at = start + Duration::from_millis(at_ms);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let mut b = WriteBatch::new();
            b.append(7, k, &payload(7, k, 100));
            let acked = acked.clone();
            rt.block_on(engine.submit(
                &b,
                Box::new(move |r| {
                    r.unwrap_or_else(|e| panic!("batch {k}: {e}"));
                    acked.lock().unwrap().push(k);
                }),
            ))
            .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < 4 {
            assert!(
                Instant::now() < deadline,
                "{mode:?}: acknowledgements missing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            *acked.lock().unwrap(),
            vec![1, 2, 3, 4],
            "{mode:?}: out of order"
        );
        let syncs = engine.stats().syncs - syncs_before;
        println!(
            "{mode:?} ({}), top_up_groups {top_up}: 4 batches in {syncs} syncs",
            engine.io_backend()
        );
        let expected = if top_up { 2 } else { 3 };
        assert_eq!(
            syncs, expected,
            "{mode:?}, top_up_groups {top_up}: with top-ups B, C and D go out in one group \
             after A's; without, B goes alone and C and D after it"
        );
        for k in 1..=4 {
            assert_eq!(engine.get(7, k).unwrap(), payload(7, k, 100));
        }
        engine.close().unwrap();
    }
}
