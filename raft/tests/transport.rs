//! The node-to-node transport over real sockets on 127.0.0.1: three nodes in one
//! process, each with its own storage engine in its own directory, its own `Router` and
//! peer server, and several Raft groups sharing the one connection per peer.
//!
//! Covered: replication of chat batches to every node, fail-over when the leader's node
//! stops and catch-up when it restarts from its data directory; bad input on the peer
//! port (garbage bytes, a wrong cluster, an unknown group, an undecodable payload, bad
//! forwarded proposals and read-index requests) refused while the cluster keeps
//! committing; forwarded proposals and read indexes answered; a snapshot sent in chunks
//! to a new learner after the leader purged its log; leadership transfer over the wire.
//! Every wait has a deadline, so a bug fails the test instead of hanging it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatlog_raft::chat::{Batch, Command, Outcome, RefusalCode};
use chatlog_raft::network::codec;
use chatlog_raft::node::ProposeError;
use chatlog_raft::state_machine::SmConfig;
use chatlog_raft::types::Vote;
use chatlog_raft::{
    ChatBatch, ChatRaft, ChatStateMachine, GroupDirectory, GroupId, LogStore, NodeId, NodeIdentity,
    Router, serve,
};
use chatlog_storage::{Config as EngineConfig, Engine};
use chatlog_wire::frame::{encode_payload, read_message, write_message};
use chatlog_wire::limits::{NODE_FRAME_BYTES_MAX, NODE_PROTOCOL_VERSION};
use chatlog_wire::proto::node::v1::{NodeErrorCode, NodeFrame, NodeHello, node_frame::Payload};
use openraft::raft::VoteRequest;
use openraft::{Config, EmptyNode, ServerState};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const CLUSTER_ID: u64 = 0xC4A7;
const GROUPS: [GroupId; 4] = [1, 2, 3, 4];
/// Upper bound for anything that needs an election or a few round trips.
const WAIT: Duration = Duration::from_secs(20);
/// Upper bound for one read of a raw test connection.
const READ_WAIT: Duration = Duration::from_secs(5);

fn raft_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "transport-test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        enable_pre_vote: Some(true),
        install_snapshot_timeout: 2000,
        // Small chunks so the snapshot test sends several.
        snapshot_max_chunk_size: 64,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

/// The groups a test node holds, as the group manager will hand them to the transport.
#[derive(Default)]
struct Directory {
    rafts: Mutex<HashMap<GroupId, ChatRaft>>,
}

impl GroupDirectory for Directory {
    fn raft(&self, group: GroupId) -> Option<ChatRaft> {
        self.rafts.lock().expect("lock").get(&group).cloned()
    }
}

/// One running node.
struct TestNode {
    id: NodeId,
    dir: PathBuf,
    addr: SocketAddr,
    engine: Arc<Engine>,
    router: Router,
    directory: Arc<Directory>,
    stop_server: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

impl TestNode {
    fn raft(&self, group: GroupId) -> ChatRaft {
        self.directory
            .raft(group)
            .expect("the node holds the group")
    }

