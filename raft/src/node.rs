//! One node: its storage engine, the replicas of groups it hosts, and the proposal
//! batcher of each.
//!
//! What it owns: opening the engine, building every local group replica (`LogStore` +
//! `ChatStateMachine` + openraft `Raft`) with timeouts that scale with the group count,
//! starting them in staggered waves, initializing each group once from its first replica,
//! batching proposals into few Raft entries, linearizable read barriers and reading
//! events back from the log. What it must not do: speak to clients, or know where peers
//! are (the network factory given to [`Node::start`] does).
//!
//! Groups. Group 0 is the controller (cluster membership and placement; it carries no
//! chats yet). Chat groups are `1..=groups`. Group `g`'s replicas are `replicas`
//! consecutive nodes of the sorted member list starting at `g mod nodes`, so each node
//! holds about `groups × replicas / nodes` replicas and each leads about a third.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chatlog_storage::Engine;
use openraft::error::{ClientWriteError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::storage::RaftLogReader;
use openraft::{Config, ReadPolicy, SnapshotPolicy};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::chat::{Batch, Command, DecodedBatch, EventLoc, Outcome};
use crate::log_store::{LogReader, LogStore};
use crate::state_machine::{ChatStateMachine, GroupShared, SmConfig};
use crate::types::{ChatBatch, EntryPayload, GroupId, NodeId, TypeConfig};
use crate::{ChatRaft, error::Error};

/// Commands waiting to be proposed in one group (beyond it, proposers wait).
pub const PROPOSE_QUEUE_MAX: usize = 16 * 1024;
/// Commands in one Raft entry at most.
pub const ENTRY_COMMANDS_MAX: usize = 4096;
/// Encoded command bytes in one Raft entry at most (a batch closes at the first command
/// that crosses it).
pub const ENTRY_BYTES_MAX: usize = 1 << 20;
/// Entries of one group proposed and not yet applied, at most.
pub const ENTRIES_IN_FLIGHT_MAX: usize = 64;
/// Groups started per wave at startup.
const START_WAVE_GROUPS: usize = 32;

/// What a node is told at start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node.
    pub node_id: NodeId,
    /// The storage engine's directory.
    pub data_dir: PathBuf,
    /// Chat groups of the cluster (the controller group 0 comes on top).
    pub groups: u64,
    /// Replicas per group (at most the member count).
    pub replicas: usize,
    /// Every node of the initial cluster (this one included).
    pub members: BTreeSet<NodeId>,
    /// State machine knobs.
    pub sm: SmConfig,
    /// Segment size of the engine (None = the engine's default).
    pub segment_bytes: Option<u64>,
    /// Raft heartbeat interval; None = derived from the group count ([`timing`]).
    pub heartbeat_ms: Option<u64>,
}

impl NodeConfig {
    /// One node holding every group alone: the embedded default.
    pub fn single(data_dir: impl Into<PathBuf>, groups: u64) -> NodeConfig {
        NodeConfig {
            node_id: 1,
            data_dir: data_dir.into(),
            groups,
            replicas: 1,
            members: BTreeSet::from([1]),
            sm: SmConfig::default(),
            segment_bytes: None,
            heartbeat_ms: None,
        }
    }

    /// The replicas of group `g`, in placement order (the first one initializes it).
    pub fn placement(&self, g: GroupId) -> Vec<NodeId> {
        let nodes: Vec<NodeId> = self.members.iter().copied().collect();
        let n = nodes.len().max(1);
        let r = self.replicas.clamp(1, n);
        (0..r).map(|k| nodes[(g as usize + k) % n]).collect()
    }
}

/// Raft timing for `replicas_here` group replicas on one node: heartbeats get rarer as
/// groups are added, so idle cost per node stays bounded (PLAN.md P8: 1,000 groups with
/// 50 ms heartbeats fell into an election storm here).
pub fn timing(replicas_here: usize, heartbeat_ms: Option<u64>) -> Result<Config, Error> {
    let hb =
        heartbeat_ms.unwrap_or_else(|| (50 * replicas_here.div_ceil(100) as u64).clamp(100, 1000));
    let config = Config {
        cluster_name: "chatlog".into(),
        heartbeat_interval: hb,
        election_timeout_min: 4 * hb,
        election_timeout_max: 8 * hb,
        enable_pre_vote: Some(true),
        // Logs are purged by retention only, never because a snapshot was taken.
        max_in_snapshot_log_to_keep: u64::MAX,
        snapshot_policy: SnapshotPolicy::Never,
        // Followers far behind catch up from the log, not from a snapshot.
        replication_lag_threshold: 1_000_000,
        install_snapshot_timeout: 10_000,
        max_payload_entries: 64,
        ..Default::default()
    };
    config.validate().map_err(|e| Error::Config {
        detail: e.to_string(),
    })
}

