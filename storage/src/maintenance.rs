//! Background work: preparing the next segment ahead of need, persisting index files and
//! checkpoints after each seal, freeing dead segments (recycling their files), and
//! compaction — rewriting the live entries of mostly-dead segments at a bounded rate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::{Duration, Instant};

use crate::batch::WriteBatch;
use crate::checkpoint::Checkpoint;
use crate::engine::{CompactionReport, Shared, read_entry, rotate_blocking, write_blocking};
use crate::error::{Error, Result};
use crate::fs::write_file_atomic;
use crate::idx::{self, IdxFile};
use crate::segment::{Segment, idx_path, recycle_path};

/// Bytes of live entries compaction gathers into one rewrite batch.
const COMPACTION_BATCH_BYTES_MAX: usize = 1 << 20;

pub(crate) const CHECKPOINT_FILE: &str = "checkpoint";

pub(crate) enum Job {
    /// A segment was sealed: persist index files of sealed segments, then this checkpoint.
    Sealed(Box<Checkpoint>),
    Compact(Sender<Result<CompactionReport>>),
    Shutdown,
}

/// Keeps one prepared segment ready for the committer.
pub(crate) fn prepare_loop(
    shared: Arc<Shared>,
    mut next_id: u64,
    tx: SyncSender<Result<Arc<Segment>>>,
) {
    loop {
        let recycled = shared.recycle.lock().expect("recycle lock").pop();
        let result = Segment::create(
            shared.fs.as_ref(),
            &shared.config.dir,
            next_id,
            shared.config.segment_bytes,
            recycled,
            shared.config.preallocation,
        )
        .map(Arc::new);
        next_id += 1;
        let failed = result.is_err();
        // A send fails once the committer is gone; the unused segment is an empty tail
        // that recovery reuses.
        if tx.send(result).is_err() || failed {
            return;
        }
    }
}

