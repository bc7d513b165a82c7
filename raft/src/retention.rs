//! The physical side of log retention on one replica: purging the group's Raft log
//! below the horizon the applied state allows.
//!
//! What it owns: the retention task of each local group, and the seeding of a group's
//! replicated policy from this node's `--retain-*` flags (`SmConfig::retention`): while
//! the group has no policy and this replica leads, it proposes the flags' policy with
//! `only_if_unset` (`chat::retention::RetentionCommand`), so a node's flags never
//! override a policy set since. What it must not do: read the flags for anything else
//! (the horizon follows the replicated policy), or purge what this replica may still
//! need, which is more than the state's horizon says:
//!
//! - the state's horizon (`GroupState::retained_from`, moved deterministically by apply,
//!   `chat::retention`): the indexes point at nothing below it;
//! - the durable checkpoint: a restart replays `(checkpoint, committed]` from the log,
//!   so nothing above the checkpoint's applied index is purged (P6);
//! - pending secret messages (lost unread otherwise) and erasures this replica's eraser
//!   has not zeroed yet (a purged segment may be recycled with the plaintext in it).
//!
//! Seeding starts as soon as the replica leads (not a tick later), so a fresh group
//! gets its policy with its first leader.
//!
//! How. Every [`RETENTION_TICK`] it computes the horizon `h` (first index kept). Openraft
//! purges only what a snapshot covers, so when `h - 1` is above openraft's snapshot it
//! asks for one (`trigger().snapshot()`; our snapshot is the durable checkpoint, so it
//! also moves the checkpoint), then sets the log store's retain mark to `h` and asks
//! openraft to purge up to `h - 1` (`trigger().purge_log`): openraft keeps its
//! `last_purged_log_id` and sends a snapshot to a follower that needs what is gone.
//! Entries below openraft's purge mark that the log store kept as history (after a
//! snapshot install, `log_store` module docs) are deleted directly. The chat-list outbox
//! and the feed live in the state, not in the log: nothing to hold back for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::ChatRaft;
use crate::chat::Command;
use crate::chat::retention::{RetentionCommand, RetentionPolicy};
use crate::log_store::LogReader;
use crate::proposer::ProposalQueue;
use crate::state_machine::GroupShared;
use crate::types::GroupId;

/// Pause between two looks at a group's horizon. Why: a purge is a cheap metadata write
/// but a snapshot rewrites the checkpoint; once a second is often enough for disk use to
/// follow writes closely and rare enough to cost nothing when idle.
pub const RETENTION_TICK: Duration = Duration::from_secs(1);

/// Longest the task waits for a snapshot it asked for before trying again next tick.
pub const SNAPSHOT_WAIT_MAX: Duration = Duration::from_secs(10);

/// The first Raft index this replica must keep, from the state and local facts; `None`
/// while nothing may be purged.
pub fn horizon(shared: &GroupShared, secret_erased: u64) -> Option<u64> {
    let st = shared.read();
    let mut h = st.retained_from();
    if h <= 1 {
        return None;
    }
    if let Some(p) = st.secret().earliest_pending_raft_index() {
        h = h.min(p);
    }
    let (unsettled, _) = st.secret().erasures_after(secret_erased);
    if let Some(e) = unsettled.iter().map(|e| e.raft_index).min() {
        h = h.min(e);
    }
    (h > 1).then_some(h)
}

/// Where seeding stands after one [`seed`] attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seeding {
    /// The group has a policy: seeding is over.
    Done,
    /// This replica does not lead: try again as soon as it does.
    NotLeading,
    /// Proposed (or the proposal failed): look again after a tick.
    Proposed,
}

