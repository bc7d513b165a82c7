//! Cluster placement as replicated state: the controller group 0's own state.
//!
//! What it owns: the cluster's members (node id, peer address, draining flag), the
//! replication factor, the number of chat groups and the groups user handles hash over,
//! each group's replica set (in order: the first replica of a group that was never moved
//! initializes it), the in-progress replica move of each group with its step, the leader
//! transfers `rebalance` asked for, and the
//! commands that change them ([`PlacementCommand`], carried as `Command::Placement`, tag
//! 70) with their deterministic rules and bytes. What it must not do: read clocks, do
//! I/O or talk to openraft; `crate::controller` watches this state and acts on it (starts
//! and stops local replicas, adds learners, changes group memberships).
//!
//! Why in the chat state machine and not a state machine of its own: group 0 is a Raft
//! group like the others, with the same log store, checkpoints, snapshots and transport.
//! Keeping one state machine type keeps one openraft type configuration; the placement
//! lives in its own sub-struct of `GroupState`, empty (and encoded as nothing) in every
//! group but 0, and its commands are refused in any other group.
//!
//! A move of group G from node A to node B goes through these steps, each one a command
//! applied here, so `status` shows it and any leader of G resumes it after a crash:
//! `MoveStart` (step `learner`: B starts an empty replica, G's leader adds it as a learner
//! and waits until it caught up) → `MoveStep` to `promote` (G's leader changes the voters
//! to the new set) → `MoveFinish` (the replica set is the new one; A stops its replica and
//! deletes its logs).
//!
//! Bytes (little-endian; appended at the end of `GroupState`'s checkpoint, nothing when
//! the placement was never bootstrapped):
//!
//! ```text
//! version u8 (= PLACEMENT_VERSION) | version_counter u64 | replication u64 | user_groups u64
//! members: count u64 × ( node u64 | addr (u32 len, UTF-8) | draining u8 )
//! groups:  count u64 × ( group u64 | epoch u64 | replicas: count u64 × node u64 )
//! moves:   count u64 × ( group u64 | from u64 | to u64 | step u8 )
//! leader transfers: count u64 × ( group u64 | to u64 )
//! ```

use std::collections::BTreeMap;

use crate::chat::command::{Outcome, RefusalCode};
use crate::codec::{DecodeError, Reader};
use crate::types::{GroupId, NodeId};

/// Version byte of the placement encoding.
pub const PLACEMENT_VERSION: u8 = 1;
/// Members a cluster may have. Why: every node keeps one peer connection per member and
/// status lists them all; hundreds is already beyond what this design is tested with.
pub const MEMBERS_MAX: usize = 1024;
/// Longest peer address string (`host:port`).
pub const ADDR_BYTES_MAX: usize = 256;
/// Groups one `GroupsAdd` creates at most. Why: every new group starts a Raft replica
/// on `replication` nodes at once; a bounded step keeps a typo from starting thousands.
pub const GROUPS_ADD_MAX: u64 = 256;
/// Groups a cluster may have (ids carry their group in 16 bits: `chat::GROUPS_MAX`).
pub const GROUP_COUNT_MAX: u64 = crate::chat::GROUPS_MAX - 1;

/// The step an in-progress move is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MoveStep {
    /// The target replica is being added as a learner and caught up.
    Learner,
    /// The voters are being changed to the new set.
    Promote,
}

impl MoveStep {
    fn byte(self) -> u8 {
        match self {
            MoveStep::Learner => 1,
            MoveStep::Promote => 2,
        }
    }

    fn from_byte(b: u8) -> Result<MoveStep, DecodeError> {
        match b {
            1 => Ok(MoveStep::Learner),
            2 => Ok(MoveStep::Promote),
            b => Err(DecodeError::new("move step", format!("unknown step {b}"))),
        }
    }

    /// The step's name in status output.
    pub fn name(self) -> &'static str {
        match self {
            MoveStep::Learner => "learner",
            MoveStep::Promote => "promote",
        }
    }
}

