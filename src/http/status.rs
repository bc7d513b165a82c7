//! Snapshots of the node and its group replicas, taken from openraft's metrics: the one
//! source of `/ready`, `/metrics` and `/admin/status`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chatlog_raft::node::{Group, Node};
use chatlog_raft::{GroupId, NodeId};
use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use serde_json::{Value, json};

/// A peer node counts as down when no group this node leads heard from it for this long.
/// Why: heartbeats are at most 1 s apart (`chatlog_raft::node::timing`), so this is three
/// missed heartbeats at the slowest setting.
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(3);

/// Elections and leader changes one replica has seen since the process started.
#[derive(Debug, Default)]
pub struct ChangeCounters {
    /// Times the term went up (each is an election: pre-vote is on, so a term only rises
    /// when a candidate really asks for votes).
    pub elections: AtomicU64,
    /// Times the known leader became a different node (the first leader counts).
    pub leader_changes: AtomicU64,
}

/// [`ChangeCounters`] of every local group, kept by one watcher task per group.
#[derive(Debug, Default)]
pub struct LeaderChanges {
    groups: BTreeMap<GroupId, Arc<ChangeCounters>>,
}

impl LeaderChanges {
    /// Starts one task per local group that follows its metrics; each ends when its
    /// group stops.
    pub fn watch(node: &Node) -> LeaderChanges {
        let mut groups = BTreeMap::new();
        for g in node.groups() {
            let counters = Arc::new(ChangeCounters::default());
            groups.insert(g.id(), Arc::clone(&counters));
            let mut rx = g.raft().metrics();
            tokio::spawn(async move {
                let (mut term, mut leader) = {
                    let m = rx.borrow_watched();
                    (m.current_term, m.current_leader)
                };
                if leader.is_some() {
                    counters.leader_changes.fetch_add(1, Ordering::Relaxed);
                }
                while rx.changed().await.is_ok() {
                    let (t, l) = {
                        let m = rx.borrow_watched();
                        (m.current_term, m.current_leader)
                    };
                    if t > term {
                        counters.elections.fetch_add(1, Ordering::Relaxed);
                        term = t;
                    }
                    if l.is_some() && l != leader {
                        counters.leader_changes.fetch_add(1, Ordering::Relaxed);
                    }
                    if l.is_some() {
                        leader = l;
                    }
                }
            });
        }
        LeaderChanges { groups }
    }

    fn get(&self, g: GroupId) -> (u64, u64) {
        self.groups.get(&g).map_or((0, 0), |c| {
            (
                c.elections.load(Ordering::Relaxed),
                c.leader_changes.load(Ordering::Relaxed),
            )
        })
    }
}

/// One follower as the group's leader sees it.
#[derive(Debug, Clone)]
pub struct FollowerView {
    pub node: NodeId,
    /// Highest log index known to be on the follower (`None`: nothing yet).
    pub matched: Option<u64>,
    /// Entries the follower is behind the leader's last log index.
    pub lag: u64,
    /// Milliseconds since the follower last acknowledged a heartbeat or append.
    pub last_ack_ms: Option<u64>,
}

/// One local group replica.
#[derive(Debug, Clone)]
pub struct GroupView {
    pub id: GroupId,
    /// This replica's role: `leader`, `follower`, `candidate`, `learner`, `shutdown`.
    pub role: &'static str,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub committed: Option<u64>,
    pub applied: Option<u64>,
    /// Voters of the current membership.
    pub replicas: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Empty unless this replica leads.
    pub followers: Vec<FollowerView>,
    /// Why the group's Raft core stopped, if it did.
    pub fatal: Option<String>,
    pub elections: u64,
    pub leader_changes: u64,
    // ---- ops metrics (issue 7) ----
    /// Estimated bytes of this replica on this node's disk
    /// (`Group::disk_bytes_estimate`: the live share of the segment bytes of the group's
    /// Raft log and checkpoint logs).
    pub disk_bytes: u64,
    /// Propose-to-applied latency of entries proposed here as leader.
    pub commit_latency: chatlog_storage::HistogramSnapshot,
    /// Proposals waiting for this replica's batcher.
    pub proposal_queue_len: usize,
    // ---- end ops metrics ----
    /// Issue 9: why this replica's log is damaged while it repairs from the leader (it
    /// grants no votes, does not campaign, serves no reads); `None` when sound.
    pub damage: Option<chatlog_raft::repair::LogDamage>,
    /// s8retention: the group's replicated retention policy (`None`: never set, keep
    /// everything) and the first Raft index its indexes keep (0: nothing trimmed).
    pub retention: (Option<chatlog_raft::chat::retention::RetentionPolicy>, u64),
}

/// Entries up to and including `index`: `None` (empty) is 0.
fn count(index: Option<u64>) -> u64 {
    index.map_or(0, |i| i + 1)
}

