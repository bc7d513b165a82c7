//! s9snap: retention snapshots are the durable incremental checkpoint plus the retained
//! range, streamed piece by piece and installed as the receiver's own checkpoint.
//!
//! Three `Node`s in one process, each with its own engine and data directory, over real
//! sockets on 127.0.0.1 (started as `raft_figures` starts them), every group replicated
//! three times, the groups' retention policy seeded to keep 20,000 entries. One follower
//! stops; the leader's group takes more than three index chunks' worth of entries
//! (`chat::index_chunks::CHUNK_ENTRIES` each), so retention purges far past the
//! follower and the leader's checkpoint references whole chunks. The follower restarts,
//! catches up through a snapshot (openraft's snapshot of it is at or past the leader's
//! purge point) and its applied state equals the leader's, byte for byte; restarted once
//! more, it loads the installed checkpoint and still equals the leader.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chatlog_raft::chat::index_chunks::CHUNK_ENTRIES;
use chatlog_raft::chat::retention::RetentionPolicy;
use chatlog_raft::chat::{Batch, ChatKind, Command, GroupState, Outcome};
use chatlog_raft::checkpoint_chunks::CheckpointHandle;
use chatlog_raft::node::{GroupRegistry, Node, NodeConfig};
use chatlog_raft::{ChatBatch, GroupDirectory, GroupId, NodeId, NodeIdentity, Router};
use futures_util::StreamExt;
use openraft::async_runtime::WatchReceiver;
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};

const G: GroupId = 1;
const IDS: [NodeId; 3] = [1, 2, 3];
/// Entries the groups' retention keeps: the horizon ends up between chunks 1 and 2.
const KEEP: u64 = 20_000;
/// Entries written while the follower is away: the region of the leader's checkpoint
/// (whole chunks above the horizon) is then not empty.
const ENTRIES: u64 = 3 * CHUNK_ENTRIES + 5_000;
/// Entries per `client_write_many`.
const WRITE_BATCH: u64 = 500;
const WAIT: Duration = Duration::from_secs(120);