/// Why a proposal or a read barrier did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead the group; `leader` does (if known).
    #[error("group {group}: not the leader (leader: {leader:?})")]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The leader, if known.
        leader: Option<NodeId>,
    },
    /// The outcome is unknown (a leader change discarded the entry after it was
    /// proposed); retry with the same client message id.
    #[error("group {group}: outcome unknown: {detail}")]
    Unknown {
        /// The group.
        group: GroupId,
        /// What happened.
        detail: String,
    },
    /// The group cannot serve now (no quorum, stopped, shutting down).
    #[error("group {group}: unavailable: {detail}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// Why.
        detail: String,
    },
}

struct Proposal {
    /// The command, encoded once here (`Command::encode_into`).
    encoded: Vec<u8>,
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
}

/// One local replica of a group.
#[derive(Debug, Clone)]
pub struct Group {
    id: GroupId,
    raft: ChatRaft,
    shared: Arc<GroupShared>,
    reader: LogReader,
    proposals: mpsc::Sender<Proposal>,
}

impl std::fmt::Debug for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proposal({} bytes)", self.encoded.len())
    }
}

impl Group {
    /// The group's id.
    pub fn id(&self) -> GroupId {
        self.id
    }

    /// The openraft handle.
    pub fn raft(&self) -> &ChatRaft {
        &self.raft
    }

    /// The applied state, shared with the state machine.
    pub fn shared(&self) -> &Arc<GroupShared> {
        &self.shared
    }

    /// The leader as this replica knows it.
    pub fn leader(&self) -> Option<NodeId> {
        openraft::async_runtime::WatchReceiver::borrow_watched(&self.raft.metrics()).current_leader
    }

    /// Proposes one command and waits until it is committed and applied here.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        let (tx, rx) = oneshot::channel();
        let mut encoded = Vec::with_capacity(64);
        command.encode_into(&mut encoded);
        let unavailable = |detail: &str| ProposeError::Unavailable {
            group: self.id,
            detail: detail.into(),
        };
        self.proposals
            .send(Proposal { encoded, reply: tx })
            .await
            .map_err(|_| unavailable("the group is stopped"))?;
        rx.await
            .map_err(|_| unavailable("the group stopped before answering"))?
    }

    /// Waits until this replica has applied everything committed before the call, as
    /// confirmed by a quorum (openraft's read index). Only the leader can do this.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::LinearizableReadError::ForwardToLeader(
                f,
            ))) => Err(ProposeError::NotLeader {
                group: self.id,
                leader: f.leader_id,
            }),
            Err(e) => Err(ProposeError::Unavailable {
                group: self.id,
                detail: e.to_string(),
            }),
        }
    }

    /// Reads the commands behind event locations (with the batch timestamp), from the
    /// Raft log. Locations must come from this group's state.
    pub async fn read_commands(
        &self,
        locs: &[(u64, EventLoc)],
    ) -> Result<Vec<(u64, EventLoc, Command, u64)>, Error> {
        let mut out = Vec::with_capacity(locs.len());
        let mut reader = self.reader.clone();
        let mut i = 0;
        while i < locs.len() {
            // One read for a run of consecutive entries.
            let first = locs[i].1.raft_index();
            let mut last = first;
            let mut j = i;
            while j < locs.len()
                && locs[j].1.raft_index() >= first
                && locs[j].1.raft_index() <= last + 1
            {
                last = last.max(locs[j].1.raft_index());
                j += 1;
                if last - first >= 256 {
                    break;
                }
            }
            let entries = reader
                .try_get_log_entries(first..=last)
                .await
                .map_err(|e| Error::Inconsistent {
                    group: self.id,
                    detail: format!("reading log entries {first}..={last} for events: {e}"),
                })?;
            let mut batches: BTreeMap<u64, DecodedBatch> = BTreeMap::new();
            for e in entries {
                if let EntryPayload::Normal(b) = e.payload {
                    let decoded = DecodedBatch::parse(b.0).map_err(|source| Error::Decode {
                        group: self.id,
                        subject: format!("the batch in log entry {}", e.log_id.index),
                        source,
                    })?;
                    batches.insert(e.log_id.index, decoded);
                }
            }
            for (seq, loc) in &locs[i..j] {
                let batch = batches
                    .get(&loc.raft_index())
                    .ok_or_else(|| Error::Inconsistent {
                        group: self.id,
                        detail: format!(
                            "event {seq} points at log entry {}, which this replica does not hold",
                            loc.raft_index()
                        ),
                    })?;
                let cmd = batch.command(loc.pos()).map_err(|source| Error::Decode {
                    group: self.id,
                    subject: format!("command {} of log entry {}", loc.pos(), loc.raft_index()),
                    source,
                })?;
                out.push((*seq, *loc, cmd, batch.timestamp_ms));
            }
            i = j;
        }
        Ok(out)
    }
}

