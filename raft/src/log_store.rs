//! One group's Raft log over the node's shared storage engine: openraft's
//! `RaftLogStorage` (`LogStore`) and `RaftLogReader` (`LogReader`).
//!
//! What it owns: the group's engine log (see `ids` for the layout and the index shift),
//! the vote, committed and purged marks in that log's metadata, and the **unflushed
//! tail**. What it must not do: wait for an fdatasync in `append` (one sync must cover
//! many groups' appends), report an append flushed before the engine said so, or let
//! writes of one group reach the disk out of order.
//!
//! The unflushed tail. Openraft reads an entry as soon as `append` returns, before its
//! flush callback (replication sends it to followers in parallel with the leader's own
//! fdatasync; apply may run once followers made it durable). The engine makes entries
//! readable only once durable, so entries handed to the engine are also kept here until
//! their batch's durable callback fires, which happens after the engine indexed them.
//! Readers take an index from the tail if it is there, else from the engine. The tail is
//! a contiguous run of the log's newest entries; its size is bounded by what openraft
//! submits before a flush completes, which the engine's queue bounds in turn
//! (`Config::queue_len_max` batches and `queue_bytes_max` bytes; `submit` waits beyond
//! them).
//!
//! Full log ids on read. Every entry read back (engine or tail) must carry the log id the
//! log holds at its index, leader id included, not only the index: `State::leaders` keeps
//! the leader id of each run of entries (rebuilt at open by binary search over the
//! engine, O(leader changes × log n) reads). An entry of an older term read at the right
//! index (issue 9: a stale copy after a truncation) is an `Inconsistent` error, never
//! data handed to replication or apply. A read that raced a truncation is retried.
//!
//! Issue 9, the "synced" marker (`crate::repair`). The first batch of every append and
//! every committed-mark batch carry `repair::META_SYNCED`, the index the log was durable
//! through when the batch was built; a marker writer task puts it in a batch of its own
//! [`MARKER_DELAY`] after a flush if nothing else did. At open, a log that ends below
//! what its marker (or the engine's damage cut) says it made durable is damaged: its
//! `RepairStatus` stays "repairing" until the log is durable through that index again.
//!
//! Retention. Openraft's `purge(upto)` is logical: openraft no longer sees entries up to
//! `upto` (reads, `get_log_state`), but the engine deletes only those below the retain
//! mark (`LogReader::set_retain_from`, moved by `crate::retention`; 0, the default,
//! keeps everything). The committed entries kept below the purge mark are the
//! **history** (`State::history`): history and secret-message reads see them
//! (`LogReader::read_history`), snapshots carry them, and a follower that installs a
//! snapshot keeps the snapshot's range there (`LogReader::install_staged`).
//!
//! Ordering. Every write of a group goes through the one engine queue in call order
//! (openraft serializes a group's storage calls), and the engine reports durability in
//! submission order, so `IOFlushed` callbacks fire in order and exactly once.
//! `truncate_after`, `purge` and `save_vote` wait for durability (rare operations), which
//! also means no append is pending across them.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use chatlog_storage::{Durable, Engine, WriteBatch};
use openraft::OptionalSend;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};

use crate::codec;
use crate::error::{Error, Result};
use crate::ids::{self, engine_index, raft_index};
use crate::types::{Entry, EntryPayload, GroupId, LeaderId, LogId, TypeConfig, Vote};

/// Payload bytes one `limited_get_log_entries` call (replication) gathers before it
/// returns a prefix of the range. Keeps one AppendEntries well under the node frame limit
/// (16 MiB) and its send time under the heartbeat-sized RPC deadline (PLAN.md, P8).
pub const REPLICATION_READ_BYTES_MAX: usize = 4 << 20;

/// Issue 9: how long after a flush the marker writer waits before it writes the "synced"
/// marker in a batch of its own, if no append or committed-mark batch carried it
/// meanwhile. A busy group's next batches carry it (no extra fdatasync); an idle group's
/// last entries are vouched for this long after their flush. 20 ms is well under one
/// heartbeat (100 ms at least), the time in which a crash plus a flip of exactly that
/// record would go undetected (docs/reliability.md).
pub const MARKER_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// Times a read whose log-id check failed is tried again after a concurrent truncation
/// (each retry sees the new log; more than a few in a row would mean a storage bug).
pub const READ_RETRIES_MAX: usize = 3;

/// Engine body bytes an entry may cost beyond its payload when a batch is split: an op
/// header (when the entry starts a new op) plus its 4-byte end offset.
const APPEND_OVERHEAD_BYTES: usize = chatlog_storage::format::OP_HEADER_BYTES + 4;

/// The Raft log storage of one group. Openraft owns it and calls it serially.
#[derive(Debug)]
pub struct LogStore {
    shared: Arc<GroupLog>,
}

/// A reader of one group's Raft log; sees every entry `append` accepted, durable or not.
#[derive(Debug, Clone)]
pub struct LogReader {
    shared: Arc<GroupLog>,
}

#[derive(Debug)]
struct GroupLog {
    group: GroupId,
    /// The engine log holding the Raft log.
    log: chatlog_storage::LogId,
    engine: Arc<Engine>,
    /// Shared with the engine's durable callbacks, which must not hold the engine: the
    /// last handle of an engine dropped on its own I/O thread would join itself.
    state: Arc<Mutex<State>>,
    /// Issue 9: held by the marker writer from computing a marker to queuing it, and by
    /// truncations, so a marker computed before a truncation never lands after it.
    marker_order: tokio::sync::Mutex<()>,
}

