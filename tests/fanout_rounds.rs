//! Black-box: live fan-out when one watcher round covers many chats at once, against a
//! real `chatlog serve` process on 127.0.0.1.
//!
//! Many chats of the same few groups are posted to concurrently, so that one Raft entry
//! carries the posts of several chats and the watcher reads the events of many chats in
//! one pass over the log (`src/fanout/round.rs`). Every online device of a member must
//! still get every event of every chat exactly once, in seq order, with no gap, each
//! push holding one chat's events, each event the text that was sent with that seq; a
//! device gets nothing of a chat its user is not a member of. Each group holds chats of
//! two member sets, so events handed to the wrong chat's recipients in a batched read
//! would reach a non-member.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chatlog_wire::client::{Client, ClientOptions, PushItem, PushReceiver};
use chatlog_wire::proto::v1::{self, event, push};

#[path = "common/server.rs"]
mod server;

use server::{NO_RATE_LIMITS, Server};

/// Chats posted to at once: several per group (the server's default groups), so that
/// entries carry posts of many chats.
const CHATS: u64 = 24;
/// Posts per chat, one after another per chat, all chats at once.
const POSTS_PER_CHAT: u64 = 25;
/// Longest wait for anything the test expects to happen.
const WAIT: Duration = Duration::from_secs(20);

async fn client(addr: &str) -> Client {
    let options = ClientOptions {
        request_timeout: Duration::from_secs(10),
        push_queue_len_max: 100_000,
        ..ClientOptions::default()
    };
    Client::connect(addr, options).await.expect("connects")
}

/// A logged-in device of a new user: (user id, client, its pushes).
async fn new_user_device(addr: &str, name: &str) -> (u64, Client, PushReceiver) {
    let c = client(addr).await;
    let pushes = c.pushes().expect("push receiver");
    let created = c
        .create_user(v1::CreateUserRequest { name: name.into() })
        .await
        .expect("user created");
    c.login(v1::LoginRequest {
        user_id: created.user_id,
        login_token: created.login_token,
        device_id: format!("{name}-phone"),
        device_name: String::new(),
    })
    .await
    .expect("logged in");
    (created.user_id, c, pushes)
}

/// What one device received of each chat, checked as it arrives.
#[derive(Debug, Default)]
struct Received {
    /// Per chat, every seq from 1 exactly once.
    chats: HashMap<u64, BTreeMap<u64, v1::Event>>,
}

impl Received {
    /// Takes one `ChatEvents` push: one chat's events, each the next seq of its chat.
    fn take(&mut self, events: Vec<v1::Event>) {
        let chat = events.first().expect("a push carries events").chat_id;
        assert!(
            events.iter().all(|e| e.chat_id == chat),
            "one push holds one chat's events: {events:?}"
        );
        let copy = self.chats.entry(chat).or_default();
        for e in events {
            let last = copy.keys().next_back().copied().unwrap_or(0);
            assert_eq!(
                e.seq,
                last + 1,
                "chat {chat}: live events come dense, in order and once"
            );
            copy.insert(e.seq, e);
        }
    }

    fn head(&self, chat: u64) -> u64 {
        self.chats
            .get(&chat)
            .and_then(|c| c.keys().next_back().copied())
            .unwrap_or(0)
    }
}

