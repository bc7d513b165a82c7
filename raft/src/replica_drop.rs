//! Deleting the logs of a replica that moved away from this node, so that the group can
//! move back later and start like a new replica.
//!
//! What it owns: the one batch that empties every engine log of a dropped group
//! (`ids::group_logs`: Raft log, checkpoints, snapshot staging, index chunks), deletes
//! their metadata (vote, committed, purged, checkpoint pointer, "synced" marker, install
//! intent) and restarts each emptied log at engine index 1 (the engine's "reset log
//! start", storage/FORMAT.md). What it must not do: stop the replica (the caller,
//! `Node::drop_group`, has shut it down first) or touch another group's logs.
//!
//! Why the restart at 1: emptying a log with `truncate_after(first - 1)` leaves it
//! continuing at its old first index, the purge point retention had reached. A replica
//! that moves back gets the group again from a leader that may send entries from index
//! 0 (nothing purged there) or a snapshot older than that purge point (each replica
//! purges by its own checkpoint): either would not continue a log starting at the old
//! purge point, and the replica could never append.

use chatlog_storage::{Engine, WriteBatch};

use crate::error::Error;
use crate::ids;
use crate::types::GroupId;

/// Metadata keys a group's logs may hold, all deleted with the replica.
const GROUP_META_KEYS: [&[u8]; 6] = [
    ids::META_VOTE,
    ids::META_COMMITTED,
    ids::META_PURGED,
    ids::META_CHECKPOINT,
    // Issue 9: a replica moved back here starts with an empty log, not a damaged one.
    crate::repair::META_SYNCED,
    ids::META_STAGED_INSTALL,
];

/// Empties every log of group `g` in one batch and restarts each at engine index 1.
pub async fn clear_replica_logs(engine: &Engine, g: GroupId) -> Result<(), Error> {
    let mut batch = WriteBatch::new();
    for log in ids::group_logs(g) {
        if let Some(b) = engine.bounds(log) {
            if !b.is_empty() {
                batch.truncate_after(log, b.first.saturating_sub(1));
            }
            if b.first > 1 {
                batch.reset_log_start(log, 1);
            }
        }
        for key in GROUP_META_KEYS {
            if engine.meta(log, key).is_some() {
                batch.delete_meta(log, key);
            }
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    engine.write(&batch).await.map_err(|source| Error::Storage {
        group: g,
        verb: "deleting",
        subject: "the logs of a replica that moved away".into(),
        source,
    })
}