/// Proposes the seed `policy` for `group` when it has no replicated policy and this
/// replica leads.
async fn seed(
    group: GroupId,
    policy: RetentionPolicy,
    raft: &ChatRaft,
    shared: &GroupShared,
    proposals: &ProposalQueue,
) -> Seeding {
    if let Some(current) = shared.read().retention_policy() {
        if current != policy {
            tracing::info!(
                group,
                replicated = %current.describe(),
                flags = %policy.describe(),
                "retention: the group's replicated policy differs from this node's --retain-* \
                 flags, which only seed a group without one; the replicated policy applies \
                 (change it with `chatlog admin retention set`)"
            );
        }
        return Seeding::Done;
    }
    let metrics = openraft::async_runtime::WatchReceiver::borrow_watched(&raft.metrics()).clone();
    if metrics.current_leader != Some(metrics.id) {
        return Seeding::NotLeading;
    }
    let cmd = Command::Retention(RetentionCommand {
        policy,
        only_if_unset: true,
    });
    match proposals.propose(&cmd).await {
        Ok((outcome, index)) => {
            tracing::info!(group, policy = %policy.describe(), index, ?outcome, "retention: seeded the group's policy from --retain-* flags");
            Seeding::Proposed // the next tick sees the applied policy
        }
        Err(e) => {
            tracing::debug!(group, error = %e, "retention: seeding the policy failed; next tick");
            Seeding::Proposed
        }
    }
}

/// Runs group `group`'s retention until the group stops (see the module docs); `seed_policy`
/// is this node's `--retain-*` flags.
pub async fn run(
    group: GroupId,
    seed_policy: RetentionPolicy,
    raft: ChatRaft,
    shared: Arc<GroupShared>,
    log: LogReader,
    secret_erased: Arc<AtomicU64>,
    proposals: Arc<ProposalQueue>,
) {
    let mut seeded = !seed_policy.is_some();
    // Until seeded, a replica that does not lead tries again the moment it leads (a
    // fresh group's policy is then in place as soon as it has a leader, not a tick
    // later), at the latest after a tick; an attempt while leading waits a tick (the
    // proposal is applied meanwhile, or failed and is not retried in a loop).
    let mut waiting_to_lead = !seeded;
    let mut applied = shared.applied();
    loop {
        if waiting_to_lead {
            let led = raft
                .wait(Some(RETENTION_TICK))
                .metrics(
                    |m| m.current_leader == Some(m.id),
                    "retention: this replica leads",
                )
                .await;
            if let Err(openraft::metrics::WaitError::ShuttingDown) = led {
                return; // the group stopped
            }
        } else {
            tokio::time::sleep(RETENTION_TICK).await;
        }
        waiting_to_lead = false;
        if !seeded {
            match seed(group, seed_policy, &raft, &shared, &proposals).await {
                Seeding::Done => seeded = true,
                Seeding::NotLeading => waiting_to_lead = true,
                Seeding::Proposed => {}
            }
        }
        // Seen before the state is read: an entry applied after this wakes the wait below.
        applied.borrow_and_update();
        let Some(policy) = shared.read().retention_policy().filter(|p| p.is_some()) else {
            // Only an applied entry can set a policy: an idle group without one sleeps
            // until something is applied (no wake-up per second per group; the task is
            // aborted when the group stops).
            if seeded && applied.changed().await.is_err() {
                return;
            }
            continue;
        };
        // A snapshot (a full checkpoint) only when it lets the purge move this much.
        let slack = policy
            .retain_entries
            .map_or(8 * crate::chat::retention::MARK_EVERY_ENTRIES, |keep| {
                (keep / 8).max(1)
            });
        let Some(wanted) = horizon(&shared, secret_erased.load(Ordering::Acquire)) else {
            continue;
        };
        let snapshot_at = || {
            openraft::async_runtime::WatchReceiver::borrow_watched(&raft.metrics())
                .snapshot
                .map_or(0, |s| s.index)
        };
        if wanted > snapshot_at() + slack || shared.checkpointed() + 1 < wanted {
            if raft.trigger().snapshot().await.is_err() {
                return; // the group stopped
            }
            let deadline = tokio::time::Instant::now() + SNAPSHOT_WAIT_MAX;
            while snapshot_at() + 1 < wanted && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Never above the durable checkpoint nor openraft's snapshot (it would refuse).
        let h = wanted.min(shared.checkpointed() + 1).min(snapshot_at() + 1);
        if h <= 1 {
            continue;
        }
        log.set_retain_from(h);
        let (_, purged, _) = log.retained_bounds();
        if purged.map_or(0, |p| p.index + 1) < h {
            tracing::debug!(group, upto = h - 1, "retention purge");
            if raft.trigger().purge_log(h - 1).await.is_err() {
                return;
            }
        }
        if let Err(e) = log.purge_history_below(h).await {
            tracing::warn!(group, error = %e, "retention: purging history failed");
            return;
        }
    }
}
