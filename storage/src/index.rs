//! The in-memory index: per log its bounds, its spans (which segment holds which index
//! range), redaction overrides and metadata; per segment its live-entry count and, while
//! it is active or not yet persisted, its runs (where each appended op sits).
//!
//! Memory is kept off the per-entry path: a span covers every index a log wrote into one
//! segment, and run tables of sealed segments live on disk in index files (`idx.rs`),
//! read a 4 KiB checked block at a time. This module makes decisions only; it does no I/O.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::LogId;
use crate::batch::OpSummary;
use crate::error::Error;
use crate::format::OpKind;
use crate::loghash::LogMap;

/// Where an entry lives: a record in a segment and the op inside that record's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub segment: u64,
    pub offset: u32,
    pub op: u16,
}

/// Indexes `[first, last]` of a log whose current copy is in `segment` (unless
/// overridden by a redaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub first: u64,
    pub last: u64,
    pub segment: u64,
}

/// An op of entries within one segment: indexes `[first, first + count)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub first: u64,
    pub count: u32,
    pub offset: u32,
    pub op: u16,
}

impl Run {
    fn end(&self) -> u64 {
        self.first + self.count as u64
    }
}

/// First and next index of a log. Empty when `first == next`. A log that has never been
/// written (`anchored == false`) accepts its first append at any index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Bounds {
    pub first: u64,
    pub next: u64,
    pub anchored: bool,
}

impl Bounds {
    /// The bounds after `op`, or why `op` is refused.
    pub fn after(self, op: &OpSummary) -> Result<Bounds, String> {
        let mut b = self;
        match op.kind {
            OpKind::Append => {
                if b.anchored && op.index != b.next {
                    return Err(format!(
                        "append at {} does not continue the log (next index is {})",
                        op.index, b.next
                    ));
                }
                if !b.anchored {
                    b.first = op.index;
                    b.anchored = true;
                }
                b.next = op.index.checked_add(op.count as u64).ok_or_else(|| {
                    format!(
                        "append at {} of {} entries runs past the last index",
                        op.index, op.count
                    )
                })?;
            }
            OpKind::TruncateAfter => {
                let keep_next = op.index.saturating_add(1);
                if !b.anchored {
                    b = Bounds {
                        first: keep_next,
                        next: keep_next,
                        anchored: true,
                    };
                } else if keep_next < b.first && b.first == b.next {
                    // s7raft: "reset log start" (`WriteBatch::reset_log_start`): an
                    // empty log may start again at any lower index (nothing is lost).
                    b = reset_start(b, keep_next);
                } else if keep_next < b.first {
                    return Err(format!(
                        "truncate after {} reaches below the first index {}",
                        op.index, b.first
                    ));
                } else if keep_next < b.next {
                    b.next = keep_next;
                }
            }
            OpKind::PurgeBefore => {
                if !b.anchored {
                    b = Bounds {
                        first: op.index,
                        next: op.index,
                        anchored: true,
                    };
                } else if op.index > b.first {
                    b.first = op.index;
                    b.next = b.next.max(op.index);
                }
            }
            OpKind::Redact => {
                if !(b.first..b.next).contains(&op.index) {
                    return Err(format!(
                        "redact of {} outside the log's [{}, {})",
                        op.index, b.first, b.next
                    ));
                }
            }
            // Rewrites relocate what still exists and skip the rest; meta ops touch no index.
            OpKind::Rewrite | OpKind::PutMeta | OpKind::DeleteMeta => {}
        }
        Ok(b)
    }
}

