//! The controller loop every node runs: follows the placement in group 0 and carries out
//! cluster changes.
//!
//! What it owns: on every node, starting and stopping local replicas to match the
//! placement group 0 applied here (a replica that moved away is dropped and its logs
//! deleted) and initializing new groups this node is first replica of; on the leader of
//! group 0, proposing the bootstrap placement (from the static flags, once), keeping
//! every member a voter or learner of group 0, and draining nodes marked for removal one
//! move at a time; on the leader of a group with a move in progress, the move's steps
//! (add the learner and wait until it lags by at most `LEARNER_LAG_MAX` entries, change
//! the voters, record each step in group 0). Every step is idempotent and re-derived from the replicated placement, so a
//! move interrupted by a crash of any node resumes on whichever node leads the group next.
//! What it must not do: decide placement rules (`chat::placement` does, deterministically)
//! or hold state of its own beyond which groups it is working on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver;

use crate::chat::placement::{Move, MoveStep, Placement, PlacementCommand};
use crate::chat::{Command, Outcome};
use crate::node::{Group, Node};
use crate::types::{GroupId, NodeId};

/// How often the loop looks at the placement when nothing wakes it earlier. Why: a
/// leader change (which decides who drives a move) does not change group 0's state.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
/// Longest a learner may take to catch up before the step is tried again. Why: a group
/// holding a lot of history takes time to copy; the step restarts where it left off.
pub const LEARNER_CATCH_UP_WAIT: Duration = Duration::from_secs(120);
/// Entries a learner may still lag when it counts as caught up and is promoted. Why:
/// under write load the log grows while the learner copies it; a few entries are one
/// heartbeat's worth, so promotion does not leave the group with a replica far behind.
pub const LEARNER_LAG_MAX: u64 = 64;
/// How often the catch-up of a learner is looked at.
const CATCH_UP_POLL: Duration = Duration::from_millis(50);
/// Longest one membership change may take before it is tried again.
pub const MEMBERSHIP_CHANGE_WAIT: Duration = Duration::from_secs(20);
/// How long a peer has to answer before a drain treats it as down.
pub const PEER_PROBE_WAIT: Duration = Duration::from_millis(500);

/// How long a leader waits before asking for a requested leader transfer again.
pub const TRANSFER_RETRY: Duration = Duration::from_secs(2);
/// Marks leader-transfer entries in the set of groups being worked on (group ids stay
/// far below it).
const TRANSFER_KEY: GroupId = 1 << 63;

/// Starts the loop for `node`; it ends when the node is dropped.
pub fn spawn(node: &Arc<Node>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(node);
    tokio::spawn(run(weak))
}

async fn run(node: Weak<Node>) {
    let busy: Arc<Mutex<BTreeSet<GroupId>>> = Arc::default();
    let mut last_version = None;
    loop {
        let Some(n) = node.upgrade() else { return };
        let mut applied = n.group(0).map(|g| g.shared().applied());
        tick(&n, &busy, &mut last_version).await;
        drop(n);
        match &mut applied {
            Some(a) => {
                let _ = tokio::time::timeout(RECONCILE_INTERVAL, a.changed()).await;
            }
            None => tokio::time::sleep(RECONCILE_INTERVAL).await,
        }
    }
}

pub(crate) fn leads(group: &Group, me: NodeId) -> bool {
    let m = group.raft().metrics();
    let m = m.borrow_watched();
    m.state == openraft::ServerState::Leader && m.current_leader == Some(me)
}

async fn propose(node: &Node, cmd: PlacementCommand) -> Result<Outcome, String> {
    match node.propose(0, Command::Placement(cmd)).await {
        Ok(Outcome::Refused(r)) => Err(r.message),
        Ok(o) => Ok(o),
        Err(e) => Err(e.to_string()),
    }
}

