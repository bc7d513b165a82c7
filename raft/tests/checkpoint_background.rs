//! The periodic checkpoint written off the apply path (`chatlog_raft::checkpointer`): it
//! becomes durable while posts keep being applied, names exactly the state at its applied
//! index, never moves back (also with snapshots taken meanwhile), and a restart starts
//! from it and replays only what came after.

use std::time::{Duration, Instant};

use chatlog_raft::chat::{ChatKind, Command, GroupState, Outcome};
use chatlog_raft::node::{NoPeers, Node, NodeConfig};
use chatlog_raft::state_machine::{SmConfig, checkpoint_header, read_checkpoint};

const GROUPS: u64 = 2;
const G: u64 = 1;

async fn start(dir: &std::path::Path) -> Node {
    let mut config = NodeConfig::single(dir, GROUPS);
    config.segment_bytes = Some(4 << 20);
    config.sm = SmConfig {
        // Often: several background checkpoints during the test.
        checkpoint_every_entries: 5,
        ..Default::default()
    };
    let node = tokio::time::timeout(
        Duration::from_secs(30),
        Node::start(config, |_| NoPeers, Default::default()),
    )
    .await
    .expect("start in time")
    .expect("node starts");
    node.wait_for_leaders(Duration::from_secs(10))
        .await
        .expect("every group elects itself");
    node
}

/// The durable checkpoint's applied index and decoded state, once its applied index is
/// what `GroupShared::checkpointed` says (a background write may still be finishing).
async fn durable_checkpoint(node: &Node) -> (u64, GroupState) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let want = node.group(G).expect("group").shared().checkpointed();
        // A read racing the write's purge of older chunks fails: try again.
        if let Ok(Some(bytes)) = read_checkpoint(node.engine(), G) {
            let (applied, _) = checkpoint_header(&bytes).expect("header decodes");
            let applied = applied.map_or(0, |l| l.index);
            if applied == want {
                // The state is last: `len u64 | state`.
                let at = bytes.len() - state_len_from_end(&bytes);
                let state = GroupState::decode(&bytes[at..]).expect("state decodes");
                return (applied, state);
            }
        }
        assert!(Instant::now() < deadline, "the checkpoint never settled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Bytes of the encoded state at the end of checkpoint `bytes`: found by trying each
/// offset whose preceding 8 bytes hold the remaining length (the state is last).
fn state_len_from_end(bytes: &[u8]) -> usize {
    for at in 8..bytes.len() {
        let len = u64::from_le_bytes(bytes[at - 8..at].try_into().expect("8 bytes")) as usize;
        if len == bytes.len() - at {
            return len;
        }
    }
    panic!("no state length in the checkpoint");
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_checkpoints_are_durable_ordered_and_restart_from_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = start(dir.path()).await;
    let group = node.group(G).expect("group");
    let user = match group
        .propose(Command::CreateUser {
            name: "ann".into(),
            login_token_hash: [1; 32],
        })
        .await
        .expect("committed")
    {
        Outcome::UserCreated { user } => user,
        o => panic!("{o:?}"),
    };
    let chat = match group
        .propose(Command::CreateChat {
            creator: user,
            kind: ChatKind::Group,
            title: "c".into(),
            members: vec![],
        })
        .await
        .expect("committed")
    {
        Outcome::Event { chat, .. } => chat,
        o => panic!("{o:?}"),
    };
    // Posts one entry at a time, so each is its own entry; snapshots (which also write
    // the checkpoint, through the same lock) are asked for in between.
    let mut seen = Vec::new();
    for i in 0..120u64 {
        let out = group
            .propose(Command::Post {
                chat,
                sender: user,
                client_message_id: i + 1,
                text: format!("post {i}"),
                media: None,
                reply_to: 0,
            })
            .await
            .expect("committed");
        assert!(
            matches!(out, Outcome::Event { seq, .. } if seq == i + 2),
            "{out:?}"
        );
        // Not near the end: the last checkpoints are the background ones.
        if i % 40 == 39 && i < 100 {
            group
                .raft()
                .trigger()
                .snapshot()
                .await
                .expect("snapshot asked");
        }
        seen.push(group.shared().checkpointed());
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the durable checkpoint never moves back: {seen:?}"
    );
    let applied = *group.shared().applied().borrow();
    let first_post_index = applied - 119;
    // Past the last snapshot (post 79): only a background write can get there.
    wait_until("a background checkpoint after the last snapshot", || {
        group.shared().checkpointed() > first_post_index + 100
    })
    .await;
    let (at, state) = durable_checkpoint(&node).await;
    assert!(at > first_post_index + 100 && at <= applied, "{at}");
    // The checkpoint is the state at exactly its index: its head seq is what that
    // many entries (user, chat, then one post per entry) made.
    let head = state.head_seq(chat).expect("chat in the checkpoint");
    assert_eq!(head, at - first_post_index + 2, "state at index {at}");
    let live = group.shared().read().encode();
    drop(group);
    node.shutdown().await.expect("clean shutdown");

    // Restart: from the checkpoint plus the entries after it, to the same state.
    let node = start(dir.path()).await;
    let group = node.group(G).expect("group");
    wait_until("the log replayed", || {
        *group.shared().applied().borrow() >= applied
    })
    .await;
    assert_eq!(
        group.shared().read().encode(),
        live,
        "same state after restart"
    );
    assert_eq!(group.shared().read().head_seq(chat), Some(121));
    drop(group);
    node.shutdown().await.expect("clean shutdown");
}

/// A reader of the checkpoint (a backup) never fails because a newer checkpoint purged
/// the chunks it was reading: `read_checkpoint` always returns one whole checkpoint that
/// was written, while another task writes new ones back to back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_is_never_torn_by_the_next_checkpoint_write() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use chatlog_raft::state_machine::write_checkpoint_bytes;

    let dir = tempfile::tempdir().expect("temp dir");
    let engine = Arc::new(
        chatlog_storage::Engine::open(chatlog_storage::Config::new(dir.path()))
            .expect("engine opens"),
    );
    // Version `v` of the checkpoint: 3 MiB (several chunks) of the byte `v`, so a
    // read that mixed two versions or lost a chunk is seen.
    let version = |v: u8| vec![v; 3 << 20];
    write_checkpoint_bytes(&engine, G, &version(0))
        .await
        .expect("first checkpoint");
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (engine, done) = (Arc::clone(&engine), Arc::clone(&done));
        tokio::spawn(async move {
            let mut v = 0u8;
            while !done.load(Ordering::Relaxed) {
                v = v.wrapping_add(1);
                write_checkpoint_bytes(&engine, G, &version(v))
                    .await
                    .expect("checkpoint written");
            }
            v
        })
    };
    let reader = {
        let engine = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut reads = 0u64;
            while Instant::now() < deadline {
                let data = read_checkpoint(&engine, G)
                    .expect("a read while checkpoints are written")
                    .expect("a checkpoint");
                assert_eq!(data.len(), 3 << 20, "read {reads}: a whole checkpoint");
                assert!(
                    data.iter().all(|b| *b == data[0]),
                    "read {reads}: one version, not a mix"
                );
                reads += 1;
            }
            reads
        })
    };
    let reads = reader.await.expect("reader");
    done.store(true, Ordering::Relaxed);
    let writes = writer.await.expect("writer");
    eprintln!("{reads} reads during {writes} checkpoint writes");
    assert!(reads > 0 && writes > 0, "both sides ran");
}
