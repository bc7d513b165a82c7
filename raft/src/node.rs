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
//! Groups. Group 0 is the controller: its state is the cluster placement
//! (`chat::placement`: members, each group's replicas, moves in progress), and every
//! node runs a replica of it (voter or learner). Chat groups are `1..=groups` at first
//! and more can be added. Before group 0 holds a placement, the static one stands:
//! group `g`'s replicas are `replicas` consecutive nodes of the sorted member list
//! starting at `g mod nodes`, so each node holds about `groups × replicas / nodes`
//! replicas and each leads about a third; the controller bootstraps group 0's placement
//! from it. Local replicas start and stop while the node runs ([`Node::start_group`],
//! [`Node::drop_group`], driven by `crate::controller`); a group is initialized only by
//! the first replica of a group never moved, so a replica that moved away and came back
//! (or a node that joined) learns the group from the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chatlog_storage::Engine;
use openraft::error::{ClientWriteError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::{Config, ReadPolicy, SnapshotPolicy};
use tokio::sync::Semaphore;

use crate::chat::placement::Placement;
use crate::chat::{Batch, Command, DecodedBatch, EventLoc, Outcome};
use crate::log_store::{LogReader, LogStore};
use crate::network::{ForwardError, Router};
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
/// Entries of one group proposed and not yet applied, at most. Two: one being made
/// durable and applied while the next collects proposals. More in flight means fewer
/// commands per entry, and openraft's cost is per entry: with 64, 2,048 posts in flight
/// over 16 groups packed 2.3 posts per entry and ran at ~180,000 posts/s; with 2 they
/// pack ~40 per entry and ran at ~180,000–320,000 posts/s on the same (noisy) machine
/// (`raft/benches/raft_figures.rs` prints the ratio).
pub const ENTRIES_IN_FLIGHT_MAX: usize = 2;
/// Entries of one group in flight beyond [`ENTRIES_IN_FLIGHT_MAX`], at most, each used
/// only by an entry whose first command has waited [`ENTRY_WAIT_EXTRA`] already (session
/// 8, issue 3's half-load p99). Why: with two slots a post at half load waits for one of
/// them, up to a whole entry lifetime (propose → durable → applied), before its own entry
/// even starts: ~6–8 ms at p99 on the 2-vCPU host. A slot that opens only after a wait
/// leaves a busy group's entries as large as before (a full-load entry fills well within
/// the wait) but caps a calm group's queueing at the wait.
pub const ENTRIES_IN_FLIGHT_EXTRA_MAX: usize = 2;
/// How long an entry's first command waits for one of the [`ENTRIES_IN_FLIGHT_MAX`]
/// slots before the entry may take one of the [`ENTRIES_IN_FLIGHT_EXTRA_MAX`] ones.
pub const ENTRY_WAIT_EXTRA: Duration = Duration::from_millis(1);
/// Commands in the group's in-flight entries above which no extra slot is taken however
/// long the entry waited. Why: a group at full load (every slot carrying ~40–50 posts)
/// would otherwise always wait past [`ENTRY_WAIT_EXTRA`] and spread the same posts over
/// twice the entries, and the core's cost is per entry (R3 fell from ~48 to ~33 posts
/// per entry with the extra slots ungated, session 8); a calm group (half load: ~15–35
/// posts in flight) gets them.
pub const EXTRA_SLOT_IN_FLIGHT_COMMANDS_MAX: usize = 64;
/// Groups started per wave at startup.
const START_WAVE_GROUPS: usize = 32;
/// Longest one forwarded proposal or read index may take, per hop. Under the client's
/// default request timeout (10 s) so the client hears a typed error, not its own timeout;
/// long enough for an election (at most 8 heartbeats of at most 1 s).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(8);
/// Leader hints a proposal follows before giving up (each hop means the leader moved
/// while the request travelled; more than a few means an election storm).
pub const FORWARD_HOPS_MAX: usize = 3;
/// Forwarded requests in flight from one node at once; further ones wait (at most
/// [`FORWARD_TIMEOUT`]). Leaves most of a peer's per-connection request budget
/// (`network::REQUESTS_IN_FLIGHT_MAX`, 4096) to Raft's own messages.
pub const FORWARDS_IN_FLIGHT_MAX: usize = 1024;

/// Most groups whose leader a node remembers from other nodes' answers
/// ([`Node::note_leader`]). Why: one entry per group of the placement, which has far
/// fewer; the bound only keeps a placement that keeps changing from growing the map.
pub const LEADER_HINTS_MAX: usize = 65_536;
/// Longest a follower waits to apply the leader's read index before a read fails as
/// unavailable (it is a heartbeat behind normally; a follower catching up may take longer).
pub const READ_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// How the engine writes (`chatlog_storage::IoMode`): io_uring when the kernel
    /// allows it (`Auto`, the default), or forced either way.
    pub io_mode: chatlog_storage::IoMode,
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
            io_mode: chatlog_storage::IoMode::Auto,
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
        // Issue 9 (replica divergence): openraft's default lets a leader that restarts
        // resume leading in the SAME term without an election. Our leader replicates an
        // entry from its unflushed tail in parallel with its own fdatasync, so followers
        // can hold (even commit) an entry the leader itself never wrote; after a kill -9
        // the restored leader's log is shorter, it proposes
        // a different entry at the same index under the same log id (term, node, index),
        // followers see no conflict and keep theirs: two committed entries with one log
        // id. A restarted leader must win a new election (a new leader id) instead.
        enable_leader_restore: Some(false),
        // Issue 9: a replica whose recovery cut a damaged record comes back with a shorter
        // log than the leader last matched; the leader must send it again (the replica
        // takes no part in elections meanwhile, `crate::repair`) instead of asserting.
        allow_log_reversion: Some(true),
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

/// One local replica of a group: a handle, cloned with one reference count (every
/// request looks its group up, some more than once, and a clone per lookup of each
/// part's own `Arc` was a dozen atomic updates on lines both cores share).
#[derive(Debug, Clone)]
pub struct Group(Arc<GroupParts>);

impl std::ops::Deref for Group {
    type Target = GroupParts;

    fn deref(&self) -> &GroupParts {
        &self.0
    }
}

/// What a [`Group`] handle holds; reached only through the handle's methods.
#[doc(hidden)]
#[derive(Debug)]
pub struct GroupParts {
    id: GroupId,
    node_id: NodeId,
    engine: Arc<Engine>,
    raft: ChatRaft,
    shared: Arc<GroupShared>,
    reader: LogReader,
    /// Where proposals wait for the batcher (`crate::proposer`).
    proposals: Arc<crate::proposer::QueueHandle>,
    /// The last secret erasure this replica's eraser handled (`secret_log`).
    secret_erased: Arc<std::sync::atomic::AtomicU64>,
    /// The eraser task, stopped at shutdown (it holds the engine).
    secret_eraser: Arc<tokio::task::AbortHandle>,
    /// The retention task (`crate::retention`), stopped at shutdown (it holds the log).
    retention: Arc<tokio::task::AbortHandle>,
    /// Propose-to-applied latency of each entry this replica's batcher proposed as
    /// leader (issue 7's per-group commit latency; recorded once per entry).
    commit_latency: Arc<chatlog_storage::Histogram>,
    /// Issue 9: damaged and repairing, or sound (`crate::repair`).
    repair: Arc<crate::repair::RepairStatus>,
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

    /// A reader of the group's Raft log (entries durable or not), for secret chats.
    pub fn log_reader(&self) -> &LogReader {
        &self.reader
    }

    /// True when this replica's eraser has zeroed every secret message the applied
    /// state erased so far (`secret_log`).
    pub fn secret_erasures_settled(&self) -> bool {
        self.secret_erased
            .load(std::sync::atomic::Ordering::Acquire)
            >= self.shared.read().secret().erasures_total()
    }

    /// Propose-to-applied latency of the entries proposed through this replica (as
    /// leader), one observation per entry.
    pub fn commit_latency(&self) -> &chatlog_storage::Histogram {
        &self.commit_latency
    }

    /// Per entry, how long its first command queued before the batcher took it (the
    /// part of a post's latency before `commit_latency`).
    pub fn queue_latency(&self) -> &chatlog_storage::Histogram {
        self.proposals.0.wait_latency()
    }

    // ---- ops metrics (issue 7) ----
    /// An estimate of this replica's bytes on disk: the live share of segment bytes of
    /// the group's engine logs (Raft log, checkpoints, snapshot staging), see
    /// `Engine::log_disk_bytes` for how it is estimated.
    pub fn disk_bytes_estimate(&self) -> u64 {
        self.engine.log_disk_bytes(&crate::ids::group_logs(self.id))
    }

    /// Proposals queued for the batcher now (at most `PROPOSE_QUEUE_MAX`).
    pub fn proposal_queue_len(&self) -> usize {
        self.proposals.0.queued()
    }
    // ---- end ops metrics ----

    /// Issue 9: whether this replica's log is damaged and still repairing (no votes, no
    /// campaigning, no reads), and why.
    pub fn repair_status(&self) -> &Arc<crate::repair::RepairStatus> {
        &self.repair
    }

    /// The leader as this replica knows it.
    pub fn leader(&self) -> Option<NodeId> {
        openraft::async_runtime::WatchReceiver::borrow_watched(&self.raft.metrics()).current_leader
    }

    /// Proposes one command and waits until it is committed and applied here.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        self.propose_indexed(command).await.map(|(o, _)| o)
    }

    /// [`Group::propose`], also returning the Raft index of the entry that carried the
    /// command (a replica that has applied it sees the command's effect).
    pub async fn propose_indexed(&self, command: Command) -> Result<(Outcome, u64), ProposeError> {
        self.propose_command(&command).await
    }

    /// [`Group::propose_indexed`] of a borrowed command (it is encoded into the entry
    /// where it queues, so the caller's value need not be cloned or given up).
    pub async fn propose_command(&self, command: &Command) -> Result<(Outcome, u64), ProposeError> {
        self.proposals
            .0
            .propose(command)
            .await
            .map_err(|e| self.with_storage_cause(e))
    }

    /// An `Unavailable` error names the storage failure when the node's engine stopped
    /// (a full disk, a failed fsync): openraft reports only "raft stopped", which tells
    /// an operator nothing.
    fn with_storage_cause(&self, e: ProposeError) -> ProposeError {
        match (e, self.engine.stopped()) {
            (ProposeError::Unavailable { group, .. }, Some(cause)) => ProposeError::Unavailable {
                group,
                detail: format!("node {}: {cause}", self.node_id),
            },
            (e, _) => e,
        }
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
            Err(e) => Err(self.with_storage_cause(ProposeError::Unavailable {
                group: self.id,
                detail: e.to_string(),
            })),
        }
    }

    /// Reads the commands behind event locations (with the batch timestamp), from the
    /// Raft log. Locations must come from this group's state.
    pub async fn read_commands(
        &self,
        locs: &[(u64, EventLoc)],
    ) -> Result<Vec<(u64, EventLoc, Command, u64)>, Error> {
        let mut out = Vec::with_capacity(locs.len());
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
            // History reads see what retention keeps below openraft's purge mark too.
            // Damage keeps its type (`Error::is_damage`: the gateway answers UNAVAILABLE).
            let entries = self
                .reader
                .read_history(first, last + 1)
                .map_err(|e| match e {
                    e if e.is_damage() => e,
                    e => Error::Inconsistent {
                        group: self.id,
                        detail: format!("reading log entries {first}..={last} for events: {e}"),
                    },
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
            // Read after the log read (see below); one look at the state per run.
            let state = self.shared.read();
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
                // A message deleted after the caller took its location may have been
                // zeroed by the eraser before this read: the state, checked after the
                // read, says so (the eraser zeroes only what the state erased).
                let mut loc = *loc;
                if !loc.erased()
                    && matches!(cmd, Command::Post { .. } | Command::Edit { .. })
                    && cmd
                        .chat()
                        .is_some_and(|chat| state.event_erased(chat, *seq))
                {
                    loc.erase();
                }
                out.push((*seq, loc, cmd, batch.timestamp_ms));
            }
            i = j;
        }
        Ok(out)
    }
}

