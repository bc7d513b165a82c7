//! The engine handle: opening (recovery), submitting writes to the I/O thread, reading
//! checked entries, and the counters it reports. The I/O thread lives in `writer.rs`, the
//! maintenance and segment-preparing threads in `maintenance.rs`, recovery in
//! `recovery.rs`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::LogId;
use crate::batch::{EncodedBatch, WriteBatch};
use crate::config::{Config, EngineThreads, IoBackend};
use crate::error::{Error, Result};
use crate::format::{BatchBody, OpKind};
use crate::fs::{FileSystem, StdFileSystem};
use crate::index::{Index, Location, Lookup};
use crate::maintenance::{self, Job};
use crate::segment::Segment;
use crate::{recovery, writer};

/// Called once with the outcome of a submitted write: `Ok` only after fdatasync.
pub type Durable = Box<dyn FnOnce(Result<()>) + Send + 'static>;

pub(crate) enum Msg {
    /// A batch, its callback and when it was submitted (for the append latency).
    Write(EncodedBatch, Durable, std::time::Instant),
    /// Seal the active segment now (compaction uses it to make old segments deletable).
    Rotate(Durable),
    /// Flush what is queued before this and stop.
    Shutdown,
}

/// Counters since open.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub records: AtomicU64,
    pub bytes_written: AtomicU64,
    pub syncs: AtomicU64,
    /// Group commits written and synced through io_uring (the rest: plain syscalls).
    pub ring_syncs: AtomicU64,
    pub sync_ns_total: AtomicU64,
    pub compacted_bytes: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub segments_recycled: AtomicU64,
    // ---- ops metrics (issue 7): latency histograms and entries written ----
    /// Submit to durable, per batch (queue wait, group commit, write, fdatasync).
    pub append_latency: crate::histogram::Histogram,
    /// One group commit's write + fdatasync, per flush.
    pub sync_latency: crate::histogram::Histogram,
    /// Entries appended (op counts of `Append` ops) since open.
    pub entries_written: AtomicU64,
    // ---- end ops metrics ----
}

/// State shared by the handle and the engine's threads.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub fs: Arc<dyn FileSystem>,
    pub index: RwLock<Index>,
    pub segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    pub failed: OnceLock<Arc<Error>>,
    /// Submitted work waiting for the leader (see `writer.rs`).
    pub queue: Mutex<writer::Queue>,
    /// The I/O thread waits here for the lead to be handed to it (or for closing).
    pub queue_cv: Condvar,
    /// The write path's state; held by the thread that leads.
    pub committer: Mutex<Option<writer::Committer>>,
    /// Queued batches still allowed (`queue_len_max` permits).
    pub queue_slots: tokio::sync::Semaphore,
    pub jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    pub backend: IoBackend,
    pub batch_bytes_max: usize,
    pub counters: Counters,
    pub cache: crate::cache::RecordCache,
    /// Bytes of queued batches still allowed (permits are bytes).
    pub queue_budget: tokio::sync::Semaphore,
    /// The byte budget of the queue: `queue_bytes_max`, but never below one batch.
    pub queue_bytes_max: u32,
    /// Dead segment files waiting to be reused.
    pub recycle: Mutex<Vec<PathBuf>>,
    /// Segments below this are covered by the durable checkpoint.
    pub checkpointed_before: AtomicU64,
    /// The segment the I/O thread appends to.
    pub active: AtomicU64,
    /// Where the next record goes in the active segment: the bytes of it in use, for
    /// [`Engine::log_disk_bytes`] (the rest of the preallocated file is zeros).
    pub active_end: AtomicU64,
    /// Set when the engine runs without threads (`inline.rs`, issue 9 simulation).
    pub inline: OnceLock<crate::inline::Inline>,
}

impl Shared {
    pub(crate) fn fail(&self, e: Error) -> Arc<Error> {
        let cause = Arc::new(e);
        if self.failed.set(cause.clone()).is_ok() {
            tracing::error!(error = %cause, "storage engine stopped: no further writes");
        }
        self.failed.get().expect("just set").clone()
    }

    pub(crate) fn stopped(&self) -> Option<Error> {
        self.failed
            .get()
            .map(|c| Error::Stopped { cause: c.clone() })
    }

    pub(crate) fn segment(&self, id: u64) -> Option<Arc<Segment>> {
        self.segments
            .read()
            .expect("segments lock")
            .get(&id)
            .cloned()
    }

