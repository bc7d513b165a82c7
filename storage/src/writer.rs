//! The write path: the committer (the only writer of segment files' records) and who runs
//! it. A group commit drains the submission queue (many batches, many logs: one write and
//! one fdatasync), validates each batch against the logs' bounds, places records, writes
//! and syncs, then updates the index and reports durability in submission order. It seals
//! a segment when the next record does not fit and hands the sealed segment to
//! maintenance.
//!
//! Who commits (leader/follower, as RocksDB and raft-engine do): a thread that writes and
//! waits ([`crate::Engine::write_blocking`]) and finds nobody committing becomes the
//! leader and runs the group commit itself on its own thread, taking along whatever else
//! is queued; submitters arriving meanwhile queue and wait. So a lone writer pays no
//! thread hand-off at all. Once its own batch is durable a leader hands any batches still
//! queued to the I/O thread (`chatlog-io`), which also commits everything submitted
//! asynchronously ([`crate::Engine::submit`], `write().await`: a tokio task must not block
//! in fdatasync). Exactly one thread leads at a time (`Queue::leading`), and callbacks
//! run under the committer lock, so groups and callbacks stay in submission order.
//!
//! Entries become readable once durable: the index is updated after the fdatasync, so no
//! reader ever sees bytes that a crash could take back.
//!
//! What it must not do: report a batch durable before its fdatasync returned, retry after
//! a failed write or sync (fail-stop), or block a tokio task in I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use crate::LogId;
use crate::batch::{EncodedBatch, OpSummary};
use crate::checkpoint::Checkpoint;
use crate::config::SEAL_RESERVE_BYTES;
use crate::engine::{Durable, Msg, Shared};
use crate::error::{Error, Result};
use crate::format::{
    RECORD_HEADER_BYTES, RECORD_KIND_BATCH, RECORD_KIND_SEAL, RecordHeader, align_up,
};
use crate::index::Bounds;
use crate::io::Writer;
use crate::maintenance::Job;
use crate::segment::Segment;

/// The recovered tail handed to the I/O thread.
#[derive(Debug)]
pub(crate) struct Tail {
    pub segment: Arc<Segment>,
    /// Where the next record would go.
    pub end: u64,
    /// Whether it holds records (then it is sealed at start, never appended to again:
    /// bytes past a torn tail must never be mistaken for new records).
    pub has_records: bool,
}

#[derive(Debug)]
pub(crate) struct Start {
    pub tail: Option<Tail>,
    pub next_record_seq: u64,
    /// Replayed segments need their index files and a fresh checkpoint.
    pub sealed_pending: bool,
}

type Prepared = std::sync::mpsc::Receiver<Result<Arc<Segment>>>;

/// The state of the write path, owned by whichever thread leads (behind
/// `Shared::committer`).
pub(crate) struct Committer {
    writer: Writer,
    prepared: Prepared,
    active: Arc<Segment>,
    /// Next write position in the active segment.
    offset: u64,
    next_record_seq: u64,
    buf: Vec<u8>,
    /// Each buffered record's offset in the active segment and its ops, applied to the
    /// index once the group is durable.
    pending: Vec<(u32, Vec<OpSummary>)>,
    callbacks: Vec<Durable>,
    /// When each callback's batch was submitted (the append latency), parallel to
    /// `callbacks`.
    submitted: Vec<Instant>,
    overlay: HashMap<LogId, Bounds>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("writer", &self.writer)
            .field("active", &self.active.id)
            .field("offset", &self.offset)
            .finish()
    }
}

/// Submitted work waiting for a leader (behind `Shared::queue`).
#[derive(Default)]
pub(crate) struct Queue {
    pub msgs: VecDeque<Msg>,
    /// A thread is leading (committing, or about to): nobody else may take the committer.
    pub leading: bool,
    /// The lead was handed to the I/O thread, which must take it.
    pub handoff: bool,
    /// Shutdown was committed: nothing more is accepted, the I/O thread exits.
    pub closed: bool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("msgs", &self.msgs.len())
            .field("leading", &self.leading)
            .field("handoff", &self.handoff)
            .field("closed", &self.closed)
            .finish()
    }
}

/// Who runs the group commit for a message just queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lead {
    /// The caller will wait for durability on its own thread: it leads if nobody does.
    Caller,
    /// The caller must not block (async submitters, maintenance): the I/O thread leads if
    /// nobody does.
    IoThread,
}

