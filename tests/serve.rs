//! Black-box: a real `chatlog serve` process on 127.0.0.1, driven through
//! `chatlog_wire::Client`. Users, login, chats, sends (with idempotent retries and
//! concurrent senders), history, refusals, subscriptions, and a SIGKILL + restart that
//! loses nothing acknowledged.

use std::time::Duration;

use chatlog_wire::client::{Client, ClientError, ClientOptions, PushItem};
use chatlog_wire::proto::v1::{self, ErrorCode, event::Body};

#[path = "common/server.rs"]
mod server;

use server::{NO_RATE_LIMITS, Server};

async fn client(addr: &str, token: Option<String>) -> Client {
    let options = ClientOptions {
        token,
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    Client::connect(addr, options).await.expect("connects")
}

/// Creates a user and logs in: (user id, session token, logged-in client).
async fn account(addr: &str, name: &str) -> (u64, String, Client) {
    let c = client(addr, None).await;
    let created = c
        .create_user(v1::CreateUserRequest { name: name.into() })
        .await
        .expect("user created");
    assert!(
        !created.login_token.is_empty(),
        "dev mode returns a login token"
    );
    let login = c
        .login(v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token,
            device_id: "laptop".into(),
            device_name: format!("{name}'s laptop"),
        })
        .await
        .expect("logged in");
    (created.user_id, login.session_token, c)
}

fn code(e: ClientError) -> Option<ErrorCode> {
    e.code()
}

async fn send(
    c: &Client,
    chat: u64,
    cmid: u64,
    text: &str,
) -> Result<v1::SendMessageResponse, ClientError> {
    c.send_message(v1::SendMessageRequest {
        chat_id: chat,
        client_message_id: cmid,
        text: text.into(),
        media: None,
        reply_to_seq: 0,
    })
    .await
}

