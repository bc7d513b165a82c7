//! Power cuts under Raft (issue 9): three nodes in one process, each with its storage
//! engine on its own `FaultyFileSystem::with_power_cuts`, talking over real sockets on
//! 127.0.0.1. Writers post to one chat per group (retrying with the same client message
//! id through whichever node leads) while the power goes on one node (the leader of a
//! written group two times in three), sometimes on all three at once; the cut lands at a
//! seeded write or fdatasync (or from outside), drops everything not synced or keeps a
//! torn prefix of it, and the node restarts on what survived. Afterwards every replica's
//! chat logs go through the history checker (`tests/common/history.rs`): every
//! acknowledged post present once at its seq on every replica, seqs dense, nothing nobody
//! sent, one event per client message id, replicas identical.
//!
//! Seeded: prints `seed=`; `CHATLOG_TEST_SEED=<n>` replays the fault choices and cut
//! points (thread and socket timing still vary). The fault window is 12 s by default;
//! `CHATLOG_POWERCUT_SECS=<n>` runs longer.

#[path = "../../tests/common/history.rs"]
mod history;
#[path = "common/replica_events.rs"]
mod replica_events;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatlog_raft::chat::{Batch, ChatKind, Command, Outcome};
use chatlog_raft::repair::{RepairStatus, hold_elections_while_repairing};
use chatlog_raft::state_machine::{GroupShared, SmConfig};
use chatlog_raft::{
    ChatBatch, ChatRaft, ChatStateMachine, GroupDirectory, GroupId, LogReader, LogStore, NodeId,
    NodeIdentity, Router, serve,
};
use chatlog_storage::fault::{FaultyFileSystem, PowerCut, PowerCutReport};
use chatlog_storage::{Config as EngineConfig, Engine, RecoveryMode};
use history::{Event, History, Send};
use openraft::async_runtime::WatchReceiver;
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::{Config, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const CLUSTER_ID: u64 = 0x9C07;
const GROUPS: [GroupId; 2] = [1, 2];
const NODES: [NodeId; 3] = [1, 2, 3];
/// Upper bound for anything that needs an election or a few round trips.
const WAIT: Duration = Duration::from_secs(30);
/// How long one send is retried (same client message id) before its outcome is unknown.
const SEND_RETRY: Duration = Duration::from_secs(8);
/// Concurrent writers.
const WRITERS: u64 = 4;
/// Openraft builds a snapshot every this many entries and then purges its log (logically:
/// retention keeps the entries as history, `chatlog_raft::log_store`, "Retention") up to
/// [`LOGS_KEPT`] below it. Small, so that every run, debug builds included, purges below
/// the chats' first events and the checker reads them back from the history (openraft's
/// default, 5,000, was reached only by fast release runs, which then failed in the
/// checker: `common/replica_events.rs`).
const SNAPSHOT_EVERY: u64 = 300;
/// Entries openraft keeps visible below its newest snapshot (see [`SNAPSHOT_EVERY`]); a
/// replica restarting further behind is sent a snapshot (`snapshot_stream`).
const LOGS_KEPT: u64 = 100;

/// A seeded splitmix64: the fault schedule follows the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .map(|v| v.parse().expect("CHATLOG_TEST_SEED must be a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        })
}

fn raft_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "power-cut-test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        enable_pre_vote: Some(true),
        // As in production (`node::timing`): a restarted leader must win an election.
        enable_leader_restore: Some(false),
        // As in production: a replica that cut a damaged record is sent it again.
        allow_log_reversion: Some(true),
        // Unlike production (purges by retention only): snapshots and purges during the
        // faults, so the history below the purge mark is read and sent too.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
        max_in_snapshot_log_to_keep: LOGS_KEPT,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

#[derive(Default)]
struct Directory {
    rafts: Mutex<HashMap<GroupId, ChatRaft>>,
    /// Issue 9: each replica's repair status, as `chatlog_raft::node` keeps it.
    repairs: Mutex<HashMap<GroupId, Arc<RepairStatus>>>,
    /// Issue 9: replica starts that found their Raft log damaged and cut it.
    found_at_start: std::sync::atomic::AtomicU64,
    /// Issue 9: chat reads that found a replica's Raft log damaged (it was restarted).
    found_by_read: std::sync::atomic::AtomicU64,
}

impl GroupDirectory for Directory {
    fn raft(&self, group: GroupId) -> Option<ChatRaft> {
        self.rafts.lock().expect("lock").get(&group).cloned()
    }

    fn vote_refusal(&self, group: GroupId) -> Option<String> {
        let damage = self.repairs.lock().expect("lock").get(&group)?.damage()?;
        Some(format!("refusing to vote: {damage}"))
    }

    fn append_refusal(&self, group: GroupId) -> Option<String> {
        let vote_unknown = self
            .repairs
            .lock()
            .expect("lock")
            .get(&group)?
            .is_vote_unknown();
        vote_unknown.then(|| format!("group {group}: vote unknown, probing"))
    }
}