/// A replica move in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The node losing the replica.
    pub from: NodeId,
    /// The node gaining it.
    pub to: NodeId,
    /// Where the move is.
    pub step: MoveStep,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Peer address (`host:port`), as other nodes dial it.
    pub addr: String,
    /// Being removed: its replicas are moved away, then it is dropped.
    pub draining: bool,
}

/// One group's placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlacement {
    /// The voters, in order; the first initializes a group never moved.
    pub replicas: Vec<NodeId>,
    /// Completed moves of the group. A replica may initialize the group only at epoch 0
    /// (after a move the group has a log, and a fresh replica must learn it instead).
    pub epoch: u64,
}

/// The cluster placement (group 0's state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Bumped by every change; 0 = never bootstrapped.
    pub version: u64,
    /// Replicas per group.
    pub replication: u64,
    /// Groups user handles hash over (`chat::group_of_name`): fixed at bootstrap, since a
    /// handle's uniqueness is checked in the one group its hash names.
    pub user_groups: u64,
    /// Every member.
    pub members: BTreeMap<NodeId, Member>,
    /// Every group (0 included).
    pub groups: BTreeMap<GroupId, GroupPlacement>,
    /// The in-progress move of each group that has one.
    pub moves: BTreeMap<GroupId, Move>,
    /// Leader transfers asked for (`rebalance`): group → the replica that should lead
    /// it. The group's leader hands over; the new leader clears the entry.
    pub leader_transfers: BTreeMap<GroupId, NodeId>,
}

/// A change to the placement (proposed in group 0 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementCommand {
    /// The first placement, computed from the static flags. Applied once; later ones
    /// (every initial node's controller may propose it) change nothing.
    Bootstrap {
        /// Replicas per group.
        replication: u64,
        /// Groups user handles hash over.
        user_groups: u64,
        /// Members with their peer addresses.
        members: Vec<(NodeId, String)>,
        /// Every group with its replicas.
        groups: Vec<(GroupId, Vec<NodeId>)>,
    },
    /// Registers a node (idempotent for the same address).
    NodeAdd {
        /// The node.
        node: NodeId,
        /// Its peer address.
        addr: String,
    },
    /// Marks a node to be drained and removed.
    NodeDrain {
        /// The node.
        node: NodeId,
    },
    /// Drops a drained node (refused while it holds or receives a replica).
    NodeRemove {
        /// The node.
        node: NodeId,
    },
    /// Starts moving group `group`'s replica from `from` to `to`.
    MoveStart {
        /// The group.
        group: GroupId,
        /// Losing node.
        from: NodeId,
        /// Gaining node.
        to: NodeId,
    },
    /// Records that the move reached `step`.
    MoveStep {
        /// The group.
        group: GroupId,
        /// Losing node.
        from: NodeId,
        /// Gaining node.
        to: NodeId,
        /// The step reached.
        step: MoveStep,
    },
    /// Records that the move completed: the replica set is the new one.
    MoveFinish {
        /// The group.
        group: GroupId,
        /// Losing node.
        from: NodeId,
        /// Gaining node.
        to: NodeId,
    },
    /// Adds `count` groups, each on the least-loaded members.
    GroupsAdd {
        /// How many.
        count: u64,
    },
    /// Asks the leader of `group` to hand leadership to replica `to`.
    LeaderWant {
        /// The group.
        group: GroupId,
        /// The replica that should lead.
        to: NodeId,
    },
    /// Records that `to` leads `group` now (clears the request).
    LeaderDone {
        /// The group.
        group: GroupId,
        /// The replica that leads.
        to: NodeId,
    },
}

