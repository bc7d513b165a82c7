//! The storage benchmarks' shared parts: the workload (1,000 logs, random payloads, write
//! batches of 256 entries spread across logs), the engines under test behind one small
//! trait (`chatlog`, the `bound` loop, and `raft-engine` with the `peers` feature), and
//! the runners that drive them and time every batch.
//!
//! Both bench binaries include this file (`mod common;`): `storage.rs` (criterion) and
//! `storage_figures.rs` (the table in `RESULTS.md`). Each uses only part of it.
#![allow(dead_code)]

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use chatlog_storage::{Config, Engine, WriteBatch};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Logs (later: Raft groups) sharing one engine.
pub const LOGS: u64 = 1000;
/// Entries in one write batch.
pub const BATCH_ENTRIES: usize = 256;
/// Payload sizes measured, in bytes.
pub const ENTRY_SIZES: [usize; 3] = [64, 256, 4096];
/// Concurrent writers of the `_8w` scenario.
pub const WRITERS: usize = 8;
/// Newest entries read by one `read_recent`/`read_cold` page (a history page).
pub const PAGE_ENTRIES: u64 = 100;
/// Random bytes payloads are cut from: far larger than a batch, so no two batches repeat,
/// and random, so LZ4 finds nothing to save (the engines still try).
const POOL_BYTES: usize = 4 << 20;
/// Seed of every random choice, so runs and engines see the same workload.
pub const SEED: u64 = 0xC4A7_1096;

/// Where benchmark data goes: `$CHATLOG_BENCH_DIR`, else the system temp dir.
pub fn bench_root() -> PathBuf {
    std::env::var_os("CHATLOG_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A fresh, empty directory under [`bench_root`], removed when dropped.
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("chatlog-bench-{name}-"))
        .tempdir_in(bench_root())
        .expect("creating a scratch directory")
}

/// One entry of a batch: log, index, and where its payload starts in the pool.
#[derive(Debug, Clone, Copy)]
pub struct EntrySpec {
    pub log: u64,
    pub index: u64,
    pub payload_at: usize,
}

/// A write batch, engine-neutral: entries sorted by log, each log's indexes contiguous.
#[derive(Debug, Clone, Default)]
pub struct BatchSpec {
    pub entries: Vec<EntrySpec>,
}

/// A writer's view of the workload: the logs it owns (no two writers append to one log:
/// each log's appends must stay contiguous) and each log's next index.
#[derive(Debug, Clone)]
pub struct Workload {
    pub pool: Arc<[u8]>,
    pub entry_bytes: usize,
    /// The logs this writer appends to.
    pub logs: Vec<u64>,
    /// Next index per log id (indexed by log id).
    pub next: Vec<u64>,
    rng: SmallRng,
}

impl Workload {
    /// The whole workload for one writer.
    pub fn new(entry_bytes: usize) -> Workload {
        Workload::split(entry_bytes, 1).pop().expect("one writer")
    }

    /// `writers` workloads over disjoint sets of the logs (log % writers == writer).
    pub fn split(entry_bytes: usize, writers: usize) -> Vec<Workload> {
        let mut rng = SmallRng::seed_from_u64(SEED);
        let mut pool = vec![0u8; POOL_BYTES + entry_bytes];
        rng.fill_bytes(&mut pool);
        let pool: Arc<[u8]> = pool.into();
        (0..writers)
            .map(|w| Workload {
                pool: pool.clone(),
                entry_bytes,
                logs: (1..=LOGS)
                    .filter(|l| (*l as usize) % writers == w)
                    .collect(),
                next: vec![1; LOGS as usize + 1],
                rng: SmallRng::seed_from_u64(SEED + 1 + w as u64),
            })
            .collect()
    }

    /// The next batch: 256 entries on logs drawn uniformly from this writer's logs.
    pub fn next_batch(&mut self) -> BatchSpec {
        let mut picks: Vec<u64> = (0..BATCH_ENTRIES)
            .map(|_| self.logs[self.rng.random_range(0..self.logs.len())])
            .collect();
        picks.sort_unstable();
        let entries = picks
            .into_iter()
            .map(|log| {
                let index = self.next[log as usize];
                self.next[log as usize] += 1;
                EntrySpec {
                    log,
                    index,
                    payload_at: self.rng.random_range(0..POOL_BYTES),
                }
            })
            .collect();
        BatchSpec { entries }
    }

    pub fn payload(&self, e: &EntrySpec) -> &[u8] {
        &self.pool[e.payload_at..e.payload_at + self.entry_bytes]
    }