/// Queues `msg`. `Ok(true)`: the caller is now the leader and must call [`lead`].
pub(crate) fn enqueue(shared: &Shared, msg: Msg, who: Lead) -> Result<bool> {
    let mut q = shared.queue.lock().expect("queue lock");
    if q.closed {
        return Err(Error::Closed);
    }
    q.msgs.push_back(msg);
    if q.leading {
        return Ok(false);
    }
    q.leading = true;
    if who == Lead::Caller {
        return Ok(true);
    }
    q.handoff = true;
    drop(q);
    shared.queue_cv.notify_all();
    Ok(false)
}

/// Runs group commits as the leader until the queue is empty or, with `mine`, until the
/// caller's own batch is done; then gives up the lead (to the I/O thread if batches are
/// still queued).
pub(crate) fn lead(shared: &Shared, mine: Option<&AtomicBool>) {
    let mut guard = shared.committer.lock().expect("committer lock");
    let group_max = shared.config.group_commit_bytes_max;
    let mut msgs: Vec<Msg> = Vec::new();
    loop {
        {
            let mut q = shared.queue.lock().expect("queue lock");
            let mine_done = mine.is_some_and(|m| m.load(Ordering::Acquire));
            if q.msgs.is_empty() || q.closed || mine_done {
                if q.msgs.is_empty() || q.closed {
                    q.leading = false;
                } else {
                    q.handoff = true;
                }
                // Waiters of the I/O thread: a hand-off, or closing.
                drop(q);
                shared.queue_cv.notify_all();
                return;
            }
            let mut bytes = 0usize;
            while bytes < group_max {
                let Some(m) = q.msgs.pop_front() else {
                    break;
                };
                bytes += msg_bytes(&m);
                msgs.push(m);
            }
        }
        let Some(c) = guard.as_mut() else {
            // The committer failed to start: nothing can be written.
            for m in msgs.drain(..) {
                refuse(m, Error::Closed);
            }
            continue;
        };
        let mut shutdown = false;
        let mut drained = msgs.drain(..);
        for msg in drained.by_ref() {
            match msg {
                Msg::Write(batch, done, submitted) => {
                    let bytes = crate::engine::queued_bytes(&batch).min(shared.queue_bytes_max);
                    c.add(shared, batch, done, submitted);
                    shared.queue_budget.add_permits(bytes as usize);
                    shared.queue_slots.add_permits(1);
                }
                Msg::Rotate(done) => {
                    c.flush(shared);
                    let r = if shared.failed.get().is_some() {
                        Err(shared.stopped().expect("failed"))
                    } else {
                        c.seal_and_switch(shared)
                    };
                    done(r);
                }
                Msg::Shutdown => {
                    shutdown = true;
                    break;
                }
            }
        }
        c.flush(shared);
        if shutdown {
            // Whatever came after the shutdown is refused, then the queue closes.
            let rest: Vec<Msg> = drained.collect();
            let queued: Vec<Msg> = {
                let mut q = shared.queue.lock().expect("queue lock");
                q.closed = true;
                q.msgs.drain(..).collect()
            };
            for m in rest.into_iter().chain(queued) {
                refuse(m, Error::Closed);
            }
        }
    }
}

fn refuse(m: Msg, e: Error) {
    match m {
        Msg::Write(_, done, _) | Msg::Rotate(done) => done(Err(e)),
        Msg::Shutdown => {}
    }
}