mod sub {
    pub const BOOTSTRAP: u8 = 1;
    pub const NODE_ADD: u8 = 2;
    pub const NODE_DRAIN: u8 = 3;
    pub const NODE_REMOVE: u8 = 4;
    pub const MOVE_START: u8 = 5;
    pub const MOVE_STEP: u8 = 6;
    pub const MOVE_FINISH: u8 = 7;
    pub const GROUPS_ADD: u8 = 8;
    pub const LEADER_WANT: u8 = 9;
    pub const LEADER_DONE: u8 = 10;
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_nodes(out: &mut Vec<u8>, nodes: &[NodeId]) {
    put_u64(out, nodes.len() as u64);
    for n in nodes {
        put_u64(out, *n);
    }
}

fn read_nodes(r: &mut Reader<'_>) -> Result<Vec<NodeId>, DecodeError> {
    let n = r.u64_count(8, MEMBERS_MAX)?;
    (0..n).map(|_| r.u64()).collect()
}

impl PlacementCommand {
    /// Appends the command's bytes (sub-tag and fields).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            PlacementCommand::Bootstrap {
                replication,
                user_groups,
                members,
                groups,
            } => {
                out.push(sub::BOOTSTRAP);
                put_u64(out, *replication);
                put_u64(out, *user_groups);
                put_u64(out, members.len() as u64);
                for (n, a) in members {
                    put_u64(out, *n);
                    put_str(out, a);
                }
                put_u64(out, groups.len() as u64);
                for (g, r) in groups {
                    put_u64(out, *g);
                    put_nodes(out, r);
                }
            }
            PlacementCommand::NodeAdd { node, addr } => {
                out.push(sub::NODE_ADD);
                put_u64(out, *node);
                put_str(out, addr);
            }
            PlacementCommand::NodeDrain { node } => {
                out.push(sub::NODE_DRAIN);
                put_u64(out, *node);
            }
            PlacementCommand::NodeRemove { node } => {
                out.push(sub::NODE_REMOVE);
                put_u64(out, *node);
            }
            PlacementCommand::MoveStart { group, from, to } => {
                out.push(sub::MOVE_START);
                put_u64(out, *group);
                put_u64(out, *from);
                put_u64(out, *to);
            }
            PlacementCommand::MoveStep {
                group,
                from,
                to,
                step,
            } => {
                out.push(sub::MOVE_STEP);
                put_u64(out, *group);
                put_u64(out, *from);
                put_u64(out, *to);
                out.push(step.byte());
            }
            PlacementCommand::MoveFinish { group, from, to } => {
                out.push(sub::MOVE_FINISH);
                put_u64(out, *group);
                put_u64(out, *from);
                put_u64(out, *to);
            }
            PlacementCommand::GroupsAdd { count } => {
                out.push(sub::GROUPS_ADD);
                put_u64(out, *count);
            }
            PlacementCommand::LeaderWant { group, to } => {
                out.push(sub::LEADER_WANT);
                put_u64(out, *group);
                put_u64(out, *to);
            }
            PlacementCommand::LeaderDone { group, to } => {
                out.push(sub::LEADER_DONE);
                put_u64(out, *group);
                put_u64(out, *to);
            }
        }
    }

    /// Decodes what [`PlacementCommand::encode_into`] wrote (the reader is positioned
    /// after `Command`'s tag).
    pub fn decode(r: &mut Reader<'_>) -> Result<PlacementCommand, DecodeError> {
        Ok(match r.u8()? {
            sub::BOOTSTRAP => {
                let replication = r.u64()?;
                let user_groups = r.u64()?;
                let mut members = Vec::new();
                for _ in 0..r.u64_count(12, MEMBERS_MAX)? {
                    members.push((r.u64()?, r.string(ADDR_BYTES_MAX)?));
                }
                let mut groups = Vec::new();
                for _ in 0..r.u64_count(16, GROUP_COUNT_MAX as usize + 1)? {
                    groups.push((r.u64()?, read_nodes(r)?));
                }
                PlacementCommand::Bootstrap {
                    replication,
                    user_groups,
                    members,
                    groups,
                }
            }
            sub::NODE_ADD => PlacementCommand::NodeAdd {
                node: r.u64()?,
                addr: r.string(ADDR_BYTES_MAX)?,
            },
            sub::NODE_DRAIN => PlacementCommand::NodeDrain { node: r.u64()? },
            sub::NODE_REMOVE => PlacementCommand::NodeRemove { node: r.u64()? },
            sub::MOVE_START => PlacementCommand::MoveStart {
                group: r.u64()?,
                from: r.u64()?,
                to: r.u64()?,
            },
            sub::MOVE_STEP => PlacementCommand::MoveStep {
                group: r.u64()?,
                from: r.u64()?,
                to: r.u64()?,
                step: MoveStep::from_byte(r.u8()?)?,
            },
            sub::MOVE_FINISH => PlacementCommand::MoveFinish {
                group: r.u64()?,
                from: r.u64()?,
                to: r.u64()?,
            },
            sub::GROUPS_ADD => PlacementCommand::GroupsAdd { count: r.u64()? },
            sub::LEADER_WANT => PlacementCommand::LeaderWant {
                group: r.u64()?,
                to: r.u64()?,
            },
            sub::LEADER_DONE => PlacementCommand::LeaderDone {
                group: r.u64()?,
                to: r.u64()?,
            },
            other => return Err(r.error(format!("unknown placement command {other}"))),
        })
    }
}

