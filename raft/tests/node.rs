//! A one-node cluster in one process: chat commands through the proposal batcher,
//! reading events back from the Raft log, and everything surviving restarts, with and
//! without checkpoints.

use std::time::Duration;

use chatlog_raft::chat::{ChatKind, Command, Outcome, make_id};
use chatlog_raft::node::{NoPeers, Node, NodeConfig};
use chatlog_raft::state_machine::SmConfig;

const GROUPS: u64 = 4;

async fn start(dir: &std::path::Path, checkpoint_every: u64) -> Node {
    let mut config = NodeConfig::single(dir, GROUPS);
    config.segment_bytes = Some(4 << 20);
    config.sm = SmConfig {
        checkpoint_every_entries: checkpoint_every,
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

async fn user(node: &Node, g: u64, name: &str) -> u64 {
    let out = node
        .group(g)
        .expect("group")
        .propose(Command::CreateUser {
            name: name.into(),
            login_token_hash: [1; 32],
        })
        .await
        .expect("committed");
    match out {
        Outcome::UserCreated { user } => user,
        o => panic!("{o:?}"),
    }
}

fn seq_of(o: &Outcome) -> u64 {
    match o {
        Outcome::Event { seq, .. } => *seq,
        o => panic!("expected an event: {o:?}"),
    }
}

async fn scenario(checkpoint_every: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = start(dir.path(), checkpoint_every).await;
    let g = 2;
    let group = node.group(g).expect("group 2").clone();
    let (a, b) = (user(&node, g, "alice").await, user(&node, g, "bob").await);
    assert_eq!(a, make_id(g, 1));
    let chat = match group
        .propose(Command::CreateChat {
            creator: a,
            kind: ChatKind::Group,
            title: "team".into(),
            members: vec![b],
        })
        .await
        .expect("committed")
    {
        Outcome::Event { chat, seq: 1, .. } => chat,
        o => panic!("{o:?}"),
    };
    // Many concurrent senders: the batcher packs them into few entries; seqs are dense.
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let group = group.clone();
        let sender = if i % 2 == 0 { a } else { b };
        tasks.push(tokio::spawn(async move {
            group
                .propose(Command::Post {
                    chat,
                    sender,
                    client_message_id: i + 1,
                    text: format!("message {i}"),
                    media: None,
                    reply_to: 0,
                })
                .await
                .expect("committed")
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(seq_of(&t.await.expect("task")));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=401).collect::<Vec<_>>(), "dense, each once");
    let applied = *group.shared().applied().borrow();
    assert!(
        applied < 300,
        "400 posts should share entries, took {applied}"
    );
    // A retry returns the original seq.
    let retry = group
        .propose(Command::Post {
            chat,
            sender: a,
            client_message_id: 1,
            text: "message 0".into(),
            media: None,
            reply_to: 0,
        })
        .await
        .expect("committed");
    assert!(matches!(
        retry,
        Outcome::Event {
            deduplicated: true,
            ..
        }
    ));
    group.read_barrier().await.expect("leader reads");

    let check = |node: &Node| {
        let group = node.group(g).expect("group").clone();
        async move {
            let locs = group
                .shared()
                .read()
                .chat_events(chat, 1, u64::MAX)
                .expect("chat exists");
            assert_eq!(locs.len(), 401);
            let events = group.read_commands(&locs).await.expect("reads events");
            for (seq, _loc, cmd, _ts) in &events[1..] {
                let Command::Post {
                    client_message_id,
                    text,
                    ..
                } = cmd
                else {
                    panic!("seq {seq} is {cmd:?}");
                };
                assert_eq!(text, &format!("message {}", client_message_id - 1));
            }
            let ids: std::collections::BTreeSet<u64> = events[1..]
                .iter()
                .map(|(_, _, c, _)| match c {
                    Command::Post {
                        client_message_id, ..
                    } => *client_message_id,
                    _ => 0,
                })
                .collect();
            assert_eq!(ids.len(), 400, "every message exactly once");
        }
    };
    check(&node).await;
    node.shutdown().await.expect("clean shutdown");

    // Restart: the state comes back (from a checkpoint plus the log after it, or from
    // the log alone), and new posts continue the seqs.
    let node = start(dir.path(), checkpoint_every).await;
    check(&node).await;
    let group = node.group(g).expect("group");
    let next = group
        .propose(Command::Post {
            chat,
            sender: b,
            client_message_id: 10_000,
            text: "after restart".into(),
            media: None,
            reply_to: 0,
        })
        .await
        .expect("committed");
    assert_eq!(seq_of(&next), 402);
    assert_eq!(
        user(&node, g, "carol").await,
        make_id(g, 3),
        "user numbering continues"
    );
    node.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_state_survives_restart_by_replaying_the_log() {
    scenario(u64::MAX).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_state_survives_restart_from_checkpoints() {
    scenario(3).await;
}

/// Issue 9: a leader restarted after kill -9 may have lost entries it had already
/// replicated (and followers committed) from its unflushed tail; resuming leadership in
/// the same term would re-propose different entries under the same log ids. Seen in the
/// soak as two replicas applying (term 4, node 3, index 469) with different payloads.
#[test]
fn a_restarted_leader_must_win_a_new_election() {
    for heartbeat in [None, Some(100)] {
        let config = chatlog_raft::node::timing(3, heartbeat).expect("valid timing");
        assert_eq!(
            config.enable_leader_restore,
            Some(false),
            "leader restore must stay off (openraft defaults it on)"
        );
    }
}