async fn tick(node: &Arc<Node>, busy: &Arc<Mutex<BTreeSet<GroupId>>>, last: &mut Option<u64>) {
    let me = node.node_id();
    let Some(g0) = node.group(0) else { return };
    let placement = g0.shared().read().placement().clone();
    if placement.is_bootstrapped() {
        if *last != Some(placement.version) {
            node.set_placement(placement.clone());
            *last = Some(placement.version);
        }
        reconcile_local(node, &placement).await;
    }
    if leads(&g0, me) {
        if !placement.is_bootstrapped() {
            let p = node.bootstrap_placement();
            let cmd = PlacementCommand::Bootstrap {
                replication: p.replication,
                user_groups: p.user_groups,
                members: p
                    .members
                    .iter()
                    .map(|(n, m)| (*n, m.addr.clone()))
                    .collect(),
                groups: p
                    .groups
                    .iter()
                    .map(|(g, gp)| (*g, gp.replicas.clone()))
                    .collect(),
            };
            if let Err(e) = propose(node, cmd).await {
                tracing::warn!(error = %e, "could not bootstrap the placement yet");
            }
            return;
        }
        follow_members(&g0, &placement).await;
        drain(node, &placement).await;
    }
    for (g, to) in &placement.leader_transfers {
        let Some(group) = node.group(*g) else {
            continue;
        };
        if !leads(&group, me) {
            continue;
        }
        if *to == me {
            if let Err(e) = propose(node, PlacementCommand::LeaderDone { group: *g, to: me }).await
            {
                tracing::warn!(group = g, error = %e, "recording a leader transfer");
            }
            continue;
        }
        // One trigger per group per TRANSFER_RETRY: an election takes a moment.
        let key = *g | TRANSFER_KEY;
        if !busy.lock().unwrap_or_else(|p| p.into_inner()).insert(key) {
            continue;
        }
        let (busy, to, g) = (Arc::clone(busy), *to, *g);
        tokio::spawn(async move {
            tracing::info!(group = g, to, "rebalance: handing leadership over");
            if let Err(e) = group.raft().trigger().transfer_leader(to).await {
                tracing::warn!(group = g, to, error = %e, "leader transfer");
            }
            tokio::time::sleep(TRANSFER_RETRY).await;
            busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        });
    }
    for (g, m) in &placement.moves {
        let Some(group) = node.group(*g) else {
            continue;
        };
        if !leads(&group, me) {
            continue;
        }
        if !busy.lock().unwrap_or_else(|p| p.into_inner()).insert(*g) {
            continue;
        }
        let (node, busy, placement, m, g) = (
            Arc::clone(node),
            Arc::clone(busy),
            placement.clone(),
            *m,
            *g,
        );
        tokio::spawn(async move {
            if let Err(e) = drive_move(&node, &group, &placement, m).await {
                tracing::warn!(group = g, from = m.from, to = m.to, error = %e,
                    "replica move step failed; it is tried again");
            }
            busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&g);
        });
    }
}

/// Starts the replicas the placement gives this node and drops the others (group 0
/// always stays: every node follows it).
async fn reconcile_local(node: &Node, placement: &Placement) {
    let me = node.node_id();
    let want: BTreeSet<GroupId> = placement
        .groups
        .keys()
        .copied()
        .filter(|g| *g == 0 || placement.hosts(me, *g))
        .collect();
    let have: BTreeSet<GroupId> = node.groups().iter().map(Group::id).collect();
    for g in want.difference(&have) {
        match node.start_group(*g).await {
            Ok(()) => {
                tracing::info!(
                    group = g,
                    "replica started: the placement gives it to this node"
                );
                if let Err(e) = node.initialize(*g, placement).await {
                    tracing::warn!(group = g, error = %e, "could not initialize the new group");
                }
            }
            Err(e) => tracing::warn!(group = g, error = %e, "could not start a replica"),
        }
    }
    for g in have.difference(&want) {
        if let Err(e) = node.drop_group(*g).await {
            tracing::warn!(group = g, error = %e, "could not drop a replica that moved away");
        }
    }
    // A group added while this node was its first replica and down initializes now.
    for g in want.intersection(&have) {
        if placement.groups.get(g).is_some_and(|p| p.epoch == 0)
            && placement.replicas(*g).first() == Some(&me)
            && node.group(*g).is_some_and(|gr| {
                gr.raft()
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .next()
                    .is_none()
            })
            && let Err(e) = node.initialize(*g, placement).await
        {
            tracing::warn!(group = g, error = %e, "could not initialize a group");
        }
    }
}