/// s7raft, "reset log start": the bounds of an empty log made to continue at `next`
/// (below its first index; upwards is `purge_before`). A Raft replica that moved away
/// and back, or installs a snapshot older than its own purge point, needs its empty log
/// to take entries again from where the leader sends them.
fn reset_start(b: Bounds, next: u64) -> Bounds {
    debug_assert!(b.anchored && b.first == b.next && next < b.first);
    Bounds {
        first: next,
        next,
        anchored: true,
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct LogState {
    pub bounds: Bounds,
    pub spans: VecDeque<Span>,
    pub overrides: BTreeMap<u64, Location>,
    pub meta: BTreeMap<Bytes, Bytes>,
    /// Set when a read found corruption in this log: it serves nothing after that.
    pub failed: Option<Arc<Error>>,
    /// Appends this index applied since the engine opened (replay included), as data
    /// bytes and entries, scaled down by the fraction of the log removed since: the
    /// average entry size behind `Engine::log_disk_bytes`. In memory only (not in the
    /// checkpoint), so a log not appended to since open has none.
    pub seen: SeenBytes,
}

/// See [`LogState::seen`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SeenBytes {
    pub bytes: u64,
    pub entries: u64,
}

impl SeenBytes {
    fn add(&mut self, op: &OpSummary) {
        self.bytes += u64::from(op.data_len);
        self.entries += u64::from(op.count);
    }

    /// `removed` of the log's `live` entries left it: bytes and entries shrink by that
    /// fraction, so the mean stays and later appends weigh more. (Which of the removed
    /// entries were seen is unknown: after a restart the oldest were not.)
    fn remove(&mut self, removed: u64, live: u64) {
        if removed == 0 || live == 0 {
            return;
        }
        let keep = |v: u64| {
            (u128::from(v) * u128::from(live - removed.min(live)) / u128::from(live)) as u64
        };
        let entries = keep(self.entries);
        if entries == 0 && removed < live {
            // Too few seen to scale down: keep them, the mean is what matters.
            return;
        }
        self.bytes = if entries == 0 { 0 } else { keep(self.bytes) };
        self.entries = entries;
    }

    /// Mean data bytes of one entry, if any append was seen.
    pub fn entry_bytes_mean(&self) -> Option<f64> {
        (self.entries > 0).then(|| self.bytes as f64 / self.entries as f64)
    }
}

impl LogState {
    /// The segment whose span covers `index`.
    pub fn span_segment(&self, index: u64) -> Option<u64> {
        let i = self.spans.partition_point(|s| s.last < index);
        self.spans
            .get(i)
            .filter(|s| s.first <= index)
            .map(|s| s.segment)
    }
}

/// Counts of one segment, kept for compaction and deletion decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SegmentCounts {
    /// Entries ever written into the segment.
    pub total: u64,
    /// Entries whose current copy is in the segment.
    pub live: u64,
    /// Entries whose bytes here were replaced by a redaction. Such a segment is deleted,
    /// never recycled, when it dies: recycling keeps old bytes in the file.
    pub redacted: u64,
}

/// The whole index. One `RwLock` guards it; the I/O thread is its only writer apart from
/// the maintenance thread's bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub logs: LogMap<LogId, LogState>,
    pub counts: BTreeMap<u64, SegmentCounts>,
    /// Run tables of segments whose index file is not yet written. Behind an `Arc` so
    /// the maintenance thread takes a sealed segment's table (megabytes) as a reference
    /// count under the index read lock instead of a copy that held the I/O thread's next
    /// index update for milliseconds (raft session 8, half-load p99 bursts); the active
    /// segment's table is unshared, so `Arc::make_mut` never copies it.
    pub runs: LogMap<u64, Arc<LogMap<LogId, Vec<Run>>>>,
}

impl Index {
    fn runs_mut(&mut self, segment: u64, log: LogId) -> &mut Vec<Run> {
        Arc::make_mut(self.runs.entry(segment).or_default())
            .entry(log)
            .or_default()
    }

    fn live_add(&mut self, segment: u64, n: u64) {
        self.counts.entry(segment).or_default().live += n;
    }

    fn live_sub(&mut self, segment: u64, n: u64) {
        let c = self.counts.entry(segment).or_default();
        assert!(
            c.live >= n,
            "segment {segment} live count {} below {n}: index bug",
            c.live
        );
        c.live -= n;
    }

