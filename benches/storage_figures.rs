//! The figures of `benches/RESULTS.md`: entries/s, MB/s and p50/p99 batch latency per
//! scenario, engine and entry size (median of repeated runs, fresh store each run); the
//! chatlog knobs (io_uring vs syscall, sync spin on/off, compression); read latencies;
//! resident index memory per entry and restart time with 1 and 10 GiB retained.
//!
//! `cargo bench --bench storage_figures [--features peers] -- [SECTION...]` with sections
//! `write`, `knobs`, `read`, `retain1`, `retain10` (default: all but `retain10`). Each prints
//! markdown table rows as it goes. `CHATLOG_FIGURES_SECS` (default 3) is the measured time
//! of one run, `CHATLOG_FIGURES_REPEATS` (default 3) the runs per figure. `retainN` runs one
//! child process per engine (`child ENGINE GIB`) so each memory figure starts clean.
//! For investigations: `CHATLOG_FIGURES_SEGMENT_MB` sets chatlog's segment size and
//! `CHATLOG_FIGURES_SETTLE_SECS` waits after open before the warm-up, and
//! `CHATLOG_FIGURES_SPIN_US` sets `sync_spin_us`, `CHATLOG_FIGURES_GROUP_MB` sets
//! `group_commit_bytes_max`; `CHATLOG_FIGURES_SIZES=256,4096` and
//! `CHATLOG_FIGURES_ENGINES=chatlog,bound` narrow the `write` section (and `prealloc`).
//! `CHATLOG_FIGURES_IO=uring|syscall` forces chatlog's I/O backend.
//! Section `prealloc` (not in the default set) runs chatlog with each
//! [`Preallocation`] of new segments next to `bound` and `bound-prealloc`, interleaved.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatlog_storage::{Config, IoMode, Preallocation};
use common::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.first().map(String::as_str) == Some("child") {
        child(&args[1], args[2].parse().expect("GiB"));
        return;
    }
    let sections: Vec<&str> = if args.is_empty() {
        vec!["write", "knobs", "read", "retain1"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    conditions();
    for s in sections {
        match s {
            "write" => write_section(),
            "knobs" => knobs_section(),
            "prealloc" => prealloc_section(),
            "read" => read_section(),
            "retain1" => retain_section(1),
            "retain10" => retain_section(10),
            other => panic!("unknown section {other}"),
        }
    }
}

/// Prints what the figures were measured on.
fn conditions() {
    let uname = std::process::Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| o.stdout);
    let kernel = String::from_utf8_lossy(uname.as_deref().unwrap_or(b"?"))
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_string))
        .unwrap_or_default();
    println!(
        "# conditions: kernel {kernel}; {cpus} cpus; {mem}; data in {}",
        bench_root().display()
    );
    println!(
        "# run {} s after 0.5 s warm-up, median of {} runs, fresh store per run",
        env_u64("CHATLOG_FIGURES_SECS", 3),
        env_u64("CHATLOG_FIGURES_REPEATS", 3)
    );
}

/// A write scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Durable,
    Durable8w,
    Buffered,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Durable => "append_durable",
            Scenario::Durable8w => "append_durable_8w",
            Scenario::Buffered => "append_buffered",
        }
    }
}

/// One measured run plus chatlog's counters over it.
struct Measured {
    run: RunResult,
    /// fdatasyncs, records (write batches) and summed sync time over the run (chatlog).
    syncs: u64,
    records: u64,
    sync_us_total: f64,
}