/// Group 0's leader: every member follows group 0 (as a voter by placement, else as a
/// learner); removed members leave its membership.
async fn follow_members(g0: &Group, placement: &Placement) {
    let membership = g0
        .raft()
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let membership = membership.membership();
    if membership.get_joint_config().len() > 1 {
        return; // a change is in progress
    }
    let known: BTreeSet<NodeId> = membership.nodes().map(|(n, _)| *n).collect();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    for n in placement.members.keys() {
        if !known.contains(n) {
            match tokio::time::timeout(
                MEMBERSHIP_CHANGE_WAIT,
                g0.raft().add_learner(*n, openraft::EmptyNode {}, false),
            )
            .await
            {
                Ok(Ok(_)) => tracing::info!(node = n, "node follows group 0 as a learner"),
                Ok(Err(e)) => tracing::warn!(node = n, error = %e, "adding a learner to group 0"),
                Err(_) => tracing::warn!(node = n, "adding a learner to group 0 timed out"),
            }
        }
    }
    let gone: BTreeSet<NodeId> = known
        .iter()
        .filter(|n| !placement.members.contains_key(n) && !voters.contains(n))
        .copied()
        .collect();
    if !gone.is_empty() {
        match tokio::time::timeout(
            MEMBERSHIP_CHANGE_WAIT,
            g0.raft()
                .change_membership(ChangeMembers::RemoveNodes(gone.clone()), false),
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!(nodes = ?gone, "removed nodes left group 0"),
            Ok(Err(e)) => tracing::warn!(error = %e, "removing learners from group 0"),
            Err(_) => tracing::warn!("removing learners from group 0 timed out"),
        }
    }
}

/// The member to move a replica of `g` to: not draining, not already a replica, up, with
/// the fewest replicas (ties: lowest id).
pub async fn move_target(
    node: &Node,
    placement: &Placement,
    g: GroupId,
    exclude: NodeId,
) -> Option<NodeId> {
    let load = placement.load();
    let mut candidates: Vec<(usize, NodeId)> = placement
        .members
        .iter()
        .filter(|(n, m)| !m.draining && **n != exclude && !placement.replicas(g).contains(n))
        .map(|(n, _)| (load.get(n).copied().unwrap_or(0), *n))
        .collect();
    candidates.sort();
    for (_, n) in candidates {
        if node.peer_answers(n, PEER_PROBE_WAIT).await {
            return Some(n);
        }
    }
    None
}

/// Group 0's leader: one move at a time off each draining node; a drained node leaves.
async fn drain(node: &Node, placement: &Placement) {
    for (d, m) in &placement.members {
        if !m.draining {
            continue;
        }
        if placement
            .moves
            .values()
            .any(|mv| mv.from == *d || mv.to == *d)
        {
            continue; // one at a time
        }
        let holding: Vec<GroupId> = placement
            .groups
            .iter()
            .filter(|(_, p)| p.replicas.contains(d))
            .map(|(g, _)| *g)
            .collect();
        // Group 0 last: the node keeps following the placement (as a learner) until
        // its other replicas are gone, so it drops them itself.
        let Some(g) = holding
            .iter()
            .copied()
            .filter(|g| *g != 0)
            .chain(holding.iter().copied().filter(|g| *g == 0))
            .find(|g| !placement.moves.contains_key(g))
        else {
            if holding.is_empty() {
                match propose(node, PlacementCommand::NodeRemove { node: *d }).await {
                    Ok(_) => tracing::info!(node = d, "node drained and removed"),
                    Err(e) => tracing::warn!(node = d, error = %e, "removing a drained node"),
                }
            }
            continue;
        };
        let Some(to) = move_target(node, placement, g, *d).await else {
            tracing::warn!(
                node = d,
                group = g,
                "cannot drain: no member can take the replica"
            );
            continue;
        };
        if let Err(e) = propose(
            node,
            PlacementCommand::MoveStart {
                group: g,
                from: *d,
                to,
            },
        )
        .await
        {
            tracing::warn!(node = d, group = g, error = %e, "starting a drain move");
        }
    }
}

