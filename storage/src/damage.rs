//! Damage cut at open (issue 9): what [`crate::RecoveryMode::CutDamagedTail`] dropped.
//!
//! What it owns: the report of one cut — the file and offset of the damaged record, why
//! it was judged damage and not a torn write, and, per log, what the valid records
//! dropped after it held (the highest index they appended and the metadata values they
//! wrote), read from those records with their CRCs checked. A replicated owner (the Raft
//! log store) uses this to know what it had made durable and must get back from peers
//! before it takes part in elections again.
//!
//! What it must not do: keep any dropped byte for serving (only indexes and small
//! metadata values are reported), or read a record whose header or body check fails
//! (the walk stops there).
//!
//! Damage before later segments (session 6). A damaged record in an OLDER segment (later
//! segments hold records), a segment file cut short before later ones, or missing (one
//! the checkpoint names, or a gap in the record sequence), are cut the same way instead
//! of refused: the rest of the damaged segment is dropped as above, and replay
//! goes on with the later segments in "after damage" mode ([`AfterDamage`]): an op that
//! no longer fits its log (an append that does not continue it, because the entries
//! before it were in the dropped range) is skipped and the log is reported as cut
//! ([`Damage::lost_from`]); every other op applies as usual, so each log stays dense and
//! holds only entries whose whole prefix was read back with its checks. A log whose
//! entries sat in a MISSING segment the checkpoint covers is truncated below the first
//! of them. [`Engine::open`](crate::Engine::open) then pins each such cut with a
//! `TruncateAfter` record of its own, so a restart before the next checkpoint (which
//! replays the same damage again) keeps what was written since the cut.
//!
//! The newest records lost (session 7). The NEWEST segment file cut short, or missing,
//! or with a bad header: nothing after it says what its lost tail held (entries, a vote,
//! markers). A missing or headerless newest file is seen because something names it: the
//! seal record of the segment before it holds the next segment's id (the writer creates
//! and syncs that file, header and directory, before it writes the seal), and the
//! checkpoint's `replay_from` names the segment replay starts at (created before the
//! seal that wrote the checkpoint). Under `CutDamagedTail` the cut is reported with
//! [`Damage::tail_lost`] and the engine opens (writes go to a fresh segment); the owner
//! decides what the unknown loss means (the Raft layer probes its peers). Under the
//! other modes (a single-replica node, no one to learn the tail from) the cut-short file
//! is refused naming file and offset, as before; a missing or headerless newest file is
//! not looked for there (hand-made test inputs, such as the fuzz corpus's lone sealed
//! segments, would all be refused).
//!
//! Damage found by a read while running (session 6). A read whose checks fail stops its
//! log (it serves nothing more). [`Engine::cut_failed_log`] is the way back for an owner
//! that can get the lost range from elsewhere: it finds the first entry of the log that
//! fails its checks (probing only the log's entries in the damaged file), drops it and
//! everything after it with a `TruncateAfter` (plus whatever the owner adds to the same
//! batch), and lifts the stop. The damaged bytes stay on disk but nothing points at
//! them; compaction frees them with their segment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::LogId;
use crate::format::{BatchBody, OpKind, RECORD_KIND_BATCH};
use crate::recovery::summaries;
use crate::segment::Segment;

/// Records read past the damaged one to report what was dropped. A segment holds at most
/// `SEGMENT_BYTES_MAX / RECORD_ALIGN` records; this bounds the walk's time and the report's
/// size (one entry per log touched) well above what a group commit writes between two
/// restarts of a normal node.
pub const DAMAGE_WALK_RECORDS_MAX: usize = 1 << 20;

/// One damaged record found at open and everything after it in its segment, dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// Byte offset of the damaged record in it.
    pub offset: u64,
    /// Why this is damage to synced data and not a torn, never-acknowledged write.
    pub detail: String,
    /// Per log, what the valid records dropped after the damaged one held. A log absent
    /// here may still have lost entries or metadata in the damaged record itself.
    pub logs: BTreeMap<LogId, DroppedLog>,
    /// Logs cut beyond the damaged segment (damage before later segments, or a missing
    /// segment file): the first index each one no longer holds. Pinned at open by a
    /// `TruncateAfter` of each (see the module docs).
    pub lost_from: BTreeMap<LogId, u64>,
    /// Whether the damaged segment is the newest one with records, cut and sealed in
    /// place at `offset` (the session-5 case); `false` when later segments follow it or
    /// the file is too short to take a seal.
    pub sealed_at_offset: bool,
    /// Issue 9 (session 7): the NEWEST records are lost and nothing after them says what
    /// they held: the newest segment file cut short, missing, or with a bad header while
    /// the seal before it (or the checkpoint) names it. Every owner that replicates its
    /// logs must then assume any of them lost writes (entries, votes, markers) and learn
    /// from its peers what it may have had (`chatlog_raft::vote_probe`).
    pub tail_lost: bool,
}