    pub(crate) fn send_job(&self, job: Job) {
        // The maintenance thread outlives every sender but the last; a send can only
        // fail during shutdown, when the job no longer matters.
        let _ = self.jobs.lock().expect("jobs lock").send(job);
    }
}

/// A multi-log segment storage engine. See the crate docs.
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// What recovery cut as damage at open ([`crate::RecoveryMode::CutDamagedTail`]).
    damage: Option<Arc<crate::Damage>>,
}

/// A snapshot of what the engine holds and has done.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// The I/O backend in use.
    pub backend: IoBackend,
    /// Segment files in use.
    pub segments: usize,
    /// Bytes of those files on disk.
    pub segment_bytes: u64,
    /// Logs known.
    pub logs: usize,
    /// Entries currently held across all logs.
    pub entries: u64,
    /// Heap bytes of the index (spans, overrides, metadata, run tables, fence keys).
    pub index_memory_bytes: usize,
    /// Heap bytes of checked records held for reads (bounded by `read_cache_bytes`).
    pub read_cache_bytes: usize,
    /// Records written since open.
    pub records_written: u64,
    /// Bytes written since open (records, including headers and padding).
    pub bytes_written: u64,
    /// fdatasync calls since open.
    pub syncs: u64,
    /// Of those, the group commits written and synced through io_uring (the io_uring
    /// backend uses the ring only when a group has company to overlap with; a lone
    /// writer's rounds are plain pwritev + fdatasync: see `Writer::start`). Always 0 on
    /// the syscall backend.
    pub ring_syncs: u64,
    /// Mean fdatasync (write + sync for io_uring) time since open, in microseconds.
    pub sync_mean_us: f64,
    /// Bytes rewritten by compaction since open.
    pub compacted_bytes: u64,
    /// Segment files deleted or recycled since open.
    pub segments_freed: u64,
    // ---- ops metrics (issue 7) ----
    /// Entries appended since open (the sum of every append's entry count).
    pub entries_written: u64,
    /// Bytes of batches queued for the I/O thread now (bounded by `queue_bytes_max`).
    pub queued_bytes: u64,
    /// Submit-to-durable latency of each batch since open.
    pub append_latency: crate::histogram::HistogramSnapshot,
    /// Write + fdatasync latency of each group commit since open.
    pub sync_latency: crate::histogram::HistogramSnapshot,
    // ---- end ops metrics ----
}

/// What a compaction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Segments whose live entries were rewritten.
    pub segments_rewritten: usize,
    /// Entries rewritten.
    pub entries_rewritten: u64,
    /// Payload bytes rewritten.
    pub bytes_rewritten: u64,
}

/// First index and one past the last index of a log; empty when equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    pub first: u64,
    pub next: u64,
}

impl LogBounds {
    pub fn is_empty(&self) -> bool {
        self.first == self.next
    }
    /// The last index held, if any.
    pub fn last(&self) -> Option<u64> {
        (!self.is_empty()).then(|| self.next - 1)
    }
}

impl Engine {
    /// Opens (recovering) or creates the engine in `config.dir` on the real file system.
    pub fn open(config: Config) -> Result<Engine> {
        Engine::open_with(config, Arc::new(StdFileSystem))
    }