/// The batcher of one group: takes the queued entries (`crate::proposer`) and hands
/// them to openraft in order, with at most [`ENTRIES_IN_FLIGHT_MAX`] entries awaiting
/// apply, plus up to [`ENTRIES_IN_FLIGHT_EXTRA_MAX`] more for an entry whose first
/// command has waited [`ENTRY_WAIT_EXTRA`]. An entry is taken only once an in-flight
/// permit is free, so commands arriving meanwhile still join it.
async fn run_batcher(
    group: GroupId,
    raft: ChatRaft,
    shared: Arc<GroupShared>,
    queue: Arc<crate::proposer::ProposalQueue>,
    commit_latency: Arc<chatlog_storage::Histogram>,
) {
    let (extra_slots, extra_wait) = pipeline();
    let in_flight = Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT_MAX));
    let extra = Arc::new(Semaphore::new(extra_slots));
    // Commands in the entries in flight (`EXTRA_SLOT_IN_FLIGHT_COMMANDS_MAX`).
    let commands_in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let Some(opened) = queue.first_opened().await else {
            return;
        };
        let calm = || {
            commands_in_flight.load(std::sync::atomic::Ordering::Relaxed)
                <= EXTRA_SLOT_IN_FLIGHT_COMMANDS_MAX
        };
        let Some(permit) = entry_permit(&in_flight, &extra, opened + extra_wait, calm).await else {
            return;
        };
        let Some(mut entry) = queue.next_entry().await else {
            return;
        };
        let n = entry.len();
        commands_in_flight.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let in_flight_count = Arc::clone(&commands_in_flight);
        let payload = entry.seal(shared.clock().next());
        let proposed = std::time::Instant::now();
        let stream = match raft.client_write_many([ChatBatch(payload)]).await {
            Ok(s) => s,
            Err(fatal) => {
                commands_in_flight.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
                entry.answer(Err(ProposeError::Unavailable {
                    group,
                    detail: fatal.to_string(),
                }));
                continue;
            }
        };
        chatlog_storage::timeline::record(
            chatlog_storage::timeline::Event::Proposed,
            group,
            n as u64,
        );
        let commit_latency = Arc::clone(&commit_latency);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut stream = stream;
            let result = stream.next().await;
            in_flight_count.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
            let result = write_outcomes(group, result, n);
            if let Ok((_, index)) = &result {
                commit_latency.record(proposed.elapsed());
                chatlog_storage::timeline::record(
                    chatlog_storage::timeline::Event::Answered,
                    group,
                    *index,
                );
            }
            entry.answer(result);
        });
    }
}