    /// Applies one op that has already been validated (or that recovery replays) and that
    /// sits at `loc` (only meaningful for entries ops). Never fails: a refusal was decided
    /// by [`Bounds::after`] beforehand.
    pub fn apply(&mut self, op: &OpSummary, loc: Location) {
        let log = op.log_id;
        let state = self.logs.entry(log).or_default();
        let before = state.bounds;
        let after = before
            .after(op)
            .expect("op was validated before it was applied");
        match op.kind {
            OpKind::Append => {
                append_span(state, loc.segment, op);
                state.bounds = after;
                state.seen.add(op);
                let c = self.counts.entry(loc.segment).or_default();
                c.total += op.count as u64;
                c.live += op.count as u64;
                let runs = self.runs_mut(loc.segment, log);
                append_run(runs, op, loc.offset, loc.op);
            }
            OpKind::TruncateAfter => {
                let keep_next = op.index.saturating_add(1);
                self.remove_range(log, keep_next, u64::MAX);
                self.logs.get_mut(&log).expect("exists").bounds = after;
            }
            OpKind::PurgeBefore => {
                self.remove_range(log, 0, op.index);
                self.logs.get_mut(&log).expect("exists").bounds = after;
            }
            OpKind::Redact => {
                let old = match state.overrides.get(&op.index) {
                    Some(o) => o.segment,
                    None => state
                        .span_segment(op.index)
                        .expect("validated index has a span"),
                };
                state.overrides.insert(op.index, loc);
                self.live_sub(old, 1);
                self.counts.entry(old).or_default().redacted += 1;
                let c = self.counts.entry(loc.segment).or_default();
                c.total += 1;
                c.live += 1;
            }
            OpKind::Rewrite => self.apply_rewrite(op, loc),
            OpKind::PutMeta => {
                state.meta.insert(op.key.clone(), op.value.clone());
            }
            OpKind::DeleteMeta => {
                state.meta.remove(&op.key);
            }
        }
    }

    /// Applies every op of one record at `offset` of `segment`. Records of appends only
    /// (the common case: a group commit of new entries) take a path that looks up the
    /// segment's tables once per record instead of once per op.
    pub fn apply_record(&mut self, segment: u64, offset: u32, ops: &[OpSummary]) {
        if self.stage_appends(segment, offset, ops) {
            self.publish_appends(ops);
            return;
        }
        for (k, op) in ops.iter().enumerate() {
            self.apply(
                op,
                Location {
                    segment,
                    offset,
                    op: k as u16,
                },
            );
        }
    }

    /// The first half of [`Index::apply_record`] for a record of appends only (returns
    /// `false`, doing nothing, for any other record): its spans, runs, counts and seen
    /// bytes, but not the logs' bounds, so no reader finds its entries yet (every lookup
    /// checks the bounds first, [`Index::locate`]). The committer stages a record while
    /// its write and fdatasync are in flight and publishes it once durable
    /// ([`Index::publish_appends`]): the index update's cache misses (three per op: the
    /// log's state, its last span, its last run) leave the path between fdatasync and
    /// acknowledgement. Records must be staged and published in record order, with no
    /// other apply of those logs in between (the committer keeps staged records a prefix
    /// of what is pending). A staged record whose write fails is never published: the
    /// engine stops, and the spans and runs past a log's bounds are never looked at.
    pub fn stage_appends(&mut self, segment: u64, offset: u32, ops: &[OpSummary]) -> bool {
        if !ops.iter().all(|op| op.kind == OpKind::Append) {
            return false;
        }
        let Index { logs, counts, runs } = self;
        let seg_runs = Arc::make_mut(runs.entry(segment).or_default());
        let mut added = 0u64;
        for (k, op) in ops.iter().enumerate() {
            let state = logs.entry(op.log_id).or_default();
            append_span(state, segment, op);
            state.seen.add(op);
            append_run(seg_runs.entry(op.log_id).or_default(), op, offset, k as u16);
            added += op.count as u64;
        }
        let c = counts.entry(segment).or_default();
        c.total += added;
        c.live += added;
        true
    }