    /// Opens the engine on the given file system.
    pub fn open_with(config: Config, fs: Arc<dyn FileSystem>) -> Result<Engine> {
        config.validate()?;
        let started = std::time::Instant::now();
        // Inline (simulation): plain calls through the file system, no ring.
        let io_mode = match config.threads {
            EngineThreads::Background => config.io_mode,
            EngineThreads::Inline { .. } => crate::config::IoMode::Syscall,
        };
        let writer =
            crate::io::Writer::new(io_mode, config.sync_spin_us, config.slow_device_for_tests)
                .map_err(|e| Error::io("setting up io_uring", &config.dir, e))?;
        let recovered = recovery::recover(&config, fs.as_ref())?;
        let damage = recovered.damage.clone();
        let queue_bytes_max = config
            .queue_bytes_max
            .max(config.write_batch_bytes_max() + crate::format::RECORD_HEADER_BYTES)
            .min(u32::MAX as usize) as u32;
        let (job_tx, job_rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            batch_bytes_max: config.write_batch_bytes_max(),
            backend: writer.backend(),
            fs,
            index: RwLock::new(recovered.index),
            segments: RwLock::new(recovered.segments),
            failed: OnceLock::new(),
            queue: Mutex::new(writer::Queue::default()),
            queue_cv: Condvar::new(),
            committer: Mutex::new(None),
            queue_slots: tokio::sync::Semaphore::new(config.queue_len_max),
            jobs: Mutex::new(job_tx),
            counters: Counters::default(),
            cache: crate::cache::RecordCache::new(config.read_cache_bytes),
            queue_budget: tokio::sync::Semaphore::new(queue_bytes_max as usize),
            queue_bytes_max,
            recycle: Mutex::new(recovered.recycle),
            checkpointed_before: AtomicU64::new(recovered.checkpointed_before),
            active: AtomicU64::new(0),
            active_end: AtomicU64::new(0),
            inline: OnceLock::new(),
            config,
        });
        // ---- issue 9: the inline mode runs no threads (`inline.rs`) ----
        if let EngineThreads::Inline { salt_seed } = shared.config.threads {
            let start = writer::Start {
                tail: recovered.tail,
                next_record_seq: recovered.next_record_seq,
                sealed_pending: recovered.sealed_pending,
            };
            crate::inline::start(
                &shared,
                writer,
                start,
                recovered.next_segment_id,
                job_rx,
                salt_seed,
            )?;
            return Ok(Engine {
                shared,
                threads: Vec::new(),
                damage: damage.map(Arc::new),
            });
        }
        // ---- end issue 9 ----
        let (prep_tx, prep_rx) = std::sync::mpsc::sync_channel(0);
        let mut threads = Vec::new();
        let s = shared.clone();
        let next_id = recovered.next_segment_id;
        threads.push(spawn("chatlog-prepare", move || {
            maintenance::prepare_loop(s, next_id, prep_tx)
        })?);
        let s = shared.clone();
        threads.push(spawn("chatlog-maint", move || {
            maintenance::maintenance_loop(s, job_rx)
        })?);
        let start = writer::Start {
            tail: recovered.tail,
            next_record_seq: recovered.next_record_seq,
            sealed_pending: recovered.sealed_pending,
        };
        let s = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(spawn("chatlog-io", move || {
            writer::io_loop(s, prep_rx, writer, start, ready_tx)
        })?);
        let mut engine = Engine {
            shared,
            threads,
            damage: damage.map(Arc::new),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                engine.shutdown();
                return Err(e);
            }
            Err(_) => {
                engine.shutdown();
                return Err(Error::Closed);
            }
        }
        // Issue 9 (session 6): pin the logs a damage cut shortened (`crate::damage`).
        if let Some(pin) = engine.damage_pin_batch()
            && let Err(e) = engine.write_blocking(&pin)
        {
            engine.shutdown();
            return Err(e);
        }
        tracing::info!(
            dir = %engine.shared.config.dir.display(),
            backend = %engine.shared.backend,
            open_ms = started.elapsed().as_millis() as u64,
            "storage engine open"
        );
        Ok(engine)
    }

    /// The engine's shared state (issue 9: `crate::damage` cuts a stopped log).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The damaged record (and what followed it) that recovery cut at open, under
    /// [`crate::RecoveryMode::CutDamagedTail`]; `None` if there was none.
    pub fn damage(&self) -> Option<&Arc<crate::Damage>> {
        self.damage.as_ref()
    }

    #[cfg(test)]
    pub(crate) fn threads_is_empty_for_tests(&self) -> bool {
        self.threads.is_empty()
    }

    /// The I/O backend chosen at open.
    pub fn io_backend(&self) -> IoBackend {
        self.shared.backend
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Largest raw write batch accepted.
    pub fn write_batch_bytes_max(&self) -> usize {
        self.shared.batch_bytes_max
    }

    /// Queues a batch, waiting for queue space; `on_durable` is called exactly once, on
    /// the thread leading the group commit (the I/O thread, or a thread inside
    /// [`Engine::write_blocking`]), after the batch's fdatasync (or with the error that refused or
    /// lost it). An `Err` here means the batch was not queued and `on_durable` is dropped
    /// uncalled. Keep `on_durable` short: it runs on the write path.
    pub async fn submit(&self, batch: &WriteBatch, on_durable: Durable) -> Result<()> {
        submit(&self.shared, batch, on_durable).await
    }

    /// Writes a batch and returns once it is durable.
    pub async fn write(&self, batch: &WriteBatch) -> Result<()> {
        write(&self.shared, batch).await
    }

    /// Like [`Engine::write`], blocking the calling thread (inside an async runtime it
    /// blocks a worker thread: use [`Engine::write`] there). If no group commit is under
    /// way the calling thread performs it itself (write and fdatasync of everything
    /// queued), so a lone writer pays no thread hand-off.
    pub fn write_blocking(&self, batch: &WriteBatch) -> Result<()> {
        write_blocking(&self.shared, batch)
    }

    /// Seals the active segment and starts a new one, returning once the seal is durable.
    pub fn rotate_blocking(&self) -> Result<()> {
        rotate_blocking(&self.shared)
    }

    /// The bounds of a log, or `None` if the engine never heard of it.
    pub fn bounds(&self, log: LogId) -> Option<LogBounds> {
        let index = self.shared.index.read().expect("index lock");
        index.logs.get(&log).map(|l| LogBounds {
            first: l.bounds.first,
            next: l.bounds.next,
        })
    }

    /// A metadata value of a log.
    pub fn meta(&self, log: LogId, key: &[u8]) -> Option<Bytes> {
        let index = self.shared.index.read().expect("index lock");
        index.logs.get(&log).and_then(|l| l.meta.get(key).cloned())
    }

    /// Every log the engine knows (including logs that hold only metadata).
    pub fn logs(&self) -> Vec<LogId> {
        let index = self.shared.index.read().expect("index lock");
        let mut v: Vec<LogId> = index.logs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Entry `index` of `log`, checked.
    pub fn get(&self, log: LogId, index: u64) -> Result<Bytes> {
        let mut cache = None;
        read_entry(&self.shared, log, index, &mut cache)
    }

    /// Entries of `log` in `range`, in order, stopping early once `bytes_max` payload bytes
    /// are gathered (at least one entry is returned if the range is not empty). Errors if
    /// the start is not held; a range reaching past the end is cut at the end.
    pub fn read(&self, log: LogId, range: Range<u64>, bytes_max: usize) -> Result<Vec<Bytes>> {
        let mut out = Vec::new();
        if range.is_empty() {
            return Ok(out);
        }
        let end = match self.bounds(log) {
            Some(b) => range.end.min(b.next),
            None => range.end,
        };
        let mut cache = None;
        let mut bytes = 0usize;
        for index in range.start..end.max(range.start + 1) {
            let e = read_entry(&self.shared, log, index, &mut cache)?;
            bytes += e.len();
            out.push(e);
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(out)
    }

    /// Rewrites mostly-dead segments now (the maintenance thread also does it on its own
    /// schedule), then rotates so the rewritten segments can be freed, and returns once
    /// they are. Returns what was rewritten.
    pub fn compact_now(&self) -> Result<CompactionReport> {
        if let Some(e) = self.shared.stopped() {
            return Err(e);
        }
        if crate::inline::is_inline(&self.shared) {
            return crate::inline::compact_now(&self.shared);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared.send_job(Job::Compact(tx));
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Counters and sizes.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let index = self.shared.index.read().expect("index lock");
        let segments = self.shared.segments.read().expect("segments lock");
        let mut memory = 0usize;
        let mut entries = 0u64;
        for l in index.logs.values() {
            memory += 64 + l.spans.len() * 24 + l.overrides.len() * 48;
            memory += l
                .meta
                .iter()
                .map(|(k, v)| 64 + k.len() + v.len())
                .sum::<usize>();
            entries += l.bounds.next - l.bounds.first;
        }
        for runs in index.runs.values() {
            memory += runs.values().map(|v| 48 + v.capacity() * 24).sum::<usize>();
        }
        memory += segments
            .values()
            .map(|s| s.idx_memory_bytes() + 32)
            .sum::<usize>();
        let read_cache_bytes = self.shared.cache.memory_bytes();
        let syncs = c.syncs.load(Ordering::Relaxed);
        Stats {
            backend: self.shared.backend,
            segments: segments.len(),
            segment_bytes: segments.values().map(|s| s.len).sum(),
            logs: index.logs.len(),
            entries,
            index_memory_bytes: memory,
            read_cache_bytes,
            records_written: c.records.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            syncs,
            ring_syncs: c.ring_syncs.load(Ordering::Relaxed),
            sync_mean_us: if syncs == 0 {
                0.0
            } else {
                c.sync_ns_total.load(Ordering::Relaxed) as f64 / syncs as f64 / 1000.0
            },
            compacted_bytes: c.compacted_bytes.load(Ordering::Relaxed),
            segments_freed: c.segments_deleted.load(Ordering::Relaxed)
                + c.segments_recycled.load(Ordering::Relaxed),
            entries_written: c.entries_written.load(Ordering::Relaxed),
            queued_bytes: u64::from(self.shared.queue_bytes_max)
                .saturating_sub(self.shared.queue_budget.available_permits() as u64),
            append_latency: c.append_latency.snapshot(),
            sync_latency: c.sync_latency.snapshot(),
        }
    }

    // ---- ops metrics (issue 7): per-log disk size ----
    /// An estimate of the live bytes of `logs`: for each log, its live entries times the
    /// mean data bytes per entry of the appends the engine applied to it since it opened
    /// (replay included; entries removed since take their proportional share along). A
    /// log not appended to since open has no such mean: it is charged its share of each
    /// segment holding it instead, `bytes in use × its live entries there / entries
    /// written there`. Data bytes are uncompressed payloads; record headers, padding and
    /// metadata values are not counted.
    pub fn log_disk_bytes(&self, logs: &[LogId]) -> u64 {
        let index = self.shared.index.read().expect("index lock");
        let mut bytes = 0f64;
        // Entries per segment of the logs without a mean (the fallback).
        let mut by_segment: BTreeMap<u64, u64> = BTreeMap::new();
        for log in logs {
            let Some(state) = index.logs.get(log) else {
                continue;
            };
            let live = state.bounds.next - state.bounds.first;
            if let Some(mean) = state.seen.entry_bytes_mean() {
                bytes += live as f64 * mean;
                continue;
            }
            for span in &state.spans {
                *by_segment.entry(span.segment).or_default() += span.last - span.first + 1;
            }
        }
        if !by_segment.is_empty() {
            let active = self.shared.active.load(Ordering::Relaxed);
            let active_end = self.shared.active_end.load(Ordering::Relaxed);
            let segments = self.shared.segments.read().expect("segments lock");
            for (seg, n) in by_segment {
                let total = index.counts.get(&seg).map_or(0, |c| c.total);
                let Some(file) = segments.get(&seg) else {
                    continue;
                };
                if total == 0 {
                    continue;
                }
                let used = if seg == active {
                    active_end.min(file.len)
                } else {
                    file.len
                };
                bytes += used as f64 * (n.min(total) as f64 / total as f64);
            }
        }
        bytes.round() as u64
    }
    // ---- end ops metrics ----

    /// The failure that stopped the engine (a failed write, sync or preparation), if it
    /// has stopped: every later write fails with [`Error::Stopped`] naming it.
    pub fn stopped(&self) -> Option<Error> {
        self.shared.stopped()
    }

    /// Stops the threads, returning the error that stopped the engine, if any.
    pub fn close(mut self) -> Result<()> {
        self.shutdown();
        match self.shared.failed.get() {
            Some(cause) => Err(Error::Stopped {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn shutdown(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        // Never blocks: an engine may be dropped inside an async runtime. The I/O thread
        // commits what is queued before the shutdown, then exits.
        let _ = writer::enqueue(&self.shared, Msg::Shutdown, writer::Lead::IoThread);
        self.shared.send_job(Job::Shutdown);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io("spawning thread", name, e))
}

fn encode(shared: &Shared, batch: &WriteBatch) -> Result<EncodedBatch> {
    if let Some(e) = shared.stopped() {
        return Err(e);
    }
    batch.encode(shared.batch_bytes_max, shared.config.compression_bytes_min)
}

/// Bytes a queued batch holds against `queue_bytes_max` until the I/O thread takes it.
pub(crate) fn queued_bytes(batch: &EncodedBatch) -> u32 {
    // Batches are at most WRITE_BATCH_BYTES_MAX (16 MiB) raw, so this cannot truncate.
    batch.record.len() as u32
}

/// Waits for queue room (bytes and batches) for `encoded`; the leader gives it back when
/// it takes the batch.
async fn reserve(shared: &Shared, encoded: &EncodedBatch) -> Result<()> {
    // Queue space is counted in bytes as well as batches: 4,096 queued batches of 16 MiB
    // would otherwise be 64 GiB.
    let bytes = queued_bytes(encoded).min(shared.queue_bytes_max);
    shared
        .queue_budget
        .acquire_many(bytes)
        .await
        .map_err(|_| Error::Closed)?
        .forget();
    shared
        .queue_slots
        .acquire()
        .await
        .map_err(|_| Error::Closed)?
        .forget();
    Ok(())
}

async fn submit(shared: &Shared, batch: &WriteBatch, on_durable: Durable) -> Result<()> {
    let submitted = std::time::Instant::now();
    let encoded = encode(shared, batch)?;
    reserve(shared, &encoded).await?;
    if crate::inline::is_inline(shared) {
        return crate::inline::submit(shared, encoded, on_durable, submitted);
    }
    writer::enqueue(
        shared,
        Msg::Write(encoded, on_durable, submitted),
        writer::Lead::IoThread,
    )?;
    Ok(())
}

async fn write(shared: &Shared, batch: &WriteBatch) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    submit(shared, batch, Box::new(move |r| drop(tx.send(r)))).await?;
    rx.await.map_err(|_| Error::Closed)?
}

/// A write on the caller's thread: if nobody is committing, the caller leads the group
/// commit itself (no thread hand-off for a lone writer); otherwise it waits for the leader.
pub(crate) fn write_blocking(shared: &Shared, batch: &WriteBatch) -> Result<()> {
    let submitted = std::time::Instant::now();
    let encoded = encode(shared, batch)?;
    block_on(reserve(shared, &encoded))?;
    let (tx, rx) = oneshot::channel();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let on_durable: Durable = Box::new(move |r| {
        flag.store(true, Ordering::Release);
        drop(tx.send(r));
    });
    if writer::enqueue(
        shared,
        Msg::Write(encoded, on_durable, submitted),
        writer::Lead::Caller,
    )? {
        writer::lead(shared, Some(&done));
    }
    crate::inline::run_jobs(shared);
    block_on(rx).map_err(|_| Error::Closed)?
}

pub(crate) fn rotate_blocking(shared: &Shared) -> Result<()> {
    if crate::inline::is_inline(shared) {
        return crate::inline::rotate(shared);
    }
    let (tx, rx) = oneshot::channel();
    let done: Durable = Box::new(move |r| drop(tx.send(r)));
    writer::enqueue(shared, Msg::Rotate(done), writer::Lead::IoThread)?;
    block_on(rx).map_err(|_| Error::Closed)?
}

/// Runs a future to completion on the calling thread, parking between polls. The engine's
/// futures only wait on its own channels, woken by its threads, so no runtime is needed.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut future = std::pin::pin!(future);
    let waker = std::task::Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        if let std::task::Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Reads one checked entry. `cache` holds the last decoded record so a range read decodes
/// each record once.
pub(crate) fn read_entry(
    shared: &Shared,
    log: LogId,
    index: u64,
    cache: &mut Option<(u64, u32, BatchBody)>,
) -> Result<Bytes> {
    // A segment can be freed between the lookup and the read (compaction moved the
    // entry); looking up again then finds the new home.
    for _ in 0..3 {
        let lookup = shared
            .index
            .read()
            .expect("index lock")
            .locate(log, index)?;
        let (segment_id, known) = match lookup {
            Lookup::At(loc) => (loc.segment, Some(loc)),
            Lookup::InIndexFile { segment } => (segment, None),
        };
        let Some(segment) = shared.segment(segment_id) else {
            continue;
        };
        let result = (|| {
            let loc = match known {
                Some(loc) => loc,
                None => {
                    let idx = segment.idx(shared.fs.as_ref(), &shared.config.dir)?;
                    let run = idx.find(log, index)?.ok_or_else(|| {
                        Error::corruption(
                            crate::segment::idx_path(&shared.config.dir, segment_id),
                            0,
                            format!("no run for log {log} index {index}"),
                        )
                    })?;
                    Location {
                        segment: segment_id,
                        offset: run.offset,
                        op: run.op,
                    }
                }
            };
            let hit = matches!(cache, Some((s, o, _)) if *s == loc.segment && *o == loc.offset);
            if !hit {
                let body = match shared.cache.get(loc.segment, loc.offset) {
                    Some(body) => body,
                    None => {
                        let (body, private) = segment.batch_at(loc.offset as u64)?;
                        // Only private copies are cached: a large uncompressed body is a
                        // slice of the mapping and must be checked again on each read.
                        if private {
                            shared.cache.insert(loc.segment, loc.offset, body.clone());
                        }
                        body
                    }
                };
                *cache = Some((loc.segment, loc.offset, body));
            }
            let body = &cache.as_ref().expect("filled").2;
            entry_of(body, loc, log, index)
                .map_err(|d| Error::corruption(&segment.path, loc.offset as u64, d))
        })();
        return match result {
            Err(e) if e.is_corruption() => {
                let cause = Arc::new(e.clone());
                let mut idx = shared.index.write().expect("index lock");
                if let Some(l) = idx.logs.get_mut(&log) {
                    l.failed.get_or_insert(cause);
                }
                tracing::error!(log, index, error = %e, "corruption: log stopped");
                Err(e)
            }
            other => other,
        };
    }
    Err(Error::Closed)
}

/// Pair check of a read: the op the index points at must be the log's entries op that
/// covers `index`.
fn entry_of(body: &BatchBody, loc: Location, log: LogId, index: u64) -> Result<Bytes, String> {
    if loc.op as usize >= body.op_count() {
        return Err(format!(
            "index points at op {} of a {}-op record",
            loc.op,
            body.op_count()
        ));
    }
    let op = body.op(loc.op as usize);
    if !op.kind.carries_entries() || op.log_id != log {
        return Err(format!(
            "op {} holds {:?} of log {}, not log {log}",
            loc.op, op.kind, op.log_id
        ));
    }
    if index < op.index || index >= op.index + op.count as u64 {
        return Err(format!(
            "op {} covers [{}, +{}), not index {index}",
            loc.op, op.index, op.count
        ));
    }
    let k = if op.kind == OpKind::Redact {
        0
    } else {
        (index - op.index) as usize
    };
    Ok(body.entry(&op, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> Config {
        let mut c = Config::new(dir);
        c.segment_bytes = 256 << 10;
        c.compaction_interval_ms = 3_600_000;
        c
    }

    fn payload(log: u64, index: u64) -> Vec<u8> {
        format!("log={log} index={index} {}", "x".repeat(200)).into_bytes()
    }

    fn dir_contains(dir: &std::path::Path, needle: &[u8]) -> bool {
        std::fs::read_dir(dir).unwrap().any(|e| {
            // Maintenance may delete a file between the listing and the read.
            match std::fs::read(e.unwrap().path()) {
                Ok(bytes) => bytes.windows(needle.len()).any(|w| w == needle),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
                Err(err) => panic!("{err}"),
            }
        })
    }

    #[test]
    fn background_compaction_erases_redacted_bytes_of_the_active_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.compaction_interval_ms = 20;
        let e = Engine::open(cfg).unwrap();
        let mut b = WriteBatch::new();
        for index in 1..=20u64 {
            b.append(3, index, &payload(3, index));
        }
        e.write_blocking(&b).unwrap();
        let original = payload(3, 7);
        let mut b = WriteBatch::new();
        b.redact(3, 7, &vec![0; original.len()]);
        e.write_blocking(&b).unwrap();
        // Nothing else is written: the segment would never fill and be sealed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while dir_contains(dir.path(), &original) {
            assert!(
                std::time::Instant::now() < deadline,
                "redacted bytes stayed on disk"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(&e.get(3, 7).unwrap()[..], &vec![0; original.len()][..]);
        for index in (1..=20u64).filter(|i| *i != 7) {
            assert_eq!(e.get(3, index).unwrap(), payload(3, index));
        }
    }

    #[test]
    fn compaction_frees_purged_segments_and_erases_redacted_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let e = Engine::open(cfg.clone()).unwrap();
        for round in 1..=400u64 {
            let mut b = WriteBatch::new();
            for log in 0..8u64 {
                b.append(log, round, &payload(log, round));
            }
            e.write_blocking(&b).unwrap();
        }
        let before = e.stats();
        assert!(before.segments >= 3, "expected rotation, got {before:?}");
        // Keep only the last 40 entries of logs 0..7, except log 0 which keeps everything.
        let mut b = WriteBatch::new();
        for log in 1..8u64 {
            b.purge_before(log, 361);
        }
        let secret = b"SECRET-BODY-TO-ERASE";
        b.redact(0, 5, b"tombstone");
        e.write_blocking(&b).unwrap();
        // The original body of log 0 index 5 is on disk until compaction rewrites its segment.
        let original = payload(0, 5);
        assert!(dir_contains(dir.path(), &original));
        let _ = secret;
        let report = e.compact_now().unwrap();
        assert!(report.segments_rewritten > 0, "{report:?}");
        let after = e.stats();
        assert!(after.segments_freed > 0, "{after:?}");
        assert!(
            !dir_contains(dir.path(), &original),
            "redacted bytes survived compaction"
        );
        let check = |e: &Engine| {
            assert_eq!(&e.get(0, 5).unwrap()[..], b"tombstone");
            for index in 1..=400u64 {
                if index != 5 {
                    assert_eq!(e.get(0, index).unwrap(), payload(0, index));
                }
            }
            for log in 1..8u64 {
                assert_eq!(
                    e.bounds(log),
                    Some(LogBounds {
                        first: 361,
                        next: 401
                    })
                );
                assert!(matches!(e.get(log, 360), Err(Error::OutOfRange { .. })));
                for index in 361..=400u64 {
                    assert_eq!(e.get(log, index).unwrap(), payload(log, index));
                }
            }
        };
        check(&e);
        e.close().unwrap();
        let e = Engine::open(cfg).unwrap();
        check(&e);
        // Appends continue after reopen, and truncation then re-append replaces a suffix.
        let mut b = WriteBatch::new();
        b.truncate_after(1, 390);
        b.append(1, 391, b"replaced");
        e.write_blocking(&b).unwrap();
        assert_eq!(&e.get(1, 391).unwrap()[..], b"replaced");
        assert!(matches!(e.get(1, 392), Err(Error::OutOfRange { .. })));
        e.close().unwrap();
    }

    #[test]
    fn log_sizes_follow_the_bytes_appended_and_purged() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(config(dir.path())).unwrap();
        // Log 1: 100 entries of 1,000 bytes; log 2: 100 entries of 10 bytes, 20 a batch.
        for first in (1..=100u64).step_by(20) {
            let mut b = WriteBatch::new();
            b.append_many(1, first, (0..20).map(|_| vec![7u8; 1000]));
            b.append_many(2, first, (0..20).map(|_| vec![8u8; 10]));
            e.write_blocking(&b).unwrap();
        }
        let big = e.log_disk_bytes(&[1]);
        let small = e.log_disk_bytes(&[2]);
        assert!((100_000..=101_000).contains(&big), "log 1: {big}");
        assert!((1_000..=2_000).contains(&small), "log 2: {small}");
        assert_eq!(e.log_disk_bytes(&[1, 2]), big + small);
        assert_eq!(e.log_disk_bytes(&[99]), 0, "an unknown log holds nothing");
        let s = e.stats();
        assert_eq!(s.entries_written, 200);
        assert_eq!(s.append_latency.count, 5, "one observation per batch");
        assert!(s.sync_latency.count >= 1 && s.sync_latency.count <= 5);
        assert!(s.append_latency.sum_seconds >= s.sync_latency.sum_seconds * 0.99);

        let mut b = WriteBatch::new();
        b.purge_before(1, 51);
        e.write_blocking(&b).unwrap();
        let half = e.log_disk_bytes(&[1]);
        assert!(
            (50_000..=50_500).contains(&half),
            "log 1 after a purge of half: {half}"
        );

        // After a restart the logs' appends are replayed (no seal yet): the same figures.
        e.close().unwrap();
        let e = Engine::open(config(dir.path())).unwrap();
        assert_eq!(e.log_disk_bytes(&[1]), half);
        assert_eq!(e.log_disk_bytes(&[2]), small);
        let used = e.stats().segment_bytes;
        assert!(e.log_disk_bytes(&[1, 2]) <= used);
    }

    #[test]
    fn a_tiny_queue_budget_still_admits_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        // Raised to one largest batch: writers take turns, none is refused or stuck.
        cfg.queue_bytes_max = 1;
        let e = Arc::new(Engine::open(cfg).unwrap());
        let writers: Vec<_> = (0..4u64)
            .map(|log| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for index in 1..=50u64 {
                        let mut b = WriteBatch::new();
                        b.append(log, index, &payload(log, index));
                        e.write_blocking(&b).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        for log in 0..4u64 {
            assert_eq!(e.read(log, 1..51, usize::MAX).unwrap().len(), 50);
        }
        assert_eq!(
            e.shared.queue_budget.available_permits(),
            e.shared.queue_bytes_max as usize
        );
    }
}
