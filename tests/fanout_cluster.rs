//! Black-box: cross-node fan-out in a cluster of four real `chatlog serve` processes with
//! three replicas per group, so node 1 hosts no replica of group 1 (the static placement
//! puts group 1 on nodes 2, 3, 4 and group 2 on nodes 3, 4, 1).
//!
//! Devices on node 1 of users who are members of a group chat and a channel living in
//! group 1 receive every post live, in seq order, each once (node 1's hub long-polls a
//! replica of group 1 over the node transport); a read marker set on another device
//! (connected to node 3) reaches them too. Then each replica of group 1 in turn is
//! killed with SIGKILL (and restarted) while posts continue: whichever replica node 1
//! was polling dies at some point, and the devices still end with exactly the chats'
//! events, dense and once, equal to the history a replica serves. Push notifications
//! (sent by the chats' group leader, on another node) reach the member who is offline
//! and never the members online on node 1.
//!
//! Every wait has a deadline, so a bug fails the test instead of hanging it.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/webhook.rs"]
mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::{Client, PushItem, PushReceiver};
use chatlog_wire::proto::v1::{self, push, user_event};
use cluster::{Cluster, Options};

/// Longest wait for anything the test expects to happen.
const WAIT: Duration = Duration::from_secs(60);
/// The node without a replica of the chats' group.
const VIEWER_NODE: u64 = 1;
/// The group holding the chats (no replica on [`VIEWER_NODE`]).
const CHAT_GROUP: u64 = 1;
/// The group the users live in (a replica on every node the users connect to).
const USER_GROUP: u64 = 2;

async fn connect(cluster: &Cluster, node: u64, token: Option<String>) -> Client {
    let mut options = cluster::client_options(token, Duration::from_secs(10), 5);
    options.push_queue_len_max = 100_000;
    cluster::connect_with(&cluster.addr(node), options).await
}

/// Creates users named `{prefix}{n}` through `c` until one lives in [`USER_GROUP`]:
/// its id and login token.
async fn user_in_user_group(c: &Client, prefix: &str) -> (u64, String) {
    let deadline = Instant::now() + WAIT;
    for n in 0.. {
        let name = format!("{prefix}{n}");
        let created = match c
            .create_user(v1::CreateUserRequest { name: name.clone() })
            .await
        {
            Ok(created) => created,
            Err(e) if cluster::retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => panic!("creating {name}: {e}"),
        };
        if group_of(created.user_id) == USER_GROUP {
            return (created.user_id, created.login_token);
        }
    }
    unreachable!()
}

/// A device of `user` on `node`, logged in: its client and pushes.
async fn device(
    cluster: &Cluster,
    node: u64,
    user: &(u64, String),
    id: &str,
) -> (Client, PushReceiver) {
    let c = connect(cluster, node, None).await;
    let pushes = c.pushes().expect("push receiver");
    cluster::login(
        &c,
        v1::LoginRequest {
            user_id: user.0,
            login_token: user.1.clone(),
            device_id: id.into(),
            device_name: id.into(),
        },
    )
    .await;
    (c, pushes)
}

/// Creates chats of `kind` until one lives in [`CHAT_GROUP`] (new chats go round-robin
/// over the groups).
async fn chat_in_chat_group(c: &Client, kind: v1::ChatKind, members: &[u64]) -> u64 {
    loop {
        let chat = c
            .create_chat(v1::CreateChatRequest {
                kind: kind.into(),
                title: format!("{kind:?}"),
                member_ids: members.to_vec(),
            })
            .await
            .expect("chat created")
            .chat_id;
        if group_of(chat) == CHAT_GROUP {
            return chat;
        }
    }
}

/// Sends one post, retrying retryable failures with the same client message id (a node
/// being killed, an election): the returned seq is the post's one seq.
async fn post(c: &Client, chat: u64, cmid: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        match c
            .send_message(v1::SendMessageRequest {
                chat_id: chat,
                client_message_id: cmid,
                text: format!("post {cmid} to {chat}"),
                media: None,
                reply_to_seq: 0,
            })
            .await
        {
            Ok(ack) => return ack.seq,
            Err(e) if cluster::retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("post {cmid} to chat {chat}: {e}"),
        }
    }
}

/// What one device received: per chat the live events, each checked to be the next seq
/// (dense, once), and the read markers pushed.
#[derive(Debug, Default)]
struct Received {
    chats: BTreeMap<u64, Vec<v1::Event>>,
    read_markers: Vec<(u64, u64)>,
}