    /// The second half of [`Index::apply_record`] for a record [`Index::stage_appends`]
    /// staged: moves each log's bounds past its appends, which makes them readable.
    pub fn publish_appends(&mut self, ops: &[OpSummary]) {
        for op in ops {
            let state = self
                .logs
                .get_mut(&op.log_id)
                .expect("a staged log has a state");
            state.bounds = state
                .bounds
                .after(op)
                .expect("op was validated before it was applied");
        }
    }

    /// Drops indexes `[from, to)` of `log`: spans, overrides, live counts.
    fn remove_range(&mut self, log: LogId, from: u64, to: u64) {
        let Some(state) = self.logs.get_mut(&log) else {
            return;
        };
        let live_before = state.bounds.next - state.bounds.first;
        let mut removed = 0u64;
        let doomed: Vec<(u64, Location)> = state
            .overrides
            .range(from..to)
            .map(|(i, l)| (*i, *l))
            .collect();
        let mut adjust: Vec<(u64, i64)> = Vec::new();
        for (i, l) in &doomed {
            state.overrides.remove(i);
            adjust.push((l.segment, -1));
            // The span copy was already uncounted when the override was made; count it
            // again so the span removal below can uncount every index uniformly.
            if let Some(seg) = state.span_segment(*i) {
                adjust.push((seg, 1));
            }
        }
        let mut kept = VecDeque::with_capacity(state.spans.len());
        for s in state.spans.drain(..) {
            if s.last < from || s.first >= to {
                kept.push_back(s);
                continue;
            }
            let cut_first = s.first.max(from);
            let cut_last = s.last.min(to.saturating_sub(1));
            removed += cut_last - cut_first + 1;
            adjust.push((s.segment, -((cut_last - cut_first + 1) as i64)));
            if s.first < cut_first {
                kept.push_back(Span {
                    first: s.first,
                    last: cut_first - 1,
                    segment: s.segment,
                });
            }
            if s.last > cut_last {
                kept.push_back(Span {
                    first: cut_last + 1,
                    last: s.last,
                    segment: s.segment,
                });
            }
        }
        state.spans = kept;
        state.seen.remove(removed, live_before);
        for (seg, delta) in adjust {
            if delta >= 0 {
                self.live_add(seg, delta as u64);
            } else {
                self.live_sub(seg, (-delta) as u64);
            }
        }
    }

    /// Relocates the indexes of a rewrite op that still live in its source segment.
    fn apply_rewrite(&mut self, op: &OpSummary, loc: Location) {
        let source = op.aux;
        let log = op.log_id;
        let c = self.counts.entry(loc.segment).or_default();
        c.total += op.count as u64;
        let Some(state) = self.logs.get_mut(&log) else {
            return;
        };
        let (lo, hi) = (op.index, op.index + op.count as u64);
        let mut moved = 0u64;
        // The pieces of [lo, hi) actually relocated. Only they get runs: an index of the op
        // whose current copy is elsewhere (truncated and appended again since compaction
        // read it) must not get a run here, or `find_run`, which prefers the run with the
        // highest first index, could pick the op's stale copy over a newer append run of
        // this segment that starts lower.
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut spans = VecDeque::with_capacity(state.spans.len() + 2);
        for s in state.spans.drain(..) {
            if s.segment != source || s.last < lo || s.first >= hi {
                spans.push_back(s);
                continue;
            }
            let a = s.first.max(lo);
            let b = s.last.min(hi - 1);
            if s.first < a {
                spans.push_back(Span {
                    first: s.first,
                    last: a - 1,
                    segment: s.segment,
                });
            }
            spans.push_back(Span {
                first: a,
                last: b,
                segment: loc.segment,
            });
            pieces.push((a, b));
            let overridden = state.overrides.range(a..=b).count() as u64;
            moved += b - a + 1 - overridden;
            if s.last > b {
                spans.push_back(Span {
                    first: b + 1,
                    last: s.last,
                    segment: s.segment,
                });
            }
        }
        // Merge neighbours that now point at the same segment.
        let mut merged: VecDeque<Span> = VecDeque::with_capacity(spans.len());
        for s in spans {
            match merged.back_mut() {
                Some(m) if m.segment == s.segment && m.last + 1 == s.first => m.last = s.last,
                _ => merged.push_back(s),
            }
        }
        state.spans = merged;
        if moved > 0 {
            self.live_sub(source, moved);
            self.live_add(loc.segment, moved);
        }
        let runs = self.runs_mut(loc.segment, log);
        for (a, b) in pieces {
            let at = runs.partition_point(|r| r.first < a);
            runs.insert(
                at,
                Run {
                    first: a,
                    count: (b - a + 1) as u32,
                    offset: loc.offset,
                    op: loc.op,
                },
            );
        }
    }