impl Damage {
    /// A damage report for `path` at `offset`, nothing dropped yet.
    pub(crate) fn new(path: PathBuf, offset: u64, detail: String) -> Damage {
        Damage {
            path,
            offset,
            detail,
            logs: BTreeMap::new(),
            lost_from: BTreeMap::new(),
            sealed_at_offset: false,
            tail_lost: false,
        }
    }

    /// Folds a second damage found at the same open into this one (the first keeps its
    /// file and offset; the detail names both).
    pub(crate) fn merge(&mut self, other: Damage) {
        self.detail = format!(
            "{}; also {} at offset {}: {}",
            self.detail,
            other.path.display(),
            other.offset,
            other.detail
        );
        self.tail_lost |= other.tail_lost;
        for (log, d) in other.logs {
            let mine = self.logs.entry(log).or_default();
            mine.last_index = mine.last_index.max(d.last_index);
            mine.meta.extend(d.meta);
        }
        for (log, from) in other.lost_from {
            let mine = self.lost_from.entry(log).or_insert(from);
            *mine = (*mine).min(from);
        }
    }
}

impl DroppedLog {
    /// Accounts one op of a dropped (or skipped) record.
    pub(crate) fn note(&mut self, op: &crate::batch::OpSummary) {
        match op.kind {
            OpKind::Append if op.count > 0 => {
                let last = op.index + u64::from(op.count) - 1;
                self.last_index = Some(self.last_index.map_or(last, |l| l.max(last)));
            }
            OpKind::PutMeta => {
                self.meta.insert(op.key.clone(), Some(op.value.clone()));
            }
            OpKind::DeleteMeta => {
                self.meta.insert(op.key.clone(), None);
            }
            _ => {}
        }
    }
}

/// Replay after a damage cut that later segments follow (see the module docs).
#[derive(Debug)]
pub(crate) struct AfterDamage {
    /// The damage so far; skipped ops are added to it.
    pub damage: Damage,
}

impl AfterDamage {
    /// Decides one replayed op: `true` to apply it, `false` to skip it because it no
    /// longer fits its log (whose bounds are `bounds`); a skipped op's log is reported as
    /// cut from its next index. Ops of logs the damage touched are accounted either way.
    pub(crate) fn admit(
        &mut self,
        op: &crate::batch::OpSummary,
        bounds: crate::index::Bounds,
    ) -> bool {
        // A log first seen after the damage may have had its start in the lost range:
        // its first append fits only at the very start of a log (index 0 or 1), else
        // only once something anchored it (a purge or truncation names where it starts).
        let unanchored_gap = !bounds.anchored && op.kind == OpKind::Append && op.index > 1;
        let fits = !unanchored_gap && bounds.after(op).is_ok();
        if !fits {
            self.damage
                .lost_from
                .entry(op.log_id)
                .or_insert(bounds.next);
        }
        if !fits || self.damage.logs.contains_key(&op.log_id) {
            self.damage.logs.entry(op.log_id).or_default().note(op);
        }
        fits
    }
}

/// What the dropped valid records held for one log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DroppedLog {
    /// The highest index the dropped records appended (after their own truncations).
    pub last_index: Option<u64>,
    /// The last value each metadata key was given by the dropped records (`None`: deleted).
    pub meta: BTreeMap<Bytes, Option<Bytes>>,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "damaged record in {} at offset {}: {}; it and {} log(s)' later records were \
             dropped, {} log(s) cut short",
            self.path.display(),
            self.offset,
            self.detail,
            self.logs.len(),
            self.lost_from.len()
        )
    }
}

/// Reads the valid records from `from` on (stopping at the first that fails its checks or
/// at a seal) and reports what they held per log.
pub(crate) fn dropped_after(seg: &Arc<Segment>, from: u64) -> BTreeMap<LogId, DroppedLog> {
    let mut logs: BTreeMap<LogId, DroppedLog> = BTreeMap::new();
    let mut offset = from;
    for _ in 0..DAMAGE_WALK_RECORDS_MAX {
        let Ok(Some(header)) = seg.header_at(offset) else {
            break;
        };
        if header.kind != RECORD_KIND_BATCH {
            break;
        }
        let Ok(body) = seg.body_at(offset, &header) else {
            break;
        };
        let Ok(body) = BatchBody::parse(body) else {
            break;
        };
        for op in summaries(&body) {
            let log = logs.entry(op.log_id).or_default();
            match op.kind {
                OpKind::Append if op.count > 0 => {
                    log.last_index = Some(op.index + u64::from(op.count) - 1);
                }
                OpKind::TruncateAfter => {
                    log.last_index = log.last_index.map(|l| l.min(op.index));
                }
                _ => log.note(&op),
            }
        }
        offset += header.record_bytes() as u64;
    }
    logs
}