/// What readers and writers agree on. Updated when an operation is submitted; the engine
/// catches up when it is durable.
#[derive(Debug, Default)]
struct State {
    /// The vote, as durable (updated after its write returns).
    vote: Option<Vote>,
    /// The last committed log id saved (possibly not durable yet: losing it only makes
    /// the committed mark after a restart smaller, which openraft allows).
    committed: Option<LogId>,
    /// The last purged log id.
    purged: Option<LogId>,
    /// Raft index of the first entry held. Meaningful only while `last` is `Some`.
    first_index: u64,
    /// The last entry held (durable or in `unflushed`), `None` if the log holds none.
    last: Option<LogId>,
    /// Entries submitted to the engine whose batch is not durable yet, in index order.
    unflushed: VecDeque<Unflushed>,
    /// Number of the next engine batch this group submits an append in.
    next_batch: u64,
    /// `(first index, leader id)` of each run of held entries written by one leader, in
    /// index order; the last run ends at `last`. Empty when the log holds none.
    leaders: Vec<(u64, LeaderId)>,
    /// Bumped by every truncation: a read whose check failed after one retries.
    truncations: u64,
    // ---- issue 9: damaged replicas (`crate::repair`) ----
    /// The last "synced through" marker put in a batch (`repair::META_SYNCED`).
    synced_written: u64,
    /// Damaged at open until the log is durable through the required index again.
    repair: Arc<crate::repair::RepairStatus>,
    /// A vote recovered from records the engine cut as damaged, not yet saved again.
    vote_unsaved: bool,
    /// The required index of a damage found at open, not yet written as the marker.
    marker_unsaved: bool,
    /// Issue 9 (session 7): vote unknown at open, `vote_probe::META_VOTE_UNKNOWN` not yet
    /// written.
    vote_unknown_unsaved: bool,
    /// Issue 9 (session 7): the term of the vote a finished probe saved
    /// (`vote_probe::META_PROBE_TERM`), 0 if none: the repair then ends only once the
    /// last durable entry is of that term or later (the log matches the leader's).
    probe_term: u64,
    /// Wakes the marker writer ([`write_markers`]) after a flush.
    marker_wake: Arc<tokio::sync::Notify>,
    /// The highest term this replica knew when its damage was found (its vote's term):
    /// an entry of a later term made durable proves the repair (`crate::repair`, "When a
    /// repair ends").
    repair_term_floor: u64,
    // ---- end issue 9 ----
    /// Retention: `[lo, hi]`, entries at or below the purge mark that the engine still
    /// holds for history reads (a purge is logical up to the retention horizon).
    history: Option<(u64, u64)>,
    /// Retention: the first Raft index the engine must keep (`crate::retention` moves
    /// it); a purge never deletes at or above it. 0 keeps everything.
    retain_from: u64,
    /// Snapshot streams in progress (`snapshot_stream::send`): the first index each still
    /// has to read ([`LogReader::pin_history`]); no purge deletes at or above the lowest,
    /// so a large range is never purged from under a transfer (which would then fail
    /// and start over, forever on a busy group).
    pins: Vec<u64>,
}

impl State {
    /// The runs of `leaders` that cover `[lo, hi)`.
    fn leaders_in(&self, lo: u64, hi: u64) -> Vec<(u64, LeaderId)> {
        let start = self
            .leaders
            .partition_point(|(f, _)| *f <= lo)
            .saturating_sub(1);
        self.leaders[start..]
            .iter()
            .take_while(|(f, _)| *f < hi)
            .copied()
            .collect()
    }

    /// Issue 9: the index through which the log's entries are durable (those not in the
    /// unflushed tail), or through which it is purged.
    fn durable_through(&self) -> u64 {
        match (self.unflushed.front(), self.last) {
            (Some(u), _) => u.entry.log_id.index.saturating_sub(1),
            (None, Some(last)) => last.index,
            (None, None) => self.purged.map_or(0, |p| p.index),
        }
    }

    /// Issue 9: the marker to put in the next batch, if it moved since the last one.
    fn next_marker(&mut self) -> Option<[u8; 8]> {
        let through = self.durable_through();
        (through > self.synced_written).then(|| {
            self.synced_written = through;
            crate::repair::encode_synced(through)
        })
    }

    fn note_appended(&mut self, entry: &Entry) {
        if self.leaders.last().map(|(_, l)| l) != Some(&entry.log_id.leader_id) {
            self.leaders
                .push((entry.log_id.index, entry.log_id.leader_id));
        }
    }
}

/// The leader id `leaders` (from [`State::leaders_in`]) expects at `index`.
fn expected_leader(leaders: &[(u64, LeaderId)], index: u64) -> Option<LeaderId> {
    let k = leaders.partition_point(|(f, _)| *f <= index);
    k.checked_sub(1).map(|k| leaders[k].1)
}

#[derive(Debug)]
struct Unflushed {
    /// The engine batch carrying it.
    batch: u64,
    entry: Entry,
}

impl LogStore {
    /// Opens group `group`'s Raft log in `engine`, recovering vote, committed and purged
    /// marks and the last entry.
    pub fn open(engine: Arc<Engine>, group: GroupId) -> Result<LogStore> {
        let log = ids::raft_log(group).ok_or(Error::GroupIdTooLarge {
            group,
            max: ids::GROUP_ID_MAX,
        })?;
        let decode_err = |subject: &str| {
            let subject = subject.to_string();
            move |source: codec::DecodeError| Error::Decode {
                group,
                subject,
                source,
            }
        };
        let vote = engine
            .meta(log, ids::META_VOTE)
            .map(|b| codec::decode_vote(&b))
            .transpose()
            .map_err(decode_err("the vote"))?;
        let committed = engine
            .meta(log, ids::META_COMMITTED)
            .map(|b| codec::decode_log_id(&b))
            .transpose()
            .map_err(decode_err("the committed log id"))?;
        let purged = engine
            .meta(log, ids::META_PURGED)
            .map(|b| codec::decode_log_id(&b))
            .transpose()
            .map_err(decode_err("the purged log id"))?;
        let mut state = State {
            vote,
            committed,
            purged,
            ..State::default()
        };
        let shared = GroupLog {
            group,
            log,
            engine,
            state: Arc::default(),
            marker_order: tokio::sync::Mutex::new(()),
        };
        if let Some(bounds) = shared.engine.bounds(log)
            && let Some(last) = bounds.last()
        {
            let bytes = shared.engine.get(log, last).map_err(|source| {
                shared.storage_err("reading", "the last log entry".into(), source)
            })?;
            let entry = shared.decode_at(&bytes, raft_index(last), None)?;
            let held = raft_index(bounds.first.max(1));
            let first = purged.map_or(held, |p| held.max(p.index + 1));
            if let Some(p) = purged
                && held <= p.index
            {
                state.history = Some((held, p.index.min(entry.log_id.index)));
            }
            // Entries at or below the purge mark are not part of the log.
            if first <= entry.log_id.index {
                state.first_index = first;
                state.last = Some(entry.log_id);
                state.leaders = shared.leader_runs(first, entry.log_id)?;
            }
        }
        open_check(&shared.engine, group, log, &mut state)?;
        let wake = Arc::clone(&state.marker_wake);
        *shared.lock() = state;
        let shared = Arc::new(shared);
        // Issue 9: without a runtime (tools that only read the log) no marker is written.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(write_markers(Arc::downgrade(&shared), wake));
        }
        Ok(LogStore { shared })
    }

    /// The group this log belongs to.
    pub fn group(&self) -> GroupId {
        self.shared.group
    }

    /// Issue 9: whether this replica's log is damaged and repairing (shared with the node
    /// and the peer server).
    pub fn repair_status(&self) -> Arc<crate::repair::RepairStatus> {
        Arc::clone(&self.shared.lock().repair)
    }

    /// Issue 9: makes what open found durable before openraft starts on this log: a vote
    /// that only records cut as damaged held (a replica must never forget its vote), and
    /// a damage's required index as the "synced" marker, so a crash before the repair
    /// completes finds the log damaged again (the records that proved it are sealed off).
    pub async fn persist_recovered_state(&self) -> Result<()> {
        let (vote, marker, vote_unknown) = {
            let st = self.shared.lock();
            let vote = st.vote.filter(|_| st.vote_unsaved);
            let marker = st
                .repair
                .damage()
                .filter(|_| st.marker_unsaved)
                .map(|d| d.required_index);
            (vote, marker, st.vote_unknown_unsaved)
        };
        if vote.is_none() && marker.is_none() && !vote_unknown {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        if vote_unknown {
            batch.put_meta(self.shared.log, crate::vote_probe::META_VOTE_UNKNOWN, &[1]);
        }
        if let Some(v) = &vote {
            batch.put_meta(self.shared.log, ids::META_VOTE, &codec::encode_vote(v));
        }
        if let Some(m) = marker {
            batch.put_meta(
                self.shared.log,
                crate::repair::META_SYNCED,
                &crate::repair::encode_synced(m),
            );
        }
        self.shared.engine.write(&batch).await.map_err(|source| {
            self.shared.storage_err(
                "saving",
                format!("the recovered vote {vote:?} and marker {marker:?}"),
                source,
            )
        })?;
        let mut st = self.shared.lock();
        st.vote_unsaved = false;
        st.marker_unsaved = false;
        st.vote_unknown_unsaved = false;
        Ok(())
    }
}