    /// A random log this writer has written at least one entry to, and the newest page of it.
    pub fn recent_page(&mut self) -> (u64, Range<u64>) {
        loop {
            let log = self.logs[self.rng.random_range(0..self.logs.len())];
            let next = self.next[log as usize];
            if next > 1 {
                return (log, next.saturating_sub(PAGE_ENTRIES).max(1)..next);
            }
        }
    }

    /// Payload bytes of one batch.
    pub fn batch_payload_bytes(&self) -> u64 {
        (BATCH_ENTRIES * self.entry_bytes) as u64
    }
}

/// An engine under test. `append` returns when the batch is durable (or, for a store
/// opened buffered, when the engine has it).
pub trait Store: Send + Sync {
    fn append(&self, wl: &Workload, batch: &BatchSpec);

    /// Reads entries `range` of `log`; returns how many came back.
    fn read_page(&self, log: u64, range: Range<u64>) -> usize;

    /// Runs one writer until `stop` says so, recording each batch's latency. Stores with a
    /// pipelined mode override it.
    fn run_writer(&self, wl: &mut Workload, stop: &Stop, hist: &mut Histogram<u64>) -> u64 {
        let mut batches = 0;
        while !stop.done(batches) {
            let batch = wl.next_batch();
            let started = Instant::now();
            self.append(wl, &batch);
            record(hist, started.elapsed());
            batches += 1;
        }
        batches
    }

    /// Makes everything appended so far durable (used after buffered fills).
    fn flush(&self) {}

    /// The engine, for chatlog stores (the tokio runner drives it directly).
    fn chatlog_engine(&self) -> Option<&Arc<Engine>> {
        None
    }
}

/// When a writer stops: after a number of batches or at a deadline.
#[derive(Debug)]
pub enum Stop {
    Batches(u64),
    Deadline { at: Instant, flag: AtomicBool },
}

impl Stop {
    pub fn after(d: Duration) -> Stop {
        Stop::Deadline {
            at: Instant::now() + d,
            flag: AtomicBool::new(false),
        }
    }

    pub fn done(&self, batches: u64) -> bool {
        match self {
            Stop::Batches(n) => batches >= *n,
            Stop::Deadline { at, flag } => {
                if flag.load(Ordering::Relaxed) {
                    return true;
                }
                // Checking the clock every batch costs ~25 ns: nothing next to a batch.
                let done = Instant::now() >= *at;
                if done {
                    flag.store(true, Ordering::Relaxed);
                }
                done
            }
        }
    }
}

/// A histogram of batch latencies in nanoseconds (1 µs to 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("histogram bounds")
}

pub fn record(hist: &mut Histogram<u64>, d: Duration) {
    hist.saturating_record(d.as_nanos() as u64);
}

/// What one run did.
#[derive(Debug)]
pub struct RunResult {
    pub batches: u64,
    pub entries: u64,
    pub payload_bytes: u64,
    pub elapsed: Duration,
    /// Per-batch latency, ns: from the call until the batch is durable (or buffered).
    pub latency: Histogram<u64>,
}

impl RunResult {
    /// Adds up the writers' (batches, latency) results of one timed run.
    pub fn merge(
        results: Vec<(u64, Histogram<u64>)>,
        entry_bytes: u64,
        elapsed: Duration,
    ) -> RunResult {
        let mut latency = histogram();
        let mut batches = 0;
        for (n, h) in results {
            batches += n;
            latency.add(&h).expect("same histogram bounds");
        }
        let entries = batches * BATCH_ENTRIES as u64;
        RunResult {
            batches,
            entries,
            payload_bytes: entries * entry_bytes,
            elapsed,
            latency,
        }
    }

