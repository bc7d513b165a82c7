//! Opening a data directory: load the checkpoint, check the segments it names, replay the
//! segments written since, and decide what the tail's last bytes are — a torn write that
//! was never acknowledged (cut off) or damage inside synced data (an error naming file and
//! offset). Restart reads the checkpoint plus at most the segments written since the last
//! seal, so its time does not grow with the data retained.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::batch::OpSummary;
use crate::checkpoint::Checkpoint;
use crate::config::{Config, RecoveryMode, SEAL_RESERVE_BYTES};
use crate::damage::{AfterDamage, Damage, dropped_after};
use crate::error::{Error, Result};
use crate::format::{
    BatchBody, OpKind, RECORD_ALIGN, RECORD_HEADER_BYTES, RECORD_KIND_BATCH, RECORD_KIND_SEAL,
    RecordHeader, SEGMENT_HEADER_BYTES,
};
use crate::fs::{FileSystem, read_file};
use crate::index::{Index, Location};
use crate::maintenance::CHECKPOINT_FILE;
use crate::segment::{Segment, idx_path, parse_name, segment_path};
use crate::writer::Tail;

/// Bytes scanned at a time when looking past a bad record for later valid ones.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Recovered {
    pub index: Index,
    pub segments: BTreeMap<u64, Arc<Segment>>,
    pub recycle: Vec<PathBuf>,
    pub checkpointed_before: u64,
    pub next_segment_id: u64,
    pub next_record_seq: u64,
    pub tail: Option<Tail>,
    pub sealed_pending: bool,
    /// Damage cut under [`RecoveryMode::CutDamagedTail`] (issue 9).
    pub damage: Option<Damage>,
}

/// Op summaries of a parsed body, as the I/O thread had them.
pub(crate) fn summaries(body: &BatchBody) -> Vec<OpSummary> {
    (0..body.op_count())
        .map(|k| {
            let op = body.op(k);
            let (key, value) = match op.kind {
                OpKind::PutMeta | OpKind::DeleteMeta => body.meta(&op),
                _ => Default::default(),
            };
            OpSummary {
                kind: op.kind,
                log_id: op.log_id,
                index: op.index,
                count: op.count,
                aux: op.aux,
                key,
                value,
                data_len: op.data_len,
            }
        })
        .collect()
}

enum SegmentEnd {
    /// Ended with a seal record, which names the next segment (`None`: a seal body
    /// of another size, never written by this code).
    Sealed { next: Option<u64> },
    /// No valid record at this offset; `damage` when the bad record there was judged
    /// damage to synced data and cut ([`RecoveryMode::CutDamagedTail`]).
    /// `truncated`: the file is too short for its records and seal reserve (a seal
    /// cannot be put at `end`).
    Open {
        end: u64,
        damage: Option<Damage>,
        truncated: bool,
    },
}