/// One running node and what the test reads through.
struct TestNode {
    id: NodeId,
    addr: SocketAddr,
    engine: Arc<Engine>,
    router: Router,
    directory: Arc<Directory>,
    readers: Mutex<HashMap<GroupId, (LogReader, Arc<GroupShared>)>>,
    stop_server: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

/// One replica started as `chatlog_raft::node` starts it: a start that fails because a
/// read found the Raft log damaged cuts the log before the damage
/// (`damage_watch::cut_damaged_raft_log`) and tries again, repairing (issue 9).
async fn start_group(
    id: NodeId,
    engine: &Arc<Engine>,
    router: &Router,
    group: GroupId,
    directory: &Arc<Directory>,
) -> Result<(ChatRaft, Arc<RepairStatus>, LogReader, Arc<GroupShared>), String> {
    let mut attempts = 0;
    loop {
        match start_group_once(id, engine, router, group).await {
            Ok(started) => return Ok(started),
            Err(e) if attempts < chatlog_raft::damage_watch::START_CUTS_MAX => {
                attempts += 1;
                match chatlog_raft::damage_watch::cut_damaged_group_logs(engine, group).await {
                    Ok(true) => {
                        eprintln!("node {id} group {group}: START FOUND DAMAGE ({e}); cut");
                        directory.found_at_start.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Puts a started replica of `group` ([`start_group`]) where the node finds it: its
/// reader, its repair status and its Raft instance.
fn register(
    readers: &Mutex<HashMap<GroupId, (LogReader, Arc<GroupShared>)>>,
    directory: &Directory,
    group: GroupId,
    (raft, repair, reader, shared): (ChatRaft, Arc<RepairStatus>, LogReader, Arc<GroupShared>),
) {
    readers
        .lock()
        .expect("lock")
        .insert(group, (reader, shared));
    directory
        .repairs
        .lock()
        .expect("lock")
        .insert(group, repair);
    directory.rafts.lock().expect("lock").insert(group, raft);
}

async fn start_group_once(
    id: NodeId,
    engine: &Arc<Engine>,
    router: &Router,
    group: GroupId,
) -> Result<(ChatRaft, Arc<RepairStatus>, LogReader, Arc<GroupShared>), String> {
    let mut store = LogStore::open(Arc::clone(engine), group)
        .map_err(|e| format!("node {id} group {group}: the log does not open: {e}"))?;
    store
        .persist_recovered_state()
        .await
        .map_err(|e| format!("node {id} group {group}: the recovered state is not saved: {e}"))?;
    let repair = store.repair_status();
    let reader = store.get_log_reader().await;
    let sm = ChatStateMachine::open(
        Arc::clone(engine),
        group,
        SmConfig {
            // Often, so cuts land in checkpoint writes too.
            checkpoint_every_entries: 40,
            ..Default::default()
        },
    )
    .map_err(|e| format!("node {id} group {group}: the state does not open: {e}"))?
    // As in production (`node.rs`): snapshots carry the log range and installing one
    // writes it as history. Without it a replica sent a snapshot held the state but not
    // the entries below it, and its next append re-anchored its log past its history.
    .with_log(reader.clone());
    let shared = sm.shared();
    let raft = ChatRaft::new(id, raft_config(), router.network_factory(group), store, sm)
        .await
        .map_err(|e| format!("node {id} group {group}: raft does not start: {e}"))?;
    hold_elections_while_repairing(&raft, &repair);
    Ok((raft, repair, reader, shared))
}

impl TestNode {
    /// Issue 9: what `chatlog_raft::damage_watch` does for a node: the replica of `group`,
    /// whose Raft log a read found damaged, is stopped, cut before the damage and started
    /// again, repairing. Returns the first index dropped.
    async fn restart_damaged_group(&self, group: GroupId) -> Option<u64> {
        let raft = self.directory.rafts.lock().expect("lock").remove(&group)?;
        let _ = timeout(WAIT, raft.shutdown()).await;
        drop(raft);
        let cut = chatlog_raft::damage_watch::cut_damaged_raft_log(&self.engine, group)
            .await
            .expect("the damaged log is cut");
        chatlog_raft::damage_watch::cut_damaged_checkpoint_log(&self.engine, group)
            .await
            .expect("the damaged checkpoint log is cut");
        let (raft, repair, reader, shared) =
            start_group(self.id, &self.engine, &self.router, group, &self.directory)
                .await
                .expect("the damaged replica starts again");
        register(
            &self.readers,
            &self.directory,
            group,
            (raft, repair, reader, shared),
        );
        cut
    }

    /// Issue 9 (session 7): what `chatlog_raft::vote_probe` does for a node: each
    /// vote-unknown replica probes every other voter until it can decide, then restarts
    /// with the decided vote and marker written. Returns the groups probed.
    async fn finish_vote_probes(&self, seed: u64) -> Vec<GroupId> {
        let mut probed = Vec::new();
        for group in GROUPS {
            let unknown = self.directory.repairs.lock().expect("lock")[&group].is_vote_unknown();
            if !unknown {
                continue;
            }
            let deadline = Instant::now() + WAIT;
            let decision = loop {
                let raft = self.raft(group);
                match chatlog_raft::vote_probe::probe_voters(self.id, &self.router, group, &raft)
                    .await
                {
                    Ok(d) => break d,
                    Err(why) => {
                        assert!(
                            Instant::now() < deadline,
                            "seed={seed}: node {} group {group}: probe never decided: {why}",
                            self.id
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            let batch = chatlog_raft::vote_probe::finish_batch(&self.engine, group, &decision)
                .expect("the decided vote is not below the stored one");
            let raft = self.directory.rafts.lock().expect("lock").remove(&group);
            if let Some(raft) = raft {
                let _ = timeout(WAIT, raft.shutdown()).await;
            }
            self.engine
                .write(&batch)
                .await
                .expect("the probed vote is saved");
            let (raft, repair, reader, shared) =
                start_group(self.id, &self.engine, &self.router, group, &self.directory)
                    .await
                    .expect("the probed replica starts again");
            eprintln!(
                "seed={seed}: node {} group {group}: PROBED {decision:?}; now {:?}",
                self.id,
                repair.damage()
            );
            assert!(
                !repair.is_vote_unknown(),
                "seed={seed}: probed once is enough"
            );
            register(
                &self.readers,
                &self.directory,
                group,
                (raft, repair, reader, shared),
            );
            probed.push(group);
        }
        probed
    }

    fn reader(&self, group: GroupId) -> (LogReader, Arc<GroupShared>) {
        self.readers.lock().expect("lock")[&group].clone()
    }

    fn raft(&self, group: GroupId) -> ChatRaft {
        self.directory
            .raft(group)
            .expect("the node holds the group")
    }

    async fn start(
        id: NodeId,
        dir: &Path,
        listener: TcpListener,
        fs: &FaultyFileSystem,
    ) -> Result<TestNode, String> {
        let mut engine_config = EngineConfig::new(dir);
        // Small segments: cuts land in seals, checkpoints and segment creation too.
        engine_config.segment_bytes = 256 << 10;
        // As in production (`node::Node::start_with`).
        engine_config.recovery_mode = RecoveryMode::CutDamagedTail;
        let engine = Arc::new(
            Engine::open_with(engine_config, Arc::new(fs.clone()))
                .map_err(|e| format!("node {id}: the engine does not open: {e}"))?,
        );
        let identity = NodeIdentity::new(CLUSTER_ID, id);
        let router = Router::new(identity);
        let directory = Arc::new(Directory::default());
        let readers = Mutex::new(HashMap::new());
        for group in GROUPS {
            let started = start_group(id, &engine, &router, group, &directory).await?;
            register(&readers, &directory, group, started);
        }
        let addr = listener.local_addr().expect("local addr");
        let (stop_server, stopped) = oneshot::channel();
        let server = tokio::spawn(serve(
            listener,
            identity,
            Arc::clone(&directory) as Arc<dyn GroupDirectory>,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(TestNode {
            id,
            addr,
            engine,
            router,
            directory,
            readers,
            stop_server,
            server,
        })
    }

    /// Stops a node whose power is gone (or not): nothing it does may hang the test.
    async fn stop(self) {
        let _ = self.stop_server.send(());
        let _ = timeout(WAIT, self.server).await;
        let rafts: Vec<ChatRaft> = self
            .directory
            .rafts
            .lock()
            .expect("lock")
            .drain()
            .map(|(_, raft)| raft)
            .collect();
        for raft in &rafts {
            let _ = timeout(WAIT, raft.shutdown()).await;
        }
        drop(rafts);
        drop(self.readers);
        self.router.shutdown();
        // The engine goes with its last handle; a dead one fails its calls, never hangs.
        let engine = self.engine;
        let _ = tokio::task::spawn_blocking(move || drop(engine)).await;
    }
}

/// The cluster as the writers and the fault loop share it.
struct Cluster {
    root: PathBuf,
    nodes: Mutex<BTreeMap<NodeId, Arc<TestNode>>>,
    /// Each node's disk; replaced by `reboot()` after a cut.
    disks: Mutex<BTreeMap<NodeId, FaultyFileSystem>>,
    addrs: Mutex<BTreeMap<NodeId, SocketAddr>>,
}

impl Cluster {
    fn live(&self) -> Vec<Arc<TestNode>> {
        self.nodes.lock().expect("lock").values().cloned().collect()
    }

    fn introduce(&self) {
        let nodes = self.live();
        for a in &nodes {
            for b in &nodes {
                if a.id != b.id {
                    a.router.set_peer_addr(b.id, b.addr);
                }
            }
        }
    }

    async fn start_node(&self, id: NodeId) {
        let addr = self.addrs.lock().expect("lock").get(&id).copied();
        let listener = match addr {
            None => TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            Some(addr) => timeout(WAIT, async {
                loop {
                    match TcpListener::bind(addr).await {
                        Ok(l) => return l,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
            .await
            .expect("rebinds the old address"),
        };
        let fs = self.disks.lock().expect("lock")[&id].clone();
        let dir = self.root.join(format!("node-{id}"));
        let node = TestNode::start(id, &dir, listener, &fs)
            .await
            .unwrap_or_else(|e| panic!("restart after a power cut: {e}"));
        // A power cut loses only unsynced writes: never damage (issue 9), so no replica
        // may start repairing (a false alarm would cost it its vote for nothing).
        assert!(
            node.engine.damage().is_none(),
            "node {id}: a power cut taken for damage: {:?}",
            node.engine.damage()
        );
        assert_eq!(
            node.directory.found_at_start.load(Ordering::Relaxed),
            0,
            "node {id}: a power cut taken for damage at a replica's start"
        );
        for (g, status) in node.directory.repairs.lock().expect("lock").iter() {
            assert!(
                !status.is_repairing(),
                "node {id} group {g}: a power cut taken for damage: {:?}",
                status.damage()
            );
        }
        self.addrs.lock().expect("lock").insert(id, node.addr);
        self.nodes.lock().expect("lock").insert(id, Arc::new(node));
        self.introduce();
    }

    /// Takes node `id` out of the cluster and stops it.
    async fn remove_node(&self, id: NodeId) {
        let node = self.nodes.lock().expect("lock").remove(&id);
        if let Some(node) = node {
            // Writers may hold a clone for a moment; wait for the last one.
            let deadline = Instant::now() + WAIT;
            let mut node = node;
            loop {
                match Arc::try_unwrap(node) {
                    Ok(n) => {
                        n.stop().await;
                        return;
                    }
                    Err(shared) => {
                        assert!(Instant::now() < deadline, "node {id} still shared");
                        node = shared;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    }

    /// Cuts node `id`'s power now (`None`) or arms it at a seeded I/O call, waits for it,
    /// and returns what the cut undid.
    async fn cut(&self, id: NodeId, how: PowerCut, at_call: Option<u64>) -> PowerCutReport {
        let fs = self.disks.lock().expect("lock")[&id].clone();
        let report = match at_call {
            None => fs.cut_power(how).expect("cut"),
            Some(calls) => {
                fs.cut_power_after(calls, how);
                let deadline = Instant::now() + Duration::from_secs(3);
                loop {
                    let (report, armed) = fs.last_cut();
                    if !armed {
                        break report.expect("fired");
                    }
                    if Instant::now() > deadline {
                        // Too little I/O on this node: cut from outside.
                        break fs.cut_power(how).expect("cut");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        self.disks.lock().expect("lock").insert(id, fs.reboot());
        report
    }

    fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.live()
            .iter()
            .find(|n| n.raft(group).is_leader())
            .map(|n| n.id)
    }
}

fn batch(command: Command) -> ChatBatch {
    ChatBatch(
        Batch {
            timestamp_ms: 1_700_000_000_000,
            commands: vec![command],
        }
        .encode(),
    )
}

/// Proposes `command` in `group` through whichever live node leads, retrying until
/// `within`; the outcome, or `None` if no attempt was confirmed.
async fn propose(
    cluster: &Cluster,
    group: GroupId,
    command: Command,
    within: Duration,
) -> Option<Outcome> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let leaders: Vec<Arc<TestNode>> = cluster
            .live()
            .into_iter()
            .filter(|n| n.raft(group).is_leader())
            .collect();
        for node in leaders {
            let raft = node.raft(group);
            drop(node);
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Ok(resp)) = timeout(
                left.min(Duration::from_secs(3)),
                raft.client_write(batch(command.clone())),
            )
            .await
            {
                return resp.data.outcomes.into_iter().next();
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    None
}

/// A linearizable read of `chat`'s head through the leader (ReadIndex, then the leader's
/// replica applies up to it), recorded for `reads_after_an_ack_see_it`. A read that fails
/// during a fault is not recorded.
async fn linearizable_read(cluster: &Cluster, history: &History, group: GroupId, chat: u64) {
    let invoked = history.tick();
    let Some(node) = cluster
        .live()
        .into_iter()
        .find(|n| n.raft(group).is_leader())
    else {
        return;
    };
    let raft = node.raft(group);
    let read = async {
        let index = chatlog_raft::node::read_index(group, &raft).await.ok()?;
        raft.wait(Some(Duration::from_secs(3)))
            .applied_index_at_least(Some(index), "read index applied")
            .await
            .ok()?;
        node.reader(group).1.read().head_seq(chat)
    };
    if let Ok(Some(head_seq)) = timeout(Duration::from_secs(4), read).await {
        history.record_read(history::Read {
            chat,
            node: node.id,
            invoked,
            head_seq,
            events: Vec::new(),
        });
    }
}

/// Reads every event of `chat` from `node`'s replica of `group` (state index, then the
/// commands from the Raft log); a failed log read is returned as an error.
async fn try_read_chat(node: &TestNode, group: GroupId, chat: u64) -> Result<Vec<Event>, String> {
    let (reader, shared) = node.reader(group);
    replica_events::replica_chat_events(node.id, &reader, &shared, group, chat).await
}

/// Reads a chat from one replica; a read that finds the replica's Raft log damaged (it
/// fails, naming the damage, and never returns the damaged bytes) restarts that replica
/// repairing, as `chatlog_raft::damage_watch` does in a node, waits for the repair and
/// reads again. Returns the events.
async fn read_chat_repairing(
    cluster: &Cluster,
    node: &TestNode,
    group: GroupId,
    chat: u64,
    seed: u64,
) -> Vec<Event> {
    for _ in 0..chatlog_raft::damage_watch::START_CUTS_MAX {
        let error = match try_read_chat(node, group, chat).await {
            Ok(events) => return events,
            Err(e) => e,
        };
        repair_found_damage(cluster, node, group, seed, "read", &error).await;
    }
    panic!(
        "seed={seed}: node {} group {group}: reads keep finding damage",
        node.id
    );
}

/// Reads `node`'s whole Raft log of `group` (a scrub); a read that finds damage restarts
/// the replica repairing and waits for the repair, as [`read_chat_repairing`] does.
async fn scrub_repairing(cluster: &Cluster, node: &TestNode, group: GroupId, seed: u64) {
    for _ in 0..chatlog_raft::damage_watch::START_CUTS_MAX {
        let (mut reader, _) = node.reader(group);
        let Some(last) = node.raft(group).metrics().borrow_watched().last_log_index else {
            return;
        };
        let error = match reader.try_get_log_entries(0..=last).await {
            Ok(_) => return,
            Err(e) => e,
        };
        repair_found_damage(cluster, node, group, seed, "scrub", &error).await;
    }
    panic!(
        "seed={seed}: node {} group {group}: scrubs keep finding damage",
        node.id
    );
}

/// A read (`what`: "read" or "scrub") of `node`'s replica of `group` failed with `error`:
/// asserts that it is damage (the engine stopped the group's log), restarts the replica,
/// asserts that it came back repairing and waits for the repair.
async fn repair_found_damage(
    cluster: &Cluster,
    node: &TestNode,
    group: GroupId,
    seed: u64,
    what: &str,
    error: &dyn std::fmt::Display,
) {
    let log = chatlog_raft::ids::raft_log(group).expect("a group log");
    assert!(
        node.engine.log_failure(log).is_some(),
        "seed={seed}: node {} group {group}: a failed {what} that is not damage: {error}",
        node.id
    );
    eprintln!(
        "seed={seed}: node {} group {group}: {} FOUND DAMAGE: {error}",
        node.id,
        what.to_uppercase()
    );
    node.directory.found_by_read.fetch_add(1, Ordering::Relaxed);
    let cut = node.restart_damaged_group(group).await;
    let status = node.directory.repairs.lock().expect("lock")[&group].clone();
    assert!(
        status.is_repairing(),
        "seed={seed}: node {} group {group}: restarted after damage (cut from {cut:?}) \
         but not repairing",
        node.id
    );
    wait_repaired(cluster, node, group, seed).await;
}

/// Waits until `node`'s replica of `group` is repaired and has applied what the leader
/// holds (one more post moves the group past any lost, never-committed tail).
async fn wait_repaired(cluster: &Cluster, node: &TestNode, group: GroupId, seed: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = node.directory.repairs.lock().expect("lock")[&group].clone();
        if !status.is_repairing() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed={seed}: node {} group {group} still repairing: {:?}",
            node.id,
            status.damage()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = cluster.leader(group).expect("a leader");
    let index = cluster.nodes.lock().expect("lock")[&leader]
        .raft(group)
        .metrics()
        .borrow_watched()
        .last_log_index;
    node.raft(group)
        .wait(Some(WAIT))
        .applied_index_at_least(index, "repaired replica catches up")
        .await
        .unwrap_or_else(|e| panic!("seed={seed}: node {} group {group}: {e}", node.id));
}

/// A chat of the test: its group, id and two members.
type TestChat = (GroupId, u64, Vec<u64>);

/// Starts the three nodes with their disks under `root` and creates one chat per group.
async fn start_with_chats(root: &Path, seed: u64) -> (Arc<Cluster>, Vec<TestChat>) {
    let cluster = Arc::new(Cluster {
        root: root.to_path_buf(),
        nodes: Mutex::default(),
        disks: Mutex::new(
            NODES
                .iter()
                .map(|&id| (id, FaultyFileSystem::with_power_cuts(seed ^ id)))
                .collect(),
        ),
        addrs: Mutex::default(),
    });
    for id in NODES {
        cluster.start_node(id).await;
    }
    let voters: BTreeSet<NodeId> = NODES.into_iter().collect();
    for group in GROUPS {
        let first = cluster.nodes.lock().expect("lock")[&(group % 3 + 1)].raft(group);
        first.initialize(voters.clone()).await.expect("initialize");
    }
    // One chat per group with two members.
    let mut chats = Vec::new();
    for group in GROUPS {
        let mut users = Vec::new();
        for name in ["alice", "bob"] {
            let cmd = Command::CreateUser {
                name: format!("{name}{group}"),
                login_token_hash: [0; 32],
            };
            match propose(&cluster, group, cmd, WAIT).await {
                Some(Outcome::UserCreated { user }) => users.push(user),
                o => panic!("create user: {o:?}"),
            }
        }
        let cmd = Command::CreateChat {
            creator: users[0],
            kind: ChatKind::Group,
            title: format!("chat {group}"),
            members: vec![users[1]],
        };
        match propose(&cluster, group, cmd, WAIT).await {
            Some(Outcome::Event { chat, .. }) => chats.push((group, chat, users)),
            o => panic!("create chat: {o:?}"),
        }
    }

    (cluster, chats)
}

/// Heals: one more post per chat through its leader, every live replica applies it,
/// then every replica's chat logs go through every history checker (panics naming the
/// violated properties). Returns the number of acknowledged sends.
async fn heal_and_check(
    cluster: &Cluster,
    chats: &[TestChat],
    history: &History,
    seed: u64,
) -> usize {
    // Heal: one more post per chat through the leader, then every replica applies it.
    for (group, chat, users) in chats {
        let cmid = u64::MAX - group;
        let outcome = post_recorded(
            cluster,
            history,
            *group,
            *chat,
            users[0],
            cmid,
            "final".into(),
            WAIT,
        )
        .await;
        assert!(
            matches!(outcome, history::Outcome::Acked { .. }),
            "seed={seed}: the final post to chat {chat} was not acknowledged: {outcome:?}"
        );
        let leader = cluster.leader(*group).expect("a leader");
        let metrics = cluster.nodes.lock().expect("lock")[&leader]
            .raft(*group)
            .metrics();
        let index = metrics.borrow_watched().last_log_index.expect("an entry");
        for node in cluster.live() {
            node.raft(*group)
                .wait(Some(WAIT))
                .applied_index_at_least(Some(index), "catch up after the faults")
                .await
                .unwrap_or_else(|e| panic!("seed={seed}: node {} group {group}: {e}", node.id));
        }
    }
    for node in cluster.live() {
        for (group, chat, _) in chats {
            let events = read_chat_repairing(cluster, &node, *group, *chat, seed).await;
            history.record_log(node.id, *chat, events);
        }
    }
    let sends = history.sends.lock().unwrap().clone();
    let acked = sends
        .iter()
        .filter(|s| matches!(s.outcome, history::Outcome::Acked { .. }))
        .count();
    let unknown = sends
        .iter()
        .filter(|s| matches!(s.outcome, history::Outcome::Unknown))
        .count();
    eprintln!(
        "seed={seed}: {} sends ({acked} acknowledged, {unknown} unknown), {} linearizable reads",
        sends.len(),
        history.reads.lock().unwrap().len()
    );
    let mut failed = Vec::new();
    for (property, violations) in history::check_all(history) {
        for v in violations.iter().take(10) {
            eprintln!("VIOLATION {property}: {v}");
        }
        if !violations.is_empty() {
            failed.push(property);
        }
    }
    assert!(failed.is_empty(), "seed={seed}: violated {failed:?}");
    acked
}

/// After [`heal_and_check`] in the power-cut test: the checker read every chat's first
/// events from below openraft's purge mark on some replica (the history, see
/// [`SNAPSHOT_EVERY`]), and every replica still holds its log from the first entry.
fn check_history_kept(cluster: &Cluster, chats: &[TestChat], seed: u64) {
    for (group, chat, _) in chats {
        let below_purge = cluster.live().iter().any(|node| {
            let (reader, shared) = node.reader(*group);
            let first = shared.read().chat_events(*chat, 1, 1).unwrap_or_default();
            let purged = reader.retained_bounds().1.map(|p| p.index);
            first
                .first()
                .is_some_and(|(_, loc)| purged.is_some_and(|p| loc.raft_index() <= p))
        });
        assert!(
            below_purge,
            "seed={seed}: group {group}: no replica purged below chat {chat}'s first event"
        );
    }
    // Nothing deletes history here (retention's mark stays 0): every replica holds its
    // group's log from the first entry, snapshots it was sent included (their range).
    for node in cluster.live() {
        for group in GROUPS {
            let bounds = node.reader(group).0.retained_bounds();
            assert_eq!(
                bounds.0,
                Some(0),
                "seed={seed}: node {} group {group}: history lost; (first held, purged, \
                 last) = {bounds:?}",
                node.id
            );
        }
    }
}

/// Posts `text` to `chat` as `sender` with client message id `cmid` (retrying through
/// leader changes for up to `within`), records the send and its outcome in `history`,
/// and returns the outcome.
#[allow(clippy::too_many_arguments)]
async fn post_recorded(
    cluster: &Cluster,
    history: &History,
    group: GroupId,
    chat: u64,
    sender: u64,
    cmid: u64,
    text: String,
    within: Duration,
) -> history::Outcome {
    let invoked = history.tick();
    let cmd = Command::Post {
        chat,
        sender,
        client_message_id: cmid,
        text: text.clone(),
        media: None,
        reply_to: 0,
    };
    let outcome = match propose(cluster, group, cmd, within).await {
        Some(Outcome::Event { seq, .. }) => history::Outcome::Acked { seq },
        Some(o) => history::Outcome::Refused {
            code: format!("{o:?}"),
        },
        None => history::Outcome::Unknown,
    };
    history.record_send(Send {
        chat,
        sender,
        cmid,
        text,
        outcome: outcome.clone(),
        invoked,
        completed: history.tick(),
    });
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_posts_survive_power_cuts_under_raft() {
    let seed = seed();
    eprintln!("seed={seed}");
    let window = Duration::from_secs(
        std::env::var("CHATLOG_POWERCUT_SECS")
            .ok()
            .map(|v| v.parse().expect("CHATLOG_POWERCUT_SECS must be a number"))
            .unwrap_or(12),
    );
    let mut rng = Rng(seed);
    let root = tempfile::tempdir().expect("temp dir");
    let (cluster, chats) = start_with_chats(root.path(), seed).await;
    let history = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (cluster, history, stop) = (cluster.clone(), history.clone(), stop.clone());
        let chats = chats.clone();
        let mut wrng = Rng(seed.wrapping_add(w + 1));
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let (group, chat, users) = &chats[wrng.below(chats.len() as u64) as usize];
                let sender = users[wrng.below(2) as usize];
                let cmid = (w + 1) << 32 | n;
                let text = format!("w{w}.{n}");
                post_recorded(
                    &cluster, &history, *group, *chat, sender, cmid, text, SEND_RETRY,
                )
                .await;
                if n.is_multiple_of(8) {
                    linearizable_read(&cluster, &history, *group, *chat).await;
                }
            }
        }));
    }

    // The faults.
    let started = Instant::now();
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut dropped, mut kept) = (0u64, 0u64);
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(600 + rng.below(1200))).await;
        let how = match rng.below(3) {
            0 => PowerCut::DropUnsynced,
            1 => PowerCut::Torn,
            _ => PowerCut::Scrambled,
        };
        let victims: Vec<NodeId> = if rng.below(6) == 0 {
            *faults.entry("power cut, all three nodes").or_default() += 1;
            NODES.to_vec()
        } else {
            let group = GROUPS[rng.below(GROUPS.len() as u64) as usize];
            let victim = match cluster.leader(group) {
                Some(l) if rng.below(3) < 2 => {
                    *faults.entry("power cut, leader").or_default() += 1;
                    l
                }
                _ => {
                    *faults.entry("power cut, one node").or_default() += 1;
                    NODES[rng.below(3) as usize]
                }
            };
            vec![victim]
        };
        let at_call = if rng.below(4) == 0 {
            None
        } else {
            Some(rng.below(300))
        };
        for &victim in &victims {
            let report = cluster.cut(victim, how, at_call).await;
            eprintln!(
                "t={:.1}s power cut ({how:?}, at call {at_call:?}) on node {victim}: {report:?}",
                started.elapsed().as_secs_f64()
            );
            dropped += report.bytes_dropped;
            kept += report.bytes_kept;
        }
        for &victim in &victims {
            cluster.remove_node(victim).await;
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
        for &victim in &victims {
            cluster.start_node(victim).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        timeout(WAIT, w)
            .await
            .expect("writer ends")
            .expect("writer");
    }

    // One node is away while each group moves on past the next snapshot and purge: it
    // comes back behind the leaders' purge marks and is sent a snapshot, with its range
    // (checked by `check_history_kept`).
    let away = NODES[(seed % 3) as usize];
    cluster.remove_node(away).await;
    for (group, chat, users) in &chats {
        for n in 0..2 * (SNAPSHOT_EVERY + LOGS_KEPT) {
            let cmid = (WRITERS + 1) << 32 | n;
            let text = format!("away.{n}");
            post_recorded(
                &cluster, &history, *group, *chat, users[0], cmid, text, SEND_RETRY,
            )
            .await;
        }
    }
    cluster.start_node(away).await;

    let acked = heal_and_check(&cluster, &chats, &history, seed).await;
    check_history_kept(&cluster, &chats, seed);
    eprintln!(
        "seed={seed}: faults {faults:?}; {dropped} unsynced bytes dropped, \
         {kept} kept by torn or scrambled cuts"
    );
    assert!(acked >= 50, "seed={seed}: only {acked} sends acknowledged");
    assert!(!faults.is_empty(), "seed={seed}: no fault injected");
    for id in NODES {
        cluster.remove_node(id).await;
    }
}

/// What the damage test does to one replica's files while it is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    /// One byte flipped in the body of the newest segment's last record.
    FlipInLastRecord,
    /// One byte flipped in the body of a record in the middle of the newest segment.
    FlipInEarlierRecord,
    /// The newest segment file cut at the start of its middle record.
    TruncateSegment,
    /// As if the node crashed right after acknowledging its last Raft append (the records
    /// after it zeroed), then one byte of that record's body flipped: indistinguishable
    /// from a torn, never-acknowledged write at recovery (the double fault that still
    /// escapes detection, `chatlog_raft::repair`).
    FlipInLastAppend,
    /// One byte flipped in the last record holding a Raft append, the records after it
    /// (which carry its group's "synced" marker or committed mark) kept: the last data
    /// record of a replica that acknowledged it.
    FlipInLastAppendVouched,
    /// Session 6: one byte flipped in a record holding Raft appends in an OLDER, sealed
    /// segment that the engine's checkpoint covers: not read at open, found by the first
    /// read of it (at the replica's start, or by a chat read or the scrub while running).
    FlipInOlderSegment,
    /// The same flip with the engine's checkpoint file gone too: recovery replays the
    /// older segment and cuts at open, later segments replayed without what no longer
    /// fits.
    FlipInOlderSegmentNoCheckpoint,
    /// An older, sealed segment file cut at the start of its middle Raft append record.
    TruncateOlderSegment,
    /// An older, sealed segment file deleted.
    MissingOlderSegment,
    /// `FlipInOlderSegment`, and the damaged replica made leader of group 1 before a read
    /// finds the damage: it must stop leading, and the group elects another leader.
    FlipInOlderSegmentOnLeader,
    /// Session 7: the NEWEST segment file deleted (the seal of the segment before it, or
    /// the engine checkpoint, names it; the victim's segment is rotated first so one
    /// does). Like `TruncateSegment`, every replica of the node is then vote-unknown and
    /// probes its voters (`chatlog_raft::vote_probe`).
    MissingNewestSegment,
}

impl Damage {
    /// Whether it hits an older segment (the victim's segment is rotated first).
    /// Whether the node loses its newest records, not knowing what they held (session 7:
    /// every replica vote-unknown until probed).
    fn tail_lost(self) -> bool {
        matches!(self, Damage::TruncateSegment | Damage::MissingNewestSegment)
    }

    fn older(self) -> bool {
        matches!(
            self,
            Damage::FlipInOlderSegment
                | Damage::FlipInOlderSegmentNoCheckpoint
                | Damage::TruncateOlderSegment
                | Damage::MissingOlderSegment
                | Damage::FlipInOlderSegmentOnLeader
        )
    }
}

/// Offsets and lengths of the valid records of a segment file, first to last, and which
/// of the test's groups' Raft logs each appends to (bit `g` for group `g`; 0: none).
fn records(path: &Path) -> Vec<(u64, u64, u32)> {
    use chatlog_storage::format::{
        BatchBody, OpKind, RECORD_KIND_BATCH, RecordHeader, SEGMENT_HEADER_BYTES, SegmentHeader,
        decode_body,
    };
    let bytes = std::fs::read(path).expect("read segment");
    let Ok(head) = SegmentHeader::decode(&bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_BYTES;
    while let Some(h) = bytes
        .get(at..)
        .and_then(|b| RecordHeader::decode(head.salt, b))
    {
        let start = at + 40;
        let body = bytes::Bytes::copy_from_slice(&bytes[start..start + h.body_len as usize]);
        let mut appends = 0u32;
        if h.kind == RECORD_KIND_BATCH
            && let Some(b) = decode_body(&h, body)
                .ok()
                .and_then(|raw| BatchBody::parse(raw).ok())
        {
            for k in 0..b.op_count() {
                let op = b.op(k);
                for g in GROUPS {
                    if op.kind == OpKind::Append
                        && chatlog_raft::ids::raft_log(g) == Some(op.log_id)
                    {
                        appends |= 1 << g;
                    }
                }
            }
        }
        out.push((at as u64, h.record_bytes() as u64, appends));
        at += h.record_bytes();
    }
    out
}

/// Damages the newest segment holding records in `dir`; returns what was done.
fn damage(dir: &Path, how: Damage) -> String {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .filter(|p| !records(p).is_empty())
        .collect();
    segments.sort();
    let newest = segments.pop().expect("a segment with records");
    // The groups whose appends the damaged record must hold (see below).
    let wanted = if how == Damage::FlipInOlderSegmentOnLeader {
        1 << 1
    } else {
        u32::MAX
    };
    let path = if how.older() {
        // The segment before the newest, holding Raft appends.
        segments
            .into_iter()
            .rev()
            .find(|p| records(p).iter().any(|r| r.2 & wanted != 0))
            .expect("an older segment with Raft appends")
    } else {
        newest
    };
    let recs = records(&path);
    if how == Damage::MissingNewestSegment {
        std::fs::remove_file(&path).expect("remove segment");
        return format!(
            "{how:?}: {} ({} records) deleted",
            path.display(),
            recs.len()
        );
    }
    if how == Damage::MissingOlderSegment {
        std::fs::remove_file(&path).expect("remove segment");
        return format!(
            "{how:?}: {} ({} records) deleted",
            path.display(),
            recs.len()
        );
    }
    if how == Damage::FlipInOlderSegmentNoCheckpoint {
        std::fs::remove_file(dir.join("checkpoint")).expect("remove the engine checkpoint");
    }
    let (offset, len, _) = match how {
        Damage::FlipInLastRecord => recs[recs.len() - 1],
        Damage::FlipInEarlierRecord | Damage::TruncateSegment => recs[recs.len() / 2],
        Damage::FlipInLastAppend | Damage::FlipInLastAppendVouched => {
            *recs.iter().rev().find(|r| r.2 != 0).expect("an append")
        }
        Damage::FlipInOlderSegment
        | Damage::FlipInOlderSegmentNoCheckpoint
        | Damage::TruncateOlderSegment
        | Damage::MissingOlderSegment
        | Damage::MissingNewestSegment => {
            let appends: Vec<_> = recs.iter().filter(|r| r.2 != 0).collect();
            *appends[appends.len() / 2]
        }
        Damage::FlipInOlderSegmentOnLeader => {
            // A record holding group 1's entries: the read that must find the damage
            // reads group 1's log (a record of group 2's alone, as a group commit under
            // load may write, would leave that read clean).
            let appends: Vec<_> = recs.iter().filter(|r| r.2 & (1 << 1) != 0).collect();
            *appends[appends.len() / 2]
        }
    };
    let mut bytes = std::fs::read(&path).expect("read");
    match how {
        Damage::FlipInLastAppend => {
            bytes[(offset + len) as usize..].fill(0);
            let at = (offset + 40 + (len - 40) / 2) as usize;
            bytes[at] ^= 0x10;
        }
        Damage::FlipInLastRecord
        | Damage::FlipInEarlierRecord
        | Damage::FlipInLastAppendVouched
        | Damage::FlipInOlderSegment
        | Damage::FlipInOlderSegmentNoCheckpoint
        | Damage::FlipInOlderSegmentOnLeader
        | Damage::MissingOlderSegment
        | Damage::MissingNewestSegment => {
            // Inside the body, past the 40-byte header.
            let at = (offset + 40 + (len - 40) / 2) as usize;
            bytes[at] ^= 0x10;
        }
        Damage::TruncateSegment | Damage::TruncateOlderSegment => bytes.truncate(offset as usize),
    }
    std::fs::write(&path, &bytes).expect("write");
    format!(
        "{how:?} in {} at {offset} (record {} of {})",
        path.display(),
        recs.iter().position(|r| r.0 == offset).expect("a record") + 1,
        recs.len()
    )
}

/// Posts `count` messages spread over the chats, all acknowledged.
async fn post_many(
    cluster: &Cluster,
    chats: &[TestChat],
    history: &History,
    count: u64,
    tag: &str,
) {
    for n in 0..count {
        let (group, chat, users) = &chats[(n % chats.len() as u64) as usize];
        let cmid = (0xD0 << 32) | n | (u64::from(tag.len() as u8) << 24);
        let text = format!("{tag}.{n}");
        let outcome =
            post_recorded(cluster, history, *group, *chat, users[0], cmid, text, WAIT).await;
        assert!(
            matches!(outcome, history::Outcome::Acked { .. }),
            "post {n} not acknowledged: {outcome:?}"
        );
    }
}

/// Bit flips and a truncated segment on one replica (a follower, while the others keep
/// serving). What must hold: the damaged bytes are never served, and no acknowledged post
/// is lost on any replica (the history checkers, every replica). A flip in the newest
/// segment is cut at recovery (`RecoveryMode::CutDamagedTail`); a replica whose log
/// thereby lost entries it had made durable (the "synced" marker or the records cut after
/// the damaged one say so) starts repairing: no votes, no campaign, no reads until the
/// leader sent them back, then it ends identical to the others. The newest segment cut
/// short is still refused at open, naming file and offset (nothing says what its lost
/// tail held). Session 6: damage in an OLDER segment (a flip, the file cut short or
/// deleted) is cut too, at open or by the first read that finds them (the replica's own
/// start, or a read while it runs: the replica is then stopped, cut before the damage and
/// started again, repairing — `chatlog_raft::damage_watch`). `CHATLOG_DAMAGE=last-record`
/// runs only the last-record cases, `CHATLOG_DAMAGE=older` only the older-segment ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_replica_never_serves_the_damaged_range() {
    let seed = seed();
    eprintln!("seed={seed}");
    let last_record = vec![
        Damage::FlipInLastAppendVouched,
        Damage::FlipInLastRecord,
        Damage::FlipInLastAppend,
    ];
    let older = vec![
        Damage::FlipInOlderSegmentOnLeader,
        Damage::FlipInOlderSegment,
        Damage::FlipInOlderSegmentNoCheckpoint,
        Damage::TruncateOlderSegment,
        Damage::MissingOlderSegment,
    ];
    let damages: Vec<Damage> = match std::env::var("CHATLOG_DAMAGE").ok().as_deref() {
        Some("last-record") => last_record,
        Some("older") => older,
        Some("newest") => vec![Damage::TruncateSegment, Damage::MissingNewestSegment],
        _ => [
            last_record,
            vec![
                Damage::FlipInEarlierRecord,
                Damage::TruncateSegment,
                Damage::MissingNewestSegment,
            ],
            older,
        ]
        .concat(),
    };
    for how in damages {
        let root = tempfile::tempdir().expect("temp dir");
        let (cluster, chats) = start_with_chats(root.path(), seed).await;
        let history = History::default();
        post_many(&cluster, &chats, &history, 60, "before").await;
        let leader = cluster.leader(1).expect("a leader");
        let victim = NODES
            .into_iter()
            .find(|n| *n != leader)
            .expect("a follower");
        if how.older() || how == Damage::MissingNewestSegment {
            // Seal the victim's segment (its engine checkpoint then covers it) and write
            // on, so the damage lands in an older segment.
            let engine = Arc::clone(&cluster.nodes.lock().expect("lock")[&victim].engine);
            tokio::task::spawn_blocking(move || engine.rotate_blocking())
                .await
                .expect("join")
                .expect("rotate");
            post_many(&cluster, &chats, &history, 20, "after-the-seal").await;
        }
        // The group's whole log: the highest last index of any replica (the leader's),
        // not the victim's own metrics, which can lag an append its engine already holds
        // (a flip in that append, taken for vouched, was then cut as a torn tail:
        // seed 1795533839455176846).
        let last_before: Vec<Option<u64>> = GROUPS
            .iter()
            .map(|g| {
                let nodes = cluster.nodes.lock().expect("lock");
                nodes
                    .values()
                    .map(|n| n.raft(*g).metrics().borrow_watched().last_log_index)
                    .max()
                    .flatten()
            })
            .collect();
        // The victim crashes once its "synced" markers vouch for everything it holds (the
        // marker writer follows each flush): `FlipInLastAppend` zeroes them again to model
        // a crash before them.
        let victim_node = Arc::clone(&cluster.nodes.lock().expect("lock")[&victim]);
        for (g, last) in GROUPS.iter().zip(&last_before) {
            let log = chatlog_raft::ids::raft_log(*g).expect("a group log");
            let vouched = || {
                victim_node
                    .engine
                    .meta(log, chatlog_raft::repair::META_SYNCED)
                    .and_then(|b| chatlog_raft::repair::decode_synced(&b))
                    >= *last
            };
            let deadline = Instant::now() + WAIT;
            while !vouched() {
                assert!(
                    Instant::now() < deadline,
                    "seed={seed}: no marker for group {g}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        drop(victim_node);
        cluster.remove_node(victim).await;
        let what = damage(&root.path().join(format!("node-{victim}")), how);
        post_many(&cluster, &chats, &history, 20, "while-down").await;
        let fs = cluster.disks.lock().expect("lock")[&victim].clone();
        let addr = cluster.addrs.lock().expect("lock")[&victim];
        let listener = TcpListener::bind(addr).await.expect("rebind");
        let dir = root.path().join(format!("node-{victim}"));
        let mut repairing_at_start = Vec::new();
        match TestNode::start(victim, &dir, listener, &fs).await {
            Err(e) => {
                panic!("seed={seed}: {what}: node {victim} REFUSES TO START: {e}");
            }
            Ok(node) => {
                let last_after: Vec<Option<u64>> = GROUPS
                    .iter()
                    .map(|g| {
                        let log = chatlog_raft::ids::raft_log(*g).expect("a group log");
                        // Engine index i + 1 holds Raft index i.
                        node.engine
                            .bounds(log)
                            .and_then(|b| b.last())
                            .map(|i| i - 1)
                    })
                    .collect();
                for g in GROUPS {
                    if let Some(d) = node.directory.repairs.lock().expect("lock")[&g].damage() {
                        eprintln!("seed={seed}: {what}: node {victim} REPAIRING: {d}");
                        repairing_at_start.push(g);
                    }
                }
                eprintln!(
                    "seed={seed}: {what}: node {victim} STARTS (engine cut: {:?}); last log \
                     index per group before {last_before:?}, after reopening {last_after:?}; \
                     repairing groups {repairing_at_start:?}",
                    node.engine.damage().map(|d| d.to_string())
                );
                if matches!(
                    how,
                    Damage::FlipInLastAppendVouched
                        | Damage::FlipInEarlierRecord
                        | Damage::FlipInOlderSegmentNoCheckpoint
                        | Damage::MissingOlderSegment
                ) {
                    assert!(
                        node.engine.damage().is_some(),
                        "seed={seed}: {what}: a flip followed by later writes is cut as damage"
                    );
                    assert!(
                        !repairing_at_start.is_empty(),
                        "seed={seed}: {what}: the cut lost durable entries of some group, \
                         which must repair"
                    );
                }
                if how.tail_lost() {
                    // Session 7: nothing says what the lost tail held: every replica of
                    // the node is vote-unknown until it has probed its voters.
                    assert_eq!(
                        node.engine.damage().map(|d| d.tail_lost),
                        Some(true),
                        "seed={seed}: {what}: the tail loss is reported"
                    );
                    for g in GROUPS {
                        let r = &node.directory.repairs.lock().expect("lock")[&g];
                        assert!(
                            r.is_vote_unknown(),
                            "seed={seed}: {what}: group {g} is vote-unknown: {:?}",
                            r.damage()
                        );
                    }
                }
                let node = Arc::new(node);
                cluster
                    .nodes
                    .lock()
                    .expect("lock")
                    .insert(victim, Arc::clone(&node));
                cluster.introduce();
                if how.tail_lost() {
                    let probed = node.finish_vote_probes(seed).await;
                    assert_eq!(probed, GROUPS.to_vec(), "seed={seed}: {what}");
                }
            }
        }
        if how == Damage::FlipInOlderSegmentOnLeader {
            // The damaged replica (its damage not found yet) leads group 1 when a read
            // finds it: it must stop leading.
            let victim_node = Arc::clone(&cluster.nodes.lock().expect("lock")[&victim]);
            let deadline = Instant::now() + WAIT;
            while !victim_node.raft(1).is_leader() {
                assert!(
                    Instant::now() < deadline,
                    "seed={seed}: node {victim} never leads group 1"
                );
                if let Some(l) = cluster.leader(1) {
                    let raft = cluster.nodes.lock().expect("lock")[&l].raft(1);
                    let _ = raft.trigger().transfer_leader(victim).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("seed={seed}: {what}: node {victim} LEADS group 1 with the damage unseen");
            assert!(
                victim_node
                    .directory
                    .repairs
                    .lock()
                    .expect("lock")
                    .values()
                    .all(|r| !r.is_repairing()),
                "seed={seed}: {what}: the damage is meant to be unseen until read"
            );
            scrub_repairing(&cluster, &victim_node, 1, seed).await;
            let leader_after = cluster.leader(1);
            eprintln!(
                "seed={seed}: {what}: after the read found the damage, group 1 is led by \
                 {leader_after:?}"
            );
            assert!(
                victim_node.directory.found_by_read.load(Ordering::Relaxed) > 0,
                "seed={seed}: {what}: the read found the damage"
            );
            assert!(
                leader_after.is_some_and(|l| l != victim),
                "seed={seed}: {what}: another node leads group 1 after the damaged leader \
                 stopped: {leader_after:?}"
            );
            drop(victim_node);
        }
        // Session 6: read every replica's whole Raft log (damage not found at open is
        // found here, and the replica restarted repairing), then heal and check.
        for node in cluster.live() {
            for g in GROUPS {
                scrub_repairing(&cluster, &node, g, seed).await;
            }
        }
        let acked = heal_and_check(&cluster, &chats, &history, seed).await;
        assert!(acked >= 80);
        let victim_node = cluster.nodes.lock().expect("lock").get(&victim).cloned();
        if let Some(node) = victim_node {
            let found_at_start = node.directory.found_at_start.load(Ordering::Relaxed);
            let found_by_read = node.directory.found_by_read.load(Ordering::Relaxed);
            eprintln!(
                "seed={seed}: {what}: node {victim}: damage found at its start {found_at_start} \
                 time(s), by a read while running {found_by_read} time(s)"
            );
            if matches!(
                how,
                Damage::FlipInOlderSegment | Damage::TruncateOlderSegment
            ) {
                assert!(
                    found_at_start + found_by_read > 0 || !repairing_at_start.is_empty(),
                    "seed={seed}: {what}: the damage was never found"
                );
            }
            for g in GROUPS {
                // The final post is applied; its flush (which ends the repair) may trail
                // the apply by a moment.
                let deadline = Instant::now() + WAIT;
                while node.directory.repairs.lock().expect("lock")[&g].is_repairing()
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let status = &node.directory.repairs.lock().expect("lock")[&g];
                assert!(
                    !status.is_repairing(),
                    "seed={seed}: {what}: group {g} still repairing after healing: {:?}",
                    status.damage()
                );
            }
        }
        for id in NODES {
            cluster.remove_node(id).await;
        }
    }
}