    pub fn entries_per_sec(&self) -> f64 {
        self.entries as f64 / self.elapsed.as_secs_f64()
    }
    pub fn mb_per_sec(&self) -> f64 {
        self.payload_bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Runs one thread per workload against `store` until `stop` (a batch count applies to
/// each writer). The clock starts when every writer is ready.
pub fn run_writers(store: &dyn Store, workloads: &mut [Workload], stop: &Stop) -> RunResult {
    let barrier = Barrier::new(workloads.len() + 1);
    let entry_bytes = workloads[0].entry_bytes as u64;
    let (elapsed, results) = std::thread::scope(|s| {
        let handles: Vec<_> = workloads
            .iter_mut()
            .map(|wl| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut hist = histogram();
                    barrier.wait();
                    let n = store.run_writer(wl, stop, &mut hist);
                    (n, hist)
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let results: Vec<(u64, Histogram<u64>)> = handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect();
        (started.elapsed(), results)
    });
    RunResult::merge(results, entry_bytes, elapsed)
}

// ---------------------------------------------------------------------------------------
// The engines by name.

/// The engines of the scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Writers are threads calling `write_blocking` (buffered scenario: pipelined `submit`).
    Chatlog,
    /// Writers are tokio tasks calling `write().await` (see [`run_chatlog_tokio`]).
    ChatlogTokio,
    /// Encode, `write_all` at the end of a growing file, `fdatasync`.
    Bound,
    /// The same inside a file written ahead, so syncs flush data only.
    BoundPrealloc,
    #[cfg(feature = "peers")]
    RaftEngine,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Chatlog => "chatlog",
            Kind::ChatlogTokio => "chatlog-tokio",
            Kind::Bound => "bound",
            Kind::BoundPrealloc => "bound-prealloc",
            #[cfg(feature = "peers")]
            Kind::RaftEngine => "raft-engine",
        }
    }
}

/// The peer engines compiled in.
#[cfg(feature = "peers")]
pub const PEERS: &[Kind] = &[Kind::RaftEngine];
#[cfg(not(feature = "peers"))]
pub const PEERS: &[Kind] = &[];

/// A durable (`durable == true`) or buffered store of `kind` in `dir`, chatlog with its
/// default configuration.
pub fn open_store(kind: Kind, dir: &Path, durable: bool) -> Box<dyn Store> {
    open_store_with(kind, dir, durable, &|_| {})
}

/// Like [`open_store`], with chatlog's configuration adjusted by `tweak`.
pub fn open_store_with(
    kind: Kind,
    dir: &Path,
    durable: bool,
    tweak: &dyn Fn(&mut Config),
) -> Box<dyn Store> {
    match kind {
        Kind::Chatlog | Kind::ChatlogTokio => {
            let mode = if durable {
                ChatlogMode::Blocking
            } else {
                ChatlogMode::Pipelined
            };
            let mut config = Config::new(dir);
            tweak(&mut config);
            Box::new(Chatlog::open(config, mode))
        }
        Kind::Bound => Box::new(Bound::open(dir, durable, None)),
        Kind::BoundPrealloc => Box::new(Bound::open(dir, durable, Some(BOUND_PREALLOC_BYTES))),
        #[cfg(feature = "peers")]
        Kind::RaftEngine => Box::new(peer::RaftEngine::open(dir, durable)),
    }
}

// ---------------------------------------------------------------------------------------
// chatlog

/// How the chatlog store submits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatlogMode {
    /// `write_blocking`: one batch at a time per writer, each durable before the next.
    Blocking,
    /// `submit` without waiting: the writer keeps submitting (up to the engine's queue
    /// limit) and durability callbacks arrive as group commits finish. Every entry is
    /// still durable before it counts; nothing is buffered.
    Pipelined,
}

#[derive(Debug)]
pub struct Chatlog {
    /// Shared with the tasks of [`run_chatlog_tokio`].
    pub engine: Arc<Engine>,
    pub mode: ChatlogMode,
}

impl Chatlog {
    pub fn open(config: Config, mode: ChatlogMode) -> Chatlog {
        Chatlog {
            engine: Arc::new(Engine::open(config).expect("opening chatlog")),
            mode,
        }
    }

    /// Closes the engine (every task holding it has finished).
    pub fn close(self) {
        Arc::into_inner(self.engine)
            .expect("no task holds the engine")
            .close()
            .expect("close");
    }
}

pub fn chatlog_batch(wl: &Workload, batch: &BatchSpec) -> WriteBatch {
    // Sized up front, as the bound loop reuses its buffer: growing from empty would copy
    // the payloads once more.
    let mut b =
        WriteBatch::with_capacity(batch.entries.len(), batch.entries.len() * wl.entry_bytes);
    for e in &batch.entries {
        b.append(e.log, e.index, wl.payload(e));
    }
    b
}

impl Store for Chatlog {
    fn append(&self, wl: &Workload, batch: &BatchSpec) {
        self.engine
            .write_blocking(&chatlog_batch(wl, batch))
            .expect("chatlog write");
    }

    fn read_page(&self, log: u64, range: Range<u64>) -> usize {
        self.engine
            .read(log, range, usize::MAX)
            .expect("chatlog read")
            .len()
    }

    fn chatlog_engine(&self) -> Option<&Arc<Engine>> {
        Some(&self.engine)
    }