impl GroupLog {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn storage_err(
        &self,
        verb: &'static str,
        subject: String,
        source: chatlog_storage::Error,
    ) -> Error {
        Error::Storage {
            group: self.group,
            verb,
            subject,
            source,
        }
    }

    /// The leader-id runs of held entries `[first, last.index]`, found by binary search
    /// over the engine (leader ids never decrease along a Raft log).
    fn leader_runs(&self, first: u64, last: LogId) -> Result<Vec<(u64, LeaderId)>> {
        let leader_at = |index: u64| -> Result<LeaderId> {
            let bytes = self
                .engine
                .get(self.log, engine_index(index))
                .map_err(|source| {
                    self.storage_err("reading", format!("log entry {index}"), source)
                })?;
            Ok(self.decode_at(&bytes, index, None)?.log_id.leader_id)
        };
        let mut runs = Vec::new();
        let mut lo = first;
        loop {
            let leader = if lo == last.index {
                last.leader_id
            } else {
                leader_at(lo)?
            };
            runs.push((lo, leader));
            if leader == last.leader_id {
                return Ok(runs);
            }
            // leader_at(a) == leader, leader_at(b) != leader.
            let (mut a, mut b) = (lo, last.index);
            while a + 1 < b {
                let mid = a + (b - a) / 2;
                if leader_at(mid)? == leader {
                    a = mid;
                } else {
                    b = mid;
                }
            }
            lo = b;
        }
    }

    /// Decodes an entry read from the engine and checks it sits where it was read: the
    /// index written into it by `codec::encode_entry` and, when the caller knows it, the
    /// leader id the log holds there (an older term's copy at the right index is stale).
    fn decode_at(
        &self,
        bytes: &bytes::Bytes,
        index: u64,
        leader: Option<LeaderId>,
    ) -> Result<Entry> {
        let entry = codec::decode_entry(bytes).map_err(|source| Error::Decode {
            group: self.group,
            subject: format!("log entry {index}"),
            source,
        })?;
        if entry.log_id.index != index || leader.is_some_and(|l| l != entry.log_id.leader_id) {
            return Err(Error::Inconsistent {
                group: self.group,
                detail: format!(
                    "log entry read at index {index} says it is {}, the log holds leader {leader:?} there",
                    entry.log_id
                ),
            });
        }
        Ok(entry)
    }