pub(crate) fn maintenance_loop(shared: Arc<Shared>, jobs: Receiver<Job>) {
    let interval = Duration::from_millis(shared.config.compaction_interval_ms.max(1));
    loop {
        let job = match jobs.recv_timeout(interval) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                let redacted_active = active_holds_redactions(&shared);
                if shared.failed.get().is_none() && (redacted_active || has_candidates(&shared)) {
                    // Redacted bytes in the active segment leave the disk only once it is
                    // sealed and rewritten: seal it now, so erasure takes at most about
                    // one interval however slowly the segment fills.
                    if redacted_active && let Err(e) = rotate_blocking(&shared) {
                        tracing::warn!(error = %e, "sealing a segment with redacted bytes failed");
                        continue;
                    }
                    match compact(&shared, &jobs) {
                        Ok((_, true)) => return,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "background compaction failed"),
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        match job {
            Job::Sealed(cp) => {
                let started = std::time::Instant::now();
                crate::timeline::record(crate::timeline::Event::MaintStart, 0, 0);
                persist(&shared, &cp);
                crate::timeline::record(
                    crate::timeline::Event::MaintEnd,
                    0,
                    started.elapsed().as_micros() as u64,
                );
            }
            Job::Compact(reply) => {
                let (result, shutdown) = match compact(&shared, &jobs) {
                    Ok((report, shutdown)) => (Ok(report), shutdown),
                    Err(e) => (Err(e), false),
                };
                let _ = reply.send(result);
                if shutdown {
                    return;
                }
            }
            Job::Shutdown => return,
        }
    }
}

/// Index files for every sealed segment still held in memory, the checkpoint, then GC.
/// Any failure stops the engine: a checkpoint we cannot write means the directory
/// cannot be trusted to recover.
pub(crate) fn persist(shared: &Shared, cp: &Checkpoint) {
    if shared.failed.get().is_some() {
        return;
    }
    if let Err(e) = persist_inner(shared, cp) {
        shared.fail(e);
    }
}

fn persist_inner(shared: &Shared, cp: &Checkpoint) -> Result<()> {
    let dir = &shared.config.dir;
    let fs = shared.fs.as_ref();
    let pending: Vec<u64> = {
        let index = shared.index.read().expect("index lock");
        index
            .runs
            .keys()
            .copied()
            .filter(|id| *id < cp.replay_from)
            .collect()
    };
    for id in pending {
        let runs = shared
            .index
            .read()
            .expect("index lock")
            .runs
            .get(&id)
            .cloned();
        let Some(runs) = runs else { continue };
        let path = idx_path(dir, id);
        idx::write(fs, &path, id, &runs)?;
        if let Some(seg) = shared.segment(id) {
            seg.set_idx(Arc::new(IdxFile::open(fs, &path, id)?));
        }
        shared.index.write().expect("index lock").runs.remove(&id);
    }
    let path = dir.join(CHECKPOINT_FILE);
    write_file_atomic(fs, &path, &cp.encode())
        .map_err(|e| Error::io("writing checkpoint", &path, e))?;
    shared
        .checkpointed_before
        .fetch_max(cp.replay_from, Ordering::SeqCst);
    free_dead_segments(shared)
}

/// Deletes or recycles segments that hold no live entry and lie before the checkpoint.
fn free_dead_segments(shared: &Shared) -> Result<()> {
    let before = shared.checkpointed_before.load(Ordering::SeqCst);
    let active = shared.active.load(Ordering::SeqCst);
    let dead: Vec<(u64, bool)> = {
        let mut index = shared.index.write().expect("index lock");
        let dead: Vec<(u64, bool)> = index
            .counts
            .iter()
            .filter(|(id, c)| **id < before && **id != active && c.live == 0)
            .map(|(id, c)| (*id, c.redacted > 0))
            .collect();
        for (id, _) in &dead {
            index.counts.remove(id);
            index.runs.remove(id);
        }
        dead
    };
    if dead.is_empty() {
        return Ok(());
    }
    let dir = &shared.config.dir;
    let fs = shared.fs.as_ref();
    for (id, redacted) in dead {
        let Some(seg) = shared.segments.write().expect("segments lock").remove(&id) else {
            continue;
        };
        let idx = idx_path(dir, id);
        if let Err(e) = fs.remove(&idx)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(Error::io("removing index file", &idx, e));
        }
        let path = seg.path.clone();
        let mut recycle = shared.recycle.lock().expect("recycle lock");
        // Recycle only when no reader holds the mapping (a recycled file gets new bytes)
        // and nothing in it was redacted (a recycled file keeps its old bytes until
        // overwritten; redacted bytes must leave the disk).
        if !redacted
            && Arc::strong_count(&seg) == 1
            && recycle.len() < shared.config.recycle_segments_max
        {
            drop(seg);
            let to = recycle_path(dir, id);
            fs.rename(&path, &to)
                .map_err(|e| Error::io("recycling segment", &path, e))?;
            recycle.push(to);
            shared
                .counters
                .segments_recycled
                .fetch_add(1, Ordering::Relaxed);
        } else {
            drop(seg);
            fs.remove(&path)
                .map_err(|e| Error::io("removing segment", &path, e))?;
            shared
                .counters
                .segments_deleted
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    fs.sync_dir(dir)
        .map_err(|e| Error::io("syncing directory", dir, e))
}

fn candidates(shared: &Shared) -> Vec<u64> {
    let active = shared.active.load(Ordering::SeqCst);
    let ratio = shared.config.compaction_live_ratio_max;
    let index = shared.index.read().expect("index lock");
    let mut c: Vec<(f64, u64)> = index
        .counts
        .iter()
        .filter(|(id, c)| **id < active && c.total > 0 && c.live > 0)
        // A segment holding bytes replaced by a redaction is rewritten whatever its live
        // ratio: redacted bytes must leave the disk (secret chats count on it), not wait
        // until the rest of the segment dies. Sorted first (ratio -1).
        .map(|(id, c)| {
            let r = if c.redacted > 0 {
                -1.0
            } else {
                c.live as f64 / c.total as f64
            };
            (r, *id)
        })
        .filter(|(r, _)| *r < ratio)
        .collect();
    c.sort_by(|a, b| a.0.total_cmp(&b.0));
    c.into_iter().map(|(_, id)| id).collect()
}

/// True when the active segment holds bytes replaced by a redaction.
fn active_holds_redactions(shared: &Shared) -> bool {
    let active = shared.active.load(Ordering::SeqCst);
    let index = shared.index.read().expect("index lock");
    index.counts.get(&active).is_some_and(|c| c.redacted > 0)
}

fn has_candidates(shared: &Shared) -> bool {
    !candidates(shared).is_empty()
}

/// What of one segment is still live: per log, index ranges held through spans (minus
/// overrides elsewhere) and overrides stored in it.
/// Per log: inclusive index ranges held through spans, and indexes held as overrides.
type LiveEntries = BTreeMap<u64, (Vec<(u64, u64)>, Vec<u64>)>;

fn live_in(shared: &Shared, segment: u64) -> LiveEntries {
    let index = shared.index.read().expect("index lock");
    let mut out = BTreeMap::new();
    for (log, state) in &index.logs {
        let spans: Vec<(u64, u64)> = state
            .spans
            .iter()
            .filter(|s| s.segment == segment)
            .map(|s| (s.first, s.last))
            .collect();
        let redacts: Vec<u64> = state
            .overrides
            .iter()
            .filter(|(_, l)| l.segment == segment)
            .map(|(i, _)| *i)
            .collect();
        if !spans.is_empty() || !redacts.is_empty() {
            let spans = spans
                .into_iter()
                .flat_map(|(a, b)| {
                    // Split around overridden indexes: their current copy is elsewhere.
                    let mut parts = Vec::new();
                    let mut start = a;
                    for (i, _) in state.overrides.range(a..=b) {
                        if *i > start {
                            parts.push((start, *i - 1));
                        }
                        start = *i + 1;
                    }
                    if start <= b {
                        parts.push((start, b));
                    }
                    parts
                })
                .collect();
            out.insert(*log, (spans, redacts));
        }
    }
    out
}

/// One compaction pass. Returns the report and whether a shutdown was seen while
/// waiting for the rotation's checkpoint.
pub(crate) fn compact(shared: &Shared, jobs: &Receiver<Job>) -> Result<(CompactionReport, bool)> {
    let mut report = CompactionReport::default();
    let rate = shared.config.compaction_bytes_per_sec.max(1) as f64;
    let started = Instant::now();
    let batch_limit = COMPACTION_BATCH_BYTES_MAX.min(shared.batch_bytes_max);
    for segment in candidates(shared) {
        let mut batch = WriteBatch::new();
        let mut cache = None;
        let flush = |batch: &mut WriteBatch, report: &mut CompactionReport| -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            write_blocking(shared, batch)?;
            *batch = WriteBatch::new();
            // Bounded rate: stay behind `rate` bytes per second since the pass began.
            let due = Duration::from_secs_f64(report.bytes_rewritten as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            Ok(())
        };
        for (log, (spans, redacts)) in live_in(shared, segment) {
            for (a, b) in spans {
                for i in a..=b {
                    let payload = match read_entry(shared, log, i, &mut cache) {
                        Ok(p) => p,
                        // Purged or truncated since we looked: nothing to keep.
                        Err(Error::OutOfRange { .. }) => continue,
                        Err(e) => return Err(e),
                    };
                    if batch.encoded_len() + payload.len() + 4 + crate::format::OP_HEADER_BYTES
                        > batch_limit
                    {
                        flush(&mut batch, &mut report)?;
                    }
                    batch.rewrite(log, i, segment, &payload);
                    report.entries_rewritten += 1;
                    report.bytes_rewritten += payload.len() as u64;
                }
            }
            for i in redacts {
                match read_entry(shared, log, i, &mut cache) {
                    Ok(p) => {
                        if batch.encoded_len() + p.len() + 4 + crate::format::OP_HEADER_BYTES
                            > batch_limit
                        {
                            flush(&mut batch, &mut report)?;
                        }
                        batch.redact(log, i, &p);
                        report.entries_rewritten += 1;
                        report.bytes_rewritten += p.len() as u64;
                    }
                    Err(Error::OutOfRange { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        flush(&mut batch, &mut report)?;
        report.segments_rewritten += 1;
    }
    shared
        .counters
        .compacted_bytes
        .fetch_add(report.bytes_rewritten, Ordering::Relaxed);
    let active = shared.active.load(Ordering::SeqCst);
    let dead_waiting = {
        let before = shared.checkpointed_before.load(Ordering::SeqCst);
        let index = shared.index.read().expect("index lock");
        index
            .counts
            .iter()
            .any(|(id, c)| c.live == 0 && *id >= before && *id != active)
    };
    if report.segments_rewritten == 0 && !dead_waiting {
        return Ok((report, false));
    }
    // Seal so the next checkpoint covers the rewritten segments, then handle the jobs
    // that produced (the seal's among them) so they are freed before we return.
    rotate_blocking(shared)?;
    let mut shutdown = false;
    while let Ok(job) = jobs.try_recv() {
        match job {
            Job::Sealed(cp) => persist(shared, &cp),
            Job::Compact(reply) => drop(reply.send(Ok(CompactionReport::default()))),
            Job::Shutdown => shutdown = true,
        }
    }
    if let Some(e) = shared.stopped() {
        return Err(e);
    }
    Ok((report, shutdown))
}
