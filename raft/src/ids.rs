//! Where a group's state lives in the shared storage engine: engine log ids, the Raft
//! index ↔ engine index mapping, and metadata key names.
//!
//! What it owns: the layout of engine names, so that no other module does arithmetic on
//! them. What it must not do: touch the engine.
//!
//! Layout. Group `g` owns the engine logs `g << 2 | k`:
//!
//! | k | log                                                               |
//! |---|-------------------------------------------------------------------|
//! | 0 | the Raft log (entries, and meta `vote`, `committed`, `purged`)    |
//! | 1 | state-machine checkpoints (chunks, and meta `checkpoint`)         |
//! | 2 | snapshot staging: a received snapshot's stream (`snapshot_stream`) |
//! | 3 | index chunks of incremental checkpoints (`checkpoint_chunks`)      |
//!
//! Node logs (not replicated, one node's own) live at `1 << 63 | k`: k = 0 is the push
//! notification outbox.
//!
//! Raft index `i` is stored at engine index `i + 1`. Openraft starts logs at index 0 and
//! asks for `truncate_after(None)` (delete everything), while the engine's
//! `truncate_after(log, i)` keeps `i`; with the shift, engine index 0 is never used and
//! "delete everything" is `truncate_after(log, 0)` (raft/PLAN.md, P3).

use crate::types::GroupId;

/// Engine logs per group (the low bits of an engine log id).
const LOGS_PER_GROUP_SHIFT: u32 = 2;

/// Largest group id whose engine log ids fit in a `u64`.
pub const GROUP_ID_MAX: GroupId = u64::MAX >> LOGS_PER_GROUP_SHIFT;

/// Meta key of the Raft log: the persisted vote (`codec::encode_vote`).
pub const META_VOTE: &[u8] = b"vote";
/// Meta key of the Raft log: the last committed log id known (`codec::encode_log_id`).
/// Absent means none.
pub const META_COMMITTED: &[u8] = b"committed";
/// Meta key of the Raft log: the last purged log id (`codec::encode_log_id`). Absent
/// means nothing was ever purged.
pub const META_PURGED: &[u8] = b"purged";

/// Meta key of the checkpoint log: where the latest checkpoint's chunks are
/// (`state_machine::encode_pointer`). Absent means none was written.
pub const META_CHECKPOINT: &[u8] = b"checkpoint";

/// Node logs: engine logs of one node that belong to no group (nothing replicates them),
/// at `NODE_LOGS_BASE | k`. Group logs stay far below it: group ids are below
/// `chat::GROUPS_MAX` (2^16), so their logs are below 2^18.
const NODE_LOGS_BASE: u64 = 1 << 63;
/// Node log `k`: the push-notification outbox (`src/notify`).
pub const NODE_LOG_PUSH_OUTBOX: u64 = 0;

/// The engine log id of node log `k`.
pub fn node_log(k: u64) -> chatlog_storage::LogId {
    NODE_LOGS_BASE | k
}

/// The engine log holding group `group`'s state-machine checkpoints.
pub fn checkpoint_log(group: GroupId) -> Option<chatlog_storage::LogId> {
    raft_log(group).map(|l| l | 1)
}

/// The engine log staging a snapshot of group `group` while it is received and
/// installed (`crate::snapshot_stream`; entries are pieces of the snapshot's stream, meta
/// [`META_STAGED_INSTALL`] the install in progress).
pub fn staging_log(group: GroupId) -> Option<chatlog_storage::LogId> {
    raft_log(group).map(|l| l | 2)
}

/// The engine log holding group `group`'s index chunks: the immutable parts of its
/// incremental checkpoints (`crate::checkpoint_chunks`).
pub fn index_chunk_log(group: GroupId) -> Option<chatlog_storage::LogId> {
    raft_log(group).map(|l| l | 3)
}

/// Meta key of the staging log: a complete staged snapshot being installed
/// (`snapshot_stream::InstallIntent`). Present from before the install's first write
/// to after its last, so a restart finishes an install a crash interrupted.
pub const META_STAGED_INSTALL: &[u8] = b"install";

/// Meta key of the staging log (s9snap): where the pieces of a received checkpoint start
/// in the checkpoint and index chunk logs while an install writes and checks them, before
/// its intent; an open that finds it without an intent drops those pieces
/// (`snapshot_stream::finish_interrupted_install`).
pub const META_STAGED_COPY: &[u8] = b"install-copy";

/// The engine log holding group `group`'s Raft log, or `None` if the id is too large.
pub fn raft_log(group: GroupId) -> Option<chatlog_storage::LogId> {
    (group <= GROUP_ID_MAX).then_some(group << LOGS_PER_GROUP_SHIFT)
}

/// Every engine log group `group` may own (Raft log, checkpoints, snapshot staging,
/// index chunks): what its size on disk is made of. Empty if the id is too large.
pub fn group_logs(group: GroupId) -> Vec<chatlog_storage::LogId> {
    raft_log(group).map_or_else(Vec::new, |l| {
        (0..1 << LOGS_PER_GROUP_SHIFT).map(|k| l | k).collect()
    })
}

/// Engine index of Raft index `raft_index`.
pub fn engine_index(raft_index: u64) -> u64 {
    raft_index + 1
}

/// Raft index of engine index `engine_index` (which is never 0).
pub fn raft_index(engine_index: u64) -> u64 {
    debug_assert!(engine_index > 0, "engine index 0 holds no Raft entry");
    engine_index - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_logs_do_not_overlap() {
        assert_eq!(raft_log(0), Some(0));
        assert_eq!(raft_log(1), Some(4));
        assert_eq!(raft_log(GROUP_ID_MAX), Some(u64::MAX - 3));
        assert_eq!(raft_log(GROUP_ID_MAX + 1), None);
    }

    #[test]
    fn index_mapping_round_trips() {
        for i in [0, 1, 41, u64::MAX - 1] {
            assert_eq!(raft_index(engine_index(i)), i);
        }
        assert_eq!(engine_index(0), 1);
    }
}
