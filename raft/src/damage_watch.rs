//! Damage found while running (issue 9, session 6): a replica whose Raft log fails a
//! read's checks is cut before the damage and restarted repairing, without a node restart.
//!
//! What it owns: watching every local replica's Raft log for a stop by corruption
//! (`Engine::log_failure`: the engine stops a log whose read fails its checks, so the
//! damaged bytes are never returned — not to replication, apply, a client read or a
//! snapshot), and then, for that group only: shutting its Raft instance down (a leader
//! stops leading there and then; the others elect a new one), cutting the log before its
//! first damaged entry with the "synced" marker raised to what the log held
//! ([`cut_damaged_raft_log`]), and starting the replica again (`Node::restart_damaged_group`),
//! which then finds itself damaged exactly as at open: repairing, no votes, no campaign,
//! no reads, until the leader has sent the range back (`crate::repair`).
//! What it must not do: touch a group whose engine failed as a whole (a failed write or
//! fdatasync: fail-stop, the node needs a restart), or cut anything but the stopped log.
//!
//! A stopped checkpoint log (`ids::checkpoint_log`: a checkpoint chunk that fails its
//! checks, read at a replica's start or for a snapshot) or index chunk log
//! (`ids::index_chunk_log`, the immutable parts of incremental checkpoints) is cut the
//! same way, with the checkpoint pointer deleted: the state is rebuilt from the Raft log
//! ([`cut_damaged_checkpoint_log`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use chatlog_storage::{Engine, WriteBatch};

use crate::error::Error;
use crate::ids::{self, raft_index};
use crate::node::Node;
use crate::types::GroupId;

/// How often the watcher looks at the local replicas' logs. Why: a stopped log stops its
/// group at its next read or write; a fifth of a second more is small next to the
/// election the restart causes when the replica led, and the check is one map lookup per
/// group.
pub const DAMAGE_WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Cuts a replica start may make in a row (`Node::start_group`): each one drops the log
/// from a damaged entry on, so a second means a second damaged record further down; more
/// than a few means something other than damage fails the start.
pub const START_CUTS_MAX: usize = 3;

/// Cuts group `group`'s Raft log, stopped by a read that failed its checks, before its
/// first damaged entry, raising the "synced" marker (`repair::META_SYNCED`) to the last
/// index the log held (durable, since the engine indexes only durable entries) in the
/// same batch: the log store opened on it next finds it damaged and repairing. Returns
/// the first Raft index dropped, or `None` if the log is not stopped (or nothing in it
/// fails its checks any more).
pub async fn cut_damaged_raft_log(engine: &Engine, group: GroupId) -> Result<Option<u64>, Error> {
    let Some(log) = ids::raft_log(group) else {
        return Ok(None);
    };
    if engine.log_failure(log).is_none() {
        return Ok(None);
    }
    let held = engine
        .bounds(log)
        .and_then(|b| b.last())
        .map(raft_index)
        .unwrap_or(0);
    let marker = engine
        .meta(log, crate::repair::META_SYNCED)
        .and_then(|b| crate::repair::decode_synced(&b))
        .unwrap_or(0);
    let mut batch = WriteBatch::new();
    if held > marker {
        batch.put_meta(
            log,
            crate::repair::META_SYNCED,
            &crate::repair::encode_synced(held),
        );
    }
    let cut = engine
        .cut_failed_log(log, batch)
        .await
        .map_err(|source| Error::Storage {
            group,
            verb: "cutting",
            subject: "the damaged range of the Raft log".into(),
            source,
        })?;
    Ok(cut.map(raft_index))
}

/// Cuts group `group`'s checkpoint logs — the checkpoint log (`ids::checkpoint_log`) and
/// the index chunk log of incremental checkpoints (`ids::index_chunk_log`,
/// `crate::checkpoint_chunks`) — whichever a read that failed its checks stopped (a
/// damaged checkpoint or index chunk), before the damage, deleting the checkpoint pointer
/// in the same batch: the state machine opened next starts empty and openraft re-applies
/// the Raft log (a group whose log was purged at its start cannot, and stops with
/// openraft's error naming the index); its next checkpoint writes its chunks again.
/// Returns whether it cut.
pub async fn cut_damaged_checkpoint_log(engine: &Engine, group: GroupId) -> Result<bool, Error> {
    let Some(pointer_log) = ids::checkpoint_log(group) else {
        return Ok(false);
    };
    let mut cut_any = false;
    for log in [Some(pointer_log), ids::index_chunk_log(group)]
        .into_iter()
        .flatten()
    {
        if engine.log_failure(log).is_none() {
            continue;
        }
        let mut batch = WriteBatch::new();
        if engine.meta(pointer_log, ids::META_CHECKPOINT).is_some() {
            batch.delete_meta(pointer_log, ids::META_CHECKPOINT);
        }
        let cut = engine
            .cut_failed_log(log, batch)
            .await
            .map_err(|source| Error::Storage {
                group,
                verb: "cutting",
                subject: "the damaged range of a checkpoint log".into(),
                source,
            })?;
        cut_any |= cut.is_some();
    }
    Ok(cut_any)
}

/// Cuts whichever of group `group`'s logs a failed read stopped (`cut_damaged_raft_log`,
/// `cut_damaged_checkpoint_log`); `true` if it cut anything.
pub async fn cut_damaged_group_logs(engine: &Engine, group: GroupId) -> Result<bool, Error> {
    let raft = cut_damaged_raft_log(engine, group).await?.is_some();
    let checkpoint = cut_damaged_checkpoint_log(engine, group).await?;
    Ok(raft || checkpoint)
}

/// Whether a failed read stopped one of group `group`'s logs (Raft log, checkpoints or
/// index chunks).
pub fn group_log_stopped(engine: &Engine, group: GroupId) -> bool {
    [
        ids::raft_log(group),
        ids::checkpoint_log(group),
        ids::index_chunk_log(group),
    ]
    .into_iter()
    .flatten()
    .any(|log| engine.log_failure(log).is_some())
}

/// Starts the watcher for `node`'s local replicas; it ends with the node. Issue 9
/// (session 7): it also starts the probe task of vote-unknown replicas
/// (`crate::vote_probe::spawn`), which ends with the node too.
pub fn spawn(node: &Arc<Node>) -> tokio::task::JoinHandle<()> {
    drop(crate::vote_probe::spawn(node));
    tokio::spawn(run(Arc::downgrade(node)))
}

async fn run(node: Weak<Node>) {
    loop {
        tokio::time::sleep(DAMAGE_WATCH_INTERVAL).await;
        let Some(n) = node.upgrade() else { return };
        if n.engine().config().recovery_mode != chatlog_storage::RecoveryMode::CutDamagedTail {
            // No peers to repair from (one replica per group): a damaged log stays stopped.
            return;
        }
        if n.engine().stopped().is_some() {
            // Fail-stop of the whole engine: nothing to repair in place.
            continue;
        }
        let stopped: Vec<GroupId> = n
            .groups()
            .iter()
            .map(|g| g.id())
            .filter(|g| group_log_stopped(n.engine(), *g))
            .collect();
        for g in stopped {
            match n.restart_damaged_group(g).await {
                Ok(cut) => tracing::warn!(
                    group = g,
                    first_dropped = ?cut,
                    status = "repairing",
                    "replica restarted after a read found damage in its Raft log"
                ),
                Err(e) => tracing::error!(
                    group = g,
                    error = %e,
                    "replica with a damaged Raft log could not be restarted; it stays stopped"
                ),
            }
        }
    }
}
