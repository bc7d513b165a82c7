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
            "damaged record in {} at offset {}: {}; it and {} log(s)' later records were dropped",
            self.path.display(),
            self.offset,
            self.detail,
            self.logs.len()
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
                OpKind::PutMeta => {
                    log.meta.insert(op.key, Some(op.value));
                }
                OpKind::DeleteMeta => {
                    log.meta.insert(op.key, None);
                }
                _ => {}
            }
        }
        offset += header.record_bytes() as u64;
    }
    logs
}