/// An in-flight permit for the entry at the head of the queue: one of `base` as soon as
/// one is free; from `extra_at` on, if `calm()` says so then, one of `extra` too
/// (whichever frees first). `None` when a semaphore was closed (never: they live as long
/// as the batcher).
async fn entry_permit(
    base: &Arc<Semaphore>,
    extra: &Arc<Semaphore>,
    extra_at: tokio::time::Instant,
    calm: impl Fn() -> bool,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(p) = Arc::clone(base).try_acquire_owned() {
        return Some(p);
    }
    let from_base = Arc::clone(base).acquire_owned();
    tokio::pin!(from_base);
    tokio::select! {
        biased;
        p = &mut from_base => return p.ok(),
        _ = tokio::time::sleep_until(extra_at) => {}
    }
    if !calm() {
        return from_base.await.ok();
    }
    tokio::select! {
        biased;
        p = &mut from_base => p.ok(),
        p = Arc::clone(extra).acquire_owned() => p.ok(),
    }
}

/// The pipeline's extra slots and wait: [`ENTRIES_IN_FLIGHT_EXTRA_MAX`] and
/// [`ENTRY_WAIT_EXTRA`] unless [`set_pipeline`] changed them.
fn pipeline() -> (usize, Duration) {
    use std::sync::atomic::Ordering;
    match PIPELINE_OVERRIDE.load(Ordering::Relaxed) {
        0 => (ENTRIES_IN_FLIGHT_EXTRA_MAX, ENTRY_WAIT_EXTRA),
        v => (
            ((v >> 32) & 0x7fff_ffff) as usize,
            Duration::from_micros(v & 0xffff_ffff),
        ),
    }
}

/// [`set_pipeline`]'s value: extra slots in the high 32 bits, the wait (µs) in the low;
/// 0 means the defaults.
static PIPELINE_OVERRIDE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the extra in-flight slots per group and the wait before an entry may use one
/// for batchers started from now on, in place of [`ENTRIES_IN_FLIGHT_EXTRA_MAX`] and
/// [`ENTRY_WAIT_EXTRA`] (benchmarks: `raft_figures`' `CHATLOG_RAFT_EXTRA_SLOTS` and
/// `CHATLOG_RAFT_EXTRA_WAIT_US`). The slots are capped at 64, the wait at 1 s.
pub fn set_pipeline(extra_slots: usize, wait: Duration) {
    let slots = extra_slots.min(64) as u64;
    let us = wait.min(Duration::from_secs(1)).as_micros() as u64;
    PIPELINE_OVERRIDE.store(
        (slots << 32) | us | (1 << 63),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The outcomes of one proposed entry of `n` commands and the entry's index, from the
/// first item of `client_write_many`'s stream.
fn write_outcomes(
    group: GroupId,
    result: Option<
        Result<openraft::raft::WriteResult<TypeConfig>, openraft::error::Fatal<TypeConfig>>,
    >,
    n: usize,
) -> Result<(Vec<Outcome>, u64), ProposeError> {
    Err(match result {
        Some(Ok(Ok(resp))) => {
            let outcomes = resp.response.outcomes;
            if outcomes.len() == n {
                return Ok((outcomes, resp.log_id.index));
            }
            ProposeError::Unknown {
                group,
                detail: format!(
                    "entry {} answered {} outcomes for {n} commands",
                    resp.log_id.index,
                    outcomes.len(),
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
    })
}

/// Proposes `commands` in `group` as one entry of their own, bypassing any batcher: for
/// a peer server whose group directory has no batcher (tests). Commands beyond
/// [`ENTRY_COMMANDS_MAX`] are answered `Unavailable`. Returns one result per command
/// and the entry's Raft index (0 if none was committed).
pub async fn propose_unbatched(
    group: GroupId,
    raft: ChatRaft,
    commands: Vec<Command>,
) -> (Vec<Result<Outcome, ProposeError>>, u64) {
    use futures_util::StreamExt;
    let n = commands.len();
    let all = |e: ProposeError| (vec![Err(e); n], 0);
    if n > ENTRY_COMMANDS_MAX {
        return all(ProposeError::Unavailable {
            group,
            detail: format!("{n} commands, more than one entry's {ENTRY_COMMANDS_MAX}"),
        });
    }
    // No group clock here (a peer server without a batcher, in tests): the smoothed
    // process clock still never goes back or jumps ahead.
    let payload = Batch {
        timestamp_ms: crate::clock::now_ms(),
        commands,
    }
    .encode();
    let mut stream = match raft.client_write_many([ChatBatch(payload)]).await {
        Ok(s) => s,
        Err(fatal) => {
            return all(ProposeError::Unavailable {
                group,
                detail: fatal.to_string(),
            });
        }
    };
    match write_outcomes(group, stream.next().await, n) {
        Ok((outcomes, index)) => (outcomes.into_iter().map(Ok).collect(), index),
        Err(e) => all(e),
    }
}

/// Confirms this replica leads `group` (openraft's ReadIndex: a heartbeat round to a
/// quorum) and returns the log index a linearizable read must wait for, on any replica.
/// Does not wait for this replica to apply it.
pub async fn read_index(group: GroupId, raft: &ChatRaft) -> Result<u64, ProposeError> {
    match raft.get_read_linearizer(ReadPolicy::ReadIndex).await {
        Ok(linearizer) => Ok(linearizer.read_log_id().index()),
        Err(RaftError::APIError(openraft::error::LinearizableReadError::ForwardToLeader(f))) => {
            Err(ProposeError::NotLeader {
                group,
                leader: f.leader_id,
            })
        }
        Err(e) => Err(ProposeError::Unavailable {
            group,
            detail: e.to_string(),
        }),
    }
}

/// Logs (at info) each time this replica of `group` becomes leader, with its term: the
/// operator's (and the cluster tests') record of where leadership is. Ends with the group.
async fn log_leadership(
    group: GroupId,
    node: NodeId,
    mut metrics: openraft::type_config::alias::WatchReceiverOf<
        TypeConfig,
        openraft::metrics::RaftServerMetrics<TypeConfig>,
    >,
) {
    use openraft::async_runtime::WatchReceiver;
    let mut leading = false;
    loop {
        let (now_leading, term) = {
            let m = metrics.borrow_watched();
            (
                m.state == openraft::ServerState::Leader,
                m.vote.leader_id.term,
            )
        };
        if now_leading && !leading {
            tracing::info!(group, node, term, "leadership: this node leads the group");
        }
        leading = now_leading;
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The groups of a node as the peer server finds them. Filled while the node starts, so
/// the peer server can run (and answer peers' votes) before every group is built.
#[derive(Debug, Default)]
pub struct GroupRegistry {
    groups: RwLock<BTreeMap<GroupId, Group>>,
}

impl GroupRegistry {
    fn insert(&self, group: Group) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.id, group);
    }

    fn remove(&self, g: GroupId) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&g);
    }

    fn group(&self, g: GroupId) -> Option<Group> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&g)
            .cloned()
    }
}

impl crate::network::GroupDirectory for GroupRegistry {
    fn raft(&self, group: GroupId) -> Option<ChatRaft> {
        self.group(group).map(|g| g.raft.clone())
    }

    fn vote_refusal(&self, group: GroupId) -> Option<String> {
        let damage = self.group(group)?.repair.damage()?;
        Some(format!(
            "refusing to vote: {damage}; repairing from the leader"
        ))
    }

    fn append_refusal(&self, group: GroupId) -> Option<String> {
        let g = self.group(group)?;
        g.repair.is_vote_unknown().then(|| {
            format!(
                "refusing appends and probes: group {group}: vote unknown, probing every voter \
                 first"
            )
        })
    }

    /// Forwarded commands go through the group's batcher, like local clients' commands.
    fn propose(
        &self,
        group: GroupId,
        raft: ChatRaft,
        commands: Vec<Command>,
    ) -> futures_util::future::BoxFuture<'static, (Vec<Result<Outcome, ProposeError>>, u64)> {
        match self.group(group) {
            Some(g) => Box::pin(async move {
                let proposals: Vec<_> =
                    commands.into_iter().map(|c| g.propose_indexed(c)).collect();
                let mut index = 0;
                let results = futures_util::future::join_all(proposals)
                    .await
                    .into_iter()
                    .map(|r| {
                        r.map(|(o, i)| {
                            index = index.max(i);
                            o
                        })
                    })
                    .collect();
                (results, index)
            }),
            None => Box::pin(propose_unbatched(group, raft, commands)),
        }
    }
}