async fn history(c: &Client, chat: u64, from: u64, limit: u32) -> v1::HistoryResponse {
    c.history(v1::HistoryRequest {
        chat_id: chat,
        from_seq: from,
        direction: v1::Direction::Forward.into(),
        limit,
    })
    .await
    .expect("history")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_serves_chats_and_survives_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let addr = server.addr.clone();

    let (alice, alice_token, a) = account(&addr, "alice").await;
    let (bob, bob_token, b) = account(&addr, "bob").await;
    let (_carol, _, c) = account(&addr, "carol").await;

    // Anonymous connections may not do anything but create users and log in.
    let anon = client(&addr, None).await;
    let refused = anon
        .list_chats(v1::ListChatsRequest {
            after_chat_id: 0,
            limit: 10,
        })
        .await
        .expect_err("needs a session");
    assert_eq!(code(refused), Some(ErrorCode::Unauthenticated));

    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "team".into(),
            member_ids: vec![bob],
        })
        .await
        .expect("chat created");
    assert_eq!(chat.seq, 1);
    let chat = chat.chat_id;

    let first = send(&b, chat, 1, "hello alice").await.expect("sent");
    assert_eq!(first.seq, 2);
    assert!(!first.deduplicated);
    // A retry with the same client message id returns the original seq.
    let again = send(&b, chat, 1, "hello alice").await.expect("retried");
    assert_eq!((again.seq, again.deduplicated), (2, true));

    // Refusals: a non-member cannot post or read; an unknown chat is not found.
    assert_eq!(
        code(
            send(&c, chat, 1, "let me in")
                .await
                .expect_err("not a member")
        ),
        Some(ErrorCode::PermissionDenied)
    );
    let read = c
        .history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 1,
            direction: v1::Direction::Forward.into(),
            limit: 10,
        })
        .await
        .expect_err("not a member");
    assert_eq!(code(read), Some(ErrorCode::PermissionDenied));
    assert_eq!(
        code(
            send(&a, chat + (1 << 20), 1, "x")
                .await
                .expect_err("no such chat")
        ),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(
            send(&a, chat, 7, &"x".repeat(20_000))
                .await
                .expect_err("too long")
        ),
        Some(ErrorCode::TooLarge)
    );

    // Live: alice follows the chat from seq 1.
    let mut pushes = a.pushes().expect("push receiver");
    let (sub_id, sub) = a
        .subscribe_with_id(v1::SubscribeRequest {
            chat_id: chat,
            from_seq: 1,
        })
        .await
        .expect("subscribed");
    assert_eq!(sub.head_seq, 2);

    // Concurrent senders on two connections: seqs come out dense and each once.
    let mut tasks = Vec::new();
    for (who, conn) in [(alice, a.clone()), (bob, b.clone())] {
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            let futs: Vec<_> = (0..100u64)
                .map(|i| {
                    let conn = conn.clone();
                    async move { send(&conn, chat, 1000 + i, &format!("{who}:{i}")).await }
                })
                .collect();
            for r in futures_util::future::join_all(futs).await {
                seqs.push(r.expect("sent").seq);
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.expect("task"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (3..=202).collect::<Vec<_>>());

    // The subscription delivers every event 1..=202 in order, without gaps.
    let mut next = 1;
    while next <= 202 {
        let item = tokio::time::timeout(Duration::from_secs(10), pushes.recv())
            .await
            .expect("pushes keep coming")
            .expect("client alive");
        match item {
            // Live fan-out (request id 0) reaches every member's connection too.
            PushItem::Push { request_id: 0, .. } => {}
            PushItem::Push {
                request_id,
                push: v1::push::Kind::ChatEvents(ev),
            } => {
                assert_eq!(request_id, sub_id);
                for e in ev.events {
                    assert_eq!(e.seq, next, "subscription events are dense and ordered");
                    next += 1;
                }
            }
            other => panic!("unexpected push {other:?}"),
        }
    }

    let page = history(&a, chat, 1, 100).await;
    assert_eq!(page.head_seq, 202);
    assert_eq!(page.events.len(), 100);
    assert!(page.has_more);
    match &page.events[0].body {
        Some(Body::ChatCreated(c)) => assert_eq!(c.member_ids.len(), 2),
        other => panic!("seq 1 is {other:?}"),
    }
    match &page.events[1].body {
        Some(Body::MessagePosted(m)) => assert_eq!(m.text, "hello alice"),
        other => panic!("seq 2 is {other:?}"),
    }

    // Delete erases the body; the tombstone is a later event.
    a.delete_message(v1::DeleteMessageRequest {
        chat_id: chat,
        seq: 2,
    })
    .await
    .expect("the owner deletes");
    let got = a
        .get_by_seq(v1::GetBySeqRequest {
            chat_id: chat,
            seqs: vec![2, 203],
        })
        .await
        .expect("get");
    match (&got.events[0].body, &got.events[1].body) {
        (Some(Body::MessagePosted(m)), Some(Body::MessageDeleted(d))) => {
            assert!(m.erased && m.text.is_empty());
            assert_eq!(d.target_seq, 2);
        }
        other => panic!("{other:?}"),
    }

    // Read markers and unread counts.
    let marked = b
        .mark_read(v1::MarkReadRequest {
            chat_id: chat,
            seq: 100,
        })
        .await
        .expect("marked");
    assert_eq!(marked.read_seq, 100);
    let chats = b
        .list_chats(v1::ListChatsRequest {
            after_chat_id: 0,
            limit: 10,
        })
        .await
        .expect("list");
    assert_eq!(chats.chats.len(), 1);
    assert_eq!(chats.chats[0].read_seq, 100);
    assert_eq!(chats.chats[0].head_seq, 203);

    // SIGKILL, restart on the same directory: everything acknowledged is there, and the
    // sessions still authenticate.
    drop((a, b, c, anon, pushes));
    server.kill();
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let a = client(&server.addr, Some(alice_token)).await;
    let b = client(&server.addr, Some(bob_token)).await;
    let mut all = Vec::new();
    let mut from = 1;
    loop {
        let page = history(&a, chat, from, 100).await;
        all.extend(page.events);
        if !page.has_more {
            break;
        }
        from = all.last().expect("events").seq + 1;
    }
    assert_eq!(all.len(), 203);
    assert!(all.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
    let next = send(&b, chat, 5000, "after the crash").await.expect("sent");
    assert_eq!(next.seq, 204);
    let again = send(&b, chat, 1050, "bob:50")
        .await
        .expect("retry after restart");
    assert!(again.deduplicated, "the dedupe window survives a restart");
    drop(server);
}

/// Sends over a user's rate are refused with RATE_LIMITED and a retry-after, never
/// dropped or queued; another user is not affected; after the advertised wait a send fits
/// again; and the client library, allowed to retry, gets through by waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_over_the_rate_limit_are_refused_with_a_retry_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &["--user-sends-per-sec", "5"]);
    let addr = server.addr.clone();
    let (_alice, alice_token, _) = account(&addr, "alice").await;
    let (bob, bob_token, _) = account(&addr, "bob").await;
    let no_retries = |token: String| ClientOptions {
        token: Some(token),
        retries_max: 0,
        ..ClientOptions::default()
    };
    let a = Client::connect(&addr, no_retries(alice_token.clone()))
        .await
        .expect("connects");
    let b = Client::connect(&addr, no_retries(bob_token))
        .await
        .expect("connects");
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "limits".into(),
            member_ids: vec![bob],
        })
        .await
        .expect("chat")
        .chat_id;
    let (mut ok, mut limited, mut retry_after) = (0, 0, None);
    for i in 0..20 {
        match send(&a, chat, 100 + i, "fast").await {
            Ok(_) => ok += 1,
            Err(ClientError::Server {
                code: ErrorCode::RateLimited,
                retry_after: r,
                ..
            }) => {
                limited += 1;
                retry_after = r;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    // A burst of 5 tokens, one already spent on creating the chat, plus what refilled
    // while the sends ran.
    assert!((4..20).contains(&ok), "{ok} sends went through");
    assert_eq!(ok + limited, 20);
    let wait = retry_after.expect("a refusal says when to retry");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(200),
        "{wait:?}"
    );
    // Bob has his own budget.
    send(&b, chat, 1, "bob is fine")
        .await
        .expect("another user is not limited");
    tokio::time::sleep(wait).await;
    send(&a, chat, 500, "after the wait")
        .await
        .expect("fits after the wait");
    // With retries allowed the client waits the advertised time and gets through.
    let patient = client(&addr, Some(alice_token)).await;
    for i in 0..10 {
        send(&patient, chat, 600 + i, "patient")
            .await
            .expect("retried through");
    }
    let head = history(&patient, chat, 1, 100).await.head_seq;
    assert_eq!(
        head,
        1 + ok + 1 + 1 + 10,
        "every accepted send, none of the refused"
    );
}