/// One run of `scenario` on a fresh `kind` store: 0.5 s warm-up, then `secs` measured.
fn run_once(kind: Kind, scenario: Scenario, size: usize, tweak: &dyn Fn(&mut Config)) -> Measured {
    let dir = scratch(kind.name());
    let durable = scenario != Scenario::Buffered;
    let segment_mb = env_u64("CHATLOG_FIGURES_SEGMENT_MB", 0);
    let spin_us = std::env::var("CHATLOG_FIGURES_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok());
    let group_mb = env_u64("CHATLOG_FIGURES_GROUP_MB", 0) as usize;
    let tweak = |c: &mut Config| {
        if segment_mb > 0 {
            c.segment_bytes = segment_mb << 20;
        }
        if group_mb > 0 {
            c.group_commit_bytes_max = group_mb << 20;
        }
        if let Some(spin) = spin_us {
            c.sync_spin_us = spin;
        }
        match std::env::var("CHATLOG_FIGURES_IO").as_deref() {
            Ok("uring") => c.io_mode = IoMode::Uring,
            Ok("syscall") => c.io_mode = IoMode::Syscall,
            _ => {}
        }
        tweak(c);
    };
    let store = open_store_with(kind, dir.path(), durable, &tweak);
    // Lets background work started by open (chatlog prepares its next segment) finish first.
    std::thread::sleep(Duration::from_secs(env_u64(
        "CHATLOG_FIGURES_SETTLE_SECS",
        0,
    )));
    let mut wls = Workload::split(
        size,
        if scenario == Scenario::Durable8w {
            WRITERS
        } else {
            1
        },
    );
    let go = |wls: &mut [Workload], d: Duration| match (kind, scenario) {
        (Kind::ChatlogTokio, _) => run_chatlog_tokio(
            store.chatlog_engine().expect("chatlog"),
            wls,
            Arc::new(Stop::after(d)),
        ),
        _ => run_writers(store.as_ref(), wls, &Stop::after(d)),
    };
    go(&mut wls, Duration::from_millis(500));
    let before = store.chatlog_engine().map(|e| e.stats());
    let run = go(
        &mut wls,
        Duration::from_secs(env_u64("CHATLOG_FIGURES_SECS", 3)),
    );
    let after = store.chatlog_engine().map(|e| e.stats());
    let (syncs, records, sync_us_total) = match (before, after) {
        (Some(b), Some(a)) => (
            a.syncs - b.syncs,
            a.records_written - b.records_written,
            a.sync_mean_us * a.syncs as f64 - b.sync_mean_us * b.syncs as f64,
        ),
        _ => (0, 0, 0.0),
    };
    drop(store);
    Measured {
        run,
        syncs,
        records,
        sync_us_total,
    }
}

fn median_index(v: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|a, b| v[*a].total_cmp(&v[*b]));
    order[order.len() / 2]
}

const ROW_HEADER: &str = "| scenario | engine | bytes | entries/s (median) | min–max | MB/s | p50 ms | p99 ms | syncs/s | batches/sync | sync µs |\n|---|---|---|---|---|---|---|---|---|---|---|";

/// Repeats a run and prints the median row; returns the median entries/s.
fn figure(
    label: &str,
    kind: Kind,
    scenario: Scenario,
    size: usize,
    tweak: &dyn Fn(&mut Config),
) -> f64 {
    let repeats = env_u64("CHATLOG_FIGURES_REPEATS", 3).max(1);
    let runs: Vec<Measured> = (0..repeats)
        .map(|_| run_once(kind, scenario, size, tweak))
        .collect();
    let rates: Vec<f64> = runs.iter().map(|m| m.run.entries_per_sec()).collect();
    let m = &runs[median_index(&rates)];
    let lo = rates.iter().copied().fold(f64::MAX, f64::min);
    let hi = rates.iter().copied().fold(0.0, f64::max);
    let secs = m.run.elapsed.as_secs_f64();
    let (syncs, per_sync, sync_us) = if m.syncs > 0 {
        (
            format!("{:.0}", m.syncs as f64 / secs),
            format!("{:.2}", m.records as f64 / m.syncs as f64),
            format!("{:.0}", m.sync_us_total / m.syncs as f64),
        )
    } else {
        ("–".into(), "–".into(), "–".into())
    };
    println!(
        "| {} | {label} | {size} | {:.0} | {:.0}–{:.0} | {:.1} | {:.2} | {:.2} | {syncs} | {per_sync} | {sync_us} |",
        scenario.name(),
        m.run.entries_per_sec(),
        lo,
        hi,
        m.run.mb_per_sec(),
        m.run.latency.value_at_quantile(0.5) as f64 / 1e6,
        m.run.latency.value_at_quantile(0.99) as f64 / 1e6,
    );
    m.run.entries_per_sec()
}

fn write_section() {
    println!("\n## write throughput and batch latency\n\n{ROW_HEADER}");
    let none: &dyn Fn(&mut Config) = &|_| {};
    let sizes: Vec<usize> = match std::env::var("CHATLOG_FIGURES_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|s| s.parse().expect("entry size"))
            .collect(),
        Err(_) => ENTRY_SIZES.to_vec(),
    };
    let only: Option<String> = std::env::var("CHATLOG_FIGURES_ENGINES").ok();
    let wanted = |k: &Kind| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|n| n == k.name()))
    };
    for size in sizes {
        let mut kinds = vec![Kind::Chatlog, Kind::Bound, Kind::BoundPrealloc];
        kinds.extend_from_slice(PEERS);
        for &kind in kinds.iter().filter(|k| wanted(k)) {
            figure(kind.name(), kind, Scenario::Durable, size, none);
        }
        let mut kinds = vec![
            Kind::Chatlog,
            Kind::ChatlogTokio,
            Kind::Bound,
            Kind::BoundPrealloc,
        ];
        kinds.extend_from_slice(PEERS);
        for &kind in kinds.iter().filter(|k| wanted(k)) {
            figure(kind.name(), kind, Scenario::Durable8w, size, none);
        }
        let mut kinds = vec![Kind::Chatlog, Kind::Bound];
        kinds.extend_from_slice(PEERS);
        for &kind in kinds.iter().filter(|k| wanted(k)) {
            figure(kind.name(), kind, Scenario::Buffered, size, none);
        }
    }
}

