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
//! Overlap: while one group's write and fdatasync are in flight on io_uring, the leader
//! gathers, validates and places the next group (records are written straight from the
//! submitters' buffers with one vectored write, never copied into a group buffer). Once
//! the first is durable it submits the next at once and only then applies the first to
//! the index and calls back. With `Config::top_up_groups` (a node's engine) it first
//! takes into a small next group a few batches queued during the flight (that group was
//! gathered just after the first went out; session 11: without this, under a trickle of
//! submissions those batches waited a whole further flight and every group stayed
//! small). At most one group is in flight, so recovery's rule that only the last write
//! can be torn still holds. The syscall backend writes and syncs at
//! submit, so its groups stay serial; so does the io_uring backend for a group without
//! company (one batch, nothing queued behind it: a lone writer), where the ring would only
//! add a hand-off to a kernel worker and a wake-up back (`Writer::start`).
//!
//! Entries become readable once durable: the logs' bounds in the index move after the
//! fdatasync, so no reader ever sees bytes that a crash could take back. The rest of a
//! group's index update (spans, runs, counts: the cache misses) is staged while its write
//! and fdatasync are in flight, once every earlier group is applied, so only the bounds
//! update is left between fdatasync and acknowledgement (session 8).
//!
//! What it must not do: report a batch durable before its fdatasync returned, retry after
//! a failed write or sync (fail-stop), or block a tokio task in I/O.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use crate::LogId;
use crate::batch::{EncodedBatch, OpSummary};
use crate::checkpoint::Checkpoint;
use crate::config::{GROUP_RECORDS_MAX, SEAL_RESERVE_BYTES};
use crate::engine::{Durable, Msg, Shared};
use crate::error::{Error, Result};
use crate::format::{RECORD_HEADER_BYTES, RECORD_KIND_BATCH, RECORD_KIND_SEAL, RecordHeader};
use crate::index::Bounds;
use crate::io::Writer;
use crate::loghash::LogMap;
use crate::maintenance::Job;
use crate::segment::Segment;

/// `Committer::gather_more` tops up a group holding fewer records than this...
const GATHER_MORE_BELOW_RECORDS: usize = 4;
/// ...with at most this many more batches (`Config::top_up_groups`). Why: enough for the
/// trickle of a node's Raft groups' appends behind a gateway (~3 entries per group
/// commit without it), few enough that placing them after a flight, before its
/// callbacks, holds those up little (`raft_figures r1` measured level or better).
const GATHER_MORE_BATCHES_MAX: usize = 8;

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
    /// The group's records, each a whole record (header, body, padding) in its own buffer,
    /// written with one vectored write: a batch's bytes are not copied into a group buffer.
    /// At most [`GROUP_RECORDS_MAX`] of them.
    group: Vec<Vec<u8>>,
    /// Bytes of `group`.
    group_bytes: usize,
    /// Each buffered record's offset in the active segment and its ops, applied to the
    /// index once the group is durable.
    pending: Vec<(u32, Vec<OpSummary>)>,
    callbacks: Vec<Durable>,
    /// When each callback's batch was submitted (the append latency), parallel to
    /// `callbacks`.
    submitted: Vec<Instant>,
    /// Bounds of logs after the ops of the buffered group: what the next batch is
    /// validated against, before `overlay_in_flight` and the index.
    overlay: LogMap<LogId, Bounds>,
    /// The same for the group in flight (its ops reach the index once it is durable).
    overlay_in_flight: LogMap<LogId, Bounds>,
    /// One batch's bounds while it is validated (kept for its capacity).
    scratch: LogMap<LogId, Bounds>,
    /// The group whose write and fdatasync run while the next one is gathered.
    in_flight: Option<InFlight>,
}

