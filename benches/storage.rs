//! Storage engine microbenchmarks (criterion), named `<scenario>/<engine>/<entry bytes>`.
//!
//! Scenarios: `append_durable` (one writer, each batch durable before the next),
//! `append_durable_8w` (8 writers, each batch durable before it counts),
//! `append_buffered` (see below), `read_recent` (the newest page of 100 entries of a random
//! log, page cache hot), `read_cold` (the same after a reopen and a page-cache drop before
//! every page), `recover` (open time of a store holding ~160k entries that was written, then
//! appended to once more, then closed).
//!
//! Engines: `chatlog`; `bound`, the simplest durable loop (encode, one `write_all` at the end
//! of a file, `fdatasync`) and `bound-prealloc` (the same loop inside a file written ahead,
//! so a sync flushes data only, like chatlog's preallocated segments); `chatlog-tokio`
//! (8 writers as tokio tasks instead of threads); and with `--features peers`,
//! `raft-engine` at the same durability (`write(batch, sync = true)`).
//!
//! `append_buffered`: `bound` skips the fdatasync and `raft-engine` writes with
//! `sync = false`. chatlog has no unsynced write: its entry is one writer that keeps
//! submitting without waiting (up to the queue limit), so group commit gathers up to
//! `group_commit_bytes_max` per fdatasync. Everything it counts is durable.
//!
//! Workload (`common`): 1,000 logs, entries of 64, 256 and 4,096 random bytes, batches of
//! 256 entries on logs drawn uniformly. Throughput is in entries. Data goes to
//! `$CHATLOG_BENCH_DIR` (default: the temp dir) and is removed afterwards. The p50/p99
//! table, memory and restart figures come from `storage_figures.rs`.

mod common;

// The server's allocator (root Cargo.toml, `tikv-jemallocator`: why); the peers
// (bound, raft-engine) run in this process, so they get it too.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
}

/// One writer; every batch durable before the next.
fn append_durable(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_durable");
    configure(&mut group);
    group.throughput(Throughput::Elements(BATCH_ENTRIES as u64));
    let kinds = [
        &[Kind::Chatlog, Kind::Bound, Kind::BoundPrealloc][..],
        PEERS,
    ]
    .concat();
    for size in ENTRY_SIZES {
        for &kind in &kinds {
            let mut state: Option<(tempfile::TempDir, Box<dyn Store>, Workload)> = None;
            group.bench_function(format!("{}/{size}", kind.name()), |b| {
                let (_, store, wl) = state.get_or_insert_with(|| {
                    let dir = scratch(kind.name());
                    let store = open_store(kind, dir.path(), true);
                    (dir, store, Workload::new(size))
                });
                b.iter_custom(|iters| {
                    run_writers(
                        store.as_ref(),
                        std::slice::from_mut(wl),
                        &Stop::Batches(iters),
                    )
                    .elapsed
                });
            });
            drop(state);
        }
    }
    group.finish();
}

/// Eight writers on disjoint logs; every batch durable before it counts.
fn append_durable_8w(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_durable_8w");
    configure(&mut group);
    group.throughput(Throughput::Elements(BATCH_ENTRIES as u64));
    let kinds = [
        &[
            Kind::Chatlog,
            Kind::ChatlogTokio,
            Kind::Bound,
            Kind::BoundPrealloc,
        ][..],
        PEERS,
    ]
    .concat();
    for size in ENTRY_SIZES {
        for &kind in &kinds {
            let mut state: Option<(tempfile::TempDir, Box<dyn Store>, Vec<Workload>)> = None;
            group.bench_function(format!("{}/{size}", kind.name()), |b| {
                let (_, store, wls) = state.get_or_insert_with(|| {
                    let dir = scratch(kind.name());
                    let store = open_store(kind, dir.path(), true);
                    (dir, store, Workload::split(size, WRITERS))
                });
                b.iter_custom(|iters| {
                    let per_writer = iters.div_ceil(WRITERS as u64);
                    let run = if kind == Kind::ChatlogTokio {
                        let engine = store.chatlog_engine().expect("a chatlog store");
                        run_chatlog_tokio(engine, wls, Arc::new(Stop::Batches(per_writer)))
                    } else {
                        run_writers(store.as_ref(), wls, &Stop::Batches(per_writer))
                    };
                    // Criterion asked for `iters` batches; scale to them.
                    run.elapsed.mul_f64(iters as f64 / run.batches as f64)
                });
            });
            drop(state);
        }
    }
    group.finish();
}