    /// Entries with index in `[start, end)` that the log holds, in order, every one
    /// checked against the log id the log holds at its index (see [`GroupLog::read_once`]).
    /// A read that raced a truncation is tried again.
    fn read(&self, start: u64, end: u64, bytes_max: usize) -> Result<Vec<Entry>> {
        let mut tries = 0;
        loop {
            let before = self.lock().truncations;
            match self.read_once(start, end, bytes_max) {
                Err(Error::Inconsistent { .. })
                    if tries < READ_RETRIES_MAX && self.lock().truncations != before =>
                {
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Entries with index in `[start, end)` that the log holds, in order. Stops early,
    /// returning a non-empty prefix, once `bytes_max` payload bytes are gathered.
    fn read_once(&self, start: u64, end: u64, bytes_max: usize) -> Result<Vec<Entry>> {
        // Decide under the lock what comes from where; read the engine outside it so the
        // engine's durable callbacks (which take this lock) never wait for a disk read.
        let (lo, hi, disk_hi, tail, leaders) = {
            let st = self.lock();
            let Some(last) = st.last else {
                return Ok(Vec::new());
            };
            let lo = start.max(st.first_index);
            let hi = end.min(last.index + 1);
            if lo >= hi {
                return Ok(Vec::new());
            }
            let tail_first = st.unflushed.front().map_or(hi, |u| u.entry.log_id.index);
            let disk_hi = tail_first.clamp(lo, hi);
            let tail: Vec<Entry> = st
                .unflushed
                .iter()
                .map(|u| &u.entry)
                .filter(|e| (disk_hi..hi).contains(&e.log_id.index))
                .cloned()
                .collect();
            (lo, hi, disk_hi, tail, st.leaders_in(lo, hi))
        };
        let mut out = Vec::with_capacity(((hi - lo) as usize).min(1024));
        let mut bytes = 0usize;
        if lo < disk_hi {
            let got = self
                .engine
                .read(self.log, engine_index(lo)..engine_index(disk_hi), bytes_max)
                .map_err(|source| {
                    self.storage_err("reading", format!("log entries [{lo}, {disk_hi})"), source)
                })?;
            for (k, b) in got.iter().enumerate() {
                bytes += b.len();
                let index = lo + k as u64;
                out.push(self.decode_at(b, index, expected_leader(&leaders, index))?);
            }
            if out.len() < (disk_hi - lo) as usize {
                if bytes >= bytes_max {
                    return Ok(out);
                }
                return Err(Error::Inconsistent {
                    group: self.group,
                    detail: format!(
                        "log entries [{lo}, {disk_hi}) should be held but the engine has only {}",
                        out.len()
                    ),
                });
            }
        }
        for entry in tail {
            if bytes >= bytes_max && !out.is_empty() {
                break;
            }
            let index = entry.log_id.index;
            if expected_leader(&leaders, index) != Some(entry.log_id.leader_id) {
                return Err(Error::Inconsistent {
                    group: self.group,
                    detail: format!(
                        "unflushed entry {} at index {index}, the log holds leader {:?} there",
                        entry.log_id,
                        expected_leader(&leaders, index)
                    ),
                });
            }
            bytes += payload_bytes(&entry);
            out.push(entry);
        }
        Ok(out)
    }

    async fn append(&self, entries: Vec<Entry>, callback: IOFlushed<TypeConfig>) -> Result<()> {
        let group = self.group;
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            // Nothing to write, but IOFlushed is a watermark: completing now could mark
            // earlier, still pending appends flushed. Queue an empty batch behind them.
            let on_durable: Durable = Box::new(move |r: chatlog_storage::Result<()>| {
                callback.io_completed(r.map_err(|source| {
                    io::Error::from(Error::Storage {
                        group,
                        verb: "flushing",
                        subject: "an empty append".into(),
                        source,
                    })
                }))
            });
            return self
                .engine
                .submit(&WriteBatch::new(), on_durable)
                .await
                .map_err(|source| self.storage_err("appending", "no entries".into(), source));
        };
        let (first, last) = (first.log_id.index, last.log_id);
        // The replica's tag keeps three nodes in one process apart (the bench's r3).
        let traced =
            chatlog_storage::timeline::replica_group(Arc::as_ptr(&self.engine).cast(), group);
        chatlog_storage::timeline::record(chatlog_storage::timeline::Event::Append, traced, first);
        let mut encoded = Vec::with_capacity(entries.len());
        for (k, e) in entries.iter().enumerate() {
            if e.log_id.index != first + k as u64 {
                return Err(Error::Inconsistent {
                    group,
                    detail: format!(
                        "append of non-consecutive entries: {} at position {k}",
                        e.log_id
                    ),
                });
            }
            encoded.push(codec::encode_entry(e));
        }

        // Split into engine batches under the engine's batch limit; remember where each
        // ends. A single entry over the limit goes alone and the engine refuses it.
        let limit = self.engine.write_batch_bytes_max();
        let mut batches: Vec<(WriteBatch, usize)> = Vec::new();
        let mut batch = WriteBatch::new();
        let (anchor, marker) = {
            let mut st = self.lock();
            let marker = st.next_marker();
            let anchor = match st.last {
                Some(held) if held.index + 1 != first => {
                    return Err(Error::Inconsistent {
                        group,
                        detail: format!(
                            "append at {first} does not continue the log ending at {held}"
                        ),
                    });
                }
                Some(_) => false,
                None => {
                    if let Some(p) = st.purged
                        && first <= p.index
                    {
                        return Err(Error::Inconsistent {
                            group,
                            detail: format!("append at {first} is at or below the purged {p}"),
                        });
                    }
                    true
                }
            };
            (anchor, marker)
        };
        if let Some(m) = marker {
            batch.put_meta(self.log, crate::repair::META_SYNCED, &m);
        }
        let reanchor =
            anchor && self.engine.bounds(self.log).map(|b| b.next) != Some(engine_index(first));
        if reanchor {
            // The log holds no entry: make the engine log continue at `first` (anchors a
            // never-written log). Skipped when it already does, which keeps the history
            // retention holds below the purge mark.
            batch.purge_before(self.log, engine_index(first));
        }
        for (k, bytes) in encoded.iter().enumerate() {
            // Rare: openraft's appends are usually far below the limit.
            if batch.entry_count() > 0
                && batch.encoded_len() + bytes.len() + APPEND_OVERHEAD_BYTES > limit
            {
                batches.push((std::mem::take(&mut batch), k));
            }
            batch.append(self.log, engine_index(first + k as u64), bytes);
        }
        batches.push((batch, encoded.len()));
        drop(encoded);

        // Publish to readers before submitting: the callback may fire right after.
        let first_batch = {
            let mut st = self.lock();
            let first_batch = st.next_batch;
            st.next_batch += batches.len() as u64;
            if st.last.is_none() {
                st.leaders.clear();
            }
            if reanchor {
                // The engine log was emptied to continue at `first`: no history left.
                st.history = None;
            }
            let mut entries = entries.into_iter();
            let mut taken = 0;
            for (b, (_, end)) in batches.iter().enumerate() {
                for entry in entries.by_ref().take(end - taken) {
                    st.note_appended(&entry);
                    st.unflushed.push_back(Unflushed {
                        batch: first_batch + b as u64,
                        entry,
                    });
                }
                taken = *end;
            }
            if st.last.is_none() {
                st.first_index = first;
            }
            st.last = Some(last);
            first_batch
        };

        // The first failure of any batch of this append, reported by the last callback.
        let failure: Arc<OnceLock<chatlog_storage::Error>> = Arc::new(OnceLock::new());
        let batch_count = batches.len();
        let mut callback = Some(callback);
        for (b, (batch, _)) in batches.into_iter().enumerate() {
            let state = Arc::clone(&self.state);
            let failure = Arc::clone(&failure);
            let done = if b + 1 == batch_count {
                callback.take()
            } else {
                None
            };
            let batch_id = first_batch + b as u64;
            let on_durable: Durable = Box::new(move |result: chatlog_storage::Result<()>| {
                match result {
                    Ok(()) if failure.get().is_none() => flushed(&state, batch_id),
                    // After a failure the group stops (openraft makes it fatal); what the
                    // tail holds no longer matters.
                    Ok(()) => {}
                    Err(e) => {
                        // Only the first failure is kept; a later one adds nothing.
                        let _ = failure.set(e);
                    }
                }
                if let Some(done) = done {
                    let outcome = match failure.get() {
                        None => Ok(()),
                        Some(source) => Err(io::Error::from(Error::Storage {
                            group,
                            verb: "flushing",
                            subject: format!("log entries [{first}, {}]", last.index),
                            source: source.clone(),
                        })),
                    };
                    chatlog_storage::timeline::record(
                        chatlog_storage::timeline::Event::Flushed,
                        traced,
                        last.index,
                    );
                    done.io_completed(outcome);
                }
            });
            // On `Err` the batch was not queued and `on_durable` (and with the last batch,
            // the IOFlushed) is dropped uncalled; returning the error stops the group.
            self.engine
                .submit(&batch, on_durable)
                .await
                .map_err(|source| {
                    self.storage_err(
                        "appending",
                        format!("log entries [{first}, {}]", last.index),
                        source,
                    )
                })?;
        }
        chatlog_storage::timeline::record(
            chatlog_storage::timeline::Event::AppendSubmitted,
            traced,
            last.index,
        );
        Ok(())
    }

    async fn truncate_after(&self, keep: Option<LogId>) -> Result<()> {
        let _order = self.marker_order.lock().await;
        let lowered_marker;
        let keep_engine = {
            let mut st = self.lock();
            let Some(last) = st.last else {
                return Ok(());
            };
            if keep.is_some_and(|k| k.index >= last.index) {
                return Ok(());
            }
            let keep_index = keep.map(|k| k.index);
            while st
                .unflushed
                .back()
                .is_some_and(|u| Some(u.entry.log_id.index) > keep_index)
            {
                st.unflushed.pop_back();
            }
            // Never ask the engine to cut below its first entry (it refuses): keep at least
            // engine index `first_index`, the one just below it.
            let first_index = st.first_index;
            let keep_engine = keep_index.map_or(0, engine_index).max(first_index);
            st.last = keep.filter(|k| k.index >= first_index);
            st.truncations += 1;
            // Issue 9: the marker never vouches for entries the log no longer holds.
            // While repairing, the marker keeps naming what must come back.
            let held = keep_index
                .unwrap_or(0)
                .max(st.purged.map_or(0, |p| p.index))
                .max(st.repair.damage().map_or(0, |d| d.required_index));
            lowered_marker = (st.synced_written > held).then(|| {
                st.synced_written = held;
                crate::repair::encode_synced(held)
            });
            match st.last {
                Some(k) => st.leaders.retain(|(f, _)| *f <= k.index),
                None => st.leaders.clear(),
            }
            keep_engine
        };
        let mut batch = WriteBatch::new();
        batch.truncate_after(self.log, keep_engine);
        if let Some(m) = lowered_marker {
            batch.put_meta(self.log, crate::repair::META_SYNCED, &m);
        }
        self.engine.write(&batch).await.map_err(|source| {
            self.storage_err("truncating", format!("log entries after {keep:?}"), source)
        })
    }

    async fn purge(&self, upto: LogId) -> Result<()> {
        let cut;
        {
            let mut st = self.lock();
            if st.purged.is_some_and(|p| p.index >= upto.index) {
                return Ok(());
            }
            // What the engine held before: `[previous_first, previous_last]` logically
            // (empty when `last` is None), below it `history`.
            let previous_first = st.last.map_or(u64::MAX, |_| st.first_index);
            let previous_last = st.last.map_or(0, |l| l.index);
            let previous_last = st
                .history
                .map_or(previous_last, |(_, hi)| hi.max(previous_last));
            st.purged = Some(upto);
            match st.last {
                Some(last) if last.index > upto.index => {
                    st.first_index = st.first_index.max(upto.index + 1);
                    let first = st.first_index;
                    while st.leaders.len() >= 2 && st.leaders[1].0 <= first {
                        st.leaders.remove(0);
                    }
                }
                _ => {
                    st.last = None;
                    st.leaders.clear();
                }
            }
            while st
                .unflushed
                .front()
                .is_some_and(|u| u.entry.log_id.index <= upto.index)
            {
                st.unflushed.pop_front();
            }
            // Logical up to the mark, physical only below the retention horizon.
            cut = upto
                .index
                .saturating_add(1)
                .min(st.retain_from)
                .min(st.pins.iter().copied().min().unwrap_or(u64::MAX));
            let lo = st.history.map_or(previous_first, |(lo, _)| lo);
            let hi = upto.index.min(previous_last);
            st.history = (lo.max(cut) <= hi).then_some((lo.max(cut), hi));
        }
        let mut batch = WriteBatch::new();
        if cut > 0 {
            batch.purge_before(self.log, engine_index(cut));
        }
        batch.put_meta(self.log, ids::META_PURGED, &codec::encode_log_id(&upto));
        self.engine.write(&batch).await.map_err(|source| {
            self.storage_err("purging", format!("log entries up to {upto}"), source)
        })?;
        // Issue 9: a snapshot installed from the leader covers the purged range.
        let st = self.lock();
        st.repair.note_durable(st.durable_through());
        Ok(())
    }

    async fn save_vote(&self, vote: &Vote) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.put_meta(self.log, ids::META_VOTE, &codec::encode_vote(vote));
        self.engine
            .write(&batch)
            .await
            .map_err(|source| self.storage_err("saving", format!("the vote {vote}"), source))?;
        self.lock().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&self, committed: Option<LogId>) -> Result<()> {
        let marker = {
            let mut st = self.lock();
            st.committed = committed;
            st.next_marker()
        };
        let mut batch = WriteBatch::new();
        if let Some(m) = marker {
            // Issue 9: vouches for the appends made durable since the last marker.
            batch.put_meta(self.log, crate::repair::META_SYNCED, &m);
        }
        match &committed {
            Some(c) => batch.put_meta(self.log, ids::META_COMMITTED, &codec::encode_log_id(c)),
            None => batch.delete_meta(self.log, ids::META_COMMITTED),
        }
        // Queued behind the appends it refers to, not awaited: openraft calls this on every
        // apply round, and a lost update only lowers the committed mark after a crash. A
        // failed write stops the engine, which fails every later write of the group.
        let on_durable: Durable = Box::new(|_: chatlog_storage::Result<()>| {});
        self.engine
            .submit(&batch, on_durable)
            .await
            .map_err(|source| {
                self.storage_err(
                    "saving",
                    format!("the committed log id {committed:?}"),
                    source,
                )
            })
    }
}

// ---- retention (s5retain): history below the purge mark, snapshot ranges ----

impl GroupLog {
    /// Entries `[start, end)` for history reads: the openraft-visible log, plus the
    /// committed entries retention keeps below the purge mark (read without the
    /// leader-id check: nothing is ever truncated at or below the purge mark).
    fn read_history(&self, start: u64, end: u64) -> Result<Vec<Entry>> {
        let history = self.lock().history;
        let mut out = Vec::new();
        let mut from = start;
        if let Some((lo, hi)) = history {
            let (a, b) = (start.max(lo), end.min(hi + 1));
            if a < b {
                let got = self
                    .engine
                    .read(self.log, engine_index(a)..engine_index(b), usize::MAX)
                    .map_err(|source| {
                        self.storage_err("reading", format!("history entries [{a}, {b})"), source)
                    })?;
                for (k, bytes) in got.iter().enumerate() {
                    out.push(self.decode_at(bytes, a + k as u64, None)?);
                }
                from = b;
            }
        }
        if from < end {
            out.extend(self.read(from, end, usize::MAX)?);
        }
        Ok(out)
    }

    /// The entries a snapshot at `upto` carries, in memory: what this replica holds from
    /// its first entry (history included) to `upto`, the newest that fit in `bytes_max`;
    /// returned oldest first, as encoded bytes. For tests and tools: snapshots sent to
    /// peers read their range lazily (`snapshot_stream`), whatever its size.
    fn snapshot_range(&self, upto: u64, bytes_max: usize) -> Result<Vec<bytes::Bytes>> {
        let first = {
            let st = self.lock();
            match (st.history, st.last) {
                (Some((lo, _)), _) => lo,
                (None, Some(_)) => st.first_index,
                (None, None) => return Ok(Vec::new()),
            }
        };
        let mut out: Vec<bytes::Bytes> = Vec::new();
        let mut total = 0usize;
        // Newest first, a window at a time, until the bound.
        let mut hi = upto + 1;
        while hi > first && total < bytes_max {
            let lo = hi.saturating_sub(256).max(first);
            let entries = match self.read_history(lo, hi) {
                Ok(entries)
                    if entries.len() as u64 == hi - lo
                        && entries.first().map(|e| e.log_id.index) == Some(lo) =>
                {
                    entries
                }
                other => {
                    tracing::warn!(group = self.group, lo, hi, error = ?other.err(), "snapshot range cut short: entries missing");
                    break;
                }
            };
            for e in entries.iter().rev() {
                let b = bytes::Bytes::from(codec::encode_entry(e));
                if total + b.len() > bytes_max {
                    tracing::warn!(
                        group = self.group,
                        from = e.log_id.index + 1,
                        "snapshot range cut at its byte bound"
                    );
                    out.reverse();
                    return Ok(out);
                }
                total += b.len();
                out.push(b);
            }
            hi = lo;
        }
        out.reverse();
        Ok(out)
    }

    /// Whether the log holds `last` (same index, same leader) among the entries openraft
    /// sees: installing a snapshot at `last` then leaves the log as it is (openraft keeps
    /// what follows it).
    fn holds(&self, last: LogId) -> bool {
        let st = self.lock();
        st.last.is_some_and(|l| l.index >= last.index)
            && last.index >= st.first_index
            && expected_leader(&st.leaders, last.index) == Some(last.leader_id)
    }

    /// Replaces what the engine holds with a snapshot's entries from `first` to `last`
    /// (handed over in windows by `next`, an empty window ending them), durably, as
    /// history below the purge mark (`write_staged_range`), and updates what readers see.
    async fn install_entries<F>(&self, first: u64, last: LogId, next: F) -> Result<()>
    where
        F: FnMut() -> Result<Vec<Entry>>,
    {
        let start = write_staged_range(&self.engine, self.group, first, last, next).await?;
        let mut st = self.lock();
        st.unflushed.clear();
        st.leaders.clear();
        st.last = None;
        st.truncations += 1;
        st.history = (start <= last.index).then_some((start, last.index));
        Ok(())
    }

    /// Deletes history (entries below the purge mark kept for reads) below `horizon`.
    async fn purge_history_below(&self, horizon: u64) -> Result<()> {
        let cut = {
            let mut st = self.lock();
            let Some((lo, hi)) = st.history else {
                return Ok(());
            };
            let horizon = horizon.min(st.pins.iter().copied().min().unwrap_or(u64::MAX));
            if horizon <= lo {
                return Ok(());
            }
            let cut = horizon.min(hi + 1);
            st.history = (cut <= hi).then_some((cut, hi));
            cut
        };
        let mut batch = WriteBatch::new();
        batch.purge_before(self.log, engine_index(cut));
        self.engine
            .write(&batch)
            .await
            .map_err(|source| self.storage_err("purging", format!("history below {cut}"), source))
    }
}

impl LogReader {
    /// Issue 9 (session 7): checks again whether the durable log ends its repair (after
    /// `RepairStatus::lower_required`, on an idle group no flush would).
    pub fn recheck_repair(&self) {
        check_repair(&mut self.shared.lock());
    }

    /// Entries `[start, end)` for history and secret-message reads, including what
    /// retention keeps below openraft's purge mark (see the module docs).
    pub fn read_history(&self, start: u64, end: u64) -> Result<Vec<Entry>> {
        self.shared.read_history(start, end)
    }

    /// Encoded entries from the first held one to `upto`, in memory: the newest that fit
    /// in `bytes_max` bytes (tests and tools; snapshots stream theirs).
    pub fn snapshot_range(&self, upto: u64, bytes_max: usize) -> Result<Vec<bytes::Bytes>> {
        self.shared.snapshot_range(upto, bytes_max)
    }

    /// Writes a received snapshot's entries (consecutive, the last one at the snapshot's
    /// last log id) as the log's history, durable on return. Nothing changes when the log
    /// already holds the snapshot's last entry.
    pub async fn install_range(&self, entries: Vec<Entry>) -> Result<()> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let (first, last) = (first.log_id.index, last.log_id);
        if self.shared.holds(last) {
            return Ok(());
        }
        let mut once = Some(entries);
        self.shared
            .install_entries(first, last, || Ok(once.take().unwrap_or_default()))
            .await
    }

    /// Whether the log holds `last` (same index and leader): a snapshot at `last` then
    /// leaves the log as it is.
    pub fn holds(&self, last: LogId) -> bool {
        self.shared.holds(last)
    }

    /// Writes a staged snapshot's range `[first, last]` (windows from `next`, an empty
    /// one ending it) as the log's history, durable on return (`snapshot_stream`).
    pub async fn install_staged<F>(&self, first: u64, last: LogId, next: F) -> Result<()>
    where
        F: FnMut() -> Result<Vec<Entry>>,
    {
        self.shared.install_entries(first, last, next).await
    }

    /// Keeps every entry from `from` on held (history included) until the pin is
    /// advanced past them or dropped: a snapshot being streamed reads them lazily.
    pub fn pin_history(&self, from: u64) -> HistoryPin {
        self.shared.lock().pins.push(from);
        HistoryPin {
            shared: Arc::clone(&self.shared),
            at: from,
        }
    }

    /// Sets the first Raft index the engine must keep: purges (openraft's, and
    /// [`LogReader::purge_history_below`]) never delete at or above it.
    pub fn set_retain_from(&self, index: u64) {
        let mut st = self.shared.lock();
        st.retain_from = st.retain_from.max(index);
    }

    /// Deletes kept history below `horizon` (never at or above the retain mark).
    pub async fn purge_history_below(&self, horizon: u64) -> Result<()> {
        let horizon = horizon.min(self.shared.lock().retain_from);
        self.shared.purge_history_below(horizon).await
    }

    /// `(first held, first openraft sees, last)`: the log's bounds as retention sees
    /// them (`None` fields when nothing is held).
    pub fn retained_bounds(&self) -> (Option<u64>, Option<LogId>, Option<LogId>) {
        let st = self.shared.lock();
        let first = st
            .history
            .map(|(lo, _)| lo)
            .or(st.last.map(|_| st.first_index));
        (first, st.purged, st.last)
    }
}

/// Rewrites group `group`'s Raft log in the engine to hold exactly a snapshot's range
/// `[first, last]` as history below the purge mark `last`: one batch empties the log to
/// continue at `first` (an emptied log restarts lower with the engine's "reset log
/// start" when its first index was above `first`), the entries follow in batches under the engine's limit
/// (windows from `next`, an empty window ending them, each entry checked to be the next
/// index), and the last batch sets the purge mark to `last`. Idempotent: a crash in the
/// middle is finished by running it again (`snapshot_stream::finish_interrupted_install`).
/// Returns the first index held. Used by the log store's install and at open.
pub async fn write_staged_range<F>(
    engine: &Engine,
    group: GroupId,
    first: u64,
    last: LogId,
    mut next: F,
) -> Result<u64>
where
    F: FnMut() -> Result<Vec<Entry>>,
{
    let log = ids::raft_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    let write = async |batch: WriteBatch| {
        engine.write(&batch).await.map_err(|source| Error::Storage {
            group,
            verb: "installing",
            subject: format!("the snapshot's log entries up to {last}"),
            source,
        })
    };
    let start = first;
    let mut batch = WriteBatch::new();
    if let Some(b) = engine.bounds(log) {
        if b.next > b.first {
            batch.truncate_after(log, b.first.saturating_sub(1));
        }
        // s7raft: the emptied log may start above the range (its own purge point was
        // past the snapshot's index, or it is the empty log of a replica that moved away
        // and back): restart it at the range's first entry, so the entries after the
        // snapshot continue it ("reset log start", storage/FORMAT.md).
        if engine_index(first) < b.first {
            batch.reset_log_start(log, engine_index(first));
        }
    }
    batch.purge_before(log, engine_index(start));
    let limit = engine.write_batch_bytes_max();
    let mut expected = first;
    let mut seen: Option<LogId> = None;
    loop {
        let window = next()?;
        if window.is_empty() {
            break;
        }
        for e in window {
            if e.log_id.index != expected {
                return Err(Error::Inconsistent {
                    group,
                    detail: format!(
                        "snapshot range entry {} where index {expected} was expected",
                        e.log_id
                    ),
                });
            }
            expected += 1;
            seen = Some(e.log_id);
            if e.log_id.index < start {
                continue;
            }
            let bytes = codec::encode_entry(&e);
            if batch.entry_count() > 0
                && batch.encoded_len() + bytes.len() + APPEND_OVERHEAD_BYTES > limit
            {
                write(std::mem::take(&mut batch)).await?;
            }
            batch.append(log, engine_index(e.log_id.index), &bytes);
        }
    }
    if seen != Some(last) {
        return Err(Error::Inconsistent {
            group,
            detail: format!("the snapshot range ends at {seen:?}, the snapshot at {last}"),
        });
    }
    batch.put_meta(log, ids::META_PURGED, &codec::encode_log_id(&last));
    write(batch).await?;
    Ok(start)
}

/// Holds a group's log from an index on against purges ([`LogReader::pin_history`]).
#[derive(Debug)]
pub struct HistoryPin {
    shared: Arc<GroupLog>,
    at: u64,
}

impl HistoryPin {
    /// Releases the entries below `to` (a transfer that read them).
    pub fn advance(&mut self, to: u64) {
        let mut st = self.shared.lock();
        if let Some(p) = st.pins.iter_mut().find(|p| **p == self.at) {
            *p = to.max(self.at);
        }
        self.at = to.max(self.at);
    }
}

impl Drop for HistoryPin {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(k) = st.pins.iter().position(|p| *p == self.at) {
            st.pins.swap_remove(k);
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Critical sections only move plain values; a panic inside one is a bug that already
    // stopped the group.
    state.lock().expect("log state lock")
}

/// The durable callback of engine batch `batch` fired with success: its entries are now
/// readable from the engine (it indexes a batch before calling back).
fn flushed(state: &Mutex<State>, batch: u64) {
    let mut st = lock(state);
    while st.unflushed.front().is_some_and(|u| u.batch <= batch) {
        st.unflushed.pop_front();
    }
    // Issue 9: a damaged replica is repaired once durable through the required index;
    // the marker writer vouches for what just became durable.
    check_repair(&mut st);
    st.marker_wake.notify_one();
}

/// Issue 9: ends a repair the durable log now satisfies (`crate::repair`).
fn check_repair(st: &mut State) {
    if st.repair.is_repairing() {
        let durable = st.durable_through();
        // Issue 9 (session 7): after a probe, only once the last durable entry is of the
        // probed term or later (the log matches the probed leader's).
        let probe_term = st.probe_term.max(st.repair.probe_term());
        let probed_ok = probe_term == 0
            || crate::vote_probe::holds_probed_entry(&st.leaders, durable, probe_term);
        if probed_ok {
            st.repair.note_durable(durable);
        }
        // Issue 9 (session 6): an entry of a term later than any this replica knew when
        // damaged, durable here, means its log matches a newer leader's through that
        // leader's first entry, which is all that could be committed of what it lost.
        if let Some(&(first, leader)) = st.leaders.last()
            && leader.term > st.repair_term_floor
            && durable >= first
        {
            st.repair.note_newer_leader(first, leader.term);
        }
    }
}

/// Payload bytes an entry holds (for read limits).
fn payload_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        EntryPayload::Normal(batch) => batch.0.len() + codec::ENTRY_HEADER_BYTES,
        _ => codec::ENTRY_HEADER_BYTES,
    }
}