struct Member {
    id: NodeId,
    dir: PathBuf,
    addr: SocketAddr,
    node: Option<Node>,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn start(id: NodeId, dir: &Path, listener: TcpListener, addrs: &[SocketAddr]) -> Member {
    let addr = listener.local_addr().expect("addr");
    let mut config = NodeConfig::single(dir, 1);
    config.node_id = id;
    config.members = IDS.iter().copied().collect::<BTreeSet<_>>();
    config.replicas = 3;
    config.segment_bytes = Some(4 << 20);
    config.sm.checkpoint_every_entries = 5_000;
    config.sm.retention = RetentionPolicy {
        retain_entries: Some(KEEP),
        retain_bytes: None,
    };
    let identity = NodeIdentity::new(0x59A9, id);
    let router = Router::new(identity);
    for (j, other) in IDS.iter().enumerate() {
        if *other != id {
            router.set_peer_addr(*other, addrs[j]);
        }
    }
    let registry = Arc::new(GroupRegistry::default());
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let directory: Arc<dyn GroupDirectory> = registry.clone();
    tokio::spawn(chatlog_raft::network::serve(
        listener,
        identity,
        directory,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    let node = timeout(
        WAIT,
        Node::start(config, move |g| router.network_factory(g), registry),
    )
    .await
    .expect("starts in time")
    .expect("node starts");
    Member {
        id,
        dir: dir.to_path_buf(),
        addr,
        node: Some(node),
        stop,
    }
}

impl Member {
    fn node(&self) -> &Node {
        self.node.as_ref().expect("running")
    }

    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(node) = self.node.take() {
            timeout(WAIT, node.shutdown())
                .await
                .expect("stops in time")
                .expect("stops");
        }
    }

    async fn restart(&mut self, addrs: &[SocketAddr]) {
        let listener = TcpListener::bind(self.addr).await.expect("rebinds");
        *self = start(self.id, &self.dir, listener, addrs).await;
    }

    fn state(&self) -> GroupState {
        self.node().group(G).expect("group").shared().read().clone()
    }

    fn applied(&self) -> u64 {
        *self
            .node()
            .group(G)
            .expect("group")
            .shared()
            .applied()
            .borrow()
    }
}

/// FNV-1a 64 of a state's whole encoding.
fn digest(state: &GroupState) -> u64 {
    chatlog_raft::codec::fnv1a(&state.encode())
}

/// The member leading `G` among the running ones.
async fn leader(members: &[Member]) -> usize {
    timeout(WAIT, async {
        loop {
            for (i, m) in members.iter().enumerate() {
                if m.node.is_some() && m.node().group(G).expect("group").leader() == Some(m.id) {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a leader")
}

async fn propose(members: &[Member], command: Command) -> Outcome {
    let deadline = Instant::now() + WAIT;
    loop {
        let l = leader(members).await;
        match members[l]
            .node()
            .group(G)
            .expect("group")
            .propose(command.clone())
            .await
        {
            Ok(o) => return o,
            Err(e) => {
                assert!(Instant::now() < deadline, "no proposal committed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Writes `ENTRIES` entries of one post each through the leader, many in flight.
async fn write(members: &[Member], user: u64, chat: u64) {
    let mut cmid = 0u64;
    while cmid < ENTRIES {
        let l = leader(members).await;
        let raft = members[l].node().group(G).expect("group").raft().clone();
        let first = cmid;
        let batches: Vec<ChatBatch> = (first..(first + WRITE_BATCH).min(ENTRIES))
            .map(|i| {
                ChatBatch(
                    Batch {
                        timestamp_ms: 1_000_000 + i,
                        commands: vec![Command::Post {
                            chat,
                            sender: user,
                            client_message_id: i + 1,
                            text: format!("post {i}"),
                            media: None,
                            reply_to: 0,
                        }],
                    }
                    .encode(),
                )
            })
            .collect();
        let n = batches.len() as u64;
        let Ok(mut results) = raft.client_write_many(batches).await else {
            continue;
        };
        let mut ok = 0;
        while let Some(r) = results.next().await {
            if matches!(r, Ok(Ok(_))) {
                ok += 1;
            }
        }
        // A leader change half way: written again (the same client message ids are
        // answered with their first seqs).
        if ok == n {
            cmid += n;
        }
    }
}

/// Waits until the follower `f` applied what the leader `l` did, and compares their
/// states at that index.
async fn same_state(members: &[Member], l: usize, f: usize) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let at = members[l].applied();
        if members[f].applied() == at {
            let (a, b) = (members[l].state(), members[f].state());
            if members[l].applied() == at && members[f].applied() == at {
                assert_eq!(digest(&a), digest(&b), "state digests at {at}");
                assert!(a == b, "the follower's state is the leader's at {at}");
                return digest(&a);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the follower never reached the leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_a_retention_purge_installs_the_checkpoint_pieces_and_equals_the_leader()
{
    let started = std::time::Instant::now();
    let root = tempfile::tempdir().expect("temp dir");
    let mut listeners = Vec::new();
    for _ in IDS {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let mut members = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let dir = root.path().join(format!("node-{}", IDS[i]));
        std::fs::create_dir_all(&dir).expect("mkdir");
        members.push(start(IDS[i], &dir, listener, &addrs).await);
    }
    for m in &members {
        m.node()
            .wait_for_leaders(WAIT)
            .await
            .expect("every group has a leader");
    }
    let Outcome::UserCreated { user } = propose(
        &members,
        Command::CreateUser {
            name: "ann".into(),
            login_token_hash: [1; 32],
        },
    )
    .await
    else {
        panic!("a user")
    };
    let Outcome::Event { chat, .. } = propose(
        &members,
        Command::CreateChat {
            creator: user,
            kind: ChatKind::Group,
            title: "t".into(),
            members: vec![],
        },
    )
    .await
    else {
        panic!("a chat")
    };
    // The seeded policy is applied everywhere before the follower goes.
    wait_until("the retention policy is replicated", || {
        members
            .iter()
            .all(|m| m.state().retention_policy().is_some())
    })
    .await;
    let l = leader(&members).await;
    let f = (l + 1) % members.len();
    let behind = members[f].applied();
    members[f].stop().await;
    eprintln!("node {} stopped at {behind}", members[f].id);

    write(&members, user, chat).await;
    eprintln!("{ENTRIES} entries written after {:?}", started.elapsed());
    let l = leader(&members).await;
    let last = members[l].applied();
    // The leader purged far past the follower, and its durable checkpoint references
    // index chunks (so the snapshot carries some).
    let raft = members[l].node().group(G).expect("group").raft().clone();
    let engine = Arc::clone(members[l].node().engine());
    let chunks = || {
        CheckpointHandle::durable(Arc::clone(&engine), G, Arc::default())
            .expect("reads the pointer")
            .map_or(0, |h| h.open().map_or(0, |s| s.chunks()))
    };
    wait_until("the leader purged past the follower", || {
        let purged = raft
            .metrics()
            .borrow_watched()
            .purged
            .map_or(0, |p| p.index);
        purged > behind + CHUNK_ENTRIES && chunks() >= 1
    })
    .await;
    let purged = raft
        .metrics()
        .borrow_watched()
        .purged
        .map_or(0, |p| p.index);
    eprintln!(
        "leader node {}: applied {last}, purged {purged}, checkpoint chunks {}",
        members[l].id,
        chunks()
    );

    members[f].restart(&addrs).await;
    wait_until("the follower catches up", || members[f].applied() >= last).await;
    let follower = members[f].node().group(G).expect("group").raft().clone();
    let snapshot = follower
        .metrics()
        .borrow_watched()
        .snapshot
        .map_or(0, |s| s.index);
    assert!(
        snapshot >= purged,
        "the follower's state came from a snapshot at or past the purge point {purged}: {snapshot}"
    );
    let d = same_state(&members, l, f).await;
    // Installed as its own incremental checkpoint: the chunks are in its chunk log (it
    // applied nothing since that could have written them).
    let engine = Arc::clone(members[f].node().engine());
    let installed = CheckpointHandle::durable(engine, G, Arc::default())
        .expect("reads the pointer")
        .expect("the installed checkpoint is an incremental one");
    assert!(
        installed.open().expect("opens").chunks() >= 1,
        "the installed checkpoint references its own copies of the chunks"
    );
    eprintln!(
        "node {} installed a snapshot at {snapshot}; state digest {d:016x} equal to the leader's",
        members[f].id
    );

    // Restarted once more, it loads what it installed (and checkpointed since).
    members[f].stop().await;
    members[f].restart(&addrs).await;
    wait_until("the follower is back", || members[f].applied() >= last).await;
    same_state(&members, l, f).await;

    for m in &mut members {
        m.stop().await;
    }
    eprintln!("test took {:?}", started.elapsed());
}