    /// Opens the engine in `dir`, starts `groups` and serves peers on `listener`.
    async fn start(id: NodeId, dir: &Path, listener: TcpListener, groups: &[GroupId]) -> TestNode {
        let mut engine_config = EngineConfig::new(dir);
        engine_config.segment_bytes = 1 << 20;
        let engine = Arc::new(Engine::open(engine_config).expect("engine opens"));
        let identity = NodeIdentity::new(CLUSTER_ID, id);
        let router = Router::new(identity);
        let directory = Arc::new(Directory::default());
        let config = raft_config();
        for &group in groups {
            let store = LogStore::open(Arc::clone(&engine), group).expect("log store opens");
            let raft = ChatRaft::new(
                id,
                Arc::clone(&config),
                router.network_factory(group),
                store,
                ChatStateMachine::open(Arc::clone(&engine), group, SmConfig::default())
                    .expect("state machine opens"),
            )
            .await
            .expect("raft starts");
            directory.rafts.lock().expect("lock").insert(group, raft);
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
        TestNode {
            id,
            dir: dir.to_path_buf(),
            addr,
            engine,
            router,
            directory,
            stop_server,
            server,
        }
    }

    /// Stops serving, shuts every group down and closes the engine. Returns the data
    /// directory and the address, for a restart.
    async fn stop(self) -> (PathBuf, SocketAddr) {
        let _ = self.stop_server.send(());
        timeout(WAIT, self.server)
            .await
            .expect("server stops in time")
            .expect("server task");
        let rafts: Vec<ChatRaft> = self
            .directory
            .rafts
            .lock()
            .expect("lock")
            .drain()
            .map(|(_, raft)| raft)
            .collect();
        for raft in &rafts {
            timeout(WAIT, raft.shutdown())
                .await
                .expect("group stops in time")
                .expect("group stops");
        }
        drop(rafts);
        self.router.shutdown();
        // The stores go with the groups' tasks; wait until the engine handle is ours.
        let mut engine = self.engine;
        let deadline = tokio::time::Instant::now() + WAIT;
        let engine = loop {
            match Arc::try_unwrap(engine) {
                Ok(engine) => break engine,
                Err(shared) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the engine is still shared after the groups stopped"
                    );
                    engine = shared;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        tokio::task::spawn_blocking(move || engine.close())
            .await
            .expect("close task")
            .expect("engine closes cleanly");
        (self.dir, self.addr)
    }
}

/// Tells every node's router where every other node listens.
fn introduce(nodes: &[&TestNode]) {
    for a in nodes {
        for b in nodes {
            if a.id != b.id {
                a.router.set_peer_addr(b.id, b.addr);
            }
        }
    }
}

async fn listen() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// Starts nodes `ids`, each in a subdirectory of `root`, and initializes `groups` with
/// every node as a voter.
async fn start_cluster(root: &Path, ids: &[NodeId], groups: &[GroupId]) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for &id in ids {
        let dir = root.join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        nodes.push(TestNode::start(id, &dir, listen().await, groups).await);
    }
    introduce(&nodes.iter().collect::<Vec<_>>());
    let voters: BTreeSet<NodeId> = ids.iter().copied().collect();
    for &group in groups {
        // Each group is initialized from a different node, so leaders spread out.
        let first = &nodes[group as usize % nodes.len()];
        first
            .raft(group)
            .initialize(voters.clone())
            .await
            .expect("initialize");
    }
    nodes
}

/// The node leading `group` among `nodes`, once one is leader.
async fn leader(nodes: &[&TestNode], group: GroupId) -> NodeId {
    timeout(WAIT, async {
        loop {
            for node in nodes {
                let raft = node.raft(group);
                if raft.is_leader() {
                    return node.id;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no leader for group {group} among the live nodes"))
}

/// Writes one batch to `group` through its current leader among `nodes`, retrying while
/// leadership moves; returns the entry's log index.
async fn write(nodes: &[&TestNode], group: GroupId, body: &str) -> u64 {
    timeout(WAIT, async {
        loop {
            let leader_id = leader(nodes, group).await;
            let node = nodes.iter().find(|n| n.id == leader_id).expect("live");
            match node
                .raft(group)
                .client_write(ChatBatch(user_batch(body)))
                .await
            {
                Ok(resp) => return resp.log_id.index,
                Err(error) => {
                    eprintln!(
                        "write to group {group} via node {leader_id} failed: {error}; retrying"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no write to group {group} committed in time"))
}

/// Waits until every node in `nodes` applied `group` up to `index`.
async fn applied_everywhere(nodes: &[&TestNode], group: GroupId, index: u64) {
    for node in nodes {
        node.raft(group)
            .wait(Some(WAIT))
            .applied_index_at_least(Some(index), format!("node {} group {group}", node.id))
            .await
            .unwrap_or_else(|e| panic!("node {} group {group} applies {index}: {e}", node.id));
    }
}

/// A batch creating one user named after `body`, so each distinct body written counts
/// once in the state (a retried write is refused as a duplicate name).
fn user_batch(body: &str) -> Bytes {
    let h = chatlog_raft::codec::fnv1a(body.as_bytes());
    Batch {
        timestamp_ms: 1,
        commands: vec![Command::CreateUser {
            name: format!("u{h:016x}"),
            login_token_hash: [0; 32],
        }],
    }
    .encode()
}

/// Distinct batches (users) applied by `node`'s replica of `group`.
async fn batches_applied(node: &TestNode, group: GroupId) -> u64 {
    node.raft(group)
        .with_state_machine(|sm: &mut ChatStateMachine| {
            let n = sm.shared().read().counts().0 as u64;
            Box::pin(async move { n })
        })
        .await
        .expect("state machine answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_replicate_fail_over_and_catch_up_over_shared_connections() {
    let root = tempfile::tempdir().expect("temp dir");
    let mut nodes = start_cluster(root.path(), &[1, 2, 3], &GROUPS).await;

    // Every group commits and every node applies.
    let all: Vec<&TestNode> = nodes.iter().collect();
    for group in GROUPS {
        let mut last = 0;
        for i in 0..5 {
            last = write(&all, group, &format!("group {group} message {i}")).await;
        }
        applied_everywhere(&all, group, last).await;
    }
    for node in &nodes {
        for group in GROUPS {
            assert_eq!(batches_applied(node, group).await, 5, "node {}", node.id);
        }
    }
    // One connection per peer carried every group, and writes were coalesced somewhere.
    let (mut frames, mut writes) = (0, 0);
    for node in &nodes {
        for peer in &nodes {
            if let Some((f, w)) = node.router.connection_stats(peer.id) {
                frames += f;
                writes += w;
            }
        }
    }
    assert!(
        frames > 0 && writes <= frames,
        "{frames} frames in {writes} writes"
    );
    eprintln!("{frames} frames in {writes} writes");

    // Leadership transfer goes over the wire too.
    let from = leader(&all, 1).await;
    let to = if from == 1 { 2 } else { 1 };
    nodes[(from - 1) as usize]
        .raft(1)
        .trigger()
        .transfer_leader(to)
        .await
        .expect("transfer");
    nodes[(to - 1) as usize]
        .raft(1)
        .wait(Some(WAIT))
        .state(ServerState::Leader, "transfer target leads")
        .await
        .expect("leadership moved");

    // Stop the node leading group 1: the others elect a new leader and keep committing.
    let stopped_id = leader(&all, 1).await;
    drop(all);
    let position = nodes
        .iter()
        .position(|n| n.id == stopped_id)
        .expect("present");
    let stopped = nodes.remove(position);
    let (dir, addr) = stopped.stop().await;
    let live: Vec<&TestNode> = nodes.iter().collect();
    let mut last = HashMap::new();
    for group in GROUPS {
        let new_leader = leader(&live, group).await;
        assert_ne!(new_leader, stopped_id);
        let index = write(&live, group, &format!("group {group} after fail-over")).await;
        applied_everywhere(&live, group, index).await;
        last.insert(group, index);
    }

    // Restart it from its directory on the same address: it catches up on every group.
    let listener = timeout(WAIT, async {
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("rebinds the old address");
    let restarted = TestNode::start(stopped_id, &dir, listener, &GROUPS).await;
    nodes.push(restarted);
    let all: Vec<&TestNode> = nodes.iter().collect();
    introduce(&all);
    for group in GROUPS {
        let index = write(&all, group, &format!("group {group} after restart")).await;
        applied_everywhere(&all, group, index).await;
        assert!(index > last[&group]);
    }
    let restarted = nodes.last().expect("pushed");
    for group in GROUPS {
        assert_eq!(batches_applied(restarted, group).await, 7, "group {group}");
    }

    for node in nodes {
        node.stop().await;
    }
}

/// A raw connection to a node's peer port, speaking frames by hand.
struct RawPeer {
    stream: TcpStream,
}

impl RawPeer {
    async fn connect(addr: SocketAddr) -> RawPeer {
        RawPeer {
            stream: TcpStream::connect(addr).await.expect("connect"),
        }
    }

    async fn send(&mut self, frame: &NodeFrame) {
        write_message(&mut self.stream, frame, NODE_FRAME_BYTES_MAX)
            .await
            .expect("write");
    }

    /// The next frame, or `None` at the end of the stream.
    async fn recv(&mut self) -> Option<NodeFrame> {
        timeout(
            READ_WAIT,
            read_message(&mut self.stream, NODE_FRAME_BYTES_MAX),
        )
        .await
        .expect("the node answers in time")
        .expect("a well-formed frame")
    }

    async fn expect_error(&mut self, code: NodeErrorCode) -> NodeFrame {
        let frame = self.recv().await.expect("an answer");
        match &frame.payload {
            Some(Payload::Error(e)) => assert_eq!(e.code(), code, "{}", e.message),
            other => panic!("expected {code:?}, got {other:?}"),
        }
        frame
    }

    async fn expect_closed(&mut self) {
        assert!(self.recv().await.is_none(), "the connection stays open");
    }
}

fn frame(
    to: NodeId,
    cluster_id: u64,
    group: GroupId,
    request_id: u64,
    payload: Payload,
) -> NodeFrame {
    NodeFrame {
        cluster_id,
        from_node_id: 99,
        to_node_id: to,
        group_id: group,
        request_id,
        payload: Some(payload),
    }
}

fn hello(to: NodeId, cluster_id: u64) -> NodeFrame {
    frame(
        to,
        cluster_id,
        0,
        0,
        Payload::Hello(NodeHello {
            protocol_version: NODE_PROTOCOL_VERSION,
            software_version: "test".into(),
            ..Default::default()
        }),
    )
}

/// A pre-vote request that changes nothing on the receiver.
fn harmless_pre_vote() -> Bytes {
    codec::encode_vote_request(&VoteRequest::new(Vote::new(0, 99), None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_and_the_cluster_keeps_serving() {
    let root = tempfile::tempdir().expect("temp dir");
    let groups = [1, 2];
    let nodes = start_cluster(root.path(), &[1, 2, 3], &groups).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let target = &nodes[0];
    let mut written = 0;
    let mut keeps_serving = async |what: &str| {
        written += 1;
        for group in groups {
            let index = write(&all, group, &format!("after {what}")).await;
            applied_everywhere(&all, group, index).await;
        }
        for node in &all {
            assert_eq!(batches_applied(node, 1).await, written, "after {what}");
        }
    };
    keeps_serving("start").await;

    // (a) Garbage bytes: a length prefix above the limit. Answered, then closed.
    let mut raw = RawPeer::connect(target.addr).await;
    raw.stream.write_all(&[0xff; 64]).await.expect("write");
    raw.expect_error(NodeErrorCode::BadRequest).await;
    raw.expect_closed().await;
    // A zero-length frame is garbage too.
    let mut raw = RawPeer::connect(target.addr).await;
    raw.stream.write_all(&[0, 0, 0, 0]).await.expect("write");
    raw.expect_error(NodeErrorCode::BadRequest).await;
    raw.expect_closed().await;
    keeps_serving("garbage").await;

    // (b) A hello from another cluster: refused and closed.
    let mut raw = RawPeer::connect(target.addr).await;
    raw.send(&hello(target.id, CLUSTER_ID + 1)).await;
    raw.expect_error(NodeErrorCode::WrongCluster).await;
    raw.expect_closed().await;
    // A hello for another node: refused and closed.
    let mut raw = RawPeer::connect(target.addr).await;
    raw.send(&hello(target.id + 100, CLUSTER_ID)).await;
    raw.expect_error(NodeErrorCode::WrongNode).await;
    raw.expect_closed().await;
    // A request before the hello: refused and closed.
    let mut raw = RawPeer::connect(target.addr).await;
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        1,
        1,
        Payload::PreVoteRequest(harmless_pre_vote()),
    ))
    .await;
    raw.expect_error(NodeErrorCode::BadRequest).await;
    raw.expect_closed().await;
    keeps_serving("wrong cluster").await;

    // (c) A request for a group the node does not hold: refused, connection stays usable.
    let mut raw = RawPeer::connect(target.addr).await;
    raw.send(&hello(target.id, CLUSTER_ID)).await;
    let ok = raw.recv().await.expect("hello answer");
    assert!(matches!(ok.payload, Some(Payload::HelloOk(_))), "{ok:?}");
    assert_eq!(ok.from_node_id, target.id);
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        999,
        7,
        Payload::PreVoteRequest(harmless_pre_vote()),
    ))
    .await;
    let refused = raw.expect_error(NodeErrorCode::UnknownGroup).await;
    assert_eq!((refused.request_id, refused.group_id), (7, 999));
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        1,
        8,
        Payload::PreVoteRequest(harmless_pre_vote()),
    ))
    .await;
    let answer = raw.recv().await.expect("pre-vote answer");
    assert_eq!(answer.request_id, 8);
    match answer.payload {
        Some(Payload::PreVoteResponse(body)) => {
            let resp = codec::decode_vote_response(&body).expect("decodes");
            assert!(!resp.vote_granted, "a stale pre-vote is not granted");
        }
        other => panic!("expected a pre-vote response, got {other:?}"),
    }
    keeps_serving("unknown group").await;

    // (d) Undecodable payloads: refused, connection stays usable.
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        1,
        9,
        Payload::AppendEntriesRequest(Bytes::from_static(b"not an append")),
    ))
    .await;
    let refused = raw.expect_error(NodeErrorCode::BadRequest).await;
    assert_eq!(refused.request_id, 9);
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        1,
        10,
        Payload::InstallSnapshotRequest(Bytes::from_static(b"\x01\x02")),
    ))
    .await;
    assert_eq!(
        raw.expect_error(NodeErrorCode::BadRequest).await.request_id,
        10
    );
    // Streamed snapshot chunks (`snapshot_stream`): a chunk whose checksum fails and a
    // chunk of no transfer started are refused naming why; the connection stays up.
    let chunk =
        chatlog_raft::snapshot_stream::encode_chunk(&chatlog_raft::snapshot_stream::StreamChunk {
            vote: Vote::new(1, 99),
            transfer: 5,
            seq: 1,
            body: chatlog_raft::snapshot_stream::ChunkBody::Data {
                offset: 0,
                data: Bytes::from_static(b"stream bytes"),
            },
        });
    let mut flipped = chunk.to_vec();
    flipped[20] ^= 1;
    for (request_id, body, why) in [
        (31, Bytes::from(flipped), "checksum"),
        (32, chunk, "no transfer started"),
    ] {
        raw.send(&frame(
            target.id,
            CLUSTER_ID,
            1,
            request_id,
            Payload::SnapshotStreamRequest(body),
        ))
        .await;
        let refused = raw.expect_error(NodeErrorCode::BadRequest).await;
        assert_eq!(refused.request_id, request_id);
        let Some(Payload::Error(e)) = &refused.payload else {
            unreachable!("expect_error checked it")
        };
        assert!(e.message.contains(why), "{} names {why}", e.message);
    }
    // A frame that is not a NodeFrame at all, inside intact framing.
    let mut bytes = BytesMut::new();
    encode_payload(&[0xff, 0xff, 0xff], NODE_FRAME_BYTES_MAX, &mut bytes).expect("encode");
    raw.stream.write_all(&bytes).await.expect("write");
    raw.expect_error(NodeErrorCode::BadRequest).await;
    // A response where a request belongs.
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        1,
        11,
        Payload::VoteResponse(Bytes::new()),
    ))
    .await;
    assert_eq!(
        raw.expect_error(NodeErrorCode::BadRequest).await.request_id,
        11
    );
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        2,
        12,
        Payload::VoteRequest(harmless_pre_vote()),
    ))
    .await;
    let answer = raw.recv().await.expect("vote answer");
    assert_eq!(answer.request_id, 12);
    assert!(
        matches!(answer.payload, Some(Payload::VoteResponse(_))),
        "{answer:?}"
    );
    keeps_serving("undecodable payload").await;

    // (e) Forwarded client work: bad payloads and unknown groups are refused, the
    // connection stays usable, and good requests are answered.
    let bad_forwards = [
        Payload::ProposeRequest(Bytes::from_static(b"not commands")),
        // A count of zero commands.
        Payload::ProposeRequest(Bytes::from_static(&[0, 0, 0, 0])),
        // One command whose bytes are an unknown tag.
        Payload::ProposeRequest(Bytes::from_static(&[1, 0, 0, 0, 1, 0, 0, 0, 0xee])),
        Payload::ReadIndexRequest(Bytes::from_static(b"x")),
    ];
    for (i, payload) in bad_forwards.into_iter().enumerate() {
        let request_id = 20 + i as u64;
        raw.send(&frame(target.id, CLUSTER_ID, 1, request_id, payload))
            .await;
        let refused = raw.expect_error(NodeErrorCode::BadRequest).await;
        assert_eq!(refused.request_id, request_id);
    }
    // A post to a chat that does not exist: refused by the state machine, so it
    // changes nothing the other checks count.
    let post = Command::Post {
        chat: 12345,
        sender: 1,
        client_message_id: 1,
        text: "hello".into(),
        media: None,
        reply_to: 0,
    };
    for (request_id, payload) in [
        (
            30,
            Payload::ProposeRequest(codec::encode_propose_request(std::slice::from_ref(&post))),
        ),
        (
            31,
            Payload::ReadIndexRequest(codec::encode_read_index_request()),
        ),
    ] {
        raw.send(&frame(target.id, CLUSTER_ID, 999, request_id, payload))
            .await;
        let refused = raw.expect_error(NodeErrorCode::UnknownGroup).await;
        assert_eq!((refused.request_id, refused.group_id), (request_id, 999));
    }
    let leader_of_1 = leader(&all, 1).await;
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        1,
        32,
        Payload::ProposeRequest(codec::encode_propose_request(&[post])),
    ))
    .await;
    let answer = raw.recv().await.expect("propose answer");
    assert_eq!(answer.request_id, 32);
    let Some(Payload::ProposeResponse(body)) = answer.payload else {
        panic!("expected a propose response, got {answer:?}");
    };
    let (_, results) = codec::decode_propose_response(1, &body).expect("decodes");
    match &results[..] {
        [Ok(Outcome::Refused(r))] => assert_eq!(r.code, RefusalCode::NotFound, "{r:?}"),
        [Err(ProposeError::NotLeader { leader, .. })] if target.id != leader_of_1 => {
            assert!(leader.is_some(), "a follower names the leader")
        }
        other => panic!("node {} (leader {leader_of_1}): {other:?}", target.id),
    }
    raw.send(&frame(
        target.id,
        CLUSTER_ID,
        1,
        33,
        Payload::ReadIndexRequest(codec::encode_read_index_request()),
    ))
    .await;
    let answer = raw.recv().await.expect("read-index answer");
    assert_eq!(answer.request_id, 33);
    let Some(Payload::ReadIndexResponse(body)) = answer.payload else {
        panic!("expected a read-index response, got {answer:?}");
    };
    match codec::decode_read_index_response(1, &body).expect("decodes") {
        Ok(index) => assert!(index > 0 && target.id == leader_of_1, "index {index}"),
        Err(ProposeError::NotLeader { leader, .. }) => {
            assert_ne!(target.id, leader_of_1);
            assert!(leader.is_some(), "a follower names the leader");
        }
        Err(e) => panic!("read index: {e}"),
    }
    keeps_serving("forwarded work").await;

    drop(raw);
    drop(all);
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_learner_receives_the_snapshot_in_chunks() {
    let root = tempfile::tempdir().expect("temp dir");
    let group = 5;
    let mut nodes = start_cluster(root.path(), &[1, 2, 3], &[group]).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let mut last = 0;
    for i in 0..20 {
        last = write(&all, group, &format!("message {i}")).await;
    }
    applied_everywhere(&all, group, last).await;

    // Snapshot on the leader and purge its whole log, so a new replica can only get the
    // state as a snapshot.
    let leader_id = leader(&all, group).await;
    let leader_raft = nodes[(leader_id - 1) as usize].raft(group);
    leader_raft.trigger().snapshot().await.expect("snapshot");
    leader_raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot built",
        )
        .await
        .expect("snapshot built");
    leader_raft.trigger().purge_log(last).await.expect("purge");
    leader_raft
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "log purged")
        .await
        .expect("log purged");
    drop(all);

    let dir = root.path().join("node-4");
    std::fs::create_dir_all(&dir).expect("mkdir");
    nodes.push(TestNode::start(4, &dir, listen().await, &[group]).await);
    introduce(&nodes.iter().collect::<Vec<_>>());
    let learner = nodes.last().expect("pushed");
    timeout(WAIT, leader_raft.add_learner(4, EmptyNode::default(), true))
        .await
        .expect("learner added in time")
        .expect("learner added");
    let metrics = learner
        .raft(group)
        .wait(Some(WAIT))
        .applied_index_at_least(Some(last), "learner caught up")
        .await
        .expect("learner caught up");
    assert!(
        metrics.snapshot.is_some_and(|s| s.index >= last),
        "the learner's state came from a snapshot: {metrics:?}"
    );
    assert_eq!(batches_applied(learner, group).await, 20);

    drop(leader_raft);
    for node in nodes {
        node.stop().await;
    }
}
