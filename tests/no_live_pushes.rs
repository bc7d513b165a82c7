//! Black-box: a connection whose handshake sets `no_live_pushes` (a bot posting, the CLI's
//! one-shot commands, a load generator) through a real `chatlog serve`.
//!
//! Covered: it gets no live pushes (chat events of its user's chats, while the same
//! user's live connection gets them), its posts are answered and reach the live
//! connection, it does not make its user online (`get_presence` of another user), its
//! own subscription still delivers, and after its session is revoked every request of
//! it is refused `UNAUTHENTICATED` while the other session's live connection works.

#[path = "common/server.rs"]
mod server;

use std::time::Duration;

use chatlog_wire::client::{Client, ClientOptions, PushItem, PushReceiver, ReconnectPolicy};
use chatlog_wire::proto::v1::{self, ErrorCode, push};
use server::Server;

const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);

fn options(token: Option<String>, live_pushes: bool) -> ClientOptions {
    ClientOptions {
        token,
        request_timeout: WAIT,
        live_pushes,
        // A dropped connection must fail the test, not be redialled.
        reconnect: ReconnectPolicy::never(),
        ..ClientOptions::default()
    }
}

async fn login(
    anon: &Client,
    user_id: u64,
    login_token: String,
    device: &str,
) -> v1::LoginResponse {
    anon.login(v1::LoginRequest {
        user_id,
        login_token,
        device_id: device.into(),
        device_name: device.into(),
    })
    .await
    .expect("login")
}

async fn connect(addr: &str, token: &str, live_pushes: bool) -> (Client, PushReceiver) {
    let c = Client::connect(addr, options(Some(token.into()), live_pushes))
        .await
        .expect("connects");
    // A call makes sure the connection is up (and registered) before the test goes on.
    c.ping(v1::PingRequest::default()).await.expect("ping");
    let pushes = c.pushes().expect("the push receiver");
    (c, pushes)
}

/// The seqs of the next live `chat_events` push (request id 0) for `chat`, within WAIT.
async fn next_live_events(rx: &mut PushReceiver, chat: u64) -> Vec<u64> {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Some(PushItem::Push {
                    request_id: 0,
                    push: push::Kind::ChatEvents(e),
                }) if e.events.iter().any(|e| e.chat_id == chat) => {
                    return e.events.iter().map(|e| e.seq).collect();
                }
                Some(_) => {}
                None => panic!("pushes ended"),
            }
        }
    })
    .await
    .expect("the live push arrives in time")
}

/// Every push item that arrives within QUIET.
async fn drain_quiet(rx: &mut PushReceiver) -> Vec<PushItem> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(QUIET, async {
        while let Some(item) = rx.recv().await {
            got.push(item);
        }
        std::future::pending::<()>().await
    })
    .await;
    got
}

async fn post(
    c: &Client,
    chat: u64,
    client_message_id: u64,
    text: &str,
) -> v1::SendMessageResponse {
    c.send_message(v1::SendMessageRequest {
        chat_id: chat,
        client_message_id,
        text: text.into(),
        media: None,
        reply_to_seq: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("post {client_message_id}: {e}"))
}

async fn online(watcher: &Client, user: u64) -> bool {
    let r = watcher
        .get_presence(v1::GetPresenceRequest {
            user_ids: vec![user],
        })
        .await
        .expect("get_presence");
    r.presences
        .iter()
        .find(|u| u.user_id == user)
        .expect("asked")
        .online
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_live_pushes_sends_and_subscribes_but_gets_nothing_unasked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let srv = Server::start(dir.path(), &[]);
    let anon = Client::connect(&srv.addr, options(None, true))
        .await
        .expect("connects");
    let alice = anon
        .create_user(v1::CreateUserRequest {
            name: "alice".into(),
        })
        .await
        .expect("user");
    let bob = anon
        .create_user(v1::CreateUserRequest { name: "bob".into() })
        .await
        .expect("user");
    let alice_phone = login(&anon, alice.user_id, alice.login_token.clone(), "phone").await;
    let alice_bot = login(&anon, alice.user_id, alice.login_token.clone(), "bot").await;
    let bob_phone = login(&anon, bob.user_id, bob.login_token.clone(), "phone").await;
    let (b, _b_rx) = connect(&srv.addr, &bob_phone.session_token, true).await;

    // Alice's bot connection alone does not make her online.
    let (quiet, mut quiet_rx) = connect(&srv.addr, &alice_bot.session_token, false).await;
    assert!(
        !online(&b, alice.user_id).await,
        "a connection without live pushes made its user online"
    );
    let (live, mut live_rx) = connect(&srv.addr, &alice_phone.session_token, true).await;
    assert!(
        online(&b, alice.user_id).await,
        "alice's live connection is online"
    );

    let chat = b
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "quiet".into(),
            member_ids: vec![alice.user_id],
        })
        .await
        .expect("chat")
        .chat_id;
    // Bob posts: alice's live connection gets it, her bot connection gets nothing.
    let posted = post(&b, chat, 1, "hello").await;
    let mut seen = Vec::new();
    while !seen.contains(&posted.seq) {
        seen.extend(next_live_events(&mut live_rx, chat).await);
    }
    // The bot posts: answered with its seq, pushed to the live connection.
    let own = post(&quiet, chat, 2, "from the bot").await;
    assert_eq!(own.seq, posted.seq + 1, "the bot's post is the next event");
    while !seen.contains(&own.seq) {
        seen.extend(next_live_events(&mut live_rx, chat).await);
    }
    let unasked = drain_quiet(&mut quiet_rx).await;
    assert!(
        unasked.is_empty(),
        "the connection without live pushes received {unasked:?}"
    );

    // Its own subscription still delivers, under the subscribe request's id.
    let (sub_id, sub) = quiet
        .subscribe_with_id(v1::SubscribeRequest {
            chat_id: chat,
            from_seq: 1,
        })
        .await
        .expect("subscribe");
    assert!(sub.head_seq >= own.seq, "{sub:?}");
    let mut subscribed = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !subscribed.contains(&own.seq) {
            match quiet_rx.recv().await {
                Some(PushItem::Push {
                    request_id,
                    push: push::Kind::ChatEvents(e),
                }) => {
                    assert_eq!(request_id, sub_id, "only its subscription's pushes");
                    subscribed.extend(e.events.iter().map(|e| e.seq));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("the subscription delivers in time");
    assert_eq!(
        subscribed,
        (1..=own.seq).collect::<Vec<_>>(),
        "the subscription's events from seq 1, dense"
    );

    // Revoked: every request from then on is refused.
    live.revoke_session(v1::RevokeSessionRequest {
        session_id: alice_bot.session_id,
    })
    .await
    .expect("revoke");
    for attempt in 0..2 {
        let refused = quiet
            .list_chats(v1::ListChatsRequest {
                after_chat_id: 0,
                limit: 10,
            })
            .await
            .expect_err("a revoked session is refused");
        assert_eq!(
            refused.code(),
            Some(ErrorCode::Unauthenticated),
            "attempt {attempt}: {refused:?}"
        );
    }
    // The live connection of alice's other session still works.
    live.list_chats(v1::ListChatsRequest {
        after_chat_id: 0,
        limit: 10,
    })
    .await
    .expect("the phone's session is not revoked");
}