impl crate::Engine {
    /// The batch that pins the cuts of [`Damage::lost_from`] (one `TruncateAfter` per
    /// cut log, at what it holds now), or `None` when there is nothing to pin.
    pub(crate) fn damage_pin_batch(&self) -> Option<crate::WriteBatch> {
        let damage = self.damage()?;
        let mut batch = crate::WriteBatch::new();
        for log in damage.lost_from.keys() {
            if let Some(b) = self.bounds(*log) {
                batch.truncate_after(*log, b.next.saturating_sub(1));
            }
        }
        (!batch.is_empty()).then_some(batch)
    }
}

impl crate::Engine {
    /// Issue 9 (session 6): why `log` is stopped (a read found corruption in it), if it is.
    pub fn log_failure(&self, log: LogId) -> Option<Arc<crate::Error>> {
        let index = self.shared().index.read().expect("index lock");
        index.logs.get(&log).and_then(|l| l.failed.clone())
    }

    /// Issue 9 (session 6): cuts a log that a failed read stopped ([`Engine::log_failure`])
    /// before its first entry that fails its checks, in one durable batch together with
    /// the ops already in `batch`, and lets it serve and take writes again. Returns the
    /// first index dropped, or `None` when the log is not stopped or no entry fails its
    /// checks any more (the stop is lifted then, `batch` not written).
    pub async fn cut_failed_log(
        &self,
        log: LogId,
        mut batch: crate::WriteBatch,
    ) -> crate::Result<Option<u64>> {
        let Some(cause) = self.log_failure(log) else {
            return Ok(None);
        };
        // The damaged file, if the cause names one: only the log's entries there are probed.
        let damaged_segment = match &*cause {
            crate::Error::Corruption { file, .. } => {
                file.file_name().and_then(|n| n.to_str()).and_then(|n| {
                    crate::segment::parse_name(n, "seg")
                        .or_else(|| crate::segment::parse_name(n, "idx"))
                })
            }
            _ => None,
        };
        let candidates: Vec<(u64, u64)> = {
            let mut index = self.shared().index.write().expect("index lock");
            let Some(state) = index.logs.get_mut(&log) else {
                return Ok(None);
            };
            state.failed = None;
            let mut ranges: Vec<(u64, u64)> = state
                .spans
                .iter()
                .filter(|s| damaged_segment.is_none_or(|id| s.segment == id))
                .map(|s| (s.first, s.last))
                .collect();
            ranges.extend(
                state
                    .overrides
                    .iter()
                    .filter(|(_, l)| damaged_segment.is_none_or(|id| l.segment == id))
                    .map(|(i, _)| (*i, *i)),
            );
            ranges.sort_unstable();
            ranges
        };
        let mut bad = None;
        'probe: for (first, last) in candidates {
            for i in first..=last {
                match self.get(log, i) {
                    Err(e) if e.is_corruption() || matches!(e, crate::Error::LogFailed { .. }) => {
                        bad = Some(i);
                        break 'probe;
                    }
                    _ => {}
                }
            }
        }
        let clear = || {
            let mut index = self.shared().index.write().expect("index lock");
            if let Some(state) = index.logs.get_mut(&log) {
                state.failed = None;
            }
        };
        let Some(bad) = bad else {
            clear();
            return Ok(None);
        };
        batch.truncate_after(log, bad.saturating_sub(1));
        // A reader may hit the damaged entry again between lifting the stop and the write
        // (which a stopped log refuses): try a few times.
        let mut last_error = None;
        for _ in 0..CUT_ATTEMPTS_MAX {
            clear();
            match self.write(&batch).await {
                Ok(()) => {
                    tracing::error!(
                        log,
                        first_dropped = bad,
                        cause = %cause,
                        status = "damaged",
                        "storage damage found by a read: the log now ends before the damaged \
                         entry"
                    );
                    return Ok(Some(bad));
                }
                Err(e @ crate::Error::LogFailed { .. }) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("an attempt failed"))
    }
}

/// Writes [`crate::Engine::cut_failed_log`] tries before it gives up (each failure means a
/// reader hit the damaged entry again in the moment between lifting the stop and the
/// write; more than a few in a row means a reader loops on it).
pub const CUT_ATTEMPTS_MAX: usize = 4;
