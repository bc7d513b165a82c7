//! The simulated network (issue 9): every node's Raft groups talk through one in-memory
//! [`SimNet`] instead of TCP. Each request and each answer waits a seeded delay, may be
//! lost (seeded), and is refused while its link is cut (partitions, one-way cuts) or its
//! target is down (crashed). It implements openraft-multi's `GroupRouter`, as the real
//! transport's `Router` does, so openraft sees the same interface it sees in production.
//!
//! Every message and answer is written to the [`Trace`] with the virtual time, so two runs
//! of one seed can be compared line by line.
//!
//! What it owns: link state, the network's random draws, the trace. What it must not do:
//! read the wall clock or draw randomness from anywhere but its seeded generator.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatlog_raft::state_machine::SnapshotData;
use chatlog_raft::types::{GroupId, NodeId, Snapshot, TypeConfig, Vote};
use chatlog_raft::{ChatRaft, GroupDirectory};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft_multi::{GroupNetworkAdapter, GroupRouter};

/// A seeded splitmix64: every random choice of the simulation comes from one of these.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A uniform draw in `[lo, hi]`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// Trace lines kept for the report of a mismatch (the hash covers all of them).
pub const TRACE_LINES_MAX: usize = 400_000;

/// The ordered record of one run: what happened, at which virtual time.
#[derive(Debug)]
pub struct Trace {
    started: tokio::time::Instant,
    hasher: std::hash::DefaultHasher,
    pub lines: Vec<String>,
}

impl Trace {
    pub fn new() -> Trace {
        Trace {
            started: tokio::time::Instant::now(),
            // `DefaultHasher::new()` has fixed keys: the same lines hash the same in
            // every run (unlike `RandomState`).
            hasher: std::hash::DefaultHasher::new(),
            lines: Vec::new(),
        }
    }

    pub fn record(&mut self, what: String) {
        let line = format!("{:>9}µs {what}", self.started.elapsed().as_micros());
        line.hash(&mut self.hasher);
        if self.lines.len() < TRACE_LINES_MAX {
            self.lines.push(line);
        }
    }

    pub fn hash(&self) -> u64 {
        self.hasher.finish()
    }
}

/// The network's settings.
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    /// One-way delay of a message, drawn uniformly in this range (ms).
    pub delay_ms: (u64, u64),
    /// Messages lost per 1,000 (each request and each answer on its own).
    pub loss_per_mille: u64,
}

struct NetState {
    rng: Rng,
    config: NetConfig,
    /// The live nodes' directories (the groups' Raft handles); a down node is absent.
    nodes: BTreeMap<NodeId, Arc<dyn GroupDirectory>>,
    /// Cut links, `(from, to)`: messages from `from` to `to` are refused.
    cut: BTreeSet<(NodeId, NodeId)>,
    trace: Trace,
    /// Messages delivered, lost and refused (counted for the report).
    delivered: u64,
    lost: u64,
    refused: u64,
}

/// The in-memory network all nodes of a simulation share.
#[derive(Clone)]
pub struct SimNet {
    state: Arc<Mutex<NetState>>,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimNet")
    }
}

/// How a message fares, decided when it is sent.
enum Fate {
    Deliver(Duration),
    Lost,
    Refused(String),
}

impl SimNet {
    pub fn new(seed: u64, config: NetConfig) -> SimNet {
        SimNet {
            state: Arc::new(Mutex::new(NetState {
                rng: Rng(seed),
                config,
                nodes: BTreeMap::new(),
                cut: BTreeSet::new(),
                trace: Trace::new(),
                delivered: 0,
                lost: 0,
                refused: 0,
            })),
        }
    }

    /// Writes a line to the trace.
    pub fn record(&self, what: String) {
        self.state.lock().expect("net").trace.record(what);
    }

    /// The trace's hash and lines so far.
    pub fn trace(&self) -> (u64, Vec<String>) {
        let st = self.state.lock().expect("net");
        (st.trace.hash(), st.trace.lines.clone())
    }