    fn run_writer(&self, wl: &mut Workload, stop: &Stop, hist: &mut Histogram<u64>) -> u64 {
        if self.mode == ChatlogMode::Blocking {
            let mut batches = 0;
            while !stop.done(batches) {
                let batch = wl.next_batch();
                let started = Instant::now();
                self.append(wl, &batch);
                record(hist, started.elapsed());
                batches += 1;
            }
            return batches;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Duration>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let submitted = rt.block_on(async {
            let mut batches = 0u64;
            while !stop.done(batches) {
                let spec = wl.next_batch();
                let batch = chatlog_batch(wl, &spec);
                let started = Instant::now();
                let tx = tx.clone();
                let done: chatlog_storage::Durable = Box::new(move |r| {
                    r.expect("chatlog pipelined write");
                    let _ = tx.send(started.elapsed());
                });
                self.engine
                    .submit(&batch, done)
                    .await
                    .expect("chatlog submit");
                batches += 1;
            }
            batches
        });
        drop(tx);
        let mut durable = 0;
        for d in rx {
            record(hist, d);
            durable += 1;
        }
        assert_eq!(durable, submitted, "every submitted batch reports durable");
        submitted
    }
}

/// Writers as tokio tasks on a two-worker runtime (one per core), each `write().await`ing
/// its batch before building the next: how a server drives the engine.
pub fn run_chatlog_tokio(
    engine: &Arc<Engine>,
    workloads: &mut [Workload],
    stop: Arc<Stop>,
) -> RunResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let entry_bytes = workloads[0].entry_bytes as u64;
    let started = Instant::now();
    let results: Vec<(u64, Histogram<u64>)> = rt.block_on(async {
        let mut tasks = Vec::new();
        for wl in workloads.iter() {
            let mut wl = wl.clone();
            let engine = engine.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut hist = histogram();
                let mut batches = 0;
                while !stop.done(batches) {
                    let spec = wl.next_batch();
                    let batch = chatlog_batch(&wl, &spec);
                    let t = Instant::now();
                    engine.write(&batch).await.expect("chatlog write");
                    record(&mut hist, t.elapsed());
                    batches += 1;
                }
                (batches, hist, wl)
            }));
        }
        let mut out = Vec::new();
        for (k, t) in tasks.into_iter().enumerate() {
            let (n, h, wl) = t.await.expect("writer task");
            workloads[k] = wl;
            out.push((n, h));
        }
        out
    });
    let elapsed = started.elapsed();
    RunResult::merge(results, entry_bytes, elapsed)
}

// ---------------------------------------------------------------------------------------
// bound: the simplest durable loop on the same file system.

/// Encode the batch into one buffer (per entry: log u64, index u64, length u32, payload),
/// `write_all` it at the end of one file, `fdatasync`. Concurrent writers reserve disjoint
/// ranges and each syncs on its own.
#[derive(Debug)]
pub struct Bound {
    file: File,
    end: AtomicU64,
    sync: bool,
    /// With `Some(n)`: the first `n` bytes were written and synced before the run and
    /// writes wrap around inside them, so a sync flushes data only (as chatlog's
    /// preallocated segments do). With `None` the file grows with every write, so each
    /// fdatasync also commits the new file size.
    prealloc_bytes: Option<u64>,
}

/// Bytes zero-filled once for `bound-prealloc`: larger than any run's page-cache footprint
/// matters not; it only has to hold the in-flight batches of all writers.
pub const BOUND_PREALLOC_BYTES: u64 = 1 << 30;

impl Bound {
    pub fn open(dir: &Path, sync: bool, prealloc_bytes: Option<u64>) -> Bound {
        let path = dir.join("bound.dat");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(prealloc_bytes.is_none())
            .open(&path)
            .expect("opening bound file");
        if let Some(n) = prealloc_bytes {
            let len = file.metadata().expect("stat").len();
            if len < n {
                let zeros = vec![0u8; 4 << 20];
                let mut at = 0;
                while at < n {
                    file.write_all_at(&zeros, at).expect("zero-fill");
                    at += zeros.len() as u64;
                }
                file.sync_all().expect("sync");
            }
        }
        Bound {
            file,
            end: AtomicU64::new(0),
            sync,
            prealloc_bytes,
        }
    }
}