/// The I/O thread: sets up the committer, then leads whenever the lead is handed to it.
pub(crate) fn io_loop(
    shared: Arc<Shared>,
    prepared: Prepared,
    writer: Writer,
    start: Start,
    ready: Sender<Result<()>>,
) {
    match Committer::start(&shared, prepared, writer, start) {
        Ok(c) => {
            *shared.committer.lock().expect("committer lock") = Some(c);
            let _ = ready.send(Ok(()));
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    }
    loop {
        {
            let mut q = shared.queue.lock().expect("queue lock");
            while !q.handoff && !q.closed {
                q = shared.queue_cv.wait(q).expect("queue lock");
            }
            if q.closed {
                drop(q);
                // Dropping the committer drops the receiver of prepared segments, which
                // lets the preparing thread end.
                drop(shared.committer.lock().expect("committer lock").take());
                return;
            }
            q.handoff = false;
        }
        lead(&shared, None);
    }
}

fn msg_bytes(m: &Msg) -> usize {
    match m {
        Msg::Write(b, _, _) => b.body.len() + RECORD_HEADER_BYTES,
        _ => 0,
    }
}

impl Committer {
    /// Sets up the write path (the I/O thread calls it; so does the inline mode's open).
    pub(crate) fn start(
        shared: &Shared,
        prepared: Prepared,
        writer: Writer,
        start: Start,
    ) -> Result<Committer> {
        let (active, offset, seal_tail) = match start.tail {
            Some(tail) if !tail.has_records => (tail.segment, tail.end, false),
            Some(tail) => (tail.segment, tail.end, true),
            None => {
                let seg = take_prepared(&prepared)?;
                shared
                    .segments
                    .write()
                    .expect("segments lock")
                    .insert(seg.id, seg.clone());
                (seg, crate::format::SEGMENT_HEADER_BYTES as u64, false)
            }
        };
        shared.active.store(active.id, Ordering::SeqCst);
        shared.active_end.store(offset, Ordering::Relaxed);
        let mut t = Committer {
            writer,
            prepared,
            active,
            offset,
            next_record_seq: start.next_record_seq,
            buf: Vec::new(),
            pending: Vec::new(),
            callbacks: Vec::new(),
            submitted: Vec::new(),
            overlay: HashMap::new(),
        };
        if seal_tail {
            t.seal_and_switch(shared)?;
        } else if start.sealed_pending {
            t.send_sealed(shared);
        }
        Ok(t)
    }

    /// Validates a batch and places its record in the group buffer.
    fn add(&mut self, shared: &Shared, batch: EncodedBatch, done: Durable, submitted: Instant) {
        if let Some(e) = shared.stopped() {
            done(Err(e));
            return;
        }
        let bounds = match self.validate(shared, &batch.ops) {
            Ok(b) => b,
            Err(e) => {
                done(Err(e));
                return;
            }
        };
        let record = align_up(RECORD_HEADER_BYTES + batch.body.len()) as u64;
        let limit = self.active.len.min(shared.config.segment_bytes) - SEAL_RESERVE_BYTES;
        // On failure the group buffered so far already got its callbacks from the failed
        // flush; this batch is refused the same way.
        if self.offset + self.buf.len() as u64 + record > limit
            && let Err(e) = self.seal_and_switch(shared)
        {
            done(Err(e));
            return;
        }
        let write_offset = self.offset as u32;
        let at = (self.offset + self.buf.len() as u64) as u32;
        let header = RecordHeader {
            kind: RECORD_KIND_BATCH,
            flags: batch.flags,
            body_len: batch.body.len() as u32,
            raw_len: batch.raw_len,
            body_crc: batch.body_crc,
            record_seq: self.next_record_seq,
            write_offset,
        };
        self.next_record_seq += 1;
        self.push_record(&header, &batch.body);
        self.pending.push((at, batch.ops));
        self.callbacks.push(done);
        self.submitted.push(submitted);
        // Only now: a seal above flushes and clears the overlay.
        self.overlay.extend(bounds);
    }

    fn push_record(&mut self, header: &RecordHeader, body: &[u8]) {
        let start = self.buf.len();
        self.buf.resize(start + RECORD_HEADER_BYTES, 0);
        header.encode_into(self.active.salt, &mut self.buf[start..]);
        self.buf.extend_from_slice(body);
        self.buf.resize(start + header.record_bytes(), 0);
    }

    /// Checks a batch's ops in order against the logs' bounds as they will be once
    /// everything before it in this group is applied. All or nothing.
    fn validate(&self, shared: &Shared, ops: &[OpSummary]) -> Result<HashMap<LogId, Bounds>> {
        let mut local: HashMap<LogId, Bounds> = HashMap::with_capacity(ops.len());
        let index = shared.index.read().expect("index lock");
        for op in ops {
            let current = match local.get(&op.log_id) {
                Some(b) => *b,
                None => match self.overlay.get(&op.log_id) {
                    Some(b) => *b,
                    None => match index.logs.get(&op.log_id) {
                        Some(l) => {
                            if let Some(cause) = &l.failed {
                                return Err(Error::LogFailed {
                                    log: op.log_id,
                                    cause: cause.clone(),
                                });
                            }
                            l.bounds
                        }
                        None => Bounds::default(),
                    },
                },
            };
            let next = current.after(op).map_err(|reason| Error::InvalidWrite {
                log: op.log_id,
                reason,
            })?;
            local.insert(op.log_id, next);
        }
        Ok(local)
    }

    /// Writes and syncs the group buffer, then publishes it.
    fn flush(&mut self, shared: &Shared) {
        self.overlay.clear();
        if self.buf.is_empty() {
            return;
        }
        let started = Instant::now();
        let file = self.active.file.as_ref();
        let result = if shared.config.sync_on_commit {
            self.writer.write_and_sync(file, &self.buf, self.offset)
        } else {
            self.writer.write_only(file, &self.buf, self.offset)
        };
        let c = &shared.counters;
        c.syncs.fetch_add(1, Ordering::Relaxed);
        let synced = Instant::now();
        c.sync_ns_total
            .fetch_add((synced - started).as_nanos() as u64, Ordering::Relaxed);
        c.sync_latency.record(synced - started);
        match result {
            Ok(()) => {
                let mut entries = 0u64;
                {
                    let mut index = shared.index.write().expect("index lock");
                    for (at, ops) in self.pending.drain(..) {
                        entries += ops
                            .iter()
                            .filter(|op| op.kind == crate::format::OpKind::Append)
                            .map(|op| u64::from(op.count))
                            .sum::<u64>();
                        index.apply_record(self.active.id, at, &ops);
                    }
                }
                c.entries_written.fetch_add(entries, Ordering::Relaxed);
                c.records
                    .fetch_add(self.callbacks.len() as u64, Ordering::Relaxed);
                c.bytes_written
                    .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
                self.offset += self.buf.len() as u64;
                shared.active_end.store(self.offset, Ordering::Relaxed);
                self.buf.clear();
                for (done, submitted) in self.callbacks.drain(..).zip(self.submitted.drain(..)) {
                    c.append_latency
                        .record(synced.saturating_duration_since(submitted));
                    done(Ok(()));
                }
            }
            Err(e) => {
                // Fail-stop: after a failed write or fdatasync the page cache and the disk
                // may disagree; nothing in this group is reported durable, ever.
                let cause = shared.fail(Error::io("writing and syncing", &self.active.path, e));
                self.flush_failed(&cause);
            }
        }
    }

    /// Writes a seal record (with whatever is buffered), syncs, and switches to a
    /// prepared segment.
    fn seal_and_switch(&mut self, shared: &Shared) -> Result<()> {
        let next = match take_prepared(&self.prepared) {
            Ok(s) => s,
            Err(e) => {
                let cause = shared.fail(e);
                self.flush_failed(&cause);
                return Err(Error::Stopped { cause });
            }
        };
        let body = next.id.to_le_bytes();
        let header = RecordHeader {
            kind: RECORD_KIND_SEAL,
            flags: 0,
            body_len: 8,
            raw_len: 8,
            body_crc: crc32fast::hash(&body),
            record_seq: self.next_record_seq,
            write_offset: self.offset as u32,
        };
        self.next_record_seq += 1;
        // The seal goes with the buffered records in one write; fix up write_offset of the
        // buffered ones is unnecessary: they already carry this write's start.
        self.push_record(&header, &body);
        // The seal is not a submitted batch: flush() must not count it as one.
        self.flush(shared);
        if let Some(e) = shared.stopped() {
            return Err(e);
        }
        shared.counters.records.fetch_add(1, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.active, next.clone());
        shared
            .segments
            .write()
            .expect("segments lock")
            .insert(next.id, next.clone());
        self.offset = crate::format::SEGMENT_HEADER_BYTES as u64;
        shared.active_end.store(self.offset, Ordering::Relaxed);
        shared.active.store(next.id, Ordering::SeqCst);
        tracing::debug!(sealed = old.id, active = next.id, "segment sealed");
        self.send_sealed(shared);
        Ok(())
    }

    fn flush_failed(&mut self, cause: &Arc<Error>) {
        self.pending.clear();
        self.submitted.clear();
        self.buf.clear();
        for done in self.callbacks.drain(..) {
            done(Err(Error::Stopped {
                cause: cause.clone(),
            }));
        }
    }

    /// Hands maintenance a checkpoint of the index as of the start of the active segment.
    fn send_sealed(&self, shared: &Shared) {
        let index = shared.index.read().expect("index lock");
        let mut logs = index.logs.clone();
        for l in logs.values_mut() {
            l.failed = None;
        }
        let checkpoint = Checkpoint {
            replay_from: self.active.id,
            next_record_seq: self.next_record_seq,
            counts: index.counts.clone(),
            logs,
        };
        drop(index);
        shared.send_job(Job::Sealed(Box::new(checkpoint)));
    }
}

fn take_prepared(prepared: &Receiver<Result<Arc<Segment>>>) -> Result<Arc<Segment>> {
    match prepared.recv() {
        Ok(r) => r,
        Err(_) => Err(Error::Closed),
    }
}