/// A group commit submitted and not yet known durable. Owns the records' buffers, which
/// the kernel reads until the write is finished.
struct InFlight {
    group: Vec<Vec<u8>>,
    bytes: usize,
    /// Where its write began in the active segment.
    offset: u64,
    pending: Vec<(u32, Vec<OpSummary>)>,
    /// How many of `pending`'s records (a prefix) were staged in the index while the
    /// write and fdatasync ran ([`crate::index::Index::stage_appends`]); once durable they
    /// are only published, the rest applied whole.
    staged: usize,
    callbacks: Vec<Durable>,
    submitted: Vec<Instant>,
    started: Instant,
    /// The outcome of a write done at start (`sync_on_commit` off: no fdatasync to wait
    /// for).
    buffered: Option<std::io::Result<()>>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Never free buffers the kernel may still read; whoever waits gets an answer.
        if let Some(f) = self.in_flight.take() {
            let (f, _) = self.wait(f);
            for done in f.callbacks {
                done(Err(Error::Closed));
            }
        }
    }
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
            let busy = guard.as_ref().is_some_and(Committer::busy);
            if q.msgs.is_empty() && busy && !mine_done && !q.closed {
                // Nothing more to gather: finish the group in flight, then look again.
                drop(q);
                if let Some(c) = guard.as_mut() {
                    c.flush(shared);
                }
                continue;
            }
            if q.msgs.is_empty() || q.closed || mine_done {
                if (q.msgs.is_empty() && !busy) || q.closed {
                    q.leading = false;
                } else {
                    // Queued batches, or a group in flight: the I/O thread takes over
                    // (and finishes it) while the caller returns with its batch durable.
                    q.handoff = true;
                }
                // The I/O thread waits for a hand-off or closing, nothing else: waking it
                // when a lone writer merely gives up the lead cost it two context
                // switches per batch (session 8's profile).
                let wake = q.handoff || q.closed;
                drop(q);
                if wake {
                    shared.queue_cv.notify_all();
                }
                return;
            }
            let mut bytes = 0usize;
            // One record short of the iovec limit: a seal may join the group.
            while bytes < group_max && msgs.len() < GROUP_RECORDS_MAX - 1 {
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
                Msg::Write(batch, done, submitted) => c.add_queued(shared, batch, done, submitted),
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
        if shutdown {
            c.flush(shared);
        } else {
            c.commit_overlapped(shared);
        }
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
        Msg::Write(b, _, _) => b.record.len(),
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
            group: Vec::new(),
            group_bytes: 0,
            pending: Vec::new(),
            callbacks: Vec::new(),
            submitted: Vec::new(),
            overlay: LogMap::default(),
            overlay_in_flight: LogMap::default(),
            scratch: LogMap::default(),
            in_flight: None,
        };
        if seal_tail {
            t.seal_and_switch(shared)?;
        } else if start.sealed_pending {
            t.send_sealed(shared);
        }
        Ok(t)
    }

    /// Validates a batch and places its record in the group buffer.
    /// [`Committer::add`] for a batch taken from the submission queue: its room in the
    /// queue (bytes and a slot) goes back to the submitters.
    fn add_queued(
        &mut self,
        shared: &Shared,
        batch: EncodedBatch,
        done: Durable,
        submitted: Instant,
    ) {
        let bytes = crate::engine::queued_bytes(&batch).min(shared.queue_bytes_max);
        self.add(shared, batch, done, submitted);
        shared.queue_budget.add_permits(bytes as usize);
        shared.queue_slots.add_permits(1);
    }

    fn add(&mut self, shared: &Shared, batch: EncodedBatch, done: Durable, submitted: Instant) {
        if let Some(e) = shared.stopped() {
            done(Err(e));
            return;
        }
        if let Err(e) = self.validate(shared, &batch.ops) {
            done(Err(e));
            return;
        }
        let record = batch.record.len() as u64;
        let limit = self.active.len.min(shared.config.segment_bytes) - SEAL_RESERVE_BYTES;
        // On failure the group buffered so far already got its callbacks from the failed
        // flush; this batch is refused the same way.
        if self.offset + self.group_bytes as u64 + record > limit
            && let Err(e) = self.seal_and_switch(shared)
        {
            done(Err(e));
            return;
        }
        let write_offset = self.offset as u32;
        let at = (self.offset + self.group_bytes as u64) as u32;
        let header = RecordHeader {
            kind: RECORD_KIND_BATCH,
            flags: batch.flags,
            body_len: batch.body_len,
            raw_len: batch.raw_len,
            body_crc: batch.body_crc,
            record_seq: self.next_record_seq,
            write_offset,
        };
        self.next_record_seq += 1;
        let mut record = batch.record;
        debug_assert_eq!(record.len(), header.record_bytes());
        header.encode_into(self.active.salt, &mut record);
        self.group_bytes += record.len();
        self.group.push(record);
        self.pending.push((at, batch.ops));
        self.callbacks.push(done);
        self.submitted.push(submitted);
        // Only now: a seal above flushes and clears the overlay.
        let Committer {
            overlay, scratch, ..
        } = self;
        overlay.extend(scratch.drain());
    }

    /// Adds a record that did not come encoded from a submitter (a seal).
    fn push_record(&mut self, header: &RecordHeader, body: &[u8]) {
        let mut record = vec![0u8; header.record_bytes()];
        header.encode_into(self.active.salt, &mut record);
        record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + body.len()].copy_from_slice(body);
        self.group_bytes += record.len();
        self.group.push(record);
    }

    /// Checks a batch's ops in order against the logs' bounds as they will be once
    /// everything before it in this group is applied. All or nothing.
    /// The batch's bounds are left in `scratch` on success.
    fn validate(&mut self, shared: &Shared, ops: &[OpSummary]) -> Result<()> {
        let Committer {
            overlay,
            overlay_in_flight,
            scratch: local,
            ..
        } = self;
        local.clear();
        let index = shared.index.read().expect("index lock");
        for op in ops {
            let current = match local.get(&op.log_id) {
                Some(b) => *b,
                None => match overlay
                    .get(&op.log_id)
                    .or_else(|| overlay_in_flight.get(&op.log_id))
                {
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
        Ok(())
    }

    /// Whether a group is buffered or in flight (the lead may not lapse with either).
    fn busy(&self) -> bool {
        !self.group.is_empty() || self.in_flight.is_some()
    }

    /// Writes and syncs everything: the group in flight (if any), then the buffered
    /// group, publishing each. Returns with nothing in flight.
    fn flush(&mut self, shared: &Shared) {
        if let Some(f) = self.in_flight.take() {
            let (f, result) = self.wait(f);
            self.complete(shared, f, result);
        }
        if let Some(mut f) = self.start_group(shared) {
            self.stage(shared, &mut f);
            let (f, result) = self.wait(f);
            self.complete(shared, f, result);
        }
    }

    /// One overlapped step: once the group in flight (N) is durable, submits the buffered
    /// group (N+1) at once, then applies N to the index and calls N's callbacks while N+1's
    /// write and fdatasync run. The next group is gathered and placed while N+1 is in
    /// flight. Callbacks stay in submission order (N's before N+1's); after a failed N
    /// nothing more is submitted (fail-stop).
    fn commit_overlapped(&mut self, shared: &Shared) {
        let done = self.in_flight.take().map(|f| self.wait(f));
        let failed = matches!(&done, Some((_, Err(_))));
        if !failed {
            if done.is_some() {
                self.gather_more(shared);
            }
            self.in_flight = self.start_group(shared);
        }
        if let Some((f, result)) = done {
            // A failure here also refuses the buffered group (it was never submitted).
            self.complete(shared, f, result);
        }
        // N is in the index and acknowledged: N+1's index update runs while its write
        // and fdatasync are in flight (after N's callbacks, so it never delays them).
        if let Some(mut f) = self.in_flight.take() {
            self.stage(shared, &mut f);
            self.in_flight = Some(f);
        }
    }

    /// With `Config::top_up_groups`, takes into the buffered group (when small) a few of
    /// the write batches queued since it was gathered: the
    /// group was gathered just after the one before it went out, and batches queued while
    /// that one was in flight would otherwise wait out this group's flight too (a group
    /// later, and every group smaller). Up to the group limits; it stops at anything but
    /// a write (a rotation or shutdown keeps its place in the queue) and at a batch that
    /// would not fit the active segment (sealing here would write the buffered group
    /// before the one just durable is completed, out of submission order).
    fn gather_more(&mut self, shared: &Shared) {
        // Only a small group, and only a few batches: the batches taken in here are
        // placed after the previous group is durable and before its callbacks, on the
        // critical path (the gathering before a flight overlaps it). Under heavy load
        // the group is already large and the queue is left to the next one.
        if !shared.config.top_up_groups
            || self.group.is_empty()
            || self.group.len() >= GATHER_MORE_BELOW_RECORDS
        {
            return;
        }
        let group_max = shared.config.group_commit_bytes_max;
        let limit = self.active.len.min(shared.config.segment_bytes) - SEAL_RESERVE_BYTES;
        let mut taken: Vec<(EncodedBatch, Durable, Instant)> = Vec::new();
        {
            let mut q = shared.queue.lock().expect("queue lock");
            let (mut bytes, mut records) = (self.group_bytes, self.group.len());
            while bytes < group_max
                && records < GROUP_RECORDS_MAX - 1
                && taken.len() < GATHER_MORE_BATCHES_MAX
            {
                let fits = match q.msgs.front() {
                    Some(Msg::Write(batch, _, _)) => {
                        self.offset + (bytes + batch.record.len()) as u64 <= limit
                    }
                    _ => false,
                };
                if !fits {
                    break;
                }
                let Some(Msg::Write(batch, done, submitted)) = q.msgs.pop_front() else {
                    unreachable!("the front was just seen to be a write");
                };
                bytes += batch.record.len();
                records += 1;
                taken.push((batch, done, submitted));
            }
        }
        for (batch, done, submitted) in taken {
            self.add_queued(shared, batch, done, submitted);
        }
    }

    /// Begins the write (and fdatasync) of the buffered group; `None` if none is buffered.
    fn start_group(&mut self, shared: &Shared) -> Option<InFlight> {
        debug_assert!(self.in_flight.is_none(), "one group in flight at a time");
        if self.group.is_empty() {
            return None;
        }
        let started = Instant::now();
        crate::timeline::record(
            crate::timeline::Event::SyncStart,
            0,
            self.group.len() as u64,
        );
        let file = self.active.file.clone();
        let group = std::mem::take(&mut self.group);
        let iovecs: Vec<IoSlice<'_>> = group.iter().map(|r| IoSlice::new(r)).collect();
        // Something to gather while this group is in flight: batches already queued
        // behind it, or likely to come (this group merged several submitters' batches).
        // A lone writer has neither (see `Writer::start`).
        let overlap = group.len() > 1 || !shared.queue.lock().expect("queue lock").msgs.is_empty();
        let buffered = if shared.config.sync_on_commit {
            // SAFETY: the buffers are `group`'s records, which move into the returned
            // `InFlight` (moving a `Vec<Vec<u8>>` does not move the records' bytes) and
            // are only dropped after `wait` finished the write (`Committer`'s `Drop` too).
            let on_ring = unsafe {
                self.writer
                    .start(file.as_ref(), &iovecs, self.offset, overlap)
            };
            if on_ring {
                shared.counters.ring_syncs.fetch_add(1, Ordering::Relaxed);
            }
            None
        } else {
            Some(self.writer.write_only(file.as_ref(), &iovecs, self.offset))
        };
        drop(iovecs);
        // The buffered group's bounds now describe the group in flight. (The previous
        // group in flight, if any, was durable and is applied before anything else is
        // validated.)
        std::mem::swap(&mut self.overlay, &mut self.overlay_in_flight);
        self.overlay.clear();
        let f = InFlight {
            group,
            bytes: std::mem::take(&mut self.group_bytes),
            offset: self.offset,
            pending: std::mem::take(&mut self.pending),
            staged: 0,
            callbacks: std::mem::take(&mut self.callbacks),
            submitted: std::mem::take(&mut self.submitted),
            started,
            buffered,
        };
        self.offset += f.bytes as u64;
        Some(f)
    }

    /// Stages a started group's leading append-only records in the index while its write
    /// and fdatasync run (this thread would otherwise only wait): once durable each costs
    /// one bounds update per op instead of the whole index update
    /// ([`crate::index::Index::stage_appends`]). Nothing staged is readable before it is
    /// published. Called only once every group before `f` is in the index, so the index
    /// takes records in order.
    fn stage(&self, shared: &Shared, f: &mut InFlight) {
        debug_assert_eq!(f.staged, 0);
        let mut index = shared.index.write().expect("index lock");
        for (at, ops) in &f.pending {
            if !index.stage_appends(self.active.id, *at, ops) {
                break;
            }
            f.staged += 1;
        }
    }

    /// Waits for a started group's write and fdatasync.
    fn wait(&mut self, mut f: InFlight) -> (InFlight, std::io::Result<()>) {
        let result = match f.buffered.take() {
            Some(r) => r,
            None => {
                let file = self.active.file.clone();
                let mut iovecs: Vec<IoSlice<'_>> =
                    f.group.iter().map(|r| IoSlice::new(r)).collect();
                let r = self.writer.finish(file.as_ref(), &mut iovecs, f.offset);
                drop(iovecs);
                r
            }
        };
        (f, result)
    }

    /// Publishes a finished group: on success applies it to the index and reports it
    /// durable; on failure stops the engine (fail-stop) and refuses it, and the buffered
    /// group with it.
    fn complete(&mut self, shared: &Shared, f: InFlight, result: std::io::Result<()>) {
        let c = &shared.counters;
        c.syncs.fetch_add(1, Ordering::Relaxed);
        let synced = Instant::now();
        c.sync_ns_total
            .fetch_add((synced - f.started).as_nanos() as u64, Ordering::Relaxed);
        c.sync_latency.record(synced - f.started);
        crate::timeline::record(
            crate::timeline::Event::SyncEnd,
            0,
            (synced - f.started).as_micros() as u64,
        );
        let InFlight {
            group,
            bytes,
            offset,
            pending,
            staged,
            callbacks,
            submitted,
            ..
        } = f;
        drop(group);
        match result {
            Ok(()) => {
                let mut entries = 0u64;
                {
                    let mut index = shared.index.write().expect("index lock");
                    for (k, (at, ops)) in pending.iter().enumerate() {
                        entries += ops
                            .iter()
                            .filter(|op| op.kind == crate::format::OpKind::Append)
                            .map(|op| u64::from(op.count))
                            .sum::<u64>();
                        if k < staged {
                            index.publish_appends(ops);
                        } else {
                            index.apply_record(self.active.id, *at, ops);
                        }
                    }
                }
                c.entries_written.fetch_add(entries, Ordering::Relaxed);
                c.records
                    .fetch_add(callbacks.len() as u64, Ordering::Relaxed);
                c.bytes_written.fetch_add(bytes as u64, Ordering::Relaxed);
                shared
                    .active_end
                    .store(offset + bytes as u64, Ordering::Relaxed);
                if self.in_flight.is_none() {
                    // The index has caught up with the group that was in flight.
                    self.overlay_in_flight.clear();
                }
                for (done, submitted) in callbacks.into_iter().zip(submitted) {
                    c.append_latency
                        .record(synced.saturating_duration_since(submitted));
                    done(Ok(()));
                }
            }
            Err(e) => {
                // Fail-stop: after a failed write or fdatasync the page cache and the disk
                // may disagree; nothing in this group is reported durable, ever.
                let cause = shared.fail(Error::io("writing and syncing", &self.active.path, e));
                for done in callbacks {
                    done(Err(Error::Stopped {
                        cause: cause.clone(),
                    }));
                }
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
        crate::timeline::record(crate::timeline::Event::SegmentSwitch, 0, next.id);
        self.send_sealed(shared);
        Ok(())
    }

    fn flush_failed(&mut self, cause: &Arc<Error>) {
        self.overlay.clear();
        self.overlay_in_flight.clear();
        self.pending.clear();
        self.submitted.clear();
        self.group.clear();
        self.group_bytes = 0;
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
