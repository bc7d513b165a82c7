//! The I/O thread: the only writer of segment files' records. It drains the submission
//! queue into a group commit (many batches, many logs, one write and one fdatasync),
//! validates each batch against the logs' bounds, places records, writes and syncs, then
//! updates the index and reports durability in submission order. It seals a segment when
//! the next record does not fit and hands the sealed segment to maintenance.
//!
//! Entries become readable once durable: the index is updated after the fdatasync, so no
//! reader ever sees bytes that a crash could take back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use tokio::sync::mpsc;

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

struct IoThread {
    shared: Arc<Shared>,
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

pub(crate) fn io_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Msg>,
    prepared: Prepared,
    writer: Writer,
    start: Start,
    ready: Sender<Result<()>>,
) {
    let mut t = match IoThread::start(shared, prepared, writer, start) {
        Ok(t) => {
            let _ = ready.send(Ok(()));
            t
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let group_max = t.shared.config.group_commit_bytes_max;
    let mut msgs: Vec<Msg> = Vec::new();
    loop {
        let Some(first) = rx.blocking_recv() else {
            return;
        };
        let mut bytes = msg_bytes(&first);
        msgs.push(first);
        while bytes < group_max {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += msg_bytes(&m);
                    msgs.push(m);
                }
                Err(_) => break,
            }
        }
        for msg in msgs.drain(..) {
            match msg {
                Msg::Write(batch, done, submitted) => {
                    let bytes = crate::engine::queued_bytes(&batch).min(t.shared.queue_bytes_max);
                    t.add(batch, done, submitted);
                    t.shared.queue_budget.add_permits(bytes as usize);
                }
                Msg::Rotate(done) => {
                    t.flush();
                    let r = if t.shared.failed.get().is_some() {
                        Err(t.shared.stopped().expect("failed"))
                    } else {
                        t.seal_and_switch()
                    };
                    done(r);
                }
                Msg::Shutdown => {
                    t.flush();
                    return;
                }
            }
        }
        t.flush();
    }
}

fn msg_bytes(m: &Msg) -> usize {
    match m {
        Msg::Write(b, _, _) => b.body.len() + RECORD_HEADER_BYTES,
        _ => 0,
    }
}

impl IoThread {
    fn start(
        shared: Arc<Shared>,
        prepared: Prepared,
        writer: Writer,
        start: Start,
    ) -> Result<IoThread> {
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
        let mut t = IoThread {
            shared,
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
            t.seal_and_switch()?;
        } else if start.sealed_pending {
            t.send_sealed();
        }
        Ok(t)
    }

    /// Validates a batch and places its record in the group buffer.
    fn add(&mut self, batch: EncodedBatch, done: Durable, submitted: Instant) {
        if let Some(e) = self.shared.stopped() {
            done(Err(e));
            return;
        }
        let bounds = match self.validate(&batch.ops) {
            Ok(b) => b,
            Err(e) => {
                done(Err(e));
                return;
            }
        };
        let record = align_up(RECORD_HEADER_BYTES + batch.body.len()) as u64;
        let limit = self.active.len.min(self.shared.config.segment_bytes) - SEAL_RESERVE_BYTES;
        // On failure the group buffered so far already got its callbacks from the failed
        // flush; this batch is refused the same way.
        if self.offset + self.buf.len() as u64 + record > limit
            && let Err(e) = self.seal_and_switch()
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
    fn validate(&self, ops: &[OpSummary]) -> Result<HashMap<LogId, Bounds>> {
        let mut local: HashMap<LogId, Bounds> = HashMap::with_capacity(ops.len());
        let index = self.shared.index.read().expect("index lock");
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
    fn flush(&mut self) {
        self.overlay.clear();
        if self.buf.is_empty() {
            return;
        }
        let started = Instant::now();
        let file = self.active.file.as_ref();
        let result = if self.shared.config.sync_on_commit {
            self.writer.write_and_sync(file, &self.buf, self.offset)
        } else {
            self.writer.write_only(file, &self.buf, self.offset)
        };
        let c = &self.shared.counters;
        c.syncs.fetch_add(1, Ordering::Relaxed);
        let synced = Instant::now();
        c.sync_ns_total
            .fetch_add((synced - started).as_nanos() as u64, Ordering::Relaxed);
        c.sync_latency.record(synced - started);
        match result {
            Ok(()) => {
                let mut entries = 0u64;
                {
                    let mut index = self.shared.index.write().expect("index lock");
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
                self.shared.active_end.store(self.offset, Ordering::Relaxed);
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
                let cause =
                    self.shared
                        .fail(Error::io("writing and syncing", &self.active.path, e));
                self.flush_failed(&cause);
            }
        }
    }

    /// Writes a seal record (with whatever is buffered), syncs, and switches to a
    /// prepared segment.
    fn seal_and_switch(&mut self) -> Result<()> {
        let next = match take_prepared(&self.prepared) {
            Ok(s) => s,
            Err(e) => {
                let cause = self.shared.fail(e);
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
        self.flush();
        if let Some(e) = self.shared.stopped() {
            return Err(e);
        }
        self.shared.counters.records.fetch_add(1, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.active, next.clone());
        self.shared
            .segments
            .write()
            .expect("segments lock")
            .insert(next.id, next.clone());
        self.offset = crate::format::SEGMENT_HEADER_BYTES as u64;
        self.shared.active_end.store(self.offset, Ordering::Relaxed);
        self.shared.active.store(next.id, Ordering::SeqCst);
        tracing::debug!(sealed = old.id, active = next.id, "segment sealed");
        self.send_sealed();
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
    fn send_sealed(&self) {
        let index = self.shared.index.read().expect("index lock");
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
        self.shared.send_job(Job::Sealed(Box::new(checkpoint)));
    }
}

fn take_prepared(prepared: &Receiver<Result<Arc<Segment>>>) -> Result<Arc<Segment>> {
    match prepared.recv() {
        Ok(r) => r,
        Err(_) => Err(Error::Closed),
    }
}