thread_local! {
    static BOUND_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Store for Bound {
    fn append(&self, wl: &Workload, batch: &BatchSpec) {
        BOUND_BUF.with_borrow_mut(|buf| {
            buf.clear();
            for e in &batch.entries {
                let p = wl.payload(e);
                buf.extend_from_slice(&e.log.to_le_bytes());
                buf.extend_from_slice(&e.index.to_le_bytes());
                buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
                buf.extend_from_slice(p);
            }
            let len = buf.len() as u64;
            let reserved = self.end.fetch_add(len, Ordering::Relaxed);
            let at = match self.prealloc_bytes {
                Some(n) => reserved % (n - len),
                None => reserved,
            };
            self.file.write_all_at(buf, at).expect("bound write");
            if self.sync {
                self.file.sync_data().expect("bound fdatasync");
            }
        });
    }

    fn read_page(&self, _log: u64, _range: Range<u64>) -> usize {
        unreachable!("the bound loop is a write bound only")
    }

    fn flush(&self) {
        self.file.sync_data().expect("bound fdatasync");
    }
}

// ---------------------------------------------------------------------------------------
// raft-engine (TiKV's log engine), behind the `peers` feature.

#[cfg(feature = "peers")]
pub mod peer {
    use super::*;
    use protobuf::well_known_types::BytesValue;
    use raft_engine::{LogBatch, MessageExt};

    /// raft-engine stores protobuf messages and asks the type for each entry's index. A
    /// `BytesValue` holding `index (u64 LE) | payload` costs what TiKV's `eraftpb::Entry`
    /// costs within a few bytes (index and term varints, a length-prefixed data field).
    #[derive(Debug)]
    pub struct EntryType;

    impl MessageExt for EntryType {
        type Entry = BytesValue;
        fn index(e: &BytesValue) -> u64 {
            u64::from_le_bytes(e.get_value()[..8].try_into().expect("8-byte index prefix"))
        }
    }

    pub struct RaftEngine {
        pub engine: raft_engine::Engine,
        /// fdatasync after every write batch (`write(.., sync = true)`).
        pub sync: bool,
        pub dir: PathBuf,
    }

    impl std::fmt::Debug for RaftEngine {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RaftEngine")
                .field("sync", &self.sync)
                .finish()
        }
    }

    /// raft-engine's defaults (format V2, LZ4 above 8 KiB, 128 MiB files, recycling on),
    /// in `dir`.
    pub fn config(dir: &Path) -> raft_engine::Config {
        raft_engine::Config {
            dir: dir.display().to_string(),
            ..Default::default()
        }
    }

    impl RaftEngine {
        pub fn open(dir: &Path, sync: bool) -> RaftEngine {
            let engine = raft_engine::Engine::open(config(dir)).expect("opening raft-engine");
            RaftEngine {
                engine,
                sync,
                dir: dir.to_path_buf(),
            }
        }
    }

    impl Store for RaftEngine {
        fn append(&self, wl: &Workload, batch: &BatchSpec) {
            let mut lb = LogBatch::with_capacity(batch.entries.len());
            let mut run: Vec<BytesValue> = Vec::new();
            let mut log = u64::MAX;
            for e in &batch.entries {
                if e.log != log && !run.is_empty() {
                    lb.add_entries::<EntryType>(log, &run).expect("add_entries");
                    run.clear();
                }
                log = e.log;
                let p = wl.payload(e);
                let mut v = Vec::with_capacity(8 + p.len());
                v.extend_from_slice(&e.index.to_le_bytes());
                v.extend_from_slice(p);
                let mut m = BytesValue::new();
                m.set_value(v);
                run.push(m);
            }
            if !run.is_empty() {
                lb.add_entries::<EntryType>(log, &run).expect("add_entries");
            }
            self.engine
                .write(&mut lb, self.sync)
                .expect("raft-engine write");
        }

        fn read_page(&self, log: u64, range: Range<u64>) -> usize {
            let mut out = Vec::with_capacity((range.end - range.start) as usize);
            self.engine
                .fetch_entries_to::<EntryType>(log, range.start, range.end, None, &mut out)
                .expect("raft-engine read")
        }

        fn flush(&self) {
            self.engine.sync().expect("raft-engine sync");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Process facts.

/// Anonymous resident memory of this process (RssAnon in /proc/self/status), bytes. File
/// pages (chatlog's segment mappings) are not in it.
pub fn rss_anon_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("RssAnon in /proc/self/status")
}

/// Resident pages of this process from /proc/self/statm (anonymous and file), bytes.
pub fn rss_statm_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("statm");
    pages * 4096
}

/// Returns freed heap to the OS so RSS shows what is live.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Writes back dirty pages and drops the page cache (needs root; `false` if refused).
pub fn drop_page_cache() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}