/// `[start, end)` of a range of indexes.
fn index_range(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

// ---- issue 9: damaged replicas (`crate::repair`) ----

/// Issue 9: reads the "synced through" marker and decides whether the log lost durable
/// entries (`repair::detect`); a damaged log starts repairing, with a clear error line.
fn open_check(
    engine: &Engine,
    group: GroupId,
    log: chatlog_storage::LogId,
    st: &mut State,
) -> Result<()> {
    let synced = match engine.meta(log, crate::repair::META_SYNCED) {
        None => None,
        Some(b) => Some(
            crate::repair::decode_synced(&b).ok_or_else(|| Error::Inconsistent {
                group,
                detail: format!("the \"synced\" marker is {} bytes, not 8", b.len()),
            })?,
        ),
    };
    st.synced_written = synced.unwrap_or(0);
    let held = st.last.map(|l| l.index).max(st.purged.map(|p| p.index));
    let detected = crate::repair::detect(engine, group, held, synced);
    if let Some(vote) = detected.dropped_vote
        && st.vote.is_none_or(|held_vote| vote > held_vote)
    {
        st.vote = Some(vote);
        st.vote_unsaved = true;
    }
    // Issue 9 (session 6): a damage cut below the committed mark (an older segment's
    // entries lost, the later committed marks kept) lowers it to what the log holds:
    // openraft re-applies `(applied, committed]` from the log at start, and a smaller
    // committed mark after a restart is allowed.
    if let Some(c) = st.committed
        && held.is_none_or(|h| c.index > h)
    {
        let lowered = match (st.last, st.purged) {
            (Some(l), _) if l.index < c.index => Some(l),
            (None, Some(p)) if p.index < c.index => Some(p),
            _ => None,
        };
        tracing::warn!(group, committed = %c, lowered_to = ?lowered, "committed mark above the damaged log lowered");
        st.committed = lowered;
    }
    if let Some(damage) = detected.damage {
        st.repair_term_floor = st.vote.map_or(0, |v| v.leader_id().term);
        tracing::error!(
            group,
            held_index = damage.held_index,
            required_index = damage.required_index,
            detail = %damage.detail,
            status = "repairing",
            "damaged Raft log: entries this replica made durable are gone; it grants no \
             votes, does not campaign and serves no reads until the leader has sent them \
             back"
        );
        st.marker_unsaved = damage.required_index > st.synced_written;
        st.synced_written = st.synced_written.max(damage.required_index);
        st.repair = Arc::new(crate::repair::RepairStatus::new(Some(damage)));
    }
    // Issue 9 (session 7): after a finished probe, the log must end with an entry of the
    // probed leader's term or later, not just hold as many entries: a stale entry (of an
    // older term, never committed) does not end the repair.
    st.probe_term = crate::vote_probe::probe_term(engine, log);
    if st.probe_term > 0 {
        let required = st
            .repair
            .damage()
            .map_or(st.synced_written, |d| d.required_index);
        let last = st.last.map_or(0, |l| l.index);
        if !crate::vote_probe::holds_probed_entry(&st.leaders, last, st.probe_term) {
            let damage = crate::repair::LogDamage {
                group,
                held_index: held.unwrap_or(0),
                required_index: required,
                detail: format!(
                    "probed: the log must hold through index {required} and end with an entry \
                     of term >= {}",
                    st.probe_term
                ),
            };
            tracing::error!(group, detail = %damage.detail, status = "repairing", "damaged Raft log");
            if st.repair_term_floor == 0 {
                st.repair_term_floor = st.vote.map_or(0, |v| v.leader_id().term);
            }
            st.repair = Arc::new(crate::repair::RepairStatus::new(Some(damage)));
        }
    }
    // Issue 9 (session 7): the node lost its newest records: vote unknown until probed.
    if let Some((mut damage, unsaved)) =
        crate::vote_probe::at_open(engine, group, log, held.unwrap_or(0))
    {
        // A damage found above keeps its required index (the marker written for it).
        if let Some(found) = st.repair.damage() {
            damage.required_index = damage.required_index.max(found.required_index);
        }
        tracing::error!(group, detail = %damage.detail, status = "vote unknown", "damaged Raft log");
        st.repair_term_floor = u64::MAX;
        st.vote_unknown_unsaved = unsaved;
        st.repair = Arc::new(crate::repair::RepairStatus::new_vote_unknown(damage));
    }
    Ok(())
}

/// Issue 9: after each flush of a group's appends, writes a small batch carrying the
/// "synced through" marker (`repair::META_SYNCED`) unless a later batch already carried
/// it, so the record holding a group's last entries is followed by one that vouches for
/// them within one group commit, also when the group goes idle. Ends when the log is
/// dropped. The batch is not awaited for durability (a lost marker only narrows what
/// detection can see).
async fn write_markers(log: std::sync::Weak<GroupLog>, wake: Arc<tokio::sync::Notify>) {
    loop {
        wake.notified().await;
        // Most flushes are vouched for by the next append or committed-mark batch within
        // this delay; only then is a batch of its own (and its fdatasync) needed.
        tokio::time::sleep(MARKER_DELAY).await;
        let Some(log) = log.upgrade() else {
            return;
        };
        let _order = log.marker_order.lock().await;
        let (marker, probe_done) = {
            let mut st = log.lock();
            // Issue 9 (session 7): a probed repair that ended forgets its probe term.
            let probe_done = st.probe_term > 0 && !st.repair.is_repairing();
            if probe_done {
                st.probe_term = 0;
            }
            (st.next_marker(), probe_done)
        };
        if marker.is_none() && !probe_done {
            continue;
        }
        let mut batch = WriteBatch::new();
        if let Some(marker) = marker {
            batch.put_meta(log.log, crate::repair::META_SYNCED, &marker);
        }
        if probe_done {
            batch.delete_meta(log.log, crate::vote_probe::META_PROBE_TERM);
        }
        let on_durable: Durable = Box::new(|_: chatlog_storage::Result<()>| {});
        if log.engine.submit(&batch, on_durable).await.is_err() {
            // The engine stopped; the group stops with it.
            return;
        }
    }
}

impl Drop for GroupLog {
    fn drop(&mut self) {
        // Lets the marker writer see the log is gone.
        if let Ok(st) = self.state.lock() {
            st.marker_wake.notify_one();
        }
    }
}

// ---- end issue 9 ----

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = index_range(&range);
        Ok(self.shared.read(start, end, usize::MAX)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.shared.lock().vote)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(self.shared.read(start, end, REPLICATION_READ_BYTES_MAX)?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let st = self.shared.lock();
        Ok(LogState {
            last_purged_log_id: st.purged,
            last_log_id: st.last.or(st.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            shared: Arc::clone(&self.shared),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        Ok(self.shared.save_vote(vote).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        Ok(self.shared.save_committed(committed).await?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.shared.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        Ok(self.shared.append(entries, callback).await?)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        Ok(self.shared.truncate_after(last_log_id).await?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        Ok(self.shared.purge(log_id).await?)
    }
}