fn sizes() -> Vec<usize> {
    match std::env::var("CHATLOG_FIGURES_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|s| s.parse().expect("entry size"))
            .collect(),
        Err(_) => ENTRY_SIZES.to_vec(),
    }
}

/// How new segments are preallocated, against the two bound loops, one writer and eight.
fn prealloc_section() {
    println!("\n## chatlog segment preallocation vs bound\n\n{ROW_HEADER}");
    let none: &dyn Fn(&mut Config) = &|_| {};
    for size in sizes() {
        for scenario in [Scenario::Durable, Scenario::Durable8w] {
            for p in [
                Preallocation::ZeroFill,
                Preallocation::Fallocate,
                Preallocation::Sparse,
            ] {
                figure(
                    &format!("chatlog {p:?}"),
                    Kind::Chatlog,
                    scenario,
                    size,
                    &move |c: &mut Config| c.preallocation = p,
                );
            }
            for kind in [Kind::Bound, Kind::BoundPrealloc] {
                figure(kind.name(), kind, scenario, size, none);
            }
        }
    }
}

/// io_uring vs pwrite+fdatasync, sync spin 0 vs default, compression off; 256-byte entries.
fn knobs_section() {
    println!("\n## chatlog knobs (256-byte entries unless noted)\n\n{ROW_HEADER}");
    let default_spin = Config::new("/").sync_spin_us;
    for scenario in [Scenario::Durable, Scenario::Durable8w] {
        for (mode, mode_name) in [(IoMode::Uring, "io_uring"), (IoMode::Syscall, "syscall")] {
            for spin in [0, default_spin] {
                // The spin only applies to io_uring; the syscall backend blocks in fdatasync.
                if mode == IoMode::Syscall && spin != 0 {
                    continue;
                }
                let label = format!("chatlog {mode_name} spin={spin}us");
                figure(
                    &label,
                    Kind::Chatlog,
                    scenario,
                    256,
                    &move |c: &mut Config| {
                        c.io_mode = mode;
                        c.sync_spin_us = spin;
                    },
                );
            }
        }
    }
    for size in [256, 4096] {
        figure(
            "chatlog compression off",
            Kind::Chatlog,
            Scenario::Durable,
            size,
            &|c: &mut Config| c.compression_bytes_min = 0,
        );
    }
}

fn read_section() {
    println!(
        "\n## reads: newest page of up to {PAGE_ENTRIES} entries of a random log, \
         640 batches (~164 entries per log) retained\n"
    );
    println!(
        "| scenario | engine | bytes | pages/s | entries/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|"
    );
    let mut kinds = vec![Kind::Chatlog];
    kinds.extend_from_slice(PEERS);
    for size in ENTRY_SIZES {
        for &kind in &kinds {
            let dir = scratch(kind.name());
            let mut wl = Workload::new(size);
            {
                let store = open_store(kind, dir.path(), false);
                run_writers(
                    store.as_ref(),
                    std::slice::from_mut(&mut wl),
                    &Stop::Batches(640),
                );
                store.flush();
            }
            let store = open_store(kind, dir.path(), true);
            // Hot: read everything once, then time pages for 2 s.
            for _ in 0..200 {
                let (log, range) = wl.recent_page();
                store.read_page(log, range);
            }
            let mut hist = histogram();
            let mut entries = 0;
            let started = Instant::now();
            let mut pages = 0u64;
            while started.elapsed() < Duration::from_secs(2) {
                let (log, range) = wl.recent_page();
                let t = Instant::now();
                entries += store.read_page(log, range);
                record(&mut hist, t.elapsed());
                pages += 1;
            }
            let secs = started.elapsed().as_secs_f64();
            print_read_row(
                "read_recent",
                kind,
                size,
                pages as f64 / secs,
                entries as f64 / secs,
                &hist,
            );
            // Cold: a restarted process with an empty page cache. Reopen before each page
            // (pages a process has mapped, and any in-process record cache, survive a
            // drop_caches), then drop the page cache; only the read is timed.
            drop(store);
            let mut hist = histogram();
            let mut busy = Duration::ZERO;
            let mut entries = 0;
            let pages = 20;
            let mut dropped = true;
            for _ in 0..pages {
                let (log, range) = wl.recent_page();
                let store = open_store(kind, dir.path(), true);
                dropped &= drop_page_cache();
                let t = Instant::now();
                entries += store.read_page(log, range);
                busy += t.elapsed();
                record(&mut hist, t.elapsed());
            }
            let label = if dropped {
                "read_cold"
            } else {
                "read_cold (page cache NOT dropped)"
            };
            let secs = busy.as_secs_f64();
            print_read_row(
                label,
                kind,
                size,
                pages as f64 / secs,
                entries as f64 / secs,
                &hist,
            );
        }
    }
}