/// The batcher of one group: drains queued proposals into entries and hands them to
/// openraft in order, with at most [`ENTRIES_IN_FLIGHT_MAX`] entries awaiting apply.
async fn run_batcher(group: GroupId, raft: ChatRaft, mut rx: mpsc::Receiver<Proposal>) {
    let in_flight = Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT_MAX));
    while let Some(first) = rx.recv().await {
        let mut bytes = first.encoded.len() + 4;
        let mut batch = vec![first];
        while batch.len() < ENTRY_COMMANDS_MAX && bytes < ENTRY_BYTES_MAX {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.encoded.len() + 4;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let (commands, replies): (Vec<Vec<u8>>, Vec<_>) =
            batch.into_iter().map(|p| (p.encoded, p.reply)).unzip();
        let payload = Batch::encode_encoded(now_ms(), &commands);
        drop(commands);
        let fail = |replies: Vec<oneshot::Sender<Result<Outcome, ProposeError>>>,
                    e: ProposeError| {
            for r in replies {
                let _ = r.send(Err(e.clone()));
            }
        };
        let stream = match raft.client_write_many([ChatBatch(payload)]).await {
            Ok(s) => s,
            Err(fatal) => {
                fail(
                    replies,
                    ProposeError::Unavailable {
                        group,
                        detail: fatal.to_string(),
                    },
                );
                continue;
            }
        };
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut stream = stream;
            let result = stream.next().await;
            drop(permit);
            let err = match result {
                Some(Ok(Ok(resp))) => {
                    let outcomes = resp.response.outcomes;
                    if outcomes.len() == replies.len() {
                        for (r, o) in replies.into_iter().zip(outcomes) {
                            let _ = r.send(Ok(o));
                        }
                        return;
                    }
                    ProposeError::Unknown {
                        group,
                        detail: format!(
                            "entry {} answered {} outcomes for {} commands",
                            resp.log_id.index,
                            outcomes.len(),
                            replies.len()
                        ),
                    }
                }
                Some(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => ProposeError::NotLeader {
                    group,
                    leader: f.leader_id,
                },
                Some(Ok(Err(ClientWriteError::LogEntryDiscarded(f)))) => ProposeError::Unknown {
                    group,
                    detail: format!("the entry was discarded by a leader change ({f})"),
                },
                Some(Ok(Err(e))) => ProposeError::Unavailable {
                    group,
                    detail: e.to_string(),
                },
                Some(Err(fatal)) => ProposeError::Unavailable {
                    group,
                    detail: fatal.to_string(),
                },
                None => ProposeError::Unknown {
                    group,
                    detail: "the write stream ended without a result".into(),
                },
            };
            fail(replies, err);
        });
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The groups of a node as the peer server finds them. Filled while the node starts, so
/// the peer server can run (and answer peers' votes) before every group is built.
#[derive(Debug, Default)]
pub struct GroupRegistry {
    groups: RwLock<BTreeMap<GroupId, ChatRaft>>,
}

impl GroupRegistry {
    fn insert(&self, g: GroupId, raft: ChatRaft) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(g, raft);
    }
}

impl crate::network::GroupDirectory for GroupRegistry {
    fn raft(&self, group: GroupId) -> Option<ChatRaft> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    engine: Arc<Engine>,
    groups: BTreeMap<GroupId, Group>,
}

impl Node {
    /// Opens the engine, builds and starts every local replica, and initializes the
    /// groups this node is first replica of. `network(g)` gives group `g`'s network;
    /// each group is entered in `registry` as soon as it runs.
    pub async fn start<N, F>(
        config: NodeConfig,
        mut network: F,
        registry: Arc<GroupRegistry>,
    ) -> Result<Node, Error>
    where
        N: RaftNetworkFactory<TypeConfig>,
        N::Network: openraft::network::NetSnapshot<
                TypeConfig,
                SnapshotData = crate::state_machine::SnapshotData,
            >,
        F: FnMut(GroupId) -> N,
    {
        let mut engine_config = chatlog_storage::Config::new(&config.data_dir);
        if let Some(s) = config.segment_bytes {
            engine_config.segment_bytes = s;
        }
        let engine = Arc::new(
            Engine::open(engine_config).map_err(|source| Error::Storage {
                group: 0,
                verb: "opening",
                subject: format!("the storage engine in {}", config.data_dir.display()),
                source,
            })?,
        );
        let local: Vec<GroupId> = (0..=config.groups)
            .filter(|g| config.placement(*g).contains(&config.node_id))
            .collect();
        let raft_config = Arc::new(timing(local.len(), config.heartbeat_ms)?);
        let mut groups = BTreeMap::new();
        for (i, g) in local.iter().copied().enumerate() {
            let log_store = LogStore::open(Arc::clone(&engine), g)?;
            let sm = ChatStateMachine::open(Arc::clone(&engine), g, config.sm)?;
            let shared = sm.shared();
            let mut ls = log_store;
            let reader = openraft::storage::RaftLogStorage::get_log_reader(&mut ls).await;
            let raft =
                openraft::Raft::new(config.node_id, Arc::clone(&raft_config), network(g), ls, sm)
                    .await
                    .map_err(|e| Error::Inconsistent {
                        group: g,
                        detail: format!("starting the Raft group: {e}"),
                    })?;
            registry.insert(g, raft.clone());
            let (tx, rx) = mpsc::channel(PROPOSE_QUEUE_MAX);
            tokio::spawn(run_batcher(g, raft.clone(), rx));
            groups.insert(
                g,
                Group {
                    id: g,
                    raft,
                    shared,
                    reader,
                    proposals: tx,
                },
            );
            if (i + 1) % START_WAVE_GROUPS == 0 {
                // Stagger: groups started together would time out together.
                tokio::time::sleep(Duration::from_millis(raft_config.heartbeat_interval / 4)).await;
            }
        }
        let node = Node {
            config,
            engine,
            groups,
        };
        node.initialize().await?;
        Ok(node)
    }