/// One step of the move of `group` (this node leads it).
async fn drive_move(
    node: &Node,
    group: &Group,
    placement: &Placement,
    m: Move,
) -> Result<(), String> {
    let g = group.id();
    let me = node.node_id();
    match m.step {
        MoveStep::Learner => {
            tracing::info!(
                group = g,
                from = m.from,
                to = m.to,
                "move: adding the learner"
            );
            // Not openraft's blocking `add_learner`: it counts a learner as caught up
            // within `replication_lag_threshold` entries (a million here, so that
            // followers catch up from the log), i.e. at once. Wait for the lag ourselves.
            match tokio::time::timeout(
                MEMBERSHIP_CHANGE_WAIT,
                group
                    .raft()
                    .add_learner(m.to, openraft::EmptyNode {}, false),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("adding node {} as a learner: {e}", m.to)),
                Err(_) => return Err("adding the learner timed out".into()),
            }
            let started = std::time::Instant::now();
            loop {
                let (leading, last, matched) = {
                    let metrics = group.raft().metrics();
                    let x = metrics.borrow_watched();
                    let matched = x
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&m.to).cloned().flatten())
                        .map(|l| l.index);
                    (
                        x.state == openraft::ServerState::Leader,
                        x.last_log_index,
                        matched,
                    )
                };
                if !leading {
                    return Err("lost leadership while the learner caught up".into());
                }
                let lag = last.unwrap_or(0).saturating_sub(matched.unwrap_or(0));
                if matched.is_some() && lag <= LEARNER_LAG_MAX {
                    tracing::info!(
                        group = g,
                        to = m.to,
                        lag,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "move: the learner caught up"
                    );
                    break;
                }
                if started.elapsed() > LEARNER_CATCH_UP_WAIT {
                    return Err(format!(
                        "node {} did not catch up within {LEARNER_CATCH_UP_WAIT:?} (lag {lag})",
                        m.to
                    ));
                }
                tokio::time::sleep(CATCH_UP_POLL).await;
            }
            propose(
                node,
                PlacementCommand::MoveStep {
                    group: g,
                    from: m.from,
                    to: m.to,
                    step: MoveStep::Promote,
                },
            )
            .await
            .map(|_| ())
        }
        MoveStep::Promote => {
            let voters: BTreeSet<NodeId> = placement
                .replicas(g)
                .iter()
                .map(|r| if *r == m.from { m.to } else { *r })
                .collect();
            if m.from == me {
                // A leader does not remove itself: hand the group to another voter that
                // stays, which resumes the move.
                let Some(next) = voters.iter().copied().find(|v| *v != m.to && *v != me) else {
                    return Err("no other voter to lead while this node leaves".into());
                };
                tracing::info!(
                    group = g,
                    to = next,
                    "move: leader leaves, transferring leadership"
                );
                return group
                    .raft()
                    .trigger()
                    .transfer_leader(next)
                    .await
                    .map_err(|e| e.to_string());
            }
            // Group 0 keeps a node that is still a member as a learner (every member
            // follows the placement; a drained one leaves when it is removed).
            let retain = g == 0 && placement.members.contains_key(&m.from);
            let current: BTreeSet<NodeId> = group
                .raft()
                .metrics()
                .borrow_watched()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            if current != voters {
                tracing::info!(group = g, voters = ?voters, "move: changing the voters");
                match tokio::time::timeout(
                    MEMBERSHIP_CHANGE_WAIT,
                    group
                        .raft()
                        .change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), retain),
                )
                .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("changing the voters to {voters:?}: {e}")),
                    Err(_) => return Err("the membership change timed out".into()),
                }
            }
            propose(
                node,
                PlacementCommand::MoveFinish {
                    group: g,
                    from: m.from,
                    to: m.to,
                },
            )
            .await
            .map(|_| ())?;
            tracing::info!(group = g, from = m.from, to = m.to, "move: done");
            Ok(())
        }
    }
}