fn print_read_row(
    label: &str,
    kind: Kind,
    size: usize,
    pages: f64,
    entries: f64,
    hist: &hdrhistogram::Histogram<u64>,
) {
    println!(
        "| {label} | {} | {size} | {pages:.0} | {entries:.0} | {:.3} | {:.3} |",
        kind.name(),
        hist.value_at_quantile(0.5) as f64 / 1e6,
        hist.value_at_quantile(0.99) as f64 / 1e6,
    );
}

fn retain_section(gib: u64) {
    println!(
        "\n## {gib} GiB retained (256-byte entries, 1,000 logs): memory and restart\n\n\
         | engine | entries | fill s | fill MB/s | index bytes/entry (stats) | RssAnon Δ bytes/entry | \
         close s | restart hot s | restart cold s | restart after one more batch s |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut kinds = vec![Kind::Chatlog];
    kinds.extend_from_slice(PEERS);
    let exe = std::env::current_exe().expect("own path");
    for kind in kinds {
        let status = std::process::Command::new(&exe)
            .args(["child", kind.name(), &gib.to_string()])
            .status()
            .expect("running the child");
        assert!(status.success(), "child {} {gib} failed", kind.name());
    }
}

/// Fills a fresh store with `gib` GiB of 256-byte entries, measures memory, closes it and
/// times restarts (hot, cold, and after one more batch appended). Prints one row.
fn child(engine: &str, gib: u64) {
    let kind = match engine {
        "chatlog" => Kind::Chatlog,
        #[cfg(feature = "peers")]
        "raft-engine" => Kind::RaftEngine,
        other => panic!("unknown engine {other}"),
    };
    let dir = scratch(&format!("retain-{engine}"));
    let mut wl = Workload::new(256);
    let batches = (gib << 30) / wl.batch_payload_bytes();
    // A short queue keeps in-flight batches out of the memory figure.
    let small_queue: &dyn Fn(&mut Config) = &|c: &mut Config| c.queue_len_max = 64;
    let store = open_store_with(kind, dir.path(), false, small_queue);
    trim_heap();
    let rss_before = rss_anon_bytes();
    let started = Instant::now();
    run_writers(
        store.as_ref(),
        std::slice::from_mut(&mut wl),
        &Stop::Batches(batches),
    );
    store.flush();
    let fill = started.elapsed().as_secs_f64();
    // Let maintenance write index files and the checkpoint of sealed segments.
    std::thread::sleep(Duration::from_secs(2));
    trim_heap();
    let rss_after = rss_anon_bytes();
    let entries = batches * BATCH_ENTRIES as u64;
    let index_per_entry = match store.chatlog_engine() {
        Some(e) => {
            let s = e.stats();
            assert_eq!(s.entries, entries, "every entry held");
            format!("{:.2}", s.index_memory_bytes as f64 / s.entries as f64)
        }
        None => "–".into(),
    };
    let t = Instant::now();
    drop(store);
    let close = t.elapsed().as_secs_f64();

    let timed_open = || {
        let t = Instant::now();
        let store = open_store(kind, dir.path(), true);
        (t.elapsed().as_secs_f64(), store)
    };
    let (hot, store) = timed_open();
    let (log, range) = wl.recent_page();
    assert!(store.read_page(log, range) > 0, "reads after restart");
    drop(store);
    assert!(drop_page_cache(), "dropping the page cache needs root");
    let (cold, store) = timed_open();
    let batch = wl.next_batch();
    store.append(&wl, &batch);
    drop(store);
    let (after_append, store) = timed_open();
    drop(store);
    println!(
        "| {engine} | {entries} | {fill:.1} | {:.0} | {index_per_entry} | {:.2} | {close:.3} | {hot:.3} | {cold:.3} | {after_append:.3} |",
        (gib << 30) as f64 / fill / 1e6,
        rss_after.saturating_sub(rss_before) as f64 / entries as f64,
    );
}
