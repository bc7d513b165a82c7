//! Black-box: push notifications for offline members, from a real `chatlog serve
//! --push-webhook` to a small HTTP receiver on 127.0.0.1 written here.
//!
//! Covered: a member without an online session gets notifications of new messages,
//! collapsed per chat (a burst of messages is one or two notifications, not one per
//! message), never with message text; the sender and online members get none; a
//! receiver that fails gets the same notifications again (retries with backoff); and
//! notifications queued while the receiver is down survive a SIGKILL of the server and
//! are delivered after its restart (the outbox is durable).

#[path = "common/server.rs"]
mod server;
#[path = "common/webhook.rs"]
mod webhook;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chatlog_wire::client::{Client, ClientOptions};
use chatlog_wire::proto::v1;
use server::Server;

const TOKEN: &str = "push-secret";
const WAIT: Duration = Duration::from_secs(30);

fn options(token: Option<String>) -> ClientOptions {
    ClientOptions {
        token,
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

async fn account(c: &Client, name: &str) -> (u64, String) {
    let created = c
        .create_user(v1::CreateUserRequest { name: name.into() })
        .await
        .expect("user");
    let login = c
        .login(v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token,
            device_id: "d".into(),
            device_name: "d".into(),
        })
        .await
        .expect("login");
    (created.user_id, login.session_token)
}

/// Per (user, chat): the sum of new_messages, the last seq, the notifications.
type ByChat = BTreeMap<(u64, u64), (u64, u64, usize)>;

/// Accepted notifications so far, and every notification id seen.
fn accepted(rx: &webhook::Receiver) -> (ByChat, Vec<u64>) {
    let mut by = BTreeMap::new();
    let mut ids = Vec::new();
    for (auth, body) in rx.requests.lock().expect("lock").iter() {
        assert_eq!(
            auth.as_deref(),
            Some(&*format!("Bearer {TOKEN}")),
            "token sent"
        );
        for n in body["notifications"].as_array().expect("notifications") {
            let key = (
                n["user_id"].as_u64().expect("user"),
                n["chat_id"].as_u64().expect("chat"),
            );
            let e = by.entry(key).or_insert((0, 0, 0));
            e.0 += n["new_messages"].as_u64().expect("count");
            e.1 = e.1.max(n["last_seq"].as_u64().expect("seq"));
            e.2 += 1;
            ids.push(n["id"].as_u64().expect("id"));
        }
    }
    (by, ids)
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_get_collapsed_durable_notifications() {
    let (hook, rx) = webhook::start().await;
    // The first two deliveries fail: the same notifications must come again.
    rx.failing.store(2, Ordering::SeqCst);

    let dir = tempfile::tempdir().expect("temp dir");
    let flags = [
        "--push-webhook",
        &hook,
        "--push-webhook-token",
        TOKEN,
        "--push-collapse-ms",
        "300",
    ];
    let srv = Server::start(dir.path(), &flags);
    let anon = Client::connect(&srv.addr, options(None))
        .await
        .expect("connects");
    let (alice, alice_token) = account(&anon, "alice").await;
    let (bob, _) = account(&anon, "bob").await;
    let (carol, carol_token) = account(&anon, "carol").await;
    let a = Client::connect(&srv.addr, options(Some(alice_token.clone())))
        .await
        .expect("alice online");
    let _c = Client::connect(&srv.addr, options(Some(carol_token)))
        .await
        .expect("carol online");
    drop(anon);
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "notify".into(),
            member_ids: vec![bob, carol],
        })
        .await
        .expect("chat")
        .chat_id;

    // A burst of five messages while bob is offline.
    let mut last = 0;
    for i in 1..=5u64 {
        last = a
            .send_message(v1::SendMessageRequest {
                chat_id: chat,
                client_message_id: i,
                text: format!("secret-ish text {i}"),
                media: None,
                reply_to_seq: 0,
            })
            .await
            .expect("sent")
            .seq;
    }
    wait_for("bob's notifications", || {
        accepted(&rx).0.get(&(bob, chat)).map(|e| e.0) == Some(5)
    })
    .await;
    let (by, ids) = accepted(&rx);
    let (count, last_seq, notifications) = by[&(bob, chat)];
    eprintln!(
        "bob: {count} new messages in {notifications} notification(s), up to seq {last_seq}; \
         {} refused deliveries before",
        rx.refused.load(Ordering::SeqCst)
    );
    assert_eq!(
        rx.refused.load(Ordering::SeqCst),
        2,
        "two deliveries failed"
    );
    assert_eq!(last_seq, last, "up to the last message");
    assert!(
        notifications <= 2,
        "collapsed: {notifications} notifications for 5 messages"
    );
    assert!(
        !by.contains_key(&(alice, chat)),
        "the sender is not notified"
    );
    assert!(
        !by.contains_key(&(carol, chat)),
        "online members are not notified"
    );
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "each notification accepted once");
    for (_, body) in rx.requests.lock().expect("lock").iter() {
        assert!(
            !body.to_string().contains("secret-ish"),
            "no message text in notifications: {body}"
        );
    }

    // The receiver goes down; three more messages; the server is killed once the
    // notifications are in its outbox, and restarted with the receiver back up.
    rx.failing.store(usize::MAX, Ordering::SeqCst);
    for i in 6..=8u64 {
        last = a
            .send_message(v1::SendMessageRequest {
                chat_id: chat,
                client_message_id: i,
                text: format!("more {i}"),
                media: None,
                reply_to_seq: 0,
            })
            .await
            .expect("sent")
            .seq;
    }
    let refused_before = rx.refused.load(Ordering::SeqCst);
    wait_for("a delivery attempt of the new notification", || {
        rx.refused.load(Ordering::SeqCst) > refused_before
    })
    .await;
    let addr = srv.addr.clone();
    srv.kill();
    rx.failing.store(0, Ordering::SeqCst);
    let _srv = Server::start_on(dir.path(), &addr, &flags);
    wait_for("the notification queued before the kill", || {
        accepted(&rx).0.get(&(bob, chat)).map(|e| e.0) == Some(8)
    })
    .await;
    let (by, _) = accepted(&rx);
    assert_eq!(
        by[&(bob, chat)].1,
        last,
        "up to the last message after the restart"
    );
    eprintln!("after the restart: bob notified of all 8 messages, up to seq {last}");
}