/// Leader transfers that even out leaders per member, as far as this node sees them
/// (the groups it hosts, with the leader its replica knows): from the node leading the
/// most to the replica of the group leading the fewest, at most `transfers_max`.
pub fn leader_plan(
    node: &Node,
    placement: &Placement,
    transfers_max: usize,
) -> Vec<(GroupId, NodeId)> {
    let mut led: BTreeMap<NodeId, Vec<GroupId>> = placement
        .members
        .iter()
        .filter(|(_, m)| !m.draining)
        .map(|(n, _)| (*n, Vec::new()))
        .collect();
    for group in node.groups() {
        let g = group.id();
        if g == 0 || placement.moves.contains_key(&g) || placement.leader_transfers.contains_key(&g)
        {
            continue;
        }
        if let Some(l) = group.leader()
            && let Some(v) = led.get_mut(&l)
        {
            v.push(g);
        }
    }
    let mut plan = Vec::new();
    while plan.len() < transfers_max {
        let Some((&hi, hi_groups)) = led
            .iter()
            .max_by_key(|(n, v)| (v.len(), std::cmp::Reverse(**n)))
        else {
            break;
        };
        let hi_count = hi_groups.len();
        // The group of `hi` whose least-leading other replica leads the fewest.
        let best = hi_groups
            .iter()
            .filter_map(|g| {
                placement
                    .replicas(*g)
                    .iter()
                    .filter(|r| **r != hi)
                    .filter_map(|r| led.get(r).map(|v| (v.len(), *r)))
                    .min()
                    .map(|(count, r)| (count, *g, r))
            })
            .min();
        let Some((lo_count, g, lo)) = best else { break };
        if hi_count <= lo_count + 1 {
            break;
        }
        plan.push((g, lo));
        led.get_mut(&hi).expect("present").retain(|x| *x != g);
        led.get_mut(&lo).expect("present").push(g);
    }
    plan
}

/// Moves that even out the replicas per member: from the most loaded to the least loaded
/// (non-draining, answering) member, at most `moves_max`, never two for one group and
/// never for a group already moving.
pub async fn rebalance_plan(
    node: &Node,
    placement: &Placement,
    moves_max: usize,
) -> Vec<(GroupId, NodeId, NodeId)> {
    let mut load: BTreeMap<NodeId, usize> = placement
        .load()
        .into_iter()
        .filter(|(n, _)| placement.members.get(n).is_some_and(|m| !m.draining))
        .collect();
    let mut up = BTreeSet::new();
    for n in load.keys() {
        if node.peer_answers(*n, PEER_PROBE_WAIT).await {
            up.insert(*n);
        }
    }
    let mut taken: BTreeSet<GroupId> = placement.moves.keys().copied().collect();
    let mut plan = Vec::new();
    while plan.len() < moves_max {
        let Some((&hi, &hi_load)) = load
            .iter()
            .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n)))
        else {
            break;
        };
        let Some((&lo, &lo_load)) = load
            .iter()
            .filter(|(n, _)| up.contains(*n))
            .min_by_key(|(n, l)| (**l, **n))
        else {
            break;
        };
        if hi_load <= lo_load + 1 {
            break;
        }
        let Some(g) = placement
            .groups
            .iter()
            .filter(|(g, p)| {
                **g != 0
                    && !taken.contains(g)
                    && p.replicas.contains(&hi)
                    && !p.replicas.contains(&lo)
            })
            .map(|(g, _)| *g)
            .next()
        else {
            break;
        };
        taken.insert(g);
        plan.push((g, hi, lo));
        *load.entry(hi).or_default() -= 1;
        *load.entry(lo).or_default() += 1;
    }
    plan
}