/// The most each engine takes in without a per-batch fdatasync (see the crate doc).
fn append_buffered(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_buffered");
    configure(&mut group);
    group.throughput(Throughput::Elements(BATCH_ENTRIES as u64));
    let kinds = [&[Kind::Chatlog, Kind::Bound][..], PEERS].concat();
    for size in ENTRY_SIZES {
        for &kind in &kinds {
            let mut state: Option<(tempfile::TempDir, Box<dyn Store>, Workload)> = None;
            group.bench_function(format!("{}/{size}", kind.name()), |b| {
                let (_, store, wl) = state.get_or_insert_with(|| {
                    let dir = scratch(kind.name());
                    let store = open_store(kind, dir.path(), false);
                    (dir, store, Workload::new(size))
                });
                b.iter_custom(|iters| {
                    run_writers(
                        store.as_ref(),
                        std::slice::from_mut(wl),
                        &Stop::Batches(iters),
                    )
                    .elapsed
                });
            });
            drop(state);
        }
    }
    group.finish();
}

/// Batches written before reads: ~164 entries per log, so every log has a full page.
const READ_FILL_BATCHES: u64 = 640;

/// A store of `kind` holding `READ_FILL_BATCHES` durable batches, and its workload.
fn filled(kind: Kind, size: usize) -> (tempfile::TempDir, Box<dyn Store>, Workload) {
    let dir = scratch(kind.name());
    let store = open_store(kind, dir.path(), false);
    let mut wl = Workload::new(size);
    run_writers(
        store.as_ref(),
        std::slice::from_mut(&mut wl),
        &Stop::Batches(READ_FILL_BATCHES),
    );
    store.flush();
    (dir, store, wl)
}

fn read_recent(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_recent");
    configure(&mut group);
    group.throughput(Throughput::Elements(PAGE_ENTRIES));
    let kinds = [&[Kind::Chatlog][..], PEERS].concat();
    for size in ENTRY_SIZES {
        for &kind in &kinds {
            let mut state = None;
            group.bench_function(format!("{}/{size}", kind.name()), |b| {
                let (_, store, wl) = state.get_or_insert_with(|| filled(kind, size));
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let (log, range) = wl.recent_page();
                        std::hint::black_box(store.read_page(log, range));
                    }
                    started.elapsed()
                });
            });
            drop(state);
        }
    }
    group.finish();
}

/// A restarted process with an empty page cache: before every timed page the store is
/// reopened (a process's mapped pages and any in-process record cache survive a
/// drop_caches) and the page cache dropped.
fn read_cold(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_cold");
    configure(&mut group);
    // Each timed page costs an open and a page-cache drop besides: as few iterations as
    // criterion takes.
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(PAGE_ENTRIES));
    let kinds = [&[Kind::Chatlog][..], PEERS].concat();
    for size in ENTRY_SIZES {
        for &kind in &kinds {
            let mut state = None;
            group.bench_function(format!("{}/{size}", kind.name()), |b| {
                let (dir, wl) = state.get_or_insert_with(|| {
                    let (dir, store, wl) = filled(kind, size);
                    drop(store);
                    (dir, wl)
                });
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (log, range) = wl.recent_page();
                        let store = open_store(kind, dir.path(), true);
                        assert!(
                            drop_page_cache(),
                            "read_cold needs root to drop the page cache"
                        );
                        let started = Instant::now();
                        std::hint::black_box(store.read_page(log, range));
                        total += started.elapsed();
                    }
                    total
                });
            });
            drop(state);
        }
    }
    group.finish();
}

/// Open time. Before each timed open the store is opened, given one more batch and closed,
/// as a server that ran and stopped leaves it.
fn recover(c: &mut Criterion) {
    let mut group = c.benchmark_group("recover");
    configure(&mut group);
    // Each timed open costs an untimed open, append and close besides.
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(2));
    let kinds = [&[Kind::Chatlog][..], PEERS].concat();
    for size in ENTRY_SIZES {
        for &kind in &kinds {
            let mut state = None;
            group.bench_function(format!("{}/{size}", kind.name()), |b| {
                let (dir, _, wl) = state.get_or_insert_with(|| {
                    let (dir, store, wl) = filled(kind, size);
                    drop(store);
                    (dir, (), wl)
                });
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        {
                            let store = open_store(kind, dir.path(), true);
                            let batch = wl.next_batch();
                            store.append(wl, &batch);
                        }
                        let started = Instant::now();
                        let store = open_store(kind, dir.path(), true);
                        total += started.elapsed();
                        drop(store);
                    }
                    total
                });
            });
            drop(state);
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    append_durable,
    append_durable_8w,
    append_buffered,
    read_recent,
    read_cold,
    recover
);
criterion_main!(benches);