    /// (delivered, lost, refused) messages so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        let st = self.state.lock().expect("net");
        (st.delivered, st.lost, st.refused)
    }

    /// Node `id` is up and reachable through `directory`.
    pub fn attach(&self, id: NodeId, directory: Arc<dyn GroupDirectory>) {
        let mut st = self.state.lock().expect("net");
        st.trace.record(format!("node {id} up"));
        st.nodes.insert(id, directory);
    }

    /// Node `id` is down: every message to it is refused.
    pub fn detach(&self, id: NodeId) {
        let mut st = self.state.lock().expect("net");
        st.trace.record(format!("node {id} down"));
        st.nodes.remove(&id);
    }

    /// Cuts the link `from → to` (one way).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        let mut st = self.state.lock().expect("net");
        st.trace.record(format!("cut {from}->{to}"));
        st.cut.insert((from, to));
    }

    /// Restores every link.
    pub fn heal(&self) {
        let mut st = self.state.lock().expect("net");
        st.trace.record("heal".into());
        st.cut.clear();
    }

    /// The network of `from` for `group`: what `Raft::new` takes.
    pub fn factory(&self, from: NodeId, group: GroupId) -> SimNetworkFactory {
        SimNetworkFactory {
            router: SimRouter {
                net: self.clone(),
                from,
            },
            group,
        }
    }

    fn fate(&self, from: NodeId, to: NodeId, what: &str) -> Fate {
        let mut st = self.state.lock().expect("net");
        let delay = Duration::from_millis({
            let (lo, hi) = st.config.delay_ms;
            st.rng.between(lo, hi)
        });
        let lost = st.rng.below(1000) < st.config.loss_per_mille;
        let fate = if !st.nodes.contains_key(&to) {
            st.refused += 1;
            Fate::Refused(format!("node {to} is down"))
        } else if st.cut.contains(&(from, to)) {
            st.refused += 1;
            Fate::Refused(format!("link {from}->{to} is cut"))
        } else if lost {
            st.lost += 1;
            Fate::Lost
        } else {
            st.delivered += 1;
            Fate::Deliver(delay)
        };
        let verdict = match &fate {
            Fate::Deliver(d) => format!("+{}ms", d.as_millis()),
            Fate::Lost => "lost".into(),
            Fate::Refused(why) => format!("refused ({why})"),
        };
        st.trace.record(format!("{from}->{to} {what} {verdict}"));
        fate
    }

    /// The target's directory if it is up and the link is open now.
    fn reach(&self, from: NodeId, to: NodeId) -> Option<Arc<dyn GroupDirectory>> {
        let st = self.state.lock().expect("net");
        if st.cut.contains(&(from, to)) {
            return None;
        }
        st.nodes.get(&to).cloned()
    }

    /// Carries one request to `to`'s replica of `group`: a seeded delay, possibly lost,
    /// refused while the link is cut or `to` is down. A lost message costs the sender its
    /// deadline (`ttl`), as a real one would. Returns the target's handles.
    async fn there(
        &self,
        from: NodeId,
        to: NodeId,
        group: GroupId,
        what: String,
        ttl: Duration,
    ) -> Result<(ChatRaft, Arc<dyn GroupDirectory>), String> {
        let delay = match self.fate(from, to, &format!("g{group} {what}")) {
            Fate::Deliver(d) => d,
            Fate::Lost => {
                tokio::time::sleep(ttl).await;
                return Err(format!("request to node {to} lost"));
            }
            Fate::Refused(why) => return Err(why),
        };
        tokio::time::sleep(delay).await;
        let Some(directory) = self.reach(from, to) else {
            return Err(format!("node {to} went away"));
        };
        let Some(raft) = directory.raft(group) else {
            return Err(format!("node {to} holds no group {group}"));
        };
        Ok((raft, directory))
    }

    /// Carries `to`'s answer back to `from`, as [`SimNet::there`] carries the request.
    async fn back<T: std::fmt::Debug>(
        &self,
        from: NodeId,
        to: NodeId,
        group: GroupId,
        answer: T,
        ttl: Duration,
    ) -> Result<T, String> {
        let delay = match self.fate(to, from, &format!("g{group} re {answer:?}")) {
            Fate::Deliver(d) => d,
            Fate::Lost => {
                tokio::time::sleep(ttl).await;
                return Err(format!("answer from node {to} lost"));
            }
            Fate::Refused(why) => return Err(why),
        };
        tokio::time::sleep(delay).await;
        Ok(answer)
    }
}

/// One node's side of the simulated network: what the real `Router` is in production.
#[derive(Debug, Clone)]
pub struct SimRouter {
    net: SimNet,
    from: NodeId,
}