impl Received {
    fn last(&self, chat: u64) -> u64 {
        self.chats
            .get(&chat)
            .and_then(|e| e.last())
            .map_or(0, |e| e.seq)
    }

    fn take(&mut self, item: PushItem, device: &str) {
        match item {
            PushItem::Push {
                request_id: 0,
                push: push::Kind::ChatEvents(ev),
            } => {
                for e in ev.events {
                    let list = self.chats.entry(e.chat_id).or_default();
                    if let Some(last) = list.last() {
                        assert_eq!(
                            e.seq,
                            last.seq + 1,
                            "{device}: chat {} events come dense and once",
                            e.chat_id
                        );
                    }
                    list.push(e);
                }
            }
            PushItem::Push {
                request_id: 0,
                push: push::Kind::UserEvent(u),
            } => {
                if let Some(user_event::Body::ReadMarkerMoved(m)) = u.body {
                    self.read_markers.push((m.chat_id, m.read_seq));
                }
            }
            PushItem::Push { .. } => {}
            other => panic!("{device}: unexpected {other:?}"),
        }
    }
}

/// Receives on `pushes` until `done` holds for what arrived.
async fn receive_until(
    pushes: &mut PushReceiver,
    got: &mut Received,
    device: &str,
    done: impl Fn(&Received) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !done(got) {
        let left = deadline.saturating_duration_since(Instant::now());
        let item = tokio::time::timeout(left, pushes.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{device}: stuck; last seqs {:?}",
                    got.chats
                        .iter()
                        .map(|(c, e)| (*c, e.last().map(|e| e.seq)))
                        .collect::<Vec<_>>()
                )
            })
            .expect("client alive");
        got.take(item, device);
    }
}