pub(crate) fn recover(config: &Config, fs: &dyn FileSystem) -> Result<Recovered> {
    let dir = &config.dir;
    fs.create_dir_all(dir)
        .map_err(|e| Error::io("creating data directory", dir, e))?;
    let names = fs
        .list(dir)
        .map_err(|e| Error::io("listing data directory", dir, e))?;
    let mut seg_ids = Vec::new();
    let mut recycle = Vec::new();
    let mut max_id = 0u64;
    for name in &names {
        let path = dir.join(name);
        if name.ends_with(".tmp") {
            fs.remove(&path)
                .map_err(|e| Error::io("removing temporary file", &path, e))?;
        } else if let Some(id) = parse_name(name, "seg") {
            seg_ids.push(id);
            max_id = max_id.max(id);
        } else if name.starts_with("recycle-") {
            recycle.push(path);
        }
    }
    seg_ids.sort_unstable();

    let cp_path = dir.join(CHECKPOINT_FILE);
    let has_checkpoint = names.iter().any(|n| n == CHECKPOINT_FILE);
    let cp = if has_checkpoint {
        let bytes =
            read_file(fs, &cp_path).map_err(|e| Error::io("reading checkpoint", &cp_path, e))?;
        Checkpoint::decode(&cp_path, &bytes)?
    } else {
        Checkpoint {
            next_record_seq: 1,
            ..Checkpoint::default()
        }
    };
    max_id = max_id.max(cp.counts.keys().next_back().copied().unwrap_or(0));
    let mut index = Index {
        logs: cp.logs,
        counts: cp.counts,
        runs: Default::default(),
    };
    let mut segments = BTreeMap::new();

    // Segments the checkpoint covers: they must be there and sound, unless dead.
    for &id in seg_ids.iter().filter(|id| **id < cp.replay_from) {
        if !index.counts.contains_key(&id) {
            // Freed after the checkpoint was taken, deletion interrupted.
            let path = segment_path(dir, id);
            fs.remove(&path)
                .map_err(|e| Error::io("removing dead segment", &path, e))?;
            let _ = fs.remove(&idx_path(dir, id));
            continue;
        }
        let seg = Segment::open(fs, dir, id)?.ok_or_else(|| {
            Error::corruption(segment_path(dir, id), 0, "segment header check failed")
        })?;
        segments.insert(id, Arc::new(seg));
    }
    // Replay what came after the checkpoint.
    let replay: Vec<u64> = seg_ids
        .iter()
        .copied()
        .filter(|id| *id >= cp.replay_from)
        .collect();
    let mut expected_seq = cp.next_record_seq;
    let mut tail: Option<Tail> = None;
    let mut open_tail_seen = false;
    let mut damage_cut: Option<Damage> = None;
    // Issue 9 (session 6): after a damage cut that later segments follow, replay goes on
    // in "after damage" mode (`crate::damage`): ops that no longer fit are skipped.
    let mut after: Option<AfterDamage> = None;
    let cut_mode = config.recovery_mode == RecoveryMode::CutDamagedTail;
    // Issue 9 (session 7): the segment that must exist after what was replayed so far:
    // named by the checkpoint (`replay_from`) or by the last seal (`crate::damage`,
    // "The newest records lost"). Cleared once a segment at or after it opens.
    let mut must_exist: Option<u64> = has_checkpoint.then_some(cp.replay_from);
    for (k, &id) in replay.iter().enumerate() {
        let path = segment_path(dir, id);
        let later_have_records = |ids: &[u64]| -> Result<bool> {
            for &later in ids {
                if let Some(s) = Segment::open(fs, dir, later)? {
                    let s = Arc::new(s);
                    if s.header_at(SEGMENT_HEADER_BYTES as u64)?.is_some() {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        };
        if open_tail_seen {
            // Segments after an unsealed one were prepared but never written: drop them.
            fs.remove(&path)
                .map_err(|e| Error::io("removing unused segment", &path, e))?;
            continue;
        }
        let Some(seg) = Segment::open(fs, dir, id)? else {
            if later_have_records(&replay[k + 1..])? {
                if !cut_mode {
                    return Err(Error::corruption(&path, 0, "segment header check failed"));
                }
                // Issue 9: the whole segment is lost; what it held is found missing by
                // the later segments' ops (skipped) or by the owner's markers.
                let d = Damage::new(path.clone(), 0, "segment header check failed".into());
                note_cut(&mut after, &mut damage_cut, d);
                continue;
            }
            if cut_mode && must_exist == Some(id) {
                // Issue 9 (session 7): named by a seal or the checkpoint, so it was created
                // and synced with its header before anything was written after it: not an
                // interrupted creation but the newest segment file damaged or cut short.
                let detail = "the newest segment file has no valid header (cut short or \
                              damaged) although the seal before it names it: its records \
                              are lost";
                let mut d = Damage::new(path.clone(), 0, detail.into());
                d.tail_lost = true;
                tracing::error!(file = %path.display(), status = "damaged", "storage damage: {detail}");
                // Removed so that the writer's next segment is a fresh file; the damage
                // report (and the owner's own record of it) carries what it meant.
                fs.remove(&path)
                    .map_err(|e| Error::io("removing damaged segment", &path, e))?;
                note_cut(&mut after, &mut damage_cut, d);
                must_exist = None;
                continue;
            }
            // An interrupted creation at the end.
            fs.remove(&path)
                .map_err(|e| Error::io("removing unfinished segment", &path, e))?;
            continue;
        };
        if must_exist == Some(id) {
            must_exist = None;
        }
        let seg = Arc::new(seg);
        let (end, records) =
            replay_segment(config, &seg, &mut index, &mut expected_seq, &mut after)?;
        if records > 0 && must_exist.is_some_and(|x| id > x) {
            // A later segment with records: the record sequence shows the gap.
            must_exist = None;
        }
        segments.insert(id, seg.clone());
        match end {
            SegmentEnd::Sealed { next } => must_exist = next,
            SegmentEnd::Open {
                end,
                damage,
                truncated,
            } => {
                let later = later_have_records(&replay[k + 1..])?;
                if let Some(mut d) = damage {
                    if truncated && !later {
                        // Issue 9 (session 7): the newest segment cut short: nothing after
                        // it says what the lost tail held (entries, votes, markers of any
                        // log). Cut and reported as `tail_lost`; the owner finds out from
                        // its peers what it may have had (only `CutDamagedTail` gets here:
                        // the other modes refuse in `truncation`).
                        d.tail_lost = true;
                        tracing::error!(
                            file = %path.display(),
                            offset = end,
                            detail = %d.detail,
                            status = "damaged",
                            "storage damage: the newest segment file was cut short; what \
                             its lost tail held is unknown"
                        );
                        note_cut(&mut after, &mut damage_cut, d);
                        continue;
                    }
                    if later || after.is_some() {
                        // Issue 9 (session 6): damage before later segments, or a file too
                        // short to take a seal: cut, and the rest of the replay skips what
                        // no longer fits. The segment is left as it is (unsealed); a
                        // restart before the next checkpoint finds the same damage.
                        tracing::error!(
                            file = %path.display(),
                            offset = end,
                            detail = %d.detail,
                            logs = d.logs.len(),
                            status = "damaged",
                            "storage damage: cut a damaged record and everything after it in \
                             its segment; later segments are replayed without what no longer \
                             fits"
                        );
                        note_cut(&mut after, &mut damage_cut, d);
                        continue;
                    }
                    tracing::error!(
                        file = %path.display(),
                        offset = end,
                        detail = %d.detail,
                        logs = d.logs.len(),
                        status = "damaged",
                        "storage damage: cut a damaged record and everything after it in its \
                         segment; the segment is sealed there"
                    );
                    // The seal the writer puts at `end` hides the dropped bytes for good.
                    d.sealed_at_offset = true;
                    open_tail_seen = true;
                    tail = Some(Tail {
                        segment: seg,
                        end,
                        has_records: true,
                    });
                    damage_cut = Some(d);
                    continue;
                }
                if records == 0 && tail.is_some() {
                    // A second empty prepared segment: not needed.
                    segments.remove(&id);
                    fs.remove(&path)
                        .map_err(|e| Error::io("removing unused segment", &path, e))?;
                    continue;
                }
                if records > 0 && later {
                    let detail = "segment ends without a seal but later segments hold records";
                    if !cut_mode {
                        return Err(Error::corruption(&path, end, detail));
                    }
                    let d = Damage::new(path.clone(), end, detail.into());
                    note_cut(&mut after, &mut damage_cut, d);
                    continue;
                }
                open_tail_seen = records > 0;
                tail = Some(Tail {
                    segment: seg,
                    end,
                    has_records: records > 0,
                });
            }
        }
    }
    // Issue 9 (session 7): the newest segment file missing while a seal or the
    // checkpoint names it (nothing after it was replayed).
    // Only under `CutDamagedTail`: the other modes open as before (a single-replica
    // node has no one to learn the lost tail from; see storage/FORMAT.md).
    if let Some(x) = must_exist
        && cut_mode
        && !segments.contains_key(&x)
    {
        let path = segment_path(dir, x);
        let detail = "the newest segment file is missing although the seal before it (or \
                      the checkpoint) names it: its records are lost";
        let mut d = Damage::new(path.clone(), 0, detail.into());
        d.tail_lost = true;
        tracing::error!(file = %path.display(), status = "damaged", "storage damage: {detail}");
        note_cut(&mut after, &mut damage_cut, d);
    }
    // Segments freed after the checkpoint was taken are missing; that is fine once the
    // replay has shown them dead (a purge after the checkpoint killed them).
    let missing: Vec<(u64, u64)> = index
        .counts
        .iter()
        .filter(|(id, _)| !segments.contains_key(id))
        .map(|(id, c)| (*id, c.live))
        .collect();
    for (id, live) in missing {
        if live > 0 {
            let path = segment_path(dir, id);
            let detail = format!("segment holding {live} live entries is missing");
            if !cut_mode {
                return Err(Error::corruption(path, 0, detail));
            }
            // Issue 9 (session 6): every log with entries there is cut below the first.
            let mut d = Damage::new(path, 0, detail);
            d.lost_from = cut_missing_segment(&mut index, id);
            tracing::error!(
                file = %d.path.display(),
                logs = d.lost_from.len(),
                status = "damaged",
                "storage damage: a segment file is missing; every log with entries in it \
                 now ends below the first of them"
            );
            note_cut(&mut after, &mut damage_cut, d);
            if index.counts.get(&id).is_some_and(|c| c.live > 0) {
                return Err(Error::corruption(
                    segment_path(dir, id),
                    0,
                    "segment is missing and its entries could not all be cut",
                ));
            }
        }
        index.counts.remove(&id);
    }
    if let Some(a) = after {
        damage_cut = Some(a.damage);
    }

    let sealed_pending = !has_checkpoint
        || index
            .runs
            .keys()
            .any(|id| tail.as_ref().is_none_or(|t| t.segment.id != *id));
    let next_segment_id = max_id + 1;
    Ok(Recovered {
        index,
        segments,
        recycle,
        checkpointed_before: cp.replay_from,
        next_segment_id,
        next_record_seq: expected_seq,
        tail,
        sealed_pending,
        damage: damage_cut,
    })
}

/// Replays one segment's records into the index. Returns how it ended and how many batch
/// records it held.
fn replay_segment(
    config: &Config,
    seg: &Arc<Segment>,
    index: &mut Index,
    expected_seq: &mut u64,
    after: &mut Option<AfterDamage>,
) -> Result<(SegmentEnd, u64)> {
    let mut offset = SEGMENT_HEADER_BYTES as u64;
    let mut records = 0u64;
    loop {
        let Some(header) = seg.header_at(offset)? else {
            if let Some(end) = truncation(config, seg, offset, None)? {
                return Ok((end, records));
            }
            let damage = check_tail(config, seg, offset, None, None)?;
            return Ok((
                SegmentEnd::Open {
                    end: offset,
                    damage,
                    truncated: false,
                },
                records,
            ));
        };
        if header.record_seq > *expected_seq
            && offset == SEGMENT_HEADER_BYTES as u64
            && config.recovery_mode == RecoveryMode::CutDamagedTail
        {
            // Issue 9 (session 6): records are missing before this segment (a cut
            // segment's dropped rest, or a missing segment file): replay goes on, and what
            // no longer fits is skipped.
            if after.is_none() {
                let detail = format!(
                    "records {} to {} are missing before this segment (a segment file \
                     missing or cut)",
                    *expected_seq,
                    header.record_seq - 1
                );
                *after = Some(AfterDamage {
                    damage: Damage::new(seg.path.clone(), offset, detail),
                });
            }
            *expected_seq = header.record_seq;
        }
        if header.record_seq != *expected_seq {
            return Err(Error::corruption(
                &seg.path,
                offset,
                format!(
                    "record sequence {} where {} was expected",
                    header.record_seq, expected_seq
                ),
            ));
        }
        let body = match seg.body_at(offset, &header) {
            Ok(b) => b,
            Err(e) if e.is_corruption() => {
                if let Some(end) = truncation(config, seg, offset, Some(&header))? {
                    return Ok((end, records));
                }
                let next = offset + header.record_bytes() as u64;
                let damage = check_tail(config, seg, offset, Some(e), Some(next))?;
                return Ok((
                    SegmentEnd::Open {
                        end: offset,
                        damage,
                        truncated: false,
                    },
                    records,
                ));
            }
            Err(e) => return Err(e),
        };
        *expected_seq += 1;
        match header.kind {
            RECORD_KIND_SEAL => {
                let next = <[u8; 8]>::try_from(&body[..]).ok().map(u64::from_le_bytes);
                return Ok((SegmentEnd::Sealed { next }, records));
            }
            RECORD_KIND_BATCH => {
                let body =
                    BatchBody::parse(body).map_err(|d| Error::corruption(&seg.path, offset, d))?;
                for (k, op) in summaries(&body).iter().enumerate() {
                    let bounds = index
                        .logs
                        .get(&op.log_id)
                        .map(|l| l.bounds)
                        .unwrap_or_default();
                    if let Some(a) = after.as_mut()
                        && !a.admit(op, bounds)
                    {
                        continue;
                    }
                    if let Err(reason) = bounds.after(op) {
                        return Err(Error::corruption(
                            &seg.path,
                            offset,
                            format!("replayed op breaks log {}: {reason}", op.log_id),
                        ));
                    }
                    let loc = Location {
                        segment: seg.id,
                        offset: offset as u32,
                        op: k as u16,
                    };
                    index.apply(op, loc);
                }
                records += 1;
            }
            other => {
                return Err(Error::corruption(
                    &seg.path,
                    offset,
                    format!("unknown record kind {other}"),
                ));
            }
        }
        offset += header.record_bytes() as u64;
    }
}

/// A segment file is never shorter than its writes left it: it is created or recycled at
/// its full length (synced before use), and the writer ends every record at least
/// `SEAL_RESERVE_BYTES` before the end of the file so the seal fits. A tail that ends
/// inside that reserve, or a record that runs into it, means the file was cut short after
/// the fact: acknowledged records may be gone, so this is damage, never a torn write to
/// cut silently (issue 9: a replica that forgets acknowledged Raft entries breaks Raft's
/// assumption that a node never forgets what it acknowledged).
fn check_not_truncated(seg: &Arc<Segment>, end: u64, header: Option<&RecordHeader>) -> Result<()> {
    let reserve_starts = seg.len.saturating_sub(SEAL_RESERVE_BYTES);
    let reaches = header.map_or(end, |h| end + h.record_bytes() as u64);
    if reaches > reserve_starts {
        return Err(Error::corruption(
            &seg.path,
            end,
            format!(
                "segment file is {} bytes, too short for its records and seal reserve: \
                 the file was truncated",
                seg.len
            ),
        ));
    }
    Ok(())
}

/// [`check_not_truncated`] under the recovery mode: `Some` end of the segment when it was
/// truncated and [`RecoveryMode::CutDamagedTail`] cuts it there (issue 9, session 6).
fn truncation(
    config: &Config,
    seg: &Arc<Segment>,
    end: u64,
    header: Option<&RecordHeader>,
) -> Result<Option<SegmentEnd>> {
    match check_not_truncated(seg, end, header) {
        Ok(()) => Ok(None),
        Err(Error::Corruption { detail, .. })
            if config.recovery_mode == RecoveryMode::CutDamagedTail =>
        {
            let mut d = Damage::new(seg.path.clone(), end, detail);
            d.logs = dropped_after(seg, end);
            Ok(Some(SegmentEnd::Open {
                end,
                damage: Some(d),
                truncated: true,
            }))
        }
        Err(e) => Err(e),
    }
}

/// Records a damage cut that later segments follow: replay continues "after damage".
fn note_cut(after: &mut Option<AfterDamage>, first: &mut Option<Damage>, d: Damage) {
    match after {
        Some(a) => a.damage.merge(d),
        None => {
            let damage = match first.take() {
                Some(mut f) => {
                    f.merge(d);
                    f
                }
                None => d,
            };
            *after = Some(AfterDamage { damage });
        }
    }
}

/// Cuts every log with entries in segment `id` (missing) below the first of them;
/// returns each cut log's first index no longer held.
fn cut_missing_segment(index: &mut Index, id: u64) -> BTreeMap<crate::LogId, u64> {
    let mut cuts = BTreeMap::new();
    for (log, state) in &index.logs {
        let in_spans = state
            .spans
            .iter()
            .filter(|s| s.segment == id)
            .map(|s| s.first)
            .min();
        let in_overrides = state
            .overrides
            .iter()
            .filter(|(_, l)| l.segment == id)
            .map(|(i, _)| *i)
            .min();
        if let Some(from) = in_spans.into_iter().chain(in_overrides).min() {
            cuts.insert(*log, from.max(state.bounds.first));
        }
    }
    for (log, from) in &cuts {
        let op = OpSummary {
            kind: OpKind::TruncateAfter,
            log_id: *log,
            index: from.saturating_sub(1),
            count: 0,
            aux: 0,
            key: Default::default(),
            value: Default::default(),
            data_len: 0,
        };
        let fits = index
            .logs
            .get(log)
            .is_some_and(|l| l.bounds.after(&op).is_ok());
        if fits {
            index.apply(
                &op,
                Location {
                    segment: id,
                    offset: 0,
                    op: 0,
                },
            );
        }
    }
    cuts
}

/// Decides what the bytes at `bad` (no valid record there) are. Records found further on
/// that belong to a later write prove the bad record was synced: damage. Records from the
/// same write (their write began at or before `bad`) mean a torn, unacknowledged write.
/// Under [`RecoveryMode::CutDamagedTail`] damage is returned (to be cut) instead of
/// refused; `next` is where the record after the bad one starts, when its header held.
fn check_tail(
    config: &Config,
    seg: &Arc<Segment>,
    bad: u64,
    body_error: Option<Error>,
    next: Option<u64>,
) -> Result<Option<Damage>> {
    let (found_same_write, found_later_write) = scan_beyond(seg, bad)?;
    if let Some(write_offset) = found_later_write {
        let detail = format!(
            "bad record followed by a valid record of a later write (begun at {write_offset}): \
             synced data is damaged"
        );
        if config.recovery_mode == RecoveryMode::CutDamagedTail {
            let mut d = Damage::new(seg.path.clone(), bad, detail);
            d.logs = dropped_after(seg, next.unwrap_or(u64::from(write_offset)));
            return Ok(Some(d));
        }
        return Err(Error::corruption(&seg.path, bad, detail));
    }
    let torn = found_same_write || body_error.is_some();
    if torn {
        if config.recovery_mode == RecoveryMode::Strict {
            return Err(body_error.unwrap_or_else(|| {
                Error::corruption(&seg.path, bad, "torn write at the tail (strict recovery)")
            }));
        }
        tracing::warn!(file = %seg.path.display(), offset = bad, "cut a torn, unacknowledged tail");
    }
    Ok(None)
}

/// Looks for valid record headers after `bad`: whether any belongs to the write that was
/// torn, and the write offset of the first one that belongs to a later write.
fn scan_beyond(seg: &Arc<Segment>, bad: u64) -> Result<(bool, Option<u32>)> {
    let mut same = false;
    let mut at = bad + RECORD_ALIGN as u64;
    while at + RECORD_HEADER_BYTES as u64 <= seg.len {
        let chunk_len = ((seg.len - at) as usize).min(SCAN_CHUNK_BYTES + RECORD_HEADER_BYTES);
        let chunk = seg_bytes(seg, at, chunk_len)?;
        let mut k = 0usize;
        while k + RECORD_HEADER_BYTES <= chunk.len() && k < SCAN_CHUNK_BYTES {
            if chunk[k..k + 4] == crate::format::RECORD_MAGIC.to_le_bytes()
                && let Some(h) = RecordHeader::decode(seg.salt, &chunk[k..])
            {
                if h.write_offset as u64 > bad {
                    return Ok((same, Some(h.write_offset)));
                }
                same = true;
            }
            k += RECORD_ALIGN;
        }
        at += SCAN_CHUNK_BYTES as u64;
    }
    Ok((same, None))
}

fn seg_bytes(seg: &Arc<Segment>, at: u64, len: usize) -> Result<Vec<u8>> {
    match &seg.map {
        Some(m) => Ok(m[at as usize..at as usize + len].to_vec()),
        None => {
            let mut buf = vec![0u8; len];
            seg.file
                .read_exact_at(&mut buf, at)
                .map_err(|e| Error::io("scanning segment", &seg.path, e))?;
            Ok(buf)
        }
    }
}
