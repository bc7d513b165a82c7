//! The I/O side of the chat-list outbox (`chat::chat_lists` holds the rules): on the
//! leader of each local group, delivers the outbox's records to the users' groups and
//! then acknowledges them.
//!
//! What it owns: one drain task per local group replica (following the replicas this
//! node starts and drops). A drain waits until its group has undelivered records and
//! this node leads the group; then, in rounds, it reads the oldest records, proposes one
//! `ChatListDelivery` per destination group (all destinations at once, each command's
//! records in number order), and once every destination answered, proposes
//! `ChatListAcked` up to the last record of the round. A failed round (a destination
//! without a leader, a lost answer) is retried after [`DRAIN_RETRY_PAUSE`]: deliveries
//! are idempotent, so a retry, or a second drain on a deposed leader running at the same
//! time, changes nothing twice.
//!
//! What it must not do: decide anything. Which records exist and which are applied is
//! the replicated state's business; a crash anywhere here loses nothing, because the
//! records stay in the outbox until an acknowledgement is applied.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::chat::chat_lists::{ChatListRecord, plan_round};
use crate::chat::{Command, Outcome, group_of};
use crate::controller::leads;
use crate::node::{Group, Node};
use crate::types::GroupId;

/// Records read from the outbox per round. Why: a round proposes at most this many
/// records' worth of commands (in `DELIVERY_RECORDS_MAX` chunks per destination), so a
/// burst (a group created with thousands of members) drains in bounded steps.
pub const DRAIN_ROUND_RECORDS_MAX: usize = 4096;

/// Pause after a first failed round before the next try, doubled after each further
/// failure up to [`DRAIN_RETRY_PAUSE_MAX`]. Why: a destination without a leader needs an
/// election (around a second); retrying at once would only add load.
pub const DRAIN_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Longest pause between two tries. Why: a destination node that comes back after a
/// long outage gets its users' lists within this long.
pub const DRAIN_RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);

/// How often a drain that keeps failing logs it. Why: one line per try would flood the
/// log while a node is down for hours.
pub const DRAIN_FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// How often an idle drain looks again at leadership when nothing is applied. Why: a
/// node that becomes leader of a quiet group must still drain what its predecessor left.
pub const DRAIN_IDLE_RECHECK: Duration = Duration::from_millis(500);

/// Starts the drains of this node's local groups (and of replicas started later).
pub fn spawn(node: &Arc<Node>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(node);
    let changes = node.local_changes();
    tokio::spawn(follow_groups(weak, changes))
}

async fn follow_groups(node: Weak<Node>, mut changes: tokio::sync::watch::Receiver<u64>) {
    let mut drains: BTreeMap<GroupId, tokio::task::AbortHandle> = BTreeMap::new();
    loop {
        {
            let Some(n) = node.upgrade() else { break };
            let groups = n.groups();
            drains.retain(|g, task| {
                let keep = groups.iter().any(|l| l.id() == *g);
                if !keep {
                    task.abort();
                }
                keep
            });
            for group in groups {
                drains.entry(group.id()).or_insert_with(|| {
                    tokio::spawn(drain_group(Weak::clone(&node), group)).abort_handle()
                });
            }
        }
        if changes.changed().await.is_err() {
            break;
        }
    }
    for task in drains.values() {
        task.abort();
    }
}

async fn drain_group(node: Weak<Node>, group: Group) {
    let mut applied = group.shared().applied();
    let mut pause = DRAIN_RETRY_PAUSE;
    let mut failures: u64 = 0;
    let mut last_log: Option<tokio::time::Instant> = None;
    loop {
        let pending = group.shared().read().chat_lists().pending();
        let leading = match node.upgrade() {
            Some(n) => leads(&group, n.node_id()),
            None => return,
        };
        if pending == 0 || !leading {
            match tokio::time::timeout(DRAIN_IDLE_RECHECK, applied.changed()).await {
                Ok(Err(_)) => return, // the replica stopped
                _ => continue,
            }
        }
        let Some(n) = node.upgrade() else { return };
        match deliver_round(&n, &group).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(
                        group = group.id(),
                        failures,
                        "chat-list delivery works again"
                    );
                }
                pause = DRAIN_RETRY_PAUSE;
                failures = 0;
                last_log = None;
            }
            Err(e) => {
                failures += 1;
                if last_log.is_none_or(|t| t.elapsed() >= DRAIN_FAILURE_LOG_EVERY) {
                    tracing::warn!(
                        group = group.id(),
                        pending,
                        failures,
                        error = %e,
                        "chat-list delivery failed; retrying"
                    );
                    last_log = Some(tokio::time::Instant::now());
                }
                drop(n);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(DRAIN_RETRY_PAUSE_MAX);
            }
        }
    }
}

/// One round: deliver the oldest records to every destination, then acknowledge them.
async fn deliver_round(node: &Node, group: &Group) -> Result<(), String> {
    let records = group
        .shared()
        .read()
        .chat_lists()
        .oldest(DRAIN_ROUND_RECORDS_MAX);
    let plan = plan_round(&records, group_of);
    let Some(upto) = plan.values().flatten().map(|r| r.no).max() else {
        return Ok(());
    };
    let source = group.id();
    let deliveries = plan.into_iter().map(|(dest, records)| async move {
        deliver(node, source, dest, records)
            .await
            .map_err(|e| format!("to group {dest}: {e}"))
    });
    for result in futures_util::future::join_all(deliveries).await {
        result?;
    }
    match node
        .propose(source, Command::ChatListAcked { upto })
        .await
        .map_err(|e| format!("acknowledging up to {upto}: {e}"))?
    {
        Outcome::Refused(r) => Err(format!("acknowledging up to {upto}: {}", r.message)),
        _ => Ok(()),
    }
}

async fn deliver(
    node: &Node,
    source: GroupId,
    dest: GroupId,
    records: Vec<ChatListRecord>,
) -> Result<(), String> {
    match node
        .propose(dest, Command::ChatListDelivery { source, records })
        .await
        .map_err(|e| e.to_string())?
    {
        Outcome::Refused(r) => Err(r.message),
        _ => Ok(()),
    }
}