/// The highest `last_seq` notified per (user, chat) so far.
fn notified(rx: &webhook::Receiver) -> BTreeMap<(u64, u64), u64> {
    let mut by = BTreeMap::new();
    for (_, body) in rx.requests.lock().expect("lock").iter() {
        for n in body["notifications"].as_array().expect("notifications") {
            let key = (
                n["user_id"].as_u64().expect("user"),
                n["chat_id"].as_u64().expect("chat"),
            );
            let seq = n["last_seq"].as_u64().expect("seq");
            let e = by.entry(key).or_insert(0);
            *e = seq.max(*e);
        }
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_a_node_without_a_replica_get_every_event_across_replica_kills() {
    let (hook, notifications) = webhook::start().await;
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            nodes: 4,
            groups: 2,
            extra: vec![
                "--replicas".into(),
                "3".into(),
                "--push-webhook".into(),
                hook,
                "--push-collapse-ms".into(),
                "200".into(),
            ],
            ..Options::default()
        })
    });
    // The users live in group 2 (a replica on node 1, where their devices connect); the
    // chats in group 1, which node 1 does not host.
    let setup = connect(&cluster, 3, None).await;
    let alice = user_in_user_group(&setup, "alice").await;
    let bob = user_in_user_group(&setup, "bob").await;
    let paul = user_in_user_group(&setup, "paul").await;
    // Carol never connects: she is the one member push notifications are for.
    let carol = user_in_user_group(&setup, "carol").await;
    let (poster, _) = device(&cluster, VIEWER_NODE, &paul, "paul-desk").await;
    let members = [alice.0, bob.0, carol.0];
    let group_chat = chat_in_chat_group(&poster, v1::ChatKind::Group, &members).await;
    let channel = chat_in_chat_group(&poster, v1::ChatKind::Channel, &members).await;
    eprintln!("group chat {group_chat}, channel {channel}; alice {alice:?} bob {bob:?}");

    let names = ["alice-phone", "alice-laptop", "bob-phone"];
    let mut devices = Vec::new();
    for (name, user) in names.iter().zip([&alice, &alice, &bob]) {
        let (c, pushes) = device(&cluster, VIEWER_NODE, user, name).await;
        devices.push((*name, c, pushes, Received::default()));
    }

    // Warm-up: post until every device has seen a post of each chat live (node 1's
    // pollers may still be finding their first replica right after start).
    let cmid = AtomicU64::new(1);
    let mut warm_heads = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    'warm: loop {
        assert!(Instant::now() < deadline, "no live push reached node 1");
        for chat in [group_chat, channel] {
            let seq = post(&poster, chat, cmid.fetch_add(1, Ordering::Relaxed)).await;
            warm_heads.insert(chat, seq);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (name, _, pushes, got) in &mut devices {
            while let Ok(Some(item)) =
                tokio::time::timeout(Duration::from_millis(10), pushes.recv()).await
            {
                got.take(item, name);
            }
        }
        if devices
            .iter()
            .all(|(_, _, _, got)| got.last(group_chat) > 0 && got.last(channel) > 0)
        {
            break 'warm;
        }
    }

    // Phase 1: a burst of posts to both chats; every device gets all of them.
    let mut heads = BTreeMap::new();
    for _ in 0..100 {
        for chat in [group_chat, channel] {
            let seq = post(&poster, chat, cmid.fetch_add(1, Ordering::Relaxed)).await;
            heads.insert(chat, seq);
        }
    }
    for (name, _, pushes, got) in &mut devices {
        receive_until(pushes, got, name, |g| {
            heads.iter().all(|(chat, head)| g.last(*chat) >= *head)
        })
        .await;
    }

    // Push notifications: the leader of the chats' group (another node) notifies carol,
    // and never alice or bob, who are online on node 1 (as node 1 told the others).
    let deadline = Instant::now() + WAIT;
    loop {
        let by_user = notified(&notifications);
        if heads
            .iter()
            .all(|(chat, head)| by_user.get(&(carol.0, *chat)).is_some_and(|s| s >= head))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol not notified up to {heads:?}: {by_user:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_user = notified(&notifications);
    for user in [alice.0, bob.0, paul.0] {
        assert!(
            by_user.keys().all(|(u, _)| *u != user),
            "user {user} is online on node 1 and was notified: {by_user:?}"
        );
    }

    // A read marker set by alice's device on node 3 reaches her devices on node 1.
    let (alice_desk, _) = device(&cluster, 3, &alice, "alice-desk").await;
    let read_seq = heads[&group_chat];
    alice_desk
        .mark_read(v1::MarkReadRequest {
            chat_id: group_chat,
            seq: read_seq,
        })
        .await
        .expect("marked read");
    for (name, _, pushes, got) in devices.iter_mut().take(2) {
        receive_until(pushes, got, name, |g| {
            g.read_markers.contains(&(group_chat, read_seq))
        })
        .await;
    }

    // Phase 2: posts continue while each replica of group 1 is killed in turn and
    // restarted; node 1 was polling one of them.
    let stop = Arc::new(AtomicBool::new(false));
    let cmid = Arc::new(cmid);
    let writer = {
        let stop = Arc::clone(&stop);
        let cmid = Arc::clone(&cmid);
        tokio::spawn(async move {
            let mut heads = BTreeMap::new();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) || sent < 50 {
                for chat in [group_chat, channel] {
                    let seq = post(&poster, chat, cmid.fetch_add(1, Ordering::Relaxed)).await;
                    heads.insert(chat, seq);
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            heads
        })
    };
    for victim in [2, 3, 4] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        eprintln!("killing node {victim}");
        tokio::task::block_in_place(|| cluster.kill(victim));
        tokio::time::sleep(Duration::from_secs(2)).await;
        eprintln!("restarting node {victim}");
        tokio::task::block_in_place(|| cluster.restart(victim));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let heads = writer.await.expect("writer");
    eprintln!("heads after the kills: {heads:?}");

    // Every device ends with exactly each chat's events: dense and once (checked as they
    // arrived), up to the head, equal to what a replica serves.
    for (name, _, pushes, got) in &mut devices {
        receive_until(pushes, got, name, |g| {
            heads.iter().all(|(chat, head)| g.last(*chat) >= *head)
        })
        .await;
    }
    let reader = connect(&cluster, 4, None).await;
    reader
        .login(v1::LoginRequest {
            user_id: paul.0,
            login_token: paul.1.clone(),
            device_id: "paul-reader".into(),
            device_name: "paul-reader".into(),
        })
        .await
        .expect("reader logged in");
    for (chat, head) in &heads {
        let history = cluster::full_history(&reader, *chat, WAIT).await;
        assert_eq!(history.last().map(|e| e.seq), Some(*head), "chat {chat}");
        for (name, _, _, got) in &devices {
            let live = &got.chats[chat];
            let first = live[0].seq;
            assert!(
                first <= warm_heads[chat],
                "{name}: chat {chat} live from seq {first}, after the warm-up"
            );
            assert_eq!(
                live.as_slice(),
                &history[first as usize - 1..],
                "{name}: chat {chat} holds exactly the chat's events"
            );
        }
    }
}