impl GroupView {
    pub fn of(group: &Group, changes: &LeaderChanges) -> GroupView {
        // Clone out at once: holding the watch borrow can stall the Raft core.
        let m = group.raft().metrics().borrow_watched().clone();
        let last_log_index = m.last_log_index;
        let mut followers = Vec::new();
        if let Some(replication) = &m.replication {
            for (node, matched) in replication {
                if *node == m.id {
                    continue;
                }
                let matched = matched.as_ref().map(|l| l.index());
                let last_ack_ms = m
                    .heartbeat
                    .as_ref()
                    .and_then(|h| h.get(node).cloned().flatten())
                    .map(|at| at.elapsed().as_millis() as u64);
                followers.push(FollowerView {
                    node: *node,
                    matched,
                    lag: count(last_log_index).saturating_sub(count(matched)),
                    last_ack_ms,
                });
            }
        }
        let membership = m.membership_config.membership();
        let (elections, leader_changes) = changes.get(group.id());
        GroupView {
            id: group.id(),
            role: match m.state {
                openraft::ServerState::Leader => "leader",
                openraft::ServerState::Follower => "follower",
                openraft::ServerState::Candidate => "candidate",
                openraft::ServerState::Learner => "learner",
                openraft::ServerState::Shutdown => "shutdown",
            },
            leader: m.current_leader,
            term: m.current_term,
            last_log_index,
            committed: m.local_committed.as_ref().map(|l| l.index()),
            applied: m.last_applied.as_ref().map(|l| l.index()),
            replicas: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            followers,
            fatal: m.running_state.as_ref().err().map(|e| e.to_string()),
            elections,
            leader_changes,
            disk_bytes: group.disk_bytes_estimate(),
            commit_latency: group.commit_latency().snapshot(),
            proposal_queue_len: group.proposal_queue_len(),
            damage: group.repair_status().damage(),
            retention: {
                let st = group.shared().read();
                (st.retention_policy(), st.retained_from())
            },
        }
    }

    /// Whether the group can take writes through this node: it runs and has a leader.
    pub fn ready(&self) -> bool {
        self.fatal.is_none() && self.leader.is_some()
    }

    pub fn to_json(&self) -> Value {
        let followers: Vec<Value> = self
            .followers
            .iter()
            .map(|f| {
                json!({"node": f.node, "matched": f.matched, "lag": f.lag,
                       "last_ack_ms": f.last_ack_ms})
            })
            .collect();
        json!({
            "id": self.id,
            "role": self.role,
            "leader": self.leader,
            "term": self.term,
            "last_log_index": self.last_log_index,
            "committed": self.committed,
            "applied": self.applied,
            "replicas": self.replicas,
            "learners": self.learners,
            "followers": followers,
            "fatal": self.fatal,
            "elections": self.elections,
            "leader_changes": self.leader_changes,
            "disk_bytes": self.disk_bytes,
            // The upper bucket bound in seconds; null before the first entry led here.
            "commit_latency_p99_s": p99_json(&self.commit_latency),
            // s8retention: the replicated policy (null: never set, keep everything).
            "retention": {"policy": super::retention::policy_json(self.retention.0),
                          "retained_from": self.retention.1},
            // Issue 9: "sound", or "repairing" with what the log must hold again.
            "repair": match &self.damage {
                None => json!({"status": "sound"}),
                Some(d) => json!({"status": "repairing", "held_index": d.held_index,
                                  "required_index": d.required_index, "detail": d.detail}),
            },
        })
    }
}

/// The upper bucket bound (seconds) at or below which 99% of the observations fall, as
/// JSON: a number, `"+Inf"` past the last bound (JSON has no infinity), or null before
/// the first observation.
pub fn p99_json(h: &chatlog_storage::HistogramSnapshot) -> Value {
    match h.quantile_bound(0.99) {
        None => Value::Null,
        Some(b) if b.is_infinite() => json!("+Inf"),
        Some(b) => json!(b),
    }
}

/// Every local group, in id order.
pub fn groups(node: &Node, changes: &LeaderChanges) -> Vec<GroupView> {
    node.groups()
        .iter()
        .map(|g| GroupView::of(g, changes))
        .collect()
}

/// Whether peer `id` looks up, judged from the heartbeats of the groups this node leads:
/// `(up, last_ack_ms)`; `up` is `None` when no group led here replicates to it.
pub fn peer_liveness(groups: &[GroupView], id: NodeId) -> (Option<bool>, Option<u64>) {
    let mut seen = false;
    let mut best: Option<u64> = None;
    for f in groups
        .iter()
        .flat_map(|g| &g.followers)
        .filter(|f| f.node == id)
    {
        seen = true;
        if let Some(ms) = f.last_ack_ms {
            best = Some(best.map_or(ms, |b| b.min(ms)));
        }
    }
    if !seen {
        return (None, None);
    }
    let up = best.is_some_and(|ms| u128::from(ms) < NODE_DOWN_AFTER.as_millis());
    (Some(up), best)
}

/// The one-line summary of `admin status`.
pub fn summary(node_id: NodeId, groups: &[GroupView], nodes_down: &[NodeId]) -> String {
    let total = groups.len();
    let without: Vec<String> = groups
        .iter()
        .filter(|g| !g.ready())
        .map(|g| g.id.to_string())
        .collect();
    let led = groups.iter().filter(|g| g.role == "leader").count();
    let max_lag = groups
        .iter()
        .flat_map(|g| &g.followers)
        .map(|f| f.lag)
        .max()
        .unwrap_or(0);
    let mut s = if without.is_empty() {
        format!("node {node_id}: {total} groups, all with a leader; {led} led here")
    } else {
        format!(
            "node {node_id}: {total} groups, {} without a leader (groups {}); {led} led here",
            without.len(),
            without.join(", ")
        )
    };
    s.push_str(&format!("; max follower lag {max_lag}"));
    if !nodes_down.is_empty() {
        let ids: Vec<String> = nodes_down.iter().map(|n| n.to_string()).collect();
        s.push_str(&format!("; nodes down: {}", ids.join(", ")));
    }
    s
}