    /// Where entry `index` of `log` lives, as far as the in-memory tables know: an
    /// override, or a span plus (for unpersisted segments) its run.
    pub fn locate(&self, log: LogId, index: u64) -> Result<Lookup, Error> {
        let state = self.logs.get(&log).ok_or(Error::OutOfRange {
            log,
            index,
            first: 0,
            next: 0,
        })?;
        if let Some(cause) = &state.failed {
            return Err(Error::LogFailed {
                log,
                cause: cause.clone(),
            });
        }
        let b = state.bounds;
        if !(b.first..b.next).contains(&index) {
            return Err(Error::OutOfRange {
                log,
                index,
                first: b.first,
                next: b.next,
            });
        }
        if let Some(loc) = state.overrides.get(&index) {
            return Ok(Lookup::At(*loc));
        }
        let segment = state
            .span_segment(index)
            .expect("every held index has a span");
        if let Some(runs) = self.runs.get(&segment) {
            let runs = runs.get(&log).map(Vec::as_slice).unwrap_or(&[]);
            return match find_run(runs, index) {
                Some(r) => Ok(Lookup::At(Location {
                    segment,
                    offset: r.offset,
                    op: r.op,
                })),
                None => panic!("span of log {log} points at segment {segment} without a run"),
            };
        }
        Ok(Lookup::InIndexFile { segment })
    }
}

fn append_span(state: &mut LogState, segment: u64, op: &OpSummary) {
    let last = op.index + op.count as u64 - 1;
    match state.spans.back_mut() {
        Some(s) if s.segment == segment && s.last + 1 == op.index => s.last = last,
        _ => state.spans.push_back(Span {
            first: op.index,
            last,
            segment,
        }),
    }
}

fn append_run(runs: &mut Vec<Run>, op: &OpSummary, offset: u32, op_number: u16) {
    // An append continues the log, so every run at or past its first index in this
    // segment was truncated away: drop it, cut one that straddles.
    while runs.last().is_some_and(|r| r.first >= op.index) {
        runs.pop();
    }
    if let Some(r) = runs.last_mut()
        && r.end() > op.index
    {
        r.count = (op.index - r.first) as u32;
    }
    runs.push(Run {
        first: op.index,
        count: op.count,
        offset,
        op: op_number,
    });
}

/// Result of [`Index::locate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    At(Location),
    /// Look the index up in the segment's index file.
    InIndexFile {
        segment: u64,
    },
}

