//! Black-box: typing indicators and presence through a real `chatlog serve`, never
//! stored.
//!
//! Covered: a member's typing reaches every online session of the chat's other members
//! (both devices of one), not the typist's own other device nor a non-member; a
//! non-member's typing is refused; `get_presence` answers who is online and then pushes
//! the changes of those users (offline with a last-seen time when their last connection
//! closes, online again when one opens).

#[path = "common/server.rs"]
mod server;

use std::time::Duration;

use chatlog_wire::client::{Client, ClientOptions, PushItem, PushReceiver};
use chatlog_wire::proto::v1::{self, ErrorCode, push};
use server::Server;

const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);

fn options(token: Option<String>) -> ClientOptions {
    ClientOptions {
        token,
        request_timeout: WAIT,
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
            device_id: format!("{name}-1"),
            device_name: "d".into(),
        })
        .await
        .expect("login");
    (created.user_id, login.session_token)
}

async fn online(addr: &str, token: &str) -> (Client, PushReceiver) {
    let c = Client::connect(addr, options(Some(token.into())))
        .await
        .expect("connects");
    // A call makes sure the connection is up (and registered) before the test goes on.
    c.ping(v1::PingRequest::default()).await.expect("ping");
    let pushes = c.pushes().expect("the push receiver");
    (c, pushes)
}

/// The next push that `pick` accepts, skipping others (chat events and the like).
async fn next_push<T>(rx: &mut PushReceiver, mut pick: impl FnMut(push::Kind) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Some(PushItem::Push { push, .. }) => {
                    if let Some(t) = pick(push) {
                        return t;
                    }
                }
                Some(other) => panic!("unexpected push item {other:?}"),
                None => panic!("pushes ended"),
            }
        }
    })
    .await
    .expect("the push arrives in time")
}

/// Whether a push `pick` accepts arrives within [`QUIET`].
async fn arrives<T>(rx: &mut PushReceiver, mut pick: impl FnMut(push::Kind) -> Option<T>) -> bool {
    tokio::time::timeout(QUIET, async {
        loop {
            match rx.recv().await {
                Some(PushItem::Push { push, .. }) => {
                    if pick(push).is_some() {
                        return;
                    }
                }
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
        }
    })
    .await
    .is_ok()
}

fn typing_of(p: push::Kind) -> Option<v1::Typing> {
    match p {
        push::Kind::Typing(t) => Some(t),
        _ => None,
    }
}

fn presence_of(p: push::Kind) -> Option<v1::Presence> {
    match p {
        push::Kind::Presence(t) => Some(t),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_other_members_and_presence_follows_connections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let srv = Server::start(dir.path(), &[]);
    let anon = Client::connect(&srv.addr, options(None))
        .await
        .expect("connects");
    let (alice, alice_token) = account(&anon, "alice").await;
    let (bob, bob_token) = account(&anon, "bob").await;
    let (_carol, carol_token) = account(&anon, "carol").await;

    let (a1, mut a1_rx) = online(&srv.addr, &alice_token).await;
    let (_a2, mut a2_rx) = online(&srv.addr, &alice_token).await;
    let (b1, mut b1_rx) = online(&srv.addr, &bob_token).await;
    let (b2, mut b2_rx) = online(&srv.addr, &bob_token).await;
    let (c, mut c_rx) = online(&srv.addr, &carol_token).await;
    let chat = a1
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "typing".into(),
            member_ids: vec![bob],
        })
        .await
        .expect("chat")
        .chat_id;

    // Alice types: both of bob's devices see it, with an expiry.
    a1.typing(v1::TypingRequest {
        chat_id: chat,
        typing: true,
    })
    .await
    .expect("typing accepted");
    for rx in [&mut b1_rx, &mut b2_rx] {
        let t = next_push(rx, typing_of).await;
        assert_eq!((t.chat_id, t.user_id, t.typing), (chat, alice, true));
        assert!(t.expires_in_ms > 0, "typing expires on its own");
    }
    // Alice's other device and carol (not a member) see nothing.
    assert!(
        !arrives(&mut a2_rx, typing_of).await,
        "not to the typist's own devices"
    );
    assert!(!arrives(&mut c_rx, typing_of).await, "not to non-members");
    // Stopped.
    b1.typing(v1::TypingRequest {
        chat_id: chat,
        typing: false,
    })
    .await
    .expect("stop accepted");
    let t = next_push(&mut a1_rx, typing_of).await;
    assert_eq!((t.user_id, t.typing, t.expires_in_ms), (bob, false, 0));
    // A non-member may not type there.
    let refused = c
        .typing(v1::TypingRequest {
            chat_id: chat,
            typing: true,
        })
        .await
        .expect_err("carol is no member");
    assert_eq!(
        refused.code(),
        Some(ErrorCode::PermissionDenied),
        "{refused}"
    );

    // Presence: carol asks about alice and bob, then follows bob's connections.
    let p = c
        .get_presence(v1::GetPresenceRequest {
            user_ids: vec![alice, bob],
        })
        .await
        .expect("presence")
        .presences;
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|p| p.online), "both online: {p:?}");
    drop(b1);
    assert!(
        !arrives(&mut c_rx, presence_of).await,
        "bob still has a device online"
    );
    drop(b2);
    let gone = next_push(&mut c_rx, presence_of).await;
    assert_eq!((gone.user_id, gone.online), (bob, false));
    assert!(gone.last_seen_ms > 0, "with a last-seen time");
    let p = c
        .get_presence(v1::GetPresenceRequest {
            user_ids: vec![bob],
        })
        .await
        .expect("presence")
        .presences;
    assert_eq!(
        (p[0].online, p[0].last_seen_ms),
        (false, gone.last_seen_ms),
        "the answer agrees with the push"
    );
    let (_b3, _) = online(&srv.addr, &bob_token).await;
    let back = next_push(&mut c_rx, presence_of).await;
    assert_eq!(
        (back.user_id, back.online, back.last_seen_ms),
        (bob, true, 0)
    );
    // Too many users at once is refused.
    let too_many = c
        .get_presence(v1::GetPresenceRequest {
            user_ids: (1..=101).collect(),
        })
        .await
        .expect_err("over the page limit");
    assert_eq!(too_many.code(), Some(ErrorCode::BadRequest));
}
