//! Leadership hand-off on an orderly stop (`chatlog serve` after SIGTERM or SIGINT).
//!
//! What it owns: before the node stops its groups, asking each group this node leads to
//! move its leadership to the most caught-up other voter (openraft's
//! `trigger().transfer_leader`), then waiting a bounded time for the new leaders. Clients
//! then see a leader change (one round trip) instead of an election timeout after the
//! leader vanished, which is what a rolling restart costs per step. What it must not do:
//! delay a stop by more than [`HANDOFF_WAIT`], or fail one: a group whose hand-off does
//! not finish elects a leader the usual way.

use std::time::Duration;

use chatlog_raft::node::Node;
use openraft::async_runtime::WatchReceiver;

/// Longest an orderly stop waits for the groups this node led to have new leaders. Why:
/// a transfer takes one round trip once the target caught up; a few seconds covers a
/// loaded host, and a stop must not hang on a target that is down.
pub const HANDOFF_WAIT: Duration = Duration::from_secs(3);

/// Moves the leadership of every group this node leads to another voter; returns how many
/// groups it handed off within [`HANDOFF_WAIT`] and how many it asked.
pub async fn hand_off_leadership(node: &Node) -> (usize, usize) {
    let me = node.node_id();
    let mut asked = Vec::new();
    for group in node.groups() {
        let m = group.raft().metrics().borrow_watched().clone();
        if m.current_leader != Some(me) {
            continue;
        }
        // The other voter whose log matches the most: it can take over at once.
        let target = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != me)
            .max_by_key(|v| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(v).cloned().flatten())
                    .map_or(0, |l| l.index + 1)
            });
        let Some(to) = target else { continue };
        if group.raft().trigger().transfer_leader(to).await.is_ok() {
            tracing::info!(group = group.id(), to, "stopping: leadership handed off");
            asked.push(group);
        }
    }
    let deadline = tokio::time::Instant::now() + HANDOFF_WAIT;
    let mut moved = 0;
    for group in &asked {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let waited = group
            .raft()
            .wait(Some(left))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != me),
                "a new leader",
            )
            .await;
        if waited.is_ok() {
            moved += 1;
        }
    }
    (moved, asked.len())
}