fn refuse(code: RefusalCode, message: impl Into<String>) -> Outcome {
    Outcome::refused(code, message)
}

impl Placement {
    /// Whether a placement was ever bootstrapped.
    pub fn is_bootstrapped(&self) -> bool {
        self.version > 0
    }

    /// Chat groups (ids `1..=chat_groups()`; group 0 is the controller).
    pub fn chat_groups(&self) -> u64 {
        self.groups.keys().filter(|g| **g > 0).count() as u64
    }

    /// The voters of group `g` (empty if unknown).
    pub fn replicas(&self, g: GroupId) -> &[NodeId] {
        self.groups.get(&g).map_or(&[], |p| &p.replicas[..])
    }

    /// Replicas each member holds or is receiving (0 for members without any).
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.members.keys().map(|n| (*n, 0)).collect();
        for p in self.groups.values() {
            for n in &p.replicas {
                *load.entry(*n).or_default() += 1;
            }
        }
        for m in self.moves.values() {
            *load.entry(m.to).or_default() += 1;
        }
        load
    }

    /// Whether node `n` should run a replica of group `g` (a voter, or the target of its
    /// move).
    pub fn hosts(&self, n: NodeId, g: GroupId) -> bool {
        self.replicas(g).contains(&n) || self.moves.get(&g).is_some_and(|m| m.to == n)
    }

    /// Applies one command (group 0 only; the caller checks).
    pub fn apply(&mut self, cmd: &PlacementCommand) -> Outcome {
        if !self.is_bootstrapped() && !matches!(cmd, PlacementCommand::Bootstrap { .. }) {
            return refuse(
                RefusalCode::Conflict,
                "the placement is not bootstrapped yet; retry in a moment",
            );
        }
        let outcome = self.apply_checked(cmd);
        if let Outcome::Placement { changed: true, .. } = outcome {
            self.version += 1;
            return Outcome::Placement {
                version: self.version,
                changed: true,
            };
        }
        outcome
    }

    fn unchanged(&self) -> Outcome {
        Outcome::Placement {
            version: self.version,
            changed: false,
        }
    }

    fn changed(&self) -> Outcome {
        Outcome::Placement {
            version: self.version,
            changed: true,
        }
    }

    fn apply_checked(&mut self, cmd: &PlacementCommand) -> Outcome {
        use PlacementCommand as P;
        match cmd {
            P::Bootstrap {
                replication,
                user_groups,
                members,
                groups,
            } => {
                if self.is_bootstrapped() {
                    return self.unchanged();
                }
                if *replication == 0
                    || members.is_empty()
                    || members.len() > MEMBERS_MAX
                    || !groups.iter().any(|(g, _)| *g == 0)
                {
                    return refuse(RefusalCode::BadRequest, "an incomplete bootstrap placement");
                }
                self.replication = *replication;
                self.user_groups = *user_groups;
                self.members = members
                    .iter()
                    .map(|(n, a)| {
                        (
                            *n,
                            Member {
                                addr: a.clone(),
                                draining: false,
                            },
                        )
                    })
                    .collect();
                self.groups = groups
                    .iter()
                    .map(|(g, r)| {
                        (
                            *g,
                            GroupPlacement {
                                replicas: r.clone(),
                                epoch: 0,
                            },
                        )
                    })
                    .collect();
                self.changed()
            }
            P::NodeAdd { node, addr } => {
                if *node == 0 || addr.is_empty() {
                    return refuse(RefusalCode::BadRequest, "node id 0 or an empty address");
                }
                match self.members.get(node) {
                    Some(m) if m.addr == *addr && !m.draining => self.unchanged(),
                    Some(m) if m.draining => refuse(
                        RefusalCode::Conflict,
                        format!("node {node} is being removed; wait until it is gone"),
                    ),
                    Some(m) => refuse(
                        RefusalCode::Conflict,
                        format!("node {node} is already a member at {}", m.addr),
                    ),
                    None if self.members.len() >= MEMBERS_MAX => refuse(
                        RefusalCode::Conflict,
                        format!("the cluster has {MEMBERS_MAX} members, the most it may have"),
                    ),
                    None => {
                        self.members.insert(
                            *node,
                            Member {
                                addr: addr.clone(),
                                draining: false,
                            },
                        );
                        self.changed()
                    }
                }
            }
            P::NodeDrain { node } => match self.members.get_mut(node) {
                None => refuse(RefusalCode::NotFound, format!("no node {node}")),
                Some(m) if m.draining => self.unchanged(),
                Some(m) => {
                    m.draining = true;
                    self.changed()
                }
            },
            P::NodeRemove { node } => {
                if !self.members.contains_key(node) {
                    return self.unchanged();
                }
                if let Some(g) = self.groups.iter().find(|(g, _)| self.hosts(*node, **g)) {
                    return refuse(
                        RefusalCode::Conflict,
                        format!("node {node} still holds a replica of group {}", g.0),
                    );
                }
                self.members.remove(node);
                self.changed()
            }
            P::MoveStart { group, from, to } => self.move_start(*group, *from, *to),
            P::MoveStep {
                group,
                from,
                to,
                step,
            } => match self.moves.get_mut(group) {
                Some(m) if m.from == *from && m.to == *to => {
                    if m.step >= *step {
                        return self.unchanged();
                    }
                    m.step = *step;
                    self.changed()
                }
                _ => refuse(
                    RefusalCode::Conflict,
                    format!("group {group} has no move from {from} to {to}"),
                ),
            },
            P::MoveFinish { group, from, to } => {
                match self.moves.get(group) {
                    Some(m) if m.from == *from && m.to == *to => {}
                    _ => {
                        let done = self
                            .groups
                            .get(group)
                            .is_some_and(|p| p.replicas.contains(to) && !p.replicas.contains(from));
                        if done {
                            // Finished already (a retried finish).
                            return self.unchanged();
                        }
                        return refuse(
                            RefusalCode::Conflict,
                            format!("group {group} has no move from {from} to {to}"),
                        );
                    }
                }
                self.moves.remove(group);
                if self.leader_transfers.get(group) == Some(from) {
                    self.leader_transfers.remove(group);
                }
                let p = self.groups.get_mut(group).expect("a move names a group");
                for r in &mut p.replicas {
                    if *r == *from {
                        *r = *to;
                    }
                }
                p.epoch += 1;
                self.changed()
            }
            P::GroupsAdd { count } => self.groups_add(*count),
            P::LeaderWant { group, to } => {
                if !self.replicas(*group).contains(to) {
                    return refuse(
                        RefusalCode::BadRequest,
                        format!("node {to} is not a voter of group {group}"),
                    );
                }
                if self.leader_transfers.get(group) == Some(to) {
                    return self.unchanged();
                }
                self.leader_transfers.insert(*group, *to);
                self.changed()
            }
            P::LeaderDone { group, to } => {
                if self.leader_transfers.get(group) != Some(to) {
                    return self.unchanged();
                }
                self.leader_transfers.remove(group);
                self.changed()
            }
        }
    }

    fn move_start(&mut self, group: GroupId, from: NodeId, to: NodeId) -> Outcome {
        let Some(p) = self.groups.get(&group) else {
            return refuse(RefusalCode::NotFound, format!("no group {group}"));
        };
        if let Some(m) = self.moves.get(&group) {
            if m.from == from && m.to == to {
                return self.unchanged();
            }
            return refuse(
                RefusalCode::Conflict,
                format!(
                    "group {group} is already moving from node {} to node {} (step {})",
                    m.from,
                    m.to,
                    m.step.name()
                ),
            );
        }
        if !p.replicas.contains(&from) {
            return refuse(
                RefusalCode::BadRequest,
                format!(
                    "node {from} holds no replica of group {group} (replicas: {:?})",
                    p.replicas
                ),
            );
        }
        match self.members.get(&to) {
            None => {
                return refuse(
                    RefusalCode::NotFound,
                    format!("node {to} is not a member of the cluster (add it with `node add`)"),
                );
            }
            Some(m) if m.draining => {
                return refuse(RefusalCode::Conflict, format!("node {to} is being removed"));
            }
            Some(_) => {}
        }
        if p.replicas.contains(&to) {
            return refuse(
                RefusalCode::Conflict,
                format!("node {to} already holds a replica of group {group}"),
            );
        }
        self.moves.insert(
            group,
            Move {
                from,
                to,
                step: MoveStep::Learner,
            },
        );
        self.changed()
    }

    fn groups_add(&mut self, count: u64) -> Outcome {
        if count == 0 || count > GROUPS_ADD_MAX {
            return refuse(
                RefusalCode::BadRequest,
                format!("group count {count}: add 1 to {GROUPS_ADD_MAX} at a time"),
            );
        }
        let first = self.groups.keys().next_back().map_or(0, |g| g + 1);
        if first + count - 1 > GROUP_COUNT_MAX {
            return refuse(
                RefusalCode::BadRequest,
                format!("at most {GROUP_COUNT_MAX} groups"),
            );
        }
        let candidates: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| !m.draining)
            .map(|(n, _)| *n)
            .collect();
        let r = (self.replication as usize).min(candidates.len());
        if r == 0 {
            return refuse(RefusalCode::Conflict, "no member can take a replica");
        }
        let mut load = self.load();
        for g in first..first + count {
            // Least-loaded first, ties by node id: deterministic on every replica.
            let mut order = candidates.clone();
            order.sort_by_key(|n| (load.get(n).copied().unwrap_or(0), *n));
            let replicas: Vec<NodeId> = order.into_iter().take(r).collect();
            for n in &replicas {
                *load.entry(*n).or_default() += 1;
            }
            self.groups.insert(g, GroupPlacement { replicas, epoch: 0 });
        }
        self.changed()
    }

    /// Appends the placement's bytes (nothing when never bootstrapped).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        if !self.is_bootstrapped() {
            return;
        }
        out.push(PLACEMENT_VERSION);
        put_u64(out, self.version);
        put_u64(out, self.replication);
        put_u64(out, self.user_groups);
        put_u64(out, self.members.len() as u64);
        for (n, m) in &self.members {
            put_u64(out, *n);
            put_str(out, &m.addr);
            out.push(u8::from(m.draining));
        }
        put_u64(out, self.groups.len() as u64);
        for (g, p) in &self.groups {
            put_u64(out, *g);
            put_u64(out, p.epoch);
            put_nodes(out, &p.replicas);
        }
        put_u64(out, self.moves.len() as u64);
        for (g, m) in &self.moves {
            put_u64(out, *g);
            put_u64(out, m.from);
            put_u64(out, m.to);
            out.push(m.step.byte());
        }
        put_u64(out, self.leader_transfers.len() as u64);
        for (g, n) in &self.leader_transfers {
            put_u64(out, *g);
            put_u64(out, *n);
        }
    }

    /// Decodes what [`Placement::encode_into`] wrote; no bytes left means none.
    pub fn decode(r: &mut Reader<'_>) -> Result<Placement, DecodeError> {
        let mut p = Placement::default();
        if r.remaining() == 0 {
            return Ok(p);
        }
        let v = r.u8()?;
        if v != PLACEMENT_VERSION {
            return Err(r.error(format!(
                "placement version {v}, expected {PLACEMENT_VERSION}"
            )));
        }
        p.version = r.u64()?;
        p.replication = r.u64()?;
        p.user_groups = r.u64()?;
        for _ in 0..r.u64_count(13, MEMBERS_MAX)? {
            let n = r.u64()?;
            let addr = r.string(ADDR_BYTES_MAX)?;
            let draining = r.bool()?;
            p.members.insert(n, Member { addr, draining });
        }
        for _ in 0..r.u64_count(24, GROUP_COUNT_MAX as usize + 1)? {
            let g = r.u64()?;
            let epoch = r.u64()?;
            let replicas = read_nodes(r)?;
            p.groups.insert(g, GroupPlacement { replicas, epoch });
        }
        for _ in 0..r.u64_count(25, GROUP_COUNT_MAX as usize + 1)? {
            let g = r.u64()?;
            let from = r.u64()?;
            let to = r.u64()?;
            let step = MoveStep::from_byte(r.u8()?)?;
            p.moves.insert(g, Move { from, to, step });
        }
        for _ in 0..r.u64_count(16, GROUP_COUNT_MAX as usize + 1)? {
            let g = r.u64()?;
            p.leader_transfers.insert(g, r.u64()?);
        }
        if p.version == 0 {
            return Err(r.error("a placement with version 0"));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot() -> Placement {
        let mut p = Placement::default();
        let o = p.apply(&PlacementCommand::Bootstrap {
            replication: 3,
            user_groups: 2,
            members: vec![(1, "a:1".into()), (2, "b:1".into()), (3, "c:1".into())],
            groups: (0..=2).map(|g| (g, vec![1, 2, 3])).collect(),
        });
        assert_eq!(
            o,
            Outcome::Placement {
                version: 1,
                changed: true
            }
        );
        p
    }

    fn round_trip(p: &Placement) {
        let mut bytes = Vec::new();
        p.encode_into(&mut bytes);
        let mut r = Reader::new("placement", &bytes);
        assert_eq!(&Placement::decode(&mut r).expect("decodes"), p);
        r.finish().expect("all read");
    }

    fn refused(o: &Outcome) -> bool {
        matches!(o, Outcome::Refused(_))
    }

    #[test]
    fn a_move_goes_through_its_steps() {
        let mut p = boot();
        assert!(refused(&p.apply(&PlacementCommand::MoveStart {
            group: 1,
            from: 1,
            to: 4
        })));
        p.apply(&PlacementCommand::NodeAdd {
            node: 4,
            addr: "d:1".into(),
        });
        let start = PlacementCommand::MoveStart {
            group: 1,
            from: 1,
            to: 4,
        };
        assert!(!refused(&p.apply(&start)));
        assert!(p.hosts(4, 1) && p.hosts(1, 1));
        // The same move again is a no-op; another move of the group is refused.
        assert_eq!(
            p.apply(&start),
            Outcome::Placement {
                version: p.version,
                changed: false
            }
        );
        assert!(refused(&p.apply(&PlacementCommand::MoveStart {
            group: 1,
            from: 2,
            to: 4
        })));
        round_trip(&p);
        p.apply(&PlacementCommand::MoveStep {
            group: 1,
            from: 1,
            to: 4,
            step: MoveStep::Promote,
        });
        assert_eq!(p.moves[&1].step, MoveStep::Promote);
        p.apply(&PlacementCommand::MoveFinish {
            group: 1,
            from: 1,
            to: 4,
        });
        assert_eq!(p.replicas(1), &[4, 2, 3]);
        assert_eq!(p.groups[&1].epoch, 1);
        assert!(p.moves.is_empty());
        round_trip(&p);
        // Leader transfers name a voter; the new leader clears them.
        assert!(refused(
            &p.apply(&PlacementCommand::LeaderWant { group: 1, to: 1 })
        ));
        assert!(!refused(
            &p.apply(&PlacementCommand::LeaderWant { group: 1, to: 4 })
        ));
        round_trip(&p);
        p.apply(&PlacementCommand::LeaderDone { group: 1, to: 4 });
        assert!(p.leader_transfers.is_empty());
    }

    #[test]
    fn removal_waits_for_the_replicas_to_leave() {
        let mut p = boot();
        p.apply(&PlacementCommand::NodeDrain { node: 3 });
        assert!(refused(&p.apply(&PlacementCommand::NodeRemove { node: 3 })));
        assert!(refused(&p.apply(&PlacementCommand::NodeAdd {
            node: 3,
            addr: "c:1".into()
        })));
        let mut q = boot();
        q.apply(&PlacementCommand::NodeAdd {
            node: 5,
            addr: "e:1".into(),
        });
        assert!(!refused(
            &q.apply(&PlacementCommand::NodeRemove { node: 5 })
        ));
        assert!(!q.members.contains_key(&5));
    }

    #[test]
    fn new_groups_go_to_the_least_loaded_nodes() {
        let mut p = boot();
        p.apply(&PlacementCommand::NodeAdd {
            node: 4,
            addr: "d:1".into(),
        });
        p.apply(&PlacementCommand::GroupsAdd { count: 2 });
        assert_eq!(p.chat_groups(), 4);
        // Node 4 held nothing, so both new groups have a replica there.
        assert!(p.replicas(3).contains(&4) && p.replicas(4).contains(&4));
        assert_eq!(p.replicas(3).len(), 3);
        assert!(refused(&p.apply(&PlacementCommand::GroupsAdd { count: 0 })));
        round_trip(&p);
    }

    #[test]
    fn checkpoints_carry_the_placement_in_group_0_only() {
        use crate::chat::{Command, GroupState};
        let cmd = Command::Placement(PlacementCommand::Bootstrap {
            replication: 1,
            user_groups: 1,
            members: vec![(1, "a:1".into())],
            groups: vec![(0, vec![1]), (1, vec![1])],
        });
        let mut controller = GroupState::new(0);
        assert!(!refused(&controller.apply(&cmd, 5, 1, 0)));
        assert!(controller.placement().is_bootstrapped());
        let decoded = GroupState::decode(&controller.encode()).expect("decodes");
        assert_eq!(decoded, controller);
        let mut chats = GroupState::new(5);
        let before = chats.encode();
        assert!(refused(&chats.apply(&cmd, 5, 1, 0)));
        assert_eq!(chats.encode(), before, "a refused command changes nothing");
    }

    #[test]
    fn commands_round_trip() {
        let cmds = vec![
            PlacementCommand::Bootstrap {
                replication: 3,
                user_groups: 4,
                members: vec![(1, "x:1".into())],
                groups: vec![(0, vec![1]), (1, vec![1])],
            },
            PlacementCommand::NodeAdd {
                node: 2,
                addr: "y:2".into(),
            },
            PlacementCommand::NodeDrain { node: 2 },
            PlacementCommand::NodeRemove { node: 2 },
            PlacementCommand::MoveStart {
                group: 1,
                from: 1,
                to: 2,
            },
            PlacementCommand::MoveStep {
                group: 1,
                from: 1,
                to: 2,
                step: MoveStep::Promote,
            },
            PlacementCommand::MoveFinish {
                group: 1,
                from: 1,
                to: 2,
            },
            PlacementCommand::GroupsAdd { count: 3 },
            PlacementCommand::LeaderWant { group: 1, to: 2 },
            PlacementCommand::LeaderDone { group: 1, to: 2 },
        ];
        for c in cmds {
            let mut bytes = Vec::new();
            c.encode_into(&mut bytes);
            let mut r = Reader::new("placement command", &bytes);
            assert_eq!(PlacementCommand::decode(&mut r).expect("decodes"), c);
            r.finish().expect("all read");
        }
    }
}