/// Receives pushes until every chat of `heads` has reached its head; a `ChatEvents` push
/// of any other chat fails the test (this device's user is not a member there).
async fn receive_all(pushes: &mut PushReceiver, heads: &HashMap<u64, u64>) -> Received {
    let mut received = Received::default();
    while heads
        .iter()
        .any(|(chat, head)| received.head(*chat) < *head)
    {
        let item = tokio::time::timeout(WAIT, pushes.recv())
            .await
            .unwrap_or_else(|_| {
                let behind: Vec<_> = heads
                    .iter()
                    .filter(|(c, h)| received.head(**c) < **h)
                    .map(|(c, h)| (c, received.head(*c), h))
                    .collect();
                panic!("stuck: (chat, received, head) {behind:?}")
            })
            .expect("client alive");
        match item {
            PushItem::Push {
                request_id: 0,
                push: push::Kind::ChatEvents(ev),
            } => {
                let chat = ev.events.first().map_or(0, |e| e.chat_id);
                assert!(
                    heads.contains_key(&chat),
                    "a push of chat {chat}, whose members this user is not among: {ev:?}"
                );
                received.take(ev.events);
            }
            PushItem::Push { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_over_many_chats_pushes_each_chat_dense_in_order_and_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let addr = server.addr.clone();

    let (_alice, alice_phone, mut alice_pushes) = new_user_device(&addr, "alice").await;
    let (bob, _bob_phone, mut bob_pushes) = new_user_device(&addr, "bob").await;
    let (carol, _carol_phone, mut carol_pushes) = new_user_device(&addr, "carol").await;
    let (_dave, dave_phone, mut dave_pushes) = new_user_device(&addr, "dave").await;

    // Alice is in every chat; bob in chats 0-3, 8-11, …, carol in 4-7, 12-15, …: new
    // chats go to the server's 4 groups in turn, so each group holds chats of both
    // member sets (checked below), and one batched read covers both.
    let bobs = |i: usize| (i / 4).is_multiple_of(2);
    let mut chats = Vec::new();
    for i in 0..CHATS as usize {
        let chat = alice_phone
            .create_chat(v1::CreateChatRequest {
                kind: v1::ChatKind::Group.into(),
                title: format!("round {i}"),
                member_ids: vec![if bobs(i) { bob } else { carol }],
            })
            .await
            .expect("chat created")
            .chat_id;
        chats.push(chat);
    }
    let groups_of = |bob_side: bool| -> std::collections::BTreeSet<u64> {
        chats
            .iter()
            .enumerate()
            .filter(|(i, _)| bobs(*i) == bob_side)
            .map(|(_, chat)| chatlog_raft::chat::group_of(*chat))
            .collect()
    };
    assert_eq!(
        groups_of(true),
        groups_of(false),
        "every group holds chats of both member sets"
    );

    // Every chat at once, each chat's posts in order: (chat, seq) → text sent.
    let mut posting = Vec::new();
    for (i, chat) in chats.iter().copied().enumerate() {
        let alice_phone = alice_phone.clone();
        posting.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for k in 1..=POSTS_PER_CHAT {
                let text = format!("chat {i} post {k}");
                let ack = alice_phone
                    .send_message(v1::SendMessageRequest {
                        chat_id: chat,
                        client_message_id: k,
                        text: text.clone(),
                        media: None,
                        reply_to_seq: 0,
                    })
                    .await
                    .expect("sent");
                sent.push((ack.seq, text));
            }
            (chat, sent)
        }));
    }
    let mut texts: HashMap<(u64, u64), String> = HashMap::new();
    let mut heads = HashMap::new();
    for task in posting {
        let (chat, sent) = task.await.expect("poster");
        heads.insert(chat, sent.last().expect("posted").0);
        texts.extend(sent.into_iter().map(|(seq, text)| ((chat, seq), text)));
    }
    let member_heads = |bob_side: bool| -> HashMap<u64, u64> {
        chats
            .iter()
            .enumerate()
            .filter(|(i, _)| bobs(*i) == bob_side)
            .map(|(_, chat)| (*chat, heads[chat]))
            .collect()
    };

    // Every member's device: each of its chats, every seq once and in order, the right
    // text, and nothing of the other chats.
    for (who, pushes, heads) in [
        ("alice", &mut alice_pushes, heads.clone()),
        ("bob", &mut bob_pushes, member_heads(true)),
        ("carol", &mut carol_pushes, member_heads(false)),
    ] {
        let received = receive_all(pushes, &heads).await;
        for (chat, head) in &heads {
            let copy = &received.chats[chat];
            assert_eq!(
                copy.keys().copied().collect::<Vec<_>>(),
                (1..=*head).collect::<Vec<_>>(),
                "{who}, chat {chat}"
            );
            assert!(matches!(copy[&1].body, Some(event::Body::ChatCreated(_))));
            for (seq, e) in copy.range(2..) {
                let Some(event::Body::MessagePosted(m)) = &e.body else {
                    panic!("{who}, chat {chat} seq {seq}: {e:?}");
                };
                assert_eq!(
                    Some(&m.text),
                    texts.get(&(*chat, *seq)),
                    "{who}, chat {chat} seq {seq}: the event carries the text sent with it"
                );
            }
        }
    }

    // A non-member's device got none of it (a ping's answer after the posts proves its
    // connection is read up to here: pushes before it have arrived).
    dave_phone
        .call(v1::request::Kind::Ping(v1::PingRequest { nonce: 1 }))
        .await
        .expect("ping");
    while let Ok(Some(item)) =
        tokio::time::timeout(Duration::from_millis(200), dave_pushes.recv()).await
    {
        if let PushItem::Push {
            push: push::Kind::ChatEvents(ev),
            ..
        } = item
        {
            panic!("a non-member received {ev:?}");
        }
    }
}