    async fn initialize(&self) -> Result<(), Error> {
        for (g, group) in &self.groups {
            let placement = self.config.placement(*g);
            if placement.first() != Some(&self.config.node_id) {
                continue;
            }
            let initialized =
                group
                    .raft
                    .is_initialized()
                    .await
                    .map_err(|e| Error::Inconsistent {
                        group: *g,
                        detail: format!("checking initialization: {e}"),
                    })?;
            if initialized {
                continue;
            }
            let members: BTreeSet<NodeId> = placement.into_iter().collect();
            match group.raft.initialize(members).await {
                Ok(()) => {}
                Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                Err(e) => {
                    return Err(Error::Inconsistent {
                        group: *g,
                        detail: format!("initializing: {e}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// The configuration the node started with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The storage engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The local replica of group `g`.
    pub fn group(&self, g: GroupId) -> Option<&Group> {
        self.groups.get(&g)
    }

    /// Every local replica.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// Waits until every local group has a leader, or `timeout` passes.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> Result<(), Error> {
        for (g, group) in &self.groups {
            group
                .raft
                .wait(Some(timeout))
                .metrics(|m| m.current_leader.is_some(), "a leader")
                .await
                .map_err(|e| Error::Inconsistent {
                    group: *g,
                    detail: format!("no leader: {e}"),
                })?;
        }
        Ok(())
    }

    /// Stops every group, then closes the engine (flushing what is queued).
    pub async fn shutdown(self) -> Result<(), Error> {
        let Node { engine, groups, .. } = self;
        for (g, group) in groups {
            if let Err(e) = group.raft.shutdown().await {
                tracing::warn!(group = g, error = %e, "group did not shut down cleanly");
            }
        }
        // Raft tasks drop their stores as they finish; give them a moment, then let the
        // last handle close the engine.
        for _ in 0..100 {
            if Arc::strong_count(&engine) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match Arc::try_unwrap(engine) {
            Ok(engine) => engine.close().map_err(|source| Error::Storage {
                group: 0,
                verb: "closing",
                subject: "the storage engine".into(),
                source,
            }),
            // Still referenced by a task that has not finished: its drop flushes.
            Err(_) => Ok(()),
        }
    }
}

/// The network of a node with no peers (replication factor 1): every RPC is refused as
/// unreachable. Openraft sends none while the membership holds only this node.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPeers;

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: NodeId, _node: &crate::types::Node) -> NoPeers {
        NoPeers
    }
}

fn no_peer() -> openraft::error::Unreachable<TypeConfig> {
    openraft::error::Unreachable::new(&std::io::Error::other("this node runs without peers"))
}

impl openraft::network::v2::RaftNetworkV2<TypeConfig> for NoPeers {
    type SnapshotData = crate::state_machine::SnapshotData;

    async fn append_entries(
        &mut self,
        _rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::AppendEntriesResponse<TypeConfig>,
        openraft::error::RPCError<TypeConfig>,
    > {
        Err(openraft::error::RPCError::Unreachable(no_peer()))
    }

    async fn vote(
        &mut self,
        _rpc: openraft::raft::VoteRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<openraft::raft::VoteResponse<TypeConfig>, openraft::error::RPCError<TypeConfig>>
    {
        Err(openraft::error::RPCError::Unreachable(no_peer()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: crate::types::Vote,
        _snapshot: crate::types::Snapshot<Self::SnapshotData>,
        _cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed>
        + openraft::OptionalSend
        + 'static,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::SnapshotResponse<TypeConfig>,
        openraft::error::StreamingError<TypeConfig>,
    > {
        Err(openraft::error::StreamingError::Unreachable(no_peer()))
    }
}