fn unreachable(e: String) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(e))
}

/// How long a message may take before its sender gives up (openraft's soft deadline).
fn ttl(option: &RPCOption) -> Duration {
    option.soft_ttl()
}

/// A damaged replica grants no votes (as `network::server` does it).
fn refuse_vote(directory: &dyn GroupDirectory, group: GroupId) -> Result<(), String> {
    match directory.vote_refusal(group) {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

impl SimRouter {
    /// One request and its answer: `what` travels to `target` (seeded delay or loss),
    /// the target's replica of `group_id` handles it with `call` (after the damaged-replica
    /// vote refusal when `vote_like`, as `network::server` does it), and the answer
    /// travels back the same way.
    async fn exchange<A, Fut>(
        &self,
        target: NodeId,
        group_id: GroupId,
        what: String,
        option: &RPCOption,
        vote_like: bool,
        call: impl FnOnce(ChatRaft) -> Fut,
    ) -> Result<A, RPCError<TypeConfig>>
    where
        A: std::fmt::Debug,
        Fut: Future<Output = Result<A, String>>,
    {
        let ttl = ttl(option);
        let (raft, directory) =
            (self.net.there(self.from, target, group_id, what, ttl).await).map_err(unreachable)?;
        if vote_like {
            refuse_vote(directory.as_ref(), group_id).map_err(unreachable)?;
        }
        let answer = call(raft).await.map_err(unreachable)?;
        (self
            .net
            .back(self.from, target, group_id, answer, ttl)
            .await)
            .map_err(unreachable)
    }
}

impl GroupRouter<TypeConfig, GroupId> for SimRouter {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &self,
        target: NodeId,
        group_id: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let what = format!(
            "append vote={} prev={:?} entries={} last={:?} commit={:?}",
            rpc.vote,
            rpc.prev_log_id.map(|l| l.index),
            rpc.entries.len(),
            rpc.entries.last().map(|e| e.log_id.to_string()),
            rpc.leader_commit.map(|l| l.index),
        );
        self.exchange(target, group_id, what, &option, false, async |raft| {
            raft.append_entries(rpc).await.map_err(|e| e.to_string())
        })
        .await
    }

    async fn vote(
        &self,
        target: NodeId,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let what = format!("vote {rpc}");
        self.exchange(target, group_id, what, &option, true, async |raft| {
            raft.vote(rpc).await.map_err(|e| e.to_string())
        })
        .await
    }

    async fn pre_vote(
        &self,
        target: NodeId,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let what = format!("pre-vote {rpc}");
        self.exchange(target, group_id, what, &option, true, async |raft| {
            raft.pre_vote(rpc).await.map_err(|e| e.to_string())
        })
        .await
    }

    /// Snapshots are not simulated (the simulation's Raft config never builds one, and
    /// no log is purged, so openraft has no reason to send one). A snapshot handle
    /// (`snapshot_stream::SnapshotData`) names the sender's own log, so handing it to
    /// another node's `install_full_snapshot` would be wrong: the real transport
    /// streams the range (`snapshot_stream::send`, tested in `transport.rs` and
    /// `tests/snapshot_stream.rs`). Should openraft ever ask, the send fails loudly.
    async fn full_snapshot(
        &self,
        target: NodeId,
        _group_id: GroupId,
        _vote: Vote,
        snapshot: Snapshot<SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        panic!(
            "the simulation does not simulate snapshots, yet node {} sent one to node {target} (meta {:?})",
            self.from, snapshot.meta
        );
    }

    async fn transfer_leader(
        &self,
        target: NodeId,
        group_id: GroupId,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let what = format!("transfer-leader {req}");
        self.exchange(target, group_id, what, &option, true, async |raft| {
            raft.handle_transfer_leader(req)
                .await
                .map_err(|e| e.to_string())
        })
        .await
    }
}

/// The network of one group of one node: what `Raft::new` takes.
#[derive(Debug, Clone)]
pub struct SimNetworkFactory {
    router: SimRouter,
    group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for SimNetworkFactory {
    type Network = GroupNetworkAdapter<TypeConfig, GroupId, SimRouter>;

    async fn new_client(
        &mut self,
        target: NodeId,
        _node: &chatlog_raft::types::Node,
    ) -> Self::Network {
        GroupNetworkAdapter::new(self.router.clone(), target, self.group)
    }
}