/// Builds one local replica of a group (the network factory and Raft configuration the
/// node started with, captured once).
type GroupBuilder = Arc<
    dyn Fn(GroupId) -> futures_util::future::BoxFuture<'static, Result<Group, Error>> + Send + Sync,
>;

/// A running node.
pub struct Node {
    config: NodeConfig,
    engine: Arc<Engine>,
    /// Every local replica. Changes when the placement does (`crate::controller`).
    groups: RwLock<BTreeMap<GroupId, Group>>,
    /// The peer server's view of the local replicas.
    registry: Arc<GroupRegistry>,
    /// Builds a new local replica.
    build: GroupBuilder,
    /// Where forwarded proposals and read indexes go; `None` alone (nothing to forward).
    router: Option<Router>,
    /// Forwarded requests in flight from this node ([`FORWARDS_IN_FLIGHT_MAX`]).
    forwards: Arc<Semaphore>,
    /// The leader last reported for groups without a replica here (a forwarded
    /// request's answer names it: [`Node::note_leader`]), tried first by
    /// [`Node::forward_targets`]. At most one entry per group of the placement.
    leader_hints: std::sync::Mutex<HashMap<GroupId, NodeId>>,
    /// [`Node::read_barriers`].
    read_barriers: std::sync::atomic::AtomicU64,
    /// The placement as group 0 last applied it here; before the controller bootstraps
    /// it, the one computed from the static flags (version 0).
    placement: RwLock<Arc<Placement>>,
    /// `placement`'s count of chat groups, kept with it: every request checks its id
    /// against it, and counting the placement's groups per request costs O(groups).
    chat_groups: std::sync::atomic::AtomicU64,
    /// Peer addresses of the initial members (the bootstrap placement records them).
    member_addrs: BTreeMap<NodeId, String>,
    /// Bumped each time a local replica starts or stops (the fan-out hub and the HTTP
    /// port watch it to follow new groups).
    local_changes: tokio::sync::watch::Sender<u64>,
    /// One start or stop of a local replica at a time.
    changing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.config.node_id)
            .field("groups", &self.read_groups().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Builds and starts one local replica of group `g` and enters it in `registry`.
async fn build_group<N>(
    engine: Arc<Engine>,
    g: GroupId,
    node_id: NodeId,
    raft_config: Arc<Config>,
    sm_config: SmConfig,
    network: N,
    registry: Arc<GroupRegistry>,
) -> Result<Group, Error>
where
    N: RaftNetworkFactory<TypeConfig>,
    N::Network: openraft::network::NetSnapshot<
            TypeConfig,
            SnapshotData = crate::state_machine::SnapshotData,
        >,
{
    // A snapshot install a crash interrupted is finished before anything reads the log
    // or the checkpoint (`snapshot_stream`: never a checkpoint without its history).
    crate::snapshot_stream::finish_interrupted_install(&engine, g).await?;
    let log_store = LogStore::open(Arc::clone(&engine), g)?;
    log_store.persist_recovered_state().await?;
    let repair = log_store.repair_status();
    let mut ls = log_store;
    let reader = openraft::storage::RaftLogStorage::get_log_reader(&mut ls).await;
    let sm = ChatStateMachine::open(Arc::clone(&engine), g, sm_config)?.with_log(reader.clone());
    let shared = sm.shared();
    let raft = openraft::Raft::new(node_id, raft_config, network, ls, sm)
        .await
        .map_err(|e| Error::Inconsistent {
            group: g,
            detail: format!("starting the Raft group: {e}"),
        })?;
    let queue = Arc::new(crate::proposer::ProposalQueue::new(g));
    let commit_latency = Arc::new(chatlog_storage::Histogram::default());
    tokio::spawn(run_batcher(
        g,
        raft.clone(),
        Arc::clone(&shared),
        Arc::clone(&queue),
        Arc::clone(&commit_latency),
    ));
    tokio::spawn(log_leadership(g, node_id, raft.server_metrics()));
    // Issue 9: no campaigning until the leader has sent back what the log lost.
    crate::repair::hold_elections_while_repairing(&raft, &repair);
    let secret_erased = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let secret_eraser = Arc::new(
        tokio::spawn(crate::secret_log::run_eraser(
            g,
            Arc::clone(&engine),
            Arc::clone(&shared),
            Arc::clone(&secret_erased),
        ))
        .abort_handle(),
    );
    let retention = Arc::new(
        tokio::spawn(crate::retention::run(
            g,
            sm_config.retention,
            raft.clone(),
            Arc::clone(&shared),
            reader.clone(),
            Arc::clone(&secret_erased),
            Arc::clone(&queue),
        ))
        .abort_handle(),
    );
    let group = Group(Arc::new(GroupParts {
        id: g,
        node_id,
        engine,
        raft,
        shared,
        reader,
        proposals: Arc::new(crate::proposer::QueueHandle(queue)),
        secret_erased,
        secret_eraser,
        retention,
        commit_latency,
        repair,
    }));
    registry.insert(group.clone());
    Ok(group)
}

/// The placement the static flags describe (version 0: not bootstrapped): what a node
/// runs until group 0 holds the replicated one, and what the controller bootstraps it
/// from.
pub fn static_placement(config: &NodeConfig, addrs: &BTreeMap<NodeId, String>) -> Placement {
    use crate::chat::placement::{GroupPlacement, Member};
    Placement {
        version: 0,
        replication: config.replicas.clamp(1, config.members.len().max(1)) as u64,
        user_groups: config.groups,
        members: config
            .members
            .iter()
            .map(|n| {
                (
                    *n,
                    Member {
                        addr: addrs.get(n).cloned().unwrap_or_default(),
                        draining: false,
                    },
                )
            })
            .collect(),
        groups: (0..=config.groups)
            .map(|g| {
                (
                    g,
                    GroupPlacement {
                        replicas: config.placement(g),
                        epoch: 0,
                    },
                )
            })
            .collect(),
        moves: BTreeMap::new(),
        leader_transfers: BTreeMap::new(),
    }
}

impl Node {
    /// Opens the engine, starts the controller group 0, then every replica the placement
    /// gives this node (group 0's applied placement if it has one, else the static
    /// flags'), and initializes the groups this node is first replica of (never-moved
    /// groups only). `network(g)` gives group `g`'s network (kept, for groups started
    /// later); each group is entered in `registry` as soon as it runs.
    pub async fn start<N, F>(
        config: NodeConfig,
        network: F,
        registry: Arc<GroupRegistry>,
    ) -> Result<Node, Error>
    where
        N: RaftNetworkFactory<TypeConfig> + Send + 'static,
        N::Network: openraft::network::NetSnapshot<
                TypeConfig,
                SnapshotData = crate::state_machine::SnapshotData,
            >,
        F: FnMut(GroupId) -> N + Send + 'static,
    {
        Node::start_with(config, network, registry, None, BTreeMap::new()).await
    }

    /// [`Node::start`] for a cluster member: `router` forwards proposals and read indexes
    /// to peers (the router whose network factories the groups use; without one a node
    /// answers `NotLeader` for groups it does not lead), and `addrs` are the initial
    /// members' peer addresses (recorded by the bootstrap placement).
    pub async fn start_with<N, F>(
        config: NodeConfig,
        network: F,
        registry: Arc<GroupRegistry>,
        router: Option<Router>,
        addrs: BTreeMap<NodeId, String>,
    ) -> Result<Node, Error>
    where
        N: RaftNetworkFactory<TypeConfig> + Send + 'static,
        N::Network: openraft::network::NetSnapshot<
                TypeConfig,
                SnapshotData = crate::state_machine::SnapshotData,
            >,
        F: FnMut(GroupId) -> N + Send + 'static,
    {
        let mut engine_config = chatlog_storage::Config::new(&config.data_dir);
        if let Some(s) = config.segment_bytes {
            engine_config.segment_bytes = s;
        }
        engine_config.io_mode = config.io_mode;
        // The groups' appends trickle in: let a group commit take in what queued during
        // the flight before it (session 11, `Config::top_up_groups`).
        engine_config.top_up_groups = true;
        // Issue 9: damage is cut and repaired from peers (`crate::repair`,
        // `crate::damage_watch`) instead of stopping the node. Without peers to repair
        // from (one replica per group) the open still refuses it, naming file and offset.
        let has_peers = config.replicas > 1
            && (config.members.len() > 1 || !config.members.contains(&config.node_id));
        if has_peers {
            engine_config.recovery_mode = chatlog_storage::RecoveryMode::CutDamagedTail;
        }
        let engine = Arc::new(
            Engine::open(engine_config).map_err(|source| Error::Storage {
                group: 0,
                verb: "opening",
                subject: format!("the storage engine in {}", config.data_dir.display()),
                source,
            })?,
        );
        let static_local = if config.members.contains(&config.node_id) {
            (0..=config.groups)
                .filter(|g| config.placement(*g).contains(&config.node_id))
                .count()
        } else {
            // A joining node: time its groups like a member holding its share, so its
            // election timeouts match the heartbeats of the nodes it replicates with.
            (config.groups as usize + 1) * config.replicas / (config.members.len() + 1)
        };
        let raft_config = Arc::new(timing(static_local.max(1), config.heartbeat_ms)?);
        let stagger = Duration::from_millis(raft_config.heartbeat_interval / 4);
        let network = Arc::new(std::sync::Mutex::new(network));
        let build: GroupBuilder = {
            let engine = Arc::clone(&engine);
            let registry = Arc::clone(&registry);
            let node_id = config.node_id;
            let sm = config.sm;
            Arc::new(move |g| {
                let n = (network.lock().unwrap_or_else(|p| p.into_inner()))(g);
                Box::pin(build_group(
                    Arc::clone(&engine),
                    g,
                    node_id,
                    Arc::clone(&raft_config),
                    sm,
                    n,
                    Arc::clone(&registry),
                ))
            })
        };
        let placement = static_placement(&config, &addrs);
        let node = Node {
            config,
            engine,
            groups: RwLock::new(BTreeMap::new()),
            registry,
            build,
            router,
            forwards: Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT_MAX)),
            leader_hints: std::sync::Mutex::new(HashMap::new()),
            read_barriers: std::sync::atomic::AtomicU64::new(0),
            chat_groups: std::sync::atomic::AtomicU64::new(placement.chat_groups()),
            placement: RwLock::new(Arc::new(placement)),
            member_addrs: addrs,
            local_changes: tokio::sync::watch::channel(0).0,
            changing: tokio::sync::Mutex::new(()),
        };
        // The controller first: its applied state says which replicas this node holds.
        node.start_group(0).await?;
        let applied = node
            .group(0)
            .map(|g| g.shared().read().placement().clone())
            .unwrap_or_default();
        if applied.is_bootstrapped() {
            node.set_placement(applied);
        }
        let placement = node.placement();
        let me = node.config.node_id;
        let local: Vec<GroupId> = placement
            .groups
            .keys()
            .copied()
            .filter(|g| *g != 0 && placement.hosts(me, *g))
            .collect();
        for (i, g) in local.iter().enumerate() {
            node.start_group(*g).await?;
            if (i + 1) % START_WAVE_GROUPS == 0 {
                // Stagger: groups started together would time out together.
                tokio::time::sleep(stagger).await;
            }
        }
        for g in std::iter::once(0).chain(local) {
            node.initialize(g, &placement).await?;
        }
        Ok(node)
    }

    /// Starts the local replica of `g` if it is not running (empty if it never ran here).
    pub async fn start_group(&self, g: GroupId) -> Result<(), Error> {
        let _changing = self.changing.lock().await;
        if self.read_groups().contains_key(&g) {
            return Ok(());
        }
        self.start_local_replica(g).await
    }

    /// Stops the local replica of `g` and deletes its Raft log and checkpoints from the
    /// engine (the space returns with compaction): the replica moved to another node.
    pub async fn drop_group(&self, g: GroupId) -> Result<(), Error> {
        let _changing = self.changing.lock().await;
        if !self.stop_local_replica(g).await {
            return Ok(());
        }
        crate::replica_drop::clear_replica_logs(&self.engine, g).await?;
        tracing::info!(group = g, "replica dropped: it moved to another node");
        Ok(())
    }

    /// Issue 9 (session 6, `crate::damage_watch`): stops the local replica of `g`, whose
    /// Raft log a read found damaged, cuts the log before the damage and starts the
    /// replica again, repairing. Returns the first Raft index dropped.
    pub async fn restart_damaged_group(&self, g: GroupId) -> Result<Option<u64>, Error> {
        let _changing = self.changing.lock().await;
        if !self.stop_local_replica(g).await {
            return Ok(None);
        }
        let cut = crate::damage_watch::cut_damaged_raft_log(&self.engine, g).await?;
        crate::damage_watch::cut_damaged_checkpoint_log(&self.engine, g).await?;
        self.start_local_replica(g).await?;
        Ok(cut)
    }

    /// Issue 9 (session 7): stops the local replica of `g`, writes `batch` (durably) and
    /// starts the replica again (`crate::vote_probe` saves a vote-unknown replica's
    /// decided vote and marker this way: openraft keeps its vote in memory).
    pub async fn restart_group_after(
        &self,
        g: GroupId,
        batch: chatlog_storage::WriteBatch,
    ) -> Result<(), Error> {
        let _changing = self.changing.lock().await;
        if !self.stop_local_replica(g).await {
            return Ok(());
        }
        self.engine
            .write(&batch)
            .await
            .map_err(|source| Error::Storage {
                group: g,
                verb: "saving",
                subject: "the probed vote and marker".into(),
                source,
            })?;
        self.start_local_replica(g).await
    }

    /// Takes the local replica of `g` out of the node and shuts its Raft instance down
    /// (its background tasks aborted); `false` if the node holds none. The caller holds
    /// `changing`.
    async fn stop_local_replica(&self, g: GroupId) -> bool {
        let Some(group) = self.write_groups().remove(&g) else {
            return false;
        };
        self.registry.remove(g);
        self.local_changes.send_modify(|v| *v += 1);
        group.secret_eraser.abort();
        group.retention.abort();
        if let Err(e) = group.raft.shutdown().await {
            tracing::warn!(group = g, error = %e, "group did not shut down cleanly");
        }
        true
    }

    /// Builds the local replica of `g` ([`Node::build_cutting_damage`]) and puts it in
    /// the node. The caller holds `changing`.
    async fn start_local_replica(&self, g: GroupId) -> Result<(), Error> {
        let group = self.build_cutting_damage(g).await?;
        self.write_groups().insert(g, group);
        self.local_changes.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Builds the local replica of `g`. Issue 9 (session 6): on a node whose groups have
    /// peers to repair from (the engine opened with `RecoveryMode::CutDamagedTail`), a
    /// start that failed because a read found the Raft log damaged (openraft re-applies
    /// the log at start) cuts the log before the damage and tries again, repairing
    /// (`crate::damage_watch`); a single-replica node stops as before.
    async fn build_cutting_damage(&self, g: GroupId) -> Result<Group, Error> {
        let can_cut =
            self.engine.config().recovery_mode == chatlog_storage::RecoveryMode::CutDamagedTail;
        let mut attempts = 0;
        loop {
            match (self.build)(g).await {
                Ok(group) => return Ok(group),
                Err(e) if can_cut && attempts < crate::damage_watch::START_CUTS_MAX => {
                    attempts += 1;
                    if !crate::damage_watch::cut_damaged_group_logs(&self.engine, g).await? {
                        return Err(e);
                    }
                    tracing::error!(
                        group = g,
                        error = %e,
                        status = "repairing",
                        "replica start found its log damaged: cut before the damage, starting \
                         again"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Initializes group `g` from this node when `placement` makes it the first replica
    /// of a group that was never moved and the local replica holds nothing yet.
    pub async fn initialize(&self, g: GroupId, placement: &Placement) -> Result<(), Error> {
        let me = self.config.node_id;
        let Some(p) = placement.groups.get(&g) else {
            return Ok(());
        };
        // Before the bootstrap, only a node of the static member list may initialize (a
        // joining node learns everything from the others).
        let may = p.epoch == 0
            && p.replicas.first() == Some(&me)
            && (placement.is_bootstrapped() || self.config.members.contains(&me));
        let Some(group) = self.group(g) else {
            return Ok(());
        };
        if !may {
            return Ok(());
        }
        let initialized = group
            .raft
            .is_initialized()
            .await
            .map_err(|e| Error::Inconsistent {
                group: g,
                detail: format!("checking initialization: {e}"),
            })?;
        if initialized {
            return Ok(());
        }
        let members: BTreeSet<NodeId> = p.replicas.iter().copied().collect();
        match group.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(Error::Inconsistent {
                group: g,
                detail: format!("initializing: {e}"),
            }),
        }
    }

    fn read_groups(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<GroupId, Group>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_groups(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<GroupId, Group>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The placement this node follows (see [`Node::set_placement`]).
    pub fn placement(&self) -> Arc<Placement> {
        Arc::clone(&self.placement.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Follows `placement` (group 0's, as applied here): routing, and the peer table for
    /// members this node did not know.
    pub fn set_placement(&self, placement: Placement) {
        if let Some(router) = &self.router {
            for (n, m) in &placement.members {
                if *n != self.config.node_id
                    && let Ok(addr) = m.addr.parse()
                {
                    router.set_peer_addr(*n, addr);
                }
            }
        }
        let chat_groups = placement.chat_groups();
        let mut current = self.placement.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(placement);
        // Under the placement's lock, so two updates store their counts in their order.
        self.chat_groups
            .store(chat_groups, std::sync::atomic::Ordering::Release);
    }

    /// The static placement with the initial members' addresses: what the controller
    /// proposes as the bootstrap.
    pub fn bootstrap_placement(&self) -> Placement {
        static_placement(&self.config, &self.member_addrs)
    }

    /// The voters of group `g` as the placement has them.
    pub fn replicas_of(&self, g: GroupId) -> Vec<NodeId> {
        self.placement().replicas(g).to_vec()
    }

    /// Chat groups in the cluster now (ids `1..=chat_groups()`).
    pub fn chat_groups(&self) -> u64 {
        self.chat_groups.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Changes each time a local replica starts or stops.
    pub fn local_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local_changes.subscribe()
    }

    /// Whether peer `n` answers on its peer port within `timeout` (a read-index request
    /// for group 0; any answer, even a refusal, means the process is up).
    pub async fn peer_answers(&self, n: NodeId, timeout: Duration) -> bool {
        if n == self.config.node_id {
            return true;
        }
        match &self.router {
            Some(router) => tokio::time::timeout(timeout, router.read_index(n, 0, timeout))
                .await
                .is_ok_and(|r| r.is_ok()),
            None => false,
        }
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
    pub fn group(&self, g: GroupId) -> Option<Group> {
        self.read_groups().get(&g).cloned()
    }

    /// The local replica of group `g` if it may answer reads: one the placement counts
    /// as a voter. A replica that a move is still adding holds only part of the group
    /// (it may be empty), so it serves nothing until the move promoted it.
    pub fn serving_group(&self, g: GroupId) -> Option<Group> {
        // Read under the lock, without a clone of the placement's `Arc`.
        let voter = self
            .placement
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .replicas(g)
            .contains(&self.config.node_id);
        if !voter {
            return None;
        }
        // Issue 9: a damaged replica serves no reads until repaired.
        self.group(g).filter(|group| !group.repair.is_repairing())
    }

    /// Whether a request needing group `g`, which this node does not serve, may go to
    /// another node: another node is a replica of `g`, and this node's own replica (if
    /// any) is not repairing a damaged log (issue 9: its refusal says why, and the other
    /// replicas may be what it waits for).
    pub fn served_elsewhere(&self, g: GroupId) -> bool {
        let me = self.config.node_id;
        let repairing = self
            .group(g)
            .is_some_and(|local| local.repair_status().damage().is_some());
        !repairing && self.placement().replicas(g).iter().any(|n| *n != me)
    }

    /// Whether another node is a replica of every group of `groups`.
    pub fn another_hosts_all(&self, groups: &[GroupId]) -> bool {
        let me = self.config.node_id;
        let placement = self.placement();
        placement
            .members
            .keys()
            .any(|n| *n != me && groups.iter().all(|g| placement.replicas(*g).contains(n)))
    }

    /// The replicas of `g` other than this node to send a request needing the groups
    /// `needed` to, in the order to try them: those serving the most of `needed` first;
    /// among those, `g`'s leader as last reported ([`Node::note_leader`]), whose answer
    /// to a write needs no further hop; then the placement's order.
    pub fn forward_targets(&self, g: GroupId, needed: &[GroupId]) -> Vec<NodeId> {
        let me = self.config.node_id;
        let placement = self.placement();
        let leader = self.leader_hint(g);
        let mut targets: Vec<NodeId> = placement
            .replicas(g)
            .iter()
            .copied()
            .filter(|n| *n != me)
            .collect();
        // A stable sort keeps the placement's order among equals.
        targets.sort_by_key(|n| {
            (
                std::cmp::Reverse(
                    needed
                        .iter()
                        .filter(|h| placement.replicas(**h).contains(n))
                        .count(),
                ),
                Some(*n) != leader,
            )
        });
        targets
    }

    /// Records `leader` (0: none known) as the leader of group `g` that another node
    /// reported, for [`Node::forward_targets`]. Kept only for groups of the placement
    /// this node holds no replica of (a local replica knows its leader itself); a stale
    /// entry costs one hop more, until the next answer corrects it.
    pub fn note_leader(&self, g: GroupId, leader: NodeId) {
        if leader == 0 || leader == self.config.node_id || self.group(g).is_some() {
            return;
        }
        if !self.placement().replicas(g).contains(&leader) {
            return;
        }
        let mut hints = self.leader_hints.lock().expect("leader hints lock");
        if hints.len() >= LEADER_HINTS_MAX && !hints.contains_key(&g) {
            // Groups come and go with the placement: forget the old ones at once.
            hints.clear();
        }
        hints.insert(g, leader);
    }

    /// The leader of `g` last reported by another node, if any.
    pub fn leader_hint(&self, g: GroupId) -> Option<NodeId> {
        self.leader_hints
            .lock()
            .expect("leader hints lock")
            .get(&g)
            .copied()
    }

    /// Read barriers asked of this node ([`Node::read_barrier`]) since it started: each
    /// linearizable read's, a quorum round at the group's leader.
    pub fn read_barriers(&self) -> u64 {
        self.read_barriers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every local replica (as of the call: replicas start and stop with the placement).
    pub fn groups(&self) -> Vec<Group> {
        self.read_groups().values().cloned().collect()
    }

    /// Lets this node forward proposals and read indexes to peers over `router` (the
    /// router whose network factories the groups use). Without it, a node answers
    /// `NotLeader` for groups it does not lead.
    pub fn set_router(&mut self, router: Router) {
        self.router = Some(router);
    }

    /// The router to peers, in a cluster (media parts travel over it too).
    pub fn router(&self) -> Option<&Router> {
        self.router.as_ref()
    }

    /// Proposes `command` in group `g` from any node: through the local replica when it
    /// leads, otherwise forwarded to the leader over the node-to-node connection
    /// (following at most [`FORWARD_HOPS_MAX`] leader hints, each hop within
    /// [`FORWARD_TIMEOUT`]). A node without a replica of `g` asks the group's replicas
    /// in placement order.
    ///
    /// Errors: `NotLeader` when no leader is known (retry after an election);
    /// `Unavailable` when nothing was proposed (safe to retry anywhere); `Unknown` when
    /// the command may have been applied (retry only if it is idempotent, such as a
    /// post with its client message id).
    pub async fn propose(&self, g: GroupId, command: Command) -> Result<Outcome, ProposeError> {
        // The common case first: the local replica leads, and the command is encoded
        // straight from the caller's value (no clone, no list of other replicas).
        let me = self.config.node_id;
        let mut hint = None;
        match self.propose_local(g, &command).await {
            Some(Err(ProposeError::NotLeader {
                leader: Some(leader),
                ..
            })) if leader != me => hint = Some(leader),
            Some(other) => return other,
            None => {}
        }
        let hosted = self.group(g).is_some();
        let mut candidates: Vec<NodeId> = self
            .replicas_of(g)
            .into_iter()
            .filter(|n| *n != me)
            .collect();
        candidates.reverse();
        let mut next = hint.or(hosted.then_some(me));
        let mut last = match hint {
            Some(leader) => ProposeError::NotLeader {
                group: g,
                leader: Some(leader),
            },
            None => ProposeError::Unavailable {
                group: g,
                detail: "no replica of the group could be asked".into(),
            },
        };
        // The local attempt above, if it was made, counts as the first hop.
        for _ in usize::from(hint.is_some())..=FORWARD_HOPS_MAX {
            let Some(target) = next.take().or_else(|| candidates.pop()) else {
                break;
            };
            let result = if target == me {
                match self.group(g) {
                    Some(group) => group.propose_command(&command).await.map(|(o, _)| o),
                    None => continue,
                }
            } else {
                match self.forward_propose(target, g, &command).await {
                    Ok(result) => result,
                    Err(ForwardError::NotSent(detail)) => {
                        last = ProposeError::Unavailable {
                            group: g,
                            detail: format!("forwarding to node {target}: {detail}"),
                        };
                        if hosted {
                            // We know the leader hint was ours; do not guess further.
                            return Err(last);
                        }
                        continue;
                    }
                    Err(ForwardError::Unknown(detail)) => {
                        return Err(ProposeError::Unknown {
                            group: g,
                            detail: format!("forwarded to node {target}: {detail}"),
                        });
                    }
                }
            };
            match result {
                Err(ProposeError::NotLeader {
                    leader: Some(leader),
                    ..
                }) if leader != target && (leader != me || hosted) => {
                    last = ProposeError::NotLeader {
                        group: g,
                        leader: Some(leader),
                    };
                    next = Some(leader);
                }
                Err(e @ ProposeError::NotLeader { leader: None, .. }) if !hosted => last = e,
                other => return other,
            }
        }
        Err(last)
    }

    /// [`Node::propose`]'s common case: the local replica of `g` believes it leads, and
    /// the command is proposed there by reference (the proposal queue encodes it in
    /// place), so a post costs no copy of its text and no lookup of the group's replica
    /// list. `None` when there is no local replica or it does not lead; a `NotLeader`
    /// answer (leadership moved meanwhile) is returned with its hint, and
    /// [`Node::propose`] follows it. Its future is a fraction of `propose`'s (no
    /// forwarding state), for callers that keep one per request in flight (the
    /// gateway's inline requests) and box the slow path.
    pub async fn propose_local(
        &self,
        g: GroupId,
        command: &Command,
    ) -> Option<Result<Outcome, ProposeError>> {
        let group = self.group(g)?;
        if group.leader() != Some(self.config.node_id) {
            return None;
        }
        Some(group.propose_command(command).await.map(|(o, _)| o))
    }

    async fn forward_propose(
        &self,
        target: NodeId,
        g: GroupId,
        command: &Command,
    ) -> Result<Result<Outcome, ProposeError>, ForwardError> {
        let Some(router) = &self.router else {
            return Err(ForwardError::NotSent("this node runs without peers".into()));
        };
        let _permit = tokio::time::timeout(FORWARD_TIMEOUT, self.forwards.acquire())
            .await
            .map_err(|_| {
                ForwardError::NotSent(format!(
                    "{FORWARDS_IN_FLIGHT_MAX} forwarded requests in flight"
                ))
            })?
            .map_err(|_| ForwardError::NotSent("the node is stopping".into()))?;
        let (index, mut results) = router
            .propose(target, g, std::slice::from_ref(command), FORWARD_TIMEOUT)
            .await?;
        // The router checked there is one result per command.
        let result = results.pop().unwrap_or_else(|| {
            Err(ProposeError::Unknown {
                group: g,
                detail: format!("node {target} answered no result"),
            })
        });
        if let (Ok(_), Some(group)) = (&result, self.group(g)) {
            // Read your writes on this node too: what the client does next here (a
            // session check, a membership check) reads the local replica.
            let mut applied = group.shared().applied();
            if tokio::time::timeout(READ_APPLY_TIMEOUT, applied.wait_for(|a| *a >= index))
                .await
                .is_err()
            {
                tracing::warn!(
                    group = g,
                    index,
                    "a forwarded write committed but this replica has not applied it yet"
                );
            }
        }
        Ok(result)
    }

    /// Waits until the local replica of `g` has applied everything committed before the
    /// call, as confirmed by a quorum: openraft's ReadIndex on the leader; on a follower,
    /// the leader's read index fetched over the transport, then a wait (at most
    /// [`READ_APPLY_TIMEOUT`]) until this replica applied it. A node without a replica
    /// of `g` cannot read it: `Unavailable`.
    pub async fn read_barrier(&self, g: GroupId) -> Result<(), ProposeError> {
        self.read_barriers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let me = self.config.node_id;
        let Some(group) = self.group(g) else {
            return Err(ProposeError::Unavailable {
                group: g,
                detail: format!("node {me} holds no replica of the group"),
            });
        };
        let leader = match group.read_barrier().await {
            Err(ProposeError::NotLeader {
                leader: Some(leader),
                ..
            }) if leader != me && self.router.is_some() => leader,
            other => return other,
        };
        let unavailable = |detail: String| ProposeError::Unavailable { group: g, detail };
        let router = self.router.as_ref().expect("checked above");
        let index = match router.read_index(leader, g, FORWARD_TIMEOUT).await {
            Ok(result) => result?,
            Err(e) => return Err(unavailable(format!("read index from node {leader}: {e}"))),
        };
        let mut applied = group.shared().applied();
        match tokio::time::timeout(READ_APPLY_TIMEOUT, applied.wait_for(|a| *a >= index)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(unavailable("the group stopped".into())),
            Err(_) => Err(unavailable(format!(
                "this replica did not apply index {index} within {READ_APPLY_TIMEOUT:?}"
            ))),
        }
    }

    /// Waits until every local group has a leader, or `timeout` passes.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> Result<(), Error> {
        for group in self.groups() {
            let g = &group.id;
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
        let Node {
            engine,
            groups,
            router,
            build,
            ..
        } = self;
        drop(router);
        drop(build);
        let groups = groups.into_inner().unwrap_or_else(|p| p.into_inner());
        for (g, group) in groups {
            group.secret_eraser.abort();
            group.retention.abort();
            group.retention.abort();
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

#[cfg(test)]
mod pipeline_tests {
    use super::*;

    /// Virtual time: the waits below are exact, not a busy host's.
    #[tokio::test(start_paused = true)]
    async fn an_entry_takes_an_extra_slot_only_after_its_wait_and_a_freed_base_slot_first() {
        let base = Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT_MAX));
        let extra = Arc::new(Semaphore::new(1));
        let t0 = tokio::time::Instant::now();
        let wait = Duration::from_millis(1);
        // Free base slots are taken at once, even before the wait.
        let b1 = entry_permit(&base, &extra, t0 + wait, || true)
            .await
            .expect("base");
        let b2 = entry_permit(&base, &extra, t0 + wait, || true)
            .await
            .expect("base");
        assert_eq!(
            (base.available_permits(), extra.available_permits()),
            (0, 1)
        );
        // Both busy: the extra slot, no sooner than the wait.
        let start = tokio::time::Instant::now();
        let e1 = entry_permit(&base, &extra, tokio::time::Instant::now() + wait, || true)
            .await
            .expect("extra");
        assert!(start.elapsed() >= wait, "took the extra slot early");
        assert_eq!(extra.available_permits(), 0);
        // Everything busy: a base slot freed later is taken (not more than the slots).
        let freer = {
            let b1 = b1;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(b1);
            })
        };
        let start = tokio::time::Instant::now();
        let b3 = entry_permit(&base, &extra, tokio::time::Instant::now() + wait, || true)
            .await
            .expect("freed base");
        assert!(start.elapsed() >= Duration::from_millis(5));
        freer.await.expect("freer");
        assert_eq!(
            (base.available_permits(), extra.available_permits()),
            (0, 0)
        );
        drop((b2, b3, e1));
        assert_eq!(
            (base.available_permits(), extra.available_permits()),
            (ENTRIES_IN_FLIGHT_MAX, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_group_waits_for_a_base_slot_however_long_its_entry_waited() {
        let base = Arc::new(Semaphore::new(1));
        let extra = Arc::new(Semaphore::new(1));
        let b1 = Arc::clone(&base).acquire_owned().await.expect("base");
        let freer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(b1);
        });
        let start = tokio::time::Instant::now();
        let p = entry_permit(&base, &extra, start + Duration::from_millis(1), || false)
            .await
            .expect("base");
        assert!(
            start.elapsed() >= Duration::from_millis(10),
            "not calm: no extra slot"
        );
        assert_eq!(extra.available_permits(), 1);
        drop(p);
        freer.await.expect("freer");
    }

    #[test]
    fn the_pipeline_defaults_hold_until_set() {
        // Other tests of this process never call `set_pipeline`.
        assert_eq!(pipeline(), (ENTRIES_IN_FLIGHT_EXTRA_MAX, ENTRY_WAIT_EXTRA));
    }
}