/// The latest run at or before `index` that covers it. Runs are sorted by first index;
/// stale runs (truncated, relocated) may overlap older ones, so look back past them.
pub(crate) fn find_run(runs: &[Run], index: u64) -> Option<Run> {
    let mut i = runs.partition_point(|r| r.first <= index);
    while i > 0 {
        i -= 1;
        if runs[i].end() > index {
            return Some(runs[i]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, log: LogId, index: u64, count: u32, aux: u64) -> OpSummary {
        OpSummary {
            kind,
            log_id: log,
            index,
            count,
            aux,
            key: Bytes::new(),
            value: Bytes::new(),
            data_len: count * 100,
        }
    }

    fn at(segment: u64, offset: u32) -> Location {
        Location {
            segment,
            offset,
            op: 0,
        }
    }

    #[test]
    fn seen_bytes_keep_their_mean_through_removals() {
        let mut seen = SeenBytes::default();
        seen.add(&op(OpKind::Append, 1, 1, 100, 0)); // 100 entries, 100 bytes each
        assert_eq!(seen.entry_bytes_mean(), Some(100.0));
        seen.remove(50, 100);
        assert_eq!((seen.entries, seen.bytes), (50, 5_000));
        // After a restart only the newest entries were seen; removing old ones that
        // would scale them to nothing keeps them (and the mean).
        let mut few = SeenBytes::default();
        few.add(&op(OpKind::Append, 1, 991, 1, 0));
        few.remove(900, 1_000);
        assert_eq!(few.entry_bytes_mean(), Some(100.0));
        few.remove(1_000, 1_000);
        assert_eq!(few.entry_bytes_mean(), None, "the whole log went");
    }

    /// Issue 9: compaction read entries 55..=60 of a sealed segment; before its rewrite op
    /// landed, the log was cut after 52 and 53..=60 appended again (new term) in the
    /// active segment. The rewrite relocates nothing, and must not shadow the new copies.
    #[test]
    fn a_rewrite_that_lost_a_race_with_truncate_and_append_does_not_shadow_the_new_entries() {
        let log = 7;
        let mut index = Index::default();
        index.apply(&op(OpKind::Append, log, 50, 11, 0), at(1, 100));
        index.apply(&op(OpKind::TruncateAfter, log, 52, 0, 0), at(2, 150));
        index.apply(&op(OpKind::Append, log, 53, 8, 0), at(2, 200));
        // The rewrite of [55, 61) read from segment 1, written into segment 2.
        index.apply(&op(OpKind::Rewrite, log, 55, 6, 1), at(2, 300));
        for i in 53..=60 {
            assert_eq!(
                index.locate(log, i).expect("held"),
                Lookup::At(at(2, 200)),
                "index {i} must be read from the append, not the stale rewrite"
            );
        }
        for i in 50..=52 {
            assert_eq!(index.locate(log, i).expect("held"), Lookup::At(at(1, 100)));
        }
    }

    /// Session 8: a record staged while its write runs is invisible until published, and
    /// staging then publishing gives the same index as applying it whole.
    #[test]
    fn staged_appends_are_invisible_until_published_and_match_a_whole_apply() {
        let ops = [
            op(OpKind::Append, 1, 11, 3, 0),
            op(OpKind::Append, 2, 1, 2, 0),
            op(OpKind::Append, 1, 14, 1, 0),
        ];
        let mut staged = Index::default();
        let mut whole = Index::default();
        for ix in [&mut staged, &mut whole] {
            ix.apply(&op(OpKind::Append, 1, 1, 10, 0), at(3, 64));
        }
        assert!(staged.stage_appends(3, 4096, &ops));
        for i in 11..=14 {
            assert!(
                matches!(staged.locate(1, i), Err(Error::OutOfRange { next: 11, .. })),
                "staged index {i} is visible"
            );
        }
        assert!(matches!(staged.locate(2, 1), Err(Error::OutOfRange { .. })));
        assert_eq!(staged.locate(1, 10).expect("held"), Lookup::At(at(3, 64)));
        staged.publish_appends(&ops);
        whole.apply_record(3, 4096, &ops);
        for (log, range) in [(1u64, 1..15u64), (2, 1..3)] {
            for i in range {
                assert_eq!(staged.locate(log, i).ok(), whole.locate(log, i).ok());
                assert!(staged.locate(log, i).is_ok(), "{log}/{i} published");
            }
            let (a, b) = (&staged.logs[&log], &whole.logs[&log]);
            assert_eq!((a.bounds, &a.spans, a.seen), (b.bounds, &b.spans, b.seen));
        }
        assert_eq!(staged.counts, whole.counts);
        assert_eq!(staged.runs[&3], whole.runs[&3]);
        // Anything but appends is not staged (applied whole once durable).
        let mixed = [
            op(OpKind::Append, 1, 15, 1, 0),
            op(OpKind::PurgeBefore, 1, 3, 0, 0),
        ];
        assert!(!staged.stage_appends(3, 8192, &mixed));
        assert_eq!(
            staged.counts, whole.counts,
            "a refused stage changes nothing"
        );
    }
}
